//! One client connection, whatever front end asked for it (our own tunnel
//! streams, konnectivity, HTTP CONNECT): who is calling, whether the policy
//! allows it, the bound per identity, the agent it goes to
//! ([`crate::route`]) and the splice of the client's leg to the agent's
//! stream, with its record ([`crate::record`]). A front end only reads its
//! wire into an [`Open`] and turns the outcome back into its wire.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tunnel_identity::spiffe::Identity;
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::h2::PeerInfo;
use tunnel_proto::relay::{SpliceSink, SpliceSource, TunnelStream, splice_legs};
use tunnel_proto::stream::{Open, Opened};

use crate::ServerState;
use crate::metrics::{DecisionLabel, ResultLabel};
use crate::policy::{Access, Decision};
use crate::record::{AUDIT_TARGET, ConnRecord, audit_decision, count_dial, count_dial_ok};
use crate::route::{AGENT_ANSWER_MARGIN, AgentLease, route};

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

/// Who asks for a connection.
pub(crate) struct Caller<'a> {
    /// The client's connection, with its certificate's identity.
    pub peer: &'a PeerInfo,
    /// The bearer token the client sent, if any (or why it is unusable).
    pub token: Result<Option<String>, TunnelError>,
    /// The front end it came through (`tunnel`, `konnectivity`,
    /// `http-connect`), for the audit lines.
    pub entry: &'static str,
}

/// Whether the peer's certificate may open connections at all.
pub(crate) fn check_caller(peer: &PeerInfo) -> Result<(), TunnelError> {
    if peer.identity.is_caller() {
        Ok(())
    } else {
        Err(TunnelError::new(
            ErrorCode::Unauthenticated,
            format!("{} may not open connections", peer.identity),
        ))
    }
}

/// A request refused before it has a record (no caller, a malformed open):
/// counted and logged; the front end answers it.
pub(crate) fn refuse_early(state: &ServerState, peer: &PeerInfo, err: &TunnelError) {
    tracing::warn!(peer = %peer.remote_addr, client = %peer.identity, code = err.code.label(), %err, "connection refused before routing");
    count_dial(state, err.code);
}

/// A connection that was allowed and whose destination answered: the
/// agent's stream, waiting for the client's leg ([`Established::splice`]).
pub(crate) struct Established {
    /// The agent's answer.
    pub(crate) opened: Opened,
    agent: TunnelStream,
    record: Arc<ConnRecord>,
    revoked: Option<Revoked>,
    lease: AgentLease,
    slot: IdentitySlot,
    idle_timeout: Option<Duration>,
}

impl Established {
    /// The connection's id.
    pub(crate) fn id(&self) -> uuid::Uuid {
        self.record.id
    }

    /// Splices the client's leg (what the client sends, what goes to it) to
    /// the agent's stream until both directions ended, or until a policy
    /// change (with `--enforce-on-change`) or the idle timeout cuts the
    /// connection.
    pub(crate) async fn splice(self, from_client: impl SpliceSource, to_client: impl SpliceSink) {
        let Established {
            agent,
            record,
            revoked,
            lease,
            slot,
            idle_timeout,
            ..
        } = self;
        let cut = async move {
            match revoked {
                Some(revoked) => revoked.await,
                None => std::future::pending().await,
            }
        };
        let outcome = splice_legs(
            from_client,
            to_client,
            agent,
            &record.counters,
            cut,
            idle_timeout,
        )
        .await;
        record.spliced(&outcome);
        drop(lease);
        drop(slot);
    }
}

