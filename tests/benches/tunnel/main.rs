//! `cargo bench --bench tunnel [-- --json]`: the same workloads directly and
//! through the tunnel (client library -> server -> agent -> destination, TLS
//! on both legs), in one run on loopback, with the ratio tunnel/direct.
//!
//! The server and the agent run as child processes (this executable, re-run
//! in a role), so their memory and CPU are measured apart from the load.
//!
//! Besides the per-path workloads (`--workloads idle,throughput,first_byte,
//! rtt,isolation`), four scenarios, each selectable the same way:
//! - `stalled_1000` (`stalled.rs`): bulk transfers beside [`STALLED_EACH_WAY`] connections
//!   whose destination never reads and as many whose client never reads,
//!   all through one sidecar, server and agent; `stalled_1000_ratio` is
//!   their median throughput over the median of the same transfers without
//!   the stalls, in this run.
//! - `wan` (`wan.rs`): one stream over an emulated WAN (25 ms each way, 1 Gbit/s, see
//!   `tunnel_tests::wan`) on the agent's path to the server, against a
//!   plain TCP connection through an identical relay: `wan_ratio`.
//! - `scale` (`scale.rs`): one server process holding [`SCALE_AGENTS`] agents and
//!   [`SCALE_CONNS`] open connections: `scale_rss_mib`, its idle CPU, and a
//!   new connection's first byte under that load (`scale_first_byte_p99_ratio`
//!   to the unloaded p99 of the same run).
//! - `agent_freeze` (`freeze.rs`): two agents of one cluster under a load of new
//!   connections, one frozen (SIGSTOP) and thawed: how long the frozen agent
//!   still got new connections (`agent_freeze_to_last_connection_ms`), what
//!   failed meanwhile, and how soon the thawed one is used again.
//!
//! Two more paths give the floor of this machine: `relay-floor` and
//! `relay-floor-async` put three plain TCP relay processes (no TLS, no
//! HTTP/2) where the sidecar, server and agent are (see [`relay_floor`]).
//!
//! Every scenario is bounded in count and time; a frozen tunnel shows as a
//! figure of 0 and a `*_message`, never as a hang.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_proto::client::Target;
use tunnel_tests::*;

mod freeze;
mod paths;
mod scale;
mod stalled;
mod wan;
mod workloads;

