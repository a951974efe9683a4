//! HTTP/2 tunnel connections in either role, driven through the `h2` crate.
//!
//! Both legs use the same code: the server is an HTTP/2 *client* on the
//! connection an agent dialed (roles reversed), and an HTTP/2 *server* on the
//! connections sidecars dial.
//!
//! # Flow control
//!
//! Every proxied connection is one stream, and a stream's receive window is
//! the most it can hold on a hop while nobody reads it. The rules:
//!
//! - **The connection window never runs out** ([`CONNECTION_WINDOW`], the
//!   HTTP/2 maximum). Stalled streams hold connection credit for the data they
//!   buffer; with a small connection window a handful of stalled streams would
//!   freeze every other stream of the connection. Memory is bounded by the
//!   stream windows instead.
//! - **Stream windows adapt per connection.** They start at
//!   [`H2Settings::stream_window`]; a bandwidth-delay-product estimate (the bytes
//!   that arrive during a PING round trip, scaled to the smallest round trip
//!   seen so that queueing does not inflate it)
//!   raises them on a long fat link, up to [`H2Settings::max_stream_window`];
//!   they shrink as streams pile up (each gets at most half the budget
//!   divided by the open streams, never less than
//!   [`H2Settings::min_stream_window`]). Changes travel as
//!   `SETTINGS_INITIAL_WINDOW_SIZE`.
//! - **A hard budget per connection.** A stream may come to hold the largest
//!   window in force while it is open (a window that shrinks takes back only
//!   future credit). The connection keeps the sum of that over its open
//!   streams, and admits a new stream, or raises the window, only while the
//!   sum stays within [`H2Settings::window_budget`]; a stream beyond it is
//!   refused with `resource_exhausted`. So the streams of one connection can
//!   never hold more than the budget, and the connection window (above it)
//!   never runs out.
//! - **Senders never buffer beyond the window**: the relay reads from a socket
//!   only as much as the stream may send ([`crate::relay`]).
//!
//! Keepalive PINGs with a timeout run on every connection, sharing the one
//! outstanding PING with the window estimate.
//!
//! # Where the parts are
//!
//! This module sets connections up (the settings, the handshakes in either
//! role, the handles); `flow` keeps one connection's budget and stream
//! window ([`ConnShared`], [`StreamGuard`]) over `ledger`, the streams'
//! peaks; `pinger` runs the keepalive PINGs and the window estimate.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::net::Liveness;

mod flow;
mod ledger;
mod pinger;

pub use flow::{BudgetExhausted, ConnShared, StreamGuard};
use pinger::pinger;

/// Receive window of a new stream.
pub const DEFAULT_STREAM_WINDOW: u32 = 256 * 1024;
/// Smallest stream window, however many streams are open.
pub const DEFAULT_MIN_STREAM_WINDOW: u32 = 64 * 1024;
/// Largest stream window the bandwidth-delay estimate may reach: one stream
/// fills about 1 Gbit/s over 100 ms of round trip.
pub const DEFAULT_MAX_STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// What the open streams of one connection may hold together, at most: new
/// streams are refused (`resource_exhausted`) rather than let it be passed.
pub const DEFAULT_WINDOW_BUDGET: u64 = 1024 * 1024 * 1024;
/// Largest budget: room below the connection window for control traffic.
pub const MAX_WINDOW_BUDGET: u64 = 1536 * 1024 * 1024;
/// Connection receive window: the HTTP/2 maximum, so that connection-level
/// flow control never holds back a stream; stream windows bound memory.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest HTTP/2 DATA frame we accept.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Streams (proxied connections) one peer may have open on one connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 10_000;
/// Largest header block we accept (an open is a few hundred bytes).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// HTTP/2 settings of tunnel connections.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    /// Receive window of each new stream, before any adaptation.
    pub stream_window: u32,
    /// Floor of the adaptive stream window.
    pub min_stream_window: u32,
    /// Ceiling of the adaptive stream window.
    pub max_stream_window: u32,
    /// Bytes the open streams of one connection may hold together, at most
    /// (see the module documentation).
    pub window_budget: u64,
    /// SETTINGS_MAX_FRAME_SIZE we advertise.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS we advertise (streams the peer may open).
    pub max_concurrent_streams: u32,
    /// Keepalive pings and dead-peer timeout.
    pub liveness: Liveness,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: DEFAULT_STREAM_WINDOW,
            min_stream_window: DEFAULT_MIN_STREAM_WINDOW,
            max_stream_window: DEFAULT_MAX_STREAM_WINDOW,
            window_budget: DEFAULT_WINDOW_BUDGET,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            liveness: Liveness::default(),
        }
    }
}

/// The range the adaptive stream window stays in.
#[derive(Debug, Clone, Copy)]
struct WindowBounds {
    min: u32,
    max: u32,
}

impl H2Settings {
    fn stream_window_bounds(&self) -> WindowBounds {
        let min = self.min_stream_window.clamp(1024, CONNECTION_WINDOW);
        let max = self.max_stream_window.clamp(min, CONNECTION_WINDOW);
        WindowBounds { min, max }
    }

