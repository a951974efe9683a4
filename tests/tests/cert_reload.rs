//! Certificate files replaced under running components: new handshakes use
//! the new certificate, key and CA; connections already open keep working.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_proto::client::Target;
use tunnel_tests::*;

/// The leaf certificate the server at `addr` presents to a new connection,
/// with a fresh client configuration (no session to resume) read from the
/// current files of client `app`.
async fn presented_cert(pki: &Pki, addr: SocketAddr) -> Result<Vec<u8>, String> {
    let config =
        tunnel_proto::tls::client_config(&pki.files("client-app")).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tunnel_proto::tls::peer_leaf(tls.get_ref().1)
        .map(|c| c.to_vec())
        .ok_or_else(|| "no server certificate".to_owned())
}

fn file_leaf(pki: &Pki, name: &str) -> Vec<u8> {
    tunnel_proto::tls::load_certs(&pki.files(name).cert, "test").unwrap()[0].to_vec()
}

/// Waits until new connections to `addr` are served the certificate now in
/// the server's files.
async fn wait_presented(pki: &Pki, addr: SocketAddr) {
    let want = file_leaf(pki, "server");
    wait_until(
        "new handshakes present the new server certificate",
        Duration::from_secs(10),
        || {
            let want = want.clone();
            async move { presented_cert(pki, addr).await.ok() == Some(want) }
        },
    )
    .await;
}

/// Sends `msg` on an open tunnelled connection to an echo service and
/// checks that it comes back.
async fn echo_on(tcp: &mut TcpStream, msg: &[u8]) {
    tcp.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back))
        .await
        .expect("the echo comes back")
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissued_server_certificate_serves_new_handshakes() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", echo.port())).await;
    let mut open = TcpStream::connect(port).await.unwrap();
    echo_on(&mut open, b"before the new certificate").await;

    let first = file_leaf(&pki, "server");
    assert_eq!(
        presented_cert(&pki, server.client_addr).await,
        Ok(first.clone())
    );
    // Re-issue the server's certificate (same CA, new key) in place.
    Pki::generate_into(pki.dir.path(), &[], &[]);
    assert_ne!(file_leaf(&pki, "server"), first);
    wait_presented(&pki, server.client_addr).await;
    wait_presented(&pki, server.agent_addr).await;

    // The connection opened before still works, and so do new ones.
    echo_on(&mut open, b"after the new certificate").await;
    check_echo(port, 64 * 1024).await;
    let fresh = tunnel_tests::client(&pki, "app", server.client_addr);
    let port = forward_port(fresh, Target::new("east", "127.0.0.1", echo.port())).await;
    check_echo(port, 64 * 1024).await;
}

/// A TCP relay whose connections can all be cut at once, and which can
/// refuse new ones for a while.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    refuse: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let tracked = conns.clone();
        let refuse = Arc::new(AtomicBool::new(false));
        let refusing = refuse.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            addr,
            conns,
            refuse,
        }
    }

    /// Cuts every connection and refuses new ones until [`Relay::resume`].
    fn cut(&self) {
        self.refuse.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn resume(&self) {
        self.refuse.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_to_a_new_ca_is_followed_by_server_agent_and_client() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let relay = Relay::start(server.agent_addr).await;
    let _agent = start_agent_with(agent_config(&pki, "east", &[relay.addr]), &server).await;
    let echo = start_echo().await;
    let target = Target::new("east", "127.0.0.1", echo.port());
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client.clone(), target.clone()).await;
    let mut open = TcpStream::connect(port).await.unwrap();
    echo_on(&mut open, b"before the rotation").await;

    // A new CA, and every certificate re-issued by it.
    std::fs::remove_file(pki.path("ca.pem")).unwrap();
    std::fs::remove_file(pki.path("ca-key.pem")).unwrap();
    Pki::generate_into(pki.dir.path(), &["east"], &["app"]);

    // The server presents its new certificate (a client trusting only the
    // new CA accepts it) and still carries the connections opened before.
    wait_presented(&pki, server.client_addr).await;
    echo_on(&mut open, b"after the rotation").await;
    check_echo(port, 64 * 1024).await;

    // The agent reconnects: the server now trusts only the new CA, so the
    // tunnel comes back only if the agent presents its new certificate.
    drop(open);
    relay.cut();
    let state = server.state().clone();
    wait_until("the agent is gone", Duration::from_secs(10), || {
        let n = state.pool.agent_count();
        async move { n == 0 }
    })
    .await;
    relay.resume();
    wait_until(
        "the agent is back with its new certificate",
        Duration::from_secs(15),
        || {
            let n = state.pool.agent_count();
            async move { n == 1 }
        },
    )
    .await;
    // New clients (new certificate) reach the cluster through it.
    let fresh = tunnel_tests::client(&pki, "app", server.client_addr);
    let port = forward_port(fresh, target).await;
    check_echo(port, 64 * 1024).await;
}
