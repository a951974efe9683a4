//! The client-facing `Tunnel` service: routes each connection to an agent of
//! its cluster and splices the two streams.
//!
//! The server never touches a TCP socket for a proxied connection: it passes
//! the client's stream to the agent as the request body and the agent's
//! response stream back as the response body, so HTTP/2 flow control runs end
//! to end and a connection costs no task of its own here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::identity::Identity;
use tunnel_proto::pb::agent_client::AgentClient;
use tunnel_proto::pb::{self, Frame, frame::Kind, tunnel_server::Tunnel};
use tunnel_proto::relay::{ByteCounter, GateOpener, gated};

use std::collections::BTreeMap;

use tokio::sync::watch;

use crate::ServerState;
use crate::metrics::{BytesLabel, CodeLabel, DecisionLabel, ResultLabel};
use crate::policy::{Access, Decision};
use crate::pool::{AgentPool, AgentTunnel, Pick};

/// Tracing target of the audit log: one line per decision, one per closed connection.
pub const AUDIT_TARGET: &str = "tunnel_server::audit";

/// How long a client may take to send its `Open` frame.
pub const OPEN_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time the server waits beyond the dial timeout it gave the agent.
pub(crate) const AGENT_ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The `Tunnel` gRPC service.
#[derive(Clone)]
pub struct TunnelService {
    state: Arc<ServerState>,
}

impl TunnelService {
    /// The service over the server's shared state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

/// One proxied connection's record: counted while it lives, logged and
/// measured once when both directions are done (on drop).
struct ConnRecord {
    state: Arc<ServerState>,
    id: uuid::Uuid,
    /// Who the connection is for: the token's service account, else the certificate's identity.
    subject: String,
    /// The identity in the caller's certificate.
    certificate: String,
    cluster: String,
    destination: String,
    /// The rule that allowed the connection (`authorization-off` without a policy).
    rule: std::sync::Mutex<String>,
    agent_id: std::sync::Mutex<String>,
    start: Instant,
    to_cluster: ByteCounter,
    from_cluster: ByteCounter,
    to_cluster_eof: AtomicBool,
    from_cluster_eof: AtomicBool,
    /// 0 = no error; else an `ErrorCode` value.
    error: AtomicU8,
    counted_open: AtomicBool,
}

impl ConnRecord {
    fn fail(&self, err: &TunnelError) {
        self.error.store(err.code as i32 as u8, Ordering::Relaxed);
    }

    fn result(&self) -> &'static str {
        match ErrorCode::try_from(i32::from(self.error.load(Ordering::Relaxed))) {
            Ok(ErrorCode::Unspecified) | Err(_) => {
                if self.to_cluster_eof.load(Ordering::Relaxed)
                    && self.from_cluster_eof.load(Ordering::Relaxed)
                {
                    "ok"
                } else {
                    "aborted"
                }
            }
            Ok(code) => code.label(),
        }
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let m = &self.state.metrics;
        if self.counted_open.load(Ordering::Relaxed) {
            m.open_connections.dec();
            self.state.connection_closed();
        }
        let up = self.to_cluster.get();
        let down = self.from_cluster.get();
        if up > 0 {
            m.bytes
                .get_or_create(&BytesLabel {
                    cluster: self.cluster.clone(),
                    direction: "to_cluster",
                })
                .inc_by(up);
        }
        if down > 0 {
            m.bytes
                .get_or_create(&BytesLabel {
                    cluster: self.cluster.clone(),
                    direction: "from_cluster",
                })
                .inc_by(down);
        }
        let agent = self.agent_id.lock().map(|a| a.clone()).unwrap_or_default();
        let rule = self.rule.lock().map(|r| r.clone()).unwrap_or_default();
        tracing::info!(
            target: AUDIT_TARGET,
            event = "close",
            id = %self.id,
            subject = %self.subject,
            certificate = %self.certificate,
            rule = %rule,
            cluster = %self.cluster,
            destination = %self.destination,
            agent = %agent,
            bytes_to_cluster = up,
            bytes_from_cluster = down,
            duration_ms = self.start.elapsed().as_millis() as u64,
            result = self.result(),
            "connection closed"
        );
    }
}

