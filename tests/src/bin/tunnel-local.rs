//! `tunnel-local`: the whole cluster-tunnel system on this machine.
//!
//! A proxy server, an agent for each of two clusters (`east`, `west`), sample
//! services "inside" each cluster (an HTTP and an HTTPS service answering
//! `hello from <cluster>`, and an echo service), and a sidecar with a
//! per-cluster port for each cluster and the HTTP proxy. Each cluster's
//! services listen on their own loopback address (east 127.0.1.1, west
//! 127.0.2.1) and each agent knows them by in-cluster names
//! (`hello.default.svc`, `echo.default.svc`), as cluster DNS would.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tunnel_agent::allowlist::Allowlist;
use tunnel_agent::{Agent, AgentConfig};
use tunnel_proto::h2::H2Settings;
use tunnel_proto::tls::TlsFiles;
use tunnel_server::{Server, ServerConfig};
use tunnel_sidecar::Sidecar;
use tunnel_tests::netns::{NetNs, is_root};

const CLUSTERS: [&str; 2] = ["east", "west"];
const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const ECHO_PORT: u16 = 7007;

/// Runs the whole cluster-tunnel system locally: server, agents for `east`
/// and `west`, sample services in each, and a sidecar.
#[derive(Debug, Parser)]
#[command(name = "tunnel-local", version = tunnel_proto::version::VERSION)]
struct Cli {
    /// Where certificates are written (the CA is reused between runs).
    #[arg(long, env = "TUNNEL_LOCAL_DIR", default_value_os_t = std::env::temp_dir().join("cluster-tunnel-local"))]
    dir: PathBuf,
    /// The sidecar's HTTP proxy.
    #[arg(long, default_value = "127.0.0.1:17080")]
    proxy_listen: SocketAddr,
    /// The sidecar's port for east's hello service.
    #[arg(long, default_value_t = 17001)]
    east_port: u16,
    /// The sidecar's port for west's hello service.
    #[arg(long, default_value_t = 17002)]
    west_port: u16,
    /// The sidecar's admin port.
    #[arg(long, default_value = "127.0.0.1:17090")]
    sidecar_admin_listen: SocketAddr,
    /// The server's client port.
    #[arg(long, default_value = "127.0.0.1:18090")]
    server_client_listen: SocketAddr,
    /// The server's agent port.
    #[arg(long, default_value = "127.0.0.1:18091")]
    server_agent_listen: SocketAddr,
    /// The server's admin port.
    #[arg(long, default_value = "127.0.0.1:18092")]
    server_admin_listen: SocketAddr,
    /// Put each cluster (its agent and sample services) in a network namespace
    /// of its own, joined to this one only by a veth link that the agent dials
    /// out over: the hub side cannot reach the samples except through the
    /// tunnel. Needs root; the namespaces are removed on exit.
    #[arg(long)]
    netns: bool,
    /// Internal: run one cluster (agent and samples) inside its namespace.
    #[arg(long, hide = true)]
    cluster_role: Option<String>,
    /// Internal: the server's agent address, for --cluster-role.
    #[arg(long, hide = true)]
    cluster_server: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: tunnel_shell::logging::LogFormat,
    /// Log filter (RUST_LOG overrides).
    #[arg(long, default_value = "warn,tunnel_server::audit=info")]
    log_level: String,
}

/// The loopback address standing for a cluster's network.
fn cluster_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, i as u8 + 1, 1])
}

fn write_certs(dir: &Path) -> anyhow::Result<()> {
    use tunnel_identity::cert_dir::{CertOptions, generate};
    let opts = CertOptions {
        clusters: CLUSTERS.iter().map(|s| s.to_string()).collect(),
        clients: vec!["sidecar".into()],
        ..CertOptions::new()
    };
    generate(dir, &opts).with_context(|| format!("writing certificates to {}", dir.display()))?;
    // The sample services' certificate, from the same CA.
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples)?;
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(dir.join(f), samples.join(f))?;
    }
    let mut names = vec!["hello.default.svc".to_string(), "localhost".to_string()];
    for c in CLUSTERS {
        names.push(format!("hello.default.svc.{c}.tunnel.internal"));
    }
    let opts = CertOptions {
        server_names: names,
        ..CertOptions::new()
    };
    generate(&samples, &opts).context("writing the sample services' certificate")?;
    Ok(())
}

