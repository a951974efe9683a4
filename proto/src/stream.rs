//! The tunnel stream: how one proxied connection is opened and answered.
//!
//! Every proxied TCP connection is one HTTP/2 stream on each leg, opened by
//! an HTTP/2 `CONNECT` request (the shape of Istio's HBONE):
//!
//! | request header | meaning |
//! | --- | --- |
//! | `:authority` | the destination, `host:port` (`[v6]:port`) |
//! | `tunnel-cluster` | the managed cluster |
//! | `tunnel-id` | a 128-bit connection id chosen by the opener (UUID v4): unique without coordination |
//! | `tunnel-dial-timeout-ms` | optional: how long the agent may take to reach the destination |
//! | `authorization` | optional, client leg: `Bearer <service-account token>` |
//!
//! The answer is the response's headers: `200` with `tunnel-agent` (the
//! agent that dialed) and `tunnel-peer` (the address it reached) means
//! opened; anything else carries `tunnel-error` (an [`ErrorCode`] label;
//! callers branch on it, never on text) and `tunnel-message`, and ends the
//! stream. Then DATA frames carry the bytes both ways; END_STREAM is a
//! half-close (TCP FIN) of one direction, RST_STREAM an abort (TCP RST) of
//! both.
//!
//! An agent that says so in its hello (`acknowledges_opens`) first answers
//! every open with an informational `100` response, as soon as it has read
//! it and before it dials; the server waits for that acknowledgement only a
//! short time ([`open_acknowledged`]). No acknowledgement in time means the
//! agent is not answering (frozen, partitioned): the stream is reset, and an
//! agent that reads it later finds the reset before it dials, so the open can
//! go to another agent without reaching the destination twice. No payload is framed, decoded or copied on the way: a hop hands the
//! received DATA buffers to the next hop as they are.

use std::future::Future as _;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::error::{ErrorCode, TunnelError};
use crate::h2::{BudgetExhausted, H2Client};
use crate::relay::TunnelStream;

/// The managed cluster of a connection.
pub const CLUSTER_HEADER: &str = "tunnel-cluster";
/// The connection id.
pub const ID_HEADER: &str = "tunnel-id";
/// The dial timeout the opener allows, in milliseconds.
pub const DIAL_TIMEOUT_HEADER: &str = "tunnel-dial-timeout-ms";
/// The agent that dialed the destination.
pub const AGENT_HEADER: &str = "tunnel-agent";
/// The address the agent reached.
pub const PEER_HEADER: &str = "tunnel-peer";
/// The error code's label.
pub const ERROR_HEADER: &str = "tunnel-error";
/// The error's message.
pub const MESSAGE_HEADER: &str = "tunnel-message";

/// The informational status an agent acknowledges an open with.
pub const ACK_STATUS: StatusCode = StatusCode::CONTINUE;

/// The acknowledgement of an open (see the module's documentation).
pub fn ack_response() -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = ACK_STATUS;
    resp
}

/// What an opener asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The connection id.
    pub id: uuid::Uuid,
    /// The managed cluster.
    pub cluster: String,
    /// Destination host (name or IP address) inside the cluster.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// How long the agent may take to reach the destination (`None`: its default).
    pub dial_timeout: Option<Duration>,
}

