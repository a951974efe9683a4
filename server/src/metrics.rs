//! The server's Prometheus metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
pub use tunnel_shell::metrics::CodeLabel;

/// Label: a cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Cluster name.
    pub cluster: String,
}

/// Labels: a cluster and the result code of a probe of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabel {
    /// Cluster name.
    pub cluster: String,
    /// `ok` or an error code.
    pub code: &'static str,
}

/// Labels: a cluster and a direction (`to_cluster` or `from_cluster`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    /// Cluster name.
    pub cluster: String,
    /// `to_cluster` (client to destination) or `from_cluster`.
    pub direction: &'static str,
}

/// Labels: a listener (`agent`, `client`) and why a connection was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// Which port.
    pub listener: &'static str,
    /// Why (`tls`, `identity`, `cluster` (not admitted by OCM), `http2`,
    /// `http1`, `hello`).
    pub reason: &'static str,
}

/// Label: the result of an operation (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Label: an authorization decision (`allow`, `deny`, `unauthenticated`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// The decision.
    pub decision: &'static str,
}

/// Every metric of the server.
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    /// Agents connected, per cluster.
    pub agents: Family<ClusterLabel, Gauge>,
    /// Proxied connections open now.
    pub open_connections: Gauge,
    /// Connection attempts by result code.
    pub dials: Family<CodeLabel, Counter>,
    /// Seconds from `Open` to the agent's answer.
    pub dial_latency: Histogram,
    /// Payload bytes per cluster and direction.
    pub bytes: Family<BytesLabel, Counter>,
    /// Connections refused at a listener.
    pub rejected: Family<RejectLabel, Counter>,
    /// Authorization decisions.
    pub decisions: Family<DecisionLabel, Counter>,
    /// Policy reloads by result.
    pub policy_reloads: Family<ResultLabel, Counter>,
    /// TokenReview calls by result (`authenticated`, `rejected`, `error`); cache hits are not counted.
    pub token_reviews: Family<ResultLabel, Counter>,
    /// Whether the last probe of each cluster succeeded (1) or not (0).
    pub probe_success: Family<ClusterLabel, Gauge>,
    /// Seconds from `Open` to `Opened` of each cluster's last successful probe;
    /// absent while its last probe failed.
    pub probe_latency: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    /// Probes by cluster and result code.
    pub probes: Family<ProbeLabel, Counter>,
}

impl ServerMetrics {
    /// Creates the metrics and registers them under the `tunnel_server` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            agents: Family::default(),
            open_connections: Gauge::default(),
            dials: Family::default(),
            dial_latency: Histogram::new(tunnel_shell::metrics::LATENCY_BUCKETS),
            bytes: Family::default(),
            rejected: Family::default(),
            decisions: Family::default(),
            policy_reloads: Family::default(),
            token_reviews: Family::default(),
            probe_success: Family::default(),
            probe_latency: Family::default(),
            probes: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("tunnel_server");
        r.register("agents", "Agents connected, per cluster", m.agents.clone());
        r.register(
            "open_connections",
            "Proxied connections open now",
            m.open_connections.clone(),
        );
        r.register(
            "dials",
            "Connection attempts by result code",
            m.dials.clone(),
        );
        r.register(
            "dial_latency_seconds",
            "Time from a client's open to the agent's answer",
            m.dial_latency.clone(),
        );
        r.register(
            "bytes",
            "Payload bytes per cluster and direction",
            m.bytes.clone(),
        );
        r.register(
            "rejected_connections",
            "Connections refused at a listener, by reason",
            m.rejected.clone(),
        );
        r.register(
            "authorization_decisions",
            "Authorization decisions on opened connections",
            m.decisions.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads by result",
            m.policy_reloads.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReview calls by result",
            m.token_reviews.clone(),
        );
        r.register(
            "probe_success",
            "Whether the server's last probe through each cluster's agents reached the probe target",
            m.probe_success.clone(),
        );
        r.register(
            "probe_latency_seconds",
            "Time from open to the agent's answer of each cluster's last successful probe",
            m.probe_latency.clone(),
        );
        r.register(
            "probes",
            "The server's probes of each cluster by result code",
            m.probes.clone(),
        );
        m
    }

    /// Counts a policy reload.
    pub fn policy_reload(&self, ok: bool) {
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}
