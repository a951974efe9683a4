//! The `tunnel-injector` binary through its own rollout: on SIGTERM it stops
//! being ready (so the Service's endpoints drop it) but keeps answering
//! reviews for `--shutdown-delay`, then exits 0. Run with the files
//! cert-manager would mount (`--cert-manager`), which needs no API server.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SERVICE_HOST: &str = "tunnel-injector.cluster-tunnel.svc";
const DEADLINE: Duration = Duration::from_secs(20);

/// Kills the injector if the test ends before it exited.
struct Injector(Child);

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn readyz(admin: SocketAddr) -> Option<u16> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    tcp.read_to_string(&mut buf).await.ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

async fn wait_readyz(admin: SocketAddr, want: u16) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while readyz(admin).await != Some(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz on {admin} did not answer {want} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One review of a pod that does not opt in, over HTTPS as the API server
/// sends it; returns the HTTP status.
async fn review(addr: SocketAddr, ca_pem: &str) -> u16 {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("the webhook accepts");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVICE_HOST).unwrap(), tcp)
        .await
        .expect("TLS with the webhook");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "e7f1c2d3-0000-4000-8000-000000000001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "fleet", "operation": "CREATE",
            "userInfo": { "username": "tester" },
            "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "plain" },
                        "spec": { "containers": [{ "name": "app" }] } },
        },
    });
    let request = http::Request::post(format!("https://{SERVICE_HOST}/mutate"))
        .header(HOST, SERVICE_HOST)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.expect("an answer");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"allowed\":true"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_stops_and_reviews_are_answered_meanwhile() {
    tunnel_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let names = tunnel_injector::certs::service_dns_names("tunnel-injector", "cluster-tunnel");
    let cert = tunnel_injector::certs::generate(&names).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &cert.key_pem).unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_tunnel-injector"))
        .args([
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--tls-cert",
            &dir.path().join("tls.crt").display().to_string(),
            "--tls-key",
            &dir.path().join("tls.key").display().to_string(),
            "--cert-manager",
            "--shutdown-delay",
            "5s",
            "--sidecar-image",
            "sidecar:1",
            "--server",
            "hub:8090",
            "--log-format",
            "text",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the injector binary starts");
    let mut injector = Injector(child);
    wait_readyz(admin, 200).await;
    assert_eq!(review(listen, &cert.ca_pem).await, 200);

    let status = Command::new("kill")
        .args(["-TERM", &injector.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Not ready any more, yet still answering: a review sent by an API
    // server that has not seen the endpoint go is not lost.
    wait_readyz(admin, 503).await;
    assert_eq!(review(listen, &cert.ca_pem).await, 200);
    assert!(
        injector.0.try_wait().unwrap().is_none(),
        "the injector waits out --shutdown-delay"
    );

    let deadline = std::time::Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(exit) = injector.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the injector did not exit within {DEADLINE:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    assert!(
        TcpStream::connect(listen).await.is_err(),
        "the webhook port is closed"
    );
}
