//! Moving bytes: between a TCP connection and a tunnel stream ([`relay_tcp`],
//! used by the agent and the client library), and between two tunnel streams
//! ([`splice`], used by the server), or between a tunnel stream and a client
//! leg that speaks another protocol ([`splice_legs`] with a
//! [`SpliceSource`] and a [`SpliceSink`]).
//!
//! Backpressure end to end, and no buffer of our own: a socket is read only
//! as much as the stream may send (its HTTP/2 send capacity), received DATA
//! is written to the socket (or handed to the next hop) as the buffer it
//! arrived in, and its window is released only once it was written. So a
//! stalled reader holds at most one stream window per hop, and an idle
//! connection holds no buffer at all.
//!
//! Close semantics: END_STREAM is a FIN in that direction (the socket's write
//! side is shut down, the other direction keeps flowing). A reset in either
//! direction is an abort of both: the TCP connection is reset (RST, not FIN)
//! and the stream is reset (RST_STREAM), on every hop.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::h2::{ConnShared, StreamGuard};

/// First read size after a pause; small so interactive traffic stays cheap.
pub const MIN_READ: usize = 16 * 1024;
/// Largest read: grows from [`MIN_READ`] while the socket keeps filling it.
pub const MAX_READ: usize = 256 * 1024;

/// Bytes moved by one side of a relay; shared with whoever reports on it.
#[derive(Debug, Default)]
pub struct ByteCounter(AtomicU64);

impl ByteCounter {
    /// Adds `n` bytes.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open tunnel stream: both halves, and its place in the connection's count.
#[derive(Debug)]
pub struct TunnelStream {
    /// Towards the peer.
    pub send: SendStream<Bytes>,
    /// From the peer.
    pub recv: RecvStream,
    guard: StreamGuard,
}

impl TunnelStream {
    /// A stream of the connection `guard` counts it on.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, guard: StreamGuard) -> Self {
        Self { send, recv, guard }
    }

    /// The connection the stream belongs to.
    pub fn conn(&self) -> &Arc<ConnShared> {
        self.guard.conn()
    }

    /// The stream's place in its connection's count.
    pub fn guard(&self) -> &StreamGuard {
        &self.guard
    }

    /// Aborts the stream (RST_STREAM).
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

/// How one direction of a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectionEnd {
    /// A half-close was passed on (END_STREAM or FIN).
    Eof,
    /// The direction was aborted: a reset from either side, or a failure.
    Aborted,
    /// Writing to the TCP connection failed (the local peer went away).
    WriteFailed,
}

/// How a relayed connection ended, with its byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Bytes read from the local TCP connection and sent into the tunnel.
    pub sent: u64,
    /// Bytes from the tunnel written to the local TCP connection.
    pub received: u64,
    /// How the local-to-tunnel direction ended.
    pub outbound: DirectionEnd,
    /// How the tunnel-to-local direction ended.
    pub inbound: DirectionEnd,
    /// The peer watch found the local peer gone and aborted the connection.
    pub peer_gone: bool,
}

impl RelayOutcome {
    /// Both directions ended with a clean half-close.
    pub fn is_clean(&self) -> bool {
        self.outbound == DirectionEnd::Eof && self.inbound == DirectionEnd::Eof
    }
}

/// Waits for send capacity and sends all of `data` (split to what the
/// window allows, without copying). Fails if the stream was reset or `stop`
/// fired. A waker the caller registered for a reset of `send`
/// ([`SendStream::poll_reset`]) is dropped without a wake: a caller that
/// waits for a reset afterwards polls for it again.
pub async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    stop: &CancellationToken,
) -> Result<(), ()> {
    while !data.is_empty() {
        let cap = capacity(send, data.len(), stop).await?;
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false).map_err(|_| ())?;
    }
    send.reserve_capacity(0);
    Ok(())
}