/// The local system's policy: the sidecar may reach the sample services of
/// both clusters, and nothing else. Edit it while tunnel-local runs: it is
/// re-read when it changes.
const LOCAL_POLICY: &str = "\
# cluster-tunnel policy (the spec of a TunnelPolicy). Deny unless a rule allows.
rules:
  - name: sidecar-to-samples
    subjects:
      - identity: client/sidecar
    clusters:
      - name: east
      - name: west
    destinations:
      - host: hello.default.svc
        ports: [8080, 8443]
      - host: echo.default.svc
        ports: [7007]
";

/// Writes `policy.yaml` into `dir` unless one is there (a user's edits stay).
fn write_policy(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("policy.yaml");
    if !path.exists() {
        std::fs::write(&path, LOCAL_POLICY)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

type Resp = hyper::Response<Full<Bytes>>;

fn hello(
    cluster: &'static str,
    scheme: &'static str,
) -> impl Fn(
    hyper::Request<hyper::body::Incoming>,
) -> std::future::Ready<Result<Resp, std::convert::Infallible>>
+ Clone {
    move |req| {
        let body = format!(
            "hello from {cluster} ({scheme} {} {})\n",
            req.method(),
            req.uri().path()
        );
        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
        resp.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        std::future::ready(Ok(resp))
    }
}

async fn serve_http<IO>(io: IO, cluster: &'static str, scheme: &'static str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(
            TokioIo::new(io),
            hyper::service::service_fn(hello(cluster, scheme)),
        )
        .await;
}

async fn start_samples(cluster: &'static str, ip: IpAddr, dir: &Path) -> anyhow::Result<()> {
    let http = TcpListener::bind((ip, HTTP_PORT))
        .await
        .with_context(|| format!("binding {ip}:{HTTP_PORT}"))?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            tokio::spawn(serve_http(tcp, cluster, "http"));
        }
    });
    let files = TlsFiles::in_dir(&dir.join("samples"), "server");
    let tls = {
        let certs = tunnel_proto::tls::load_certs(&files.cert, "sample certificate")?;
        let key = tunnel_proto::tls::load_key(&files.key)?;
        let mut c = rustls::ServerConfig::builder_with_provider(tunnel_proto::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(c))
    };
    let https = TcpListener::bind((ip, HTTPS_PORT))
        .await
        .with_context(|| format!("binding {ip}:{HTTPS_PORT}"))?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = https.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
                {
                    serve_http(s, cluster, "https").await;
                }
            });
        }
    });
    let echo = TcpListener::bind((ip, ECHO_PORT))
        .await
        .with_context(|| format!("binding {ip}:{ECHO_PORT}"))?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                }
            });
        }
    });
    Ok(())
}

async fn start_agent(
    dir: &Path,
    cluster: &str,
    ip: IpAddr,
    server: SocketAddr,
) -> anyhow::Result<Agent> {
    Agent::start(AgentConfig {
        servers: vec![server.to_string()],
        server_name: Some("localhost".into()),
        cluster: cluster.into(),
        agent_id: format!("{cluster}-agent"),
        tls: tunnel_proto::tls::ClientTls::client(TlsFiles::in_dir(
            dir,
            &format!("agent-{cluster}"),
        ))?,
        h2: H2Settings::default(),
        // Only this cluster's own "network".
        allowlist: Allowlist::parse(&[ip.to_string()])?,
        dial_timeout: Duration::from_secs(5),
        socket_buffer: 0,
        host_aliases: [
            ("hello.default.svc".to_string(), ip),
            ("echo.default.svc".to_string(), ip),
        ]
        .into_iter()
        .collect(),
        resolve_interval: Duration::from_secs(30),
        admin_listen: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 0),
        backoff: (Duration::from_millis(100), Duration::from_secs(2)),
        proxy: tunnel_agent::proxy::ProxySettings::none(),
    })
    .await
    .map_err(anyhow::Error::from)
}

