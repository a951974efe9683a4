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

/// A CONNECT proxy on loopback that records each request head, relays
/// accepted tunnels to their target, and counts them.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_connect_proxy() -> ConnectProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = heads.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if !matches!(client.read(&mut byte).await, Ok(1)) {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                recorded.lock().unwrap().push(head);
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    ConnectProxy { addr, heads, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_an_http_proxy_reaches_the_server_through_connect() {
    use tunnel_agent::proxy::{ProxySettings, ProxyUrl};
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let proxy = start_connect_proxy().await;
    let url = format!("http://tunnel:s3cret@{}", proxy.addr);
    let mut config = agent_config(&pki, "east", &[server.agent_addr]);
    config.proxy = ProxySettings::new(ProxyUrl::parse("HTTPS_PROXY", &url).unwrap(), "").unwrap();
    let _agent = start_agent_with(config, &server).await;

    // The tunnel went through the proxy: one CONNECT to the server, with the credentials.
    let heads = proxy.heads.lock().unwrap().clone();
    let target = server.agent_addr.to_string();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(&format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n")),
        "{heads:?}"
    );
    assert!(
        heads[0].contains("Proxy-Authorization: Basic dHVubmVsOnMzY3JldA=="),
        "{heads:?}"
    );
    // And carries connections like any tunnel.
    let echo = start_echo().await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", echo.port())).await;
    check_echo(port, 256 * 1024).await;

    // A server NO_PROXY names is dialled directly: the proxy hears nothing.
    let direct = start_server(&pki).await;
    let mut config = agent_config(&pki, "east", &[direct.agent_addr]);
    config.proxy =
        ProxySettings::new(ProxyUrl::parse("HTTPS_PROXY", &url).unwrap(), "127.0.0.0/8").unwrap();
    let _direct_agent = start_agent_with(config, &direct).await;
    assert_eq!(proxy.heads.lock().unwrap().len(), 1);
}