/// Reserves up to `want` bytes of send capacity and waits until some is assigned.
async fn capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    stop: &CancellationToken,
) -> Result<usize, ()> {
    quiet_reset_watch(send)?;
    send.reserve_capacity(want);
    loop {
        let cap = send.capacity();
        if cap > 0 {
            return Ok(cap);
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return Err(()),
            c = poll_fn(|cx| send.poll_capacity(cx)) => match c {
                Some(Ok(_)) => {}
                // The stream was reset or the connection is gone.
                Some(Err(_)) | None => return Err(()),
            },
        }
    }
}

/// Parks a no-op waker where h2 keeps the stream's send-side waker, before
/// capacity is reserved; `Err` if the stream was reset or its connection
/// failed.
///
/// h2 keeps one waker per stream for both "capacity assigned" and "reset".
/// The relays register their task there for a reset ([`SendStream::poll_reset`])
/// while they wait for data to send; when data comes, capacity granted at
/// once by `reserve_capacity` would wake that same task from within its own
/// poll. Tokio takes such a self-wake for a yield: it polls the task again
/// for nothing and, on a multi-threaded runtime, wakes an idle worker to
/// steal it: two futex calls and a thread switch per message (the server's
/// CPU per round trip fell by about a quarter without them, in the
/// benchmark). Every place that then waits registers the task again
/// (`poll_capacity` here, `poll_reset` at the top of each relay loop), so
/// no reset goes unseen.
pub(crate) fn quiet_reset_watch(send: &mut SendStream<Bytes>) -> Result<(), ()> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match send.poll_reset(&mut cx) {
        std::task::Poll::Pending => Ok(()),
        std::task::Poll::Ready(_) => Err(()),
    }
}

/// DATA smaller than this is merged with what else is already buffered.
const COALESCE_BELOW: usize = 4 * 1024;
/// Most bytes merged into one buffer.
const COALESCE_MAX: usize = 64 * 1024;

/// The next DATA of `recv`, counted on its connection; `None` at END_STREAM,
/// `Err` on a reset or a failed connection, or when `stop` fired. Small
/// frames already buffered behind it are merged into one buffer (copied),
/// so that a peer writing tiny frames costs one frame per hop, not one per
/// byte it wrote.
async fn next_data(
    recv: &mut RecvStream,
    conn: &StreamGuard,
    stop: &CancellationToken,
) -> Result<Option<Bytes>, Option<h2::Error>> {
    let first = tokio::select! {
        biased;
        () = stop.cancelled() => return Err(None),
        d = recv.data() => match d {
            Some(Ok(data)) => data,
            Some(Err(err)) => return Err(Some(err)),
            None => return Ok(None),
        },
    };
    conn.note_received(first.len());
    if first.len() >= COALESCE_BELOW {
        return Ok(Some(first));
    }
    let mut merged: Option<BytesMut> = None;
    let mut len = first.len();
    while len < COALESCE_MAX && !recv.is_end_stream() {
        use futures_util::FutureExt as _;
        match recv.data().now_or_never() {
            Some(Some(Ok(more))) => {
                conn.note_received(more.len());
                len += more.len();
                merged
                    .get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(COALESCE_MAX.max(len));
                        b.extend_from_slice(&first);
                        b
                    })
                    .extend_from_slice(&more);
            }
            // Nothing more buffered now; an error or the end shows at the next call.
            _ => break,
        }
    }
    Ok(Some(merged.map_or(first, BytesMut::freeze)))
}

