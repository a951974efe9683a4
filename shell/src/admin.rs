//! The admin HTTP endpoint every binary serves: liveness, readiness, Prometheus metrics
//! and, for sidecars, a loopback-only shutdown trigger.
//!
//! Routes: `GET /healthz`, `GET /readyz`, `GET /metrics` and, when enabled with
//! [`AdminServer::with_shutdown_endpoint`], `POST /shutdown`.
//!
//! `POST /shutdown` is accepted only on a connection whose both ends are
//! loopback addresses: a loopback peer alone is not enough, since a mesh's
//! proxy (Istio's Envoy forwards inbound traffic from 127.0.0.6) hands
//! connections from anywhere to the pod's own address with a loopback source.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Answers whether the process is ready to serve traffic (`GET /readyz`).
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// More about readiness for `GET /readyz`'s body, after `ready; ` or
/// `not ready; ` (e.g. `server: connected`); it does not change the status.
pub type ReadyDetail = Arc<dyn Fn() -> String + Send + Sync>;

/// How long a client may take to send request headers before it is cut off.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections served at once; further clients wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 128;

/// How long open connections may take to finish once the server shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after an accept error such as "too many open files", so the loop does not spin.
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// Content type of `GET /metrics` (OpenMetrics text, as prometheus-client encodes it).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The admin HTTP/1.1 server.
pub struct AdminServer {
    state: State,
    header_read_timeout: Duration,
}

/// What request handling needs.
struct State {
    registry: Arc<Registry>,
    ready: ReadyCheck,
    ready_detail: Option<ReadyDetail>,
    shutdown: Option<CancellationToken>,
}

impl AdminServer {
    /// A server exposing `registry` on `/metrics` and `ready` on `/readyz`.
    ///
    /// Encoding only needs `&Registry`, so register every metric before wrapping the
    /// registry in an `Arc`; metric handles stay shared and keep updating.
    pub fn new(registry: Arc<Registry>, ready: ReadyCheck) -> Self {
        Self {
            state: State {
                registry,
                ready,
                ready_detail: None,
                shutdown: None,
            },
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }

    /// Adds `detail` to `GET /readyz`'s body: `ready; <detail>` (or `not ready; ...`), so
    /// that a probe or a person sees more than the status (the status stays the check's).
    pub fn with_ready_detail(mut self, detail: ReadyDetail) -> Self {
        self.state.ready_detail = Some(detail);
        self
    }

    /// Enables `POST /shutdown` (only on connections from and to loopback addresses,
    /// else 403), which cancels `requested` (for a sidecar in pods without native
    /// sidecars). A task that starts waiting after the request still sees it.
    pub fn with_shutdown_endpoint(mut self, requested: CancellationToken) -> Self {
        self.state.shutdown = Some(requested);
        self
    }

    /// Overrides [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Serves until `shutdown` is cancelled; one bad client never stops the server.
    ///
    /// On shutdown it stops accepting, lets open connections finish their current
    /// request (for at most a few seconds) and returns `Ok(())`. Accept errors are logged
    /// and retried, never returned.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let local = listener.local_addr()?;
        let state = Arc::new(self.state);
        tracing::debug!(%local, "admin server listening");
        // Tells the open connections to finish once the loop ends.
        let stop_connections = shutdown.child_token();
        let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown.cancelled());
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // never closed
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            while connections.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer)) => {
                    // The address this connection came to: the listener's, or
                    // for a wildcard listener the one the client dialed.
                    let to = stream.local_addr().unwrap_or(local);
                    connections.spawn(serve_connection(
                        stream,
                        Ends { peer, local: to },
                        state.clone(),
                        self.header_read_timeout,
                        stop_connections.clone(),
                        permit,
                    ));
                }
                Err(error) if is_disconnect(&error) => {
                    tracing::debug!(%error, "admin accept: peer went away");
                }
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_DELAY) => {}
                    }
                }
            }
        }
        drop(listener);
        stop_connections.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::debug!(
                remaining = connections.len(),
                "admin connections did not finish in time; aborting them"
            );
            connections.shutdown().await;
        }
        tracing::debug!(%local, "admin server stopped");
        Ok(())
    }
}

