//! The server's own probes: every `--probe-interval` it opens a connection
//! through each known cluster's agents to `--probe-target` (the cluster's
//! kube-apiserver by default), measures the time to the agent's `Opened`,
//! closes it, and exports the result as metrics:
//!
//! - `tunnel_server_probe_success{cluster}`: 1 if the last probe reached the
//!   target, else 0;
//! - `tunnel_server_probe_latency_seconds{cluster}`: the last successful
//!   probe's time from `Open` to `Opened` (a gauge, like the health command's
//!   latency column; absent while the cluster's last probe failed);
//! - `tunnel_server_probes_total{cluster,code}`: probes by result (`ok` or an
//!   error code).
//!
//! A probe is a dial like a client's: routed by [`crate::route::route`] to
//! an agent picked as for a client (another one is tried if an agent did not
//! act on it), and the agent's allowlist decides
//! whether the target may be reached (`destination_not_allowed` otherwise).
//! It is the server's, not a client's: no `TunnelPolicy` rule is needed or
//! consulted, it is not an audit event, not counted in
//! `tunnel_server_open_connections` / `tunnel_server_dials_total` nor against
//! the agent's open connections, and is logged at debug (a cluster whose
//! probes start or stop failing at info). A known cluster without a usable
//! agent is not dialed but reported: success 0, code `no_agent`.
//!
//! The connection is closed cleanly once it is open: END_STREAM goes to the
//! destination, and the agent's side is read (and discarded) until its `eof`
//! for up to [`CLOSE_TIMEOUT`]; a destination that keeps it open longer is
//! aborted (reset).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tunnel_proto::client::Target;
use tunnel_proto::error::{ErrorCode, TunnelError};

use crate::ServerState;
use crate::metrics::{ClusterLabel, ProbeLabel, ServerMetrics};

/// Default time between two probes of every cluster.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Default destination probed in each cluster: its kube-apiserver.
pub const DEFAULT_PROBE_TARGET: &str = "kubernetes.default.svc:443";
/// How long a probe waits for the destination to close after its `eof`.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A destination inside every cluster, `host:port` (`[v6]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::str::FromStr for ProbeTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid probe target {s:?}: expected HOST:PORT or [IPv6]:PORT");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(bad)?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What the server probes and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Time between two rounds; zero disables probing.
    pub interval: Duration,
    /// The destination probed in every cluster.
    pub target: ProbeTarget,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_PROBE_INTERVAL,
            target: DEFAULT_PROBE_TARGET
                .parse()
                .expect("the default target parses"),
        }
    }
}

impl ProbeConfig {
    /// No probes.
    pub fn disabled() -> Self {
        Self {
            interval: Duration::ZERO,
            ..Self::default()
        }
    }

    /// Whether the server probes at all.
    pub fn is_enabled(&self) -> bool {
        !self.interval.is_zero()
    }
}

/// The result of one probe of one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// The cluster.
    pub cluster: String,
    /// `Ok(time from Open to Opened)`, or why it failed.
    pub outcome: Result<Duration, TunnelError>,
}

impl ProbeResult {
    /// `ok` or the error code's label.
    pub fn code(&self) -> &'static str {
        match &self.outcome {
            Ok(_) => "ok",
            Err(e) => e.code.label(),
        }
    }
}

/// Updates the probe metrics with one result.
pub fn record(metrics: &ServerMetrics, result: &ProbeResult) {
    let cluster = ClusterLabel {
        cluster: result.cluster.clone(),
    };
    metrics
        .probe_success
        .get_or_create(&cluster)
        .set(i64::from(result.outcome.is_ok()));
    match &result.outcome {
        Ok(latency) => {
            metrics
                .probe_latency
                .get_or_create(&cluster)
                .set(latency.as_secs_f64());
        }
        Err(_) => {
            metrics.probe_latency.remove(&cluster);
        }
    }
    metrics
        .probes
        .get_or_create(&ProbeLabel {
            cluster: result.cluster.clone(),
            code: result.code(),
        })
        .inc();
}

