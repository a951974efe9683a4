//! HTTP for the sidecar suites, on both ends: destinations answering
//! `hello from <name>` with what they were sent (over HTTP or HTTPS), and a
//! `CONNECT` through a sidecar's proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves HTTP/1.1 on `io` until the client leaves: every request is
/// answered 200 with a text body whose first line is `hello from <name>`,
/// followed by what arrived, one `key: value` per line (`scheme`, `method`,
/// `target`, `host`, `proxy-authorization`: `absent` or `present`,
/// `body-bytes` and `body-sha256` of the request body), so a test can check
/// both which cluster answered and what the proxy forwarded.
pub async fn serve_http_hello<IO>(io: IO, name: Arc<str>, scheme: &'static str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use sha2::Digest;
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let name = name.clone();
        async move {
            let (parts, body) = req.into_parts();
            let header = |h: hyper::header::HeaderName| {
                parts
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let auth = if parts
                .headers
                .contains_key(hyper::header::PROXY_AUTHORIZATION)
            {
                "present"
            } else {
                "absent"
            };
            let received = body.collect().await?.to_bytes();
            let text = format!(
                "hello from {name}\nscheme: {scheme}\nmethod: {}\ntarget: {}\nhost: {}\n\
                 proxy-authorization: {auth}\nbody-bytes: {}\nbody-sha256: {}\n",
                parts.method,
                parts.uri,
                header(hyper::header::HOST),
                received.len(),
                hex(&sha2::Sha256::digest(&received)),
            );
            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok::<_, hyper::Error>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves [`serve_http_hello`] on every connection `listener` accepts.
pub fn spawn_http_hello(listener: TcpListener, name: &str) {
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_http_hello(tcp, name.clone(), "http"));
        }
    });
}

/// An HTTP/1.1 service on a loopback port answering `hello from <name>`
/// (see [`serve_http_hello`]).
pub async fn start_http_hello(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn_http_hello(listener, name);
    addr
}

/// Serves [`serve_http_hello`] over TLS (`acceptor`) on every connection
/// `listener` accepts.
pub fn spawn_https_hello(listener: TcpListener, name: &str, acceptor: tokio_rustls::TlsAcceptor) {
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                if let Ok(Ok(tls)) = accepted {
                    serve_http_hello(tls, name, "https").await;
                }
            });
        }
    });
}

/// `Proxy-Authorization` value naming `cluster` as the proxy user (what
/// `http://<cluster>@proxy` makes a client send).
pub fn proxy_user(cluster: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{cluster}:"))
    )
}

/// Sends `CONNECT host:port` for `cluster` on `tcp` (already connected to a
/// sidecar's proxy) and reads the response head byte by byte, so that no
/// tunnelled byte is consumed. Returns the head; `Ok` only for a 200.
pub async fn connect_on(
    tcp: &mut TcpStream,
    cluster: &str,
    host: &str,
    port: u16,
) -> Result<String, String> {
    let req = format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        proxy_user(cluster)
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b).await {
            Ok(0) => {
                return Err(format!(
                    "the proxy closed the connection after {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(_) => head.push(b[0]),
            Err(e) => {
                return Err(format!(
                    "reading the CONNECT answer after {:?}: {e}",
                    String::from_utf8_lossy(&head)
                ));
            }
        }
        if head.len() > 16 * 1024 {
            return Err("CONNECT answer head larger than 16 KiB".into());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(head)
    } else {
        Err(format!("CONNECT refused: {head:?}"))
    }
}
