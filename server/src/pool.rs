//! The agents connected to this server, by cluster, and how a connection
//! picks one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tunnel_proto::h2::H2Client;
use tunnel_proto::pb;

/// One agent's reverse tunnel to this server.
pub struct AgentTunnel {
    /// The agent's id (from its hello).
    pub agent_id: String,
    /// The cluster, from the agent's certificate.
    pub cluster: String,
    /// Where the agent connected from.
    pub remote_addr: std::net::SocketAddr,
    /// When the tunnel came up.
    pub since: SystemTime,
    /// Proxied connections open through this tunnel.
    pub open: AtomicU64,
    /// Opens streams towards the agent.
    pub channel: H2Client,
    /// When a dial through this tunnel last failed at the transport level.
    pub last_failure: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a tunnel whose dial failed is passed over while others are usable.
pub const FAILURE_PENALTY: std::time::Duration = std::time::Duration::from_secs(10);

impl AgentTunnel {
    /// Records a transport-level dial failure: the tunnel is passed over for
    /// [`FAILURE_PENALTY`] while other agents of the cluster are usable.
    pub fn mark_failed(&self) {
        if let Ok(mut f) = self.last_failure.lock() {
            *f = Some(std::time::Instant::now());
        }
    }

    fn recently_failed(&self) -> bool {
        self.last_failure
            .lock()
            .map(|f| f.is_some_and(|t| t.elapsed() < FAILURE_PENALTY))
            .unwrap_or(false)
    }
}

impl std::fmt::Debug for AgentTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTunnel")
            .field("agent_id", &self.agent_id)
            .field("cluster", &self.cluster)
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}

/// What routing found for a cluster.
#[derive(Debug)]
pub enum Pick {
    /// Use this agent.
    Agent(Arc<AgentTunnel>),
    /// No agent of this cluster has ever connected, nor is it configured.
    UnknownCluster,
    /// The cluster is known but none of its agents is usable now.
    NoAgent,
}

impl Pick {
    /// Whether an agent was found.
    pub fn is_agent(&self) -> bool {
        matches!(self, Pick::Agent(_))
    }
}

/// Agents by cluster.
#[derive(Debug, Default)]
pub struct AgentPool {
    clusters: RwLock<HashMap<String, Vec<Arc<AgentTunnel>>>>,
    rotation: AtomicU64,
}

impl AgentPool {
    /// A pool that knows `clusters` before any of their agents connects.
    pub fn with_known_clusters(clusters: &[String]) -> Self {
        let pool = Self::default();
        {
            let mut map = pool.clusters.write().unwrap_or_else(|e| e.into_inner());
            for c in clusters {
                map.entry(c.clone()).or_default();
            }
        }
        pool
    }

    /// Adds a tunnel; returns how many agents the cluster has now.
    pub fn add(&self, tunnel: Arc<AgentTunnel>) -> usize {
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let agents = map.entry(tunnel.cluster.clone()).or_default();
        agents.push(tunnel);
        agents.len()
    }

    /// Removes a tunnel; the cluster stays known. Returns how many agents are left.
    pub fn remove(&self, tunnel: &Arc<AgentTunnel>) -> usize {
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let agents = map.entry(tunnel.cluster.clone()).or_default();
        agents.retain(|t| !Arc::ptr_eq(t, tunnel));
        agents.len()
    }

    /// Picks the usable agent of `cluster` with the fewest open connections,
    /// skipping those in `tried`; ties go round-robin.
    pub fn pick(&self, cluster: &str, tried: &[Arc<AgentTunnel>]) -> Pick {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let Some(agents) = map.get(cluster) else {
            return Pick::UnknownCluster;
        };
        let n = agents.len();
        if n == 0 {
            return Pick::NoAgent;
        }
        let start = (self.rotation.fetch_add(1, Ordering::Relaxed) as usize) % n;
        // (recently failed, open connections): healthy and least loaded first.
        let mut best: Option<(&Arc<AgentTunnel>, (bool, u64))> = None;
        for i in 0..n {
            let a = &agents[(start + i) % n];
            if a.channel.is_closed() || tried.iter().any(|t| Arc::ptr_eq(t, a)) {
                continue;
            }
            let key = (a.recently_failed(), a.open.load(Ordering::Relaxed));
            if best.is_none_or(|(_, k)| key < k) {
                best = Some((a, key));
            }
        }
        let best = best.map(|(a, _)| a);
        match best {
            Some(a) => Pick::Agent(a.clone()),
            None => Pick::NoAgent,
        }
    }

    /// Every known cluster with its agents, sorted by name.
    pub fn snapshot(&self) -> Vec<pb::ClusterInfo> {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<pb::ClusterInfo> = map
            .iter()
            .map(|(name, agents)| pb::ClusterInfo {
                name: name.clone(),
                agents: agents
                    .iter()
                    .map(|a| pb::AgentInfo {
                        agent_id: a.agent_id.clone(),
                        remote_addr: a.remote_addr.to_string(),
                        connected_since: a
                            .since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                        open_connections: a.open.load(Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Agents connected now, over all clusters.
    pub fn agent_count(&self) -> usize {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(Vec::len).sum()
    }
}
