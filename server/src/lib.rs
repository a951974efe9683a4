//! The cluster-tunnel proxy server.
//!
//! - [`agents`]: the agent port. Agents dial in over mTLS; on each such
//!   connection the server is the HTTP/2 client and opens one stream per
//!   proxied connection (reverse tunnel).
//! - [`tunnel`]: the client port's `Tunnel` service. Routes each connection
//!   to an agent of its cluster and splices the streams.
//! - [`pool`]: the connected agents by cluster, and how one is picked.
//! - [`policy`]: who may reach which clusters and destinations (the
//!   `TunnelPolicy` resource and the standalone policy file);
//!   [`policy_watch`]: `TunnelPolicy` objects followed with kube-runtime;
//!   [`ocm_clusters`]: open-cluster-management clusters' labels and sets.
//! - [`authn`]: the caller's identity: its certificate, or a service-account
//!   token checked with the Kubernetes `TokenReview` API.
//! - [`metrics`]: Prometheus metrics, served on the admin port with
//!   `/healthz` and `/readyz`.
//! - [`probes`]: the server's own periodic probe of every cluster.
//!
//! [`Server::start`] binds everything and returns a handle; [`cli`] is the
//! binary's command line.

pub mod agents;
pub mod authn;
pub mod cli;
pub mod metrics;
pub mod ocm_clusters;
pub mod policy;
pub mod policy_watch;
pub mod pool;
pub mod probes;
pub mod tunnel;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tunnel_proto::h2::H2Settings;

use crate::metrics::ServerMetrics;
use crate::pool::AgentPool;

/// Default time the server gives an agent to reach a destination.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time open connections get to finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a TLS handshake on any port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `--server-count` the server accepts.
pub const MAX_SERVER_COUNT: u32 = 1000;

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where agents connect.
    pub agent_listen: SocketAddr,
    /// Where clients (sidecars, tools) connect.
    pub client_listen: SocketAddr,
    /// Health, readiness and metrics.
    pub admin_listen: SocketAddr,
    /// TLS configuration of both tunnel ports (client certificates required).
    /// Built from files, it follows them (see [`tunnel_proto::tls::TlsSource`]).
    pub tls: tunnel_proto::tls::ServerTls,
    /// Trust domain of identities in certificates.
    pub trust_domain: String,
    /// This server's id, told to agents.
    pub server_id: String,
    /// How many server replicas there are, told to agents (see
    /// `HelloRequest.server_count`); 1 for a single server or when agents
    /// resolve every replica's address themselves.
    pub server_count: u32,
    /// Clusters known before their agents connect.
    pub known_clusters: Vec<String>,
    /// Time an agent gets to reach a destination.
    pub dial_timeout: Duration,
    /// Time open connections get to finish on shutdown.
    pub drain_timeout: Duration,
    /// HTTP/2 settings of tunnel connections.
    pub h2: H2Settings,
    /// Authentication of callers and authorization of their connections.
    pub auth: AuthConfig,
    /// The server's own periodic probes of every cluster ([`probes`]).
    pub probe: probes::ProbeConfig,
    /// Bounds on connections.
    pub limits: Limits,
}

/// Default most connections one client identity may have open.
pub const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: u64 = 10_000;
/// Default most connections one agent tunnel may carry.
pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: u64 = 10_000;

/// Bounds on connections. A connection beyond one is refused with
/// `resource_exhausted` and a log line.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections one identity (token subject, else certificate) may have open.
    pub max_connections_per_identity: u64,
    /// Connections one agent tunnel may carry.
    pub max_connections_per_agent: u64,
    /// Cut a connection that moved no byte for this long (off by default).
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            max_connections_per_agent: DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            idle_timeout: None,
        }
    }
}

/// Where the authorization policy comes from.
#[derive(Debug, Clone, Default)]
pub enum PolicySource {
    /// No policy: every client may reach every cluster (logged as a warning at start).
    #[default]
    None,
    /// A file, re-read when it changes.
    File {
        /// The file.
        path: PathBuf,
        /// How often it is checked.
        reload_interval: Duration,
    },
    /// `TunnelPolicy` objects in the Kubernetes cluster the server runs in.
    Kubernetes,
    /// A policy the caller keeps up to date (tests, embedding).
    Fixed(watch::Receiver<Arc<policy::Policy>>),
}

/// How callers are identified and what they may reach.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The policy.
    pub policy: PolicySource,
    /// Labels of each cluster, for policies that select clusters by label.
    pub cluster_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// With a Kubernetes policy: clusters' labels and sets from open-cluster-management.
    pub clusters_from_ocm: bool,
    /// Cut open connections that a changed policy no longer allows.
    pub enforce_on_change: bool,
    /// Validate service-account tokens with the TokenReview API.
    pub token_review: Option<authn::TokenReviewConfig>,
}

/// State shared by the server's tasks.
pub struct ServerState {
    /// The configuration.
    pub config: ServerConfig,
    /// Connected agents.
    pub pool: AgentPool,
    /// Metrics.
    pub metrics: ServerMetrics,
    /// The policy in force; `None` when authorization is off.
    pub policy: Option<watch::Receiver<Arc<policy::Policy>>>,
    /// Token validation, when on.
    pub token_reviewer: Option<authn::TokenReviewer>,
    /// Connections open per identity.
    pub identity_counts: tunnel::IdentityCounts,
    draining: AtomicBool,
    open: AtomicUsize,
    all_closed: Notify,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("server_id", &self.config.server_id)
            .finish()
    }
}

