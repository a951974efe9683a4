//! The konnectivity entry on the client port: apiserver-network-proxy's
//! gRPC protocol (`/ProxyService/Proxy`, [`tunnel_proto::konnectivity`]), so
//! that programs built on its Go client (`CreateSingleUseGrpcTunnel`,
//! cluster-gateway) move to cluster-tunnel by changing an address and a
//! certificate.
//!
//! One gRPC stream carries one connection, as the Go client's single-use
//! tunnel does, and on the agent's leg that connection is its own HTTP/2
//! stream like any other: the dial goes the one way every connection goes
//! ([`crate::connection`]: the certificate's identity or the bearer token in
//! the call's `authorization` metadata, the policy, an agent of the cluster),
//! the addresses are read by [`crate::addresses`]. Then:
//!
//! | konnectivity | the connection |
//! | --- | --- |
//! | DIAL_REQ | dialed; DIAL_RSP with a connectID, or with the error `<code>: <message>` (what the Go client's `DialContext` returns), then the stream ends |
//! | DIAL_CLS while the dial runs | the dial is abandoned |
//! | DATA from the client | bytes to the destination, as the buffer they were decoded into |
//! | bytes from the destination | DATA, the payload sent as it came from the agent |
//! | CLOSE_REQ | a FIN to the destination and CLOSE_RSP at once; the connection ends when the destination closes too, or is reset if it sends more (as TCP answers data to a closed socket) or stays open [`CLOSE_GRACE`] |
//! | the destination closes (FIN) | CLOSE_RSP, and the stream ends (`grpc-status: 0`) |
//! | the request stream ends | a FIN to the destination |
//! | the stream is reset (a cancelled call) | the connection is reset |
//! | an abort on the agent's side | the stream is reset |
//! | a packet out of place (DATA before DIAL_RSP, an unknown connectID, a second DIAL_REQ, garbage, a message over 4 MiB) | a log line, the connection reset, the stream ended with `grpc-status` `INVALID_ARGUMENT` (`RESOURCE_EXHAUSTED` for the size) and the reason; while dialing, first a DIAL_RSP with it |
//!
//! Memory: the stream's HTTP/2 window is the flow control (a packet is read
//! only once the previous one was handed to the agent), plus at most one
//! message being assembled, whose start beyond the window is charged to the
//! connection's budget (`RESOURCE_EXHAUSTED` when it does not fit).

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use h2::{Reason, SendStream};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tunnel_proto::h2::{PeerInfo, StreamGuard};
use tunnel_proto::konnectivity::pb::{PacketType, packet::Payload};
use tunnel_proto::konnectivity::{
    MessageReader, ReadError, closed, data_prefix, dial_failed, dial_opened, encode,
    response_headers, trailers,
};
use tunnel_proto::relay::{LegAborted, SpliceSink, SpliceSource, send_all};

use crate::ServerState;
use crate::connection::{Caller, check_caller, establish, refuse_early};

