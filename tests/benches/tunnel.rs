//! `cargo bench --bench tunnel [-- --json]`: the same workloads directly and
//! through the tunnel (client library -> server -> agent -> destination, TLS
//! on both legs), in one run on loopback, with the ratio tunnel/direct.
//!
//! The server and the agent run as child processes (this executable, re-run
//! in a role), so their memory and CPU are measured apart from the load.
//!
//! Besides the per-path workloads (`--workloads idle,throughput,first_byte,
//! rtt,isolation`), four scenarios, each selectable the same way:
//! - `stalled_1000`: bulk transfers beside [`STALLED_EACH_WAY`] connections
//!   whose destination never reads and as many whose client never reads,
//!   all through one sidecar, server and agent; `stalled_1000_ratio` is
//!   their median throughput over the median of the same transfers without
//!   the stalls, in this run.
//! - `wan`: one stream over an emulated WAN (25 ms each way, 1 Gbit/s, see
//!   `tunnel_tests::wan`) on the agent's path to the server, against a
//!   plain TCP connection through an identical relay: `wan_ratio`.
//! - `scale`: one server process holding [`SCALE_AGENTS`] agents and
//!   [`SCALE_CONNS`] open connections: `scale_rss_mib`, its idle CPU, and a
//!   new connection's first byte under that load (`scale_first_byte_p99_ratio`
//!   to the unloaded p99 of the same run).
//!
//! - `agent_freeze`: two agents of one cluster under a load of new
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

const ROLE_ENV: &str = "CT_BENCH_ROLE";

const SINGLE_BYTES: u64 = 1 << 30;
const MULTI_STREAMS: usize = 8;
const MULTI_BYTES_EACH: u64 = 256 << 20;
const FIRST_BYTE_CONNS: usize = 2000;
const RTT_ROUNDS: usize = 5000;
const IDLE_CONNS: usize = 1000;
const ISOLATION_BYTES: u64 = 256 << 20;

/// Stalled connections per direction in `stalled_1000` (1,000 in all).
const STALLED_EACH_WAY: usize = 500;
/// The bulk transfer beside the stalls (and without them).
const STALLED_BULK_BYTES: u64 = 512 << 20;
/// Bulk transfers on each side of `stalled_1000_ratio`; their medians make
/// the ratio (one transfer swings by a third between runs on a shared VM).
const STALLED_BULK_RUNS: usize = 3;
/// Deadline for every stalled connection to open and fill up.
const STALL_FILL_DEADLINE: Duration = Duration::from_secs(300);
/// Stalled connections opened and filled at once.
const STALL_BATCH: usize = 100;
/// `--socket-buffer` of the agent and the sidecar in `stalled_1000`.
const STALL_SOCKET_BUFFER: &str = "128KiB";
/// Deadline of each measurement beside the stalls: only a freeze misses it.
const STALL_CHECK_DEADLINE: Duration = Duration::from_secs(60);
/// A write that makes no progress for this long: the connection is full.
const STALL_BLOCKED_AFTER: Duration = Duration::from_secs(1);
/// A stalled connection that takes more than this is buffered without bound.
const STALL_FILL_LIMIT: u64 = 128 << 20;
/// Kernel buffers of the bench's own ends of stalled connections.
const STALL_OWN_BUFFER: u32 = 32 * 1024;
/// Stalled connections are filled at [`STALL_CHUNK`] per [`STALL_PACE`]
/// (3.2 MB/s each): written at full speed, the tunnel's app-facing sockets
/// read fast at first, Linux autotunes their receive buffers to ~1.3 MiB
/// each, and 1,000 full ones bring the kernel's TCP memory close to its
/// pressure threshold (slowing every socket of the machine). Paced, they
/// keep their initial size; the tunnel's own buffering is the same.
const STALL_CHUNK: usize = 16 * 1024;
const STALL_PACE: Duration = Duration::from_millis(5);
/// The fill stops (and says so) when the kernel's TCP memory reaches this
/// share of its pressure threshold (`tcp_mem[1]`): beyond it, the kernel
/// throttles every TCP socket of the machine, other users' too.
const STALL_KERNEL_SHARE: f64 = 0.75;
/// The fill stops (and says so) if the tunnel's processes grow beyond this.
const STALL_RSS_LIMIT_KIB: u64 = 6 << 20;
const STALL_FIRST_BYTE_CONNS: usize = 200;
const STALL_RTT_ROUNDS: usize = 1000;

/// Each WAN transfer runs this long, or until [`WAN_MAX_BYTES`].
const WAN_SECS: Duration = Duration::from_secs(5);
const WAN_MAX_BYTES: u64 = 500_000_000;
const WAN_DEADLINE: Duration = Duration::from_secs(60);

const SCALE_CLUSTERS: usize = 100;
const SCALE_AGENTS_PER_CLUSTER: usize = 10;
const SCALE_AGENTS: usize = SCALE_CLUSTERS * SCALE_AGENTS_PER_CLUSTER;
const SCALE_CONNS: usize = 10_000;
/// Client connections the scale load is spread over.
const SCALE_CLIENTS: usize = 4;
/// Connections opened at once while building up the load.
const SCALE_OPEN_CONCURRENCY: usize = 200;
const SCALE_FIRST_BYTE_CONNS: usize = 1000;
/// Covers one whole keepalive interval (pings every 10 s by default).
const SCALE_IDLE: Duration = Duration::from_secs(10);
const SCALE_DEADLINE: Duration = Duration::from_secs(300);

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

