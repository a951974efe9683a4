//! The clusters the server knows, refreshed in the background. The refresh
//! also keeps the connection to the server up and tells whether the server
//! is reachable (the `tunnel_sidecar_server_connected` gauge); the sidecar's
//! readiness does not wait for it, so pods start during a hub outage.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tunnel_proto::client::TunnelClient;

/// Shortest time between two refreshes triggered by unknown names.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);
/// Longest a proxy request waits for a refresh triggered by its name.
const INLINE_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster names the server reported last.
#[derive(Debug, Default)]
pub struct ClusterCache {
    names: RwLock<HashSet<String>>,
    /// When the last refresh started; held across a refresh so that
    /// concurrent callers wait for it instead of starting their own.
    last: tokio::sync::Mutex<Option<Instant>>,
    connected: AtomicBool,
    connected_gauge: Gauge,
}

impl ClusterCache {
    /// A cache that mirrors the connection state into `connected_gauge`
    /// (1 connected, 0 not).
    pub fn new(connected_gauge: Gauge) -> Self {
        Self {
            connected_gauge,
            ..Self::default()
        }
    }

    /// Whether `name` is a known cluster.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .read()
            .map(|n| n.contains(&name.to_ascii_lowercase()))
            .unwrap_or(false)
    }

    /// Whether the last contact with the server succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Fetches the list now.
    pub async fn refresh(&self, client: &TunnelClient) {
        let mut last = self.last.lock().await;
        *last = Some(Instant::now());
        self.fetch(client).await;
    }

    async fn fetch(&self, client: &TunnelClient) {
        match client.list_clusters().await {
            Ok(list) => {
                let names: HashSet<String> = list.into_iter().map(|c| c.name).collect();
                if let Ok(mut n) = self.names.write() {
                    if *n != names {
                        tracing::info!(clusters = ?names, "cluster list changed");
                    }
                    *n = names;
                }
                self.connected_gauge.set(1);
                if !self.connected.swap(true, Ordering::AcqRel) {
                    tracing::info!("connected to the tunnel server");
                }
            }
            Err(err) => {
                self.connected_gauge.set(0);
                if self.connected.swap(false, Ordering::AcqRel) {
                    tracing::warn!(%err, "lost the tunnel server; direct connections go on");
                } else {
                    tracing::debug!(%err, "tunnel server still unreachable");
                }
            }
        }
    }

    /// Makes sure the list was fetched after `now` (a caller that just met
    /// a name it does not know): waits for a refresh under way, or starts
    /// one, at most one a second ([`MIN_REFRESH_GAP`]), for up to two
    /// seconds in all. Does nothing while the server is unreachable (the
    /// background refresh retries every second): a request must not wait for
    /// a hub outage.
    pub async fn refresh_soon(&self, client: &TunnelClient) {
        if !self.is_connected() {
            return;
        }
        let asked = Instant::now();
        let inline = async {
            let mut last = self.last.lock().await;
            if let Some(t) = *last {
                if t >= asked {
                    return; // fetched since we asked
                }
                let next = t + MIN_REFRESH_GAP;
                tokio::time::sleep_until(next.into()).await;
            }
            *last = Some(Instant::now());
            self.fetch(client).await;
        };
        if tokio::time::timeout(INLINE_REFRESH_TIMEOUT, inline)
            .await
            .is_err()
        {
            tracing::debug!("cluster list refresh is slow; deciding with the list at hand");
        }
    }

    /// Refreshes every `interval` until `stop`.
    pub async fn run(
        &self,
        client: &TunnelClient,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = self.refresh(client) => {}
            }
            // Retry sooner while disconnected, so the connection follows quickly.
            let wait = if self.is_connected() {
                interval
            } else {
                interval.min(Duration::from_secs(1))
            };
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
