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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::net::Liveness;

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
/// How often the window estimate pings while data flows, at first.
const BDP_PING_DELAY: Duration = Duration::from_millis(10);
/// How long a stream opened after a window change is charged the window
/// before it (the peer applies a change one trip after we send it).
const PREVIOUS_WINDOW_GRACE: Duration = Duration::from_secs(1);
/// Longest delay between estimate pings while data flows.
const BDP_PING_DELAY_MAX: Duration = Duration::from_secs(1);

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

impl H2Settings {
    fn stream_window_bounds(&self) -> (u32, u32) {
        let min = self.min_stream_window.clamp(1024, CONNECTION_WINDOW);
        let max = self.max_stream_window.clamp(min, CONNECTION_WINDOW);
        (min, max)
    }

    fn budget(&self) -> u64 {
        self.window_budget.clamp(1 << 20, MAX_WINDOW_BUDGET)
    }

    fn initial_stream_window(&self) -> u32 {
        let (min, max) = self.stream_window_bounds();
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

/// What one connection's streams, its driver and its pinger share.
#[derive(Debug)]
pub struct ConnShared {
    settings: H2Settings,
    /// DATA bytes received on tunnel streams (for the window estimate).
    received: AtomicU64,
    /// Set while the connection is idle; the first data wakes the pinger.
    idle: AtomicBool,
    /// Counts window-estimate samples; a stream that receives data in a new
    /// one resets its byte count for the busiest-stream figure.
    epoch: AtomicU64,
    /// Bytes the busiest stream received during the current sample.
    busiest: AtomicU64,
    data_started: Notify,
    /// Open streams and what they may hold.
    ledger: std::sync::Mutex<Ledger>,
    /// The window the estimate asks for.
    bdp_window: AtomicU32,
    /// The window last sent as SETTINGS_INITIAL_WINDOW_SIZE.
    current_window: AtomicU32,
    /// A keepalive PING went unanswered.
    dead: AtomicBool,
    driver: AtomicWaker,
}

impl ConnShared {
    fn new(settings: H2Settings) -> Arc<Self> {
        let initial = settings.initial_stream_window();
        Arc::new(Self {
            settings,
            received: AtomicU64::new(0),
            idle: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            busiest: AtomicU64::new(0),
            data_started: Notify::new(),
            ledger: std::sync::Mutex::new(Ledger::default()),
            bdp_window: AtomicU32::new(initial),
            current_window: AtomicU32::new(initial),
            dead: AtomicBool::new(false),
            driver: AtomicWaker::new(),
        })
    }

    /// Counts `n` bytes received on a stream of this connection.
    pub fn note_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.data_started.notify_one();
        }
    }

    /// DATA bytes received on this connection's tunnel streams so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Tunnel streams open on this connection.
    pub fn active_streams(&self) -> usize {
        self.ledger().active() as usize
    }

    /// The stream window in force (last advertised).
    pub fn stream_window(&self) -> u32 {
        self.current_window.load(Ordering::Relaxed)
    }

    /// The settings of this connection.
    pub fn settings(&self) -> &H2Settings {
        &self.settings
    }