/// The client's frames on their way to the agent: data counted, the stream
/// ended (without eof, an abort) if the client's stream fails.
struct ToCluster {
    inner: Streaming<Frame>,
    record: Arc<ConnRecord>,
}

impl Stream for ToCluster {
    type Item = Frame;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        match futures_util::ready!(self.inner.poll_next_unpin(cx)) {
            Some(Ok(frame)) => {
                match &frame.kind {
                    Some(Kind::Data(d)) => self.record.to_cluster.add(d.len() as u64),
                    Some(Kind::Eof(_)) => self.record.to_cluster_eof.store(true, Ordering::Relaxed),
                    _ => {}
                }
                Poll::Ready(Some(frame))
            }
            Some(Err(status)) => {
                tracing::debug!(id = %self.record.id, %status, "client stream failed");
                Poll::Ready(None)
            }
            None => Poll::Ready(None),
        }
    }
}

/// The agent's frames on their way back to the client, counted.
struct FromCluster {
    inner: Streaming<Frame>,
    record: Arc<ConnRecord>,
}

impl Stream for FromCluster {
    type Item = Result<Frame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = futures_util::ready!(self.inner.poll_next_unpin(cx));
        if let Some(Ok(frame)) = &item {
            match &frame.kind {
                Some(Kind::Data(d)) => self.record.from_cluster.add(d.len() as u64),
                Some(Kind::Eof(_)) => self.record.from_cluster_eof.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
        Poll::Ready(item)
    }
}

fn single(frame: Frame) -> FrameStream {
    Box::pin(futures_util::stream::once(async move { Ok(frame) }))
}

fn caller(req: &Request<Streaming<Frame>>) -> String {
    match req.extensions().get::<Arc<tunnel_proto::h2::PeerInfo>>() {
        Some(peer) => peer.identity.to_string(),
        None => "unknown".into(),
    }
}

/// Checks an `Open` frame's fields.
fn validate_open(open: &pb::Open) -> Result<(uuid::Uuid, u16), TunnelError> {
    let id = uuid::Uuid::from_slice(&open.connection_id).map_err(|_| {
        TunnelError::new(
            ErrorCode::BadRequest,
            format!(
                "connection_id must be 16 bytes, got {}",
                open.connection_id.len()
            ),
        )
    })?;
    tunnel_proto::identity::validate_cluster_name(&open.cluster)
        .map_err(|e| TunnelError::new(ErrorCode::BadRequest, format!("cluster: {e}")))?;
    if open.host.is_empty()
        || open.host.len() > 253
        || open
            .host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(TunnelError::new(
            ErrorCode::BadRequest,
            format!("invalid destination host {:?}", open.host),
        ));
    }
    let port = u16::try_from(open.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            TunnelError::new(
                ErrorCode::BadRequest,
                format!("invalid destination port {}", open.port),
            )
        })?;
    Ok((id, port))
}

/// What [`route`] hands back: the agent's `Opened` frame, the agent's
/// stream after it, the gate through which the caller's stream goes on, and
/// the agent.
pub(crate) type Routed<S> = (Frame, Streaming<Frame>, GateOpener<S>, Arc<AgentTunnel>);