impl Open {
    /// An open with a fresh connection id.
    pub fn new(cluster: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Self {
            id: uuid::Uuid::new_v4(),
            cluster: cluster.into(),
            host: host.into(),
            port,
            dial_timeout: None,
        }
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn destination(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `CONNECT` request that opens this connection.
    pub fn to_request(&self, bearer: Option<&str>) -> Result<Request<()>, TunnelError> {
        let bad = |what: &str| TunnelError::new(ErrorCode::BadRequest, what.to_owned());
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.destination())
            .body(())
            .map_err(|e| bad(&format!("invalid destination {}: {e}", self.destination())))?;
        let h = req.headers_mut();
        h.insert(
            CLUSTER_HEADER,
            HeaderValue::from_str(&self.cluster)
                .map_err(|_| bad(&format!("invalid cluster name {:?}", self.cluster)))?,
        );
        h.insert(
            ID_HEADER,
            HeaderValue::from_str(&self.id.to_string()).expect("a uuid is a header value"),
        );
        if let Some(t) = self.dial_timeout {
            h.insert(
                DIAL_TIMEOUT_HEADER,
                HeaderValue::from(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        if let Some(token) = bearer {
            let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                TunnelError::new(
                    ErrorCode::Unauthenticated,
                    "the token holds characters a header cannot carry",
                )
            })?;
            v.set_sensitive(true);
            h.insert(http::header::AUTHORIZATION, v);
        }
        Ok(req)
    }

    /// Reads and validates the open a `CONNECT` request carries.
    pub fn from_request<B>(req: &Request<B>) -> Result<Self, TunnelError> {
        let bad = |msg: String| TunnelError::new(ErrorCode::BadRequest, msg);
        if req.method() != Method::CONNECT {
            return Err(bad(format!(
                "a tunnel stream opens with CONNECT, not {}",
                req.method()
            )));
        }
        let authority = req
            .uri()
            .authority()
            .ok_or_else(|| bad("CONNECT without a destination (:authority)".into()))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.len() > 253 {
            return Err(bad(format!("invalid destination host {host:?}")));
        }
        let port = authority
            .port_u16()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("invalid destination port in {authority}")))?;
        let headers = req.headers();
        let cluster = header_str(headers, CLUSTER_HEADER)
            .ok_or_else(|| bad(format!("no {CLUSTER_HEADER} header")))?;
        tunnel_identity::spiffe::validate_cluster_name(cluster)
            .map_err(|e| bad(format!("cluster: {e}")))?;
        let id = header_str(headers, ID_HEADER)
            .and_then(|v| uuid::Uuid::parse_str(v).ok())
            .ok_or_else(|| bad(format!("{ID_HEADER} must be a UUID")))?;
        let dial_timeout = match header_str(headers, DIAL_TIMEOUT_HEADER) {
            None => None,
            Some(v) => Some(Duration::from_millis(v.parse().map_err(|_| {
                bad(format!(
                    "{DIAL_TIMEOUT_HEADER} must be milliseconds, got {v:?}"
                ))
            })?)),
        };
        Ok(Self {
            id,
            cluster: cluster.to_owned(),
            host: host.to_owned(),
            port,
            dial_timeout,
        })
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The answer of a far end that reached the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    /// The agent that dialed the destination.
    pub agent_id: String,
    /// The address the agent connected to, e.g. `10.0.0.1:443`.
    pub peer: String,
}

/// A header value from free text: what a header cannot carry becomes `?`.
fn text_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .take(1024)
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

/// The response that says "opened".
pub fn opened_response(opened: &Opened) -> Response<()> {
    let mut resp = Response::new(());
    resp.headers_mut()
        .insert(AGENT_HEADER, text_value(&opened.agent_id));
    resp.headers_mut()
        .insert(PEER_HEADER, text_value(&opened.peer));
    resp
}

/// The response that refuses a connection with `err`.
pub fn error_response(err: &TunnelError) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() =
        StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(err.code.label()));
    resp.headers_mut()
        .insert(MESSAGE_HEADER, text_value(&err.message));
    resp
}

/// Reads a far end's answer.
pub fn read_answer<B>(resp: &Response<B>) -> Result<Opened, TunnelError> {
    let headers = resp.headers();
    if resp.status() == StatusCode::OK {
        return Ok(Opened {
            agent_id: header_str(headers, AGENT_HEADER).unwrap_or_default().into(),
            peer: header_str(headers, PEER_HEADER).unwrap_or_default().into(),
        });
    }
    let message = header_str(headers, MESSAGE_HEADER).unwrap_or("");
    Err(match header_str(headers, ERROR_HEADER) {
        Some(label) => TunnelError::from_wire(label, message),
        None => TunnelError::new(
            ErrorCode::Internal,
            format!(
                "the far end answered {} without an error code",
                resp.status()
            ),
        ),
    })
}

/// Why [`open_on`] did not give a stream.
#[derive(Debug)]
pub enum OpenFailure {
    /// The connection has no room for another stream.
    Full(BudgetExhausted),
    /// The connection refused a new stream (GOAWAY, broken); it is marked
    /// broken, so no new streams go there.
    Connection(::h2::Error),
    /// The stream failed before its answer; the connection may be fine.
    Answer(::h2::Error),
    /// The far end answered with an error.
    Refused(TunnelError),
    /// The far end did not acknowledge the open within this time (see
    /// [`open_acknowledged`]); the stream was reset.
    NotAcknowledged(Duration),
}