impl ServerState {
    /// Whether the server is shutting down (no new connections).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn connection_opened(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }

    fn connection_closed(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_closed.notify_waiters();
        }
    }

    /// Proxied connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The agent port's address.
    pub agent_addr: SocketAddr,
    /// The client port's address.
    pub client_addr: SocketAddr,
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    state: Arc<ServerState>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds the three ports and starts serving.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let agent_l = TcpListener::bind(config.agent_listen)
            .await
            .with_context(|| format!("cannot listen on agent address {}", config.agent_listen))?;
        let client_l = TcpListener::bind(config.client_listen)
            .await
            .with_context(|| format!("cannot listen on client address {}", config.client_listen))?;
        let admin_l = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen on admin address {}", config.admin_listen))?;
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry);
        let needs_kube = config.auth.token_review.is_some()
            || matches!(config.auth.policy, PolicySource::Kubernetes);
        let kube_client = if needs_kube {
            Some(
                kube::Client::try_default()
                    .await
                    .context("--token-review and --policy-kubernetes need Kubernetes API access")?,
            )
        } else {
            None
        };
        let mut tasks = Vec::new();
        let policy = match &config.auth.policy {
            PolicySource::None => {
                tracing::warn!(
                    "no policy configured (--policy-file, --policy-kubernetes): every authenticated client may reach every cluster"
                );
                None
            }
            PolicySource::Fixed(rx) => Some(rx.clone()),
            PolicySource::File {
                path,
                reload_interval,
            } => {
                let first = policy::load_policy_file(path)
                    .with_context(|| format!("--policy-file {}", path.display()))?;
                tracing::info!(path = %path.display(), rules = first.len(), "policy loaded");
                let (tx, rx) = watch::channel(Arc::new(first));
                let m = metrics.clone();
                tasks.push(tokio::spawn(policy::watch_policy_file(
                    path.clone(),
                    *reload_interval,
                    tx,
                    move |r| m.policy_reload(r.is_ok()),
                )));
                Some(rx)
            }
            PolicySource::Kubernetes => {
                let client = kube_client.clone().expect("created above");
                let (rx, task) = policy_watch::watch_policies(
                    client,
                    metrics.clone(),
                    config.auth.clusters_from_ocm,
                );
                tasks.push(task);
                Some(rx)
            }
        };
        let token_reviewer = config
            .auth
            .token_review
            .clone()
            .map(|c| authn::TokenReviewer::new(kube_client.clone().expect("created above"), c));
        let state = Arc::new(ServerState {
            pool: AgentPool::with_known_clusters(&config.known_clusters),
            policy,
            token_reviewer,
            identity_counts: tunnel::IdentityCounts::default(),
            metrics,
            config,
            draining: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let agent_addr = agent_l.local_addr()?;
        let client_addr = client_l.local_addr()?;
        let admin_addr = admin_l.local_addr()?;
        tasks.push(tokio::spawn(agents::accept_agents(
            agent_l,
            state.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(agents::accept_clients(
            client_l,
            state.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(probes::run(state.clone(), stop_rx.clone())));
        let ready_state = state.clone();
        let admin = tunnel_proto::admin::AdminServer::new(
            Arc::new(registry),
            Arc::new(move || !ready_state.is_draining()),
        );
        let mut admin_stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move { agents::stopped(&mut admin_stop).await };
            if let Err(err) = admin.serve(admin_l, stop).await {
                tracing::error!(%err, "admin server failed");
            }
        }));
        tracing::info!(%agent_addr, %client_addr, %admin_addr, server_id = %state.config.server_id, server_count = state.config.server_count, "tunnel server started");
        Ok(Self {
            agent_addr,
            client_addr,
            admin_addr,
            state,
            stop,
            tasks,
        })
    }

    /// The shared state (pool, metrics).
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Graceful shutdown: stop accepting, tell clients to go elsewhere, let
    /// open connections finish for up to the drain timeout, then stop.
    pub async fn shutdown(mut self) {
        let mut tasks = std::mem::take(&mut self.tasks);
        let deadline = self.state.config.drain_timeout;
        self.state.draining.store(true, Ordering::Release);
        tracing::info!(open = self.state.open_connections(), ?deadline, "draining");
        let wait_closed = async {
            loop {
                let notified = self.state.all_closed.notified();
                if self.state.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        // Then the connections close once their last frames are out: client
        // connections after GOAWAY, agent tunnels when nothing uses them.
        let finished = async {
            wait_closed.await;
            for t in &mut tasks {
                let _ = t.await;
            }
        };
        // Stop accepting and send GOAWAY to clients, keep agent tunnels for open connections.
        let _ = self.stop.send(true);
        if tokio::time::timeout(deadline, finished).await.is_err() {
            tracing::warn!(
                open = self.state.open_connections(),
                "drain deadline passed; closing remaining connections"
            );
        }
        for t in &tasks {
            t.abort();
        }
        tracing::info!("tunnel server stopped");
    }
}
