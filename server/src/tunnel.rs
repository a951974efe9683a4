//! Tunnel streams from clients: each is authenticated, authorized, routed
//! to an agent of its cluster and spliced to a stream on that agent's tunnel.
//! Also the client port's control service (`Tunnel.ListClusters`).
//!
//! The server never touches a TCP socket for a proxied connection: it hands
//! each DATA buffer received on one leg to the other leg, so HTTP/2 flow
//! control runs end to end, hop by hop, and no payload is copied here.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tunnel_identity::spiffe::Identity;
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::h2::{PeerInfo, StreamGuard};
use tunnel_proto::pb::{self, tunnel_server::Tunnel};
use tunnel_proto::relay::{DirectionEnd, SpliceCounters, TunnelStream, splice};
use tunnel_proto::stream::{Open, OpenFailure, Opened, error_response, opened_response};

use crate::ServerState;
use crate::metrics::{BytesLabel, CodeLabel, DecisionLabel, ResultLabel};
use crate::policy::{Access, Decision};
use crate::pool::{AgentPool, AgentTunnel, Pick};

/// Tracing target of the audit log: one line per decision, one per closed connection.
pub const AUDIT_TARGET: &str = "tunnel_server::audit";

/// Extra time the server waits beyond the dial timeout it gave the agent.
pub(crate) const AGENT_ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The client port's control service.
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
    rule: Mutex<String>,
    agent_id: Mutex<String>,
    start: Instant,
    counters: SpliceCounters,
    to_cluster_eof: AtomicBool,
    from_cluster_eof: AtomicBool,
    /// 0 = no error; else an `ErrorCode` value.
    error: AtomicU8,
    counted_open: AtomicBool,
    /// Cut by the idle timeout.
    idle_cut: AtomicBool,
}

impl ConnRecord {
    fn fail(&self, err: &TunnelError) {
        self.error.store(err.code as i32 as u8, Ordering::Relaxed);
    }

    fn result(&self) -> &'static str {
        if self.idle_cut.load(Ordering::Relaxed) {
            return "idle_timeout";
        }
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
        let up = self.counters.to_cluster.get();
        let down = self.counters.from_cluster.get();
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

/// Connections open per client identity, bounded by `--max-connections-per-identity`.
#[derive(Debug, Default)]
pub struct IdentityCounts(Mutex<HashMap<String, u64>>);

/// One connection counted against its identity until dropped.
pub(crate) struct IdentitySlot {
    counts: Arc<ServerState>,
    subject: String,
}

impl IdentityCounts {
    fn take(state: &Arc<ServerState>, subject: &str) -> Result<IdentitySlot, TunnelError> {
        let limit = state.config.limits.max_connections_per_identity;
        let mut map = state
            .identity_counts
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = map.entry(subject.to_owned()).or_default();
        if *n >= limit {
            return Err(TunnelError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "{subject} has {n} connections open, the most one identity may have (--max-connections-per-identity)"
                ),
            ));
        }
        *n += 1;
        Ok(IdentitySlot {
            counts: state.clone(),
            subject: subject.to_owned(),
        })
    }

    /// Connections open now for `subject`.
    pub fn get(&self, subject: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(subject).copied().unwrap_or(0)
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut map = self
            .counts
            .identity_counts
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.subject);
            }
        }
    }
}

/// A connection counted against its agent from the moment the agent is
/// picked (so that an agent that hangs does not look idle) until dropped.
pub(crate) struct AgentLease(pub(crate) Arc<AgentTunnel>);

impl AgentLease {
    /// Counts one more connection on `agent`, unless it carries `max` already.
    fn try_new(agent: Arc<AgentTunnel>, max: u64) -> Option<Self> {
        agent
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(agent))
    }
}

impl Drop for AgentLease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`route`] hands back: the agent's answer, the agent-side stream and
/// the lease on the agent.
pub(crate) type Routed = (Opened, TunnelStream, AgentLease);

fn tunnel_broken(agent: &AgentTunnel, err: &h2::Error) -> TunnelError {
    TunnelError::new(
        ErrorCode::TunnelBroken,
        format!("tunnel to agent {} failed: {err}", agent.agent_id),
    )
}

/// How [`route`] treats agents.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteLimits {
    /// Connections one agent may carry.
    pub max_per_agent: u64,
    /// Time an agent that acknowledges opens has to do so.
    pub ack_timeout: Duration,
}

/// How one attempt on one agent failed.
struct AttemptFailed {
    err: TunnelError,
    /// The agent did not act on the open: another agent may get it.
    elsewhere: bool,
    /// The agent itself failed (not the destination): it is passed over.
    agent_failed: bool,
}

