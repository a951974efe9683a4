//! Server replicas behind one load-balanced address: with `--server-count`
//! the agent, given only that address, keeps connecting through it until it
//! holds a tunnel to every replica (closing connections that land on a replica
//! it already has) and re-fills when one breaks; with a count of 1 it keeps one
//! tunnel, as it always did. The real binaries run as child processes behind
//! a small round-robin TCP forwarder standing in for the load balancer.
//! Build them first: `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tunnel_proto::client::{Target, TunnelClient};
use tunnel_proto::error::ErrorCode;
use tunnel_tests::*;

/// The agent's id, as the servers list it.
const AGENT_ID: &str = "east-behind-lb";
/// Connections the forwarder accepts in its life; far more than a test needs.
const FORWARDER_MAX_CONNECTIONS: usize = 200;
/// How long a test waits for the agent to reach every replica.
const FILL_DEADLINE: Duration = Duration::from_secs(30);

/// A stand-in for a load balancer: a loopback port whose connections are
/// relayed byte for byte to `backends`, the n-th connection to
/// `backends[schedule[n % schedule.len()]]`. A connection whose backend is
/// down is closed, as a load balancer resets it. It accepts at most
/// [`FORWARDER_MAX_CONNECTIONS`], and stops with every relay when dropped.
struct Forwarder {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(backends: Vec<SocketAddr>, schedule: Vec<usize>) -> Self {
        assert!(
            schedule.iter().all(|i| *i < backends.len()),
            "the schedule names backends that do not exist"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(forward(listener, backends, schedule, accepted.clone()));
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The relays live in the task's JoinSet: they end with it.
        self.task.abort();
    }
}

async fn forward(
    listener: TcpListener,
    backends: Vec<SocketAddr>,
    schedule: Vec<usize>,
    accepted: Arc<AtomicUsize>,
) {
    let mut relays = JoinSet::new();
    loop {
        let n = accepted.load(Ordering::Relaxed);
        if n >= FORWARDER_MAX_CONNECTIONS {
            break;
        }
        tokio::select! {
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
            res = listener.accept() => {
                let Ok((mut front, _)) = res else { continue };
                let backend = backends[schedule[n % schedule.len()]];
                accepted.fetch_add(1, Ordering::Relaxed);
                relays.spawn(async move {
                    if let Ok(mut back) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                    }
                });
            }
        }
    }
    drop(listener);
    while relays.join_next().await.is_some() {}
}

/// One server replica process and a client of it.
struct Replica {
    id: String,
    client: Arc<TunnelClient>,
    proc: Proc,
}

/// Starts replica `id` with `--server-id id --server-count count`, knowing
/// cluster east before its agent connects.
async fn start_replica(pki: &Pki, id: &str, count: u32, addrs: ServerAddrs) -> Replica {
    let count = count.to_string();
    let proc = spawn_server(
        id,
        pki.dir.path(),
        &addrs,
        &[
            "--server-id",
            id,
            "--server-count",
            &count,
            "--known-cluster",
            "east",
        ],
    )
    .await;
    Replica {
        id: id.into(),
        client: client(pki, "app", addrs.client),
        proc,
    }
}

/// Starts the agent of cluster east with only `server` (the forwarder) to dial.
fn start_agent_behind(pki: &Pki, server: SocketAddr, admin: SocketAddr) -> Proc {
    let args = agent_args(
        pki.dir.path(),
        "east",
        server,
        admin,
        &["--allow", "127.0.0.0/8", "--agent-id", AGENT_ID],
    );
    Proc::spawn("agent", "tunnel-agent", &args, &[])
}

/// One series of the agent's metrics (0 when absent).
async fn agent_metric(admin: SocketAddr, series: &str) -> f64 {
    metric(&fetch_metrics(admin).await, series).unwrap_or(0.0)
}

/// Waits until the agent counts `n` tunnels up.
async fn wait_tunnels_up(admin: SocketAddr, n: usize) {
    wait_until(
        &format!("the agent counts {n} tunnel(s) up"),
        FILL_DEADLINE,
        || async move { agent_metric(admin, "tunnel_agent_tunnels_up").await == n as f64 },
    )
    .await;
}

/// Waits until `replica` lists exactly `n` tunnels of the agent.
async fn wait_replica_lists(replica: &Replica, n: usize) {
    wait_until(
        &format!("{} lists {n} tunnel(s) of the agent", replica.id),
        FILL_DEADLINE,
        || {
            let client = replica.client.clone();
            async move { listed_agents(&client, "east").await == n }
        },
    )
    .await;
}

/// Checks that `replica` lists the agent once, and that a connection opened
/// through `replica` reaches the echo service in cluster east.
async fn check_reaches_cluster(replica: &Replica, echo: SocketAddr) {
    let listed = replica.client.list_clusters().await.unwrap();
    let east = listed
        .iter()
        .find(|c| c.name == "east")
        .unwrap_or_else(|| panic!("{} does not list cluster east: {listed:?}", replica.id));
    assert_eq!(
        east.agents.iter().map(|a| &a.agent_id).collect::<Vec<_>>(),
        [AGENT_ID],
        "{} holds exactly one tunnel of the agent: {listed:?}",
        replica.id
    );
    let target = Target::new("east", "127.0.0.1", echo.port());
    let opened = tokio::time::timeout(Duration::from_secs(10), replica.client.open(&target))
        .await
        .unwrap_or_else(|_| panic!("open through {} timed out", replica.id))
        .unwrap_or_else(|e| panic!("open through {}: {e}", replica.id));
    assert_eq!(opened.opened.agent_id, AGENT_ID, "through {}", replica.id);
    drop(opened);
    let port = forward_port(replica.client.clone(), target).await;
    check_echo(port, 64 << 10).await;
}