/// Writes for [`WAN_SECS`] or [`WAN_MAX_BYTES`], then FIN (downloads).
async fn start_source() -> SocketAddr {
    serve(|mut tcp| async move {
        let buf = vec![0x3cu8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < WAN_SECS && sent < WAN_MAX_BYTES {
            let n = buf.len().min((WAN_MAX_BYTES - sent) as usize);
            if tcp.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n as u64;
        }
        let _ = tcp.shutdown().await;
        let mut b = [0u8; 1];
        let _ = tcp.read(&mut b).await;
    })
    .await
}

/// What the stalled connections of `stalled_1000` did.
#[derive(Default)]
struct StallCounters {
    /// Connections whose writer blocked (reported once each).
    blocked: AtomicUsize,
    /// Connections that failed (cut, reset, refused).
    cut: AtomicUsize,
    /// Connections that took more than [`STALL_FILL_LIMIT`].
    unbounded: AtomicUsize,
    /// Bytes the blocked ones took before blocking.
    held: AtomicU64,
    /// The first failure, as the socket reported it.
    first_failure: std::sync::Mutex<Option<String>>,
}

impl StallCounters {
    fn settled(&self) -> usize {
        self.blocked.load(Ordering::SeqCst)
            + self.cut.load(Ordering::SeqCst)
            + self.unbounded.load(Ordering::SeqCst)
    }
}

/// Writes into `tcp` whenever it takes bytes until `stop` or a failure,
/// counting into `c`; returns the socket (to be reset). Paced (see
/// [`STALL_PACE`]); once `pause` is set, stops writing and holds it.
async fn keep_full(
    mut tcp: TcpStream,
    c: Arc<StallCounters>,
    pause: CancellationToken,
    stop: CancellationToken,
) -> TcpStream {
    let chunk = vec![0x5au8; STALL_CHUNK];
    let mut total = 0u64;
    let mut reported = false;
    let mut total_at_block = 0;
    while total <= STALL_FILL_LIMIT {
        if pause.is_cancelled() {
            // Holds the connection as it is: stalled, no longer filling.
            stop.cancelled().await;
            return tcp;
        }
        tokio::select! {
            () = stop.cancelled() => return tcp,
            res = tokio::time::timeout(STALL_BLOCKED_AFTER, tcp.write(&chunk)) => match res {
                Ok(Ok(n)) => total += n as u64,
                Ok(Err(e)) => {
                    if reported {
                        // Counted once: it was full, then cut.
                        c.blocked.fetch_sub(1, Ordering::SeqCst);
                        c.held.fetch_sub(total_at_block, Ordering::SeqCst);
                    }
                    c.cut.fetch_add(1, Ordering::SeqCst);
                    c.first_failure
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| format!("after {total} bytes: {e}"));
                    return tcp;
                }
                Err(_) => {
                    if !reported {
                        reported = true;
                        total_at_block = total;
                        c.held.fetch_add(total, Ordering::SeqCst);
                        c.blocked.fetch_add(1, Ordering::SeqCst);
                    }
                }
            },
        }
        tokio::time::sleep(STALL_PACE).await;
    }
    if reported {
        // Counted once: it seemed full, then took more than the limit.
        c.blocked.fetch_sub(1, Ordering::SeqCst);
        c.held.fetch_sub(total_at_block, Ordering::SeqCst);
    }
    c.unbounded.fetch_add(1, Ordering::SeqCst);
    stop.cancelled().await;
    tcp
}

/// The destinations of stalled connections: one never reads, one floods.
/// They count and hold only what arrives once [`StallDestinations::arm`]ed:
/// before that, connections are closed at once (a relay-floor path's
/// listening probes reach every service, these included, and a probe that
/// met the flood would count as a cut stalled connection).
struct StallDestinations {
    /// Set by the `stalled_1000` scenario before it opens its connections.
    armed: Arc<std::sync::atomic::AtomicBool>,
    never_reads: SocketAddr,
    floods: SocketAddr,
    /// Connections the never-reading destination holds.
    held: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    /// What the flooding destination's writers did.
    flood: Arc<StallCounters>,
    /// Stops the flooding destination's writers from writing more.
    pause: CancellationToken,
    /// Ends the writers; cancelled too when dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl StallDestinations {
    /// From now on, connections are held (never read) or flooded and counted.
    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Back to closing whatever arrives (once the scenario is done).
    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn start() -> Self {
        let small = |send: Option<u32>, recv: Option<u32>| {
            SocketBuffers { send, recv }.listen().expect("listener")
        };
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let never = small(None, Some(STALL_OWN_BUFFER));
        let never_reads = never.local_addr().unwrap();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, a) = (held.clone(), armed.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = never.accept().await {
                if a.load(Ordering::SeqCst) {
                    h.lock().unwrap().push(tcp);
                }
            }
        });
        let flooding = small(Some(STALL_OWN_BUFFER), None);
        let floods = flooding.local_addr().unwrap();
        let flood = Arc::new(StallCounters::default());
        let stop = CancellationToken::new();
        let pause = CancellationToken::new();
        let (stop_rx, pause_rx) = (stop.clone(), pause.clone());
        let (f, a) = (flood.clone(), armed.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = flooding.accept().await {
                if !a.load(Ordering::SeqCst) {
                    continue;
                }
                let (f, pause_rx, stop_rx) = (f.clone(), pause_rx.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    let tcp = keep_full(tcp, f, pause_rx, stop_rx).await;
                    reset(tcp);
                });
            }
        });
        Self {
            armed,
            never_reads,
            floods,
            held,
            flood,
            pause,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }
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
    source: SocketAddr,
    stall: StallDestinations,
}