/// Opens `open` as a stream on `agent`'s tunnel and reads the answer; an
/// agent that acknowledges opens has `ack_timeout` to do so (extended while
/// its tunnel keeps receiving data), or as long as it needs without one (the
/// last agent that could take the open: no other to retry on).
async fn open_on(
    agent: &AgentTunnel,
    open: &Open,
    ack_timeout: Option<Duration>,
) -> Result<(Opened, TunnelStream), AttemptFailed> {
    let request = open.to_request(None).map_err(|err| AttemptFailed {
        err,
        elsewhere: false,
        agent_failed: false,
    })?;
    let mut pending = agent.start_open();
    let mut acked = false;
    let result = if agent.acknowledges_opens {
        // The answer time is taken at the acknowledgement, before the agent
        // dials: the destination's dial is no part of it.
        let on_ack = || {
            acked = true;
            pending.answered();
        };
        tunnel_proto::stream::open_acknowledged(&agent.channel, request, ack_timeout, on_ack).await
    } else {
        tunnel_proto::stream::open_on(&agent.channel, request).await
    };
    if matches!(result, Ok(_) | Err(OpenFailure::Refused(_))) {
        pending.answered();
    }
    let failure = match result {
        Ok(opened) => return Ok(opened),
        Err(f) => f,
    };
    // Not acted on by the agent: refused by its connection, or never
    // acknowledged (the agent checks for the reset before it dials). A
    // tunnel that broke before the acknowledgement counts too: had the agent
    // begun to dial, that dial ends with the tunnel, before any byte of the
    // connection was sent.
    let elsewhere = failure.was_not_processed()
        || (agent.acknowledges_opens && !acked && !matches!(failure, OpenFailure::Refused(_)));
    let (err, agent_failed) = match failure {
        OpenFailure::Full(e) => (
            TunnelError::new(
                ErrorCode::ResourceExhausted,
                format!("the tunnel to agent {}: {e}", agent.agent_id),
            ),
            false,
        ),
        OpenFailure::Connection(e) | OpenFailure::Answer(e) => (tunnel_broken(agent, &e), true),
        OpenFailure::NotAcknowledged(t) => (
            TunnelError::new(
                ErrorCode::TunnelBroken,
                format!(
                    "agent {} did not acknowledge the open within {t:?}",
                    agent.agent_id
                ),
            ),
            true,
        ),
        OpenFailure::Refused(err) => (err, false),
    };
    if agent_failed {
        let passed_over = pending.failed();
        tracing::warn!(id = %open.id, agent = %agent.agent_id, cluster = %open.cluster, %err, ?passed_over, "agent failed an open; passed over while others are usable");
    }
    Err(AttemptFailed {
        err,
        elsewhere,
        agent_failed,
    })
}

/// Opens the connection `open` on an agent of its cluster, trying others
/// while the agent did not act on it (so no destination is dialed twice).
/// `on_pick` is told each agent tried. Used for clients' connections and the
/// server's own probes ([`crate::probes`]); counts nothing but the agents'
/// leases. When every agent was tried and none acted on the open, the answer
/// is `no_agent`: the client may try another server.
pub(crate) async fn route(
    pool: &AgentPool,
    open: &Open,
    limits: RouteLimits,
    mut on_pick: impl FnMut(&AgentTunnel),
) -> Result<Routed, TunnelError> {
    let mut tried: Vec<Arc<AgentTunnel>> = Vec::new();
    let mut last_err: Option<TunnelError> = None;
    // Every agent tried so far carried its maximum.
    let mut all_full = true;
    let max_per_agent = limits.max_per_agent;
    loop {
        let agent = match pool.pick(&open.cluster, &tried) {
            Pick::Agent(a) => a,
            Pick::UnknownCluster => {
                return Err(TunnelError::new(
                    ErrorCode::UnknownCluster,
                    format!("cluster {:?} is not known to this server", open.cluster),
                ));
            }
            Pick::NoAgent if all_full && !tried.is_empty() => {
                return Err(match last_err {
                    Some(err) => err,
                    None => TunnelError::new(
                        ErrorCode::ResourceExhausted,
                        format!(
                            "every agent of cluster {:?} carries its maximum of {max_per_agent} connections (--max-connections-per-agent)",
                            open.cluster
                        ),
                    ),
                });
            }
            Pick::NoAgent => {
                return Err(match last_err {
                    Some(err) => TunnelError::new(
                        ErrorCode::NoAgent,
                        format!(
                            "no agent of cluster {:?} could take the connection; the last one: {}",
                            open.cluster, err.message
                        ),
                    ),
                    None => TunnelError::new(
                        ErrorCode::NoAgent,
                        format!("no agent of cluster {:?} is connected", open.cluster),
                    ),
                });
            }
        };
        tried.push(agent.clone());
        // A full agent is passed over for another one.
        let Some(lease) = AgentLease::try_new(agent.clone(), max_per_agent) else {
            continue;
        };
        on_pick(&agent);
        // The last agent that could take the open has no acknowledgement
        // deadline: with no other to retry on, a deadline could only turn a
        // slow (congested) agent's open into a failure.
        let ack_timeout = pool
            .has_untried(&open.cluster, &tried)
            .then_some(limits.ack_timeout);
        match open_on(&agent, open, ack_timeout).await {
            Ok((opened, stream)) => return Ok((opened, stream, lease)),
            Err(failed) if failed.elsewhere => {
                all_full &= failed.err.code == ErrorCode::ResourceExhausted;
                if !failed.agent_failed {
                    tracing::debug!(id = %open.id, agent = %agent.agent_id, err = %failed.err, "agent could not take the open; trying another");
                }
                last_err = Some(failed.err);
            }
            Err(failed) => return Err(failed.err),
        }
    }
}

