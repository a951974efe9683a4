//! Test harness for cluster-tunnel: certificates, the server and agents as
//! library calls or as real processes, destination services, and waits with
//! deadlines. The end-to-end tests and the benchmark use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_agent::allowlist::Allowlist;
use tunnel_agent::{Agent, AgentConfig};
use tunnel_proto::client::{ClientOptions, Target, TunnelClient};
use tunnel_proto::h2::H2Settings;
use tunnel_proto::tls::TlsFiles;
use tunnel_server::{Server, ServerConfig};

pub mod konnectivity;
pub mod netns;
pub mod wan;

/// Installs the crypto provider and a test log subscriber (RUST_LOG decides).
pub fn init() {
    tunnel_proto::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A CA and certificates for the given clusters and clients, in a temp dir.
pub struct Pki {
    /// The directory holding the PEM files.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Generates a fresh installation's certificates.
    pub fn new(clusters: &[&str], clients: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::generate_into(dir.path(), clusters, clients);
        Self { dir }
    }

    /// Generates (or adds to) the certificates in `dir`.
    pub fn generate_into(dir: &Path, clusters: &[&str], clients: &[&str]) {
        let opts = tunnel_identity::cert_dir::CertOptions {
            trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            clusters: clusters.iter().map(|s| s.to_string()).collect(),
            // "ns/sa" names a workload certificate.
            clients: clients
                .iter()
                .filter(|s| !s.contains('/'))
                .map(|s| s.to_string())
                .collect(),
            workloads: clients
                .iter()
                .filter(|s| s.contains('/'))
                .map(|s| s.to_string())
                .collect(),
            validity_days: 30,
        };
        tunnel_identity::cert_dir::generate(dir, &opts).expect("certificates");
    }

    /// The path of a file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// TLS files of `name` (e.g. "server", "agent-east", "client-app").
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), name)
    }
}

/// A server configuration on loopback with ephemeral ports.
pub fn server_config(pki: &Pki) -> ServerConfig {
    ServerConfig {
        agent_listen: "127.0.0.1:0".parse().unwrap(),
        client_listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        tls: tunnel_proto::tls::ServerTls::server(pki.files("server")).expect("server TLS"),
        trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
        server_id: "test-server".into(),
        server_count: 1,
        known_clusters: vec![],
        dial_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        h2: H2Settings::default(),
        auth: Default::default(),
        // Off by default so that tests' dial counts stay their own; see tests/tests/probes.rs.
        probe: tunnel_server::probes::ProbeConfig::disabled(),
        limits: tunnel_server::Limits::default(),
        // In-process servers stop at once and are ready at once; the HA tests
        // run the binaries with the real defaults.
        ha: tunnel_server::HaConfig {
            shutdown_delay: Duration::ZERO,
            ready_wait: Duration::ZERO,
            ..Default::default()
        },
        addressing: Default::default(),
    }
}

/// Starts a server in this process.
pub async fn start_server(pki: &Pki) -> Server {
    Server::start(server_config(pki))
        .await
        .expect("server starts")
}

/// Starts a server in this process whose policy is `policy` (the YAML of a
/// policy file, fixed for the test), or without authorization when `None`.
pub async fn start_server_with_policy(pki: &Pki, policy: Option<&str>) -> Server {
    let mut config = server_config(pki);
    if let Some(policy) = policy {
        let policy = tunnel_server::policy::parse_policy_text("test", policy).expect("a policy");
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(policy));
        // The policy never changes; the receiver keeps it.
        drop(tx);
        config.auth = tunnel_server::AuthConfig {
            policy: tunnel_server::PolicySource::Fixed(rx),
            ..Default::default()
        };
    }
    Server::start(config).await.expect("server starts")
}

/// Starts an agent of `cluster` that resolves each of `hosts` to 127.0.0.1
/// (a cluster's names, served on loopback).
pub async fn start_agent_resolving(
    pki: &Pki,
    cluster: &str,
    server: &Server,
    hosts: &[&str],
) -> Agent {
    let mut config = agent_config(pki, cluster, &[server.agent_addr]);
    config.host_aliases = hosts
        .iter()
        .map(|h| (h.to_string(), std::net::IpAddr::from([127, 0, 0, 1])))
        .collect();
    start_agent_with(config, server).await
}