/// One cluster of the local system.
enum ClusterRun {
    /// Agent and samples in this process, samples on a loopback address of their own.
    InProcess(Agent),
    /// Agent and samples in a child process inside a network namespace.
    Namespace(NamespacedCluster),
}

/// A cluster's process in its namespace; killed, then the namespace removed, on drop.
struct NamespacedCluster {
    child: std::process::Child,
    _ns: NetNs,
}

impl Drop for NamespacedCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_in_namespace(
    cli: &Cli,
    i: usize,
    cluster: &str,
    agent_port: u16,
) -> anyhow::Result<NamespacedCluster> {
    anyhow::ensure!(is_root(), "--netns needs root (network namespaces)");
    let pid = std::process::id() % 100_000;
    let ns = NetNs::create_with(
        &format!("ct-local-{cluster}-{pid}"),
        &format!("l{i}{pid}"),
        std::net::Ipv4Addr::new(10, 232, i as u8 + 1, 1),
    )
    .with_context(|| format!("creating the network namespace of {cluster}"))?;
    let exe = std::env::current_exe()?;
    let child = ns
        .command(exe)
        .arg("--cluster-role")
        .arg(cluster)
        .arg("--cluster-server")
        .arg(SocketAddr::new(ns.hub_ip.into(), agent_port).to_string())
        .arg("--dir")
        .arg(&cli.dir)
        .arg("--log-level")
        .arg(&cli.log_level)
        .spawn()
        .with_context(|| format!("starting {cluster}'s agent in its namespace"))?;
    Ok(NamespacedCluster { child, _ns: ns })
}