/// How long a connection the client closed (CLOSE_REQ) waits for the
/// destination to close too before it is reset: the Go client's own wait
/// for CLOSE_RSP.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves one konnectivity stream a client opened, until its connection ended.
pub(crate) async fn serve_stream(
    state: Arc<ServerState>,
    peer: Arc<PeerInfo>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    guard: StreamGuard,
) {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if req.method() != http::Method::POST || !is_grpc {
        tracing::warn!(peer = %peer.remote_addr, client = %peer.identity, method = %req.method(), "a konnectivity call that is no gRPC POST; refused");
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        let _ = respond.send_response(resp, true);
        return;
    }
    let token = crate::authn::bearer_token(req.headers());
    let mut send = match respond.send_response(response_headers(), false) {
        Ok(send) => send,
        Err(err) => {
            tracing::debug!(peer = %peer.remote_addr, %err, "konnectivity client left before the answer");
            return;
        }
    };
    let mut reader = MessageReader::new(req.into_body(), guard);
    let violation = |send: &mut SendStream<Bytes>, status: Status| {
        tracing::warn!(peer = %peer.remote_addr, client = %peer.identity, reason = status.message(), "konnectivity protocol violation; stream ended");
        let _ = send.send_trailers(trailers(&status));
    };
    let dial = match reader.next_packet().await {
        Ok(Some(packet)) => match packet.payload {
            Some(Payload::DialRequest(dial)) if packet.r#type == PacketType::DialReq as i32 => dial,
            _ => {
                let status = Status::invalid_argument(format!(
                    "the first packet must be DIAL_REQ, not {}",
                    packet_name(packet.r#type)
                ));
                return violation(&mut send, status);
            }
        },
        // Closed without dialing.
        Ok(None) => {
            let _ = send.send_trailers(trailers(&Status::ok("")));
            return;
        }
        Err(ReadError::Reset(err)) => {
            tracing::debug!(peer = %peer.remote_addr, %err, "konnectivity stream ended before its dial");
            return;
        }
        Err(err) => return violation(&mut send, err.status()),
    };
    let random = dial.random;
    let open = check_caller(&peer)
        .and_then(|()| protocol(&dial.protocol))
        .and_then(|()| state.config.addressing.open(&dial.address));
    let open = match open {
        Ok(open) => open,
        Err(err) => {
            refuse_early(&state, &peer, &err);
            let _ = send.send_data(encode(&dial_failed(random, err.to_string())), false);
            let _ = send.send_trailers(trailers(&Status::ok("")));
            return;
        }
    };
    let caller = Caller {
        peer: &peer,
        token,
        entry: "konnectivity",
    };
    let mut during_dial = None;
    let watch = async { during_dial = Some(watch_dial(&mut reader, random).await) };
    let established = establish(&state, caller, open, watch).await;
    let established = match (established, during_dial) {
        (Ok(established), _) => established,
        (Err(_), Some(DuringDial::Violation(status))) => {
            let error = format!("bad_request: {}", status.message());
            let _ = send.send_data(encode(&dial_failed(random, error)), false);
            return violation(&mut send, status);
        }
        (Err(_), Some(DuringDial::Abandoned)) => {
            let _ = send.send_trailers(trailers(&Status::ok("")));
            return;
        }
        (Err(_), Some(DuringDial::Gone)) => return,
        (Err(err), None) => {
            let _ = send.send_data(encode(&dial_failed(random, err.to_string())), false);
            let _ = send.send_trailers(trailers(&Status::ok("")));
            return;
        }
    };
    let connect_id = rand::rng().random_range(1..=i64::MAX);
    if send
        .send_data(encode(&dial_opened(random, connect_id)), false)
        .is_err()
    {
        tracing::debug!(id = %established.id(), "konnectivity client left before the dial's answer");
        return;
    }
    let shared = Arc::new(LegState::default());
    let from_client = FromClient {
        reader,
        connect_id,
        shared: shared.clone(),
        id: established.id(),
        peer: peer.remote_addr,
    };
    let to_client = ToClient {
        send,
        connect_id,
        shared,
        grace: None,
    };
    established.splice(from_client, to_client).await;
}

/// The dial's protocol: TCP, the only one the Go client sends.
fn protocol(protocol: &str) -> Result<(), tunnel_proto::error::TunnelError> {
    if protocol.is_empty() || protocol.eq_ignore_ascii_case("tcp") {
        Ok(())
    } else {
        Err(tunnel_proto::error::TunnelError::new(
            tunnel_proto::error::ErrorCode::BadRequest,
            format!("protocol {protocol:?} is not supported; only tcp is"),
        ))
    }
}

/// A packet type's name, for messages.
fn packet_name(r#type: i32) -> String {
    PacketType::try_from(r#type).map_or_else(
        |_| format!("packet type {type}", type = r#type),
        |t| t.as_str_name().to_owned(),
    )
}

/// What the client did while its dial ran.
enum DuringDial {
    /// The stream was reset: the client left.
    Gone,
    /// DIAL_CLS: the client gave the dial up.
    Abandoned,
    /// A packet that has no place before the dial's answer.
    Violation(Status),
}

/// Completes when the client does anything while its dial `random` runs:
/// nothing it may send then but DIAL_CLS. A request stream that ends
/// cleanly is no news: the connection starts with its FIN.
async fn watch_dial(reader: &mut MessageReader, random: i64) -> DuringDial {
    match reader.next_packet().await {
        Ok(None) => std::future::pending().await,
        Err(ReadError::Reset(_)) => DuringDial::Gone,
        Err(err) => DuringDial::Violation(err.status()),
        Ok(Some(packet)) => match packet.payload {
            Some(Payload::CloseDial(c)) if c.random == random => DuringDial::Abandoned,
            Some(Payload::Data(_)) => DuringDial::Violation(Status::invalid_argument(
                "DATA before the dial was answered (DIAL_RSP)",
            )),
            _ => DuringDial::Violation(Status::invalid_argument(format!(
                "{} while the dial is pending",
                packet_name(packet.r#type)
            ))),
        },
    }
}

/// What the two directions of one konnectivity connection share.
#[derive(Default)]
struct LegState {
    /// The client sent CLOSE_REQ.
    close_requested: AtomicBool,
    /// The stream was ended towards the client (CLOSE_RSP, trailers or a reset).
    ended: AtomicBool,
    /// The sink's task, woken when the client asks to close.
    waker: AtomicWaker,
    /// Why the client's packets were refused: the stream ends with it.
    violation: Mutex<Option<Status>>,
}

/// The client's packets, as the bytes of the connection.
struct FromClient {
    reader: MessageReader,
    connect_id: i64,
    shared: Arc<LegState>,
    id: uuid::Uuid,
    peer: SocketAddr,
}

impl FromClient {
    /// Refuses the client's packets with `status`: logged, and the stream ends with it.
    fn violation(&self, status: Status) -> LegAborted {
        tracing::warn!(id = %self.id, peer = %self.peer, reason = status.message(), "konnectivity protocol violation; connection reset");
        if let Ok(mut v) = self.shared.violation.lock() {
            *v = Some(status);
        }
        LegAborted
    }
}

impl SpliceSource for FromClient {
    async fn next_data(&mut self, stop: &CancellationToken) -> Result<Option<Bytes>, LegAborted> {
        loop {
            let packet = tokio::select! {
                biased;
                () = stop.cancelled() => return Err(LegAborted),
                p = self.reader.next_packet() => p,
            };
            let packet = match packet {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(None),
                // The client leaves once it has our CLOSE_RSP: its end, not an abort.
                Err(ReadError::Reset(_)) if self.shared.ended.load(Ordering::Acquire) => {
                    return Ok(None);
                }
                Err(ReadError::Reset(err)) => {
                    tracing::debug!(id = %self.id, %err, "konnectivity stream reset by the client");
                    return Err(LegAborted);
                }
                Err(err) => return Err(self.violation(err.status())),
            };
            let ours = self.connect_id;
            return match packet.payload {
                Some(Payload::Data(d)) if d.connect_id == ours => {
                    if d.data.is_empty() {
                        continue;
                    }
                    Ok(Some(d.data))
                }
                Some(Payload::CloseRequest(c)) if c.connect_id == ours => {
                    self.shared.close_requested.store(true, Ordering::Release);
                    self.shared.waker.wake();
                    Ok(None)
                }
                Some(Payload::Data(d)) => Err(self.violation(Status::invalid_argument(format!(
                    "DATA for connection {} on the stream of connection {ours}",
                    d.connect_id
                )))),
                Some(Payload::CloseRequest(c)) => {
                    Err(self.violation(Status::invalid_argument(format!(
                        "CLOSE_REQ for connection {} on the stream of connection {ours}",
                        c.connect_id
                    ))))
                }
                Some(Payload::CloseDial(_)) => {
                    tracing::debug!(id = %self.id, "the konnectivity client gave its dial up after the answer; connection reset");
                    Err(LegAborted)
                }
                Some(Payload::DialRequest(_)) => Err(self.violation(Status::invalid_argument(
                    "one connection per stream: DIAL_REQ after the dial was answered",
                ))),
                _ => Err(self.violation(Status::invalid_argument(format!(
                    "{} is no packet a client sends on an open connection",
                    packet_name(packet.r#type)
                )))),
            };
        }
    }

    fn handed_on(&mut self, _n: usize) {
        // The reader gives the window back when it is asked for more.
    }
}

/// The connection's bytes towards the client, as DATA packets.
struct ToClient {
    send: SendStream<Bytes>,
    connect_id: i64,
    shared: Arc<LegState>,
    /// Runs from the client's CLOSE_REQ until the destination must have closed.
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ToClient {
    /// CLOSE_RSP and the end of the stream, once.
    fn close(&mut self) {
        if self.shared.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.send.send_data(encode(&closed(self.connect_id)), false);
        let _ = self.send.send_trailers(trailers(&Status::ok("")));
    }
}

impl SpliceSink for ToClient {
    async fn send(&mut self, data: Bytes, stop: &CancellationToken) -> Result<(), LegAborted> {
        // The Go client takes a DATA packet with no bytes for the end of
        // the connection: an empty buffer (a bare END_STREAM frame from the
        // agent leg) is never sent as one.
        if data.is_empty() {
            return Ok(());
        }
        if self.shared.close_requested.load(Ordering::Acquire) {
            tracing::debug!(
                "the destination sent data after the client's CLOSE_REQ; connection reset"
            );
            return Err(LegAborted);
        }
        let prefix = data_prefix(self.connect_id, data.len());
        send_all(&mut self.send, prefix, stop)
            .await
            .map_err(|()| LegAborted)?;
        send_all(&mut self.send, data, stop)
            .await
            .map_err(|()| LegAborted)
    }

    async fn finish(&mut self) -> Result<(), LegAborted> {
        self.close();
        Ok(())
    }

    fn poll_aborted(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.waker.register(cx.waker());
        if self.grace.is_none() && self.shared.close_requested.load(Ordering::Acquire) {
            self.close();
            self.grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
        }
        if let Some(grace) = &mut self.grace {
            return grace.as_mut().poll(cx).map(|()| {
                tracing::info!(
                    grace = ?CLOSE_GRACE,
                    "the destination did not close after the client's CLOSE_REQ; connection reset"
                );
            });
        }
        if self.shared.ended.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.send.poll_reset(cx).map(|_| ())
    }

    fn abort(&mut self) {
        if self.shared.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        let violation = self.shared.violation.lock().ok().and_then(|mut v| v.take());
        match violation {
            Some(status) => {
                let _ = self.send.send_trailers(trailers(&status));
            }
            None => self.send.send_reset(Reason::CANCEL),
        }
    }
}