/// Opens the connection `open` on an agent of its cluster, retrying others
/// while the failure happened before the destination answered. `on_pick` is
/// told each agent tried. Used for clients' connections and the server's own
/// probes ([`crate::probes`]); counts nothing.
pub(crate) async fn route<S>(
    pool: &AgentPool,
    open: &pb::Open,
    mut on_pick: impl FnMut(&AgentTunnel),
) -> Result<Routed<S>, TunnelError>
where
    S: Stream<Item = Frame> + Unpin + Send + 'static,
{
    let mut tried: Vec<Arc<AgentTunnel>> = Vec::new();
    let mut last_err: Option<TunnelError> = None;
    loop {
        let agent = match pool.pick(&open.cluster, &tried) {
            Pick::Agent(a) => a,
            Pick::UnknownCluster => {
                return Err(TunnelError::new(
                    ErrorCode::UnknownCluster,
                    format!("cluster {:?} is not known to this server", open.cluster),
                ));
            }
            Pick::NoAgent => {
                return Err(last_err.unwrap_or_else(|| {
                    TunnelError::new(
                        ErrorCode::NoAgent,
                        format!("no agent of cluster {:?} is connected", open.cluster),
                    )
                }));
            }
        };
        tried.push(agent.clone());
        on_pick(&agent);
        let frame = Frame {
            kind: Some(Kind::Open(open.clone())),
        };
        let (request, gate) = gated::<S>(frame);
        let mut client = AgentClient::with_origin(
            agent.channel.clone(),
            http::Uri::from_static("https://cluster-tunnel.agent"),
        )
        .max_decoding_message_size(tunnel_proto::MAX_MESSAGE_BYTES);
        let answer = async {
            let mut inbound = client
                .dial(request)
                .await
                .map_err(|s| tunnel_broken(&agent, &s))?
                .into_inner();
            match inbound.message().await {
                Ok(Some(
                    f @ Frame {
                        kind: Some(Kind::Opened(_)),
                    },
                )) => Ok((f, inbound)),
                Ok(Some(Frame {
                    kind: Some(Kind::Error(e)),
                })) => Err(TunnelError::from_pb(&e)),
                Ok(Some(_)) => Err(TunnelError::new(
                    ErrorCode::Internal,
                    "agent answered out of protocol",
                )),
                Ok(None) => Err(TunnelError::new(
                    ErrorCode::TunnelBroken,
                    "agent closed the stream without an answer",
                )),
                Err(s) => Err(tunnel_broken(&agent, &s)),
            }
        }
        .await;
        match answer {
            Ok((opened, inbound)) => return Ok((opened, inbound, gate, agent)),
            Err(err) if err.code.is_retryable_on_other_agent() => {
                agent.mark_failed();
                let id = uuid::Uuid::from_slice(&open.connection_id).unwrap_or_default();
                tracing::warn!(%id, agent = %agent.agent_id, cluster = %open.cluster, %err, "agent failed before the destination answered; trying another");
                last_err = Some(err);
            }
            Err(err) => return Err(err),
        }
    }
}

fn tunnel_broken(agent: &AgentTunnel, status: &Status) -> TunnelError {
    TunnelError::new(
        ErrorCode::TunnelBroken,
        format!(
            "tunnel to agent {} failed: {}",
            agent.agent_id,
            status.message()
        ),
    )
}

/// Checks the caller and reads and validates its `Open` frame. A refusal is
/// `Err(Ok(error))`, to be answered with an `Error` frame; a broken stream is
/// `Err(Err(status))`.
async fn read_open(
    req: Request<Streaming<Frame>>,
) -> Result<(pb::Open, Streaming<Frame>, uuid::Uuid, u16), Result<TunnelError, Status>> {
    if let Some(peer) = req.extensions().get::<Arc<tunnel_proto::h2::PeerInfo>>()
        && !peer.identity.is_caller()
    {
        return Err(Ok(TunnelError::new(
            ErrorCode::Unauthenticated,
            format!("{} may not open connections", peer.identity),
        )));
    }
    let mut inbound = req.into_inner();
    let open = match tokio::time::timeout(OPEN_FRAME_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(Frame {
            kind: Some(Kind::Open(open)),
        }))) => open,
        Ok(Ok(other)) => {
            return Err(Ok(TunnelError::new(
                ErrorCode::BadRequest,
                format!(
                    "the first frame must be open, got {}",
                    other
                        .as_ref()
                        .and_then(|f| f.kind.as_ref())
                        .map(tunnel_proto::relay::kind_name)
                        .unwrap_or("nothing")
                ),
            )));
        }
        Ok(Err(status)) => return Err(Err(status)),
        Err(_) => {
            return Err(Ok(TunnelError::new(
                ErrorCode::BadRequest,
                format!("no open frame within {OPEN_FRAME_TIMEOUT:?}"),
            )));
        }
    };
    let (id, port) = validate_open(&open).map_err(Ok)?;
    Ok((open, inbound, id, port))
}

