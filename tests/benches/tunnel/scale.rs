//! `scale`: one server with 1,000 agents and 10,000 open connections.

use super::*;

pub(crate) const SCALE_CLUSTERS: usize = 100;
pub(crate) const SCALE_AGENTS_PER_CLUSTER: usize = 10;
pub(crate) const SCALE_AGENTS: usize = SCALE_CLUSTERS * SCALE_AGENTS_PER_CLUSTER;
pub(crate) const SCALE_CONNS: usize = 10_000;
/// Client connections the scale load is spread over.
pub(crate) const SCALE_CLIENTS: usize = 4;
/// Connections opened at once while building up the load.
pub(crate) const SCALE_OPEN_CONCURRENCY: usize = 200;
pub(crate) const SCALE_FIRST_BYTE_CONNS: usize = 1000;
/// Covers one whole keepalive interval (pings every 10 s by default).
pub(crate) const SCALE_IDLE: Duration = Duration::from_secs(10);
pub(crate) const SCALE_DEADLINE: Duration = Duration::from_secs(300);

/// An in-process agent `j` of `cluster` (its own TLS + HTTP/2 connection).
pub(crate) async fn scale_agent(
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
pub(crate) async fn wait_agents(
    client: &tunnel_proto::client::TunnelClient,
    n: usize,
) -> Result<(), String> {
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

/// A client of the scale scenario's server, with `pki`'s certificate `name`.
pub(crate) fn client_of(
    pki: &Pki,
    name: &str,
    server: SocketAddr,
) -> Arc<tunnel_proto::client::TunnelClient> {
    client(pki, name, server)
}

/// One server process with [`SCALE_AGENTS`] agents (in this process, real
/// TLS and HTTP/2 each) and [`SCALE_CONNS`] open connections through it
/// (client library, spread over every cluster, to an idle echo).
pub(crate) async fn scale(services: &Services) -> Extras {
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