/// A stream's opening that is refused before a record exists: answered,
/// counted and logged.
fn refuse_early(
    state: &ServerState,
    respond: &mut h2::server::SendResponse<Bytes>,
    peer: &PeerInfo,
    err: &TunnelError,
) {
    tracing::warn!(peer = %peer.remote_addr, client = %peer.identity, code = err.code.label(), %err, "connection refused before routing");
    count_dial(state, err.code);
    let _ = respond.send_response(error_response(err), true);
}

/// Refuses a stream that the client connection's budget cannot take.
pub(crate) fn refuse_full(
    state: &ServerState,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: &PeerInfo,
    full: &tunnel_proto::h2::BudgetExhausted,
) {
    let err = TunnelError::new(ErrorCode::ResourceExhausted, full.to_string());
    refuse_early(state, &mut respond, peer, &err);
}

fn count_dial(state: &ServerState, code: ErrorCode) {
    state
        .metrics
        .dials
        .get_or_create(&CodeLabel { code: code.label() })
        .inc();
}

/// Serves one tunnel stream a client opened, until both directions ended.
pub(crate) async fn serve_stream(
    state: Arc<ServerState>,
    peer: Arc<PeerInfo>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    guard: StreamGuard,
) {
    if !peer.identity.is_caller() {
        let err = TunnelError::new(
            ErrorCode::Unauthenticated,
            format!("{} may not open connections", peer.identity),
        );
        return refuse_early(&state, &mut respond, &peer, &err);
    }
    let open = match Open::from_request(&req) {
        Ok(o) => o,
        Err(err) => return refuse_early(&state, &mut respond, &peer, &err),
    };
    let token = crate::authn::bearer_token(req.headers());
    let svc = TunnelService::new(state.clone());
    let subject = svc.authenticate(Some(peer.identity.clone()), token).await;
    let record = Arc::new(ConnRecord {
        state: state.clone(),
        id: open.id,
        subject: match &subject {
            Ok(s) => s.to_string(),
            Err(_) => "unauthenticated".into(),
        },
        certificate: peer.identity.to_string(),
        cluster: open.cluster.clone(),
        destination: open.destination(),
        rule: Mutex::new(String::new()),
        agent_id: Mutex::new(String::new()),
        start: Instant::now(),
        counters: SpliceCounters::default(),
        to_cluster_eof: AtomicBool::new(false),
        from_cluster_eof: AtomicBool::new(false),
        error: AtomicU8::new(0),
        counted_open: AtomicBool::new(false),
        idle_cut: AtomicBool::new(false),
    });
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, err: &TunnelError| {
        let _ = respond.send_response(error_response(err), true);
    };
    let subject = match subject {
        Ok(s) => s,
        Err(err) => {
            audit_decision(&record, "unauthenticated", "-", Some(&err));
            svc.refuse(&record, &err, "unauthenticated");
            return answer(&mut respond, &err);
        }
    };
    if state.is_stopping() {
        let err = TunnelError::new(
            ErrorCode::ServerDraining,
            "server is shutting down; retry on another replica",
        );
        record.fail(&err);
        count_dial(&state, err.code);
        return answer(&mut respond, &err);
    }
    let revoked = match svc.authorize(&subject, &open, &record) {
        Ok(revoked) => revoked,
        Err(err) => return answer(&mut respond, &err),
    };
    let slot = match IdentityCounts::take(&state, &record.subject) {
        Ok(slot) => slot,
        Err(err) => {
            tracing::warn!(id = %open.id, subject = %record.subject, code = err.code.label(), %err, "connection refused");
            record.fail(&err);
            count_dial(&state, err.code);
            return answer(&mut respond, &err);
        }
    };
    record.counted_open.store(true, Ordering::Relaxed);
    state.connection_opened();
    state.metrics.open_connections.inc();

    let dial_timeout = open.dial_timeout.map_or(state.config.dial_timeout, |t| {
        t.min(state.config.dial_timeout)
    });
    let mut to_agent = open.clone();
    to_agent.dial_timeout = Some(dial_timeout);
    let started = Instant::now();
    let routed = tokio::select! {
        // The client gave up (reset) while the agent dialed.
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => Err(TunnelError::new(
            ErrorCode::TunnelBroken,
            "the client reset the stream before the destination answered",
        )),
        r = tokio::time::timeout(
            dial_timeout + AGENT_ANSWER_MARGIN,
            route(
                &state.pool,
                &to_agent,
                state.route_limits(),
                |agent| {
                    if let Ok(mut a) = record.agent_id.lock() {
                        a.clone_from(&agent.agent_id);
                    }
                },
            ),
        ) => r.unwrap_or_else(|_| Err(TunnelError::new(
            ErrorCode::DialTimeout,
            format!("no answer from the agent within {dial_timeout:?}"),
        ))),
    };
    state
        .metrics
        .dial_latency
        .observe(started.elapsed().as_secs_f64());
    let (opened, agent_stream, lease) = match routed {
        Ok(r) => r,
        Err(err) => {
            // A replica that is starting cannot tell an unknown cluster from
            // one whose agents have not connected yet.
            let err = if err.code == ErrorCode::UnknownCluster && !state.is_ready() {
                TunnelError::new(
                    ErrorCode::NoAgent,
                    format!(
                        "no agent of cluster {:?} has connected to this server yet (it is starting)",
                        open.cluster
                    ),
                )
            } else {
                err
            };
            record.fail(&err);
            count_dial(&state, err.code);
            tracing::debug!(id = %open.id, code = err.code.label(), %err, "connection not opened");
            return answer(&mut respond, &err);
        }
    };
    count_dial_ok(&state);
    let send = match respond.send_response(opened_response(&opened), false) {
        Ok(send) => send,
        Err(err) => {
            tracing::debug!(id = %open.id, %err, "client went away before the answer");
            return;
        }
    };
    let client_stream = TunnelStream::new(send, req.into_body(), guard);
    let cut = async {
        match revoked {
            Some(revoked) => revoked.await,
            None => std::future::pending().await,
        }
    };
    let outcome = splice(
        client_stream,
        agent_stream,
        &record.counters,
        cut,
        state.config.limits.idle_timeout,
    )
    .await;
    record
        .to_cluster_eof
        .store(outcome.to_cluster == DirectionEnd::Eof, Ordering::Relaxed);
    record
        .from_cluster_eof
        .store(outcome.from_cluster == DirectionEnd::Eof, Ordering::Relaxed);
    if outcome.cut && record.error.load(Ordering::Relaxed) == 0 {
        record.idle_cut.store(true, Ordering::Relaxed);
    }
    drop(lease);
    drop(slot);
}

