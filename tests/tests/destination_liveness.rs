//! A destination is judged by whether it answers, not by whether it reads.
//!
//! The agent's `--dead-peer-timeout` finds a destination that vanished with
//! data on its way to it, but a destination that is alive and merely stops
//! reading (its window closed) keeps its connection however long it
//! pauses: Linux's `TCP_USER_TIMEOUT` would reset it after the timeout even
//! though the peer answers every window probe, so the agent does not set it
//! on destination sockets and watches the peer itself
//! (`tunnel_proto::net::peer`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_agent::allowlist::Allowlist;
use tunnel_proto::client::Target;
use tunnel_proto::net::Liveness;
use tunnel_tests::*;

/// The agent's dead-peer timeout in these tests.
const DEAD_PEER: Duration = Duration::from_secs(2);
/// How long the destination stops reading: several dead-peer timeouts.
const PAUSE: Duration = Duration::from_secs(8);
/// Bytes sent towards the pausing destination: more than every buffer on
/// the way holds, so that the destination's window closes.
const SENT: usize = 48 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_reading_longer_than_the_dead_peer_timeout_keeps_its_connection() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let mut config = agent_config(&pki, "east", &[server.agent_addr]);
    config.h2.liveness = Liveness::from_timeout(DEAD_PEER);
    let _agent = start_agent_with(config, &server).await;

    // Accepts, reads nothing for PAUSE, then reads to the end and answers
    // with the count.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let destination = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(PAUSE).await;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(err) => return Err(format!("after {total} bytes: {err}")),
            }
        }
        tcp.write_all(&total.to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        Ok(total)
    });

    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", dest.port())).await;
    let mut tcp = TcpStream::connect(port).await.unwrap();
    let started = Instant::now();
    let chunk = vec![0x42u8; 1024 * 1024];
    for _ in 0..SENT / chunk.len() {
        tcp.write_all(&chunk)
            .await
            .expect("the connection towards a pausing destination stays open");
    }
    assert!(
        started.elapsed() >= PAUSE - Duration::from_secs(1),
        "the writes never waited for the destination ({:?}): its window never closed, so this test proves nothing",
        started.elapsed()
    );
    tcp.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(60), tcp.read_exact(&mut count))
        .await
        .expect("the destination answers")
        .expect("the destination's count arrives");
    assert_eq!(u64::from_be_bytes(count), SENT as u64);
    assert_eq!(destination.await.unwrap(), Ok(SENT as u64));
}

/// A reader of everything on `0.0.0.0:port`, run inside the namespace.
const SINK_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        while c.recv(1 << 20):
            pass
    except OSError:
        pass
    c.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_vanishes_with_data_on_its_way_is_reset_within_the_dead_peer_timeout() {
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    init();
    let ns = NetNs::create();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let mut config = agent_config(&pki, "east", &[server.agent_addr]);
    config.h2.liveness = Liveness::from_timeout(DEAD_PEER);
    config.allowlist = Allowlist::parse(&[format!("{}/32", ns.cluster_ip)]).unwrap();
    let _agent = start_agent_with(config, &server).await;

    const PORT: u16 = 7071;
    let mut sink = ns.command(tunnel_tests::netns::python3());
    sink.args(["-c", SINK_PY, &PORT.to_string()]);
    let sink = Proc::spawn_command("destination", sink);
    sink.wait_log(&["listening"], 1, Duration::from_secs(20))
        .await;

    let client = client(&pki, "app", server.client_addr);
    let dest = SocketAddr::from((ns.cluster_ip, PORT));
    let port = forward_port(
        client,
        Target::new("east", dest.ip().to_string(), dest.port()),
    )
    .await;
    let tcp = TcpStream::connect(port).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // Data flows; then the destination's host vanishes (its link goes down:
    // nothing answers any more, not even with a reset).
    let writer = tokio::spawn(async move {
        let chunk = vec![0x17u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            if let Err(err) = wr.write_all(&chunk).await {
                return (total, err);
            }
            total += chunk.len() as u64;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "ip",
            "link",
            "set",
            &ns.hub_if.replacen("cth", "ctn", 1),
            "down",
        ])
        .output()
        .unwrap();
    assert!(down.status.success(), "link down: {down:?}");
    let vanished = Instant::now();

    // The agent resets the connection: the client reads a reset (or an
    // end), and its writes fail, well before the kernel's own limit
    // (15 retransmissions, many minutes).
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf))
        .await
        .expect("the connection to a vanished destination ends within 20 s");
    assert!(
        !matches!(ended, Ok(n) if n > 0),
        "the sink never answers: {ended:?}"
    );
    let (sent, err) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer fails once the connection ended")
        .unwrap();
    assert!(sent > 0, "no data flowed before the destination vanished");
    let took = vanished.elapsed();
    assert!(
        took >= DEAD_PEER,
        "ended after {took:?}, before the dead-peer timeout: something else cut it ({ended:?}, {err})"
    );
    println!("vanished destination found after {took:?}: read {ended:?}, write {err}");
}
