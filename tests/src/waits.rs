//! Waits with deadlines: until a condition holds, a port listens, an admin
//! port is ready, the server lists a cluster's agents; and what the server
//! says about its agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tunnel_proto::client::TunnelClient;

use crate::http_get;

/// Polls `check` until it is true; panics with `what` after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the in-process `server` has no proxied connection open (its
/// records closed: audit lines written, bytes counted).
pub async fn wait_all_closed(server: &tunnel_server::Server) {
    let state = server.state().clone();
    wait_until(
        "the server has no connection open",
        Duration::from_secs(10),
        || {
            let open = state.open_connections();
            async move { open == 0 }
        },
    )
    .await;
}

/// Waits until a TCP connect to `addr` succeeds.
pub async fn wait_listening(addr: SocketAddr, what: &str) {
    wait_until(
        &format!("{what} listens on {addr}"),
        Duration::from_secs(20),
        || async move { TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

/// Waits until `GET /readyz` on an admin port answers 200.
pub async fn wait_ready(admin: SocketAddr, what: &str) {
    wait_until(
        &format!("{what} is ready (/readyz on {admin})"),
        Duration::from_secs(20),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
    )
    .await;
}

/// How many agents of `cluster` the server lists (0 when it cannot be asked).
pub async fn listed_agents(client: &TunnelClient, cluster: &str) -> usize {
    match client.list_clusters().await {
        Ok(clusters) => clusters
            .iter()
            .find(|c| c.name == cluster)
            .map(|c| c.agents.len())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until the server lists exactly `n` agents of `cluster`.
pub async fn wait_listed_agents(client: &Arc<TunnelClient>, cluster: &str, n: usize) {
    wait_until(
        &format!("the server lists {n} agent(s) of cluster {cluster}"),
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let cluster = cluster.to_owned();
            async move { listed_agents(&client, &cluster).await == n }
        },
    )
    .await;
}

/// When the server last picked `agent` for a connection (Unix ms; 0: never,
/// or the server cannot be asked).
pub async fn last_picked(client: &TunnelClient, agent: &str) -> u64 {
    let clusters = client.list_clusters().await.unwrap_or_default();
    clusters
        .iter()
        .flat_map(|c| c.agents.iter())
        .filter(|a| a.agent_id == agent)
        .map(|a| a.last_picked_unix_ms)
        .max()
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (the clock of [`last_picked`]).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
