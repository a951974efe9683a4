//! The sidecar's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels: how the app came in (`port`, `connect`, `http`, or `direct` for
/// what the proxy dialed outside the clusters) and the result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `port`, `connect`, `http` or `direct`.
    pub kind: &'static str,
    /// `ok` or an error code.
    pub code: &'static str,
}

/// Every metric of the sidecar.
#[derive(Clone, Debug, Default)]
pub struct SidecarMetrics {
    /// Connections and proxy requests by kind and result.
    pub requests: Family<RequestLabel, Counter>,
    /// Tunnelled connections open now.
    pub open_connections: Gauge,
    /// Direct (non-tunnel) CONNECT connections open now.
    pub open_direct_connections: Gauge,
    /// 1 while the sidecar reaches a tunnel server, else 0.
    pub server_connected: Gauge,
}

impl SidecarMetrics {
    /// Creates the metrics and registers them under the `tunnel_sidecar` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tunnel_sidecar");
        r.register(
            "requests",
            "Connections and proxy requests by kind and result",
            m.requests.clone(),
        );
        r.register(
            "open_connections",
            "Tunnelled connections open now",
            m.open_connections.clone(),
        );
        r.register(
            "open_direct_connections",
            "Direct (non-tunnel) CONNECT connections open now",
            m.open_direct_connections.clone(),
        );
        r.register(
            "server_connected",
            "1 while a tunnel server is reachable, else 0 (readiness does not wait for it)",
            m.server_connected.clone(),
        );
        m
    }
}
