//! `cargo bench --bench tunnel [-- --json]`: the same workloads directly and
//! through the tunnel (client library -> server -> agent -> destination, TLS
//! on both legs), in one run on loopback, with the ratio tunnel/direct.
//!
//! The server and the agent run as child processes (this executable, re-run
//! in a role), so their memory and CPU are measured apart from the load.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_proto::client::Target;
use tunnel_tests::*;

const ROLE_ENV: &str = "CT_BENCH_ROLE";

const SINGLE_BYTES: u64 = 1 << 30;
const MULTI_STREAMS: usize = 8;
const MULTI_BYTES_EACH: u64 = 256 << 20;
const FIRST_BYTE_CONNS: usize = 2000;
const RTT_ROUNDS: usize = 5000;
const IDLE_CONNS: usize = 1000;
const ISOLATION_BYTES: u64 = 256 << 20;

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return run_role(&role);
    }
    let json = std::env::args().any(|a| a == "--json");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(json));
}

/// Runs this executable as the server or the agent.
fn run_role(role: &str) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // As the real binaries: the sidecar and the agent default to one worker thread.
    let rt =
        tunnel_proto::cli::runtime((role == "sidecar" || role == "agent").then_some(1)).unwrap();
    let res = rt.block_on(async {
        match role {
            "server" => {
                let cli = <tunnel_server::cli::Cli as clap_parse::Parser>::parse_from(
                    std::iter::once("tunnel-server".to_string()).chain(args),
                );
                tunnel_server::cli::main(cli).await
            }
            "agent" => {
                let cli = <tunnel_agent::cli::Cli as clap_parse::Parser>::parse_from(
                    std::iter::once("tunnel-agent".to_string()).chain(args),
                );
                tunnel_agent::cli::main(cli).await
            }
            "sidecar" => {
                let cli = <tunnel_sidecar::config::Cli as clap_parse::Parser>::parse_from(
                    std::iter::once("tunnel-sidecar".to_string()).chain(args),
                );
                tunnel_sidecar::main(cli).await
            }
            other => Err(anyhow::anyhow!("unknown role {other}")),
        }
    });
    if let Err(err) = res {
        eprintln!("{role}: {err:#}");
        std::process::exit(1);
    }
}

mod clap_parse {
    pub use clap::Parser;
}