/// An agent configuration for `cluster` that may dial loopback destinations.
pub fn agent_config(pki: &Pki, cluster: &str, servers: &[SocketAddr]) -> AgentConfig {
    AgentConfig {
        servers: servers.iter().map(|a| a.to_string()).collect(),
        server_name: Some("localhost".into()),
        cluster: cluster.into(),
        agent_id: format!("{cluster}-agent-{}", rand::random::<u16>()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files(&format!("agent-{cluster}")))
            .expect("agent TLS"),
        h2: H2Settings::default(),
        allowlist: Allowlist::parse(&["127.0.0.0/8".to_string()]).unwrap(),
        dial_timeout: Duration::from_secs(5),
        socket_buffer: 0,
        host_aliases: Default::default(),
        resolve_interval: Duration::from_secs(30),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        proxy: tunnel_agent::proxy::ProxySettings::none(),
    }
}

/// Starts an agent in this process and waits until its tunnel is up and the
/// server lists it.
pub async fn start_agent(pki: &Pki, cluster: &str, server: &Server) -> Agent {
    start_agent_with(agent_config(pki, cluster, &[server.agent_addr]), server).await
}

/// Starts an agent with `config` and waits until `server` lists one more agent.
pub async fn start_agent_with(config: AgentConfig, server: &Server) -> Agent {
    let before = server.state().pool.agent_count();
    let agent = Agent::start(config).await.expect("agent starts");
    let state = server.state().clone();
    wait_until(
        "the agent's tunnel is registered",
        Duration::from_secs(10),
        || {
            let n = state.pool.agent_count();
            async move { n > before }
        },
    )
    .await;
    agent
}

/// A client of `server` with the certificate of client `name`.
pub fn client(pki: &Pki, name: &str, server: SocketAddr) -> Arc<TunnelClient> {
    Arc::new(TunnelClient::new(ClientOptions {
        servers: vec![server.to_string()],
        server_name: Some("localhost".into()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files(&format!("client-{name}")))
            .expect("client TLS"),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(15),
        token_file: None,
    }))
}

/// Listens on a loopback port and forwards each connection to `target`
/// through the tunnel (what a sidecar's per-cluster port does).
pub async fn forward_port(client: Arc<TunnelClient>, target: Target) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tunnel_proto::client::serve_port(
        listener,
        client,
        target,
        |_| {},
        std::future::pending(),
    ));
    addr
}

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

/// An echo service: writes back what it reads; after the client's FIN it
/// finishes writing and sends its own FIN.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A service that greets first ("hello from <name>\n"), then echoes.
pub async fn start_greeter(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let greeting = format!("hello from {name}\n");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if tcp.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Writes `len` pseudo-random bytes from `seed` and returns their SHA-256.
pub async fn write_random<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    len: usize,
    seed: u64,
) -> std::io::Result<[u8; 32]> {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// Reads to EOF and returns the byte count and SHA-256.
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(usize, [u8; 32])> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// Fetches `path` from an admin port with a plain HTTP/1.1 request; returns
/// the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The directory of the workspace's binaries for the current profile.
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    if deps.ends_with("deps") {
        deps.parent().expect("profile dir").to_owned()
    } else {
        deps.to_owned()
    }
}

/// The path of a workspace binary; panics with how to build it if missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace`; \
         `cargo test --workspace` and `cargo nextest run --workspace` build them)",
        path.display()
    );
    path
}

/// A child process killed on drop, its output in a log file.
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns a workspace binary with `args` and `envs`, output into a log file.
    pub fn spawn(name: &str, binary: &str, args: &[String], envs: &[(&str, &str)]) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin(binary))
            .args(args)
            .envs(envs.iter().copied())
            .env("TUNNEL_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
            _log_dir: log_dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. "TERM", "KILL").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits up to `deadline` for the process to exit; returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process now and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}\n----- end of {} log -----",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

