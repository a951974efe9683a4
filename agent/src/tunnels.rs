//! Keeps a reverse tunnel up to every proxy server replica.
//!
//! Each configured server address is resolved; every address it resolves to
//! gets its own tunnel, so any replica behind a DNS name can reach this
//! cluster. Names are re-resolved periodically: new replicas get a tunnel,
//! and a tunnel to an address that left DNS is not re-established once it
//! breaks. Every tunnel reconnects with capped, jittered backoff, forever.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::h2::{H2Settings, serve_connection};
use tunnel_proto::pb::agent_server::AgentServer;

use crate::allowlist::Allowlist;
use crate::dial::{AgentService, DialerShared};
use crate::metrics::AgentMetrics;

/// Default interval between DNS re-resolutions of server names.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets the backoff.
const STABLE_TUNNEL: Duration = Duration::from_secs(10);
/// Time to connect to a server (TCP + TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server addresses, `host:port`; a name may resolve to many replicas.
    pub servers: Vec<String>,
    /// Name the server certificate must carry, if not each address's host.
    pub server_name: Option<String>,
    /// The cluster this agent serves (must match its certificate).
    pub cluster: String,
    /// This agent's id.
    pub agent_id: String,
    /// TLS client configuration with the agent certificate.
    pub tls: tunnel_proto::tls::ClientTls,
    /// HTTP/2 settings of the tunnels.
    pub h2: H2Settings,
    /// Destinations that may be dialed.
    pub allowlist: Allowlist,
    /// Longest time to resolve and connect to a destination.
    pub dial_timeout: Duration,
    /// Names answered before DNS, like /etc/hosts (lower-case names).
    pub host_aliases: std::collections::HashMap<String, std::net::IpAddr>,
    /// How often server names are re-resolved.
    pub resolve_interval: Duration,
    /// Admin port address.
    pub admin_listen: SocketAddr,
    /// Backoff between reconnection attempts: base and cap.
    pub backoff: (Duration, Duration),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    metrics: AgentMetrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Starts the admin port and the tunnels.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let admin_l = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen on admin address {}", config.admin_listen))?;
        let admin_addr = admin_l.local_addr()?;
        let mut registry = Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(DialerShared {
            agent_id: config.agent_id.clone(),
            cluster: config.cluster.clone(),
            allowlist: config.allowlist.clone(),
            dial_timeout: config.dial_timeout,
            host_aliases: config.host_aliases.clone(),
            metrics: metrics.clone(),
        });
        let gauge = metrics.tunnels_up.clone();
        let admin = tunnel_proto::admin::AdminServer::new(
            Arc::new(registry),
            Arc::new(move || gauge.get() > 0),
        );
        let mut admin_stop = stop_rx.clone();
        let mut tasks = vec![tokio::spawn(async move {
            let stop = async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            };
            if let Err(err) = admin.serve(admin_l, stop).await {
                tracing::error!(%err, "admin server failed");
            }
        })];
        tasks.push(tokio::spawn(supervise(
            Arc::new(config.clone()),
            shared,
            stop_rx,
        )));
        tracing::info!(cluster = %config.cluster, agent = %config.agent_id, servers = ?config.servers, %admin_addr, "tunnel agent started");
        Ok(Self {
            admin_addr,
            stop,
            metrics,
            tasks,
        })
    }

    /// Tunnels up now.
    pub fn tunnels_up(&self) -> i64 {
        self.metrics.tunnels_up.get()
    }

    /// Stops: tunnels send GOAWAY (open connections run on), then everything
    /// ends after `drain` at the latest.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(true);
        let metrics = self.metrics.clone();
        let drained = async {
            while metrics.open_connections.get() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let _ = tokio::time::timeout(drain, drained).await;
        for t in &self.tasks {
            t.abort();
        }
        tracing::info!("tunnel agent stopped");
    }
}

