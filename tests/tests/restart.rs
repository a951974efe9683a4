//! The real binaries as child processes: agents and servers that die and come
//! back, and a server that is asked to stop while a connection is open, or
//! once its agents and clients are gone.
//! Build them first: `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_tests::*;

/// Writes `msg` on an open connection to an echo and reads it back.
async fn ping(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    tcp.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tcp.read_exact(&mut back).await?;
    assert_eq!(back, msg, "echo");
    Ok(())
}

/// The drain timeout of the servers that are asked to stop.
const DRAIN: Duration = Duration::from_secs(30);

/// Starts a server as users run it: with a policy file (whose watch lasts as
/// long as the server) that lets the client certificate `client` reach every
/// destination of `clusters`, and a drain timeout of [`DRAIN`].
async fn spawn_server_with_policy(
    pki: &Pki,
    addrs: &ServerAddrs,
    client: &str,
    clusters: &[&str],
) -> Proc {
    let mut text = format!(
        "rules:\n  - name: {client}-anywhere\n    subjects:\n      - identity: client/{client}\n    clusters:\n"
    );
    for cluster in clusters {
        text.push_str(&format!("      - name: {cluster}\n"));
    }
    let policy = pki.path("policy.yaml");
    std::fs::write(&policy, text).unwrap();
    let drain = format!("{}s", DRAIN.as_secs());
    let policy = policy.display().to_string();
    spawn_server(
        "server",
        pki.dir.path(),
        addrs,
        &["--drain-timeout", &drain, "--policy-file", &policy],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_restarted_and_reconnects() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let _server = spawn_server("server", pki.dir.path(), &addrs, &[]).await;
    let agent_admin = free_addr();
    let mut agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;
    let client = client(&pki, "app", addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    let echo = start_echo().await;
    let port = forward_port(
        client.clone(),
        Target::new("east", "127.0.0.1", echo.port()),
    )
    .await;
    check_echo(port, 1 << 20).await;

    // A connection open through the agent when it dies ends; it does not hang.
    let mut open = TcpStream::connect(port).await.unwrap();
    ping(&mut open, b"before the kill").await.unwrap();
    agent.signal("KILL");
    assert!(
        tokio::task::block_in_place(|| agent.wait_exit(Duration::from_secs(10))).is_some(),
        "the agent dies on SIGKILL"
    );
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(30), open.read(&mut buf))
        .await
        .expect("the open connection ends within 30 s of the agent's death");
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "the open connection must end, got {end:?}"
    );
    wait_listed_agents(&client, "east", 0).await;

    let _agent = spawn_agent(
        "agent-again",
        pki.dir.path(),
        "east",
        addrs.agent,
        agent_admin,
    );
    wait_ready(agent_admin, "restarted agent").await;
    wait_listed_agents(&client, "east", 1).await;
    check_echo(port, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_restarted_and_rejoined_by_the_agent() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let mut server = spawn_server("server", pki.dir.path(), &addrs, &[]).await;
    let agent_admin = free_addr();
    let _agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;
    let client = client(&pki, "app", addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    let echo = start_echo().await;
    let port = forward_port(
        client.clone(),
        Target::new("east", "127.0.0.1", echo.port()),
    )
    .await;
    check_echo(port, 1 << 20).await;

    server.signal("KILL");
    assert!(
        tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(10))).is_some(),
        "the server dies on SIGKILL"
    );
    wait_until(
        "the agent notices its tunnel is gone (/readyz 503)",
        Duration::from_secs(30),
        || async move { matches!(http_get(agent_admin, "/readyz").await, Ok((503, _))) },
    )
    .await;

    // Same ports, new process: the agent finds it again by itself.
    let _server = spawn_server("server-again", pki.dir.path(), &addrs, &[]).await;
    wait_ready(agent_admin, "agent after the server's restart").await;
    wait_listed_agents(&client, "east", 1).await;
    check_echo(port, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections_then_exits_cleanly() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let mut server = spawn_server_with_policy(&pki, &addrs, "app", &["east"]).await;
    let agent_admin = free_addr();
    let _agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;
    let client = client(&pki, "app", addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    let echo = start_echo().await;
    let target = Target::new("east", "127.0.0.1", echo.port());
    let port = forward_port(client.clone(), target.clone()).await;

    let mut open = TcpStream::connect(port).await.unwrap();
    ping(&mut open, b"before SIGTERM").await.unwrap();
    server.signal("TERM");
    // Not "SIGTERM received": the server refuses new connections only from
    // the line it logs once it does (after the shutdown delay, here 0 s), and
    // a loaded machine can put milliseconds between the two.
    server
        .wait_log(&["draining", "deadline="], 1, Duration::from_secs(10))
        .await;

    // New connections are refused, with a typed error or at connect.
    let err = tokio::time::timeout(Duration::from_secs(20), client.open(&target))
        .await
        .expect("a draining server answers new connections within 20 s")
        .expect_err("a draining server must not take new connections");
    println!("new connection while draining: {err}");
    assert!(
        TcpStream::connect(addrs.client).await.is_err(),
        "the client port stops accepting"
    );

    // The open connection keeps working, both ways, until it is closed.
    for i in 0..5 {
        ping(&mut open, format!("while draining {i}").as_bytes())
            .await
            .expect("the open connection still works while draining");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server waits for the open connection"
    );
    open.write_all(b"last words").await.unwrap();
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest))
        .await
        .expect("the reply and FIN arrive while draining")
        .unwrap();
    assert_eq!(rest, b"last words");

    // Then it exits by itself, well before the drain deadline, with status 0.
    let status = tokio::task::block_in_place(|| server.wait_exit(DRAIN / 2))
        .expect("the server exits once its last connection closed");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_last_bytes_reach_the_destination() {
    const LAST: usize = 1 << 20;
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let mut server = spawn_server(
        "server",
        pki.dir.path(),
        &addrs,
        &["--drain-timeout", "30s"],
    )
    .await;
    let agent_admin = free_addr();
    let _agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, agent_admin);
    wait_ready(agent_admin, "agent").await;
    let client = client(&pki, "app", addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    // A destination that only listens: it half-closes at once and reads to EOF.
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let sink = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let _ = tcp.shutdown().await;
            let _ = tx.send(read_hash(&mut tcp).await);
        }
    })
    .await;
    let port = forward_port(client, Target::new("east", "127.0.0.1", sink.port())).await;

    let mut open = TcpStream::connect(port).await.unwrap();
    let mut nothing = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut nothing))
        .await
        .expect("the destination's FIN arrives")
        .unwrap();
    server.signal("TERM");
    server
        .wait_log(&["SIGTERM received"], 1, Duration::from_secs(10))
        .await;
    // The client's last bytes and FIN close the connection, and so end the drain.
    let sent = write_random(&mut open, LAST, 5).await.unwrap();
    open.shutdown().await.unwrap();
    let (got, hash) = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the destination reads to EOF")
        .expect("a report")
        .expect("the destination's read ends with a FIN, not a reset");
    assert_eq!(got, LAST, "bytes at the destination");
    assert_eq!(hash, sent, "checksum at the destination");
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15)))
        .expect("the server exits once its last connection closed");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_once_when_its_agents_and_clients_are_gone() {
    // East's agent is killed, north's stopped, west's stays up with its
    // tunnel idle.
    const CLUSTERS: [&str; 3] = ["east", "north", "west"];
    init();
    let pki = Pki::new(&CLUSTERS, &["sidecar"]);
    let addrs = ServerAddrs::free();
    let mut server = spawn_server_with_policy(&pki, &addrs, "sidecar", &CLUSTERS).await;
    let admins = [free_addr(), free_addr(), free_addr()];
    let [mut east, mut north, west] = std::array::from_fn(|i| {
        let cluster = CLUSTERS[i];
        let name = format!("agent-{cluster}");
        spawn_agent(&name, pki.dir.path(), cluster, addrs.agent, admins[i])
    });
    for (admin, cluster) in admins.into_iter().zip(CLUSTERS) {
        wait_ready(admin, &format!("{cluster}'s agent")).await;
    }
    let echo = start_echo().await;
    let ports = free_listen_ports::<3>();
    let sidecar_admin = free_addr();
    let mut sidecar_args = sidecar_args(pki.dir.path(), &[addrs.client], sidecar_admin);
    for (port, cluster) in ports.iter().zip(CLUSTERS) {
        sidecar_args.extend([
            "--port".to_string(),
            format!("{port}={cluster}:127.0.0.1:{}", echo.port()),
        ]);
    }
    let mut sidecar = Proc::spawn("sidecar", "tunnel-sidecar", &sidecar_args, &[]);
    wait_ready(sidecar_admin, "sidecar").await;
    // A connection through each agent, allowed by the policy, then closed.
    for port in ports {
        check_echo(([127, 0, 0, 1], port).into(), 1 << 20).await;
    }

    // The client and east's agent die (their sockets close or reset under
    // the server); north's agent shuts down (SIGTERM: it closes its tunnel).
    north.signal("TERM");
    sidecar.signal("KILL");
    east.signal("KILL");
    for gone in [&mut sidecar, &mut east, &mut north] {
        let status = tokio::task::block_in_place(|| gone.wait_exit(Duration::from_secs(10)));
        assert!(status.is_some(), "{} exits on its signal", gone.name);
    }
    server.signal("TERM");
    let sigterm = Instant::now();
    // Nothing is open: no reason to wait for the drain timeout.
    let status = tokio::task::block_in_place(|| server.wait_exit(DRAIN / 3)).unwrap_or_else(|| {
        panic!(
            "the server, with nothing open, is still running {:?} after SIGTERM (drain timeout {DRAIN:?})\n{}",
            sigterm.elapsed(),
            server.logs()
        )
    });
    println!("the server exited {:?} after SIGTERM", sigterm.elapsed());
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.logs()
    );
    let logs = server.logs();
    assert!(
        !logs.contains("drain deadline passed"),
        "the drain must end before its deadline\n{logs}"
    );
    // West's idle tunnel was closed by the server (GOAWAY, then the close),
    // not cut: its agent sees the end of a tunnel the server closed. (Its
    // tries to reach another replica meanwhile fail: there is none.)
    assert!(
        logs.lines()
            .any(|l| l.contains("agent tunnel closed for shutdown") && l.contains("cluster=west")),
        "the server closes west's tunnel for its shutdown\n{logs}"
    );
    west.wait_log(&["tunnel closed by the server"], 1, Duration::from_secs(10))
        .await;
    let first_end = west
        .logs()
        .lines()
        .find(|l| {
            l.contains("tunnel closed by the server")
                || (l.contains("tunnel failed") && l.contains("server_id="))
        })
        .map(str::to_owned);
    assert!(
        first_end
            .as_deref()
            .is_some_and(|l| l.contains("tunnel closed by the server")),
        "west's agent sees its tunnel closed by the server, not failed: {first_end:?}\n{}",
        west.logs()
    );
}
