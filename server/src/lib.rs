//! The cluster-tunnel proxy server.
//!
//! - [`agents`]: the agent port. Agents dial in over mTLS; on each such
//!   connection the server is the HTTP/2 client and opens one stream per
//!   proxied connection (reverse tunnel).
//! - [`tunnel`]: the client port's own protocol: one HTTP/2 `CONNECT`
//!   stream per connection, and the `Tunnel` control service.
//! - [`connection`]: the one way every client connection goes, whatever
//!   its front end: authentication, policy, the bound per identity, an agent
//!   of its cluster (`route`: pick, retry on another), the splice, and its
//!   record (`record`: audit lines and metrics).
//! - [`konnectivity`]: apiserver-network-proxy's konnectivity protocol on
//!   the client port, for its Go client; [`http_connect`]: HTTP CONNECT
//!   over HTTP/1.1 on the same port; [`addresses`]: how the addresses such
//!   clients dial name a cluster.
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

pub mod addresses;
pub mod agents;
pub mod authn;
pub mod cli;
pub mod connection;
pub mod http_connect;
pub mod konnectivity;
pub mod metrics;
pub mod ocm_clusters;
pub mod policy;
pub mod policy_watch;
pub mod pool;
pub mod probes;
mod record;
mod route;
pub mod tunnel;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_proto::h2::H2Settings;
use tunnel_shell::process::{ListenError, listen};

use crate::metrics::ServerMetrics;
use crate::pool::AgentPool;

/// Default time the server gives an agent to reach a destination.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time open connections get to finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a TLS handshake on any port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `--server-count` the server accepts: as many as an agent keeps tunnels to.
pub use tunnel_proto::MAX_SERVER_COUNT;
/// Default time the server keeps serving after SIGTERM, not ready, before it
/// sends GOAWAY.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// Default longest wait for agents before a new server reports ready.
pub const DEFAULT_READY_WAIT: Duration = Duration::from_secs(10);
/// Default time an agent has to acknowledge an open.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// A server with agents is ready once no new agent came for this long.
pub const READY_SETTLE: Duration = Duration::from_secs(1);

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
    /// Restarts and failing agents.
    pub ha: HaConfig,
    /// How the konnectivity and HTTP CONNECT entries read dialed addresses.
    pub addressing: addresses::Addressing,
}