/// Resolves every server entry to the addresses to keep tunnels to. An entry
/// whose name does not resolve keeps its previous addresses.
async fn resolve_all(
    servers: &[String],
    previous: &HashMap<SocketAddr, String>,
) -> HashMap<SocketAddr, String> {
    let mut out = HashMap::new();
    for entry in servers {
        let host = tunnel_proto::client::host_of(entry).to_owned();
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(addrs) => {
                for a in addrs {
                    out.insert(a, host.clone());
                }
            }
            Err(err) => {
                tracing::warn!(server = %entry, %err, "cannot resolve server address; keeping the last known addresses");
                for (a, h) in previous {
                    if *h == host {
                        out.insert(*a, h.clone());
                    }
                }
            }
        }
    }
    out
}

async fn supervise(
    config: Arc<AgentConfig>,
    shared: Arc<DialerShared>,
    mut stop: watch::Receiver<bool>,
) {
    let (wanted_tx, wanted_rx) = watch::channel(HashSet::<SocketAddr>::new());
    let mut current: HashMap<SocketAddr, String> = HashMap::new();
    let mut running: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        current = resolve_all(&config.servers, &current).await;
        wanted_tx.send_replace(current.keys().copied().collect());
        running.retain(|_, t| !t.is_finished());
        for (addr, host) in &current {
            if running.contains_key(addr) {
                continue;
            }
            let task = tokio::spawn(keep_tunnel(
                *addr,
                host.clone(),
                config.clone(),
                shared.clone(),
                wanted_rx.clone(),
                stop.clone(),
            ));
            running.insert(*addr, task);
        }
        tokio::select! {
            _ = tokio::time::sleep(config.resolve_interval) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, t) in running {
        let _ = t.await;
    }
}

/// One tunnel to one server address, reconnected until the address leaves
/// DNS or the agent stops.
async fn keep_tunnel(
    addr: SocketAddr,
    host: String,
    config: Arc<AgentConfig>,
    shared: Arc<DialerShared>,
    wanted: watch::Receiver<HashSet<SocketAddr>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(config.backoff.0, config.backoff.1);
    loop {
        if *stop.borrow() {
            return;
        }
        if !wanted.borrow().contains(&addr) {
            tracing::info!(server = %addr, "server address left DNS; not reconnecting");
            return;
        }
        let started = Instant::now();
        let result = run_tunnel(addr, &host, &config, &shared, stop.clone()).await;
        if *stop.borrow() {
            return;
        }
        shared.metrics.tunnel_failures.inc();
        if started.elapsed() > STABLE_TUNNEL {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => {
                tracing::warn!(server = %addr, retry_in = ?delay, "tunnel closed by the server; reconnecting")
            }
            Err(err) => {
                tracing::warn!(server = %addr, %err, retry_in = ?delay, attempt = backoff.attempts(), "tunnel failed; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn run_tunnel(
    addr: SocketAddr,
    host: &str,
    config: &AgentConfig,
    shared: &Arc<DialerShared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tunnel_proto::net::tune_tunnel_socket(&tcp, &config.h2.liveness);
        let name_str = config
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_owned());
        let name = match name_str.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(name_str.clone())
                .map_err(|e| format!("server name {name_str:?}: {e}"))?,
        };
        tokio_rustls::TlsConnector::from(config.tls.current())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    })
    .await
    .map_err(|_| "connect timed out".to_owned())??;
    let svc = AgentService::new(shared.clone());
    let server =
        AgentServer::new(svc.clone()).max_decoding_message_size(tunnel_proto::MAX_MESSAGE_BYTES);
    let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gauge = shared.metrics.tunnels_up.clone();
    let watch_up = {
        let svc = svc.clone();
        let counted = counted.clone();
        let gauge = gauge.clone();
        async move {
            let notified = svc.hello.notified();
            if !svc.is_up() {
                notified.await;
            }
            counted.store(true, std::sync::atomic::Ordering::Release);
            gauge.inc();
            std::future::pending::<()>().await;
        }
    };
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        r = serve_connection(tls, server, &config.h2, shutdown) => r.map_err(|e| format!("HTTP/2: {e}")),
        () = watch_up => Ok(()),
    };
    if counted.load(std::sync::atomic::Ordering::Acquire) {
        gauge.dec();
    }
    result
}
