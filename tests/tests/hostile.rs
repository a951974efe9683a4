//! Hostile and confused peers on every listener of the real binaries:
//! random bytes, plain HTTP/1, TLS without a certificate, and an agent with a
//! certificate from another CA. Each is refused and logged; the server keeps
//! serving. Build the binaries first: `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::time::Duration;

use rand::RngCore;
use tunnel_proto::client::Target;
use tunnel_tests::*;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

const PLAIN_HTTP: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// Random bytes, a plain HTTP/1 request and a TLS client without a
/// certificate on a TLS port: each refused.
async fn refused_on_tls_port(pki: &Pki, name: &str, addr: SocketAddr) {
    for (what, bytes) in [
        ("random bytes", random_bytes(4096)),
        ("a plain HTTP/1 request", PLAIN_HTTP.to_vec()),
    ] {
        let how = refused_after(addr, &bytes)
            .await
            .unwrap_or_else(|e| panic!("{what} on the {name}: {e}"));
        assert!(
            !how.starts_with("HTTP"),
            "{what} on the {name}: a TLS port answered HTTP"
        );
        println!("{what} on the {name}: {how}");
    }
    let how = tls_without_cert_is_refused(pki, addr)
        .await
        .unwrap_or_else(|e| panic!("TLS without a certificate on the {name}: {e}"));
    println!("TLS without a certificate on the {name}: {how}");
}

/// Random bytes and a TLS client on an admin (HTTP/1) port: 400 or closed;
/// the port still answers `/healthz` afterwards.
async fn refused_on_admin_port(pki: &Pki, name: &str, addr: SocketAddr) {
    let how = refused_after(addr, &random_bytes(4096))
        .await
        .unwrap_or_else(|e| panic!("random bytes on the {name}: {e}"));
    println!("random bytes on the {name}: {how}");
    // The TLS ClientHello is garbage to HTTP/1.
    let how = refused_after(addr, &tls_client_hello(pki).await)
        .await
        .unwrap_or_else(|e| panic!("a TLS ClientHello on the {name}: {e}"));
    println!("a TLS ClientHello on the {name}: {how}");
    let how = tls_without_cert_is_refused(pki, addr)
        .await
        .unwrap_or_else(|e| panic!("a TLS client on the {name}: {e}"));
    println!("a TLS client on the {name}: {how}");
    // HTTP/1 is this port's own protocol: a request is answered.
    let (status, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{name} /healthz");
}

/// The first bytes a TLS client sends (its ClientHello).
async fn tls_client_hello(pki: &Pki) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = tls_without_client_cert(pki);
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let _ = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await;
    });
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut hello = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut hello),
    )
    .await
    .expect("a ClientHello")
    .unwrap();
    hello.truncate(n);
    drop(tcp);
    client.abort();
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_listener_is_refused_and_logged() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let server = spawn_server("server", pki.dir.path(), &addrs, &[]).await;
    let agent_admin = free_addr();
    let agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;
    let client = client(&pki, "app", addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    let echo = start_echo().await;
    let port = forward_port(
        client.clone(),
        Target::new("east", "127.0.0.1", echo.port()),
    )
    .await;
    // A connection open before, and one after: the server serves throughout.
    let mut open = tokio::net::TcpStream::connect(port).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut open, b"still here")
        .await
        .unwrap();
    let before = fetch_metrics(addrs.admin).await;

    refused_on_tls_port(&pki, "server's agent port", addrs.agent).await;
    refused_on_tls_port(&pki, "server's client port", addrs.client).await;
    refused_on_admin_port(&pki, "server's admin port", addrs.admin).await;
    refused_on_admin_port(&pki, "agent's admin port", agent_admin).await;

    // Each refusal on a tunnel port is counted and logged with its port.
    let after = fetch_metrics(addrs.admin).await;
    for listener in ["agent", "client"] {
        let series = format!(
            r#"tunnel_server_rejected_connections_total{{listener="{listener}",reason="tls"}}"#
        );
        let was = metric(&before, &series).unwrap_or(0.0);
        let now = metric(&after, &series).unwrap_or(0.0);
        assert!(
            now - was >= 3.0,
            "{series}: {was} before, {now} after three refusals\n{after}"
        );
        server
            .wait_log(
                &["connection refused", &format!("listener=\"{listener}\"")],
                3,
                Duration::from_secs(10),
            )
            .await;
    }
    // The admin ports log what they could not parse.
    server
        .wait_log(&["admin connection error"], 2, Duration::from_secs(10))
        .await;
    agent
        .wait_log(&["admin connection error"], 2, Duration::from_secs(10))
        .await;

    // Nothing of this disturbed the tunnel: old and new connections work.
    let mut back = [0u8; 10];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(&mut open, &mut back),
    )
    .await
    .expect("the open connection's echo")
    .unwrap();
    assert_eq!(&back, b"still here");
    check_echo(port, 1 << 20).await;
    assert_eq!(listed_agents(&client, "east").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    // Another installation's CA issued this agent's certificate; the agent
    // itself trusts our server, so only the server can refuse it.
    let rogue = Pki::new(&["rogue"], &[]);
    let addrs = ServerAddrs::free();
    let server = spawn_server("server", pki.dir.path(), &addrs, &[]).await;
    let rogue_admin = free_addr();
    let ca = pki.path("ca.pem").display().to_string();
    let args = agent_args(
        rogue.dir.path(),
        "rogue",
        addrs.agent,
        rogue_admin,
        &["--allow", "127.0.0.0/8", "--ca", &ca],
    );
    let rogue_agent = Proc::spawn("rogue-agent", "tunnel-agent", &args, &[]);
    let agent_admin = free_addr();
    let _agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;

    // Refused at the TLS handshake, again on each retry.
    server
        .wait_log(
            &["TLS handshake failed", "listener=\"agent\""],
            2,
            Duration::from_secs(20),
        )
        .await;
    rogue_agent
        .wait_log(&["tunnel failed"], 2, Duration::from_secs(20))
        .await;
    let metrics = fetch_metrics(addrs.admin).await;
    assert!(
        metric(
            &metrics,
            r#"tunnel_server_rejected_connections_total{listener="agent",reason="tls"}"#
        )
        .is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
    assert!(
        !metrics.contains("rogue"),
        "the rogue cluster must not appear in the metrics:\n{metrics}"
    );
    let (status, _) = http_get(rogue_admin, "/readyz").await.unwrap();
    assert_eq!(status, 503, "the rogue agent has no tunnel");

    let client = client(&pki, "app", addrs.client);
    let clusters = client.list_clusters().await.unwrap();
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["east"],
        "only the real agent's cluster is listed: {clusters:?}"
    );
    let err = client
        .open(&Target::new("rogue", "127.0.0.1", 80))
        .await
        .expect_err("no tunnel to the rogue cluster");
    assert_eq!(
        err.code,
        tunnel_proto::error::ErrorCode::UnknownCluster,
        "{err}"
    );
}
