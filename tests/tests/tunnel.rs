//! The tunnel core end to end, in one process: client library -> server ->
//! agent -> destination, over real TLS on loopback.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_proto::error::ErrorCode;
use tunnel_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_server_and_agent() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", echo.port())).await;

    let mut tcp = TcpStream::connect(port).await.unwrap();
    tcp.write_all(b"ping through the tunnel").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ping through the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_and_half_close() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let greeter = start_greeter("east").await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", greeter.port())).await;

    let mut tcp = TcpStream::connect(port).await.unwrap();
    // The destination speaks first; nothing was sent yet.
    let mut greeting = [0u8; 16];
    tcp.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello from east\n");
    // Client half-closes, then still reads the whole reply.
    tcp.write_all(b"after the greeting").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest))
        .await
        .expect("the reply and the FIN arrive")
        .unwrap();
    assert_eq!(rest, b"after the greeting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cluster_and_no_agent_are_typed() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    config.known_clusters = vec!["west".into()];
    let server = tunnel_server::Server::start(config).await.unwrap();
    let client = client(&pki, "app", server.client_addr);
    let err = client
        .open(&Target::new("nowhere", "a", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownCluster, "{err}");
    let err = client.open(&Target::new("west", "a", 1)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoAgent, "{err}");
}