impl TunnelService {
    fn count_dial(&self, code: ErrorCode) {
        self.state
            .metrics
            .dials
            .get_or_create(&CodeLabel { code: code.label() })
            .inc();
    }

    /// Fails `record` with `err` and counts it.
    fn refuse(&self, record: &ConnRecord, err: &TunnelError, decision: &'static str) {
        record.fail(err);
        self.count_dial(err.code);
        self.state
            .metrics
            .decisions
            .get_or_create(&DecisionLabel { decision })
            .inc();
    }

    /// The subject of a call: a token's service account when a token was
    /// sent (and the server checks tokens), else the certificate's identity.
    async fn authenticate(
        &self,
        certificate: Option<Identity>,
        token: Result<Option<String>, TunnelError>,
    ) -> Result<Identity, TunnelError> {
        let unknown = || {
            TunnelError::new(
                ErrorCode::Unauthenticated,
                "the caller's certificate names no identity",
            )
        };
        let Some(reviewer) = &self.state.token_reviewer else {
            return certificate.ok_or_else(unknown);
        };
        match token? {
            Some(token) => {
                let result = reviewer.authenticate(&token).await;
                let label = match &result {
                    Ok((_, crate::authn::ReviewSource::Cache)) => None,
                    Ok(_) => Some("authenticated"),
                    Err(e) if e.message.contains("fail closed") => Some("error"),
                    Err(_) => Some("rejected"),
                };
                if let Some(result) = label {
                    self.state
                        .metrics
                        .token_reviews
                        .get_or_create(&ResultLabel { result })
                        .inc();
                }
                result.map(|(id, _)| id)
            }
            None => certificate.ok_or_else(unknown),
        }
    }

    /// Checks the policy. Allowed: the future that completes if a policy
    /// change revokes the connection (with `--enforce-on-change`).
    fn authorize(
        &self,
        subject: &Identity,
        open: &pb::Open,
        port: u16,
        record: &Arc<ConnRecord>,
    ) -> Result<Option<Revoked>, TunnelError> {
        let Some(policy_rx) = &self.state.policy else {
            set_rule(record, "authorization-off");
            audit_decision(record, "allow", "authorization-off", None);
            return Ok(None);
        };
        let no_labels = BTreeMap::new();
        let labels = self
            .state
            .config
            .auth
            .cluster_labels
            .get(&open.cluster)
            .unwrap_or(&no_labels);
        let access = Access {
            subject,
            cluster: &open.cluster,
            cluster_labels: labels,
            host: &open.host,
            port,
        };
        let decision = policy_rx.borrow().decide(&access);
        if let Decision::Allow { rule } = &decision {
            set_rule(record, rule);
            audit_decision(record, "allow", rule, None);
            self.state
                .metrics
                .decisions
                .get_or_create(&DecisionLabel { decision: "allow" })
                .inc();
            if !self.state.config.auth.enforce_on_change {
                return Ok(None);
            }
            let owned = OwnedAccess {
                subject: subject.clone(),
                cluster: open.cluster.clone(),
                labels: labels.clone(),
                host: open.host.clone(),
                port,
            };
            return Ok(Some(Box::pin(revoked(
                policy_rx.clone(),
                owned,
                record.clone(),
            ))));
        }
        let err = TunnelError::new(
            ErrorCode::Forbidden,
            format!(
                "{subject} may not reach {} in cluster {:?}: no policy rule allows it",
                record.destination, open.cluster
            ),
        );
        audit_decision(record, "deny", decision.rule(), Some(&err));
        self.refuse(record, &err, "deny");
        Err(err)
    }
}

/// Completes when a policy change revokes a connection.
type Revoked = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

struct OwnedAccess {
    subject: Identity,
    cluster: String,
    labels: BTreeMap<String, String>,
    host: String,
    port: u16,
}

