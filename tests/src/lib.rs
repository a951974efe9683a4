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
        let opts = tunnel_proto::certs::CertOptions {
            trust_domain: tunnel_proto::identity::DEFAULT_TRUST_DOMAIN.into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            clusters: clusters.iter().map(|s| s.to_string()).collect(),
            clients: clients.iter().map(|s| s.to_string()).collect(),
            validity_days: 30,
        };
        tunnel_proto::certs::generate(dir, &opts).expect("certificates");
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
        tls: tunnel_proto::tls::server_config(&pki.files("server")).expect("server TLS"),
        trust_domain: tunnel_proto::identity::DEFAULT_TRUST_DOMAIN.into(),
        server_id: "test-server".into(),
        known_clusters: vec![],
        dial_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        h2: H2Settings::default(),
    }
}

/// Starts a server in this process.
pub async fn start_server(pki: &Pki) -> Server {
    Server::start(server_config(pki))
        .await
        .expect("server starts")
}

/// An agent configuration for `cluster` that may dial loopback destinations.
pub fn agent_config(pki: &Pki, cluster: &str, servers: &[SocketAddr]) -> AgentConfig {
    AgentConfig {
        servers: servers.iter().map(|a| a.to_string()).collect(),
        server_name: Some("localhost".into()),
        cluster: cluster.into(),
        agent_id: format!("{cluster}-agent-{}", rand::random::<u16>()),
        tls: tunnel_proto::tls::client_config(&pki.files(&format!("agent-{cluster}")))
            .expect("agent TLS"),
        h2: H2Settings::default(),
        allowlist: Allowlist::parse(&["127.0.0.0/8".to_string()]).unwrap(),
        dial_timeout: Duration::from_secs(5),
        resolve_interval: Duration::from_secs(30),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
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
        tls: tunnel_proto::tls::client_config(&pki.files(&format!("client-{name}")))
            .expect("client TLS"),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(15),
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