/// Both ends of one admin connection.
#[derive(Debug, Clone, Copy)]
struct Ends {
    /// The client.
    peer: SocketAddr,
    /// The address it connected to.
    local: SocketAddr,
}

impl Ends {
    /// Whether the connection is inside this host's network namespace: made
    /// to a loopback address from a loopback address.
    fn is_loopback(&self) -> bool {
        self.peer.ip().to_canonical().is_loopback() && self.local.ip().to_canonical().is_loopback()
    }
}

async fn serve_connection(
    stream: TcpStream,
    ends: Ends,
    state: Arc<State>,
    header_read_timeout: Duration,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let peer = ends.peer;
    let service = service_fn(move |req: Request<Incoming>| {
        let response = respond(&state, ends, req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let result =
        crate::process::serve_until_stopped(conn, &stop, |conn| conn.graceful_shutdown()).await;
    match result {
        Ok(()) => {}
        Err(error) if is_plain_disconnect(&error) => {
            tracing::debug!(%peer, %error, "admin client disconnected");
        }
        Err(error) => tracing::warn!(%peer, %error, "admin connection error"),
    }
}

/// The response to one request; pure so routing is testable without sockets.
fn respond(state: &State, ends: Ends, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let read_only = *method == Method::GET || *method == Method::HEAD;
    let peer = ends.peer;
    match path {
        "/healthz" | "/readyz" | "/metrics" if !read_only => method_not_allowed("GET, HEAD"),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (status, word) = if (state.ready)() {
                (StatusCode::OK, "ready")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
            match &state.ready_detail {
                None => response(status, TEXT_CONTENT_TYPE, format!("{word}\n").into()),
                Some(detail) => response(
                    status,
                    TEXT_CONTENT_TYPE,
                    format!("{word}; {}\n", detail()).into(),
                ),
            }
        }
        "/metrics" => metrics(&state.registry),
        "/shutdown" => match &state.shutdown {
            None => text(StatusCode::NOT_FOUND, "not found\n"),
            Some(_) if *method != Method::POST => method_not_allowed("POST"),
            Some(_) if !ends.is_loopback() => {
                tracing::warn!(%peer, local = %ends.local, "refused /shutdown on a connection that is not loopback at both ends");
                text(
                    StatusCode::FORBIDDEN,
                    "forbidden: /shutdown accepts connections to a loopback address from one only\n",
                )
            }
            Some(requested) => {
                tracing::info!(%peer, "shutdown requested via admin endpoint");
                requested.cancel();
                text(StatusCode::OK, "shutting down\n")
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => response(StatusCode::OK, METRICS_CONTENT_TYPE, body.into()),
        Err(error) => {
            tracing::warn!(%error, "cannot encode metrics");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(
        status,
        TEXT_CONTENT_TYPE,
        Bytes::from_static(body.as_bytes()),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Errors that only mean the peer went away or stalled, not that it misbehaved.
fn is_plain_disconnect(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return is_disconnect(io);
        }
        source = err.source();
    }
    false
}

fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    struct Running {
        addr: SocketAddr,
        stop: CancellationToken,
        task: JoinHandle<io::Result<()>>,
    }

    impl Running {
        async fn stop(self) {
            self.stop.cancel();
            tokio::time::timeout(TEST_TIMEOUT, self.task)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("serve result");
        }
    }

    async fn start(server: AdminServer) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.serve(listener, stop.clone()));
        Running { addr, stop, task }
    }

    fn server(ready: bool) -> AdminServer {
        AdminServer::new(Arc::new(Registry::default()), Arc::new(move || ready))
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// Sends raw bytes and reads until the server closes the connection.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(raw).await.expect("write");
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await.expect("read");
            let text = String::from_utf8(buf).expect("utf-8 reply");
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status line in {text:?}"));
            Reply {
                status,
                head: head.to_owned(),
                body: body.to_owned(),
            }
        })
        .await
        .expect("reply in time")
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        exchange(addr, raw.as_bytes()).await
    }

    #[tokio::test]
    async fn healthz_is_ok() {
        let running = start(server(false)).await;
        let reply = request(running.addr, "GET", "/healthz").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "ok\n");
        assert_eq!(reply.header("content-type"), Some(TEXT_CONTENT_TYPE));
        running.stop().await;
    }

    #[tokio::test]
    async fn readyz_follows_the_check() {
        let ready = Arc::new(AtomicBool::new(false));
        let check = ready.clone();
        let admin = AdminServer::new(
            Arc::new(Registry::default()),
            Arc::new(move || check.load(Ordering::SeqCst)),
        );
        let running = start(admin).await;
        let reply = request(running.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "not ready\n"));
        ready.store(true, Ordering::SeqCst);
        let reply = request(running.addr, "GET", "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ready\n"));
        ready.store(false, Ordering::SeqCst);
        let reply = request(running.addr, "GET", "/readyz").await;
        assert_eq!(reply.status, 503);
        running.stop().await;
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("tunnel_test_requests", "Requests seen", counter.clone());
        let admin = AdminServer::new(Arc::new(registry), Arc::new(|| true));
        let running = start(admin).await;
        counter.inc();
        let reply = request(running.addr, "GET", "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(METRICS_CONTENT_TYPE));
        assert!(
            reply
                .body
                .contains("# HELP tunnel_test_requests Requests seen."),
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains("tunnel_test_requests_total 1\n"),
            "{}",
            reply.body
        );
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);
        counter.inc();
        let reply = request(running.addr, "GET", "/metrics").await;
        assert!(
            reply.body.contains("tunnel_test_requests_total 2\n"),
            "{}",
            reply.body
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn unknown_path_is_404_and_wrong_method_is_405() {
        let running = start(server(true)).await;
        let reply = request(running.addr, "GET", "/nope").await;
        assert_eq!(reply.status, 404);
        // Without the shutdown endpoint, /shutdown does not exist.
        assert_eq!(request(running.addr, "POST", "/shutdown").await.status, 404);
        for path in ["/healthz", "/readyz", "/metrics"] {
            let reply = request(running.addr, "POST", path).await;
            assert_eq!(reply.status, 405, "{path}");
            assert_eq!(reply.header("allow"), Some("GET, HEAD"), "{path}");
        }
        let reply = request(running.addr, "HEAD", "/healthz").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "");
        running.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_400_and_server_keeps_serving() {
        let running = start(server(true)).await;
        let reply = exchange(running.addr, b"\x16\x03\x01 this is not http\r\n\r\n").await;
        assert_eq!(reply.status, 400);
        let reply = request(running.addr, "GET", "/healthz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
        running.stop().await;
    }

    #[tokio::test]
    async fn silent_client_is_cut_off() {
        let admin = server(true).with_header_read_timeout(Duration::from_millis(200));
        let running = start(admin).await;
        // Well below the default timeout, so this fails if the override is ignored.
        const CUT_OFF: Duration = Duration::from_secs(3);
        let mut silent = TcpStream::connect(running.addr).await.expect("connect");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(CUT_OFF, silent.read(&mut buf))
            .await
            .expect("server closes the silent connection in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // A half-sent request is cut off too.
        let mut slow = TcpStream::connect(running.addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        let read = tokio::time::timeout(CUT_OFF, slow.read(&mut buf))
            .await
            .expect("server closes the slow connection in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(request(running.addr, "GET", "/healthz").await.status, 200);
        running.stop().await;
    }

    #[tokio::test]
    async fn post_shutdown_requests_the_shutdown() {
        let requested = CancellationToken::new();
        let running = start(server(true).with_shutdown_endpoint(requested.clone())).await;
        let reply = request(running.addr, "GET", "/shutdown").await;
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("POST"));
        let reply = request(running.addr, "POST", "/shutdown").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "shutting down\n")
        );
        assert!(requested.is_cancelled(), "shutdown requested");
        running.stop().await;
    }

    fn ends(peer: &str, local: &str) -> Ends {
        Ends {
            peer: peer.parse().expect("peer"),
            local: local.parse().expect("local"),
        }
    }

    #[test]
    fn shutdown_takes_only_connections_loopback_at_both_ends() {
        let admin = server(true).with_shutdown_endpoint(CancellationToken::new());
        let state = &admin.state;
        let status = |peer: &str, local: &str| {
            respond(state, ends(peer, local), &Method::POST, "/shutdown").status()
        };
        // From elsewhere, to the pod's address.
        assert_eq!(status("10.0.0.7:5555", "10.0.0.9:17090"), 403);
        assert_eq!(
            status("[::ffff:10.0.0.7]:5555", "[::ffff:10.0.0.9]:17090"),
            403
        );
        // Istio's Envoy hands inbound connections to the pod's address from
        // 127.0.0.6: a loopback peer, but from outside the pod.
        assert_eq!(status("127.0.0.6:40000", "10.0.0.9:17090"), 403);
        assert_eq!(status("[::1]:40000", "[fd00::9]:17090"), 403);
        for (peer, local) in [
            ("127.0.0.1:1", "127.0.0.1:17090"),
            ("[::1]:1", "[::1]:17090"),
            ("[::ffff:127.0.0.1]:1", "[::ffff:127.0.0.1]:17090"),
        ] {
            assert_eq!(status(peer, local), 200, "{peer} -> {local}");
        }
    }

    #[tokio::test]
    async fn shutdown_through_a_wildcard_listener_needs_the_loopback_address() {
        let requested = CancellationToken::new();
        let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            server(true)
                .with_shutdown_endpoint(requested.clone())
                .serve(listener, stop.clone()),
        );
        // This host's own non-loopback address, if it has one: a connection
        // to it is not loopback at the local end, whatever its source.
        let outward = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|u| u.connect("192.0.2.1:9").map(|()| u))
            .and_then(|u| u.local_addr())
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
        if let Some(ip) = outward {
            let reply = request(SocketAddr::new(ip, port), "POST", "/shutdown").await;
            assert_eq!(reply.status, 403, "{}", reply.body);
            assert!(!requested.is_cancelled(), "refused, yet shutdown requested");
        }
        let reply = request(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "POST",
            "/shutdown",
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(requested.is_cancelled(), "shutdown requested");
        stop.cancel();
        tokio::time::timeout(TEST_TIMEOUT, task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("serve result");
    }

    #[tokio::test]
    async fn readyz_carries_the_detail_and_keeps_the_status() {
        let connected = Arc::new(AtomicBool::new(false));
        let c = connected.clone();
        let admin = server(true).with_ready_detail(Arc::new(move || {
            if c.load(Ordering::SeqCst) {
                "server: connected".into()
            } else {
                "server: not connected".into()
            }
        }));
        let running = start(admin).await;
        let reply = request(running.addr, "GET", "/readyz").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ready; server: not connected\n")
        );
        connected.store(true, Ordering::SeqCst);
        let reply = request(running.addr, "GET", "/readyz").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ready; server: connected\n")
        );
        running.stop().await;
    }

    #[tokio::test]
    async fn stops_with_idle_keepalive_connection_open() {
        let running = start(server(true)).await;
        let mut idle = TcpStream::connect(running.addr).await.expect("connect");
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // The connection stays open (keep-alive); stopping must not wait for it.
        let started = std::time::Instant::now();
        running.stop().await;
        assert!(
            started.elapsed() < SHUTDOWN_GRACE,
            "{:?}",
            started.elapsed()
        );
    }
}
