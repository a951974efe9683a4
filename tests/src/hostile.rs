//! Hostile peers: a TLS client without a certificate, and bytes a port must
//! refuse (closed, reset, a TLS alert or an HTTP 400, never an answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Pki;

/// A TLS 1.3 client configuration that trusts `pki`'s CA but presents no
/// certificate.
pub fn tls_without_client_cert(pki: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca.pem") {
        roots.add(cert.expect("CA certificate")).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tunnel_proto::tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Whether a connection to `addr` that sent `first` bytes is refused: the
/// peer closes or resets it, answering at most a TLS alert or an HTTP 400.
/// Returns how it was refused.
pub async fn refused_after(addr: SocketAddr, first: &[u8]) -> Result<String, String> {
    let run = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The peer may reset before all is written; that is a refusal too.
        let _ = tcp.write_all(first).await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| format!("{addr} kept the connection open for 15 s"))??;
    // A TLS alert record: content type 21, version 3.x.
    let tls_alert = answer.len() >= 7 && answer[0] == 21 && answer[1] == 3;
    let text = String::from_utf8_lossy(&answer);
    if answer.is_empty() {
        Ok("closed".into())
    } else if tls_alert {
        Ok(format!("TLS alert {}, closed", answer[6]))
    } else if text.starts_with("HTTP/1.1 400") {
        Ok("HTTP 400, closed".into())
    } else {
        Err(format!("{addr} answered {text:?}"))
    }
}

/// Runs a TLS handshake without a client certificate against `addr` and
/// tries to use the connection; returns how it failed, or an error if the
/// peer accepted and answered.
pub async fn tls_without_cert_is_refused(pki: &Pki, addr: SocketAddr) -> Result<String, String> {
    let run = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(tls_without_client_cert(pki));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = match connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return Ok(format!("handshake failed: {e}")),
        };
        // TLS 1.3: the client finishes before the server checked its
        // certificate; the refusal arrives as an alert on the next read.
        let _ = tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await;
        let _ = tls.flush().await;
        let mut buf = [0u8; 1024];
        match tls.read(&mut buf).await {
            Ok(0) => Ok("closed".to_string()),
            Err(e) => Ok(format!("refused: {e}")),
            Ok(n) => Err(format!(
                "{addr} accepted a TLS client without a certificate and answered {n} bytes"
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| format!("{addr} kept a TLS client without a certificate for 15 s"))?
}
