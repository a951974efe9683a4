//! Keeps a reverse tunnel up to every proxy server replica.
//!
//! Each configured server address is resolved; every address it resolves to
//! gets its own tunnel, so any replica behind a DNS name can reach this
//! cluster. Names are re-resolved periodically: new replicas get a tunnel,
//! and a tunnel to an address that left DNS is not re-established once it
//! breaks. Every tunnel reconnects with capped, jittered backoff, forever.
//!
//! When the servers say there are several replicas (`--server-count`), an
//! address may be a load balancer in front of all of them: the address then
//! keeps opening tunnels until the agent holds one to every replica, refusing
//! connections that land on a replica it already has (see [`crate::servers`]
//! for the rules), and re-fills when one breaks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_proto::backoff::Backoff;
use tunnel_proto::h2::{H2Server, H2Settings};
use tunnel_proto::pb::agent_server::AgentServer;

use crate::allowlist::Allowlist;
use crate::dial::{AgentService, DialerShared, HelloGate};
use crate::metrics::AgentMetrics;
use crate::servers::{Claim, MAX_SERVER_COUNT, ServerRegistry, effective_count, needs_tunnel};

/// Default interval between DNS re-resolutions of server names.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets the backoff.
const STABLE_TUNNEL: Duration = Duration::from_secs(10);
/// Time to connect to a server (TCP + TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time from the TLS handshake to the server's hello (the server's own
/// limit is 10 s).
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Time the server gets to close a refused duplicate connection.
const DUPLICATE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Kernel send and receive buffer of each destination socket, in bytes;
    /// 0 leaves them to the kernel's autotuning.
    pub socket_buffer: usize,
    /// Names answered before DNS, like /etc/hosts (lower-case names).
    pub host_aliases: std::collections::HashMap<String, std::net::IpAddr>,
    /// How often server names are re-resolved.
    pub resolve_interval: Duration,
    /// Admin port address.
    pub admin_listen: SocketAddr,
    /// Backoff between reconnection attempts: base and cap.
    pub backoff: (Duration, Duration),
    /// The HTTP proxy servers are reached through, if any (`HTTPS_PROXY`, `NO_PROXY`).
    pub proxy: crate::proxy::ProxySettings,
}

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The admin port could not be bound.
    #[error(transparent)]
    Listen(#[from] tunnel_shell::process::ListenError),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    /// Stops the tunnels (GOAWAY) and the admin port; cancelled too when the
    /// agent is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    metrics: AgentMetrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Starts the admin port and the tunnels.
    pub async fn start(config: AgentConfig) -> Result<Self, StartError> {
        let (admin_l, admin_addr) =
            tunnel_shell::process::listen("admin", config.admin_listen).await?;
        let mut registry = Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        let stop = CancellationToken::new();
        let shared = Arc::new(DialerShared {
            agent_id: config.agent_id.clone(),
            cluster: config.cluster.clone(),
            allowlist: config.allowlist.clone(),
            dial_timeout: config.dial_timeout,
            host_aliases: config.host_aliases.clone(),
            metrics: metrics.clone(),
            liveness: config.h2.liveness,
            socket_buffer: config.socket_buffer,
        });
        let gauge = metrics.tunnels_up.clone();
        let admin = tunnel_shell::admin::AdminServer::new(
            Arc::new(registry),
            Arc::new(move || gauge.get() > 0),
        );
        let admin_stop = stop.clone();
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(err) = admin.serve(admin_l, admin_stop).await {
                tracing::error!(%err, "admin server failed");
            }
        })];
        tasks.push(tokio::spawn(supervise(
            Arc::new(config.clone()),
            shared,
            stop.clone(),
        )));
        tracing::info!(cluster = %config.cluster, agent = %config.agent_id, servers = ?config.servers, %admin_addr, "tunnel agent started");
        Ok(Self {
            admin_addr,
            _stop_on_drop: stop.clone().drop_guard(),
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
        self.stop.cancel();
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

/// Resolves every server entry to the addresses to keep tunnels to, each with
/// the entry it came from. An entry whose name does not resolve keeps its
/// previous addresses.
async fn resolve_all(
    servers: &[String],
    previous: &HashMap<SocketAddr, Arc<str>>,
) -> HashMap<SocketAddr, Arc<str>> {
    let mut out = HashMap::new();
    for entry in servers {
        let entry: Arc<str> = entry.as_str().into();
        match tokio::net::lookup_host(&*entry).await {
            Ok(addrs) => {
                for a in addrs {
                    out.insert(a, entry.clone());
                }
            }
            Err(err) => {
                tracing::warn!(server = %entry, %err, "cannot resolve server address; keeping the last known addresses");
                for (a, e) in previous {
                    if *e == entry {
                        out.insert(*a, e.clone());
                    }
                }
            }
        }
    }
    out
}

/// A task aborted when dropped, so that stopping the supervisor stops
/// everything it started.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn supervise(config: Arc<AgentConfig>, shared: Arc<DialerShared>, stop: CancellationToken) {
    let registry = Arc::new(ServerRegistry::default());
    let (wanted_tx, wanted_rx) = watch::channel(HashSet::<SocketAddr>::new());
    let mut current: HashMap<SocketAddr, Arc<str>> = HashMap::new();
    let mut running: HashMap<SocketAddr, Task> = HashMap::new();
    loop {
        current = resolve_all(&config.servers, &current).await;
        wanted_tx.send_replace(current.keys().copied().collect());
        running.retain(|_, t| !t.0.is_finished());
        for (addr, entry) in &current {
            if running.contains_key(addr) {
                continue;
            }
            let address = ServerAddress {
                addr: *addr,
                entry: entry.clone(),
                config: config.clone(),
                shared: shared.clone(),
                registry: registry.clone(),
            };
            let task = tokio::spawn(keep_tunnels(address, wanted_rx.clone(), stop.clone()));
            running.insert(*addr, Task(task));
        }
        tokio::select! {
            _ = tokio::time::sleep(config.resolve_interval) => {}
            () = stop.cancelled() => break,
        }
    }
    for (_, mut t) in running {
        let _ = (&mut t.0).await;
    }
}

/// One resolved server address and what its tunnels need.
struct ServerAddress {
    addr: SocketAddr,
    /// The `--server` entry the address came from.
    entry: Arc<str>,
    config: Arc<AgentConfig>,
    shared: Arc<DialerShared>,
    registry: Arc<ServerRegistry>,
}

/// A tunnel's HTTP/2 connection, served until it ends.
type Connection = Pin<Box<dyn Future<Output = Result<(), TunnelFailure>> + Send>>;

/// Why a tunnel could not be opened, or ended other than by the server
/// closing it.
#[derive(Debug, thiserror::Error)]
enum TunnelFailure {
    /// The TCP connection to the server (direct or through the proxy) failed.
    #[error(transparent)]
    Connect(crate::proxy::DialError),
    /// The name the server's certificate must have is not a DNS name.
    #[error("server name {name:?}: {source}")]
    ServerName {
        name: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// TCP and TLS took longer than [`CONNECT_TIMEOUT`].
    #[error("connect timed out")]
    ConnectTimeout,
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2: {0}")]
    Handshake(#[source] h2::Error),
    /// The HTTP/2 connection failed after its handshake.
    #[error("HTTP/2: {0}")]
    Connection(#[source] tunnel_proto::h2::ConnError),
    /// The connection ended cleanly before the server said hello.
    #[error("the server closed the connection before its hello")]
    ClosedBeforeHello,
    /// The tunnel's control service went away before the server said hello.
    #[error("the tunnel closed before the server's hello")]
    GoneBeforeHello,
    /// The server said no hello within [`HELLO_TIMEOUT`].
    #[error("no hello from the server within {HELLO_TIMEOUT:?}")]
    NoHello,
}

/// A tunnel the server said hello on and the agent admitted.
struct UpTunnel {
    server_id: String,
    server_count: u32,
    claim: Claim,
    conn: Connection,
    /// Cancelled when the server asks the agent to leave.
    leave: CancellationToken,
}

/// How an attempt to open a tunnel ended.
enum Attempt {
    /// The tunnel is up.
    Up(UpTunnel),
    /// The connection reached a server the agent already holds a tunnel to.
    Duplicate {
        server_id: String,
        server_count: u32,
    },
    /// No tunnel: connect, TLS or HTTP/2 failed, or the server said no hello.
    Failed(TunnelFailure),
}

/// How a tunnel that was up ended.
struct Ended {
    server_id: String,
    result: Result<(), TunnelFailure>,
    uptime: Duration,
}

/// Keeps the tunnels through one server address: one, or with a server count
/// N > 1 up to N to distinct servers (see [`crate::servers`]), reconnecting
/// until the address leaves DNS or the agent stops. On stop, waits for the
/// tunnels (sent GOAWAY) to finish their open connections.
async fn keep_tunnels(
    server: ServerAddress,
    mut wanted: watch::Receiver<HashSet<SocketAddr>>,
    stop: CancellationToken,
) {
    let mut keeper = Keeper::new(server);
    let mut changes = keeper.server.registry.subscribe();
    loop {
        if stop.is_cancelled() {
            break;
        }
        let is_wanted = wanted.borrow().contains(&keeper.server.addr);
        if !is_wanted && keeper.live.is_empty() {
            tracing::info!(server = %keeper.server.addr, "server address left DNS; not reconnecting");
            return;
        }
        let need = is_wanted && keeper.needs_tunnel();
        if need && Instant::now() >= keeper.not_before {
            tokio::select! {
                attempt = keeper.server.open(stop.clone()) => keeper.attempted(attempt),
                () = stop.cancelled() => break,
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            Some(ended) = keeper.live.join_next() => {
                if stop.is_cancelled() {
                    break;
                }
                if let Ok(ended) = ended {
                    keeper.ended(ended);
                }
            }
            Ok(()) = changes.changed() => {}
            Ok(()) = wanted.changed() => {}
            () = tokio::time::sleep_until(keeper.not_before), if need => {}
        }
    }
    // Stopping: the tunnels sent GOAWAY; their open connections run to their end.
    while keeper.live.join_next().await.is_some() {}
}

/// The state of one address's tunnels.
struct Keeper {
    server: ServerAddress,
    backoff: Backoff,
    /// The tunnels through this address that are up.
    live: JoinSet<Ended>,
    /// Of those, the ones whose server asked the agent to leave: they carry
    /// their last connections and are not counted as held.
    leaving: Arc<std::sync::atomic::AtomicUsize>,
    /// The effective server count last told through this address.
    count: u32,
    /// No attempt before this instant (the backoff after a failure).
    not_before: Instant,
}

impl Keeper {
    fn new(server: ServerAddress) -> Self {
        Self {
            backoff: Backoff::new(server.config.backoff.0, server.config.backoff.1),
            server,
            live: JoinSet::new(),
            leaving: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            count: 1,
            not_before: Instant::now(),
        }
    }

    /// Whether this address should open one more tunnel now.
    fn needs_tunnel(&self) -> bool {
        let covered = self.server.registry.covered(&self.server.entry);
        let leaving = self.leaving.load(std::sync::atomic::Ordering::Acquire);
        needs_tunnel(self.count, self.live.len().saturating_sub(leaving), covered)
    }

    /// Waits for the backoff's next delay before the next attempt.
    fn back_off(&mut self) -> Duration {
        let delay = self.backoff.next_delay();
        self.not_before = Instant::now() + delay;
        delay
    }

    /// Follows the server count a hello told, logging changes.
    fn heard_count(&mut self, told: u32) {
        let count = effective_count(told);
        let addr = self.server.addr;
        if count != self.count {
            if told > MAX_SERVER_COUNT {
                tracing::warn!(server = %addr, server_count = told, max = MAX_SERVER_COUNT, "the server claims more replicas than an agent keeps tunnels to; keeping tunnels to at most {MAX_SERVER_COUNT}");
            } else {
                tracing::info!(server = %addr, server_count = count, "servers behind this address: {count}");
            }
        }
        self.count = count;
    }

    /// Takes the outcome of an attempt: runs the tunnel, or backs off.
    fn attempted(&mut self, attempt: Attempt) {
        let addr = self.server.addr;
        match attempt {
            Attempt::Up(up) => {
                self.heard_count(up.server_count);
                tracing::info!(server = %addr, server_id = %up.server_id, server_count = self.count, tunnels_of_address = self.live.len() + 1, "tunnel up");
                let tunnels_up = self.server.shared.metrics.tunnels_up.clone();
                self.live.spawn(run_up(
                    up,
                    tunnels_up,
                    self.leaving.clone(),
                    self.server.registry.clone(),
                ));
            }
            Attempt::Duplicate {
                server_id,
                server_count,
            } => {
                self.heard_count(server_count);
                self.server.shared.metrics.duplicate_tunnels.inc();
                let delay = self.back_off();
                tracing::info!(server = %addr, %server_id, server_count = self.count, retry_in = ?delay, "connection reached a server this agent already has a tunnel to; closed, will try again for another replica");
            }
            Attempt::Failed(err) => {
                self.server.shared.metrics.tunnel_failures.inc();
                let delay = self.back_off();
                tracing::warn!(server = %addr, %err, retry_in = ?delay, attempt = self.backoff.attempts(), "tunnel failed; reconnecting");
            }
        }
    }

    /// Takes the end of a tunnel that was up: counts it and backs off before
    /// re-filling (from the start if it had been stable).
    fn ended(&mut self, ended: Ended) {
        let addr = self.server.addr;
        self.server.shared.metrics.tunnel_failures.inc();
        if ended.uptime > STABLE_TUNNEL {
            self.backoff.reset();
        }
        let delay = self.back_off();
        match ended.result {
            Ok(()) => {
                tracing::warn!(server = %addr, server_id = %ended.server_id, retry_in = ?delay, "tunnel closed by the server; reconnecting")
            }
            Err(err) => {
                tracing::warn!(server = %addr, server_id = %ended.server_id, %err, retry_in = ?delay, attempt = self.backoff.attempts(), "tunnel failed; reconnecting")
            }
        }
    }
}

impl ServerAddress {
    /// Connects and waits for the server's hello.
    async fn open(&self, stop: CancellationToken) -> Attempt {
        let tls = match self.connect().await {
            Ok(tls) => tls,
            Err(err) => return Attempt::Failed(err),
        };
        let (told_tx, told_rx) = oneshot::channel();
        let gate = HelloGate::new(self.registry.clone(), self.entry.clone(), told_tx);
        let svc = AgentService::with_gate(self.shared.clone(), gate);
        let leave = svc.leave_signal();
        let mut conn = serve_tunnel(tls, svc, self.config.clone(), stop);
        let told = tokio::select! {
            told = tokio::time::timeout(HELLO_TIMEOUT, told_rx) => told,
            ended = &mut conn => {
                let err = ended.err().unwrap_or(TunnelFailure::ClosedBeforeHello);
                return Attempt::Failed(err);
            }
        };
        let hello = match told {
            Ok(Ok(hello)) => hello,
            Ok(Err(_)) => {
                return Attempt::Failed(TunnelFailure::GoneBeforeHello);
            }
            Err(_) => {
                return Attempt::Failed(TunnelFailure::NoHello);
            }
        };
        match hello.admission {
            Ok(claim) => Attempt::Up(UpTunnel {
                server_id: hello.server_id,
                server_count: hello.server_count,
                claim,
                conn,
                leave,
            }),
            Err(duplicate) => {
                // The server closes the connection once it has read the refusal.
                let _ = tokio::time::timeout(DUPLICATE_CLOSE_TIMEOUT, conn).await;
                Attempt::Duplicate {
                    server_id: duplicate.server_id,
                    server_count: hello.server_count,
                }
            }
        }
    }

    /// TCP and TLS to the server address, within [`CONNECT_TIMEOUT`].
    async fn connect(&self) -> Result<TlsStream<TcpStream>, TunnelFailure> {
        let config = &self.config;
        let host = tunnel_proto::client::host_of(&self.entry);
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = crate::proxy::connect(&config.proxy, host, self.addr.port(), self.addr)
                .await
                .map_err(TunnelFailure::Connect)?;
            tunnel_proto::net::tune_tunnel_socket(&tcp, &config.h2.liveness);
            let name_str = config.server_name.as_deref().unwrap_or(host);
            let name = match name_str.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(name_str.to_owned()).map_err(|source| {
                    TunnelFailure::ServerName {
                        name: name_str.to_owned(),
                        source,
                    }
                })?,
            };
            tokio_rustls::TlsConnector::from(config.tls.current())
                .connect(name, tcp)
                .await
                .map_err(TunnelFailure::Tls)
        })
        .await
        .map_err(|_| TunnelFailure::ConnectTimeout)?
    }
}

/// Serves a tunnel's TLS connection until it ends: the server's streams
/// (each a connection to dial) and its control calls (hello). `stop` sends
/// GOAWAY (open connections run to their end).
fn serve_tunnel(
    tls: TlsStream<TcpStream>,
    svc: AgentService,
    config: Arc<AgentConfig>,
    stop: CancellationToken,
) -> Connection {
    let control =
        AgentServer::new(svc.clone()).max_decoding_message_size(tunnel_proto::MAX_MESSAGE_BYTES);
    Box::pin(async move {
        let mut conn = H2Server::handshake(tls, &config.h2)
            .await
            .map_err(TunnelFailure::Handshake)?;
        loop {
            match conn.accept_until(&stop).await {
                Some(Ok((req, respond))) => {
                    if req.method() == http::Method::CONNECT {
                        let guard = match conn.conn().try_stream_opened(u64::MAX) {
                            Ok(guard) => guard,
                            Err(full) => {
                                // Refused unread (before any acknowledgement,
                                // nothing dialed): the server may open it on
                                // another agent.
                                tracing::warn!(%full, "stream refused");
                                let mut respond = respond;
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                continue;
                            }
                        };
                        let svc = svc.clone();
                        tokio::spawn(async move { svc.serve_stream(req, respond, guard).await });
                    } else {
                        tokio::spawn(tunnel_proto::grpc::serve(control.clone(), req, respond));
                    }
                }
                Some(Err(err)) => return Err(TunnelFailure::Connection(err)),
                None => return Ok(()),
            }
        }
    })
}

/// Counts one gauge up while alive.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn inc(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves a tunnel that is up until it ends, counted in `tunnels_up` and
/// holding its server id meanwhile. When the server asks the agent to leave,
/// the tunnel counts in `leaving` and no longer covers its server, so that
/// its address opens a tunnel to another replica while this one carries its
/// last connections.
async fn run_up(
    up: UpTunnel,
    tunnels_up: Gauge,
    leaving: Arc<std::sync::atomic::AtomicUsize>,
    registry: Arc<ServerRegistry>,
) -> Ended {
    use std::sync::atomic::Ordering;
    let UpTunnel {
        server_id,
        mut claim,
        mut conn,
        leave,
        ..
    } = up;
    let _counted = GaugeGuard::inc(tunnels_up);
    let started = Instant::now();
    let mut left = false;
    let result = loop {
        tokio::select! {
            result = &mut conn => break result,
            () = leave.cancelled(), if !left => {
                left = true;
                leaving.fetch_add(1, Ordering::AcqRel);
                claim.leave();
                // Wakes the address's keeper even when the tunnel held no id.
                registry.touch();
            }
        }
    };
    if left {
        leaving.fetch_sub(1, Ordering::AcqRel);
    }
    drop(claim);
    Ended {
        server_id,
        result,
        uptime: started.elapsed(),
    }
}
