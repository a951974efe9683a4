//! `stalled_1000`: bulk transfers beside 1,000 stalled connections (half whose
//! destination never reads, half whose client never reads), the
//! destinations that stall them, and the kernel figures that bound the fill.

use super::*;

/// Stalled connections per direction in `stalled_1000` (1,000 in all).
pub(crate) const STALLED_EACH_WAY: usize = 500;
/// The bulk transfer beside the stalls (and without them).
pub(crate) const STALLED_BULK_BYTES: u64 = 512 << 20;
/// Bulk transfers on each side of `stalled_1000_ratio`; their medians make
/// the ratio (one transfer swings by a third between runs on a shared VM).
pub(crate) const STALLED_BULK_RUNS: usize = 3;
/// Deadline for every stalled connection to open and fill up.
pub(crate) const STALL_FILL_DEADLINE: Duration = Duration::from_secs(300);
/// Stalled connections opened and filled at once.
pub(crate) const STALL_BATCH: usize = 100;
/// `--socket-buffer` of the agent and the sidecar in `stalled_1000`.
pub(crate) const STALL_SOCKET_BUFFER: &str = "128KiB";
/// Deadline of each measurement beside the stalls: only a freeze misses it.
pub(crate) const STALL_CHECK_DEADLINE: Duration = Duration::from_secs(60);
/// A write that makes no progress for this long: the connection is full.
pub(crate) const STALL_BLOCKED_AFTER: Duration = Duration::from_secs(1);
/// A stalled connection that takes more than this is buffered without bound.
pub(crate) const STALL_FILL_LIMIT: u64 = 128 << 20;
/// Kernel buffers of the bench's own ends of stalled connections.
pub(crate) const STALL_OWN_BUFFER: u32 = 32 * 1024;
/// Stalled connections are filled at [`STALL_CHUNK`] per [`STALL_PACE`]
/// (3.2 MB/s each): written at full speed, the tunnel's app-facing sockets
/// read fast at first, Linux autotunes their receive buffers to ~1.3 MiB
/// each, and 1,000 full ones bring the kernel's TCP memory close to its
/// pressure threshold (slowing every socket of the machine). Paced, they
/// keep their initial size; the tunnel's own buffering is the same.
pub(crate) const STALL_CHUNK: usize = 16 * 1024;
pub(crate) const STALL_PACE: Duration = Duration::from_millis(5);
/// The fill stops (and says so) when the kernel's TCP memory reaches this
/// share of its pressure threshold (`tcp_mem[1]`): beyond it, the kernel
/// throttles every TCP socket of the machine, other users' too.
pub(crate) const STALL_KERNEL_SHARE: f64 = 0.75;
/// The fill stops (and says so) if the tunnel's processes grow beyond this.
pub(crate) const STALL_RSS_LIMIT_KIB: u64 = 6 << 20;
pub(crate) const STALL_FIRST_BYTE_CONNS: usize = 200;
pub(crate) const STALL_RTT_ROUNDS: usize = 1000;

/// What the stalled connections of `stalled_1000` did.
#[derive(Default)]
pub(crate) struct StallCounters {
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
pub(crate) async fn keep_full(
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
pub(crate) struct StallDestinations {
    /// Set by the `stalled_1000` scenario before it opens its connections.
    pub(crate) armed: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) never_reads: SocketAddr,
    pub(crate) floods: SocketAddr,
    /// Connections the never-reading destination holds.
    pub(crate) held: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    /// What the flooding destination's writers did.
    pub(crate) flood: Arc<StallCounters>,
    /// Stops the flooding destination's writers from writing more.
    pub(crate) pause: CancellationToken,
    /// Ends the writers; cancelled too when dropped.
    pub(crate) stop: CancellationToken,
    pub(crate) _stop_on_drop: DropGuard,
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

    pub(crate) fn start() -> Self {
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

/// The kernel's memory for TCP buffers, all sockets (MiB).
pub(crate) fn kernel_tcp_mib() -> f64 {
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
pub(crate) fn kernel_tcp_pressure_mib() -> f64 {
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
pub(crate) async fn stalled_1000(pki: &Pki, services: &Services) -> Extras {
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