async fn revoked(
    mut rx: watch::Receiver<Arc<crate::policy::Policy>>,
    a: OwnedAccess,
    record: Arc<ConnRecord>,
) {
    loop {
        if rx.changed().await.is_err() {
            // The policy source is gone: nothing will change any more.
            return std::future::pending().await;
        }
        let decision = rx.borrow_and_update().decide(&Access {
            subject: &a.subject,
            cluster: &a.cluster,
            cluster_labels: &a.labels,
            host: &a.host,
            port: a.port,
        });
        match decision {
            Decision::Allow { rule } => set_rule(&record, &rule),
            Decision::Deny => {
                let err = TunnelError::new(
                    ErrorCode::Forbidden,
                    "the policy changed and no longer allows this connection",
                );
                tracing::info!(
                    target: AUDIT_TARGET,
                    event = "revoke",
                    id = %record.id,
                    subject = %record.subject,
                    cluster = %record.cluster,
                    destination = %record.destination,
                    decision = "deny",
                    rule = "default-deny",
                    "connection cut: the policy no longer allows it"
                );
                record.fail(&err);
                return;
            }
        }
    }
}

fn set_rule(record: &ConnRecord, rule: &str) {
    if let Ok(mut r) = record.rule.lock() {
        rule.clone_into(&mut r);
    }
}

/// The audit line of one decision.
fn audit_decision(record: &ConnRecord, decision: &str, rule: &str, err: Option<&TunnelError>) {
    let reason = err.map(|e| e.message.as_str()).unwrap_or("");
    if err.is_some() {
        tracing::warn!(
            target: AUDIT_TARGET,
            event = "decision",
            id = %record.id,
            subject = %record.subject,
            certificate = %record.certificate,
            cluster = %record.cluster,
            destination = %record.destination,
            decision,
            rule,
            reason,
            "connection refused"
        );
    } else {
        tracing::info!(
            target: AUDIT_TARGET,
            event = "decision",
            id = %record.id,
            subject = %record.subject,
            certificate = %record.certificate,
            cluster = %record.cluster,
            destination = %record.destination,
            decision,
            rule,
            "connection allowed"
        );
    }
}

#[tonic::async_trait]
impl Tunnel for TunnelService {
    type ConnectStream = FrameStream;

