//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
pub use tunnel_shell::metrics::CodeLabel;

/// Label: a direction (`to_destination` or `from_destination`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// Direction of the bytes.
    pub direction: &'static str,
}

/// Every metric of the agent.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Tunnels to servers that are up now.
    pub tunnels_up: Gauge,
    /// Tunnel connection attempts that failed.
    pub tunnel_failures: Counter,
    /// Connections closed because they reached a server the agent already
    /// held a tunnel to (through a load balancer; see [`crate::servers`]).
    pub duplicate_tunnels: Counter,
    /// Destination dials by result code.
    pub dials: Family<CodeLabel, Counter>,
    /// Seconds to resolve and connect to a destination.
    pub dial_latency: Histogram,
    /// Proxied connections open now.
    pub open_connections: Gauge,
    /// Payload bytes by direction.
    pub bytes: Family<DirectionLabel, Counter>,
    /// Connections reset because their destination acknowledged nothing for
    /// `--dead-peer-timeout` while it owed an answer (its host vanished).
    pub destinations_gone: Counter,
}

impl AgentMetrics {
    /// Creates the metrics and registers them under the `tunnel_agent` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            tunnels_up: Gauge::default(),
            tunnel_failures: Counter::default(),
            duplicate_tunnels: Counter::default(),
            dials: Family::default(),
            dial_latency: Histogram::new(tunnel_shell::metrics::LATENCY_BUCKETS),
            open_connections: Gauge::default(),
            bytes: Family::default(),
            destinations_gone: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("tunnel_agent");
        r.register(
            "tunnels_up",
            "Tunnels to proxy servers that are up",
            m.tunnels_up.clone(),
        );
        r.register(
            "tunnel_failures",
            "Tunnel connection attempts that failed or tunnels that broke",
            m.tunnel_failures.clone(),
        );
        r.register(
            "duplicate_tunnels",
            "Connections closed because they reached a server the agent already had a tunnel to",
            m.duplicate_tunnels.clone(),
        );
        r.register("dials", "Destination dials by result code", m.dials.clone());
        r.register(
            "dial_latency_seconds",
            "Time to resolve and connect to a destination",
            m.dial_latency.clone(),
        );
        r.register(
            "destinations_gone",
            "Connections reset because their destination acknowledged nothing for --dead-peer-timeout",
            m.destinations_gone.clone(),
        );
        r.register(
            "open_connections",
            "Proxied connections open now",
            m.open_connections.clone(),
        );
        r.register("bytes", "Payload bytes by direction", m.bytes.clone());
        m
    }
}