/// Opens `open` for `caller`: authentication, the policy, the bound per
/// identity, then an agent of the cluster dials (within the dial timeout).
/// `client_gone` completes when the client gives up while the agent dials.
/// A refusal is counted, logged and audited here; the front end answers it.
pub(crate) async fn establish(
    state: &Arc<ServerState>,
    caller: Caller<'_>,
    open: Open,
    client_gone: impl std::future::Future<Output = ()>,
) -> Result<Established, TunnelError> {
    let Caller { peer, token, entry } = caller;
    let subject = authenticate(state, Some(peer.identity.clone()), token).await;
    let record = Arc::new(ConnRecord::new(
        state.clone(),
        open.id,
        match &subject {
            Ok(s) => s.to_string(),
            Err(_) => "unauthenticated".into(),
        },
        peer.identity.to_string(),
        open.cluster.clone(),
        open.destination(),
        entry,
    ));
    let subject = match subject {
        Ok(s) => s,
        Err(err) => {
            audit_decision(&record, "unauthenticated", "-", Some(&err));
            refuse(state, &record, &err, "unauthenticated");
            return Err(err);
        }
    };
    if state.is_stopping() {
        let err = TunnelError::new(
            ErrorCode::ServerDraining,
            "server is shutting down; retry on another replica",
        );
        record.fail(&err);
        count_dial(state, err.code);
        return Err(err);
    }
    let revoked = authorize(state, &subject, &open, &record)?;
    let slot = match IdentityCounts::take(state, &record.subject) {
        Ok(slot) => slot,
        Err(err) => {
            tracing::warn!(id = %open.id, subject = %record.subject, code = err.code.label(), %err, "connection refused");
            record.fail(&err);
            count_dial(state, err.code);
            return Err(err);
        }
    };
    record.count_open();

    let dial_timeout = open.dial_timeout.map_or(state.config.dial_timeout, |t| {
        t.min(state.config.dial_timeout)
    });
    let mut to_agent = open;
    to_agent.dial_timeout = Some(dial_timeout);
    let started = Instant::now();
    let routed = tokio::select! {
        // The client gave up (reset) while the agent dialed.
        () = client_gone => Err(TunnelError::new(
            ErrorCode::TunnelBroken,
            "the client gave up before the destination answered",
        )),
        r = tokio::time::timeout(
            dial_timeout + AGENT_ANSWER_MARGIN,
            route(
                &state.pool,
                &to_agent,
                state.route_limits(),
                |agent| record.set_agent(&agent.agent_id),
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
    let (opened, agent, lease) = match routed {
        Ok(r) => r,
        Err(err) => {
            // A replica that is starting cannot tell an unknown cluster from
            // one whose agents have not connected yet.
            let err = if err.code == ErrorCode::UnknownCluster && !state.is_ready() {
                TunnelError::new(
                    ErrorCode::NoAgent,
                    format!(
                        "no agent of cluster {:?} has connected to this server yet (it is starting)",
                        to_agent.cluster
                    ),
                )
            } else {
                err
            };
            record.fail(&err);
            count_dial(state, err.code);
            tracing::debug!(id = %to_agent.id, code = err.code.label(), %err, "connection not opened");
            return Err(err);
        }
    };
    count_dial_ok(state);
    Ok(Established {
        opened,
        agent,
        record,
        revoked,
        lease,
        slot,
        idle_timeout: state.config.limits.idle_timeout,
    })
}

/// Fails `record` with `err` and counts it.
fn refuse(state: &ServerState, record: &ConnRecord, err: &TunnelError, decision: &'static str) {
    record.fail(err);
    count_dial(state, err.code);
    state
        .metrics
        .decisions
        .get_or_create(&DecisionLabel { decision })
        .inc();
}

/// The subject of a call: a token's service account when a token was
/// sent (and the server checks tokens), else the certificate's identity.
async fn authenticate(
    state: &ServerState,
    certificate: Option<Identity>,
    token: Result<Option<String>, TunnelError>,
) -> Result<Identity, TunnelError> {
    let unknown = || {
        TunnelError::new(
            ErrorCode::Unauthenticated,
            "the caller's certificate names no identity",
        )
    };
    let Some(reviewer) = &state.token_reviewer else {
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
                state
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
    state: &ServerState,
    subject: &Identity,
    open: &Open,
    record: &Arc<ConnRecord>,
) -> Result<Option<Revoked>, TunnelError> {
    let Some(policy_rx) = &state.policy else {
        record.set_rule("authorization-off");
        audit_decision(record, "allow", "authorization-off", None);
        return Ok(None);
    };
    let no_labels = BTreeMap::new();
    let labels = state
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
        record.set_rule(rule);
        audit_decision(record, "allow", rule, None);
        state
            .metrics
            .decisions
            .get_or_create(&DecisionLabel { decision: "allow" })
            .inc();
        if !state.config.auth.enforce_on_change {
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
    refuse(state, record, &err, "deny");
    Err(err)
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
            Decision::Allow { rule } => record.set_rule(&rule),
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