/// A child process of this executable in a role, killed on drop.
struct RoleProc {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl RoleProc {
    fn spawn(role: &str, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{role}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(ROLE_ENV, role)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU seconds used so far (user + system).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks / clock_ticks()
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

// ---------------------------------------------------------------- services

/// Reads to EOF, then answers with one byte: proves every byte arrived.
async fn start_sink() -> SocketAddr {
    serve(|mut tcp| async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let _ = tcp.write_all(b"k").await;
        let _ = tcp.shutdown().await;
    })
    .await
}

/// Writes one byte at once, then waits for EOF (first-byte latency).
async fn start_hello() -> SocketAddr {
    serve(|mut tcp| async move {
        let _ = tcp.set_nodelay(true);
        if tcp.write_all(b"h").await.is_err() {
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// Echoes, with TCP_NODELAY (round-trip latency).
async fn start_fast_echo() -> SocketAddr {
    serve(|mut tcp| async move {
        let _ = tcp.set_nodelay(true);
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Writes without end (a stalled reader's source).
async fn start_flood() -> SocketAddr {
    serve(|mut tcp| async move {
        let buf = vec![7u8; 256 * 1024];
        while tcp.write_all(&buf).await.is_ok() {}
    })
    .await
}

async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

// ---------------------------------------------------------------- paths

struct Services {
    sink: SocketAddr,
    hello: SocketAddr,
    echo: SocketAddr,
    flood: SocketAddr,
}

/// How the app reaches one service on a path.
#[derive(Clone, Copy)]
enum Endpoint {
    /// A plain TCP connect (direct, a forwarding port, a sidecar port).
    Tcp(SocketAddr),
    /// HTTP CONNECT through the sidecar's proxy to 127.0.0.1:port in the
    /// cluster named by the proxy user.
    Connect { proxy: SocketAddr, port: u16 },
}

impl Endpoint {
    async fn connect(self) -> TcpStream {
        match self {
            Endpoint::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                tcp.set_nodelay(true).unwrap();
                tcp
            }
            Endpoint::Connect { proxy, port } => {
                let mut tcp = TcpStream::connect(proxy).await.expect("connect to proxy");
                tcp.set_nodelay(true).unwrap();
                // "bench:" in base64: the proxy user names the cluster.
                let req = format!(
                    "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: Basic YmVuY2g6\r\n\r\n"
                );
                tcp.write_all(req.as_bytes()).await.unwrap();
                // Read the response head byte by byte: nothing after it may be consumed.
                let mut head = Vec::with_capacity(128);
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    tcp.read_exact(&mut b).await.expect("CONNECT response");
                    head.push(b[0]);
                }
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "CONNECT refused: {}",
                    String::from_utf8_lossy(&head)
                );
                tcp
            }
        }
    }
}

/// How to reach each service on one path.
struct Path_ {
    sink: Endpoint,
    hello: Endpoint,
    echo: Endpoint,
    flood: Endpoint,
}

fn direct_path(s: &Services) -> Path_ {
    Path_ {
        sink: Endpoint::Tcp(s.sink),
        hello: Endpoint::Tcp(s.hello),
        echo: Endpoint::Tcp(s.echo),
        flood: Endpoint::Tcp(s.flood),
    }
}

async fn tunnel_path(s: &Services, client: Arc<tunnel_proto::client::TunnelClient>) -> Path_ {
    let t = |a: SocketAddr| Target::new("bench", "127.0.0.1", a.port());
    Path_ {
        sink: Endpoint::Tcp(forward_port(client.clone(), t(s.sink)).await),
        hello: Endpoint::Tcp(forward_port(client.clone(), t(s.hello)).await),
        echo: Endpoint::Tcp(forward_port(client.clone(), t(s.echo)).await),
        flood: Endpoint::Tcp(forward_port(client, t(s.flood)).await),
    }
}

/// The tunnel's processes for one path, started fresh so that memory freed by
/// an earlier path cannot hide this one's growth.
struct System {
    server: RoleProc,
    agent: RoleProc,
    sidecar: Option<RoleProc>,
    client_addr: SocketAddr,
    /// Sidecar ports for sink, hello, echo, flood; and its proxy.
    sidecar_ports: Option<([u16; 4], SocketAddr)>,
}

impl System {
    async fn start(pki: &Pki, services: Option<&Services>) -> Self {
        let dir = pki.dir.path();
        let (agent_port, client_port, admin_port, agent_admin) =
            (free_port(), free_port(), free_port(), free_port());
        let s = |v: &str| v.to_string();
        let server = RoleProc::spawn(
            "server",
            &[
                s("--agent-listen"),
                format!("127.0.0.1:{agent_port}"),
                s("--client-listen"),
                format!("127.0.0.1:{client_port}"),
                s("--admin-listen"),
                format!("127.0.0.1:{admin_port}"),
                s("--cert-dir"),
                dir.display().to_string(),
                s("--allow-all"),
            ],
            dir,
        );
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        wait_until(
            "the server is ready",
            Duration::from_secs(20),
            || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
        )
        .await;
        let agent = RoleProc::spawn(
            "agent",
            &[
                s("--server"),
                format!("127.0.0.1:{agent_port}"),
                s("--server-name"),
                s("localhost"),
                s("--cluster"),
                s("bench"),
                s("--cert-dir"),
                dir.display().to_string(),
                s("--allow"),
                s("127.0.0.0/8"),
                s("--admin-listen"),
                format!("127.0.0.1:{agent_admin}"),
            ],
            dir,
        );
        let agent_admin: SocketAddr = format!("127.0.0.1:{agent_admin}").parse().unwrap();
        wait_until(
            "the agent's tunnel is up",
            Duration::from_secs(20),
            || async move { matches!(http_get(agent_admin, "/readyz").await, Ok((200, _))) },
        )
        .await;
        let client_addr: SocketAddr = format!("127.0.0.1:{client_port}").parse().unwrap();
        let (sidecar, sidecar_ports) = match services {
            None => (None, None),
            Some(sv) => {
                let ports = [free_port(), free_port(), free_port(), free_port()];
                let (proxy, sc_admin) = (free_port(), free_port());
                let mut args = vec![
                    s("--server"),
                    client_addr.to_string(),
                    s("--server-name"),
                    s("localhost"),
                    s("--cert-dir"),
                    dir.display().to_string(),
                    s("--client-name"),
                    s("bench"),
                    s("--proxy-listen"),
                    format!("127.0.0.1:{proxy}"),
                    s("--admin-listen"),
                    format!("127.0.0.1:{sc_admin}"),
                ];
                for (p, svc) in ports.iter().zip([sv.sink, sv.hello, sv.echo, sv.flood]) {
                    args.push(s("--port"));
                    args.push(format!("{p}=bench:127.0.0.1:{}", svc.port()));
                }
                let proc = RoleProc::spawn("sidecar", &args, dir);
                let sc_admin: SocketAddr = format!("127.0.0.1:{sc_admin}").parse().unwrap();
                // Ready means listening; measure once it also reaches the server.
                wait_until(
                    "the sidecar reaches the server",
                    Duration::from_secs(20),
                    || async move {
                        metric(
                            &fetch_metrics(sc_admin).await,
                            "tunnel_sidecar_server_connected",
                        ) == Some(1.0)
                    },
                )
                .await;
                (
                    Some(proc),
                    Some((ports, format!("127.0.0.1:{proxy}").parse().unwrap())),
                )
            }
        };
        Self {
            server,
            agent,
            sidecar,
            client_addr,
            sidecar_ports,
        }
    }

    fn procs(&self) -> Vec<&RoleProc> {
        let mut v = vec![&self.server, &self.agent];
        if let Some(s) = &self.sidecar {
            v.push(s);
        }
        v
    }

    fn port_path(&self) -> Path_ {
        let (p, _) = self.sidecar_ports.expect("sidecar");
        let e = |port: u16| Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
        Path_ {
            sink: e(p[0]),
            hello: e(p[1]),
            echo: e(p[2]),
            flood: e(p[3]),
        }
    }

    fn connect_path(&self, s: &Services) -> Path_ {
        let (_, proxy) = self.sidecar_ports.expect("sidecar");
        let e = |a: SocketAddr| Endpoint::Connect {
            proxy,
            port: a.port(),
        };
        Path_ {
            sink: e(s.sink),
            hello: e(s.hello),
            echo: e(s.echo),
            flood: e(s.flood),
        }
    }
}

// ---------------------------------------------------------------- workloads

/// Sends `bytes` and waits for the sink's acknowledgement; returns Gbit/s.
async fn send_bytes(ep: Endpoint, bytes: u64) -> f64 {
    let mut tcp = ep.connect().await;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        tcp.write_all(&buf[..n]).await.expect("write");
        left -= n as u64;
    }
    tcp.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack).await.expect("sink acknowledges");
    gbps(bytes, start.elapsed())
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

async fn multi_stream(ep: Endpoint) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..MULTI_STREAMS)
        .map(|_| tokio::spawn(send_bytes(ep, MULTI_BYTES_EACH)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    gbps(MULTI_BYTES_EACH * MULTI_STREAMS as u64, start.elapsed())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// New connection to first byte, sequentially; returns (p50, p99) in µs.
async fn first_byte(ep: Endpoint) -> (f64, f64) {
    let mut samples = Vec::with_capacity(FIRST_BYTE_CONNS);
    for _ in 0..FIRST_BYTE_CONNS {
        let start = Instant::now();
        let mut tcp = ep.connect().await;
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.expect("first byte");
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

/// 64-byte request/response on one open connection; (p50, p99) in µs.
async fn round_trips(ep: Endpoint) -> (f64, f64) {
    let mut tcp = ep.connect().await;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..200 {
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
    }
    let mut samples = Vec::with_capacity(RTT_ROUNDS);
    for _ in 0..RTT_ROUNDS {
        let start = Instant::now();
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

/// Opens IDLE_CONNS connections that each completed one round trip, then
/// returns them (kept open by the caller while memory is read).
async fn open_idle(ep: Endpoint) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(IDLE_CONNS);
    for _ in 0..IDLE_CONNS {
        let mut tcp = ep.connect().await;
        tcp.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        conns.push(tcp);
    }
    conns
}

/// Throughput of one connection while another's reader is stalled with
/// megabytes pending, as a ratio to the same transfer without the stall.
async fn stalled_ratio(p: &Path_) -> f64 {
    let unstalled = send_bytes(p.sink, ISOLATION_BYTES).await;
    let stalled = p.flood.connect().await;
    // Let the flood fill every buffer on the way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let with_stall = send_bytes(p.sink, ISOLATION_BYTES).await;
    drop(stalled);
    with_stall / unstalled
}

// ---------------------------------------------------------------- report

#[derive(Default, Clone)]
struct Figures {
    single_stream_gbps: Option<f64>,
    multi_stream_gbps: Option<f64>,
    first_byte_p50_us: Option<f64>,
    first_byte_p99_us: Option<f64>,
    rtt_p50_us: Option<f64>,
    rtt_p99_us: Option<f64>,
    idle_kib_per_conn: Option<f64>,
    stalled_ratio: Option<f64>,
    cpu_s_per_gb: Option<f64>,
}

impl Figures {
    fn rows(&self) -> Vec<(&'static str, Option<f64>, bool)> {
        // (name, value, higher is better)
        vec![
            ("single_stream_gbps", self.single_stream_gbps, true),
            ("multi_stream_gbps", self.multi_stream_gbps, true),
            ("first_byte_p50_us", self.first_byte_p50_us, false),
            ("first_byte_p99_us", self.first_byte_p99_us, false),
            ("rtt_p50_us", self.rtt_p50_us, false),
            ("rtt_p99_us", self.rtt_p99_us, false),
            ("idle_kib_per_conn", self.idle_kib_per_conn, false),
            ("stalled_ratio", self.stalled_ratio, true),
            ("cpu_s_per_gb", self.cpu_s_per_gb, false),
        ]
    }

    fn json(&self) -> String {
        let fields: Vec<String> = self
            .rows()
            .into_iter()
            .map(|(k, v, _)| match v {
                Some(v) => format!("\"{k}\": {}", (v * 1000.0).round() / 1000.0),
                None => format!("\"{k}\": null"),
            })
            .collect();
        format!("{{{}}}", fields.join(", "))
    }
}

/// `--workloads a,b` / `--paths a,b` pick a subset (for profiling); all by default.
fn selected(flag: &str, name: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
    {
        Some(list) => list.split(',').any(|x| x == name),
        None => true,
    }
}

async fn measure(p: &Path_, procs: &[&RoleProc], label: &str) -> Figures {
    let mut f = Figures::default();
    let want = |w: &str| selected("--workloads", w);
    let cpu = |procs: &[&RoleProc]| procs.iter().map(|p| p.cpu_secs()).sum::<f64>();
    if !procs.is_empty() && want("idle") {
        eprintln!("[{label}] {IDLE_CONNS} idle connections");
        // First, while the processes are fresh: memory freed by earlier
        // workloads would otherwise absorb the growth.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before: u64 = procs.iter().map(|p| p.rss_kib()).sum();
        let conns = open_idle(p.echo).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after: u64 = procs.iter().map(|p| p.rss_kib()).sum();
        f.idle_kib_per_conn = Some(after.saturating_sub(before) as f64 / IDLE_CONNS as f64);
        drop(conns);
    }
    if want("throughput") {
        eprintln!("[{label}] single stream, {} MiB", SINGLE_BYTES >> 20);
        let cpu0 = cpu(procs);
        f.single_stream_gbps = Some(send_bytes(p.sink, SINGLE_BYTES).await);
        eprintln!(
            "[{label}] {MULTI_STREAMS} streams x {} MiB",
            MULTI_BYTES_EACH >> 20
        );
        f.multi_stream_gbps = Some(multi_stream(p.sink).await);
        if !procs.is_empty() {
            let moved = (SINGLE_BYTES + MULTI_BYTES_EACH * MULTI_STREAMS as u64) as f64 / 1e9;
            f.cpu_s_per_gb = Some((cpu(procs) - cpu0) / moved);
        }
    }
    if want("first_byte") {
        eprintln!("[{label}] {FIRST_BYTE_CONNS} connections to first byte");
        let (p50, p99) = first_byte(p.hello).await;
        f.first_byte_p50_us = Some(p50);
        f.first_byte_p99_us = Some(p99);
    }
    if want("rtt") {
        eprintln!("[{label}] {RTT_ROUNDS} round trips of 64 bytes");
        let (p50, p99) = round_trips(p.echo).await;
        f.rtt_p50_us = Some(p50);
        f.rtt_p99_us = Some(p99);
    }
    if want("isolation") {
        eprintln!("[{label}] isolation");
        f.stalled_ratio = Some(stalled_ratio(p).await);
    }
    f
}

async fn bench(json: bool) {
    tunnel_proto::tls::install_crypto_provider();
    let pki = Pki::new(&["bench"], &["bench"]);
    let services = Services {
        sink: start_sink().await,
        hello: start_hello().await,
        echo: start_fast_echo().await,
        flood: start_flood().await,
    };
    let mut results: Vec<(&str, Figures)> = Vec::new();
    let want_path = |p: &str| selected("--paths", p);
    results.push((
        "direct",
        measure(&direct_path(&services), &[], "direct").await,
    ));
    if want_path("tunnel") {
        let sys = System::start(&pki, None).await;
        let client = client(&pki, "bench", sys.client_addr);
        client.ensure_connected().await.expect("client connects");
        let path = tunnel_path(&services, client).await;
        results.push(("tunnel", measure(&path, &sys.procs(), "tunnel").await));
    }
    if want_path("sidecar-port") {
        let sys = System::start(&pki, Some(&services)).await;
        results.push((
            "sidecar-port",
            measure(&sys.port_path(), &sys.procs(), "sidecar-port").await,
        ));
    }
    if want_path("sidecar-connect") {
        let sys = System::start(&pki, Some(&services)).await;
        let path = sys.connect_path(&services);
        results.push((
            "sidecar-connect",
            measure(&path, &sys.procs(), "sidecar-connect").await,
        ));
    }

    if json {
        let body: Vec<String> = results
            .iter()
            .map(|(k, f)| format!("\"{k}\": {}", f.json()))
            .collect();
        println!("{{{}}}", body.join(", "));
        return;
    }
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    print!("{:<20}", "workload");
    for (k, _) in &results {
        print!(" {k:>16}");
    }
    println!();
    let rows: Vec<Vec<(&str, Option<f64>, bool)>> = results.iter().map(|(_, f)| f.rows()).collect();
    for i in 0..rows[0].len() {
        print!("{:<20}", rows[0][i].0);
        for r in &rows {
            print!(" {:>16}", fmt(r[i].1));
        }
        println!();
    }
    println!("\nratio to direct (throughput: higher is better; latency: lower is better)");
    for i in 0..rows[0].len() {
        let d = rows[0][i].1;
        print!("{:<20}", rows[0][i].0);
        for r in &rows[1..] {
            let ratio = match (d, r[i].1) {
                (Some(d), Some(t)) if d > 0.0 => format!("{:.2}", t / d),
                _ => "-".into(),
            };
            print!(" {ratio:>16}");
        }
        println!();
    }
}
