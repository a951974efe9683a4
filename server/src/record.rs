//! The record of one client connection, whatever front end it came through:
//! counted while it lives (open connections, the drain), one audit line per
//! decision and one when it closes, its bytes and result code in the metrics.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::relay::{DirectionEnd, SpliceCounters, SpliceOutcome};

use crate::ServerState;
use crate::metrics::{BytesLabel, CodeLabel};

/// Tracing target of the audit log: one line per decision, one per closed connection.
pub const AUDIT_TARGET: &str = "tunnel_server::audit";

/// One proxied connection's record: counted while it lives, logged and
/// measured once when both directions are done (on drop).
pub(crate) struct ConnRecord {
    state: Arc<ServerState>,
    pub(crate) id: uuid::Uuid,
    /// Who the connection is for: the token's service account, else the certificate's identity.
    pub(crate) subject: String,
    /// The identity in the caller's certificate.
    pub(crate) certificate: String,
    pub(crate) cluster: String,
    pub(crate) destination: String,
    /// The front end the connection came through.
    entry: &'static str,
    /// The rule that allowed the connection (`authorization-off` without a policy).
    rule: Mutex<String>,
    agent_id: Mutex<String>,
    start: Instant,
    pub(crate) counters: SpliceCounters,
    to_cluster_eof: AtomicBool,
    from_cluster_eof: AtomicBool,
    /// 0 = no error; else an `ErrorCode` value.
    error: AtomicU8,
    counted_open: AtomicBool,
    /// Cut by the idle timeout.
    idle_cut: AtomicBool,
}

impl ConnRecord {
    /// The record of connection `id` from `certificate`, for `subject`, to
    /// `destination` in `cluster`, asked for through the front end `entry`.
    pub(crate) fn new(
        state: Arc<ServerState>,
        id: uuid::Uuid,
        subject: String,
        certificate: String,
        cluster: String,
        destination: String,
        entry: &'static str,
    ) -> Self {
        Self {
            state,
            id,
            subject,
            certificate,
            cluster,
            destination,
            entry,
            rule: Mutex::new(String::new()),
            agent_id: Mutex::new(String::new()),
            start: Instant::now(),
            counters: SpliceCounters::default(),
            to_cluster_eof: AtomicBool::new(false),
            from_cluster_eof: AtomicBool::new(false),
            error: AtomicU8::new(0),
            counted_open: AtomicBool::new(false),
            idle_cut: AtomicBool::new(false),
        }
    }

    /// The connection failed with `err` (its result code).
    pub(crate) fn fail(&self, err: &TunnelError) {
        self.error.store(err.code as i32 as u8, Ordering::Relaxed);
    }

    /// Counts the connection as open (metrics, the drain) until the record drops.
    pub(crate) fn count_open(&self) {
        self.counted_open.store(true, Ordering::Relaxed);
        self.state.connection_opened();
        self.state.metrics.open_connections.inc();
    }

    /// The agent the connection went to (or was last tried on).
    pub(crate) fn set_agent(&self, agent_id: &str) {
        if let Ok(mut a) = self.agent_id.lock() {
            agent_id.clone_into(&mut a);
        }
    }

    /// The policy rule that allows the connection.
    pub(crate) fn set_rule(&self, rule: &str) {
        if let Ok(mut r) = self.rule.lock() {
            rule.clone_into(&mut r);
        }
    }

    /// How the splice of the connection ended.
    pub(crate) fn spliced(&self, outcome: &SpliceOutcome) {
        self.to_cluster_eof
            .store(outcome.to_cluster == DirectionEnd::Eof, Ordering::Relaxed);
        self.from_cluster_eof
            .store(outcome.from_cluster == DirectionEnd::Eof, Ordering::Relaxed);
        if outcome.cut && self.error.load(Ordering::Relaxed) == 0 {
            self.idle_cut.store(true, Ordering::Relaxed);
        }
    }

    /// The result code of the close audit line.
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
            entry = self.entry,
            agent = %agent,
            bytes_to_cluster = up,
            bytes_from_cluster = down,
            duration_ms = self.start.elapsed().as_millis() as u64,
            result = self.result(),
            "connection closed"
        );
        // Last: once no connection is open (the drain, a test), every
        // closed one has its bytes counted and its audit line written.
        if self.counted_open.load(Ordering::Relaxed) {
            m.open_connections.dec();
            self.state.connection_closed();
        }
    }
}

/// Counts a connection attempt that failed with `code`.
pub(crate) fn count_dial(state: &ServerState, code: ErrorCode) {
    state
        .metrics
        .dials
        .get_or_create(&CodeLabel { code: code.label() })
        .inc();
}

/// Counts a connection attempt that reached its destination.
pub(crate) fn count_dial_ok(state: &ServerState) {
    state
        .metrics
        .dials
        .get_or_create(&CodeLabel { code: "ok" })
        .inc();
}

/// The audit line of one decision.
pub(crate) fn audit_decision(
    record: &ConnRecord,
    decision: &str,
    rule: &str,
    err: Option<&TunnelError>,
) {
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
            entry = record.entry,
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
            entry = record.entry,
            decision,
            rule,
            "connection allowed"
        );
    }
}
