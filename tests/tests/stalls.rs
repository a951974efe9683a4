//! Stalled connections leave the others alone, however many there are: with
//! [`STALLED`] connections stalled in one direction (a destination that never
//! reads, or a client that never reads), all sharing one sidecar, one server
//! and one agent with healthy connections, a fresh connection still echoes,
//! a new `CONNECT` is still answered 200 and a bulk transfer still completes
//! intact. Each stalled connection is kept full for the whole test (its
//! writer keeps writing whenever room appears), so what it holds is
//! everything the tunnel lets it hold on both legs (sidecar -> server and
//! server -> agent).
//!
//! The checks tell the legs apart: a connection through the same sidecar to
//! another cluster shares only the sidecar's leg; a connection of another
//! client (its own connection to the server) to the same cluster shares only
//! the agent's leg.
//!
//! Nothing here asserts timing: every deadline is generous enough that only
//! a freeze misses it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_agent::Agent;
use tunnel_proto::client::{Target, TunnelClient};
use tunnel_server::Server;
use tunnel_sidecar::Sidecar;
use tunnel_tests::*;

/// Stalled connections per direction in each test: four times what froze
/// every connection before (16 stalled streams of 8 MiB filled the 128 MiB
/// connection window).
const STALLED: usize = 64;
/// Deadline of each check on a healthy connection: only a freeze misses it.
const DEADLINE: Duration = Duration::from_secs(20);
/// Deadline for every stalled connection to open and fill up.
const FILL_DEADLINE: Duration = Duration::from_secs(120);
/// The bulk transfer beside the stalls, each way.
const BULK: usize = 8 * 1024 * 1024;
/// Deadline of the bulk transfer.
const BULK_DEADLINE: Duration = Duration::from_secs(60);
/// A write that makes no progress for this long: the connection is full.
const BLOCKED_AFTER: Duration = Duration::from_secs(1);
/// A stalled connection that takes more than this without blocking is
/// buffered without bound somewhere on the path.
const FILL_LIMIT: u64 = 128 * 1024 * 1024;
/// Kernel buffers of the test's own ends of stalled connections: small, so
/// that what a stall holds is the tunnel's buffering.
const OWN_BUFFER: u32 = 32 * 1024;
const CHUNK: usize = 64 * 1024;

/// These tests load the machine (hundreds of full buffers): one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Writers that keep a connection full.

/// What a stalled connection's writer reports.
#[derive(Debug, Clone)]
enum Fill {
    /// The connection took this many bytes, then a write made no progress
    /// for [`BLOCKED_AFTER`]. Reported once; the writer keeps trying.
    Blocked(u64),
    /// The connection failed (cut, reset or refused) after this many bytes.
    Cut(u64, String),
    /// The connection took more than [`FILL_LIMIT`] without blocking.
    Unbounded(u64),
}

type Events = mpsc::UnboundedSender<(usize, Fill)>;

/// Writes into `w` whenever it takes bytes, until `stop` or a failure;
/// reports to `events` as connection `i` and adds what it wrote to
/// `progress`. Returns the writer.
async fn keep_writing<W: AsyncWrite + Unpin>(
    mut w: W,
    i: usize,
    events: Events,
    progress: Arc<AtomicU64>,
    stop: CancellationToken,
) -> W {
    let chunk = vec![0x5au8; CHUNK];
    let mut total = 0u64;
    let mut reported = false;
    while total <= FILL_LIMIT {
        tokio::select! {
            () = stop.cancelled() => return w,
            res = tokio::time::timeout(BLOCKED_AFTER, w.write(&chunk)) => match res {
                Ok(Ok(n)) => {
                    total += n as u64;
                    progress.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    let _ = events.send((i, Fill::Cut(total, e.to_string())));
                    return w;
                }
                Err(_) => {
                    if !reported {
                        reported = true;
                        let _ = events.send((i, Fill::Blocked(total)));
                    }
                }
            },
        }
    }
    let _ = events.send((i, Fill::Unbounded(total)));
    // Stays open (and full) until the test stops it.
    stop.cancelled().await;
    w
}