    /// What the open streams may hold together, at most, now.
    pub fn committed_bytes(&self) -> u64 {
        self.ledger().committed()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a tunnel stream as open until the guard drops; refuses it when
    /// its window would take the connection past its budget, or when
    /// `max_streams` are open already.
    pub fn try_stream_opened(
        self: &Arc<Self>,
        max_streams: u64,
    ) -> Result<StreamGuard, BudgetExhausted> {
        let guard = {
            let mut ledger = self.ledger();
            // A shrink not yet applied by the peer lets a new stream receive
            // up to the window before it: it is charged that.
            let window = u64::from(ledger.charge(self.stream_window()));
            if ledger.active() >= max_streams {
                return Err(BudgetExhausted {
                    streams: ledger.active(),
                    committed: ledger.committed(),
                });
            }
            let committed = ledger.committed();
            if committed + window > self.settings.budget() {
                return Err(BudgetExhausted {
                    streams: ledger.active(),
                    committed,
                });
            }
            let id = ledger.open(window as u32);
            StreamGuard {
                conn: self.clone(),
                id,
                epoch: AtomicU64::new(u64::MAX),
                epoch_bytes: AtomicU64::new(0),
            }
        };
        self.wake_if_window_changes();
        Ok(guard)
    }

    fn desired_window(&self) -> u32 {
        let (min, max) = self.settings.stream_window_bounds();
        let active = self.ledger().active().max(1);
        // Half the budget shared by the open streams; streams opened at a
        // larger window keep it, so with the defaults about 4,000 streams fit
        // the budget as they open one after another.
        let share = u32::try_from(self.settings.budget() / 2 / active).unwrap_or(u32::MAX);
        self.bdp_window
            .load(Ordering::Relaxed)
            .min(share)
            .clamp(min, max)
    }

    fn wake_if_window_changes(&self) {
        if differs(self.desired_window(), self.stream_window()) {
            self.driver.wake();
        }
    }

    /// Called by the driver on every poll: sends a new window when it should.
    /// A larger window is granted to every open stream, so it is cut to what
    /// the budget still allows.
    fn adjust(&self, set: impl FnOnce(u32) -> Result<(), ::h2::Error>) -> bool {
        let mut want = self.desired_window();
        let current = self.stream_window();
        let mut ledger = self.ledger();
        if want > current && ledger.active() > 0 {
            let room = self.settings.budget().saturating_sub(ledger.committed()) / ledger.active();
            let most = u64::from(current) + room;
            want = u32::try_from(most.min(u64::from(want))).unwrap_or(want);
        }
        if !differs(want, current) {
            return false;
        }
        // A refusal means the previous SETTINGS awaits its ACK; the driver
        // tries again at its next poll.
        if set(want).is_err() {
            return false;
        }
        ledger.window_changed(current, want);
        drop(ledger);
        tracing::debug!(
            from = current,
            to = want,
            streams = self.active_streams(),
            "stream window changed"
        );
        self.current_window.store(want, Ordering::Relaxed);
        true
    }

    fn check_dead(&self) -> Result<(), ConnError> {
        if self.dead.load(Ordering::Acquire) {
            return Err(ConnError::PingTimeout(
                self.settings.liveness.ping_timeout(),
            ));
        }
        Ok(())
    }
}

/// A change of at least a quarter is worth a SETTINGS frame.
fn differs(want: u32, current: u32) -> bool {
    let (a, b) = (u64::from(want), u64::from(current));
    a * 4 < b * 3 || a * 4 > b * 5
}

/// The streams of one connection and what they may hold: each stream may
/// come to hold the largest window in force while it is open (a shrink
/// takes back only future credit), its *peak*. Every peak is at least the
/// window in force, so a raise by `d` adds at most `d` per open stream.
#[derive(Debug, Default)]
struct Ledger {
    /// Sum of the open streams' peaks.
    committed: u64,
    /// Peak of each open stream, by id.
    peaks: std::collections::HashMap<u64, u32>,
    next_id: u64,
    /// The window before the last change, and until when it may still
    /// bind: a lowered window binds only once the peer applied it.
    previous_window: u32,
    previous_until: Option<Instant>,
}

impl Ledger {
    fn committed(&self) -> u64 {
        self.committed
    }

    /// Open streams.
    fn active(&self) -> u64 {
        self.peaks.len() as u64
    }

    /// The window a stream opened now must be charged: the one in force, or
    /// the one before it while the peer may not have applied the change.
    fn charge(&mut self, current: u32) -> u32 {
        match self.previous_until {
            Some(until) if Instant::now() < until => current.max(self.previous_window),
            _ => {
                self.previous_until = None;
                current
            }
        }
    }

    fn open(&mut self, peak: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.peaks.insert(id, peak);
        self.committed += u64::from(peak);
        id
    }

    fn close(&mut self, id: u64) {
        if let Some(peak) = self.peaks.remove(&id) {
            self.committed -= u64::from(peak);
        }
    }

    /// The window went from `from` to `to`: a raise lifts every open
    /// stream's peak to it.
    fn window_changed(&mut self, from: u32, to: u32) {
        self.previous_window = from;
        self.previous_until = Some(Instant::now() + PREVIOUS_WINDOW_GRACE);
        if to > from {
            for peak in self.peaks.values_mut() {
                if *peak < to {
                    self.committed += u64::from(to - *peak);
                    *peak = to;
                }
            }
        }
    }
}

/// A stream refused because the connection's budget or stream count is spent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the tunnel connection is full: {streams} open streams may hold {committed} bytes (--window-budget, --max-streams-per-connection)"
)]
pub struct BudgetExhausted {
    /// Streams open on the connection.
    pub streams: u64,
    /// What they may hold together.
    pub committed: u64,
}

/// Counts one open tunnel stream of a connection.
#[derive(Debug)]
pub struct StreamGuard {
    conn: Arc<ConnShared>,
    /// This stream's entry in the connection's ledger.
    id: u64,
    /// The sample this stream last received data in, and how much.
    epoch: AtomicU64,
    epoch_bytes: AtomicU64,
}

impl StreamGuard {
    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<ConnShared> {
        &self.conn
    }

