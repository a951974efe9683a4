//! The real binaries as child processes: agents and servers that die and come
//! back, and a server that is asked to stop while a connection is open.
//! Build them first: `cargo build --workspace --bins`.

use std::time::Duration;

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
    const DRAIN: Duration = Duration::from_secs(30);
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