    async fn connect(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let client = caller(&req);
        let certificate = req
            .extensions()
            .get::<Arc<tunnel_proto::h2::PeerInfo>>()
            .map(|p| p.identity.clone());
        let token = crate::authn::bearer_token(req.metadata());
        let (open, inbound, id, port) = match read_open(req).await {
            Ok(x) => x,
            Err(Ok(err)) => {
                tracing::warn!(%client, code = err.code.label(), %err, "connection refused before routing");
                self.count_dial(err.code);
                return Ok(Response::new(single(err.to_frame())));
            }
            Err(Err(status)) => return Err(status),
        };
        let subject = self.authenticate(certificate, token).await;
        let record = Arc::new(ConnRecord {
            state: self.state.clone(),
            id,
            subject: match &subject {
                Ok(s) => s.to_string(),
                Err(_) => "unauthenticated".into(),
            },
            certificate: client,
            cluster: open.cluster.clone(),
            destination: if open.host.contains(':') {
                format!("[{}]:{port}", open.host)
            } else {
                format!("{}:{port}", open.host)
            },
            rule: std::sync::Mutex::new(String::new()),
            agent_id: std::sync::Mutex::new(String::new()),
            start: Instant::now(),
            to_cluster: ByteCounter::default(),
            from_cluster: ByteCounter::default(),
            to_cluster_eof: AtomicBool::new(false),
            from_cluster_eof: AtomicBool::new(false),
            error: AtomicU8::new(0),
            counted_open: AtomicBool::new(false),
        });
        let subject = match subject {
            Ok(s) => s,
            Err(err) => {
                audit_decision(&record, "unauthenticated", "-", Some(&err));
                self.refuse(&record, &err, "unauthenticated");
                return Ok(Response::new(single(err.to_frame())));
            }
        };
        if self.state.is_draining() {
            let err = TunnelError::new(
                ErrorCode::ServerDraining,
                "server is shutting down; retry on another replica",
            );
            record.fail(&err);
            self.count_dial(err.code);
            return Ok(Response::new(single(err.to_frame())));
        }
        let revoked = match self.authorize(&subject, &open, port, &record) {
            Ok(revoked) => revoked,
            Err(err) => return Ok(Response::new(single(err.to_frame()))),
        };
        record.counted_open.store(true, Ordering::Relaxed);
        self.state.connection_opened();
        self.state.metrics.open_connections.inc();

        let dial_timeout = match open.dial_timeout_ms {
            0 => self.state.config.dial_timeout,
            ms => Duration::from_millis(u64::from(ms)).min(self.state.config.dial_timeout),
        };
        let mut to_agent = open.clone();
        to_agent.dial_timeout_ms = u32::try_from(dial_timeout.as_millis()).unwrap_or(u32::MAX);
        let started = Instant::now();
        let routed = match tokio::time::timeout(
            dial_timeout + AGENT_ANSWER_MARGIN,
            route::<ToCluster>(&self.state.pool, &to_agent, |agent| {
                if let Ok(mut a) = record.agent_id.lock() {
                    a.clone_from(&agent.agent_id);
                }
            }),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TunnelError::new(
                ErrorCode::DialTimeout,
                format!("no answer from the agent within {dial_timeout:?}"),
            )),
        };
        self.state
            .metrics
            .dial_latency
            .observe(started.elapsed().as_secs_f64());
        match routed {
            Ok((opened, agent_stream, gate, agent)) => {
                self.state
                    .metrics
                    .dials
                    .get_or_create(&CodeLabel { code: "ok" })
                    .inc();
                agent.open.fetch_add(1, Ordering::Relaxed);
                let guard = AgentOpenGuard(agent);
                let to_cluster = ToCluster {
                    inner: inbound,
                    record: record.clone(),
                };
                if gate.open(to_cluster).is_err() {
                    tracing::debug!(%id, "agent stream ended before the client's data flowed");
                }
                let from_cluster = FromCluster {
                    inner: agent_stream,
                    record,
                };
                let out = futures_util::stream::once(async move { Ok(opened) })
                    .chain(from_cluster)
                    .map(move |item| {
                        let _ = &guard;
                        item
                    });
                match revoked {
                    // Ending the stream without eof aborts the connection on both legs.
                    Some(revoked) => Ok(Response::new(Box::pin(out.take_until(revoked)))),
                    None => Ok(Response::new(Box::pin(out))),
                }
            }
            Err(err) => {
                record.fail(&err);
                self.count_dial(err.code);
                Ok(Response::new(single(err.to_frame())))
            }
        }
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        if let Some(peer) = req.extensions().get::<Arc<tunnel_proto::h2::PeerInfo>>()
            && !peer.identity.is_caller()
        {
            return Err(Status::unauthenticated(format!(
                "{} may not list clusters",
                peer.identity
            )));
        }
        Ok(Response::new(pb::ListClustersResponse {
            clusters: self.state.pool.snapshot(),
        }))
    }
}

/// Counts a connection against its agent while the response stream lives.
struct AgentOpenGuard(Arc<AgentTunnel>);

impl Drop for AgentOpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(id_len: usize, cluster: &str, host: &str, port: u32) -> pb::Open {
        pb::Open {
            connection_id: vec![7; id_len],
            cluster: cluster.into(),
            host: host.into(),
            port,
            dial_timeout_ms: 0,
        }
    }

    #[test]
    fn opens_are_validated_field_by_field() {
        assert!(validate_open(&open(16, "east", "kubernetes.default.svc", 443)).is_ok());
        let e = validate_open(&open(4, "east", "a", 1)).unwrap_err();
        assert!(e.message.contains("16 bytes"), "{e}");
        let e = validate_open(&open(16, "East!", "a", 1)).unwrap_err();
        assert!(e.message.starts_with("cluster"), "{e}");
        let e = validate_open(&open(16, "east", "", 1)).unwrap_err();
        assert!(e.message.contains("host"), "{e}");
        let e = validate_open(&open(16, "east", "a", 70000)).unwrap_err();
        assert!(e.message.contains("port"), "{e}");
        let e = validate_open(&open(16, "east", "a", 0)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }
}
