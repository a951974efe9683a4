//! The one relay loop: a TCP connection on one side, a tunnel stream of
//! [`Frame`]s on the other. Used by the agent (destination side) and by the
//! client library (application side); the server only splices frames.
//!
//! Reading: [`TcpFrames`] is a stream that HTTP/2 polls when it has room to
//! send, so the TCP socket is read only as fast as the tunnel drains it (no
//! unbounded buffer anywhere), and the read buffer exists only while data is
//! ready, so an idle connection holds no buffer. Writing: [`frames_to_tcp`]
//! writes each data frame's bytes straight to the socket, without copying.
//!
//! Close semantics: an `eof` frame is a FIN in that direction (the socket's
//! write side is shut down, the other direction keeps flowing). A stream that
//! ends without `eof`, or fails, is an abort: the TCP connection is reset.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::pb::{self, Frame, frame::Kind};

/// First read size after a pause; small so interactive traffic stays cheap.
pub const MIN_READ: usize = 16 * 1024;
/// Largest read, and so the largest data frame: grows from [`MIN_READ`]
/// while the socket keeps filling the buffer.
pub const MAX_READ: usize = 256 * 1024 - 1024;

/// A data frame.
pub fn data_frame(data: Bytes) -> Frame {
    Frame {
        kind: Some(Kind::Data(data)),
    }
}

/// An end-of-data (half-close) frame.
pub fn eof_frame() -> Frame {
    Frame {
        kind: Some(Kind::Eof(pb::Eof {})),
    }
}

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

/// Shared state of one relayed connection.
#[derive(Debug, Default)]
pub struct RelayState {
    /// Payload bytes read from the TCP connection and sent into the tunnel.
    pub sent: ByteCounter,
    /// Payload bytes received from the tunnel and written to the TCP connection.
    pub received: ByteCounter,
    aborted: std::sync::atomic::AtomicBool,
}

/// Reads a TCP connection as data frames, then one `eof` frame at FIN.
/// A read error, or an abort of the other direction, ends the stream without
/// `eof` (an abort). Reports how it ended through the `done` channel.
pub struct TcpFrames {
    prefix: Option<Bytes>,
    half: Option<OwnedReadHalf>,
    buf: BytesMut,
    next_read: usize,
    state: Arc<RelayState>,
    done: Option<tokio::sync::oneshot::Sender<DirectionEnd>>,
}

impl TcpFrames {
    fn finish(&mut self, end: DirectionEnd) {
        self.half = None;
        self.buf = BytesMut::new();
        if let Some(done) = self.done.take() {
            let _ = done.send(end);
        }
    }
}

impl Drop for TcpFrames {
    fn drop(&mut self) {
        // Dropped by HTTP/2 before the end (stream reset): an abort.
        self.finish(DirectionEnd::Aborted);
    }
}

impl Stream for TcpFrames {
    type Item = Frame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        let this = self.get_mut();
        if let Some(prefix) = this.prefix.take() {
            this.state.sent.add(prefix.len() as u64);
            return Poll::Ready(Some(data_frame(prefix)));
        }
        loop {
            let Some(half) = &this.half else {
                return Poll::Ready(None);
            };
            let sock = half.as_ref();
            if let Err(err) = ready!(sock.poll_read_ready(cx)) {
                tracing::debug!(%err, "tcp read readiness failed");
                this.finish(DirectionEnd::Aborted);
                return Poll::Ready(None);
            }
            if this.buf.capacity() < this.next_read {
                this.buf.reserve(this.next_read);
            }
            match sock.try_read_buf(&mut this.buf) {
                Ok(0) if this.state.aborted.load(Ordering::Acquire) => {
                    this.finish(DirectionEnd::Aborted);
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.finish(DirectionEnd::Eof);
                    return Poll::Ready(Some(eof_frame()));
                }
                Ok(n) => {
                    // A full read means more is waiting: read more at once next time.
                    if n >= this.next_read {
                        this.next_read = (this.next_read * 2).min(MAX_READ);
                    }
                    this.state.sent.add(n as u64);
                    return Poll::Ready(Some(data_frame(this.buf.split().freeze())));
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    // Idle: hold no buffer; start small again.
                    this.buf = BytesMut::new();
                    this.next_read = MIN_READ;
                }
                Err(err) => {
                    tracing::debug!(%err, "tcp read failed");
                    this.finish(DirectionEnd::Aborted);
                    return Poll::Ready(None);
                }
            }
        }
    }
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
}

impl RelayOutcome {
    /// Both directions ended with a clean half-close.
    pub fn is_clean(&self) -> bool {
        self.outbound == DirectionEnd::Eof && self.inbound == DirectionEnd::Eof
    }
}

