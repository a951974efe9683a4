//! HTTP CONNECT at the server's client port: HTTP/1.1 over the same mTLS
//! port as our own protocol, for tools that can use a TLS proxy but cannot
//! run a sidecar. `curl --proxy https://…` with a client certificate reaches
//! a cluster service through a real server and agent (with `-p`, a CONNECT
//! tunnel; without, an absolute-form request the server forwards); a
//! client that negotiates `http/1.1` by ALPN carries bytes both ways with
//! half-closes, and bytes sent right behind the CONNECT head are not lost;
//! refusals carry the status and code a proxy client acts on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tunnel_server::Server;
use tunnel_tests::*;

/// What the cluster's web service answers.
const HELLO: &str = "hello from a service in east\n";
/// What the stand-in kube-apiserver answers.
const API: &str = "kube-apiserver of east\n";

/// A server (with `policy`, if any) and an agent of `east` that knows
/// `hello.default.svc` and `kubernetes.default.svc` as 127.0.0.1.
async fn hub(pki: &Pki, policy: Option<&str>) -> (Server, tunnel_agent::Agent) {
    init();
    let server = start_server_with_policy(pki, policy).await;
    let agent = start_agent_resolving(
        pki,
        "east",
        &server,
        &["kubernetes.default.svc", "hello.default.svc"],
    )
    .await;
    (server, agent)
}

/// An HTTP/1.1 service answering every request with `body`, then closing.
async fn start_web(body: &'static str) -> SocketAddr {
    start_service(move |tcp| async move {
        let mut tcp = BufReader::new(tcp);
        let mut line = String::new();
        // The request head, up to its empty line.
        while tcp.read_line(&mut line).await.is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.get_mut().write_all(answer.as_bytes()).await;
        let _ = tcp.get_mut().shutdown().await;
    })
    .await
}

