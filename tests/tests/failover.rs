//! High availability under load, with the real binaries: two server
//! replicas, two agents of `east` (each with a tunnel to both), one sidecar
//! given both servers, and a steady load of new connections (20 a second,
//! each a CONNECT through the sidecar's proxy and a 32-byte echo) plus a few
//! long-lived ones. Through a rolling restart of both servers (SIGTERM,
//! started again once it exited), an agent SIGKILLed and an agent
//! SIGSTOPped (frozen, as in a partition), no new connection may fail to
//! open. A connection that had opened through the agent at the very moment
//! it was killed or frozen is cut with it (nothing can save its bytes): those
//! are counted apart, and only within a second of the fault.
//!
//! Needs the binaries (`cargo build --workspace`; `cargo test` builds them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnel_tests::*;

/// New connections a second.
const RATE: u32 = 20;
/// Bytes each new connection echoes.
const ECHO_BYTES: usize = 32;
/// Long-lived connections, each making a round trip every [`LONG_LIVED_EVERY`].
const LONG_LIVED: usize = 4;
const LONG_LIVED_EVERY: Duration = Duration::from_millis(250);
/// The servers' shutdown delay and drain timeout (shorter than the defaults
/// to keep the test short; the same mechanism).
const SHUTDOWN_DELAY: Duration = Duration::from_secs(2);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of each step of one new connection.
const STEP_DEADLINE: Duration = Duration::from_secs(10);
/// A connection cut with its agent ends within this of the fault.
const CUT_WINDOW: Duration = Duration::from_secs(1);
/// An open that waited for a frozen agent's acknowledgement (1 s) before
/// going to the other agent took at least this long.
const WAITED_FOR_ACK: Duration = Duration::from_millis(900);
/// The echo of a connection through a frozen agent is given up after this.
const ECHO_DEADLINE: Duration = Duration::from_secs(3);

/// How one new connection ended.
#[derive(Debug, Clone)]
enum Ended {
    /// Opened and echoed.
    Ok,
    /// The proxy did not open it.
    OpenFailed(String),
    /// Opened, then cut before its echo came back.
    Cut(String),
}

impl Ended {
    fn why(&self) -> &str {
        match self {
            Ended::Ok => "ok",
            Ended::OpenFailed(why) | Ended::Cut(why) => why,
        }
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    ended_at: Instant,
    open_ms: f64,
    ended: Ended,
}

/// One new connection through the sidecar's proxy: CONNECT, then an echo.
async fn one_connection(proxy: SocketAddr, echo_port: u16, seq: u64) -> Outcome {
    let started = Instant::now();
    let finish = |ended: Ended, open_ms: f64| Outcome {
        started,
        ended_at: Instant::now(),
        open_ms,
        ended,
    };
    let mut tcp = match tokio::time::timeout(STEP_DEADLINE, TcpStream::connect(proxy)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return finish(Ended::OpenFailed(format!("connect to proxy: {e}")), 0.0),
        Err(_) => return finish(Ended::OpenFailed("connect to proxy timed out".into()), 0.0),
    };
    let opened = tokio::time::timeout(
        STEP_DEADLINE,
        connect_on(&mut tcp, "east", "127.0.0.1", echo_port),
    )
    .await;
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;
    match opened {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return finish(Ended::OpenFailed(e), open_ms),
        Err(_) => return finish(Ended::OpenFailed("no CONNECT answer".into()), open_ms),
    }
    let mut msg = [0u8; ECHO_BYTES];
    msg[..8].copy_from_slice(&seq.to_be_bytes());
    msg[8..].fill((seq % 251) as u8);
    let echo = async {
        tcp.write_all(&msg).await?;
        let mut back = [0u8; ECHO_BYTES];
        tcp.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(ECHO_DEADLINE, echo).await {
        Ok(Ok(back)) if back == msg => finish(Ended::Ok, open_ms),
        Ok(Ok(_)) => finish(Ended::Cut("echo differs".into()), open_ms),
        Ok(Err(e)) => finish(Ended::Cut(format!("echo: {e}")), open_ms),
        Err(_) => finish(Ended::Cut("echo timed out".into()), open_ms),
    }
}

/// A long-lived connection: round trips until it breaks or `stop`; returns
/// when it broke (`None`: it lasted).
async fn long_lived(
    proxy: SocketAddr,
    echo_port: u16,
    stop: CancellationToken,
) -> Option<(Instant, String)> {
    let mut tcp = TcpStream::connect(proxy).await.expect("proxy");
    connect_on(&mut tcp, "east", "127.0.0.1", echo_port)
        .await
        .expect("a long-lived connection opens");
    let mut i = 0u8;
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(LONG_LIVED_EVERY) => {}
        }
        i = i.wrapping_add(1);
        let round = async {
            tcp.write_all(&[i; 16]).await?;
            let mut back = [0u8; 16];
            tcp.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        match tokio::time::timeout(ECHO_DEADLINE, round).await {
            Ok(Ok(back)) if back == [i; 16] => {}
            Ok(Ok(_)) => return Some((Instant::now(), "echo differs".into())),
            Ok(Err(e)) => return Some((Instant::now(), e.to_string())),
            Err(_) => return Some((Instant::now(), "round trip timed out".into())),
        }
    }
}

/// A destination slow to accept: its accept queue (backlog 0) is held full
/// by a connection of its own, so the kernel drops the SYN of a dial until
/// the destination accepts (`delay` after it is told to begin); the dial
/// gets through with its SYN retransmission, a second after it began. It
/// echoes [`ECHO_BYTES`] of the one connection it then accepts.
async fn slow_destination(delay: Duration) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("address");
    let filler = TcpStream::connect(addr)
        .await
        .expect("the filler connection");
    let (begin_tx, begin_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = begin_rx.await;
        tokio::time::sleep(delay).await;
        drop(filler);
        // The filler, then the dial.
        for _ in 0..2 {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; ECHO_BYTES];
            if tcp.read_exact(&mut buf).await.is_ok() {
                let _ = tcp.write_all(&buf).await;
                let _ = tcp.shutdown().await;
                return;
            }
        }
    });
    (addr.port(), begin_tx)
}