/// Starts relaying `tcp` over a tunnel stream whose incoming frames are
/// `inbound`; `prefix` (bytes already read from `tcp`, may be empty) is sent first. Returns the outgoing frame stream, to be handed to HTTP/2 as the
/// request or response body, and a future that writes the incoming side and
/// completes when both directions have ended.
pub fn relay_tcp<S, E>(
    tcp: tokio::net::TcpStream,
    prefix: Bytes,
    inbound: S,
) -> (
    TcpFrames,
    impl std::future::Future<Output = RelayOutcome> + Send,
)
where
    S: Stream<Item = Result<Frame, E>> + Unpin + Send,
    E: std::fmt::Display + Send,
{
    let (read, write) = tcp.into_split();
    let state = Arc::new(RelayState::default());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let outbound = TcpFrames {
        prefix: (!prefix.is_empty()).then_some(prefix),
        half: Some(read),
        buf: BytesMut::new(),
        next_read: MIN_READ,
        state: state.clone(),
        done: Some(done_tx),
    };
    let fut = async move {
        let inbound_end = frames_to_tcp(inbound, write, &state).await;
        let outbound_end = done_rx.await.unwrap_or(DirectionEnd::Aborted);
        RelayOutcome {
            sent: state.sent.get(),
            received: state.received.get(),
            outbound: outbound_end,
            inbound: inbound_end,
        }
    };
    (outbound, fut)
}

/// How one direction of a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectionEnd {
    /// An `eof` arrived and was passed on as a FIN.
    Eof,
    /// The stream ended or failed without `eof`; the TCP connection was reset.
    Aborted,
    /// Writing to the TCP connection failed (the local peer went away).
    WriteFailed,
}

/// Writes the data of `frames` to `half` until `eof` (then shuts down the
/// write side) or until the stream ends without it (then resets the
/// connection and ends the other direction too).
async fn frames_to_tcp<S, E>(
    mut frames: S,
    mut half: OwnedWriteHalf,
    state: &RelayState,
) -> DirectionEnd
where
    S: Stream<Item = Result<Frame, E>> + Unpin,
    E: std::fmt::Display,
{
    loop {
        match frames.next().await {
            Some(Ok(Frame {
                kind: Some(Kind::Data(data)),
            })) => {
                let n = data.len() as u64;
                if let Err(err) = half.write_all(&data).await {
                    tracing::debug!(%err, "tcp write failed");
                    reset(half, state);
                    return DirectionEnd::WriteFailed;
                }
                state.received.add(n);
            }
            Some(Ok(Frame {
                kind: Some(Kind::Eof(_)),
            })) => {
                if let Err(err) = half.shutdown().await {
                    tracing::debug!(%err, "tcp shutdown failed");
                }
                return DirectionEnd::Eof;
            }
            Some(Ok(other)) => {
                tracing::debug!(frame = ?other.kind.as_ref().map(kind_name), "unexpected frame in data phase");
                reset(half, state);
                return DirectionEnd::Aborted;
            }
            Some(Err(err)) => {
                tracing::debug!(%err, "tunnel stream failed");
                reset(half, state);
                return DirectionEnd::Aborted;
            }
            None => {
                reset(half, state);
                return DirectionEnd::Aborted;
            }
        }
    }
}

/// Resets the TCP connection (RST, not FIN) once both halves are dropped.
fn reset(half: OwnedWriteHalf, state: &RelayState) {
    state.aborted.store(true, Ordering::Release);
    let sock = socket2::SockRef::from(half.as_ref());
    if let Err(err) = sock.set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(%err, "cannot set SO_LINGER for reset");
    }
    // Ends the reading direction too; it sees `aborted` and sends no eof.
    let _ = sock.shutdown(std::net::Shutdown::Read);
    // Dropping the write half would send a FIN first.
    half.forget();
}

/// The name of a frame kind, for logs.
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Open(_) => "open",
        Kind::Opened(_) => "opened",
        Kind::Data(_) => "data",
        Kind::Eof(_) => "eof",
        Kind::Error(_) => "error",
    }
}

/// A stream that yields `first`, then waits until [`GateOpener::open`] hands
/// it the rest. Lets an opener send `Open` before it commits the rest of the
/// connection (the client keeps its socket until the tunnel answered; the
/// server keeps the client's stream so it can retry another agent).
pub struct Gated<S> {
    first: Option<Frame>,
    gate: Option<tokio::sync::oneshot::Receiver<S>>,
    rest: Option<S>,
}

/// Hands the rest of the stream to a [`Gated`] stream.
#[derive(Debug)]
pub struct GateOpener<S>(tokio::sync::oneshot::Sender<S>);

impl<S> GateOpener<S> {
    /// Continues the gated stream with `rest`. Gives `rest` back if the gated
    /// stream is gone.
    pub fn open(self, rest: S) -> Result<(), S> {
        self.0.send(rest)
    }
}

/// A gated stream that starts with `first`, and its opener.
pub fn gated<S>(first: Frame) -> (Gated<S>, GateOpener<S>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (
        Gated {
            first: Some(first),
            gate: Some(rx),
            rest: None,
        },
        GateOpener(tx),
    )
}

impl<S: Stream<Item = Frame> + Unpin> Stream for Gated<S> {
    type Item = Frame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        if let Some(gate) = &mut this.gate {
            match ready!(Pin::new(gate).poll(cx)) {
                Ok(rest) => this.rest = Some(rest),
                // The opener gave up: end without eof (an abort).
                Err(_) => {
                    this.gate = None;
                    return Poll::Ready(None);
                }
            }
            this.gate = None;
        }
        match &mut this.rest {
            Some(rest) => rest.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}