/// The first report of each of `n` connections, until all reported or
/// `deadline`; returns them (None: no report).
async fn first_reports(
    events: &mut mpsc::UnboundedReceiver<(usize, Fill)>,
    n: usize,
    deadline: Duration,
) -> Vec<Option<Fill>> {
    let mut first: Vec<Option<Fill>> = vec![None; n];
    let mut missing = n;
    let until = tokio::time::Instant::now() + deadline;
    while missing > 0 {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some((i, fill))) => {
                if first[i].is_none() {
                    first[i] = Some(fill);
                    missing -= 1;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    first
}

/// Waits until the writers counted by `progress` all stopped making
/// progress (every stalled connection full at once); a failure if they
/// never do within [`FILL_DEADLINE`].
async fn settle(what: &str, progress: &AtomicU64, failures: &mut Vec<String>) {
    let until = tokio::time::Instant::now() + FILL_DEADLINE;
    let mut last = progress.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    while quiet_since.elapsed() < 2 * BLOCKED_AFTER {
        if tokio::time::Instant::now() > until {
            failures.push(format!(
                "{what}: still taking data after {FILL_DEADLINE:?} ({last} bytes in all)"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        }
    }
    println!(
        "{what}: {:.1} MiB in all when full",
        last as f64 / (1024.0 * 1024.0)
    );
}

/// Waits until `count` reaches `n`; a failure if not within [`DEADLINE`].
async fn reached(what: &str, count: &AtomicUsize, n: usize, failures: &mut Vec<String>) {
    let until = tokio::time::Instant::now() + DEADLINE;
    while count.load(Ordering::SeqCst) < n {
        if tokio::time::Instant::now() > until {
            failures.push(format!(
                "{} of {n} {what} reached the destination within {DEADLINE:?}",
                count.load(Ordering::SeqCst)
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the first reports: every connection blocked, none failed or
/// took without bound. Prints what the stalls hold.
fn judge_fill(what: &str, reports: &[Option<Fill>], failures: &mut Vec<String>) {
    let mut held = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        match r {
            Some(Fill::Blocked(n)) => held.push(*n),
            Some(Fill::Cut(n, e)) => failures.push(format!(
                "{what} {i}: failed after {n} bytes while filling: {e}"
            )),
            Some(Fill::Unbounded(n)) => failures.push(format!(
                "{what} {i}: took {n} bytes without blocking (unbounded buffering)"
            )),
            None => failures.push(format!(
                "{what} {i}: neither blocked nor failed within {FILL_DEADLINE:?}"
            )),
        }
    }
    if let (Some(min), Some(max)) = (held.iter().min(), held.iter().max()) {
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        println!(
            "{what}: {} of {} blocked, holding {:.2} to {:.2} MiB each ({:.1} MiB in all)",
            held.len(),
            reports.len(),
            mib(*min),
            mib(*max),
            mib(held.iter().sum())
        );
    }
}

/// Reports that arrived after the fill: a stalled connection that failed
/// while the others ran was cut (it should have stayed stalled).
fn judge_later(
    what: &str,
    events: &mut mpsc::UnboundedReceiver<(usize, Fill)>,
    failures: &mut Vec<String>,
) {
    while let Ok((i, fill)) = events.try_recv() {
        match fill {
            Fill::Cut(n, e) => failures.push(format!(
                "{what} {i}: cut after {n} bytes while the other connections ran: {e}"
            )),
            Fill::Unbounded(n) => failures.push(format!(
                "{what} {i}: took {n} bytes without blocking (unbounded buffering)"
            )),
            Fill::Blocked(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Destinations.

/// Accepts and never reads; holds every connection until reset.
struct NeverReads {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl NeverReads {
    fn start() -> Self {
        let listener = SocketBuffers {
            send: None,
            recv: Some(OWN_BUFFER),
        }
        .listen()
        .expect("listener");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (a, h) = (accepted.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                h.lock().unwrap().push(tcp);
                a.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            addr,
            accepted,
            held,
        }
    }

    fn reset_all(&self) {
        for tcp in self.held.lock().unwrap().drain(..) {
            reset(tcp);
        }
    }
}

/// Writes into every connection without end (see [`keep_writing`]),
/// reporting as connection 0, 1, ... in accept order.
struct Flood {
    addr: SocketAddr,
    /// Ends the writers; cancelled too when the flood is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    events: mpsc::UnboundedReceiver<(usize, Fill)>,
    /// Bytes written by all the flood's writers.
    progress: Arc<AtomicU64>,
    accepted: Arc<AtomicUsize>,
}

impl Flood {
    fn start() -> Self {
        let listener = SocketBuffers {
            send: Some(OWN_BUFFER),
            recv: None,
        }
        .listen()
        .expect("listener");
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (tx, events) = mpsc::unbounded_channel();
        let progress = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (p, a, writers_stop) = (progress.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let i = a.fetch_add(1, Ordering::SeqCst);
                let (tx, stop, p) = (tx.clone(), writers_stop.clone(), p.clone());
                tokio::spawn(async move {
                    let tcp = keep_writing(tcp, i, tx, p, stop).await;
                    reset(tcp);
                });
            }
        });
        Self {
            addr,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            events,
            progress,
            accepted,
        }
    }
}

// ---------------------------------------------------------------------------
// The system under test.

/// Sidecar ports, in the order given to [`start_sidecar`].
const PORT_NEVER_READS: usize = 0;
const PORT_FLOOD: usize = 1;
const PORT_ECHO: usize = 2;
const PORT_EXCHANGE: usize = 3;
const PORT_WEST_ECHO: usize = 4;

/// A server, agents of `east` and `west`, a sidecar (client `app`) and a
/// client library user with its own connection to the server (client
/// `lib`); destinations in `east`, and an echo in `west`.
struct Hub {
    server: Server,
    _agents: Vec<Agent>,
    sidecar: Sidecar,
    lib: Arc<TunnelClient>,
    never_reads: NeverReads,
    flood: Flood,
    echo: SocketAddr,
    west_echo: SocketAddr,
    exchange: SocketAddr,
    exchanged: mpsc::UnboundedReceiver<std::io::Result<Exchanged>>,
    _pki: Pki,
}

impl Hub {
    async fn start() -> Self {
        init();
        // Four descriptors per stalled connection in this process (client,
        // sidecar, agent, destination), two directions, plus slack.
        ensure_fd_limit(8 * STALLED as u64 + 2048);
        let pki = Pki::new(&["east", "west"], &["app", "lib"]);
        let server = start_server(&pki).await;
        let agents = vec![
            start_agent(&pki, "east", &server).await,
            start_agent(&pki, "west", &server).await,
        ];
        let never_reads = NeverReads::start();
        let flood = Flood::start();
        let echo = start_echo().await;
        let west_echo = start_echo().await;
        let (exchange, exchanged) = start_exchange(BULK, 0x5eed).await;
        let east = |a: SocketAddr| format!("east:127.0.0.1:{}", a.port());
        let sidecar = start_sidecar(
            &pki,
            "app",
            server.client_addr,
            &[
                east(never_reads.addr),
                east(flood.addr),
                east(echo),
                east(exchange),
                format!("west:127.0.0.1:{}", west_echo.port()),
            ],
        )
        .await;
        let lib = client(&pki, "lib", server.client_addr);
        lib.ensure_connected()
            .await
            .expect("client library connects");
        Self {
            server,
            _agents: agents,
            sidecar,
            lib,
            never_reads,
            flood,
            echo,
            west_echo,
            exchange,
            exchanged,
            _pki: pki,
        }
    }

    fn port(&self, i: usize) -> SocketAddr {
        self.sidecar.port_addrs[i]
    }

    fn proxy(&self) -> SocketAddr {
        self.sidecar.proxy_addr.expect("the sidecar's proxy")
    }

    fn east(&self, a: SocketAddr) -> Target {
        Target::new("east", "127.0.0.1", a.port())
    }

    /// How to open new connections to `dest` (behind sidecar port `port`).
    fn opener(&self, port: usize, dest: SocketAddr, buffers: SocketBuffers) -> Opener {
        Opener {
            port: self.port(port),
            proxy: self.proxy(),
            dest,
            buffers,
        }
    }

    /// Waits until the server holds no connection; a failure if it still
    /// does after [`DEADLINE`].
    async fn all_released(&self, failures: &mut Vec<String>) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let n = self.server.state().open_connections();
            if n == 0 {
                return;
            }
            if tokio::time::Instant::now() > until {
                failures.push(format!(
                    "after every stalled connection was reset, the server still holds {n} connection(s) after {DEADLINE:?}"
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How to open a new connection through the sidecar to one destination.
#[derive(Debug, Clone, Copy)]
struct Opener {
    /// The sidecar's per-cluster port for the destination.
    port: SocketAddr,
    /// The sidecar's proxy.
    proxy: SocketAddr,
    /// The destination in `east`.
    dest: SocketAddr,
    /// Kernel buffers of the client's socket.
    buffers: SocketBuffers,
}

impl Opener {
    /// Through the per-cluster port, or (`via_connect`) through CONNECT.
    async fn open(self, via_connect: bool) -> Result<TcpStream, String> {
        let run = async {
            if via_connect {
                let mut tcp = self
                    .buffers
                    .connect(self.proxy)
                    .await
                    .map_err(|e| format!("connect to the proxy: {e}"))?;
                connect_on(&mut tcp, "east", "127.0.0.1", self.dest.port()).await?;
                Ok(tcp)
            } else {
                self.buffers
                    .connect(self.port)
                    .await
                    .map_err(|e| format!("connect to the sidecar's port: {e}"))
            }
        };
        match tokio::time::timeout(FILL_DEADLINE, run).await {
            Ok(res) => res,
            Err(_) => Err(format!("not open within {FILL_DEADLINE:?}")),
        }
    }
}

/// Opens `n` connections at once, every other one through CONNECT.
async fn open_many(opener: Opener, n: usize) -> Vec<Result<TcpStream, String>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(opener.open(i % 2 == 1)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("open task"));
    }
    out
}

// ---------------------------------------------------------------------------
// Checks on other connections.

/// One 64-byte round trip.
async fn echo64<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) -> Result<(), String> {
    let msg: Vec<u8> = (0..64u8).collect();
    io.write_all(&msg)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 64];
    io.read_exact(&mut back)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if back[..] != msg[..] {
        return Err("the echo came back different".into());
    }
    Ok(())
}

/// Runs `check` within `deadline`; `Err` says what did not happen.
async fn within<F>(deadline: Duration, check: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    match tokio::time::timeout(deadline, check).await {
        Ok(res) => res,
        Err(_) => Err(format!("no answer within {deadline:?} (frozen)")),
    }
}

/// Moves [`BULK`] each way over `io` to the exchange destination and
/// compares both checksums with what the destination saw.
async fn bulk<IO>(
    io: IO,
    exchanged: &mut mpsc::UnboundedReceiver<std::io::Result<Exchanged>>,
) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Send,
{
    let mine = exchange_io(io, BULK, 0xb01c)
        .await
        .map_err(|e| format!("exchange: {e}"))?;
    let theirs = exchanged
        .recv()
        .await
        .ok_or("the destination did not report")?
        .map_err(|e| format!("destination: {e}"))?;
    if mine.received != BULK || mine.received_hash != theirs.sent_hash {
        return Err(format!(
            "from the destination: {} of {BULK} bytes, checksum {}",
            mine.received,
            if mine.received_hash == theirs.sent_hash {
                "equal"
            } else {
                "different"
            }
        ));
    }
    if theirs.received != BULK || theirs.received_hash != mine.sent_hash {
        return Err(format!(
            "to the destination: {} of {BULK} bytes, checksum different",
            theirs.received
        ));
    }
    Ok(())
}

/// Prints each check's result and adds the failed ones to `failures`.
fn record(results: Vec<(&str, Result<(), String>)>, failures: &mut Vec<String>) {
    for (name, res) in results {
        match res {
            Ok(()) => println!("ok: {name}"),
            Err(e) => {
                println!("FAILED: {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
}

/// Fresh connections through the sidecar beside the stalls, on both legs,
/// on the sidecar's leg only, and on the agent's leg only; and a bulk
/// transfer through the sidecar's port.
async fn sidecar_connections_work(hub: &mut Hub, failures: &mut Vec<String>) {
    let (port_echo, west_echo, proxy, echo) = (
        hub.port(PORT_ECHO),
        hub.port(PORT_WEST_ECHO),
        hub.proxy(),
        hub.echo,
    );
    let lib = hub.lib.clone();
    let lib_target = hub.east(echo);
    let exchange_port = hub.port(PORT_EXCHANGE);
    let exchanged = &mut hub.exchanged;
    let checks: Vec<(&str, std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>)> = vec![
        (
            "a new connection through the sidecar's port to east echoes 64 bytes (both legs)",
            Box::pin(within(DEADLINE, async move {
                let mut tcp = TcpStream::connect(port_echo)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                echo64(&mut tcp).await
            })),
        ),
        (
            "a new CONNECT to east is answered 200 and echoes 64 bytes (both legs)",
            Box::pin(within(DEADLINE, async move {
                let mut tcp = TcpStream::connect(proxy)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                connect_on(&mut tcp, "east", "127.0.0.1", echo.port()).await?;
                echo64(&mut tcp).await
            })),
        ),
        (
            "a new connection through the same sidecar to west echoes 64 bytes (the sidecar's leg only)",
            Box::pin(within(DEADLINE, async move {
                let mut tcp = TcpStream::connect(west_echo)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                echo64(&mut tcp).await
            })),
        ),
        (
            "a new connection of another client to east echoes 64 bytes (the agent's leg only)",
            Box::pin(within(DEADLINE, async move {
                let mut io = lib
                    .open_io(&lib_target)
                    .await
                    .map_err(|e| format!("open: {e}"))?;
                echo64(&mut io).await
            })),
        ),
        (
            "8 MiB each way through the sidecar's port to east arrive intact (both legs)",
            Box::pin(within(BULK_DEADLINE, async move {
                let tcp = TcpStream::connect(exchange_port)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                bulk(tcp, exchanged).await
            })),
        ),
    ];
    let names: Vec<&str> = checks.iter().map(|(n, _)| *n).collect();
    let results = join_all(checks.into_iter().map(|(_, f)| f)).await;
    record(names.into_iter().zip(results).collect(), failures);
}

fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_stalled_destinations_leave_other_connections_alone() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut hub = Hub::start().await;
    let mut failures = Vec::new();

    // Half through the sidecar's port, half through CONNECT, all at once;
    // each client writes until its connection is full, and keeps writing.
    let (tx, mut events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let opener = hub.opener(
        PORT_NEVER_READS,
        hub.never_reads.addr,
        SocketBuffers {
            send: Some(OWN_BUFFER),
            recv: None,
        },
    );
    let progress = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..STALLED)
        .map(|i| {
            let (tx, stop, progress) = (tx.clone(), stop.clone(), progress.clone());
            tokio::spawn(async move {
                match opener.open(i % 2 == 1).await {
                    Ok(tcp) => Some(keep_writing(tcp, i, tx, progress, stop).await),
                    Err(e) => {
                        let _ = tx.send((i, Fill::Cut(0, e)));
                        None
                    }
                }
            })
        })
        .collect();
    let reports = first_reports(&mut events, STALLED, FILL_DEADLINE).await;
    judge_fill("stalled connections", &reports, &mut failures);
    reached(
        "stalled connections",
        &hub.never_reads.accepted,
        STALLED,
        &mut failures,
    )
    .await;
    settle("stalled connections", &progress, &mut failures).await;

    sidecar_connections_work(&mut hub, &mut failures).await;
    judge_later("stalled connection", &mut events, &mut failures);

    // Reset both ends of every stall: each hop releases its stream.
    stop.cancel();
    for w in writers {
        if let Ok(Some(tcp)) = w.await {
            reset(tcp);
        }
    }
    hub.never_reads.reset_all();
    hub.all_released(&mut failures).await;
    assert_no_failures(&failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_stalled_clients_leave_other_connections_alone() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut hub = Hub::start().await;
    let mut failures = Vec::new();

    // Half through the sidecar's port, half through CONNECT, all at once;
    // the destination floods each, the client never reads.
    let opener = hub.opener(
        PORT_FLOOD,
        hub.flood.addr,
        SocketBuffers {
            send: None,
            recv: Some(OWN_BUFFER),
        },
    );
    let mut clients = Vec::new();
    for (i, res) in open_many(opener, STALLED).await.into_iter().enumerate() {
        match res {
            Ok(tcp) => clients.push(tcp),
            Err(e) => failures.push(format!("stalled client {i}: {e}")),
        }
    }
    let reports = first_reports(&mut hub.flood.events, STALLED, FILL_DEADLINE).await;
    judge_fill(
        "flooding destination of a stalled client",
        &reports,
        &mut failures,
    );
    reached(
        "stalled clients",
        &hub.flood.accepted,
        STALLED,
        &mut failures,
    )
    .await;
    settle("stalled clients", &hub.flood.progress, &mut failures).await;

    sidecar_connections_work(&mut hub, &mut failures).await;
    judge_later(
        "flooding destination of a stalled client",
        &mut hub.flood.events,
        &mut failures,
    );

    hub.flood.stop.cancel();
    for tcp in clients {
        reset(tcp);
    }
    hub.all_released(&mut failures).await;
    assert_no_failures(&failures);
}

/// The same through the client library without a sidecar: [`STALLED`]
/// connections stalled each way on one client connection to the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_of_the_client_library_leave_its_other_connections_alone() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut hub = Hub::start().await;
    let mut failures = Vec::new();

    // Destination never reads: the app keeps writing into its TunnelIo.
    // All opened at once.
    let (tx, mut events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let never = hub.east(hub.never_reads.addr);
    let progress = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..STALLED)
        .map(|i| {
            let (tx, stop, lib, never, progress) = (
                tx.clone(),
                stop.clone(),
                hub.lib.clone(),
                never.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                match lib.open_io(&never).await {
                    Ok(io) => drop(keep_writing(io, i, tx, progress, stop).await),
                    Err(e) => {
                        let _ = tx.send((i, Fill::Cut(0, format!("open: {e}"))));
                    }
                }
            })
        })
        .collect();
    // Destination floods: the app never reads its TunnelIo.
    let flood = hub.east(hub.flood.addr);
    let opening: Vec<_> = (0..STALLED)
        .map(|_| {
            let (lib, flood) = (hub.lib.clone(), flood.clone());
            tokio::spawn(async move { lib.open_io(&flood).await })
        })
        .collect();
    let mut unread = Vec::new();
    for (i, t) in opening.into_iter().enumerate() {
        match t.await.expect("open task") {
            Ok(io) => unread.push(io),
            Err(e) => failures.push(format!("stalled reader {i}: open: {e}")),
        }
    }
    let reports = first_reports(&mut events, STALLED, FILL_DEADLINE).await;
    judge_fill("stalled writers", &reports, &mut failures);
    let reports = first_reports(&mut hub.flood.events, STALLED, FILL_DEADLINE).await;
    judge_fill(
        "flooding destination of a stalled reader",
        &reports,
        &mut failures,
    );
    reached(
        "stalled writers",
        &hub.never_reads.accepted,
        STALLED,
        &mut failures,
    )
    .await;
    reached(
        "stalled readers",
        &hub.flood.accepted,
        STALLED,
        &mut failures,
    )
    .await;
    settle("stalled writers", &progress, &mut failures).await;
    settle("stalled readers", &hub.flood.progress, &mut failures).await;

    let lib = hub.lib.clone();
    let (echo, port_echo) = (hub.east(hub.echo), hub.port(PORT_ECHO));
    let west = Target::new("west", "127.0.0.1", hub.west_echo.port());
    let exchange = hub.east(hub.exchange);
    let exchanged = &mut hub.exchanged;
    let (l1, l2, l3) = (lib.clone(), lib.clone(), lib.clone());
    let checks: Vec<(&str, std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>)> = vec![
        (
            "a new connection of the same client to east echoes 64 bytes (both legs)",
            Box::pin(within(DEADLINE, async move {
                let mut io = l1.open_io(&echo).await.map_err(|e| format!("open: {e}"))?;
                echo64(&mut io).await
            })),
        ),
        (
            "a new connection of the same client to west echoes 64 bytes (the client's leg only)",
            Box::pin(within(DEADLINE, async move {
                let mut io = l3.open_io(&west).await.map_err(|e| format!("open: {e}"))?;
                echo64(&mut io).await
            })),
        ),
        (
            "a new connection through a sidecar to east echoes 64 bytes (the agent's leg only)",
            Box::pin(within(DEADLINE, async move {
                let mut tcp = TcpStream::connect(port_echo)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                echo64(&mut tcp).await
            })),
        ),
        (
            "8 MiB each way over a new connection of the same client arrive intact (both legs)",
            Box::pin(within(BULK_DEADLINE, async move {
                let io = l2
                    .open_io(&exchange)
                    .await
                    .map_err(|e| format!("open: {e}"))?;
                bulk(io, exchanged).await
            })),
        ),
    ];
    let names: Vec<&str> = checks.iter().map(|(n, _)| *n).collect();
    let results = join_all(checks.into_iter().map(|(_, f)| f)).await;
    record(names.into_iter().zip(results).collect(), &mut failures);
    judge_later("stalled writer", &mut events, &mut failures);
    judge_later(
        "flooding destination of a stalled reader",
        &mut hub.flood.events,
        &mut failures,
    );

    stop.cancel();
    hub.flood.stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    drop(unread);
    hub.never_reads.reset_all();
    hub.all_released(&mut failures).await;
    assert_no_failures(&failures);
}
