//! Asking an admin port: a plain HTTP/1.1 `GET`, `/metrics` and one series
//! of it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fetches `path` from an admin port with a plain HTTP/1.1 request; returns
/// the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one series in Prometheus text, e.g.
/// `tunnel_server_dials_total{code="no_agent"}`; `None` when absent.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `GET /metrics` of an admin port; panics unless it answers 200.
pub async fn fetch_metrics(admin: SocketAddr) -> String {
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), http_get(admin, "/metrics"))
        .await
        .unwrap_or_else(|_| panic!("GET /metrics on {admin} timed out"))
        .unwrap_or_else(|e| panic!("GET /metrics on {admin}: {e}"));
    assert_eq!(status, 200, "GET /metrics on {admin}: {body}");
    body
}