/// Relays `tcp` over `stream` until both directions have ended; `prefix`
/// (bytes already read from `tcp`, may be empty) is sent first. With
/// `dead_peer`, a peer found gone by [`crate::net::peer::watch`] while it
/// owes an answer for what was written to it (data or the FIN
/// unacknowledged that long, or window probes unanswered) aborts the
/// connection, whether or not a write is waiting; a peer that is alive but
/// does not read is waited for, however long.
pub async fn relay_tcp(
    mut tcp: TcpStream,
    prefix: Bytes,
    stream: TunnelStream,
    dead_peer: Option<Duration>,
) -> RelayOutcome {
    let TunnelStream {
        mut send,
        mut recv,
        guard,
    } = stream;
    let sent = ByteCounter::default();
    let received = ByteCounter::default();
    let abort = CancellationToken::new();
    let inbound_done = CancellationToken::new();
    let writes = crate::net::peer::Writes::default();
    let mut peer_gone = false;
    let (outbound, inbound) = {
        let (rd, mut wr) = tcp.split();
        let outbound = async {
            let end = tcp_to_stream(rd.as_ref(), prefix, &mut send, &sent, &abort).await;
            if end != DirectionEnd::Eof {
                abort.cancel();
                return end;
            }
            // Our side is done sending, but a reset from the peer or from
            // the local socket must still end the other direction.
            tokio::select! {
                biased;
                () = abort.cancelled() => {}
                () = inbound_done.cancelled() => {}
                _ = poll_fn(|cx| send.poll_reset(cx)) => abort.cancel(),
                _ = tcp_error(rd.as_ref()) => abort.cancel(),
            }
            end
        };
        let inbound = async {
            let end = stream_to_tcp(&mut recv, &guard, &mut wr, &received, &abort, &writes).await;
            if end != DirectionEnd::Eof {
                abort.cancel();
            }
            inbound_done.cancel();
            end
        };
        let watch = async {
            match dead_peer {
                Some(timeout) => crate::net::peer::watch(rd.as_ref(), timeout, Some(&writes)).await,
                None => std::future::pending().await,
            }
        };
        // Polled at every wake of this task: outside tokio's cooperative
        // budget, so that its timer does not make the relay yield sooner.
        let watch = tokio::task::unconstrained(watch);
        let directions = async { tokio::join!(outbound, inbound) };
        tokio::pin!(directions, watch);
        tokio::select! {
            biased;
            ends = &mut directions => ends,
            answers = &mut watch => {
                tracing::info!(?answers, timeout = ?dead_peer, "the peer acknowledges nothing: gone; connection reset");
                peer_gone = true;
                abort.cancel();
                directions.await
            }
        }
    };
    if abort.is_cancelled() {
        // Both sides learn of the abort as an abort.
        send.send_reset(Reason::CANCEL);
        reset_tcp(tcp);
    }
    drop(guard);
    RelayOutcome {
        sent: sent.get(),
        received: received.get(),
        outbound,
        inbound,
        peer_gone,
    }
}

/// Completes when the socket has a pending error (the peer reset it).
async fn tcp_error(tcp: &TcpStream) -> std::io::Error {
    let res = tcp
        .async_io(tokio::io::Interest::ERROR, || match tcp.take_error() {
            Ok(Some(err)) => Ok(err),
            Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
            Err(err) => Ok(err),
        })
        .await;
    res.unwrap_or_else(|e| e)
}

/// Reads `tcp` into the stream, at most what the stream may send.
async fn tcp_to_stream(
    tcp: &TcpStream,
    prefix: Bytes,
    send: &mut SendStream<Bytes>,
    sent: &ByteCounter,
    abort: &CancellationToken,
) -> DirectionEnd {
    if !prefix.is_empty() {
        let n = prefix.len() as u64;
        if send_all(send, prefix, abort).await.is_err() {
            return DirectionEnd::Aborted;
        }
        sent.add(n);
    }
    let mut next_read = MIN_READ;
    loop {
        tokio::select! {
            biased;
            () = abort.cancelled() => return DirectionEnd::Aborted,
            _ = poll_fn(|cx| send.poll_reset(cx)) => return DirectionEnd::Aborted,
            r = tcp.readable() => if let Err(err) = r {
                tracing::debug!(%err, "tcp read readiness failed");
                return DirectionEnd::Aborted;
            },
        }
        let cap = tokio::select! {
            c = capacity(send, next_read, abort) => match c {
                Ok(cap) => cap,
                Err(()) => return DirectionEnd::Aborted,
            },
            // The local peer reset while the stream had no room.
            err = tcp_error(tcp) => {
                tracing::debug!(%err, "tcp connection reset while waiting for the tunnel");
                return DirectionEnd::Aborted;
            }
        };
        let mut buf = BytesMut::with_capacity(cap.min(next_read));
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                send.reserve_capacity(0);
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => DirectionEnd::Eof,
                    Err(_) => DirectionEnd::Aborted,
                };
            }
            Ok(n) => {
                // A full read means more is waiting: read more at once next time.
                if n >= next_read {
                    next_read = (next_read * 2).min(MAX_READ);
                }
                sent.add(n as u64);
                if send.send_data(buf.freeze(), false).is_err() {
                    return DirectionEnd::Aborted;
                }
                // Hold no connection send capacity while idle.
                send.reserve_capacity(0);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                send.reserve_capacity(0);
                next_read = MIN_READ;
            }
            Err(err) => {
                tracing::debug!(%err, "tcp read failed");
                return DirectionEnd::Aborted;
            }
        }
    }
}