use freeze::*;
use paths::*;
use scale::*;
use stalled::*;
use wan::*;
use workloads::*;

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
    if role == "relay" {
        return relay_floor::serve(&args);
    }
    if role == "relay-async" {
        return relay_floor::serve_async(&args);
    }
    // As the real binaries (`tunnel_shell::run`): the crypto provider, and
    // one worker thread for the sidecar and the agent.
    tunnel_proto::tls::install_crypto_provider();
    let threads = match role {
        "sidecar" | "agent" => tunnel_shell::WorkerThreads::Count(1),
        _ => tunnel_shell::WorkerThreads::PerCpu,
    };
    let rt = tunnel_shell::process::runtime(threads).unwrap();
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
                tunnel_sidecar::cli::main(cli).await
            }
            // An echo service in a process of its own (`ADDR` as the only
            // argument), so that its sockets do not count against this
            // process's descriptor limit.
            "echo" => {
                let addr = args.first().cloned().unwrap_or_default();
                let listener = SocketBuffers::default()
                    .listen_on(addr.parse()?)
                    .map_err(|e| anyhow::anyhow!("echo cannot listen on {addr}: {e}"))?;
                while let Ok((mut tcp, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let (mut r, mut w) = tcp.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
                Ok(())
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

/// The `relay-floor` paths: the same three hops as the tunnel (sidecar,
/// server, agent) made of the simplest relays there are, with no TLS and no
/// HTTP/2: what three processes in the way cost on this machine whatever
/// they do, so the tunnel's latency and CPU can be read against it.
/// - `relay-floor`: blocking threads that `read` and `write` 64 KiB at a
///   time: the floor of round trip, throughput and CPU per GB. Its first
///   byte pays two thread creations per hop, so it is no floor for that.
/// - `relay-floor-async`: one tokio current-thread runtime per process and
///   `copy_bidirectional` per connection: the floor of first byte.
mod relay_floor {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

    /// `LISTEN=UPSTREAM` pairs; exits with a message on a bad one.
    fn parse(pairs: &[String]) -> Vec<(SocketAddr, SocketAddr)> {
        pairs
            .iter()
            .map(|pair| {
                let parsed = pair
                    .split_once('=')
                    .and_then(|(l, u)| Some((l.parse().ok()?, u.parse().ok()?)));
                parsed.unwrap_or_else(|| {
                    eprintln!("relay: expected LISTEN=UPSTREAM addresses, got {pair:?}");
                    std::process::exit(2);
                })
            })
            .collect()
    }

    fn cannot_listen(addr: SocketAddr, err: std::io::Error) -> ! {
        eprintln!("relay: cannot listen on {addr}: {err}");
        std::process::exit(1);
    }

    /// Serves `LISTEN=UPSTREAM` pairs with blocking threads until killed.
    pub fn serve(pairs: &[String]) {
        let mut threads = Vec::new();
        for (listen, upstream) in parse(pairs) {
            let listener = TcpListener::bind(listen).unwrap_or_else(|e| cannot_listen(listen, e));
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    std::thread::spawn(move || relay(conn, upstream));
                }
            }));
        }
        for t in threads {
            let _ = t.join();
        }
    }

    /// The same with one tokio current-thread runtime until killed.
    pub fn serve_async(pairs: &[String]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let mut tasks = Vec::new();
            for (listen, upstream) in parse(pairs) {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .unwrap_or_else(|e| cannot_listen(listen, e));
                tasks.push(tokio::spawn(async move {
                    while let Ok((mut down, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = down.set_nodelay(true);
                            let _ = up.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        });
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    }

    fn relay(down: TcpStream, upstream: SocketAddr) {
        let Ok(up) = TcpStream::connect(upstream) else {
            return;
        };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
            return;
        };
        std::thread::spawn(move || copy(down2, up2));
        copy(up, down);
    }

    fn copy(mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// A child process of this executable in a role, killed on drop.
struct RoleProc {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl RoleProc {
    fn spawn(role: &str, args: &[String], dir: &Path) -> Self {
        Self::spawn_as(role, role, args, dir)
    }

    /// [`RoleProc::spawn`] with its log file named `name`.
    fn spawn_as(role: &str, name: &str, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        // As the images run them (an explicit GLIBC_TUNABLES, even empty, wins).
        if std::env::var_os(tunnel_tests::images::GLIBC_TUNABLES).is_none()
            && let Some(tunables) = tunnel_tests::images::image_glibc_tunables()
        {
            cmd.env(tunnel_tests::images::GLIBC_TUNABLES, tunables);
        }
        let child = cmd
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
        cpu_secs_of(&self.pid().to_string())
    }
}

/// CPU seconds (user + system) of process `pid` ("self" for this one).
fn cpu_secs_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
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

impl RoleProc {
    /// The last `n` lines of the process's log.
    fn tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The last `n` warnings and errors of the log, with their count.
    fn warnings(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .collect();
        format!(
            "{} warnings or errors; the last:\n{}",
            lines.len(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

impl System {
    /// Prints the last log lines of every tunnel process (after a failure).
    fn print_logs(&self, what: &str) {
        for (name, p) in [
            ("server", Some(&self.server)),
            ("agent", Some(&self.agent)),
            ("sidecar", self.sidecar.as_ref()),
        ] {
            if let Some(p) = p {
                eprintln!(
                    "[{what}] ----- {name} log (last lines) -----\n{}\n[{what}] ----- {name} log: {}",
                    p.tail(10),
                    p.warnings(10)
                );
            }
        }
    }
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

// ---------------------------------------------------------------- scenarios
// (shared by the scenario modules: stalled.rs, wan.rs, freeze.rs, scale.rs)

/// A figure of a scenario: a number (null when not measured) or a message.
enum Extra {
    Num(Option<f64>),
    Text(String),
}

impl Extra {
    fn json(&self) -> String {
        match self {
            Extra::Num(Some(v)) => format!("{}", (v * 1000.0).round() / 1000.0),
            Extra::Num(None) => "null".into(),
            Extra::Text(t) => serde_json::to_string(t).unwrap(),
        }
    }

    fn text(&self) -> String {
        match self {
            Extra::Num(Some(v)) => format!("{v:.3}"),
            Extra::Num(None) => "-".into(),
            Extra::Text(t) => t.clone(),
        }
    }
}

type Extras = Vec<(&'static str, Extra)>;

fn num(v: f64) -> Extra {
    Extra::Num(Some(v))
}

/// Runs `f` within `deadline`; a timeout is a freeze, said in the error.
async fn within<T>(
    what: &str,
    deadline: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no result within {deadline:?} (frozen)")),
    }
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
    /// CPU seconds of all tunnel processes per GB moved (throughput workload).
    cpu_s_per_gb: Option<f64>,
    /// This process's CPU seconds per GB in the same workload (the load and
    /// the sink; on the `tunnel` path also the client library).
    self_cpu_s_per_gb: Option<f64>,
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
    // The relay floor has a thread per connection and nothing to isolate:
    // only its throughput, CPU and latency mean anything.
    let floor = label.starts_with("relay-floor");
    if !procs.is_empty() && !floor && want("idle") {
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
        let self0 = cpu_secs_of("self");
        f.single_stream_gbps = Some(send_bytes(p.sink, SINGLE_BYTES).await);
        eprintln!(
            "[{label}] {MULTI_STREAMS} streams x {} MiB",
            MULTI_BYTES_EACH >> 20
        );
        f.multi_stream_gbps = Some(multi_stream(p.sink).await);
        let moved = (SINGLE_BYTES + MULTI_BYTES_EACH * MULTI_STREAMS as u64) as f64 / 1e9;
        if !procs.is_empty() {
            f.cpu_s_per_gb = Some((cpu(procs) - cpu0) / moved);
        }
        f.self_cpu_s_per_gb = Some((cpu_secs_of("self") - self0) / moved);
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
    if !floor && want("isolation") {
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
        source: start_source().await,
        stall: StallDestinations::start(),
    };
    let mut results: Vec<(&str, Figures)> = Vec::new();
    let want_path = |p: &str| selected("--paths", p);
    results.push((
        "direct",
        measure(&direct_path(&services), &[], "direct").await,
    ));
    for (name, role) in [
        ("relay-floor", "relay"),
        ("relay-floor-async", "relay-async"),
    ] {
        if want_path(name) {
            let dir = tempfile::tempdir().unwrap();
            let (path, procs) = relay_floor_path(&services, role, dir.path()).await;
            let procs: Vec<&RoleProc> = procs.iter().collect();
            results.push((name, measure(&path, &procs, name).await));
        }
    }
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
    // The client library runs in this process: its share is what this
    // process spent per GB beyond what the same load cost it directly.
    let direct_self = results[0].1.self_cpu_s_per_gb;
    for (k, f) in &mut results {
        if *k == "tunnel"
            && let (Some(c), Some(t), Some(d)) = (f.cpu_s_per_gb, f.self_cpu_s_per_gb, direct_self)
        {
            f.cpu_s_per_gb = Some(c + (t - d).max(0.0));
        }
    }

    let want_scenario = |w: &str| selected("--workloads", w);
    let mut extras = Extras::new();
    if want_scenario("stalled_1000") {
        extras.extend(stalled_1000(&pki, &services).await);
    }
    if want_scenario("wan") {
        extras.extend(wan(&pki, &services).await);
    }
    if want_scenario("scale") {
        extras.extend(scale(&services).await);
    }
    if want_scenario("agent_freeze") {
        extras.extend(agent_freeze(&pki, &services).await);
    }

    if json {
        let mut body: Vec<String> = results
            .iter()
            .map(|(k, f)| format!("\"{k}\": {}", f.json()))
            .collect();
        body.extend(extras.iter().map(|(k, v)| format!("\"{k}\": {}", v.json())));
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
    if !extras.is_empty() {
        println!("\nscenarios");
        for (k, v) in &extras {
            println!("{k:<36} {}", v.text());
        }
    }
}