// ---------------------------------------------------------------------------
// Destinations and traffic for the data, isolation and concurrency suites.

/// Starts a loopback TCP service that runs `handler` on every accepted
/// connection, each in its own task.
pub async fn start_service<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

/// What one side of an [`exchange`] sent and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchanged {
    /// Bytes written.
    pub sent: usize,
    /// SHA-256 of the bytes written.
    pub sent_hash: [u8; 32],
    /// Bytes read before EOF.
    pub received: usize,
    /// SHA-256 of the bytes read.
    pub received_hash: [u8; 32],
}

/// Writes `len` random bytes from `seed` (then a FIN) while reading the
/// peer's bytes to EOF, both at once.
pub async fn exchange(tcp: TcpStream, len: usize, seed: u64) -> std::io::Result<Exchanged> {
    let (mut r, mut w) = tcp.into_split();
    let write = async move {
        let hash = write_random(&mut w, len, seed).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(hash)
    };
    let (sent_hash, (received, received_hash)) = tokio::try_join!(write, read_hash(&mut r))?;
    Ok(Exchanged {
        sent: len,
        sent_hash,
        received,
        received_hash,
    })
}

/// A destination that, on each connection, reads everything while writing
/// its own `len` random bytes from `seed` (a different stream from the
/// client's), then half-closes. Reports what it saw per connection.
pub async fn start_exchange(
    len: usize,
    seed: u64,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Exchanged>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = start_service(move |tcp| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(exchange(tcp, len, seed).await);
        }
    })
    .await;
    (addr, rx)
}

/// Megabytes per second of `bytes` moved in `elapsed`.
pub fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

/// An [`AsyncWrite`](tokio::io::AsyncWrite) that counts the bytes written
/// through it, so a test can watch a writer block.
#[derive(Debug)]
pub struct Counted<W> {
    inner: W,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<W> Counted<W> {
    /// Counts what is written to `inner` into `count`.
    pub fn new(inner: W, count: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.count
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's soft open-files limit to at least `want` (up to the
/// hard limit, with `prlimit`); panics if the limit stays below `want`.
pub fn ensure_fd_limit(want: u64) {
    fn soft_and_hard() -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("");
        let mut nums = line.split_whitespace().filter_map(|w| {
            w.parse::<u64>()
                .ok()
                .or((w == "unlimited").then_some(u64::MAX))
        });
        (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
    }
    let (soft, hard) = soft_and_hard();
    if soft >= want {
        return;
    }
    // Root may raise the hard limit too.
    let hard_text = if hard == u64::MAX {
        "unlimited".to_string()
    } else {
        hard.max(want).to_string()
    };
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={want}:{hard_text}"))
        .status();
    let (soft, hard) = soft_and_hard();
    assert!(
        soft >= want,
        "this test needs {want} open files; the limit is {soft} (hard {hard}); raise it with `ulimit -n`"
    );
}

// ---------------------------------------------------------------------------
// Metrics and readiness.

/// The value of one series in Prometheus text, e.g.
/// `tunnel_server_dials_total{code="no_agent"}`; `None` when absent.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `GET /metrics` of an admin port; panics unless it answers 200.
pub async fn fetch_metrics(admin: SocketAddr) -> String {
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), http_get(admin, "/metrics"))
        .await
        .unwrap_or_else(|_| panic!("GET /metrics on {admin} timed out"))
        .unwrap_or_else(|e| panic!("GET /metrics on {admin}: {e}"));
    assert_eq!(status, 200, "GET /metrics on {admin}: {body}");
    body
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

/// Opens a connection to `port` (a forwarded port), sends `len` random
/// bytes while reading the echo, and checks that the echo is identical.
pub async fn check_echo(port: SocketAddr, len: usize) {
    let seed = rand::random();
    let run = async {
        let tcp = TcpStream::connect(port).await?;
        exchange(tcp, len, seed).await
    };
    let got = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("echo of {len} bytes through {port} timed out"))
        .unwrap_or_else(|e| panic!("echo through {port}: {e}"));
    assert_eq!(got.received, len, "echo through {port}: length");
    assert_eq!(
        got.received_hash, got.sent_hash,
        "echo through {port}: data"
    );
}

// ---------------------------------------------------------------------------
// Real processes.

/// Addresses of a server process's three ports.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    /// Agent port.
    pub agent: SocketAddr,
    /// Client port.
    pub client: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
}

