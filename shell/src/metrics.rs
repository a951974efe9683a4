//! The metric vocabulary the components share, so that their series
//! compare: the result-code label of dial counters and the latency buckets.
//! Each component registers its own metrics (its `metrics.rs`); the admin
//! server ([`crate::admin`]) serves them.

/// Metric label: a result code (`ok` or an
/// [`ErrorCode`](tunnel_proto::error::ErrorCode) label), shared by every
/// component's dial counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CodeLabel {
    /// Result code.
    pub code: &'static str,
}

/// Histogram buckets (seconds) for dial and connection latencies, shared by
/// every component so their histograms compare.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