/// Runs curl with `args` through the server's client port as client `app`;
/// `None` when curl is not installed.
async fn curl(pki: &Pki, server: &Server, args: &[&str]) -> Option<std::process::Output> {
    let proxy = format!("https://127.0.0.1:{}", server.client_addr.port());
    let path = |name: &str| pki.path(name).display().to_string();
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy", &proxy])
        .args(["--proxy-cacert", &path("ca.pem")])
        .args(["--proxy-cert", &path("client-app.pem")])
        .args(["--proxy-key", &path("client-app-key.pem")])
        .args(args)
        .output()
        .await;
    match output {
        Ok(output) => Some(output),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => panic!("cannot run curl: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_cluster_service_through_the_server_over_mtls() {
    let pki = Pki::new(&["east"], &["app"]);
    let (server, _agent) = hub(&pki, None).await;
    let web = start_web(HELLO).await;
    let api = start_web(API).await;
    let service = format!(
        "http://hello.default.svc.east.tunnel.internal:{}/",
        web.port()
    );
    let apiserver = format!("http://east:{}/version", api.port());
    for (args, expected) in [
        // An absolute-form request, forwarded by the server.
        (vec![service.as_str()], HELLO),
        // A CONNECT tunnel (-p), the request inside it.
        (vec!["-p", service.as_str()], HELLO),
        // cluster-proxy's name for the cluster's kube-apiserver.
        (vec!["-p", apiserver.as_str()], API),
    ] {
        let Some(out) = curl(&pki, &server, &args).await else {
            println!("skipped: curl is not installed");
            return;
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout == expected,
            "curl {args:?}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A refusal reads as one: curl fails the CONNECT with the status.
    let Some(out) = curl(&pki, &server, &["-p", "http://nowhere:80/"]).await else {
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("404"), "{stderr}");
    let metrics = fetch_metrics(server.admin_addr).await;
    assert_eq!(
        metric(&metrics, r#"tunnel_server_dials_total{code="ok"}"#),
        Some(3.0),
        "{metrics}"
    );
}

/// A TLS connection to the client port as client `cert`, offering `alpn`.
async fn tls_to(
    pki: &Pki,
    cert: &str,
    server: SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = (*tunnel_proto::tls::client_config(&pki.files(cert)).unwrap()).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the TLS handshake")
}

/// Sends a CONNECT for `address` and reads the answer's head.
async fn connect_head<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    address: &str,
    extra: &str,
) -> String {
    let req = format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n{extra}\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut byte))
            .await
            .expect("the server answers the CONNECT")
            .unwrap();
        assert_eq!(n, 1, "the connection ended inside the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_tunnel_carries_bytes_both_ways_and_half_closes() {
    let pki = Pki::new(&["east"], &["app"]);
    let (server, _agent) = hub(&pki, None).await;
    let echo = start_echo().await;
    let mut tls = tls_to(&pki, "client-app", server.client_addr, b"http/1.1").await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    let head = connect_head(&mut tls, &address, "").await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{head}"
    );
    let (mut read, mut write) = tokio::io::split(tls);
    let len = 2 << 20;
    let writer = tokio::spawn(async move {
        let hash = write_random(&mut write, len, 11).await.unwrap();
        // Our FIN (close_notify): the echo finishes and sends its own.
        write.shutdown().await.unwrap();
        hash
    });
    let (n, back) = tokio::time::timeout(Duration::from_secs(30), read_hash(&mut read))
        .await
        .expect("the echo and its end")
        .unwrap();
    assert_eq!(n, len);
    assert_eq!(back, writer.await.unwrap(), "the echo is what was sent");
    wait_all_closed(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_status_and_code_a_proxy_client_acts_on() {
    let pki = Pki::new(&["east"], &["app", "other"]);
    let echo = start_echo().await;
    let policy = format!(
        "rules:\n  - name: app-to-hello\n    subjects:\n      - identity: client/app\n    clusters:\n      - name: \"*\"\n    destinations:\n      - host: hello.default.svc\n        ports: [{}]\n",
        echo.port()
    );
    let (server, _agent) = hub(&pki, Some(&policy)).await;
    let allowed = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    for (cert, address, status, code) in [
        ("client-app", allowed.as_str(), 200, ""),
        (
            "client-app",
            "hello.default.svc.west.tunnel.internal:80",
            403,
            "forbidden",
        ),
        ("client-other", allowed.as_str(), 403, "forbidden"),
        ("client-app", "10.0.0.1:443", 400, "bad_request"),
        // An agent's certificate may not open connections on the client port.
        ("agent-east", allowed.as_str(), 403, "unauthenticated"),
    ] {
        let mut tls = tls_to(&pki, cert, server.client_addr, b"http/1.1").await;
        let head = connect_head(&mut tls, address, "").await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{cert} {address}: {head}"
        );
        if !code.is_empty() {
            let lower = head.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("x-tunnel-error: {code}\r\n")),
                "{cert} {address}: {head}"
            );
        }
    }
    let unknown = format!("hello.default.svc.nowhere.tunnel.internal:{}", echo.port());
    let mut tls = tls_to(&pki, "client-app", server.client_addr, b"http/1.1").await;
    let head = connect_head(&mut tls, &unknown, "").await;
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    // Requests a proxy does not serve: an origin-form request, a method not forwarded.
    for (request, status) in [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            "TRACE http://hello.default.svc.east.tunnel.internal/ HTTP/1.1\r\nHost: x\r\n\r\n",
            405,
        ),
    ] {
        let mut tls = tls_to(&pki, "client-app", server.client_addr, b"http/1.1").await;
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = tls.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {answer}"
        );
    }
    let metrics = fetch_metrics(server.admin_addr).await;
    for (code, n) in [
        ("forbidden", 2.0),
        ("bad_request", 1.0),
        ("unauthenticated", 1.0),
        ("unknown_cluster", 1.0),
    ] {
        let series = format!(r#"tunnel_server_dials_total{{code="{code}"}}"#);
        assert_eq!(metric(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_behind_the_connect_head_reach_the_destination() {
    let pki = Pki::new(&["east"], &["app"]);
    let (server, _agent) = hub(&pki, None).await;
    let echo = start_echo().await;
    let mut tls = tls_to(&pki, "client-app", server.client_addr, b"http/1.1").await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    // The head and the first bytes in one write, before the answer (as a
    // client that does not wait for the 200 sends them).
    let request =
        format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\nsent with the head\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let expected = b"\r\n\r\nsent with the head\n";
    while !got.ends_with(expected) {
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
            .await
            .expect("the answer and the echo")
            .unwrap();
        assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{got}"
    );
    drop(tls);
    wait_all_closed(&server).await;
}

/// A CONNECT client over HTTP/1.1 is one app connection: it may stop
/// reading for longer than the server's `--dead-peer-timeout` and still get
/// every byte (Linux's `TCP_USER_TIMEOUT`, which the server's other client
/// connections carry, would reset it once its window stayed closed that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_client_that_pauses_reading_longer_than_the_dead_peer_timeout_gets_every_byte() {
    const DEAD_PEER: Duration = Duration::from_secs(2);
    const PAUSE: Duration = Duration::from_secs(8);
    const LEN: usize = 48 << 20;
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    config.h2.liveness = tunnel_proto::net::Liveness::from_timeout(DEAD_PEER);
    let server = Server::start(config).await.expect("server starts");
    let _agent = start_agent_resolving(&pki, "east", &server, &["hello.default.svc"]).await;
    // Writes LEN bytes, then its FIN.
    let source = start_service(|mut tcp| async move {
        let _ = write_random(&mut tcp, LEN, 5).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    let mut tls = tls_to(&pki, "client-app", server.client_addr, b"http/1.1").await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", source.port());
    let head = connect_head(&mut tls, &address, "").await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{head}"
    );
    // Every buffer on the way fills while we do not read.
    tokio::time::sleep(PAUSE).await;
    let (n, _) = tokio::time::timeout(Duration::from_secs(60), read_hash(&mut tls))
        .await
        .expect("the rest and the end arrive")
        .expect("the connection was not cut while we paused");
    assert_eq!(n, LEN);
}

/// A CONNECT client run inside a network namespace: TLS with client
/// certificate `app` to the server at `host:port`, `CONNECT target`, then it
/// reads everything; it prints `sent` once the CONNECT is sent, the
/// answer's status line, and `receiving` once a MiB arrived.
const CONNECT_CLIENT_PY: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key, target = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
tcp = socket.create_connection((host, int(port)))
tls = ctx.wrap_socket(tcp, server_hostname="localhost")
tls.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
print("sent", flush=True)
head = b""
while b"\r\n\r\n" not in head:
    byte = tls.recv(1)
    if not byte:
        sys.exit("closed before the answer")
    head += byte
print(head.split(b"\r\n")[0].decode(), flush=True)
total = 0
while True:
    data = tls.recv(1 << 16)
    if not data:
        break
    if total < 1 << 20 <= total + len(data):
        print("receiving", flush=True)
    total += len(data)
"#;

/// A server whose client port listens on the hub side of a network
/// namespace's link (with `dead_peer` as its `--dead-peer-timeout`), an
/// agent of `east`, and CONNECT clients that run inside the namespace.
struct NetnsHub {
    ns: NetNs,
    pki: Pki,
    server: Server,
    _agent: tunnel_agent::Agent,
}

impl NetnsHub {
    async fn start(dead_peer: Duration) -> Self {
        init();
        let ns = NetNs::create();
        let pki = Pki::new(&["east"], &["app"]);
        let mut config = server_config(&pki);
        // Reachable from the namespace, over its link.
        config.client_listen = SocketAddr::from((ns.hub_ip, 0));
        config.h2.liveness = tunnel_proto::net::Liveness::from_timeout(dead_peer);
        let server = Server::start(config).await.expect("server starts");
        let agent = start_agent_resolving(&pki, "east", &server, &["hello.default.svc"]).await;
        Self {
            ns,
            pki,
            server,
            _agent: agent,
        }
    }

    /// [`CONNECT_CLIENT_PY`] in the namespace, as client `app`, asking for
    /// `hello.default.svc` of `east` on `port`.
    fn connect_client(&self, port: u16) -> Proc {
        let path = |name: &str| self.pki.path(name).display().to_string();
        let mut cmd = self.ns.command(tunnel_tests::netns::python3());
        cmd.args(["-c", CONNECT_CLIENT_PY])
            .arg(self.ns.hub_ip.to_string())
            .arg(self.server.client_addr.port().to_string())
            .args([
                path("ca.pem"),
                path("client-app.pem"),
                path("client-app-key.pem"),
            ])
            .arg(format!("hello.default.svc.east.tunnel.internal:{port}"));
        Proc::spawn_command("connect-client", cmd)
    }
}

/// The other side of the previous test: the server's HTTP/1.1 client
/// connections carry no `TCP_USER_TIMEOUT`, yet a CONNECT client whose
/// host vanishes while the destination's bytes flow to it is found within
/// the server's `--dead-peer-timeout`, and the destination's connection is
/// cut (not held for the kernel's many minutes of retransmissions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_client_that_vanishes_with_data_on_its_way_is_cut_within_the_dead_peer_timeout() {
    const DEAD_PEER: Duration = Duration::from_secs(2);
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let hub = NetnsHub::start(DEAD_PEER).await;
    // Writes until its connection fails, and says when.
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel();
    let source = start_service(move |mut tcp| {
        let failed = failed_tx.clone();
        async move {
            let chunk = vec![0x33u8; 64 * 1024];
            loop {
                if let Err(err) = tcp.write_all(&chunk).await {
                    let _ = failed.send((std::time::Instant::now(), err));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
    .await;
    let client = hub.connect_client(source.port());
    client
        .wait_log(&["receiving"], 1, Duration::from_secs(20))
        .await;
    assert!(
        client
            .logs()
            .contains("HTTP/1.1 200 Connection established"),
        "{}",
        client.logs()
    );
    hub.ns.vanish().expect("the client's link goes down");
    let vanished = std::time::Instant::now();
    let (failed_at, err) = tokio::time::timeout(Duration::from_secs(12), failed_rx.recv())
        .await
        .expect("the destination's connection is cut once the client vanished")
        .expect("the source reports");
    let took = failed_at.saturating_duration_since(vanished);
    // The client's silence counts from its last answer, a few milliseconds
    // (the source's pace) before its link went down.
    assert!(
        took >= DEAD_PEER - Duration::from_millis(100),
        "cut after {took:?}, before the dead-peer timeout: something else cut it ({err})"
    );
    println!("vanished CONNECT client found after {took:?}; the destination read: {err}");
}

/// The server writes `200 Connection established` itself, before the
/// tunnel's bytes: a CONNECT client that vanished before acknowledging it,
/// in front of a destination that waits for the client to speak first
/// (TLS, say), is found within the server's `--dead-peer-timeout` too, and
/// the destination's connection is cut (not held for the kernel's quarter
/// hour of retransmissions, nothing else being written to the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_client_that_vanishes_before_acknowledging_the_200_is_cut_within_the_dead_peer_timeout()
 {
    const DEAD_PEER: Duration = Duration::from_secs(2);
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let hub = NetnsHub::start(DEAD_PEER).await;
    // A destination whose accept queue (of one) is full: the agent's dial
    // waits for its SYN to be sent again (a second), so that the 200 is
    // written only once the client vanished.
    let listener = tokio::net::TcpSocket::new_v4().unwrap();
    listener
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap();
    let listener = listener.listen(0).unwrap();
    let destination = listener.local_addr().unwrap();
    let filler = tokio::net::TcpStream::connect(destination).await.unwrap();
    let client = hub.connect_client(destination.port());
    client.wait_log(&["sent"], 1, Duration::from_secs(20)).await;
    // The CONNECT is at the server (its dial waits); then the client goes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.ns.vanish().expect("the client's link goes down");
    let vanished = std::time::Instant::now();
    let (filled, _) = listener.accept().await.unwrap();
    drop((filled, filler));
    let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the agent dials the destination")
        .unwrap();
    // The destination waits for the client to speak first.
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(12), tcp.read(&mut buf))
        .await
        .expect("the destination's connection is cut once the client vanished");
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "the vanished client sent nothing: {read:?}"
    );
    assert!(
        !client.logs().contains("HTTP/1.1 200"),
        "the client got the answer before it vanished: {}",
        client.logs()
    );
    println!(
        "vanished CONNECT client found {:?} after its link went down; the destination read {read:?}",
        vanished.elapsed()
    );
}