fn count_dial_ok(state: &ServerState) {
    state
        .metrics
        .dials
        .get_or_create(&CodeLabel { code: "ok" })
        .inc();
}

impl TunnelService {
    fn count_dial(&self, code: ErrorCode) {
        count_dial(&self.state, code);
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
                    Err(e) if e.is_api_failure() => Some("error"),
                    Err(_) => Some("rejected"),
                };
                if let Some(result) = label {
                    self.state
                        .metrics
                        .token_reviews
                        .get_or_create(&ResultLabel { result })
                        .inc();
                }
                result.map(|(id, _)| id).map_err(TunnelError::from)
            }
            None => certificate.ok_or_else(unknown),
        }
    }

    /// Checks the policy. Allowed: the future that completes if a policy
    /// change revokes the connection (with `--enforce-on-change`).
    fn authorize(
        &self,
        subject: &Identity,
        open: &Open,
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
            port: open.port,
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
                port: open.port,
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
    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        if let Some(peer) = req.extensions().get::<Arc<PeerInfo>>()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::h2::H2Settings;

    /// A fake agent of `east` on an in-memory tunnel, added to `pool`: it
    /// acknowledges each open after `ack_after` and answers it (opened)
    /// `dial` later, as an agent whose destination is slow to accept.
    async fn fake_agent(
        pool: &AgentPool,
        id: &str,
        ack_after: Duration,
        dial: Duration,
    ) -> Arc<AgentTunnel> {
        let (near, far) = tokio::io::duplex(1 << 16);
        let agent_id = id.to_owned();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(far).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let agent_id = agent_id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ack_after).await;
                    let _ = respond.send_informational(tunnel_proto::stream::ack_response());
                    tokio::time::sleep(dial).await;
                    let opened = Opened {
                        agent_id,
                        peer: "127.0.0.1:1".into(),
                    };
                    let send = respond.send_response(opened_response(&opened), false);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(send);
                });
            }
        });
        let (channel, driver) = tunnel_proto::h2::client_handshake(near, &H2Settings::default())
            .await
            .expect("in-memory HTTP/2");
        tokio::spawn(driver);
        let tunnel = Arc::new(AgentTunnel::new(
            id.into(),
            "east".into(),
            "127.0.0.1:1".parse().expect("address"),
            channel,
            true,
        ));
        pool.add(tunnel.clone());
        tunnel
    }

    fn info(pool: &AgentPool, id: &str) -> pb::AgentInfo {
        pool.snapshot()
            .into_iter()
            .flat_map(|c| c.agents)
            .find(|a| a.agent_id == id)
            .expect("agent listed")
    }

    const LIMITS: RouteLimits = RouteLimits {
        max_per_agent: 100,
        ack_timeout: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn a_slow_destination_is_no_part_of_the_agents_answer_time() {
        let pool = Arc::new(AgentPool::default());
        let dial = Duration::from_secs(2);
        fake_agent(&pool, "slow-dial", Duration::ZERO, dial).await;
        let p = pool.clone();
        let routed = tokio::spawn(async move {
            let open = Open::new("east", "10.0.0.1", 80);
            route(&p, &open, LIMITS, |_| {})
                .await
                .map(|(opened, _, _)| opened.agent_id)
        });
        // The acknowledgement arrives long before the destination answers.
        let waited = Instant::now();
        while info(&pool, "slow-dial").pending_opens > 0 {
            assert!(
                waited.elapsed() < dial,
                "the acknowledgement ends the pending open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!routed.is_finished(), "the destination is still dialing");
        let during = info(&pool, "slow-dial").latency_us;
        assert_eq!(routed.await.expect("task").expect("opened"), "slow-dial");
        let after = info(&pool, "slow-dial").latency_us;
        // The dial took 2 s; the answer time is the acknowledgement's.
        for latency_us in [during, after] {
            assert!(
                latency_us < 500_000,
                "answer time {latency_us} µs includes the dial"
            );
        }
    }

    #[tokio::test]
    async fn a_full_agent_is_passed_over_for_another() {
        let pool = Arc::new(AgentPool::default());
        // One agent whose answer time is high (one slow acknowledgement) ...
        let slow = fake_agent(
            &pool,
            "slow-ack",
            Duration::from_millis(300),
            Duration::ZERO,
        )
        .await;
        let open = Open::new("east", "10.0.0.1", 80);
        let first = route(&pool, &open, LIMITS, |_| {}).await.expect("opened");
        drop(first);
        // ... and a quick one, cheaper but full.
        let quick = fake_agent(&pool, "quick", Duration::ZERO, Duration::ZERO).await;
        let limits = RouteLimits {
            max_per_agent: 1,
            ..LIMITS
        };
        let _full = AgentLease::try_new(quick, 1).expect("the only connection");
        for _ in 0..3 {
            let open = Open::new("east", "10.0.0.1", 80);
            let mut picked = Vec::new();
            let (opened, _, _) = route(&pool, &open, limits, |a| picked.push(a.agent_id.clone()))
                .await
                .expect("the other agent takes it");
            assert_eq!(opened.agent_id, "slow-ack", "picked {picked:?}");
        }
        // Every agent full: resource_exhausted.
        let _full2 = AgentLease::try_new(slow, 1).expect("its only connection");
        let open = Open::new("east", "10.0.0.1", 80);
        let err = route(&pool, &open, limits, |_| {})
            .await
            .err()
            .expect("every agent full");
        assert_eq!(err.code, ErrorCode::ResourceExhausted, "{err}");
    }
}
