//! The live view: agents connected per cluster, as the servers report them
//! (`ListClusters`), asked every `--live-view-interval` and published on a
//! `watch` channel only when it changed, so that the addon controller
//! reconciles every addon on a change and not on every poll.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_proto::client::TunnelClient;
use tunnel_proto::pb::ClusterInfo;

/// Agents connected per cluster, as the servers last listed them; `None`
/// when the servers could not be asked.
pub type LiveView = Option<HashMap<String, usize>>;

/// Where the clusters are listed from: the servers, or a test's list.
pub trait ListClusters {
    /// Why a listing failed.
    type Error: std::fmt::Display;
    /// The clusters the servers hold tunnels for.
    fn list_clusters(&self) -> impl Future<Output = Result<Vec<ClusterInfo>, Self::Error>> + Send;
}

impl ListClusters for TunnelClient {
    type Error = tunnel_proto::error::TunnelError;
    fn list_clusters(&self) -> impl Future<Output = Result<Vec<ClusterInfo>, Self::Error>> + Send {
        TunnelClient::list_clusters(self)
    }
}

/// The view from one listing; a failed one is logged and gives `None`.
pub fn view_of<E: std::fmt::Display>(listing: Result<Vec<ClusterInfo>, E>) -> LiveView {
    match listing {
        Ok(list) => Some(list.into_iter().map(|c| (c.name, c.agents.len())).collect()),
        Err(error) => {
            tracing::warn!(%error, "cannot list the server's clusters");
            None
        }
    }
}

/// Publishes `view` if it differs from the last one; whether it did.
pub fn publish(tx: &watch::Sender<LiveView>, view: LiveView) -> bool {
    tx.send_if_modified(|old| {
        let changed = *old != view;
        *old = view;
        changed
    })
}

/// Asks `servers` every `interval` and publishes each change on `tx`, until
/// `stop`.
pub async fn run(
    servers: impl ListClusters,
    tx: watch::Sender<LiveView>,
    interval: Duration,
    stop: CancellationToken,
) {
    let poll = async {
        loop {
            publish(&tx, view_of(servers.list_clusters().await));
            tokio::time::sleep(interval).await;
        }
    };
    stop.run_until_cancelled(poll).await;
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tunnel_proto::pb::AgentInfo;

    use super::*;

    /// Answers the listings it was given, in order, then fails.
    struct Scripted(Mutex<VecDeque<Result<Vec<ClusterInfo>, &'static str>>>);

    impl ListClusters for Scripted {
        type Error = &'static str;
        fn list_clusters(
            &self,
        ) -> impl Future<Output = Result<Vec<ClusterInfo>, Self::Error>> + Send {
            let next = self.0.lock().map_or(Err("poisoned"), |mut q| {
                q.pop_front().unwrap_or(Err("the script is over"))
            });
            std::future::ready(next)
        }
    }

    fn cluster(name: &str, agents: usize) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            agents: vec![AgentInfo::default(); agents],
        }
    }

    fn view(entries: &[(&str, usize)]) -> LiveView {
        Some(entries.iter().map(|&(n, a)| (n.to_owned(), a)).collect())
    }

    #[test]
    fn the_view_counts_agents_per_cluster_and_a_failed_listing_is_none() {
        let listing: Result<_, &str> = Ok(vec![cluster("east", 2), cluster("west", 0)]);
        assert_eq!(view_of(listing), view(&[("east", 2), ("west", 0)]));
        assert_eq!(view_of::<&str>(Err("no server answers")), None);
    }

    #[test]
    fn only_a_changed_view_is_published() {
        let (tx, rx) = watch::channel::<LiveView>(None);
        assert!(!publish(&tx, None), "still unknown");
        assert!(!rx.has_changed().unwrap());
        assert!(publish(&tx, view(&[("east", 1)])));
        assert!(!publish(&tx, view(&[("east", 1)])), "the same again");
        assert!(publish(&tx, view(&[("east", 2)])));
        assert!(publish(&tx, None), "the servers went away");
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_are_asked_every_interval() {
        let script = Scripted(Mutex::new(VecDeque::from([
            Ok(vec![cluster("east", 1)]),
            Ok(vec![cluster("east", 1)]),
            Ok(vec![cluster("east", 2)]),
        ])));
        let (tx, mut rx) = watch::channel::<LiveView>(None);
        let start = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run(script, tx, Duration::from_secs(30), stop.clone()));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), view(&[("east", 1)]));
        // The second listing is the same: the next change is the third, two intervals on.
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), view(&[("east", 2)]));
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        // Then the script fails: the view is unknown again.
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), None);
        assert_eq!(start.elapsed(), Duration::from_secs(90));
        // Stopped, it returns at once, not after its interval.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), poller)
            .await
            .expect("the poller stops when told")
            .unwrap();
    }
}