impl Services {
    /// In the order of [`Path_`]'s fields (the sidecar's ports).
    fn all(&self) -> [SocketAddr; 7] {
        [
            self.sink,
            self.hello,
            self.echo,
            self.flood,
            self.source,
            self.stall.never_reads,
            self.stall.floods,
        ]
    }
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
        self.try_connect(SocketBuffers::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A new connection whose socket has `buffers`.
    async fn try_connect(self, buffers: SocketBuffers) -> Result<TcpStream, String> {
        match self {
            Endpoint::Tcp(addr) => {
                let tcp = buffers
                    .connect(addr)
                    .await
                    .map_err(|e| format!("connect to {addr}: {e}"))?;
                tcp.set_nodelay(true).unwrap();
                Ok(tcp)
            }
            Endpoint::Connect { proxy, port } => {
                let mut tcp = buffers
                    .connect(proxy)
                    .await
                    .map_err(|e| format!("connect to the proxy {proxy}: {e}"))?;
                tcp.set_nodelay(true).unwrap();
                // The proxy user names the cluster.
                connect_on(&mut tcp, "bench", "127.0.0.1", port).await?;
                Ok(tcp)
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
    source: Endpoint,
    never_reads: Endpoint,
    floods: Endpoint,
}

impl Path_ {
    /// One endpoint per service, in the order of [`Services::all`].
    fn from_endpoints(e: [Endpoint; 7]) -> Self {
        let [sink, hello, echo, flood, source, never_reads, floods] = e;
        Self {
            sink,
            hello,
            echo,
            flood,
            source,
            never_reads,
            floods,
        }
    }
}

fn direct_path(s: &Services) -> Path_ {
    Path_::from_endpoints(s.all().map(Endpoint::Tcp))
}

/// Three [`relay_floor`] processes (`role` `relay` or `relay-async`)
/// chained in front of every service.
async fn relay_floor_path(s: &Services, role: &str, dir: &Path) -> (Path_, Vec<RoleProc>) {
    let mut procs = Vec::new();
    let mut ends = s.all();
    for hop in ["relay-agent", "relay-server", "relay-sidecar"] {
        let listens = ends.map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let args: Vec<String> = listens
            .iter()
            .zip(ends)
            .map(|(l, u)| format!("{l}={u}"))
            .collect();
        let proc = RoleProc::spawn_as(role, hop, &args, dir);
        for l in listens {
            wait_listening(l, "a relay-floor process").await;
        }
        procs.push(proc);
        ends = listens;
    }
    (Path_::from_endpoints(ends.map(Endpoint::Tcp)), procs)
}

async fn tunnel_path(s: &Services, client: Arc<tunnel_proto::client::TunnelClient>) -> Path_ {
    let mut eps = Vec::new();
    for a in s.all() {
        let target = Target::new("bench", "127.0.0.1", a.port());
        eps.push(Endpoint::Tcp(forward_port(client.clone(), target).await));
    }
    Path_::from_endpoints(eps.try_into().ok().expect("seven endpoints"))
}

/// A server process on free loopback ports, ready.
struct ServerProc {
    proc: RoleProc,
    client_addr: SocketAddr,
    agent_addr: SocketAddr,
}

impl ServerProc {
    async fn start(pki: &Pki) -> Self {
        let dir = pki.dir.path();
        let (agent_port, client_port, admin_port) = (free_port(), free_port(), free_port());
        let s = |v: &str| v.to_string();
        let proc = RoleProc::spawn(
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
                // Ready before its agent connects: the bench starts it first.
                s("--ready-wait=0s"),
                // The scale load is one identity's: 10,000 connections plus the
                // probes measured beside them.
                s("--max-connections-per-identity"),
                (2 * SCALE_CONNS).to_string(),
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
        Self {
            proc,
            client_addr: format!("127.0.0.1:{client_port}").parse().unwrap(),
            agent_addr: format!("127.0.0.1:{agent_port}").parse().unwrap(),
        }
    }
}

/// The tunnel's processes for one path, started fresh so that memory freed by
/// an earlier path cannot hide this one's growth.
struct System {
    server: RoleProc,
    agent: RoleProc,
    sidecar: Option<RoleProc>,
    client_addr: SocketAddr,
    /// Sidecar ports, one per service in the order of [`Services::all`]; and its proxy.
    sidecar_ports: Option<([u16; 7], SocketAddr)>,
    /// The emulated WAN on the agent's path to the server, if any.
    _relay: Option<tunnel_tests::wan::WanRelay>,
}

impl System {
    async fn start(pki: &Pki, services: Option<&Services>) -> Self {
        Self::start_with(pki, services, None, None).await
    }

    /// With `wan`, the agent dials the server through an emulated link; with
    /// `socket_buffer`, the agent and the sidecar cap the kernel buffers of
    /// their app and destination sockets (`--socket-buffer`).
    async fn start_with(
        pki: &Pki,
        services: Option<&Services>,
        wan: Option<tunnel_tests::wan::Link>,
        socket_buffer: Option<&str>,
    ) -> Self {
        let buffer_args: Vec<String> = socket_buffer
            .map(|b| vec!["--socket-buffer".to_string(), b.to_string()])
            .unwrap_or_default();
        let dir = pki.dir.path();
        let server = ServerProc::start(pki).await;
        let relay = match wan {
            Some(link) => Some(
                tunnel_tests::wan::WanRelay::start(server.agent_addr, link)
                    .await
                    .expect("WAN relay"),
            ),
            None => None,
        };
        let agent_dials = relay.as_ref().map(|r| r.addr).unwrap_or(server.agent_addr);
        let agent_admin = free_port();
        let s = |v: &str| v.to_string();
        let agent = RoleProc::spawn(
            "agent",
            &[
                s("--server"),
                agent_dials.to_string(),
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
            ]
            .into_iter()
            .chain(buffer_args.iter().cloned())
            .collect::<Vec<_>>(),
            dir,
        );
        let agent_admin: SocketAddr = format!("127.0.0.1:{agent_admin}").parse().unwrap();
        wait_until(
            "the agent's tunnel is up",
            Duration::from_secs(20),
            || async move { matches!(http_get(agent_admin, "/readyz").await, Ok((200, _))) },
        )
        .await;
        let client_addr = server.client_addr;
        // The agent is ready once its tunnel is up, which can be a round trip
        // before the server lists it: wait for the server.
        let lister = client(pki, "bench", client_addr);
        if let Err(e) = wait_agents(&lister, 1).await {
            panic!("{e}");
        }
        let (sidecar, sidecar_ports) = match services {
            None => (None, None),
            Some(sv) => {
                let ports = [(); 7].map(|_| free_port());
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
                args.extend(buffer_args.iter().cloned());
                for (p, svc) in ports.iter().zip(sv.all()) {
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
                        // The admin port may not listen yet: not ready, not a failure.
                        match http_get(sc_admin, "/metrics").await {
                            Ok((200, body)) => {
                                metric(&body, "tunnel_sidecar_server_connected") == Some(1.0)
                            }
                            _ => false,
                        }
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
            server: server.proc,
            agent,
            sidecar,
            client_addr,
            sidecar_ports,
            _relay: relay,
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
        Path_::from_endpoints(p.map(|port| Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))))
    }

    fn connect_path(&self, s: &Services) -> Path_ {
        let (_, proxy) = self.sidecar_ports.expect("sidecar");
        Path_::from_endpoints(s.all().map(|a| Endpoint::Connect {
            proxy,
            port: a.port(),
        }))
    }
}

// ---------------------------------------------------------------- workloads

/// Sends `bytes` and waits for the sink's acknowledgement; returns Gbit/s.
async fn send_bytes(ep: Endpoint, bytes: u64) -> f64 {
    try_send_bytes(ep, bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn try_send_bytes(ep: Endpoint, bytes: u64) -> Result<f64, String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        tcp.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack)
        .await
        .map_err(|e| format!("the sink's acknowledgement: {e}"))?;
    Ok(gbps(bytes, start.elapsed()))
}

/// The median throughput of `runs` transfers of `bytes` to `ep`'s sink.
async fn median_send(ep: Endpoint, bytes: u64, runs: usize) -> Result<f64, String> {
    let mut gbps = Vec::with_capacity(runs);
    for _ in 0..runs {
        gbps.push(try_send_bytes(ep, bytes).await?);
    }
    gbps.sort_by(f64::total_cmp);
    Ok(gbps[gbps.len() / 2])
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
    first_byte_n(ep, FIRST_BYTE_CONNS)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn first_byte_n(ep: Endpoint, n: usize) -> Result<(f64, f64), String> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b)
            .await
            .map_err(|e| format!("first byte: {e}"))?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
}

/// 64-byte request/response on one open connection; (p50, p99) in µs.
async fn round_trips(ep: Endpoint) -> (f64, f64) {
    round_trips_n(ep, RTT_ROUNDS)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn round_trips_n(ep: Endpoint, rounds: usize) -> Result<(f64, f64), String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..200 + rounds {
        let start = Instant::now();
        tcp.write_all(&msg)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tcp.read_exact(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        // The first 200 warm up.
        if i >= 200 {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
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

// ---------------------------------------------------------------- scenarios

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

/// The kernel's memory for TCP buffers, all sockets (MiB).
fn kernel_tcp_mib() -> f64 {
    let stat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages: f64 = stat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|w| *w == "mem")
                .and_then(|i| f.get(i + 1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// The kernel's TCP memory pressure threshold (`tcp_mem[1]`, MiB).
fn kernel_tcp_pressure_mib() -> f64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|pages| pages * 4096.0 / (1024.0 * 1024.0))
        .unwrap_or(f64::MAX)
}

/// One bulk transfer through the sidecar's port beside 1,000 stalled
/// connections (half whose destination never reads, half whose client never
/// reads; each half split between the sidecar's port and CONNECT), as a
/// ratio to the same transfer without them; and a fresh connection's first
/// byte and 64-byte round trip while they are stalled.
async fn stalled_1000(pki: &Pki, services: &Services) -> Extras {
    let total = 2 * STALLED_EACH_WAY;
    // Four descriptors per stalled connection, at most in this process.
    ensure_fd_limit(4 * total as u64 + 8192);
    // Stalled peers hold kernel buffers in every socket on their path: the
    // tunnel's own app and destination sockets are capped as an operator
    // who expects stalls would (the test's peers cap theirs too).
    let sys = System::start_with(pki, Some(services), None, Some(STALL_SOCKET_BUFFER)).await;
    let (port, connect) = (sys.port_path(), sys.connect_path(services));
    let mut out: Extras = vec![(
        "stalled_1000_stalled_each_way",
        num(STALLED_EACH_WAY as f64),
    )];
    eprintln!(
        "[stalled_1000] baseline: {STALLED_BULK_RUNS} streams of {} MiB, one after the other",
        STALLED_BULK_BYTES >> 20
    );
    let baseline = match within(
        "the bulk transfers without stalls",
        STALL_CHECK_DEADLINE,
        median_send(port.sink, STALLED_BULK_BYTES, STALLED_BULK_RUNS),
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            out.push(("stalled_1000_ratio", num(0.0)));
            out.push(("stalled_1000_message", Extra::Text(e)));
            return out;
        }
    };
    out.push(("stalled_1000_baseline_gbps", num(baseline)));

    eprintln!("[stalled_1000] opening {total} stalled connections");
    services.stall.arm();
    let kernel_before = kernel_tcp_mib();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let pause = CancellationToken::new();
    let (stop_rx, pause_rx) = (stop.clone(), pause.clone());
    let writers = Arc::new(StallCounters::default());
    let open_failed = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let unread = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flood = services.stall.flood.clone();
    let mut tasks = Vec::new();
    let started = Instant::now();
    let mut fill_message = None;
    let mut launched = 0;
    'fill: while launched < total {
        // One batch at a time: at most STALL_BATCH connections fill at
        // once, so that data waits in the tunnel, not in kernel buffers.
        let batch = launched..(launched + STALL_BATCH).min(total);
        for i in batch.clone() {
            let client_stalls = i % 2 == 1;
            let path = if (i / 2) % 2 == 0 { &port } else { &connect };
            let (ep, buffers) = if client_stalls {
                (
                    path.floods,
                    SocketBuffers {
                        send: None,
                        recv: Some(STALL_OWN_BUFFER),
                    },
                )
            } else {
                (
                    path.never_reads,
                    SocketBuffers {
                        send: Some(STALL_OWN_BUFFER),
                        recv: None,
                    },
                )
            };
            let (writers, open_failed, opened, unread, pause_rx, stop_rx) = (
                writers.clone(),
                open_failed.clone(),
                opened.clone(),
                unread.clone(),
                pause_rx.clone(),
                stop_rx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let conn = tokio::time::timeout(STALL_FILL_DEADLINE, ep.try_connect(buffers)).await;
                if matches!(conn, Ok(Ok(_))) {
                    opened.fetch_add(1, Ordering::SeqCst);
                }
                match conn {
                    Ok(Ok(tcp)) if client_stalls => unread.lock().unwrap().push(tcp),
                    Ok(Ok(tcp)) => reset(keep_full(tcp, writers, pause_rx, stop_rx).await),
                    other => {
                        open_failed.fetch_add(1, Ordering::SeqCst);
                        let why = match other {
                            Ok(Err(e)) => format!("open failed: {e}"),
                            _ => format!("open took more than {STALL_FILL_DEADLINE:?}"),
                        };
                        writers.first_failure.lock().unwrap().get_or_insert(why);
                    }
                }
            }));
        }
        launched = batch.end;
        loop {
            let settled = writers.settled() + flood.settled() + open_failed.load(Ordering::SeqCst);
            if settled >= launched {
                let failed = writers.cut.load(Ordering::SeqCst)
                    + flood.cut.load(Ordering::SeqCst)
                    + open_failed.load(Ordering::SeqCst);
                if failed > 0 {
                    // New connections fail beside the stalls: more would
                    // only fail the same way.
                    let first = |c: &StallCounters| c.first_failure.lock().unwrap().clone();
                    fill_message = Some(format!(
                        "{failed} of {launched} stalled connections failed to open or were cut (first failures: client side {:?}, destination side {:?}); filling stopped there",
                        first(&writers),
                        first(&flood),
                    ));
                    break 'fill;
                }
                break;
            }
            // Stalled sockets keep their (autotuned) kernel buffers full:
            // stop before the kernel's TCP memory pressure, which would
            // slow every TCP socket of the machine, not only ours.
            let kernel = kernel_tcp_mib();
            if kernel > STALL_KERNEL_SHARE * kernel_tcp_pressure_mib() {
                fill_message = Some(format!(
                    "the kernel's TCP memory reached {kernel:.0} MiB ({:.0}% of its pressure threshold) with {settled} of {total} stalled connections full; filling stopped there",
                    STALL_KERNEL_SHARE * 100.0
                ));
                break 'fill;
            }
            let rss: u64 = sys.procs().iter().map(|p| p.rss_kib()).sum();
            if rss > STALL_RSS_LIMIT_KIB {
                fill_message = Some(format!(
                    "the tunnel's processes grew to {} MiB with {settled} of {total} stalled connections full; filling stopped there",
                    rss >> 10
                ));
                break 'fill;
            }
            if started.elapsed() > STALL_FILL_DEADLINE {
                fill_message = Some(format!(
                    "only {settled} of {total} stalled connections opened and filled within {STALL_FILL_DEADLINE:?}"
                ));
                break 'fill;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Whatever stopped the fill, the stalls stop growing now (they stay
    // stalled): the measurements run beside what is held.
    pause.cancel();
    services.stall.pause.cancel();
    let (blocked, held) = (
        writers.blocked.load(Ordering::SeqCst) + flood.blocked.load(Ordering::SeqCst),
        writers.held.load(Ordering::SeqCst) + flood.held.load(Ordering::SeqCst),
    );
    let failed = writers.cut.load(Ordering::SeqCst)
        + flood.cut.load(Ordering::SeqCst)
        + open_failed.load(Ordering::SeqCst);
    let unbounded =
        writers.unbounded.load(Ordering::SeqCst) + flood.unbounded.load(Ordering::SeqCst);
    eprintln!(
        "[stalled_1000] {blocked} blocked ({} MiB held by the bench's writers before blocking), {failed} failed, {unbounded} unbounded, after {:.1} s",
        held >> 20,
        started.elapsed().as_secs_f64()
    );
    out.push((
        "stalled_1000_opened",
        num(opened.load(Ordering::SeqCst) as f64),
    ));
    out.push(("stalled_1000_blocked", num(blocked as f64)));
    out.push(("stalled_1000_failed", num(failed as f64)));
    out.push(("stalled_1000_held_mib", num((held >> 20) as f64)));
    let rss: u64 = sys.procs().iter().map(|p| p.rss_kib()).sum();
    out.push(("stalled_1000_tunnel_rss_mib", num((rss >> 10) as f64)));
    out.push((
        "stalled_1000_kernel_tcp_mib",
        num(kernel_tcp_mib() - kernel_before),
    ));

    let mut messages: Vec<String> = fill_message.into_iter().collect();
    if unbounded > 0 {
        messages.push(format!(
            "{unbounded} stalled connection(s) took more than {} MiB without blocking",
            STALL_FILL_LIMIT >> 20
        ));
    }
    eprintln!("[stalled_1000] first byte and round trips beside the stalls");
    match within(
        "first byte beside the stalls",
        STALL_CHECK_DEADLINE,
        first_byte_n(port.hello, STALL_FIRST_BYTE_CONNS),
    )
    .await
    {
        Ok((p50, _)) => out.push(("stalled_1000_first_byte_p50_us", num(p50))),
        Err(e) => {
            out.push(("stalled_1000_first_byte_p50_us", Extra::Num(None)));
            messages.push(e);
        }
    }
    match within(
        "64-byte round trips beside the stalls",
        STALL_CHECK_DEADLINE,
        round_trips_n(port.echo, STALL_RTT_ROUNDS),
    )
    .await
    {
        Ok((p50, _)) => out.push(("stalled_1000_rtt_p50_us", num(p50))),
        Err(e) => {
            out.push(("stalled_1000_rtt_p50_us", Extra::Num(None)));
            messages.push(e);
        }
    }
    eprintln!(
        "[stalled_1000] {STALLED_BULK_RUNS} streams of {} MiB beside the stalls",
        STALLED_BULK_BYTES >> 20
    );
    match within(
        "the bulk transfers beside the stalls",
        STALL_CHECK_DEADLINE,
        median_send(port.sink, STALLED_BULK_BYTES, STALLED_BULK_RUNS),
    )
    .await
    {
        Ok(g) => {
            out.push(("stalled_1000_bulk_gbps", num(g)));
            out.push(("stalled_1000_ratio", num(g / baseline)));
        }
        Err(e) => {
            out.push(("stalled_1000_bulk_gbps", num(0.0)));
            out.push(("stalled_1000_ratio", num(0.0)));
            messages.push(e);
        }
    }
    if !messages.is_empty() {
        sys.print_logs("stalled_1000");
        out.push(("stalled_1000_message", Extra::Text(messages.join("; "))));
    }

    // Reset both ends of every stall, then stop the tunnel.
    stop.cancel();
    services.stall.stop.cancel();
    services.stall.disarm();
    for tcp in unread.lock().unwrap().drain(..) {
        reset(tcp);
    }
    for tcp in services.stall.held.lock().unwrap().drain(..) {
        reset(tcp);
    }
    // Writers reset their sockets once stopped; openers still waiting are
    // abandoned.
    let mut tasks = tasks;
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(tasks.iter_mut()),
    )
    .await;
    for t in tasks {
        t.abort();
    }
    drop(sys);
    out
}

/// Sends for [`WAN_SECS`] (or [`WAN_MAX_BYTES`]) into a sink and waits for
/// its acknowledgement; Gbit/s over the whole transfer.
async fn timed_upload(ep: Endpoint) -> Result<f64, String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < WAN_SECS && sent < WAN_MAX_BYTES {
        let n = buf.len().min((WAN_MAX_BYTES - sent) as usize);
        tcp.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        sent += n as u64;
    }
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack)
        .await
        .map_err(|e| format!("the sink's acknowledgement: {e}"))?;
    Ok(gbps(sent, start.elapsed()))
}

/// Reads a source (see [`start_source`]) to its end; Gbit/s from connect.
async fn timed_download(ep: Endpoint) -> Result<f64, String> {
    let start = Instant::now();
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => return Err(format!("read after {got} bytes: {e}")),
        }
    }
    if got == 0 {
        return Err("the connection ended before any data".into());
    }
    Ok(gbps(got, start.elapsed()))
}

/// New connections a second through the two agents of `agent_freeze`.
const FREEZE_RATE: u32 = 50;
/// Load before the freeze, during it, and after the thaw.
const FREEZE_WARMUP: Duration = Duration::from_secs(2);
const FREEZE_HOLD: Duration = Duration::from_secs(5);
/// Longest wait for the thawed agent to be picked again.
const THAW_DEADLINE: Duration = Duration::from_secs(30);

/// One server process and two agent processes of one cluster, under a load
/// of [`FREEZE_RATE`] new connections a second (each a 32-byte echo); one
/// agent is frozen (SIGSTOP) for [`FREEZE_HOLD`], then thawed.
/// `agent_freeze_to_last_connection_ms` is the time from the freeze to the
/// last connection the server sent to the frozen agent (0 if none after
/// it); `agent_freeze_failed_connections` what failed meanwhile (the target
/// is none); `agent_freeze_open_max_ms` the slowest open during the freeze
/// (an open that went to the frozen agent waits for the acknowledgement
/// timeout, then goes to the other); `agent_thaw_to_first_connection_ms`
/// how long until the thawed agent is picked again.
async fn agent_freeze(pki: &Pki, services: &Services) -> Extras {
    let mut out = Extras::new();
    let server = ServerProc::start(pki).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let s = |v: &str| v.to_string();
    let agents: Vec<RoleProc> = ["bench-a", "bench-b"]
        .iter()
        .zip(&dirs)
        .map(|(id, dir)| {
            RoleProc::spawn(
                "agent",
                &[
                    s("--server"),
                    server.agent_addr.to_string(),
                    s("--server-name"),
                    s("localhost"),
                    s("--cluster"),
                    s("bench"),
                    s("--agent-id"),
                    s(id),
                    s("--cert-dir"),
                    pki.dir.path().display().to_string(),
                    s("--allow"),
                    s("127.0.0.0/8"),
                    s("--admin-listen"),
                    format!("127.0.0.1:{}", free_port()),
                ],
                dir.path(),
            )
        })
        .collect();
    let client = client(pki, "bench", server.client_addr);
    if let Err(e) = wait_agents(&client, 2).await {
        out.push(("agent_freeze_message", Extra::Text(e)));
        return out;
    }
    let target = Target::new("bench", "127.0.0.1", services.echo.port());
    let failed = Arc::new(AtomicUsize::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let load = {
        let stop = stop.clone();
        let (client, failed, slowest_us, counting) = (
            client.clone(),
            failed.clone(),
            slowest_us.clone(),
            counting.clone(),
        );
        tokio::spawn(steady_load(
            FREEZE_RATE,
            stop.cancelled_owned(),
            move |_| {
                let (client, target, failed, slowest_us, counting) = (
                    client.clone(),
                    target.clone(),
                    failed.clone(),
                    slowest_us.clone(),
                    counting.clone(),
                );
                async move {
                    let started = Instant::now();
                    let res = tokio::time::timeout(Duration::from_secs(10), async {
                        let mut io = client.open_io(&target).await.map_err(|e| e.to_string())?;
                        let opened = started.elapsed();
                        io.write_all(&[7u8; 32]).await.map_err(|e| e.to_string())?;
                        let mut back = [0u8; 32];
                        io.read_exact(&mut back).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>(opened)
                    })
                    .await;
                    if !counting.load(Ordering::Relaxed) {
                        return;
                    }
                    match res {
                        Ok(Ok(opened)) => {
                            slowest_us.fetch_max(opened.as_micros() as u64, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            },
        ))
    };
    tokio::time::sleep(FREEZE_WARMUP).await;
    let frozen = &agents[1];
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(frozen.pid().to_string())
            .status();
    };
    counting.store(true, Ordering::Relaxed);
    let frozen_ms = unix_ms();
    signal("STOP");
    eprintln!(
        "[agent_freeze] agent bench-b frozen for {FREEZE_HOLD:?} under {FREEZE_RATE} connections/s"
    );
    tokio::time::sleep(FREEZE_HOLD).await;
    let last = last_picked(&client, "bench-b").await;
    counting.store(false, Ordering::Relaxed);
    let thawed_ms = unix_ms();
    signal("CONT");
    let thawed = Instant::now();
    let mut back = None;
    while thawed.elapsed() < THAW_DEADLINE {
        if last_picked(&client, "bench-b").await > thawed_ms {
            back = Some(unix_ms().saturating_sub(thawed_ms));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = load.await;
    out.push((
        "agent_freeze_to_last_connection_ms",
        num(last.saturating_sub(frozen_ms) as f64),
    ));
    out.push((
        "agent_freeze_failed_connections",
        num(failed.load(Ordering::Relaxed) as f64),
    ));
    out.push((
        "agent_freeze_open_max_ms",
        num(slowest_us.load(Ordering::Relaxed) as f64 / 1000.0),
    ));
    out.push((
        "agent_thaw_to_first_connection_ms",
        back.map_or(Extra::Num(None), |ms| num(ms as f64)),
    ));
    if std::env::var_os("CT_BENCH_LOGS").is_some() {
        eprintln!("{}", server.proc.tail(40));
    }
    drop((agents, server));
    out
}

/// One stream over an emulated WAN (25 ms each way, 1 Gbit/s) between the
/// agent and the server, against a plain TCP connection through an
/// identical relay; each direction. `wan_ratio` is the worse direction.
async fn wan(pki: &Pki, services: &Services) -> Extras {
    use tunnel_tests::wan::{Link, WanRelay};
    let link = Link::wan_1g_25ms();
    let mut out = Extras::new();
    let mut messages = Vec::new();
    let mut run = async |what: &'static str, f: Result<f64, String>| -> Option<f64> {
        match f {
            Ok(g) => {
                eprintln!("[wan] {what}: {g:.3} Gbit/s");
                Some(g)
            }
            Err(e) => {
                eprintln!("[wan] {what}: {e}");
                messages.push(e);
                None
            }
        }
    };
    eprintln!("[wan] direct TCP through the relay, {WAN_SECS:?} each way");
    let to_sink = WanRelay::start(services.sink, link).await.expect("relay");
    let direct_up = run(
        "direct up",
        within(
            "direct up",
            WAN_DEADLINE,
            timed_upload(Endpoint::Tcp(to_sink.addr)),
        )
        .await,
    )
    .await;
    let to_source = WanRelay::start(services.source, link).await.expect("relay");
    let direct_down = run(
        "direct down",
        within(
            "direct down",
            WAN_DEADLINE,
            timed_download(Endpoint::Tcp(to_source.addr)),
        )
        .await,
    )
    .await;
    drop((to_sink, to_source));

    eprintln!("[wan] one tunnelled stream, the agent dialing through the relay");
    let sys = System::start_with(pki, None, Some(link), None).await;
    let client = client(pki, "bench", sys.client_addr);
    client.ensure_connected().await.expect("client connects");
    let path = tunnel_path(services, client).await;
    let tunnel_up = run(
        "tunnel up",
        within("tunnel up", WAN_DEADLINE, timed_upload(path.sink)).await,
    )
    .await;
    let tunnel_down = run(
        "tunnel down",
        within("tunnel down", WAN_DEADLINE, timed_download(path.source)).await,
    )
    .await;
    if tunnel_up.is_none() || tunnel_down.is_none() {
        sys.print_logs("wan");
    }
    drop(sys);

    let ratio = |t: Option<f64>, d: Option<f64>| match (t, d) {
        (Some(t), Some(d)) if d > 0.0 => t / d,
        _ => 0.0,
    };
    let (up, down) = (ratio(tunnel_up, direct_up), ratio(tunnel_down, direct_down));
    out.push(("wan_ratio", num(up.min(down))));
    out.push(("wan_up_ratio", num(up)));
    out.push(("wan_down_ratio", num(down)));
    out.push(("wan_direct_up_gbps", Extra::Num(direct_up)));
    out.push(("wan_direct_down_gbps", Extra::Num(direct_down)));
    out.push(("wan_tunnel_up_gbps", Extra::Num(tunnel_up)));
    out.push(("wan_tunnel_down_gbps", Extra::Num(tunnel_down)));
    if !messages.is_empty() {
        out.push(("wan_message", Extra::Text(messages.join("; "))));
    }
    out
}

/// An in-process agent `j` of `cluster` (its own TLS + HTTP/2 connection).
async fn scale_agent(
    pki: &Pki,
    cluster: &str,
    j: usize,
    server: SocketAddr,
) -> tunnel_agent::Agent {
    let mut config = agent_config(pki, cluster, &[server]);
    config.agent_id = format!("{cluster}-agent-{j}");
    tunnel_agent::Agent::start(config)
        .await
        .expect("agent starts")
}

/// Waits until the server lists `n` agents in all.
async fn wait_agents(client: &tunnel_proto::client::TunnelClient, n: usize) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let listed: usize = match client.list_clusters().await {
            Ok(c) => c.iter().map(|c| c.agents.len()).sum(),
            Err(_) => 0,
        };
        if listed >= n {
            return Ok(());
        }
        if start.elapsed() > SCALE_DEADLINE {
            return Err(format!(
                "the server lists {listed} of {n} agents after {SCALE_DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One server process with [`SCALE_AGENTS`] agents (in this process, real
/// TLS and HTTP/2 each) and [`SCALE_CONNS`] open connections through it
/// (client library, spread over every cluster, to an idle echo).
fn client_of(pki: &Pki, name: &str, server: SocketAddr) -> Arc<tunnel_proto::client::TunnelClient> {
    client(pki, name, server)
}

async fn scale(services: &Services) -> Extras {
    // This process: the agents' tunnels and admin ports, and per connection
    // the agent's dial. The echo runs in a process of its own: hard limits
    // of 20,000 descriptors are common and cannot be raised without
    // CAP_SYS_RESOURCE (not even by root in a container).
    ensure_fd_limit((SCALE_CONNS + 3 * SCALE_AGENTS + 4096) as u64);
    let echo_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let echo_dir = tempfile::tempdir().unwrap();
    let _echo = RoleProc::spawn("echo", &[echo_addr.to_string()], echo_dir.path());
    wait_listening(echo_addr, "the echo process").await;
    let mut out = Extras::new();
    let mut messages = Vec::new();
    let names: Vec<String> = (0..SCALE_CLUSTERS)
        .map(|i| format!("scale{i:03}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = Pki::new(&refs, &["bench"]);
    let server = ServerProc::start(&pki).await;
    let client = client(&pki, "bench", server.client_addr);
    client.ensure_connected().await.expect("client connects");

    eprintln!("[scale] unloaded: {SCALE_AGENTS_PER_CLUSTER} agents of one cluster");
    let mut agents = Vec::new();
    for j in 0..SCALE_AGENTS_PER_CLUSTER {
        agents.push(scale_agent(&pki, &names[0], j, server.agent_addr).await);
    }
    if let Err(e) = wait_agents(&client, SCALE_AGENTS_PER_CLUSTER).await {
        messages.push(e);
    }
    let hello = Endpoint::Tcp(
        forward_port(
            client.clone(),
            Target::new(&names[0], "127.0.0.1", services.hello.port()),
        )
        .await,
    );
    // Warm-up, not measured.
    let _ = within("warm-up", SCALE_DEADLINE, first_byte_n(hello, 100)).await;
    let unloaded = within(
        "unloaded first byte",
        SCALE_DEADLINE,
        first_byte_n(hello, SCALE_FIRST_BYTE_CONNS),
    )
    .await;

    eprintln!("[scale] {SCALE_AGENTS} agents");
    for name in &names[1..] {
        for j in 0..SCALE_AGENTS_PER_CLUSTER {
            agents.push(scale_agent(&pki, name, j, server.agent_addr).await);
        }
    }
    let started = Instant::now();
    if let Err(e) = wait_agents(&client, SCALE_AGENTS).await {
        messages.push(e);
    }
    eprintln!(
        "[scale] {SCALE_AGENTS} agents listed after {:.1} s; opening {SCALE_CONNS} connections",
        started.elapsed().as_secs_f64()
    );
    let gate = Arc::new(tokio::sync::Semaphore::new(SCALE_OPEN_CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(SCALE_CONNS);
    // The load comes from several clients (a connection of the client
    // library admits about 4,500 streams within its window budget), as it
    // would from several sidecars.
    let loaders: Vec<_> = (0..SCALE_CLIENTS)
        .map(|_| client_of(&pki, "bench", server.client_addr))
        .collect();
    for i in 0..SCALE_CONNS {
        let target = Target::new(&names[i % SCALE_CLUSTERS], "127.0.0.1", echo_addr.port());
        let (client, gate) = (loaders[i % SCALE_CLIENTS].clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let open = async {
                let mut io = client.open_io(&target).await.map_err(|e| e.to_string())?;
                io.write_all(b"x").await.map_err(|e| e.to_string())?;
                let mut b = [0u8; 1];
                io.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(io)
            };
            within("open", SCALE_DEADLINE, open).await
        }));
    }
    let mut open = Vec::with_capacity(SCALE_CONNS);
    let mut first_error = None;
    for t in tasks {
        match t.await.expect("open task") {
            Ok(io) => open.push(io),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    eprintln!(
        "[scale] {} connections open after {:.1} s",
        open.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = first_error {
        messages.push(format!(
            "{} of {SCALE_CONNS} connections failed to open; first: {e}",
            SCALE_CONNS - open.len()
        ));
    }
    out.push(("scale_agents", num(agents.len() as f64)));
    out.push(("scale_connections", num(open.len() as f64)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    out.push(("scale_rss_mib", num(server.proc.rss_kib() as f64 / 1024.0)));
    let cpu0 = server.proc.cpu_secs();
    tokio::time::sleep(SCALE_IDLE).await;
    out.push((
        "scale_idle_cpu_s_per_s",
        num((server.proc.cpu_secs() - cpu0) / SCALE_IDLE.as_secs_f64()),
    ));
    eprintln!("[scale] first byte under load");
    let loaded = within(
        "first byte under load",
        SCALE_DEADLINE,
        first_byte_n(hello, SCALE_FIRST_BYTE_CONNS),
    )
    .await;
    out.push((
        "scale_rss_mib_after",
        num(server.proc.rss_kib() as f64 / 1024.0),
    ));
    match (&unloaded, &loaded) {
        (Ok((u50, u99)), Ok((l50, l99))) => {
            out.push(("scale_unloaded_first_byte_p50_us", num(*u50)));
            out.push(("scale_unloaded_first_byte_p99_us", num(*u99)));
            out.push(("scale_first_byte_p50_us", num(*l50)));
            out.push(("scale_first_byte_p99_us", num(*l99)));
            out.push(("scale_first_byte_p99_ratio", num(l99 / u99)));
        }
        _ => {
            out.push(("scale_first_byte_p99_ratio", Extra::Num(None)));
            for r in [unloaded, loaded] {
                if let Err(e) = r {
                    messages.push(e);
                }
            }
        }
    }
    if !messages.is_empty() {
        out.push(("scale_message", Extra::Text(messages.join("; "))));
    }

    eprintln!("[scale] cleaning up");
    drop(open);
    futures_util::future::join_all(agents.into_iter().map(|a| a.shutdown(Duration::ZERO))).await;
    drop(server);
    out
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
