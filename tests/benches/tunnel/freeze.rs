//! `agent_freeze`: one of two agents frozen (SIGSTOP) under a steady load of
//! new connections, then thawed.

use super::*;

/// New connections a second through the two agents of `agent_freeze`.
pub(crate) const FREEZE_RATE: u32 = 50;
/// Load before the freeze, during it, and after the thaw.
pub(crate) const FREEZE_WARMUP: Duration = Duration::from_secs(2);
pub(crate) const FREEZE_HOLD: Duration = Duration::from_secs(5);
/// Longest wait for the thawed agent to be picked again.
pub(crate) const THAW_DEADLINE: Duration = Duration::from_secs(30);

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
pub(crate) async fn agent_freeze(pki: &Pki, services: &Services) -> Extras {
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
