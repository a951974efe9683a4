//! HTTP/2 connections for tunnels, in either role, with one set of settings.
//!
//! Both legs use the same code: the server is an HTTP/2 *client* on the
//! connection an agent dialed (roles reversed), and an HTTP/2 *server* on the
//! connections sidecars dial. So HTTP/2 is driven here directly through hyper
//! rather than through tonic's transport, which only knows the usual roles.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::net::Liveness;

/// Per-stream receive window: large enough for one stream to reach line rate
/// over a fast hop; only a stalled stream ever fills it.
pub const DEFAULT_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Connection receive window: many stream windows, so that a few stalled
/// streams cannot starve the others of connection-level credit.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;
/// Largest HTTP/2 DATA frame we accept: a whole data message fits one frame.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Bytes hyper may queue per stream before it stops pulling from the body.
pub const DEFAULT_MAX_SEND_BUF: usize = 1024 * 1024;
/// Streams (proxied connections) one peer may have open on one connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100_000;

/// HTTP/2 settings of tunnel connections.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    /// Initial receive window of each stream.
    pub stream_window: u32,
    /// Receive window of the whole connection.
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE we advertise.
    pub max_frame_size: u32,
    /// Per-stream send buffer.
    pub max_send_buf: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise (server role).
    pub max_concurrent_streams: u32,
    /// Keepalive pings and dead-peer timeout.
    pub liveness: Liveness,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_send_buf: DEFAULT_MAX_SEND_BUF,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            liveness: Liveness::default(),
        }
    }
}

/// A request sender on an HTTP/2 connection in the client role, usable as a
/// tonic client transport (`AgentClient::with_origin(channel, ..)`).
#[derive(Clone)]
pub struct H2Channel {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("closed", &self.send.is_closed())
            .finish()
    }
}

impl H2Channel {
    /// Whether the connection under this channel has ended.
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// Runs the HTTP/2 handshake in the client role over `io`. Returns the channel
/// and the connection's driver, which must be polled (spawned) and ends when the
/// connection does.
pub async fn client_handshake<IO>(
    io: IO,
    settings: &H2Settings,
) -> Result<
    (
        H2Channel,
        impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
    ),
    hyper::Error,
>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_send_buf_size(settings.max_send_buf)
        .keep_alive_interval(settings.liveness.keepalive_interval)
        .keep_alive_timeout(settings.liveness.ping_timeout())
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await?;
    Ok((H2Channel { send }, conn))
}

/// Information about the peer of a connection, put into every request's
/// extensions so that handlers know who is calling.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The identity from the peer's certificate.
    pub identity: crate::identity::Identity,
    /// The peer's socket address.
    pub remote_addr: std::net::SocketAddr,
}

/// Wraps a service so every request carries the connection's [`PeerInfo`].
#[derive(Clone)]
pub struct WithPeer<S> {
    inner: S,
    peer: Arc<PeerInfo>,
}

impl<S> WithPeer<S> {
    /// Attaches `peer` to every request passed to `inner`.
    pub fn new(inner: S, peer: PeerInfo) -> Self {
        Self {
            inner,
            peer: Arc::new(peer),
        }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for WithPeer<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.peer.clone());
        self.inner.call(req)
    }
}

/// Serves a tonic service on `io` in the HTTP/2 server role until the
/// connection ends. When `shutdown` completes, the connection is drained:
/// GOAWAY tells the peer to open no new streams, open ones run to their end.
pub async fn serve_connection<IO, S, F>(
    io: IO,
    service: S,
    settings: &H2Settings,
    shutdown: F,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: tower_service::Service<
            http::Request<Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    F: Future<Output = ()>,
{
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_send_buf_size(settings.max_send_buf)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.liveness.keepalive_interval)
        .keep_alive_timeout(settings.liveness.ping_timeout())
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::pin!(shutdown);
    tokio::select! {
        res = conn.as_mut() => return res,
        () = &mut shutdown => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