/// `--cluster-role`: one cluster inside its namespace: samples on the
/// namespace's own loopback, and its agent, until SIGTERM.
async fn run_cluster(cli: &Cli, cluster: &str) -> anyhow::Result<()> {
    let name: &'static str = CLUSTERS
        .into_iter()
        .find(|c| *c == cluster)
        .ok_or_else(|| anyhow::anyhow!("unknown cluster {cluster}"))?;
    let server = cli
        .cluster_server
        .context("--cluster-server is required with --cluster-role")?;
    let ip = IpAddr::from([127, 0, 0, 1]);
    start_samples(name, ip, &cli.dir).await?;
    let agent = start_agent(&cli.dir, name, ip, server).await?;
    tunnel_shell::process::termination_signal().await;
    agent.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tunnel_shell::logging::init_logging(cli.log_format, &cli.log_level);
    if let Some(cluster) = cli.cluster_role.clone() {
        return run_cluster(&cli, &cluster).await;
    }
    let dir = &cli.dir;
    write_certs(dir)?;
    // Agents in namespaces dial the hub side of their veth link.
    let agent_listen = if cli.netns {
        SocketAddr::new(IpAddr::from([0, 0, 0, 0]), cli.server_agent_listen.port())
    } else {
        cli.server_agent_listen
    };
    let server = Server::start(ServerConfig {
        agent_listen,
        client_listen: cli.server_client_listen,
        admin_listen: cli.server_admin_listen,
        tls: tunnel_proto::tls::ServerTls::server(TlsFiles::in_dir(dir, "server"))?,
        trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
        server_id: "local".into(),
        server_count: 1,
        known_clusters: CLUSTERS.iter().map(|s| s.to_string()).collect(),
        dial_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        h2: H2Settings::default(),
        auth: tunnel_server::AuthConfig {
            policy: tunnel_server::PolicySource::File {
                path: write_policy(dir)?,
                reload_interval: tunnel_server::policy::DEFAULT_POLICY_RELOAD_INTERVAL,
            },
            ..Default::default()
        },
        // Each cluster's hello service stands for its apiserver.
        probe: tunnel_server::probes::ProbeConfig {
            target: tunnel_server::probes::ProbeTarget {
                host: "hello.default.svc".into(),
                port: HTTPS_PORT,
            },
            ..Default::default()
        },
        limits: tunnel_server::Limits::default(),
        // One server on one machine: nothing to hand over on shutdown.
        ha: tunnel_server::HaConfig {
            shutdown_delay: Duration::ZERO,
            ..Default::default()
        },
        addressing: Default::default(),
    })
    .await?;
    let mut clusters = Vec::new();
    for (i, cluster) in CLUSTERS.into_iter().enumerate() {
        clusters.push(if cli.netns {
            ClusterRun::Namespace(spawn_in_namespace(
                &cli,
                i,
                cluster,
                server.agent_addr.port(),
            )?)
        } else {
            let ip = cluster_ip(i);
            start_samples(cluster, ip, dir).await?;
            ClusterRun::InProcess(start_agent(dir, cluster, ip, server.agent_addr).await?)
        });
    }
    let sidecar_cli = tunnel_sidecar::config::Cli::try_parse_from([
        "tunnel-sidecar".to_string(),
        "--server".into(),
        server.client_addr.to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--cert-dir".into(),
        dir.display().to_string(),
        "--proxy-listen".into(),
        cli.proxy_listen.to_string(),
        "--admin-listen".into(),
        cli.sidecar_admin_listen.to_string(),
        "--port".into(),
        format!("{}=east:hello.default.svc:{HTTP_PORT}", cli.east_port),
        "--port".into(),
        format!("{}=west:hello.default.svc:{HTTP_PORT}", cli.west_port),
        "--cluster-refresh".into(),
        "2s".into(),
        // The "hub" here is this machine's loopback, which a sidecar never
        // dials directly otherwise: allow the server's admin address, which
        // the guide reaches through the proxy (on one machine it is also the
        // sidecar's own admin address; in a pod nothing needs this).
        "--direct-allow-ip".into(),
        cli.server_admin_listen.ip().to_string(),
    ])?;
    let sidecar = Sidecar::start(sidecar_cli.resolve()?).await?;
    let start = Instant::now();
    let state = server.state().clone();
    while !(sidecar.is_connected() && CLUSTERS.iter().all(|c| state.pool.pick(c, &[]).is_agent())) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the local system did not become ready within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    print_guide(&cli);
    let requested = sidecar.shutdown_requested.clone();
    tokio::select! {
        () = tunnel_shell::process::termination_signal() => {}
        () = requested.cancelled() => {}
    }
    println!("stopping...");
    sidecar.shutdown().await;
    for c in clusters {
        match c {
            ClusterRun::InProcess(a) => a.shutdown(Duration::from_secs(2)).await,
            // Killing the cluster's process, then deleting its namespace.
            ClusterRun::Namespace(ns) => drop(ns),
        }
    }
    server.shutdown().await;
    println!("stopped");
    Ok(())
}

fn print_guide(cli: &Cli) {
    let proxy = cli.proxy_listen;
    let ca = cli.dir.join("ca.pem");
    println!(
        "\ncluster-tunnel is running locally: a server, agents for east and west, a sidecar.\n\
         \n\
         Try:\n\
         \x20 curl http://127.0.0.1:{east}/                  # per-cluster port -> hello from east\n\
         \x20 curl http://127.0.0.1:{west}/                  # per-cluster port -> hello from west\n\
         \x20 http_proxy=http://{proxy} curl http://hello.default.svc.west.tunnel.internal:{HTTP_PORT}/\n\
         \x20 https_proxy=http://{proxy} curl --cacert {ca} https://hello.default.svc.east.tunnel.internal:{HTTPS_PORT}/\n\
         \x20 http_proxy=http://east@{proxy} curl http://hello.default.svc:{HTTP_PORT}/   # default cluster from the proxy user\n\
         \x20 http_proxy=http://{proxy} curl http://{server_admin}/healthz   # in no cluster: dialed directly, as without the proxy\n\
         \x20 curl http://{admin}/metrics                     # sidecar metrics\n\
         \n\
         Stop with Ctrl-C.",
        east = cli.east_port,
        west = cli.west_port,
        ca = ca.display(),
        admin = cli.sidecar_admin_listen,
        server_admin = cli.server_admin_listen,
    );
}

fn main() -> std::process::ExitCode {
    tunnel_shell::run(tunnel_shell::WorkerThreads::PerCpu, run)
}