/// The probe task: a round every `config.probe.interval` (the first one
/// interval after the start) until `stop` is cancelled. Skips rounds while the
/// server drains. Returns at once when probing is disabled.
pub(crate) async fn run(state: Arc<ServerState>, stop: CancellationToken) {
    let config = state.config.probe.clone();
    if !config.is_enabled() {
        tracing::debug!("cluster probes disabled");
        return;
    }
    tracing::info!(interval = ?config.interval, target = %config.target, "probing clusters");
    let failing: Arc<std::sync::Mutex<HashMap<String, bool>>> = Arc::default();
    every(config.interval, stop, || {
        let state = state.clone();
        let failing = failing.clone();
        async move {
            if state.is_draining() {
                return;
            }
            let results = probe_all(&state).await;
            let mut failing = failing.lock().unwrap_or_else(|e| e.into_inner());
            for result in results {
                record(&state.metrics, &result);
                log_transition(&mut failing, &result);
            }
        }
    })
    .await;
}

/// Calls `round` every `interval` (first after one interval; a round that
/// overruns delays the next rather than bunching them) until `stop` is
/// cancelled, which also cuts a round short.
async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let run = async {
        loop {
            ticker.tick().await;
            round().await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = run => {}
    }
}

fn log_transition(failing: &mut HashMap<String, bool>, result: &ProbeResult) {
    let now_failing = result.outcome.is_err();
    let before = failing.insert(result.cluster.clone(), now_failing);
    match &result.outcome {
        Err(err) if before != Some(true) => {
            tracing::info!(cluster = %result.cluster, code = result.code(), %err, "cluster probe failing");
        }
        Ok(latency) if before == Some(true) => {
            tracing::info!(cluster = %result.cluster, ?latency, "cluster probe succeeds again");
        }
        _ => {}
    }
}

/// Probes every cluster the pool knows, concurrently.
pub async fn probe_all(state: &ServerState) -> Vec<ProbeResult> {
    let clusters = state.pool.snapshot();
    futures_util::future::join_all(clusters.into_iter().map(|c| async move {
        let outcome = probe(state, &c.name).await;
        ProbeResult {
            cluster: c.name,
            outcome,
        }
    }))
    .await
}

