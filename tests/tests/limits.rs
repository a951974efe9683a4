//! Limits answer with `resource_exhausted`, never a freeze; the idle timeout
//! cuts a silent connection and leaves a busy one alone.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_proto::error::ErrorCode;
use tunnel_tests::*;

/// Opens `n` connections to `target` and keeps them.
async fn open_n(
    client: &tunnel_proto::client::TunnelClient,
    target: &Target,
    n: usize,
) -> Vec<tunnel_proto::client::TunnelIo> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            client
                .open_io(target)
                .await
                .unwrap_or_else(|e| panic!("connection {i} of {n} opens: {e}")),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_identity_limit_are_refused_as_resource_exhausted() {
    init();
    let pki = Pki::new(&["east"], &["app", "other"]);
    let mut config = server_config(&pki);
    config.limits.max_connections_per_identity = 5;
    let server = tunnel_server::Server::start(config).await.unwrap();
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let target = Target::new("east", "127.0.0.1", echo.port());
    let app = client(&pki, "app", server.client_addr);
    let held = open_n(&app, &target, 5).await;
    let err = tokio::time::timeout(Duration::from_secs(10), app.open_io(&target))
        .await
        .expect("the sixth open is answered, not left waiting")
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ResourceExhausted, "{err}");
    assert!(
        err.message.contains("max-connections-per-identity"),
        "{err}"
    );
    // Another identity is not affected.
    let other = client(&pki, "other", server.client_addr);
    let mut io = other
        .open_io(&target)
        .await
        .expect("another identity opens");
    io.write_all(b"still served").await.unwrap();
    io.shutdown().await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"still served");
    // A closed connection frees its slot.
    drop(held);
    wait_until(
        "the closed connections free their slots",
        Duration::from_secs(10),
        || {
            let app = app.clone();
            let target = target.clone();
            async move { app.open_io(&target).await.is_ok() }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_refuses_new_connections_as_resource_exhausted() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    config.limits.max_connections_per_agent = 3;
    let server = tunnel_server::Server::start(config).await.unwrap();
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let target = Target::new("east", "127.0.0.1", echo.port());
    let app = client(&pki, "app", server.client_addr);
    let _held = open_n(&app, &target, 3).await;
    let err = tokio::time::timeout(Duration::from_secs(10), app.open_io(&target))
        .await
        .expect("the fourth open is answered, not left waiting")
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ResourceExhausted, "{err}");
    assert!(err.message.contains("max-connections-per-agent"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_resets_a_silent_connection_and_spares_a_busy_one() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    config.limits.idle_timeout = Some(Duration::from_millis(800));
    let server = tunnel_server::Server::start(config).await.unwrap();
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let app = client(&pki, "app", server.client_addr);
    let port = forward_port(app, Target::new("east", "127.0.0.1", echo.port())).await;

    let mut silent = TcpStream::connect(port).await.unwrap();
    let mut busy = TcpStream::connect(port).await.unwrap();
    // The busy one echoes a byte every 200 ms for 3 s: far past the timeout.
    for _ in 0..15 {
        busy.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut b))
            .await
            .expect("the busy connection keeps echoing")
            .expect("the busy connection is not cut");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The silent one was reset meanwhile (RST, not a clean FIN).
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the silent connection is cut");
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the silent connection ended with a clean read of {n} bytes, not a reset"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_waiting_on_a_silent_server_share_one_dial_and_all_get_the_error() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    // A "server" that accepts TCP but never answers the TLS handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let client = std::sync::Arc::new(tunnel_proto::client::TunnelClient::new(
        tunnel_proto::client::ClientOptions {
            servers: vec![addr.to_string()],
            server_name: Some("localhost".into()),
            tls: tunnel_proto::tls::ClientTls::client(pki.files("client-app")).unwrap(),
            h2: tunnel_proto::h2::H2Settings::default(),
            connect_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(30),
            token_file: None,
        },
    ));
    let target = Target::new("east", "127.0.0.1", 9);
    let opens: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            let target = target.clone();
            tokio::spawn(async move { client.open_io(&target).await.map(|_| ()) })
        })
        .collect();
    for open in opens {
        let err = tokio::time::timeout(Duration::from_secs(20), open)
            .await
            .expect("every open is answered")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::TunnelBroken, "{err}");
    }
    // One dial answered all five: they did not queue one dial each.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