    /// Counts `n` bytes received on this stream.
    pub fn note_received(&self, n: usize) {
        self.conn.note_received(n);
        let now = self.conn.epoch.load(Ordering::Relaxed);
        let n = n as u64;
        let bytes = if self.epoch.swap(now, Ordering::Relaxed) != now {
            self.epoch_bytes.store(n, Ordering::Relaxed);
            n
        } else {
            self.epoch_bytes.fetch_add(n, Ordering::Relaxed) + n
        };
        self.conn.busiest.fetch_max(bytes, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.ledger().close(self.id);
        self.conn.wake_if_window_changes();
    }
}

/// Keepalive and window estimate: one PING outstanding at a time.
async fn pinger(mut pings: ::h2::PingPong, shared: Arc<ConnShared>) {
    let liveness = shared.settings.liveness;
    let mut bdp = Bdp::new(shared.bdp_window.load(Ordering::Relaxed));
    let mut last_received = shared.received.load(Ordering::Relaxed);
    loop {
        let flowing = shared.received.load(Ordering::Relaxed) != last_received;
        if flowing {
            tokio::time::sleep(bdp.delay).await;
        } else {
            shared.idle.store(true, Ordering::Release);
            // The first sample after an idle spell may catch a transfer in
            // TCP slow start: it never gives the window back alone.
            bdp.low_samples = 0;
            // Data that arrived between the check and now must not be missed.
            if shared.received.load(Ordering::Relaxed) == last_received {
                let started = tokio::time::timeout(
                    liveness.keepalive_interval,
                    shared.data_started.notified(),
                )
                .await
                .is_ok();
                if started {
                    // Sample once the data has flowed for a while: pinging at
                    // its first byte would cost every request/response
                    // exchange on an idle connection a PING and its ACK on
                    // each leg (a fifth more frames, syscalls and wake-ups
                    // per round trip, measured).
                    tokio::time::sleep(bdp.delay).await;
                }
            }
            shared.idle.store(false, Ordering::Release);
        }
        shared.busiest.store(0, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::Relaxed);
        let before = shared.received.load(Ordering::Relaxed);
        let sent = Instant::now();
        match tokio::time::timeout(liveness.ping_timeout(), pings.ping(::h2::Ping::opaque())).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::trace!(%err, "ping failed; the connection is closing");
                return;
            }
            Err(_) => {
                shared.dead.store(true, Ordering::Release);
                shared.driver.wake();
                return;
            }
        }
        let after = shared.received.load(Ordering::Relaxed);
        last_received = after;
        // The window is per stream: what the busiest stream moved is what
        // counts, not many streams' sum nor their mean (one bulk transfer
        // beside trickling streams must keep its window).
        let busiest = shared.busiest.load(Ordering::Relaxed);
        tracing::trace!(bytes = after - before, busiest, rtt = ?sent.elapsed(), window = bdp.window, "window estimate sample");
        if let Some(window) = bdp.sample(busiest, sent.elapsed(), &shared.settings) {
            shared.bdp_window.store(window, Ordering::Relaxed);
            shared.wake_if_window_changes();
        }
    }
}

/// Bandwidth-delay product estimate. A PING's round trip is sampled with
/// the bytes that arrived meanwhile: when they reach 2/3 of the window, the
/// window may be the limit (as in hyper's algorithm). The link's product is
/// then the delivery rate times the *smallest* round trip seen, and the
/// window is set to twice that. Using the smallest round trip keeps queueing
/// out of it: when the window only fills buffers (a fast link, a busy
/// machine), the PING waits behind the data, its round trip grows with the
/// window, and an estimate from that round trip would grow without end.
#[derive(Debug)]
struct Bdp {
    window: u32,
    min_rtt: f64,
    delay: Duration,
    /// Consecutive samples in which the link filled little of the window.
    low_samples: u32,
}

impl Bdp {
    fn new(window: u32) -> Self {
        Self {
            window,
            min_rtt: f64::INFINITY,
            delay: BDP_PING_DELAY,
            low_samples: 0,
        }
    }