/// How the server takes part in a rollout and treats agents that fail.
#[derive(Debug, Clone, Copy)]
pub struct HaConfig {
    /// On shutdown, time the server keeps serving, not ready and with its
    /// agents told to find another replica, before it sends clients GOAWAY
    /// (for load balancers and endpoints to stop sending it connections).
    pub shutdown_delay: Duration,
    /// A new server is ready once agents connected and none came for
    /// [`READY_SETTLE`], or after this long without them.
    pub ready_wait: Duration,
    /// Time an agent has to acknowledge an open before the open goes to
    /// another agent and this one counts as failing.
    pub ack_timeout: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
            ready_wait: DEFAULT_READY_WAIT,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        }
    }
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
    /// With a Kubernetes policy: clusters' labels and sets from
    /// open-cluster-management, and agents admitted only for accepted
    /// `ManagedCluster`s with the addon ([`ocm_clusters::admitted`]).
    pub clusters_from_ocm: bool,
    /// The clusters whose agents are admitted, kept by the caller (tests,
    /// embedding); with `clusters_from_ocm` they come from OCM instead.
    pub admitted_clusters: Option<ocm_clusters::Admitted>,
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
    pub identity_counts: connection::IdentityCounts,
    /// With `--clusters-from-ocm`: the clusters whose agents are admitted.
    pub ocm_admitted: Option<ocm_clusters::Admitted>,
    draining: AtomicBool,
    stopping: AtomicBool,
    started: std::time::Instant,
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
    /// Whether the server is shutting down: not ready, agents told to go;
    /// clients are still served until [`is_stopping`](Self::is_stopping).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the shutdown delay is over: clients were sent GOAWAY, new
    /// connections are refused with `server_draining`.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Whether the server can serve (`GET /readyz`): not shutting down, and
    /// agents connected (none new for [`READY_SETTLE`]), or
    /// [`HaConfig::ready_wait`] passed without them.
    pub fn is_ready(&self) -> bool {
        if self.is_draining() {
            return false;
        }
        let settled = self
            .pool
            .last_added()
            .is_some_and(|t| t.elapsed() >= READY_SETTLE);
        (settled && self.pool.agent_count() > 0)
            || self.started.elapsed() >= self.config.ha.ready_wait
    }

    /// How [`route::route`] treats agents.
    pub(crate) fn route_limits(&self) -> route::RouteLimits {
        route::RouteLimits {
            max_per_agent: self.config.limits.max_connections_per_agent,
            ack_timeout: self.config.ha.ack_timeout,
        }
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

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A port (`agent`, `client`, `admin`) could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// `--token-review` or `--policy-kubernetes` without a reachable Kubernetes API.
    #[error("--token-review and --policy-kubernetes need Kubernetes API access: {0}")]
    Kubernetes(#[source] kube::Error),
    /// The policy file does not load.
    #[error("--policy-file {}: {source}", path.display())]
    PolicyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: policy::PolicyError,
    },
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
    /// Closes the ports and sends clients GOAWAY; cancelled too when the
    /// server is dropped.
    stop: CancellationToken,
    /// Closes the agent port and tells every agent to go; a child of `stop`.
    leave: CancellationToken,
    _stop_on_drop: DropGuard,
    /// The ports' tasks (with their connections), the probes and the admin
    /// server: they end at `stop` once their connections have, and a
    /// shutdown waits for them.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The policy's watch (file or Kubernetes). It runs for as long as the
    /// server does, through the drain (a changed policy still applies to the
    /// connections left), so a shutdown never waits for it: it is aborted
    /// once the rest has stopped.
    policy_watch: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds the three ports and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        let (agent_l, agent_addr) = listen("agent", config.agent_listen).await?;
        let (client_l, client_addr) = listen("client", config.client_listen).await?;
        let (admin_l, admin_addr) = listen("admin", config.admin_listen).await?;
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry);
        let needs_kube = config.auth.token_review.is_some()
            || matches!(config.auth.policy, PolicySource::Kubernetes);
        let kube_client = if needs_kube {
            Some(
                kube::Client::try_default()
                    .await
                    .map_err(StartError::Kubernetes)?,
            )
        } else {
            None
        };
        let mut policy_watch = None;
        let mut ocm_admitted = config.auth.admitted_clusters.clone();
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
                let first =
                    policy::load_policy_file(path).map_err(|source| StartError::PolicyFile {
                        path: path.clone(),
                        source,
                    })?;
                tracing::info!(path = %path.display(), rules = first.len(), "policy loaded");
                let (tx, rx) = watch::channel(Arc::new(first));
                let m = metrics.clone();
                policy_watch = Some(tokio::spawn(policy::watch_policy_file(
                    path.clone(),
                    *reload_interval,
                    tx,
                    move |r| m.policy_reload(r.is_ok()),
                )));
                Some(rx)
            }
            PolicySource::Kubernetes => {
                let client = kube_client.clone().expect("created above");
                let (rx, admitted, task) = policy_watch::watch_policies(
                    client,
                    metrics.clone(),
                    config.auth.clusters_from_ocm,
                );
                policy_watch = Some(task);
                ocm_admitted = admitted.or(ocm_admitted);
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
            identity_counts: connection::IdentityCounts::default(),
            ocm_admitted,
            metrics,
            config,
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started: std::time::Instant::now(),
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
        });
        let stop = CancellationToken::new();
        let leave = stop.child_token();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(agents::accept_agents(
            agent_l,
            state.clone(),
            leave.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(agents::accept_clients(
            client_l,
            state.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(probes::run(state.clone(), stop.clone())));
        let ready_state = state.clone();
        let detail_state = state.clone();
        let admin = tunnel_shell::admin::AdminServer::new(
            Arc::new(registry),
            Arc::new(move || ready_state.is_ready()),
        )
        .with_ready_detail(Arc::new(move || {
            let agents = detail_state.pool.agent_count();
            if detail_state.is_draining() {
                format!("shutting down; agents: {agents}")
            } else {
                format!("agents: {agents}")
            }
        }));
        let admin_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = admin.serve(admin_l, admin_stop).await {
                tracing::error!(%err, "admin server failed");
            }
        }));
        tracing::info!(%agent_addr, %client_addr, %admin_addr, server_id = %state.config.server_id, server_count = state.config.server_count, "tunnel server started");
        Ok(Self {
            agent_addr,
            client_addr,
            admin_addr,
            state,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            leave,
            tasks,
            policy_watch,
        })
    }

    /// The shared state (pool, metrics).
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Graceful shutdown, in three steps:
    /// 1. not ready; the agent port closes and every agent is told to open a
    ///    tunnel to another replica (it keeps this one meanwhile); clients
    ///    are still served for the shutdown delay, while endpoints and load
    ///    balancers stop sending new ones;
    /// 2. clients get GOAWAY (they open new connections elsewhere), the
    ///    client port closes, new agents' opens stop;
    /// 3. open connections get up to the drain timeout to finish. The
    ///    server stops as soon as none is open and its tunnels are closed:
    ///    client connections after GOAWAY, agent tunnels once nothing uses
    ///    them (GOAWAY, then a lingering close); one whose peer is gone
    ///    (reset or closed: its process ended) is closed already. The
    ///    policy's watch keeps the policy current meanwhile and is not waited
    ///    for.
    pub async fn shutdown(mut self) {
        let mut tasks = std::mem::take(&mut self.tasks);
        let policy_watch = self.policy_watch.take();
        let deadline = self.state.config.drain_timeout;
        let delay = self.state.config.ha.shutdown_delay;
        self.state.draining.store(true, Ordering::Release);
        self.leave.cancel();
        tracing::info!(
            open = self.state.open_connections(),
            agents = self.state.pool.agent_count(),
            ?delay,
            "shutting down: not ready, agents told to find another replica; serving for the shutdown delay"
        );
        tokio::time::sleep(delay).await;
        self.state.stopping.store(true, Ordering::Release);
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
        self.stop.cancel();
        if tokio::time::timeout(deadline, finished).await.is_err() {
            tracing::warn!(
                open = self.state.open_connections(),
                "drain deadline passed; closing remaining connections"
            );
        }
        for t in tasks.iter().chain(&policy_watch) {
            t.abort();
        }
        tracing::info!("tunnel server stopped");
    }
}