impl OpenFailure {
    /// Whether the far end certainly did not act on the stream: the
    /// connection refused it (GOAWAY before it was read, `REFUSED_STREAM`) or
    /// it could not be sent. Opening it elsewhere reaches no destination twice.
    pub fn was_not_processed(&self) -> bool {
        match self {
            OpenFailure::Full(_) | OpenFailure::Connection(_) => true,
            OpenFailure::Answer(e) => {
                e.reason() == Some(::h2::Reason::REFUSED_STREAM)
                    || (e.is_go_away() && e.is_remote())
            }
            OpenFailure::Refused(_) | OpenFailure::NotAcknowledged(_) => false,
        }
    }
}

/// Opens a tunnel stream on `ch` with `request` (a `CONNECT` from
/// [`Open::to_request`]) and reads the far end's answer.
pub async fn open_on(
    ch: &H2Client,
    request: Request<()>,
) -> Result<(Opened, TunnelStream), OpenFailure> {
    open_with(ch, request, None).await
}

/// Like [`open_on`], for a far end that acknowledges opens; `acked` is called
/// when the acknowledgement (or the answer itself) arrives. With `within`,
/// fails with [`OpenFailure::NotAcknowledged`] (and resets the stream) unless
/// the acknowledgement arrives `within` this time from the call; the
/// deadline moves on by `within` while the connection keeps receiving DATA
/// (a busy connection delays the acknowledgement behind other streams' data,
/// a frozen peer sends nothing), up to [`MAX_ACK_EXTENSIONS`] times. Without
/// `within`, the acknowledgement is awaited as long as the answer. The answer
/// that follows has no deadline here.
pub async fn open_acknowledged(
    ch: &H2Client,
    request: Request<()>,
    within: Option<Duration>,
    acked: impl FnOnce() + Send,
) -> Result<(Opened, TunnelStream), OpenFailure> {
    open_with(ch, request, Some((within, Box::new(acked)))).await
}

/// How many times [`open_acknowledged`] extends its deadline for a
/// connection that keeps receiving data.
pub const MAX_ACK_EXTENSIONS: u32 = 9;

type AckWait<'a> = (Option<Duration>, Box<dyn FnOnce() + Send + 'a>);

/// The acknowledgement deadline of one open, extended while the connection
/// receives data.
struct AckDeadline<'c> {
    ch: &'c H2Client,
    within: Duration,
    at: tokio::time::Instant,
    received: u64,
    extensions: u32,
}

impl<'c> AckDeadline<'c> {
    fn new(ch: &'c H2Client, within: Duration) -> Self {
        Self {
            ch,
            within,
            at: tokio::time::Instant::now() + within,
            received: ch.conn().received_bytes(),
            extensions: 0,
        }
    }

    /// The deadline passed: moves it on if the connection received data
    /// since the last check (and extensions remain); `false`: it is over.
    fn extend(&mut self) -> bool {
        let received = self.ch.conn().received_bytes();
        if received == self.received || self.extensions >= MAX_ACK_EXTENSIONS {
            return false;
        }
        self.received = received;
        self.extensions += 1;
        self.at = tokio::time::Instant::now() + self.within;
        true
    }
}