/// Writes the stream's data to `tcp`, releasing its window as it goes;
/// each write (and the FIN) is noted in `writes` for the peer watch.
async fn stream_to_tcp(
    recv: &mut RecvStream,
    conn: &StreamGuard,
    tcp: &mut tokio::net::tcp::WriteHalf<'_>,
    received: &ByteCounter,
    abort: &CancellationToken,
    writes: &crate::net::peer::Writes,
) -> DirectionEnd {
    loop {
        match next_data(recv, conn, abort).await {
            Ok(Some(data)) => {
                let n = data.len();
                writes.note();
                let written = tokio::select! {
                    biased;
                    () = abort.cancelled() => return DirectionEnd::Aborted,
                    w = tcp.write_all(&data) => w,
                };
                if let Err(err) = written {
                    tracing::debug!(%err, "tcp write failed");
                    return DirectionEnd::WriteFailed;
                }
                received.add(n as u64);
                let _ = recv.flow_control().release_capacity(n);
            }
            Ok(None) => {
                writes.note();
                if let Err(err) = tcp.shutdown().await {
                    tracing::debug!(%err, "tcp shutdown failed");
                }
                return DirectionEnd::Eof;
            }
            Err(Some(err)) => {
                tracing::debug!(%err, "tunnel stream aborted");
                return DirectionEnd::Aborted;
            }
            Err(None) => return DirectionEnd::Aborted,
        }
    }
}

/// Resets a TCP connection (RST, not FIN).
pub fn reset_tcp(tcp: TcpStream) {
    if let Err(err) = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(%err, "cannot set SO_LINGER for reset");
    }
    drop(tcp);
}

/// What the server counts of one spliced connection.
#[derive(Debug, Default)]
pub struct SpliceCounters {
    /// Bytes from the client towards the cluster.
    pub to_cluster: ByteCounter,
    /// Bytes from the cluster towards the client.
    pub from_cluster: ByteCounter,
}

/// How a spliced connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceOutcome {
    /// The client-to-cluster direction.
    pub to_cluster: DirectionEnd,
    /// The cluster-to-client direction.
    pub from_cluster: DirectionEnd,
    /// `cut` fired (a revocation, an idle timeout) and reset both streams.
    pub cut: bool,
}

/// Why a leg of a [`splice_legs`] stopped: its peer aborted, it failed, or
/// the splice stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegAborted;

/// Where one direction of a splice reads: the bytes one leg's peer sends.
pub trait SpliceSource: Send {
    /// The next bytes; `Ok(None)` at a clean end of this direction (a FIN);
    /// an error when the leg was aborted or `stop` fired.
    fn next_data(
        &mut self,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, LegAborted>> + Send;

    /// The `n` bytes [`next_data`](Self::next_data) gave last were handed to
    /// the other leg: the peer may send that much more (its window).
    fn handed_on(&mut self, n: usize);
}

/// Where one direction of a splice writes: the bytes towards one leg's peer.
pub trait SpliceSink: Send {
    /// Sends `data` as it is, waiting while the peer's window is full; fails
    /// when the leg was aborted or `stop` fired.
    fn send(
        &mut self,
        data: Bytes,
        stop: &CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), LegAborted>> + Send;