/// One probe of `cluster`: the time from the open to the agent's answer,
/// then a clean close.
pub async fn probe(state: &ServerState, cluster: &str) -> Result<Duration, TunnelError> {
    let target = &state.config.probe.target;
    let dial_timeout = state.config.dial_timeout;
    let open = Target::new(cluster, target.host.clone(), target.port).open(Some(dial_timeout));
    let id = open.id;
    let started = Instant::now();
    let routed = tokio::time::timeout(
        dial_timeout + crate::route::AGENT_ANSWER_MARGIN,
        crate::route::route(
            &state.pool,
            &open,
            crate::route::RouteLimits {
                max_per_agent: u64::MAX,
                ..state.route_limits()
            },
            |_| {},
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(TunnelError::new(
            ErrorCode::DialTimeout,
            format!("no answer from the agent within {dial_timeout:?}"),
        ))
    });
    let latency = started.elapsed();
    let (_opened, mut stream, lease) = match routed {
        Ok(r) => r,
        Err(err) => {
            tracing::debug!(%id, %cluster, destination = %target, code = err.code.label(), %err, "probe failed");
            return Err(err);
        }
    };
    // Half-close towards the destination, then wait for its side to end.
    let _ = stream.send.send_data(bytes::Bytes::new(), true);
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match stream.recv.data().await {
                Some(Ok(data)) => {
                    let _ = stream.recv.flow_control().release_capacity(data.len());
                }
                Some(Err(_)) => return false,
                None => return true,
            }
        }
    })
    .await
    .unwrap_or(false);
    // Dropping the stream resets it if the destination has not closed.
    drop(stream);
    tracing::debug!(%id, %cluster, destination = %target, agent = %lease.0.agent_id, ?latency, clean_close = closed, "probe ok");
    Ok(latency)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn targets_parse_with_ipv6_and_refuse_garbage() {
        let t: ProbeTarget = DEFAULT_PROBE_TARGET.parse().unwrap();
        assert_eq!(
            t,
            ProbeTarget {
                host: "kubernetes.default.svc".into(),
                port: 443
            }
        );
        assert_eq!(t.to_string(), DEFAULT_PROBE_TARGET);
        let t: ProbeTarget = "[fd00::1]:6443".parse().unwrap();
        assert_eq!(t.host, "fd00::1");
        assert_eq!(t.to_string(), "[fd00::1]:6443");
        assert_eq!("10.0.0.1:80".parse::<ProbeTarget>().unwrap().port, 80);
        for bad in [
            "",
            "host",
            "host:",
            ":443",
            "host:0",
            "host:70000",
            "fd00::1:443",
            "[fd00::1:443",
            "a b:1",
        ] {
            let err = bad.parse::<ProbeTarget>().unwrap_err();
            assert!(err.contains("probe target"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn default_config_probes_the_apiserver_every_30s() {
        let c = ProbeConfig::default();
        assert!(c.is_enabled());
        assert_eq!(c.interval, DEFAULT_PROBE_INTERVAL);
        assert_eq!(c.target.to_string(), "kubernetes.default.svc:443");
        assert!(!ProbeConfig::disabled().is_enabled());
    }

    fn result(cluster: &str, outcome: Result<Duration, ErrorCode>) -> ProbeResult {
        ProbeResult {
            cluster: cluster.into(),
            outcome: outcome.map_err(|code| TunnelError::new(code, "test")),
        }
    }

    fn text(registry: &prometheus_client::registry::Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn results_become_metrics_and_a_failure_clears_the_latency() {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = ServerMetrics::register(&mut registry);
        record(&m, &result("east", Ok(Duration::from_millis(250))));
        record(&m, &result("west", Err(ErrorCode::NoAgent)));
        let body = text(&registry);
        assert!(
            body.contains("tunnel_server_probe_success{cluster=\"east\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("tunnel_server_probe_latency_seconds{cluster=\"east\"} 0.25\n"),
            "{body}"
        );
        assert!(
            body.contains("tunnel_server_probes_total{cluster=\"east\",code=\"ok\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("tunnel_server_probe_success{cluster=\"west\"} 0\n"),
            "{body}"
        );
        assert!(
            body.contains("tunnel_server_probes_total{cluster=\"west\",code=\"no_agent\"} 1\n"),
            "{body}"
        );
        assert!(
            !body.contains("tunnel_server_probe_latency_seconds{cluster=\"west\"}"),
            "{body}"
        );

        record(&m, &result("east", Err(ErrorCode::DestinationRefused)));
        let body = text(&registry);
        assert!(
            body.contains("tunnel_server_probe_success{cluster=\"east\"} 0\n"),
            "{body}"
        );
        assert!(
            !body.contains("tunnel_server_probe_latency_seconds{cluster=\"east\"}"),
            "{body}"
        );
        assert!(
            body.contains(
                "tunnel_server_probes_total{cluster=\"east\",code=\"destination_refused\"} 1\n"
            ),
            "{body}"
        );
        assert!(
            body.contains("tunnel_server_probes_total{cluster=\"east\",code=\"ok\"} 1\n"),
            "{body}"
        );
    }

    #[test]
    fn transitions_are_noticed_once() {
        let mut failing = HashMap::new();
        log_transition(&mut failing, &result("east", Ok(Duration::ZERO)));
        assert_eq!(failing.get("east"), Some(&false));
        log_transition(&mut failing, &result("east", Err(ErrorCode::DialTimeout)));
        log_transition(&mut failing, &result("east", Err(ErrorCode::DialTimeout)));
        assert_eq!(failing.get("east"), Some(&true));
        log_transition(&mut failing, &result("east", Ok(Duration::ZERO)));
        assert_eq!(failing.get("east"), Some(&false));
    }

    #[tokio::test]
    async fn rounds_come_every_interval_and_stop_with_the_server() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counted = rounds.clone();
        let stop_rounds = stop.clone();
        let task = tokio::spawn(async move {
            every(Duration::from_millis(20), stop_rounds, || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await;
        });
        // The first round comes one interval after the start, not at once.
        assert_eq!(rounds.load(Ordering::SeqCst), 0);
        let start = Instant::now();
        while rounds.load(Ordering::SeqCst) < 3 {
            assert!(start.elapsed() < Duration::from_secs(10), "no rounds");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when told")
            .unwrap();
        let after = rounds.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), after, "no round after stop");
    }

    #[tokio::test]
    async fn a_stop_cuts_a_long_round_short() {
        let stop = CancellationToken::new();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let mut started_tx = Some(started_tx);
        let stop_rounds = stop.clone();
        let task = tokio::spawn(async move {
            every(Duration::from_millis(1), stop_rounds, || {
                let started = started_tx.take();
                async move {
                    if let Some(s) = started {
                        let _ = s.send(());
                    }
                    std::future::pending::<()>().await;
                }
            })
            .await;
        });
        started_rx.await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a hanging round does not hold the stop")
            .unwrap();
    }
}
