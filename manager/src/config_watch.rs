//! The `TunnelConfiguration` the manager runs by, followed: every change of
//! the one named `--config-name` is published on a `watch` channel, so that
//! the controllers read the current configuration (certificate validity,
//! the live view's triggers) without each watching it. A deleted
//! configuration is published as `None`.

use std::sync::Arc;

use futures_util::StreamExt as _;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_api::configuration::TunnelConfiguration;

/// The configuration as last seen; `None` while there is none.
pub type CurrentConfiguration = Option<Arc<TunnelConfiguration>>;

/// Publishes the configuration `name` on `tx` until `stop`. A watch
/// error is logged; the watcher starts again by itself.
pub async fn follow(
    api: Api<TunnelConfiguration>,
    name: &str,
    tx: watch::Sender<CurrentConfiguration>,
    stop: CancellationToken,
) {
    let mut stream = std::pin::pin!(watcher::watch_object(api, name));
    while let Some(Some(event)) = stop.run_until_cancelled(stream.next()).await {
        match event {
            Ok(config) => {
                tx.send_replace(config.map(Arc::new));
            }
            Err(error) => tracing::warn!(%error, "watching the TunnelConfiguration"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against kube's mocked API server: the initial list is answered, the
    //! watch that follows is left open (as an API server does while nothing
    //! changes).

    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::mock_api::{self, Reply, TIMEOUT, finish, serve};

    const CONFIGS: &str = "/apis/cluster-tunnel.io/v1alpha1/tunnelconfigurations";

    fn list(items: Vec<Value>) -> Reply {
        Reply::With(
            200,
            json!({
                "apiVersion": "cluster-tunnel.io/v1alpha1",
                "kind": "TunnelConfigurationList",
                "metadata": { "resourceVersion": "7" },
                "items": items,
            }),
        )
    }

    /// Follows `cluster-tunnel` through `client` until `stop`.
    async fn follow_until(
        client: kube::Client,
        tx: watch::Sender<CurrentConfiguration>,
        stop: CancellationToken,
    ) {
        follow(Api::all(client), "cluster-tunnel", tx, stop).await;
    }

    /// Stops the follower and checks that it returns, though its watch is
    /// still open.
    async fn stopped(follower: tokio::task::JoinHandle<()>, stop: &CancellationToken) {
        stop.cancel();
        tokio::time::timeout(TIMEOUT, follower)
            .await
            .expect("the follower stops when told")
            .unwrap();
    }

    fn configuration(replicas: i32) -> Value {
        json!({
            "apiVersion": "cluster-tunnel.io/v1alpha1",
            "kind": "TunnelConfiguration",
            "metadata": { "name": "cluster-tunnel", "resourceVersion": "7" },
            "spec": {
                "server": {
                    "image": "registry.example/tunnel-server:2",
                    "replicas": replicas,
                    "entrypoint": { "type": "LoadBalancerService", "loadBalancerService": { "name": "cluster-tunnel-server-agents" } },
                },
                "agent": { "image": "agent:1" },
            },
        })
    }

    #[tokio::test]
    async fn the_configuration_found_is_published() {
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![(Method::GET, CONFIGS, list(vec![configuration(3)]))],
        );
        let (tx, mut rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow_until(client, tx, stop.clone()));
        let config = tokio::time::timeout(TIMEOUT, rx.wait_for(Option::is_some))
            .await
            .expect("published in time")
            .expect("the follower runs")
            .clone()
            .expect("waited for one");
        assert_eq!(config.metadata.name.as_deref(), Some("cluster-tunnel"));
        assert_eq!(config.spec.server.replicas, 3);
        // Kept alive until the end: the watch that follows stays open.
        let (_handle, _) = finish(server).await;
        stopped(follower, &stop).await;
    }

    #[tokio::test]
    async fn a_configuration_that_is_gone_is_published_as_none() {
        let (client, handle) = mock_api::client();
        let server = serve(handle, vec![(Method::GET, CONFIGS, list(vec![]))]);
        // Seen before, deleted since.
        let seen: TunnelConfiguration = serde_json::from_value(configuration(3)).unwrap();
        let (tx, mut rx) = watch::channel(Some(Arc::new(seen)));
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow_until(client, tx, stop.clone()));
        tokio::time::timeout(TIMEOUT, rx.changed())
            .await
            .expect("published in time")
            .expect("the follower runs");
        assert!(rx.borrow().is_none());
        let (_handle, _) = finish(server).await;
        stopped(follower, &stop).await;
    }
}