    /// Ends this direction cleanly (a FIN).
    fn finish(&mut self) -> impl std::future::Future<Output = Result<(), LegAborted>> + Send;

    /// Ready once the leg's peer aborted: it takes nothing more.
    fn poll_aborted(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()>;

    /// Aborts the leg, both directions (a reset).
    fn abort(&mut self);
}

/// The receiving half of a tunnel stream, as a splice reads it.
#[derive(Debug)]
pub struct StreamSource {
    recv: RecvStream,
    guard: StreamGuard,
}

impl SpliceSource for StreamSource {
    async fn next_data(&mut self, stop: &CancellationToken) -> Result<Option<Bytes>, LegAborted> {
        next_data(&mut self.recv, &self.guard, stop)
            .await
            .map_err(|err| {
                if let Some(err) = err {
                    tracing::debug!(%err, "stream aborted");
                }
                LegAborted
            })
    }

    fn handed_on(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

/// The sending half of a tunnel stream: END_STREAM is the FIN, RST_STREAM the abort.
impl SpliceSink for SendStream<Bytes> {
    async fn send(&mut self, data: Bytes, stop: &CancellationToken) -> Result<(), LegAborted> {
        send_all(self, data, stop).await.map_err(|()| LegAborted)
    }

    async fn finish(&mut self) -> Result<(), LegAborted> {
        self.send_data(Bytes::new(), true).map_err(|_| LegAborted)
    }

    fn poll_aborted(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.poll_reset(cx).map(|_| ())
    }

    fn abort(&mut self) {
        self.send_reset(Reason::CANCEL);
    }
}

impl TunnelStream {
    /// The stream as the two legs of a splice: what the peer sends (holding
    /// the stream's place in its connection's count) and what goes to it.
    pub fn into_legs(self) -> (StreamSource, SendStream<Bytes>) {
        let TunnelStream { send, recv, guard } = self;
        (StreamSource { recv, guard }, send)
    }
}

/// Passes DATA between two streams until both directions have ended, or
/// until `cut` completes (then both streams are reset). A reset of either
/// stream resets the other. `idle_timeout` cuts a connection that moved no
/// byte for that long.
pub async fn splice(
    client: TunnelStream,
    agent: TunnelStream,
    counters: &SpliceCounters,
    cut: impl std::future::Future<Output = ()>,
    idle_timeout: Option<Duration>,
) -> SpliceOutcome {
    let (from_client, to_client) = client.into_legs();
    splice_legs(from_client, to_client, agent, counters, cut, idle_timeout).await
}

/// [`splice`] with any client leg: our own tunnel stream, or a front end
/// that speaks another protocol to the client (konnectivity, HTTP/1.1
/// CONNECT) and turns it into bytes, FINs and aborts. The agent's leg is
/// always a tunnel stream.
pub async fn splice_legs<S: SpliceSource, K: SpliceSink>(
    mut from_client: S,
    mut to_client: K,
    agent: TunnelStream,
    counters: &SpliceCounters,
    cut: impl std::future::Future<Output = ()>,
    idle_timeout: Option<Duration>,
) -> SpliceOutcome {
    let abort = CancellationToken::new();
    let activity = AtomicU64::new(0);
    let up_done = CancellationToken::new();
    let down_done = CancellationToken::new();
    let (mut from_agent, mut to_agent) = agent.into_legs();
    let up = async {
        let end = pass(
            &mut from_client,
            &mut to_agent,
            &counters.to_cluster,
            &activity,
            &abort,
        )
        .await;
        finish_direction(end, &mut to_agent, &up_done, &down_done, &abort).await
    };
    let down = async {
        let end = pass(
            &mut from_agent,
            &mut to_client,
            &counters.from_cluster,
            &activity,
            &abort,
        )
        .await;
        finish_direction(end, &mut to_client, &down_done, &up_done, &abort).await
    };
    let idle = async {
        let Some(limit) = idle_timeout else {
            return std::future::pending().await;
        };
        let mut seen = activity.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(limit).await;
            let now = activity.load(Ordering::Relaxed);
            if now == seen {
                tracing::debug!(?limit, "connection idle; cut");
                return;
            }
            seen = now;
        }
    };
    let (to_cluster, from_cluster, cut) = {
        let directions = async { tokio::join!(up, down) };
        tokio::pin!(directions, cut, idle);
        tokio::select! {
        (a, b) = &mut directions => (a, b, false),
        () = &mut cut => {
            abort.cancel();
            let (a, b) = directions.await;
            (a, b, true)
        }
        () = &mut idle => {
            abort.cancel();
            let (a, b) = directions.await;
            (a, b, true)
        }
        }
    };
    if abort.is_cancelled() {
        to_client.abort();
        to_agent.abort();
    }
    SpliceOutcome {
        to_cluster,
        from_cluster,
        cut,
    }
}

/// Ends one direction of a splice: an abort ends both; a clean end keeps
/// watching its outgoing stream for a reset until the other direction is
/// done too (nobody else polls that stream any more).
async fn finish_direction(
    end: DirectionEnd,
    to: &mut impl SpliceSink,
    done: &CancellationToken,
    other_done: &CancellationToken,
    abort: &CancellationToken,
) -> DirectionEnd {
    done.cancel();
    if end != DirectionEnd::Eof {
        abort.cancel();
        return end;
    }
    tokio::select! {
        biased;
        () = abort.cancelled() => {}
        () = other_done.cancelled() => {}
        () = poll_fn(|cx| to.poll_aborted(cx)) => abort.cancel(),
    }
    end
}

/// One direction of a splice.
async fn pass(
    from: &mut impl SpliceSource,
    to: &mut impl SpliceSink,
    counter: &ByteCounter,
    activity: &AtomicU64,
    abort: &CancellationToken,
) -> DirectionEnd {
    loop {
        let next = tokio::select! {
            biased;
            () = poll_fn(|cx| to.poll_aborted(cx)) => return DirectionEnd::Aborted,
            d = from.next_data(abort) => d,
        };
        match next {
            Ok(Some(data)) => {
                let n = data.len();
                if to.send(data, abort).await.is_err() {
                    return DirectionEnd::Aborted;
                }
                counter.add(n as u64);
                activity.fetch_add(1, Ordering::Relaxed);
                from.handed_on(n);
            }
            Ok(None) => {
                if to.finish().await.is_err() {
                    return DirectionEnd::Aborted;
                }
                return DirectionEnd::Eof;
            }
            Err(LegAborted) => return DirectionEnd::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::test_stream::open_stream;
    use futures_util::FutureExt as _;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake, Waker};

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A relay's task waits for a reset of its outgoing stream while it has
    /// nothing to send; when data comes and the window has room, taking the
    /// capacity must not wake that task from within its own poll (tokio
    /// would take it for a yield and wake another worker per message). A
    /// reset that comes later still reaches the task once it waits again.
    #[tokio::test]
    async fn capacity_granted_at_once_does_not_wake_the_task_watching_for_a_reset() {
        let mut stream = open_stream().await;
        let send = &mut stream.send;

        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(wakes.clone());
        assert!(
            send.poll_reset(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let stop = CancellationToken::new();
        let cap = capacity(send, 1024, &stop)
            .now_or_never()
            .expect("the window has room: capacity is granted at once")
            .expect("the stream is open");
        assert!(cap > 0);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "reserving capacity woke the task that watches for a reset"
        );

        let reset = poll_fn(|cx| send.poll_reset(cx));
        stream.respond.send_reset(Reason::CANCEL);
        let reason = tokio::time::timeout(Duration::from_secs(10), reset)
            .await
            .expect("the reset reaches the stream")
            .expect("a reset, not a connection error");
        assert_eq!(reason, Reason::CANCEL);
    }
}