impl ServerAddrs {
    /// Three free loopback ports.
    pub fn free() -> Self {
        Self {
            agent: free_addr(),
            client: free_addr(),
            admin: free_addr(),
        }
    }
}

/// A free loopback address for a process to listen on later.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_listen_port()))
}

/// A free loopback port below the kernel's ephemeral range, so that no
/// outgoing connection takes it before a child process binds it.
pub fn free_listen_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000u16.min(low.saturating_sub(1000));
    for _ in 0..1000 {
        let port = floor + rand::random::<u16>() % (low - floor);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// Starts the `tunnel-server` binary on `addrs` with the certificates in
/// `cert_dir`, plus `extra` flags, and waits until its ports listen.
pub async fn spawn_server(
    name: &str,
    cert_dir: &Path,
    addrs: &ServerAddrs,
    extra: &[&str],
) -> Proc {
    let mut args: Vec<String> = [
        "--agent-listen",
        &addrs.agent.to_string(),
        "--client-listen",
        &addrs.client.to_string(),
        "--admin-listen",
        &addrs.admin.to_string(),
        "--cert-dir",
        &cert_dir.display().to_string(),
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Authorization off unless the test names a policy.
    if !extra.iter().any(|a| a.starts_with("--policy")) {
        args.push("--allow-all".into());
    }
    // Ready at once and stopped without delay unless the test says otherwise
    // (the rollout tests run with the defaults).
    for (flag, value) in [("--ready-wait", "0s"), ("--shutdown-delay", "0s")] {
        if !extra.iter().any(|a| a.starts_with(flag)) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = Proc::spawn(name, "tunnel-server", &args, &[]);
    wait_listening(addrs.client, name).await;
    wait_listening(addrs.agent, name).await;
    wait_ready(addrs.admin, name).await;
    proc
}

/// Flags of a `tunnel-agent` for `cluster` dialing `server` (as a user
/// would write them), plus `extra`.
pub fn agent_args(
    cert_dir: &Path,
    cluster: &str,
    server: SocketAddr,
    admin: SocketAddr,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--server",
        &server.to_string(),
        "--server-name",
        "localhost",
        "--cluster",
        cluster,
        "--cert-dir",
        &cert_dir.display().to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--reconnect-base",
        "50ms",
        "--reconnect-max",
        "1s",
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the `tunnel-agent` binary (allowed to dial loopback) without
/// waiting for its tunnel.
pub fn spawn_agent(
    name: &str,
    cert_dir: &Path,
    cluster: &str,
    server: SocketAddr,
    admin: SocketAddr,
) -> Proc {
    let args = agent_args(
        cert_dir,
        cluster,
        server,
        admin,
        &["--allow", "127.0.0.0/8"],
    );
    Proc::spawn(name, "tunnel-agent", &args, &[])
}

impl Proc {
    /// Spawns `cmd` (e.g. a binary run through `ip netns exec`), output into
    /// a log file, killed on drop.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("TUNNEL_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.into(),
            child,
            log,
            _log_dir: log_dir,
        }
    }

    /// Waits until the log holds at least `n` lines containing every one of
    /// `parts`; panics after `deadline`.
    pub async fn wait_log(&self, parts: &[&str], n: usize, deadline: Duration) {
        let count = || {
            self.logs()
                .lines()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .count()
        };
        let start = Instant::now();
        while count() < n {
            assert!(
                start.elapsed() < deadline,
                "{} did not log {n} line(s) containing {parts:?} within {deadline:?} (found {})",
                self.name,
                count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// TLS clients for hostile-peer tests.

/// A TLS 1.3 client configuration that trusts `pki`'s CA but presents no
/// certificate.
pub fn tls_without_client_cert(pki: &Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca.pem") {
        roots.add(cert.expect("CA certificate")).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tunnel_proto::tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Whether a connection to `addr` that sent `first` bytes is refused: the
/// peer closes or resets it, answering at most a TLS alert or an HTTP 400.
/// Returns how it was refused.
pub async fn refused_after(addr: SocketAddr, first: &[u8]) -> Result<String, String> {
    let run = async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The peer may reset before all is written; that is a refusal too.
        let _ = tcp.write_all(first).await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| format!("{addr} kept the connection open for 15 s"))??;
    // A TLS alert record: content type 21, version 3.x.
    let tls_alert = answer.len() >= 7 && answer[0] == 21 && answer[1] == 3;
    let text = String::from_utf8_lossy(&answer);
    if answer.is_empty() {
        Ok("closed".into())
    } else if tls_alert {
        Ok(format!("TLS alert {}, closed", answer[6]))
    } else if text.starts_with("HTTP/1.1 400") {
        Ok("HTTP 400, closed".into())
    } else {
        Err(format!("{addr} answered {text:?}"))
    }
}

/// Runs a TLS handshake without a client certificate against `addr` and
/// tries to use the connection; returns how it failed, or an error if the
/// peer accepted and answered.
pub async fn tls_without_cert_is_refused(pki: &Pki, addr: SocketAddr) -> Result<String, String> {
    let run = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(tls_without_client_cert(pki));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = match connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return Ok(format!("handshake failed: {e}")),
        };
        // TLS 1.3: the client finishes before the server checked its
        // certificate; the refusal arrives as an alert on the next read.
        let _ = tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await;
        let _ = tls.flush().await;
        let mut buf = [0u8; 1024];
        match tls.read(&mut buf).await {
            Ok(0) => Ok("closed".to_string()),
            Err(e) => Ok(format!("refused: {e}")),
            Ok(n) => Err(format!(
                "{addr} accepted a TLS client without a certificate and answered {n} bytes"
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .map_err(|_| format!("{addr} kept a TLS client without a certificate for 15 s"))?
}

// ---------------------------------------------------------------------------
// Network namespaces.

/// Whether this process runs as root (network namespace tests need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a command; panics with its output if it fails.
pub fn run_cmd(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub use netns::NetNs;

impl NetNs {
    /// A namespace with a unique name and random addresses in 10.231.0.0/16,
    /// for tests; panics with the command's output if it cannot be made.
    pub fn create() -> Self {
        let tag: u32 = rand::random::<u32>() & 0xff_ffff;
        let (third, fourth) = (rand::random::<u8>(), rand::random::<u8>() & 0xfc);
        NetNs::create_with(
            &format!("ct-{}-{tag:06x}", std::process::id()),
            &format!("{tag:06x}"),
            std::net::Ipv4Addr::new(10, 231, third, fourth + 1),
        )
        .expect("network namespace")
    }
}

// ---------------------------------------------------------------------------
// HTTP destinations for the sidecar suites.

/// Serves HTTP/1.1 on `io` until the client leaves: every request is
/// answered 200 with a text body whose first line is `hello from <name>`,
/// followed by what arrived, one `key: value` per line (`scheme`, `method`,
/// `target`, `host`, `proxy-authorization`: `absent` or `present`,
/// `body-bytes` and `body-sha256` of the request body), so a test can check
/// both which cluster answered and what the proxy forwarded.
pub async fn serve_http_hello<IO>(io: IO, name: Arc<str>, scheme: &'static str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use sha2::Digest;
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let name = name.clone();
        async move {
            let (parts, body) = req.into_parts();
            let header = |h: hyper::header::HeaderName| {
                parts
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let auth = if parts
                .headers
                .contains_key(hyper::header::PROXY_AUTHORIZATION)
            {
                "present"
            } else {
                "absent"
            };
            let received = body.collect().await?.to_bytes();
            let text = format!(
                "hello from {name}\nscheme: {scheme}\nmethod: {}\ntarget: {}\nhost: {}\n\
                 proxy-authorization: {auth}\nbody-bytes: {}\nbody-sha256: {}\n",
                parts.method,
                parts.uri,
                header(hyper::header::HOST),
                received.len(),
                hex(&sha2::Sha256::digest(&received)),
            );
            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok::<_, hyper::Error>(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves [`serve_http_hello`] on every connection `listener` accepts.
pub fn spawn_http_hello(listener: TcpListener, name: &str) {
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_http_hello(tcp, name.clone(), "http"));
        }
    });
}

/// An HTTP/1.1 service on a loopback port answering `hello from <name>`
/// (see [`serve_http_hello`]).
pub async fn start_http_hello(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn_http_hello(listener, name);
    addr
}

/// Serves [`serve_http_hello`] over TLS (`acceptor`) on every connection
/// `listener` accepts.
pub fn spawn_https_hello(listener: TcpListener, name: &str, acceptor: tokio_rustls::TlsAcceptor) {
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                if let Ok(Ok(tls)) = accepted {
                    serve_http_hello(tls, name, "https").await;
                }
            });
        }
    });
}

impl Pki {
    /// A TLS acceptor for destination services with a certificate for
    /// `server_names` issued by this installation's CA (so `ca.pem` verifies
    /// it), written to the `samples` subdirectory.
    pub fn sample_tls(&self, server_names: &[&str]) -> tokio_rustls::TlsAcceptor {
        let samples = self.path("samples");
        std::fs::create_dir_all(&samples).unwrap();
        for f in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(self.path(f), samples.join(f)).unwrap();
        }
        let opts = tunnel_identity::cert_dir::CertOptions {
            server_names: server_names.iter().map(|s| s.to_string()).collect(),
            ..tunnel_identity::cert_dir::CertOptions::new()
        };
        tunnel_identity::cert_dir::generate(&samples, &opts).expect("sample certificate");
        let files = TlsFiles::in_dir(&samples, "server");
        let certs = tunnel_proto::tls::load_certs(&files.cert, "sample certificate").unwrap();
        let key = tunnel_proto::tls::load_key(&files.key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(tunnel_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

// ---------------------------------------------------------------------------
// Sidecars, proxies and sockets for the stall, reset and benchmark suites.

/// Starts a sidecar in this process (the library the `tunnel-sidecar`
/// binary runs), configured through the binary's own flags so that new
/// settings keep their defaults: client certificate `client-<client_name>`,
/// the server's client port `server`, an HTTP proxy on a free loopback port,
/// and one per-cluster port per `ports` entry (`CLUSTER:HOST:PORT`), in
/// order (`Sidecar::port_addrs`). Waits until it is connected to the server.
pub async fn start_sidecar(
    pki: &Pki,
    client_name: &str,
    server: SocketAddr,
    ports: &[String],
) -> tunnel_sidecar::Sidecar {
    use clap::Parser as _;
    let mut args: Vec<String> = [
        "tunnel-sidecar",
        "--server",
        &server.to_string(),
        "--server-name",
        "localhost",
        "--cert-dir",
        &pki.dir.path().display().to_string(),
        "--client-name",
        client_name,
        "--proxy-listen",
        &free_addr().to_string(),
        "--admin-listen",
        &free_addr().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in ports {
        args.push("--port".into());
        args.push(format!("{}={p}", free_listen_port()));
    }
    let config = tunnel_sidecar::config::Cli::parse_from(args)
        .resolve()
        .expect("sidecar configuration");
    let sidecar = tunnel_sidecar::Sidecar::start(config)
        .await
        .expect("sidecar starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sidecar.is_connected() {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not connect to the server within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sidecar
}

/// `Proxy-Authorization` value naming `cluster` as the proxy user (what
/// `http://<cluster>@proxy` makes a client send).
pub fn proxy_user(cluster: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{cluster}:"))
    )
}

/// Sends `CONNECT host:port` for `cluster` on `tcp` (already connected to a
/// sidecar's proxy) and reads the response head byte by byte, so that no
/// tunnelled byte is consumed. Returns the head; `Ok` only for a 200.
pub async fn connect_on(
    tcp: &mut TcpStream,
    cluster: &str,
    host: &str,
    port: u16,
) -> Result<String, String> {
    let req = format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        proxy_user(cluster)
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b).await {
            Ok(0) => {
                return Err(format!(
                    "the proxy closed the connection after {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            Ok(_) => head.push(b[0]),
            Err(e) => {
                return Err(format!(
                    "reading the CONNECT answer after {:?}: {e}",
                    String::from_utf8_lossy(&head)
                ));
            }
        }
        if head.len() > 16 * 1024 {
            return Err("CONNECT answer head larger than 16 KiB".into());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(head)
    } else {
        Err(format!("CONNECT refused: {head:?}"))
    }
}

/// Kernel buffer sizes for a test's own end of a connection. Small buffers
/// make a stalled connection block after little data, so that what a stall
/// holds is the tunnel's own buffering, and keep the kernel's memory small.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketBuffers {
    /// `SO_SNDBUF`, if set.
    pub send: Option<u32>,
    /// `SO_RCVBUF`, if set.
    pub recv: Option<u32>,
}

impl SocketBuffers {
    /// Both buffers set to `bytes`.
    pub fn small(bytes: u32) -> Self {
        Self {
            send: Some(bytes),
            recv: Some(bytes),
        }
    }

    fn apply(&self, socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
        if let Some(b) = self.send {
            socket.set_send_buffer_size(b)?;
        }
        if let Some(b) = self.recv {
            socket.set_recv_buffer_size(b)?;
        }
        Ok(())
    }

    /// Connects to `addr` with these buffers.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        self.apply(&socket)?;
        socket.connect(addr).await
    }

    /// A loopback listener whose accepted connections have these buffers.
    pub fn listen(&self) -> std::io::Result<TcpListener> {
        self.listen_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// A listener on `addr` whose accepted connections have these buffers.
    pub fn listen_on(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        self.apply(&socket)?;
        socket.bind(addr)?;
        socket.listen(4096)
    }
}

/// Whether `err` is a reset by the peer (as opposed to a clean end).
pub fn is_reset(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// How a connection ended for a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A clean end of data (the peer's FIN), after `n` bytes.
    Fin(usize),
    /// A reset (or abort) after `n` bytes.
    Reset(usize),
    /// Another error after `n` bytes.
    Error(usize, String),
    /// Still open when the deadline passed, after `n` bytes.
    Open(usize),
}

/// Reads `r` (discarding the data) until it ends or `deadline` passes;
/// reports how it ended.
pub async fn read_ending<R: AsyncReadExt + Unpin>(r: &mut R, deadline: Duration) -> Ending {
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, r.read(&mut buf)).await {
            Err(_) => return Ending::Open(n),
            Ok(Ok(0)) => return Ending::Fin(n),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) if is_reset(&e) => return Ending::Reset(n),
            Ok(Err(e)) => return Ending::Error(n, e.to_string()),
        }
    }
}

/// Closes `tcp` with a reset (RST), not a FIN: `SO_LINGER` 0, then close.
pub fn reset(tcp: TcpStream) {
    tcp.set_zero_linger().expect("SO_LINGER 0");
    drop(tcp);
}

/// Like [`exchange`], on any byte stream (a [`TunnelIo`](tunnel_proto::client::TunnelIo), a TLS stream, ...).
pub async fn exchange_io<IO>(io: IO, len: usize, seed: u64) -> std::io::Result<Exchanged>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    let (mut r, mut w) = tokio::io::split(io);
    let write = async move {
        let hash = write_random(&mut w, len, seed).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(hash)
    };
    let (sent_hash, (received, received_hash)) = tokio::try_join!(write, read_hash(&mut r))?;
    Ok(Exchanged {
        sent: len,
        sent_hash,
        received,
        received_hash,
    })
}