    fn sample(&mut self, bytes: u64, rtt: Duration, settings: &H2Settings) -> Option<u32> {
        let max = settings.stream_window_bounds().1;
        let rtt = rtt.as_secs_f64().max(1e-6);
        self.min_rtt = self.min_rtt.min(rtt);
        let product = bytes as f64 * (self.min_rtt / rtt);
        if bytes < u64::from(self.window) * 2 / 3 {
            // Not limited by the window.
            self.delay = (self.delay * 2).min(BDP_PING_DELAY_MAX);
            // A window far above what the link now moves is given back, by
            // halves, down to the initial window: a raise left over from a
            // past bulk transfer would otherwise be granted to every new
            // stream and spend the connection's budget (stalled streams
            // hold their whole window).
            let floor = settings.initial_stream_window();
            if self.window > floor && 2.0 * product < f64::from(self.window) / 4.0 {
                // Two low samples in a row: one may be a pause.
                self.low_samples += 1;
                if self.low_samples >= 2 {
                    self.low_samples = 0;
                    self.window = (self.window / 2).max(floor);
                    return Some(self.window);
                }
            } else {
                self.low_samples = 0;
            }
            return None;
        }
        self.low_samples = 0;
        let target = (2.0 * product).min(f64::from(max));
        if target < f64::from(self.window) * 1.25 {
            self.delay = (self.delay * 2).min(BDP_PING_DELAY_MAX);
            return None;
        }
        self.window = target as u32;
        self.delay = (self.delay / 2).max(BDP_PING_DELAY);
        Some(self.window)
    }
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
        .max_send_buffer_size(settings.stream_window_bounds().1 as usize)
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
            .max_send_buffer_size(settings.stream_window_bounds().1 as usize)
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
        })
    }

    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<ConnShared> {
        &self.shared
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_doubles_the_window_only_while_the_link_fills_it() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(DEFAULT_STREAM_WINDOW);
        // A full window arrived within one (unqueued) round trip: the window is the limit.
        let w = bdp
            .sample(
                u64::from(DEFAULT_STREAM_WINDOW),
                Duration::from_millis(50),
                &settings,
            )
            .expect("grows");
        assert_eq!(w, 2 * DEFAULT_STREAM_WINDOW);
        // Far less than the window arrived twice in a row: the link, not
        // the window, limits, and the raise is given back.
        assert_eq!(
            bdp.sample(10_000, Duration::from_millis(50), &settings),
            None
        );
        assert_eq!(
            bdp.sample(10_000, Duration::from_millis(50), &settings),
            Some(DEFAULT_STREAM_WINDOW)
        );
        // Never beyond the ceiling.
        let mut bdp = Bdp::new(DEFAULT_MAX_STREAM_WINDOW / 2);
        let w = bdp
            .sample(1 << 30, Duration::from_millis(50), &settings)
            .unwrap();
        assert_eq!(w, DEFAULT_MAX_STREAM_WINDOW);
    }

    #[test]
    fn a_window_the_link_no_longer_fills_shrinks_back_by_halves_to_the_initial_one() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(4 * DEFAULT_STREAM_WINDOW);
        bdp.min_rtt = 0.05;
        // Idle, then a trickle: halved every second low sample, never
        // below the start.
        let low = |bdp: &mut Bdp, bytes| bdp.sample(bytes, Duration::from_millis(50), &settings);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, 0), Some(2 * DEFAULT_STREAM_WINDOW));
        assert_eq!(low(&mut bdp, 1000), None);
        assert_eq!(low(&mut bdp, 1000), Some(DEFAULT_STREAM_WINDOW));
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, 0), None);
        // A stream that still uses a good part of its window keeps it, and
        // one busy sample between low ones restarts the count.
        let mut bdp = Bdp::new(4 * DEFAULT_STREAM_WINDOW);
        bdp.min_rtt = 0.05;
        let half = u64::from(DEFAULT_STREAM_WINDOW);
        assert_eq!(low(&mut bdp, half), None);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, half), None);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(bdp.window, 4 * DEFAULT_STREAM_WINDOW);
    }

    #[test]
    fn a_round_trip_inflated_by_queued_data_does_not_grow_the_window() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(DEFAULT_STREAM_WINDOW);
        // An idle round trip of 200 µs: the link's own delay.
        assert_eq!(bdp.sample(0, Duration::from_micros(200), &settings), None);
        // A full window arrives, but the PING waited 5 ms behind it: the
        // window only filled a queue; the product is 10 KiB, not 256 KiB.
        assert_eq!(
            bdp.sample(
                u64::from(DEFAULT_STREAM_WINDOW),
                Duration::from_millis(5),
                &settings
            ),
            None
        );
    }

    #[test]
    fn raises_and_give_backs_charge_a_long_lived_stream_its_peak_not_their_sum() {
        let shared = ConnShared::new(H2Settings::default());
        let long_lived = shared.try_stream_opened(u64::MAX).unwrap();
        // A hundred bulk transfers, each raising the window to 16 MiB and
        // giving it back: the stream that stayed open may hold 16 MiB.
        for _ in 0..100 {
            shared
                .bdp_window
                .store(DEFAULT_MAX_STREAM_WINDOW, Ordering::Relaxed);
            assert!(shared.adjust(|_| Ok(())));
            shared
                .bdp_window
                .store(DEFAULT_STREAM_WINDOW, Ordering::Relaxed);
            assert!(shared.adjust(|_| Ok(())));
        }
        assert_eq!(
            shared.committed_bytes(),
            u64::from(DEFAULT_MAX_STREAM_WINDOW)
        );
        // Just after a give-back a new stream is charged the old window
        // (the peer may not have applied the lower one yet).
        let fresh = shared.try_stream_opened(u64::MAX).unwrap();
        assert_eq!(
            shared.committed_bytes(),
            2 * u64::from(DEFAULT_MAX_STREAM_WINDOW)
        );
        drop((long_lived, fresh));
        assert_eq!(shared.committed_bytes(), 0);
        // A second later the peer has long applied the lower window.
        shared.ledger().previous_until = Some(Instant::now() - Duration::from_millis(1));
        // New streams open freely: the budget was never spent by the cycles.
        let guards: Vec<_> = (0..1000)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        assert_eq!(guards.len(), 1000);
    }

    #[test]
    fn many_open_streams_share_the_budget_down_to_the_floor() {
        let shared = ConnShared::new(H2Settings::default());
        assert_eq!(shared.desired_window(), DEFAULT_STREAM_WINDOW);
        let guards: Vec<_> = (0..4096)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        // Half of 1 GiB over 4,096 streams is 128 KiB each.
        assert_eq!(shared.desired_window(), 128 * 1024);
        drop(guards);
        assert_eq!(shared.active_streams(), 0);
        assert_eq!(shared.committed_bytes(), 0);
        assert_eq!(shared.desired_window(), DEFAULT_STREAM_WINDOW);
    }

    #[test]
    fn streams_beyond_the_budget_are_refused_and_raises_are_cut_to_it() {
        let settings = H2Settings {
            window_budget: 8 << 20,
            ..H2Settings::default()
        };
        let shared = ConnShared::new(settings);
        // 8 MiB of budget holds 32 streams of 256 KiB.
        let mut guards: Vec<_> = (0..32)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        assert_eq!(shared.committed_bytes(), 8 << 20);
        let err = shared.try_stream_opened(u64::MAX).unwrap_err();
        assert_eq!(err.streams, 32);
        // Closing streams makes room again.
        guards.truncate(2);
        assert_eq!(shared.committed_bytes(), 512 * 1024);
        // The estimate asks for 16 MiB windows; half the budget over 2
        // streams allows 2 MiB each, and every open stream gets the raise.
        shared
            .bdp_window
            .store(DEFAULT_MAX_STREAM_WINDOW, Ordering::Relaxed);
        let mut sent = None;
        assert!(shared.adjust(|w| {
            sent = Some(w);
            Ok(())
        }));
        assert_eq!(sent, Some(2 << 20));
        assert_eq!(shared.committed_bytes(), 4 << 20);
        // Two more streams at 2 MiB fill the budget.
        guards.extend((0..2).map(|_| shared.try_stream_opened(u64::MAX).unwrap()));
        assert_eq!(shared.committed_bytes(), 8 << 20);
        assert!(shared.try_stream_opened(u64::MAX).is_err());
        // The window shrinks for 4 streams, but that takes back no credit:
        // the open streams may still hold what they were given.
        assert!(shared.adjust(|w| {
            sent = Some(w);
            Ok(())
        }));
        assert_eq!(sent, Some(1 << 20));
        assert_eq!(shared.committed_bytes(), 8 << 20);
        assert!(shared.try_stream_opened(u64::MAX).is_err());
        drop(guards);
        assert_eq!(shared.committed_bytes(), 0);
        assert!(shared.try_stream_opened(u64::MAX).is_ok());
    }

    #[test]
    fn four_thousand_streams_fit_the_default_budget_even_opened_at_once() {
        // Opened within a second, each charged the window before the last
        // shrink (the peer may not have applied it yet).
        let shared = ConnShared::new(H2Settings::default());
        let mut guards = Vec::new();
        for i in 0..4_000 {
            // The driver follows the stream count as it polls.
            shared.adjust(|_| Ok(()));
            guards.push(
                shared
                    .try_stream_opened(u64::MAX)
                    .unwrap_or_else(|e| panic!("stream {i}: {e}")),
            );
        }
        assert!(shared.committed_bytes() <= DEFAULT_WINDOW_BUDGET);
    }

    #[test]
    fn small_changes_send_no_settings() {
        assert!(!differs(100, 110));
        assert!(differs(100, 200));
        assert!(differs(200, 100));
    }
}