/// Polls `check` for `window`, panicking the first time it is false.
async fn holds_throughout<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    while start.elapsed() < window {
        if let Err(err) = check().await {
            panic!("{what} stopped holding after {:?}: {err}", start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_one_load_balanced_address_reaches_every_replica() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = [ServerAddrs::free(), ServerAddrs::free()];
    let hub_1 = start_replica(&pki, "hub-1", 2, addrs[0]).await;
    let mut hub_2 = start_replica(&pki, "hub-2", 2, addrs[1]).await;
    // The second connection lands on hub-1 again: a duplicate the agent must close.
    let lb = Forwarder::start(vec![addrs[0].agent, addrs[1].agent], vec![0, 0, 1]).await;
    let echo = start_echo().await;
    let agent_admin = free_addr();
    let agent = start_agent_behind(&pki, lb.addr, agent_admin);

    wait_replica_lists(&hub_1, 1).await;
    wait_replica_lists(&hub_2, 1).await;
    wait_tunnels_up(agent_admin, 2).await;
    for replica in [&hub_1, &hub_2] {
        check_reaches_cluster(replica, echo).await;
        agent
            .wait_log(
                &["tunnel up", &format!("server_id={}", replica.id)],
                1,
                Duration::from_secs(5),
            )
            .await;
    }
    let duplicates = agent_metric(agent_admin, "tunnel_agent_duplicate_tunnels_total").await;
    assert!(
        duplicates >= 1.0,
        "the connection that reached hub-1 twice is counted as a duplicate, got {duplicates}"
    );
    assert!(
        lb.accepted() >= 3,
        "three connections at least went through the load balancer, got {}",
        lb.accepted()
    );

    // hub-2 dies: the agent keeps hub-1 and re-fills once hub-2 is back.
    hub_2.proc.signal("KILL");
    assert!(
        tokio::task::block_in_place(|| hub_2.proc.wait_exit(Duration::from_secs(10))).is_some(),
        "hub-2 dies on SIGKILL"
    );
    wait_tunnels_up(agent_admin, 1).await;
    let hub_2 = start_replica(&pki, "hub-2", 2, addrs[1]).await;
    wait_replica_lists(&hub_2, 1).await;
    wait_tunnels_up(agent_admin, 2).await;
    check_reaches_cluster(&hub_2, echo).await;
    check_reaches_cluster(&hub_1, echo).await;
    let after = agent_metric(agent_admin, "tunnel_agent_duplicate_tunnels_total").await;
    assert!(
        after > duplicates,
        "re-filling through the load balancer met hub-1 again and closed it ({duplicates} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_server_count_of_one_an_agent_keeps_one_tunnel_per_address() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = [ServerAddrs::free(), ServerAddrs::free()];
    let hub_1 = start_replica(&pki, "hub-1", 1, addrs[0]).await;
    let hub_2 = start_replica(&pki, "hub-2", 1, addrs[1]).await;
    let lb = Forwarder::start(vec![addrs[0].agent, addrs[1].agent], vec![0, 1]).await;
    let echo = start_echo().await;
    let agent_admin = free_addr();
    let _agent = start_agent_behind(&pki, lb.addr, agent_admin);

    wait_replica_lists(&hub_1, 1).await;
    wait_tunnels_up(agent_admin, 1).await;
    check_reaches_cluster(&hub_1, echo).await;
    // As before the server count existed: one tunnel through the one address,
    // however long the agent runs (its reconnect delays are 50 ms to 1 s).
    holds_throughout(
        "one connection and one tunnel",
        Duration::from_secs(3),
        || async {
            let up = agent_metric(agent_admin, "tunnel_agent_tunnels_up").await;
            let on_2 = listed_agents(&hub_2.client, "east").await;
            match (lb.accepted(), up, on_2) {
                (1, 1.0, 0) => Ok(()),
                (accepted, up, on_2) => Err(format!(
                    "{accepted} connection(s) through the load balancer, {up} tunnel(s) up, hub-2 lists {on_2}"
                )),
            }
        },
    )
    .await;
    assert_eq!(
        agent_metric(agent_admin, "tunnel_agent_duplicate_tunnels_total").await,
        0.0
    );
    // So a client of the other replica finds no agent: what --server-count fixes.
    match hub_2
        .client
        .open(&Target::new("east", "127.0.0.1", echo.port()))
        .await
    {
        Ok(opened) => panic!(
            "hub-2 has no tunnel of the agent, yet agent {} answered",
            opened.opened.agent_id
        ),
        Err(err) => assert_eq!(err.code, ErrorCode::NoAgent, "{err}"),
    }
}