    fn budget(&self) -> u64 {
        self.window_budget.clamp(1 << 20, MAX_WINDOW_BUDGET)
    }

    fn initial_stream_window(&self) -> u32 {
        let WindowBounds { min, max } = self.stream_window_bounds();
        self.stream_window.clamp(min, max)
    }
}

/// Why a tunnel connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// HTTP/2 or the socket under it failed.
    #[error("{0}")]
    H2(#[from] ::h2::Error),
    /// The peer did not answer a keepalive PING in time.
    #[error("the peer did not answer a keepalive ping within {0:?}")]
    PingTimeout(Duration),
}

/// The request side of an HTTP/2 connection in the client role.
#[derive(Clone)]
pub struct H2Client {
    send: ::h2::client::SendRequest<Bytes>,
    shared: Arc<ConnShared>,
    closed: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for H2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Client")
            .field("closed", &self.is_closed())
            .field("streams", &self.shared.active_streams())
            .finish()
    }
}

impl H2Client {
    /// Whether the connection under this handle has ended, or failed to
    /// open a stream (a GOAWAY, a broken connection): no new streams go on it.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.broken.load(Ordering::Acquire)
    }

    /// Marks the connection unusable for new streams (an open failed on it).
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// A slot for one new stream: within the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS (beyond it h2 would queue the stream
    /// silently) and within our receive budget.
    pub fn stream_slot(&self) -> Result<StreamGuard, BudgetExhausted> {
        let max = u64::try_from(self.send.current_max_send_streams()).unwrap_or(u64::MAX);
        self.shared.try_stream_opened(max)
    }

    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    /// A request sender for one new stream.
    pub fn sender(&self) -> ::h2::client::SendRequest<Bytes> {
        self.send.clone()
    }
}

/// Runs the HTTP/2 handshake in the client role over `io`. Returns the
/// handle and the connection's driver, which must be spawned and ends when
/// the connection does.
pub async fn client_handshake<IO>(
    io: IO,
    settings: &H2Settings,
) -> Result<
    (
        H2Client,
        impl Future<Output = Result<(), ConnError>> + Send + 'static,
    ),
    ::h2::Error,
>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, mut conn) = ::h2::client::Builder::new()
        .initial_window_size(settings.initial_stream_window())
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(settings.max_frame_size)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_send_buffer_size(settings.stream_window_bounds().max as usize)
        .handshake::<_, Bytes>(io)
        .await?;
    let shared = ConnShared::new(*settings);
    let closed = Arc::new(AtomicBool::new(false));
    let pings = conn.ping_pong();
    let client = H2Client {
        send,
        shared: shared.clone(),
        closed: closed.clone(),
        broken: Arc::new(AtomicBool::new(false)),
    };
    let driver = async move {
        let pinger = pings.map(|p| tokio::spawn(pinger(p, shared.clone())));
        let res = std::future::poll_fn(|cx| {
            shared.driver.register(cx.waker());
            shared.check_dead()?;
            shared.adjust(|w| conn.set_initial_window_size(w));
            std::pin::Pin::new(&mut conn)
                .poll(cx)
                .map_err(ConnError::from)
        })
        .await;
        closed.store(true, Ordering::Release);
        if let Some(p) = pinger {
            p.abort();
        }
        res
    };
    Ok((client, driver))
}

/// An HTTP/2 connection in the server role: accept streams with [`accept`](Self::accept).
pub struct H2Server<IO> {
    conn: ::h2::server::Connection<IO, Bytes>,
    shared: Arc<ConnShared>,
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// GOAWAY was sent ([`accept_until`](Self::accept_until) saw its stop).
    draining: bool,
}

impl<IO> std::fmt::Debug for H2Server<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Server")
            .field("streams", &self.shared.active_streams())
            .finish()
    }
}

/// A stream the peer opened: its request and the handle to answer it.
pub type Incoming = (
    http::Request<::h2::RecvStream>,
    ::h2::server::SendResponse<Bytes>,
);

