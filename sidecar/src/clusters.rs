//! The clusters the server knows, refreshed in the background. The refresh
//! also keeps the connection to the server up and tells readiness.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tunnel_proto::client::TunnelClient;

/// Shortest time between two refreshes triggered by unknown names.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// The cluster names the server reported last.
#[derive(Debug, Default)]
pub struct ClusterCache {
    names: RwLock<HashSet<String>>,
    last: tokio::sync::Mutex<Option<Instant>>,
    connected: AtomicBool,
}

impl ClusterCache {
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
        *self.last.lock().await = Some(Instant::now());
        match client.list_clusters().await {
            Ok(list) => {
                let names: HashSet<String> = list.into_iter().map(|c| c.name).collect();
                if let Ok(mut n) = self.names.write() {
                    if *n != names {
                        tracing::info!(clusters = ?names, "cluster list changed");
                    }
                    *n = names;
                }
                if !self.connected.swap(true, Ordering::AcqRel) {
                    tracing::info!("connected to the tunnel server");
                }
            }
            Err(err) => {
                if self.connected.swap(false, Ordering::AcqRel) {
                    tracing::warn!(%err, "lost the tunnel server");
                } else {
                    tracing::debug!(%err, "tunnel server still unreachable");
                }
            }
        }
    }

    /// Refreshes unless a refresh happened within the last second.
    pub async fn refresh_soon(&self, client: &TunnelClient) {
        let recent = matches!(*self.last.lock().await, Some(t) if t.elapsed() < MIN_REFRESH_GAP);
        if !recent {
            self.refresh(client).await;
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
            self.refresh(client).await;
            // Retry sooner while disconnected, so readiness follows quickly.
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