/// The highest answer-time estimate of an agent of east on any server, in
/// microseconds.
async fn highest_latency_us(listers: &[Arc<tunnel_proto::client::TunnelClient>]) -> u64 {
    let mut highest = 0;
    for l in listers {
        let clusters = l.list_clusters().await.unwrap_or_default();
        for a in clusters
            .iter()
            .filter(|c| c.name == "east")
            .flat_map(|c| c.agents.iter())
        {
            highest = highest.max(a.latency_us);
        }
    }
    highest
}

/// Flags of a server replica, as for a rollout.
fn replica_flags(id: &str) -> Vec<String> {
    [
        "--server-id",
        id,
        "--shutdown-delay",
        &format!("{}ms", SHUTDOWN_DELAY.as_millis()),
        "--drain-timeout",
        &format!("{}ms", DRAIN_TIMEOUT.as_millis()),
        "--ready-wait",
        "10s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start_replica(pki: &Pki, id: &str, addrs: &ServerAddrs) -> Proc {
    let flags = replica_flags(id);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    spawn_server(id, pki.dir.path(), addrs, &flags).await
}

fn start_agent(pki: &Pki, id: &str, servers: &[ServerAddrs]) -> Proc {
    let args = agent_args(
        pki.dir.path(),
        "east",
        servers[0].agent,
        free_addr(),
        &[
            "--server",
            &servers[1].agent.to_string(),
            "--allow",
            "127.0.0.0/8",
            "--agent-id",
            id,
        ],
    );
    Proc::spawn(id, "tunnel-agent", &args, &[])
}

/// Waits until both servers list both agents of east.
async fn wait_both_listed(listers: &[Arc<tunnel_proto::client::TunnelClient>]) {
    for l in listers {
        wait_listed_agents(l, "east", 2).await;
    }
}

/// A moment of the run, for the report.
struct Mark {
    what: &'static str,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_a_killed_agent_and_a_frozen_agent_fail_no_new_connection() {
    init();
    let pki = Pki::new(&["east"], &["app", "sidecar"]);
    let echo = start_echo().await;
    let addrs = [ServerAddrs::free(), ServerAddrs::free()];
    let mut servers = vec![
        start_replica(&pki, "hub-1", &addrs[0]).await,
        start_replica(&pki, "hub-2", &addrs[1]).await,
    ];
    let mut agents = vec![
        start_agent(&pki, "east-a", &addrs),
        start_agent(&pki, "east-b", &addrs),
    ];
    let listers: Vec<_> = addrs
        .iter()
        .map(|a| client(&pki, "app", a.client))
        .collect();
    wait_both_listed(&listers).await;

    let proxy = free_addr();
    let mut sidecar_args = sidecar_args(
        pki.dir.path(),
        &[addrs[0].client, addrs[1].client],
        free_addr(),
    );
    sidecar_args.extend(["--proxy-listen".to_string(), proxy.to_string()]);
    let sidecar = Proc::spawn("sidecar", "tunnel-sidecar", &sidecar_args, &[]);
    wait_until(
        "the sidecar opens a connection to east",
        Duration::from_secs(20),
        || async move { matches!(one_connection(proxy, echo.port(), 0).await.ended, Ended::Ok) },
    )
    .await;

    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let load = {
        let echo_port = echo.port();
        tokio::spawn(steady_load(
            RATE,
            stop.clone().cancelled_owned(),
            move |seq| one_connection(proxy, echo_port, seq),
        ))
    };
    let long: Vec<_> = (0..LONG_LIVED)
        .map(|_| tokio::spawn(long_lived(proxy, echo.port(), stop.clone())))
        .collect();
    let t0 = Instant::now();
    let mut marks = vec![Mark {
        what: "load started",
        at: t0,
    }];
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 0. A destination slow to accept: its dial is no part of the agent's
    // answer time, so the agent that dialed stays as cheap as the other.
    let (slow_port, begin) = slow_destination(Duration::from_millis(500)).await;
    marks.push(Mark {
        what: "a connection to a slow destination",
        at: Instant::now(),
    });
    let _ = begin.send(());
    let slow = one_connection(proxy, slow_port, u64::MAX).await;
    println!(
        "the slow destination's connection: {:?} after {:.0} ms",
        slow.ended, slow.open_ms
    );
    assert!(
        matches!(slow.ended, Ended::Ok),
        "the slow destination's connection: {:?}",
        slow.ended
    );
    assert!(
        slow.open_ms >= 900.0,
        "the slow destination answers a dial after its SYN retransmission: {:.0} ms",
        slow.open_ms
    );
    let highest_us = highest_latency_us(&listers).await;
    println!("the highest answer time of an agent after it: {highest_us} µs");
    assert!(
        (highest_us as f64) < slow.open_ms * 1000.0 / 2.0,
        "an agent's answer time ({highest_us} µs) includes the destination's dial ({:.0} ms)",
        slow.open_ms
    );

    // 1. Rolling restart: each replica in turn, SIGTERM, started again once it exited.
    let mut sigterms = Vec::new();
    for i in 0..servers.len() {
        let id = format!("hub-{}", i + 1);
        let at = Instant::now();
        servers[i].signal("TERM");
        sigterms.push(at);
        marks.push(Mark {
            what: "SIGTERM to a server",
            at,
        });
        let status = tokio::task::block_in_place(|| {
            servers[i].wait_exit(SHUTDOWN_DELAY + DRAIN_TIMEOUT * 3)
        });
        let status = status.unwrap_or_else(|| panic!("{id} did not exit after SIGTERM"));
        assert!(
            status.success(),
            "{id} exits cleanly: {status}\n{}",
            servers[i].logs()
        );
        println!("{id} exited {:?} after SIGTERM", at.elapsed());
        servers[i] = start_replica(&pki, &id, &addrs[i]).await;
        println!("{id} ready again {:?} after SIGTERM", at.elapsed());
        marks.push(Mark {
            what: "server ready again",
            at: Instant::now(),
        });
        wait_both_listed(&listers).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // 2. An agent killed.
    let killed_at = Instant::now();
    agents[0].signal("KILL");
    marks.push(Mark {
        what: "SIGKILL to east-a",
        at: killed_at,
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    agents[0] = start_agent(&pki, "east-a", &addrs);
    wait_both_listed(&listers).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. An agent frozen, then thawed.
    let frozen_at = Instant::now();
    let frozen_unix_ms = unix_ms();
    agents[1].signal("STOP");
    marks.push(Mark {
        what: "SIGSTOP to east-b",
        at: frozen_at,
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut last_pick_ms = 0;
    for (i, l) in listers.iter().enumerate() {
        last_pick_ms = last_pick_ms.max(last_picked(l, "east-b").await);
        for a in l
            .list_clusters()
            .await
            .unwrap_or_default()
            .iter()
            .flat_map(|c| c.agents.iter())
        {
            println!(
                "hub-{}: {} picked {} ms after the freeze, failing {}, open {}, pending {}, latency {} µs",
                i + 1,
                a.agent_id,
                a.last_picked_unix_ms as i64 - frozen_unix_ms as i64,
                a.failing,
                a.open_connections,
                a.pending_opens,
                a.latency_us
            );
        }
    }
    agents[1].signal("CONT");
    marks.push(Mark {
        what: "SIGCONT to east-b",
        at: Instant::now(),
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.cancel();
    let outcomes = load.await.expect("load task");
    let mut long_cut = Vec::new();
    for l in long {
        if let Some(cut) = l.await.expect("long-lived task") {
            long_cut.push(cut);
        }
    }

    // Report.
    println!("timeline:");
    for m in &marks {
        println!("  {:>7.2} s  {}", (m.at - t0).as_secs_f64(), m.what);
    }
    let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut per_second = std::collections::BTreeMap::<u64, (u32, u32)>::new();
    for o in &outcomes {
        let e = per_second.entry(secs(o.started) as u64).or_default();
        e.0 += 1;
        if !matches!(o.ended, Ended::Ok) {
            e.1 += 1;
        }
    }
    println!("new connections per second (started, not ok): {per_second:?}");
    let mut open_ms: Vec<f64> = outcomes.iter().map(|o| o.open_ms).collect();
    open_ms.sort_by(f64::total_cmp);
    println!(
        "{} new connections; open time p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        outcomes.len(),
        open_ms[open_ms.len() / 2],
        open_ms[open_ms.len() * 99 / 100],
        open_ms.last().copied().unwrap_or(0.0)
    );
    // Negative: last picked before it froze (the other agent was less
    // loaded all along).
    let last_pick_after_freeze_ms = last_pick_ms as i64 - frozen_unix_ms as i64;
    println!("the frozen agent was last picked {last_pick_after_freeze_ms} ms after it froze");

    let open_failed: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o.ended, Ended::OpenFailed(_)))
        .map(|o| (secs(o.started), o.ended.clone()))
        .collect();
    let cut: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o.ended, Ended::Cut(_)))
        .collect();
    let faults = [killed_at, frozen_at];
    let cut_elsewhere: Vec<_> = cut
        .iter()
        .filter(|o| {
            !faults
                .iter()
                .any(|f| o.started <= *f + CUT_WINDOW && o.ended_at >= *f)
        })
        .map(|o| (secs(o.started), o.ended.clone()))
        .collect();
    println!(
        "cut with the agent that carried them (opened just before it was killed or frozen): {}",
        cut.len() - cut_elsewhere.len()
    );
    for o in &cut {
        println!(
            "  opened at {:.2} s, cut: {}",
            secs(o.started),
            o.ended.why()
        );
    }
    assert!(
        open_failed.is_empty(),
        "{} of {} new connections failed to open: {open_failed:?}\n----- sidecar -----\n{}",
        open_failed.len(),
        outcomes.len(),
        sidecar.logs()
    );
    // The frozen agent may be picked whenever it is the cheaper one (it is
    // not, while it carries more connections than the other), so its last
    // pick may come seconds after it froze; but once it has an open waiting
    // for its acknowledgement it is avoided: each server makes at most one
    // open wait for it (the silence makes it expensive at once, the missing
    // acknowledgement makes it failing).
    let waited: Vec<_> = outcomes
        .iter()
        .filter(|o| {
            o.started >= frozen_at
                && o.started <= frozen_at + Duration::from_secs(4)
                && o.open_ms >= WAITED_FOR_ACK.as_secs_f64() * 1000.0
        })
        .map(|o| (secs(o.started), o.open_ms))
        .collect();
    println!("opens that waited for the frozen agent: {waited:?}");
    assert!(
        waited.len() <= listers.len(),
        "more than one open per server waited for the frozen agent: {waited:?}"
    );
    assert!(
        cut_elsewhere.is_empty(),
        "new connections cut away from any agent fault: {cut_elsewhere:?}"
    );
    assert!(
        cut.len() <= 4,
        "at most a few connections are in flight on one agent at a fault: {}",
        cut.len()
    );
    assert!(
        outcomes.len() as f64 >= f64::from(RATE) * secs(Instant::now()) * 0.5,
        "the load kept its rate: {} connections in {:.0} s",
        outcomes.len(),
        secs(Instant::now())
    );
    // Long-lived connections are cut only by the drain timeout of the
    // server they went through, never earlier.
    for (at, why) in &long_cut {
        let since = sigterms
            .iter()
            .filter(|t| **t <= *at)
            .map(|t| *at - *t)
            .min();
        let fault = faults
            .iter()
            .any(|f| *at >= *f && *at <= *f + ECHO_DEADLINE + CUT_WINDOW);
        assert!(
            fault
                || since.is_some_and(
                    |d| d + Duration::from_millis(300) >= SHUTDOWN_DELAY + DRAIN_TIMEOUT
                ),
            "a long-lived connection was cut {since:?} after a SIGTERM ({why}), before the shutdown delay and drain timeout"
        );
    }
    println!(
        "long-lived connections: {} of {LONG_LIVED} cut, each after the drain timeout or with its agent",
        long_cut.len()
    );
    drop((servers, agents, sidecar));
}