async fn open_with(
    ch: &H2Client,
    request: Request<()>,
    ack: Option<AckWait<'_>>,
) -> Result<(Opened, TunnelStream), OpenFailure> {
    let within = ack.as_ref().and_then(|(within, _)| *within);
    let mut deadline = within.map(|w| AckDeadline::new(ch, w));
    let not_acked = || OpenFailure::NotAcknowledged(within.unwrap_or_default());
    let guard = ch.stream_slot().map_err(OpenFailure::Full)?;
    let unusable = |e: ::h2::Error| {
        ch.mark_broken();
        OpenFailure::Connection(e)
    };
    // A peer that stopped reading may never make room for another stream.
    let mut ready = std::pin::pin!(ch.sender().ready());
    let mut send = loop {
        match &mut deadline {
            Some(d) => match tokio::time::timeout_at(d.at, ready.as_mut()).await {
                Ok(r) => break r,
                Err(_) if d.extend() => {}
                Err(_) => return Err(not_acked()),
            },
            None => break ready.as_mut().await,
        }
    }
    .map_err(unusable)?;
    let (mut response, stream) = send.send_request(request, false).map_err(unusable)?;
    let response = match ack {
        Some((_, acked)) => {
            let mut acked = Some(acked);
            let mut sleep = std::pin::pin!(tokio::time::sleep_until(
                deadline
                    .as_ref()
                    .map_or_else(tokio::time::Instant::now, |d| d.at)
            ));
            std::future::poll_fn(|cx| {
                use std::task::Poll;
                if acked.is_some() {
                    match response.poll_informational(cx) {
                        Poll::Ready(Some(Ok(_))) => {
                            if let Some(f) = acked.take() {
                                f();
                            }
                        }
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Err(OpenFailure::Answer(e)));
                        }
                        Poll::Ready(None) | Poll::Pending => {}
                    }
                }
                match std::pin::Pin::new(&mut response).poll(cx) {
                    Poll::Ready(Ok(r)) => {
                        // An answer is an acknowledgement too.
                        if let Some(f) = acked.take() {
                            f();
                        }
                        return Poll::Ready(Ok(r));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(OpenFailure::Answer(e))),
                    Poll::Pending => {}
                }
                if acked.is_some()
                    && let Some(d) = deadline.as_mut()
                {
                    while sleep.as_mut().poll(cx).is_ready() {
                        if !d.extend() {
                            // Dropping the response and the stream resets it.
                            return Poll::Ready(Err(not_acked()));
                        }
                        sleep.as_mut().reset(d.at);
                    }
                }
                Poll::Pending
            })
            .await?
        }
        None => response.await.map_err(OpenFailure::Answer)?,
    };
    let opened = read_answer(&response).map_err(OpenFailure::Refused)?;
    Ok((
        opened,
        TunnelStream::new(stream, response.into_body(), guard),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_survives_its_request() {
        let mut open = Open::new("east", "kubernetes.default.svc", 443);
        open.dial_timeout = Some(Duration::from_millis(1500));
        let req = open.to_request(Some("tok")).unwrap();
        assert_eq!(req.uri().to_string(), "kubernetes.default.svc:443");
        assert_eq!(req.headers()["authorization"], "Bearer tok");
        assert_eq!(Open::from_request(&req).unwrap(), open);
        let v6 = Open::new("east", "fd00::1", 8080);
        let req = v6.to_request(None).unwrap();
        assert_eq!(Open::from_request(&req).unwrap(), v6);
    }

    #[test]
    fn bad_opens_are_refused_field_by_field() {
        let ok = Open::new("east", "a", 1).to_request(None).unwrap();
        let mut no_cluster = ok.clone_parts();
        no_cluster.headers_mut().remove(CLUSTER_HEADER);
        let e = Open::from_request(&no_cluster).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains(CLUSTER_HEADER), "{e}");
        let mut bad_cluster = ok.clone_parts();
        bad_cluster
            .headers_mut()
            .insert(CLUSTER_HEADER, HeaderValue::from_static("East!"));
        assert!(
            Open::from_request(&bad_cluster)
                .unwrap_err()
                .message
                .starts_with("cluster")
        );
        let mut bad_id = ok.clone_parts();
        bad_id
            .headers_mut()
            .insert(ID_HEADER, HeaderValue::from_static("7"));
        assert!(
            Open::from_request(&bad_id)
                .unwrap_err()
                .message
                .contains("UUID")
        );
        let mut port0 = ok.clone_parts();
        *port0.uri_mut() = "a:0".parse().unwrap();
        assert!(
            Open::from_request(&port0)
                .unwrap_err()
                .message
                .contains("port")
        );
        let mut get = ok.clone_parts();
        *get.method_mut() = Method::GET;
        assert!(
            Open::from_request(&get)
                .unwrap_err()
                .message
                .contains("CONNECT")
        );
    }

    #[test]
    fn answers_carry_every_code_and_clean_messages() {
        let opened = Opened {
            agent_id: "east-1".into(),
            peer: "10.0.0.1:443".into(),
        };
        assert_eq!(read_answer(&opened_response(&opened)).unwrap(), opened);
        for code in ErrorCode::ALL {
            let err = TunnelError::new(code, "no way\nthrough ✗");
            let got = read_answer(&error_response(&err)).unwrap_err();
            assert_eq!(got.code, code);
            assert_eq!(got.message, "no way?through ?");
        }
    }

    trait CloneParts {
        fn clone_parts(&self) -> Request<()>;
    }

    impl CloneParts for Request<()> {
        fn clone_parts(&self) -> Request<()> {
            let mut r = Request::new(());
            *r.method_mut() = self.method().clone();
            *r.uri_mut() = self.uri().clone();
            *r.headers_mut() = self.headers().clone();
            r
        }
    }
}