impl<IO> H2Server<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the HTTP/2 handshake in the server role over `io`.
    pub async fn handshake(io: IO, settings: &H2Settings) -> Result<Self, ::h2::Error> {
        let mut conn = ::h2::server::Builder::new()
            .initial_window_size(settings.initial_stream_window())
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(settings.max_frame_size)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_send_buffer_size(settings.stream_window_bounds().max as usize)
            .handshake::<_, Bytes>(io)
            .await?;
        let shared = ConnShared::new(*settings);
        let pinger = conn
            .ping_pong()
            .map(|p| tokio::spawn(pinger(p, shared.clone())));
        Ok(Self {
            conn,
            shared,
            pinger,
            draining: false,
        })
    }

    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    /// The next stream the peer opens, as [`accept`](Self::accept), until
    /// the connection closes; once `stop` is cancelled the connection is
    /// drained: GOAWAY goes out once (no new streams), and the open streams
    /// run to their end while this keeps being called.
    pub async fn accept_until(
        &mut self,
        stop: &CancellationToken,
    ) -> Option<Result<Incoming, ConnError>> {
        loop {
            tokio::select! {
                next = self.accept() => return next,
                () = stop.cancelled(), if !self.draining => {
                    self.draining = true;
                    self.graceful_shutdown();
                }
            }
        }
    }

    /// The next stream the peer opens; `None` once the connection has closed
    /// cleanly. Must be polled for the connection to make progress.
    pub async fn accept(&mut self) -> Option<Result<Incoming, ConnError>> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, ConnError>>> {
        self.shared.driver.register(cx.waker());
        if let Err(err) = self.shared.check_dead() {
            return Poll::Ready(Some(Err(err)));
        }
        let conn = &mut self.conn;
        self.shared.adjust(|w| conn.set_initial_window_size(w));
        let res = self
            .conn
            .poll_accept(cx)
            .map(|next| next.map(|res| res.map_err(ConnError::from)));
        // The poll may have read the ACK of a previous change.
        let conn = &mut self.conn;
        if res.is_pending() && self.shared.adjust(|w| conn.set_initial_window_size(w)) {
            cx.waker().wake_by_ref();
        }
        res
    }

    /// Stops accepting streams (GOAWAY); open ones run to their end while
    /// [`accept`](Self::accept) keeps being polled.
    pub fn graceful_shutdown(&mut self) {
        self.conn.graceful_shutdown();
    }
}

impl<IO> Drop for H2Server<IO> {
    fn drop(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
    }
}

/// Information about the peer of a connection, put into every control
/// request's extensions so that handlers know who is calling.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The identity from the peer's certificate.
    pub identity: tunnel_identity::spiffe::Identity,
    /// The peer's socket address.
    pub remote_addr: std::net::SocketAddr,
}

/// One stream opened over an in-memory HTTP/2 connection, for unit tests.
#[cfg(test)]
pub(crate) mod test_stream {
    use super::*;

    /// Both ends of one open stream; the connection's two drivers run until
    /// this is dropped.
    pub(crate) struct OpenStream {
        /// The client's half: what it sends.
        pub(crate) send: ::h2::SendStream<Bytes>,
        /// The client's half: the server's answer.
        pub(crate) response: ::h2::client::ResponseFuture,
        /// The stream's place in the client connection's count.
        pub(crate) guard: StreamGuard,
        /// The server's half: the answer to give.
        pub(crate) respond: ::h2::server::SendResponse<Bytes>,
        /// The connection's two drivers: keep it while the stream is used.
        pub(crate) drivers: Drivers,
    }

    /// The tasks that drive both ends of the connection; dropping it stops them.
    pub(crate) struct Drivers([tokio::task::JoinHandle<()>; 2]);

    impl Drop for Drivers {
        fn drop(&mut self) {
            self.0.iter().for_each(|d| d.abort());
        }
    }

    /// Opens one stream from a client to a server over `tokio::io::duplex`
    /// and returns once the server has it.
    pub(crate) async fn open_stream() -> OpenStream {
        let settings = H2Settings::default();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let mut server = H2Server::handshake(server_io, &settings).await.unwrap();
            let (_request, respond) = server.accept().await.unwrap().unwrap();
            opened_tx.send(respond).unwrap();
            // Keep the connection driven.
            let _ = server.accept().await;
        });
        let (client, driver) = client_handshake(client_io, &settings).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = driver.await;
        });
        let guard = client.stream_slot().unwrap();
        let request = http::Request::post("https://tunnel.test/")
            .body(())
            .unwrap();
        let mut sender = client.sender().ready().await.unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let respond = opened.await.unwrap();
        OpenStream {
            send,
            response,
            guard,
            respond,
            drivers: Drivers([server, driver]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_server_connection_finishes_its_open_streams_then_closes() {
        let settings = H2Settings::default();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { H2Server::handshake(server_io, &settings).await });
        let (client, driver) = client_handshake(client_io, &settings).await.unwrap();
        let driver = tokio::spawn(driver);
        let mut server = server.await.unwrap().unwrap();
        let stop = CancellationToken::new();
        let (streams_tx, mut streams) = tokio::sync::mpsc::unbounded_channel();
        let served = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while let Some(next) = server.accept_until(&stop).await {
                    streams_tx.send(next.unwrap()).unwrap();
                }
            })
        };
        let request = http::Request::post("https://tunnel.test/")
            .body(())
            .unwrap();
        let mut sender = client.sender().ready().await.unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        let (_, mut respond) = streams.recv().await.unwrap();

        stop.cancel();
        // The stream opened before the stop still gets its answer...
        let mut answer = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), http::StatusCode::OK);
        answer.send_data(Bytes::new(), true).unwrap();
        // ...and once it is done the connection closes by itself.
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection closes once drained")
            .unwrap();
        assert!(
            streams.recv().await.is_none(),
            "no other stream was accepted"
        );
        tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("the client sees the connection end")
            .unwrap()
            .unwrap();
    }
}
