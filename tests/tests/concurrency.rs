//! Many connections at once through one client, one server and one agent.

use std::sync::Arc;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tunnel_proto::client::Target;
use tunnel_tests::*;

const CONNECTIONS: usize = 1000;
/// Each connection's payload: distinct per connection, sent in two halves.
const PAYLOAD: usize = 16 * 1024;

fn payload(i: usize) -> Vec<u8> {
    let mut data = vec![0u8; PAYLOAD];
    rand::rngs::SmallRng::seed_from_u64(i as u64).fill_bytes(&mut data);
    let tag = format!("connection {i:04}\n");
    data[..tag.len()].copy_from_slice(tag.as_bytes());
    data
}

/// One connection: first half echoed (the tunnel is up end to end), then
/// everyone waits until all are open, then the second half and FIN.
async fn one(
    i: usize,
    port: std::net::SocketAddr,
    all_open: Arc<Barrier>,
    checked: Arc<Barrier>,
) -> Result<(), String> {
    let data = payload(i);
    let (first, second) = data.split_at(PAYLOAD / 2);
    let mut tcp = TcpStream::connect(port)
        .await
        .map_err(|e| format!("connection {i}: connect: {e}"))?;
    tcp.write_all(first)
        .await
        .map_err(|e| format!("connection {i}: write: {e}"))?;
    let mut back = vec![0u8; first.len()];
    tcp.read_exact(&mut back)
        .await
        .map_err(|e| format!("connection {i}: read: {e}"))?;
    if back != first {
        return Err(format!("connection {i}: first half came back different"));
    }
    all_open.wait().await;
    checked.wait().await;
    tcp.write_all(second)
        .await
        .map_err(|e| format!("connection {i}: write: {e}"))?;
    tcp.shutdown()
        .await
        .map_err(|e| format!("connection {i}: shutdown: {e}"))?;
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest)
        .await
        .map_err(|e| format!("connection {i}: read: {e}"))?;
    if rest != second {
        return Err(format!(
            "connection {i}: second half came back different ({} bytes)",
            rest.len()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_all_complete() {
    // Four descriptors per connection in this process (client socket and
    // its accepted end, the agent's dial and the echo's end), plus slack.
    ensure_fd_limit(CONNECTIONS as u64 * 4 + 1024);
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", echo.port())).await;

    // Each connection and this test meet twice: once all are open, and once
    // the test has counted them.
    let all_open = Arc::new(Barrier::new(CONNECTIONS + 1));
    let checked = Arc::new(Barrier::new(CONNECTIONS + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        tasks.spawn(one(i, port, all_open.clone(), checked.clone()));
    }
    tokio::time::timeout(Duration::from_secs(120), all_open.wait())
        .await
        .expect("all 1000 connections open and echo within 120 s");
    assert_eq!(
        server.state().open_connections(),
        CONNECTIONS,
        "the server carries all connections at once"
    );
    let metrics = fetch_metrics(server.admin_addr).await;
    assert_eq!(
        metric(&metrics, "tunnel_server_open_connections"),
        Some(CONNECTIONS as f64),
        "{metrics}"
    );
    checked.wait().await;

    let mut failures = Vec::new();
    let finish = async {
        while let Some(res) = tasks.join_next().await {
            if let Err(err) = res.expect("connection task") {
                failures.push(err);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), finish)
        .await
        .expect("all 1000 connections finish within 120 s");
    assert!(
        failures.is_empty(),
        "{} connection(s) failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let state = server.state().clone();
    wait_until(
        "the server has closed every connection",
        Duration::from_secs(20),
        || {
            let n = state.open_connections();
            async move { n == 0 }
        },
    )
    .await;
    let metrics = fetch_metrics(server.admin_addr).await;
    assert_eq!(
        metric(&metrics, r#"tunnel_server_dials_total{code="ok"}"#),
        Some(CONNECTIONS as f64),
        "{metrics}"
    );
}
