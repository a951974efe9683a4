//! High availability: an agent keeps a tunnel to every server replica behind
//! one name (and finds new ones), a server spreads connections over the
//! agents of a cluster, and a broken agent is skipped for another one.
//! The first test needs root (network namespaces) and the binaries
//! (`cargo build -p tunnel-server -p tunnel-agent --bins`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};
use tunnel_proto::client::{OpenedTunnel, Target, TunnelClient};
use tunnel_proto::error::ErrorCode;
use tunnel_proto::pb::{self, agent_server::AgentServer};
use tunnel_server::Server;
use tunnel_tests::netns::NsHosts;
use tunnel_tests::*;

/// The name every replica of the hub answers to, in the namespace's hosts file.
const HUB_NAME: &str = "hub.tunnel.test";
/// The destination's port on the namespace's own loopback.
const DEST_PORT: u16 = 7070;
/// How often the agent in the namespace re-resolves `HUB_NAME`.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);

/// A port free on every one of `ips` (checked by binding all of them).
fn port_free_on(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..50 {
        let Ok(first) = std::net::TcpListener::bind((ips[0], 0)) else {
            continue;
        };
        let port = first.local_addr().unwrap().port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind((*ip, port)))
            .collect();
        if rest.is_ok() {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// An in-process server replica `id` whose agent port is `agent_listen`.
async fn start_replica(pki: &Pki, id: &str, agent_listen: SocketAddr) -> Server {
    let mut config = server_config(pki);
    config.agent_listen = agent_listen;
    config.server_id = id.into();
    Server::start(config)
        .await
        .unwrap_or_else(|e| panic!("replica {id} on {agent_listen}: {e:#}"))
}

/// The hosts file inside the namespace: `HUB_NAME` resolves to all of `ips`.
fn hosts_file(ips: &[Ipv4Addr]) -> String {
    let mut text = String::from("127.0.0.1 localhost\n");
    for ip in ips {
        text.push_str(&format!("{ip} {HUB_NAME}\n"));
    }
    text
}

/// Checks that `server` lists exactly one agent of east, the one in the
/// namespace, connected from the namespace's address, and that a connection
/// through `server` reaches the destination inside the namespace.
async fn check_replica(pki: &Pki, name: &str, server: &Server, ns: &NetNs) {
    let client = client(pki, "app", server.client_addr);
    let listed = client.list_clusters().await.unwrap();
    let east = listed
        .iter()
        .find(|c| c.name == "east")
        .unwrap_or_else(|| panic!("{name} does not list cluster east: {listed:?}"));
    assert_eq!(
        east.agents.len(),
        1,
        "{name} holds one tunnel of the agent: {listed:?}"
    );
    assert_eq!(
        east.agents[0].agent_id, "east-in-netns",
        "{name}: {listed:?}"
    );
    assert_eq!(
        east.agents[0].remote_addr.split(':').next(),
        Some(ns.cluster_ip.to_string().as_str()),
        "{name}: the agent dialed out from inside the namespace: {listed:?}"
    );
    let target = Target::new("east", "127.0.0.1", DEST_PORT);
    let opened = tokio::time::timeout(Duration::from_secs(10), client.open(&target))
        .await
        .unwrap_or_else(|_| panic!("open through {name} timed out"))
        .unwrap_or_else(|e| panic!("open through {name}: {e}"));
    assert_eq!(opened.opened.agent_id, "east-in-netns");
    assert_eq!(opened.opened.peer, format!("127.0.0.1:{DEST_PORT}"));
    drop(opened);
    let port = forward_port(client, target).await;
    check_echo(port, 256 << 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_a_tunnel_to_every_replica_behind_one_name() {
    if !is_root() {
        println!("skipped: needs root (network namespaces; CI runs as root)");
        return;
    }
    init();
    let ns = NetNs::create();
    // Two more hub addresses, derived from the namespace's own /30 so that
    // namespaces made at the same time do not share them.
    let [_, _, c, d] = ns.hub_ip.octets();
    let extra = [
        Ipv4Addr::new(10, 232, c, d),
        Ipv4Addr::new(10, 232, c, d + 1),
    ];
    for ip in extra {
        ns.add_hub_address(ip).expect("another hub address");
    }
    let hub_ips = [ns.hub_ip, extra[0], extra[1]];
    let pki = Pki::new(&["east"], &["app"]);

    // Three replicas on one port at three addresses; the name points at two.
    let port = port_free_on(&hub_ips);
    let mut replicas = Vec::new();
    for (i, ip) in hub_ips.iter().enumerate() {
        let id = format!("hub-{}", i + 1);
        replicas.push(start_replica(&pki, &id, SocketAddr::from((*ip, port))).await);
    }
    let hosts = NsHosts::create(&ns, &hosts_file(&hub_ips[..2])).expect("hosts file");

    let dest = Proc::spawn_command("destination", ns.echo_command(DEST_PORT));
    let mut agent = ns.command(bin("tunnel-agent"));
    let mut args = agent_args(
        pki.dir.path(),
        "east",
        // Replaced below by the name: agent_args takes an address.
        SocketAddr::from((ns.hub_ip, port)),
        "127.0.0.1:9093".parse().unwrap(),
        &[
            "--allow",
            &format!("127.0.0.1:{DEST_PORT}"),
            "--agent-id",
            "east-in-netns",
            "--resolve-interval",
            "1s",
        ],
    );
    let server_flag = args.iter().position(|a| a == "--server").unwrap();
    args[server_flag + 1] = format!("{HUB_NAME}:{port}");
    agent.args(&args);
    let agent = Proc::spawn_command("agent", agent);
    dest.wait_log(&["listening"], 1, Duration::from_secs(10))
        .await;

    // One tunnel to each address the name resolves to, none to the third.
    let start = Instant::now();
    for (i, replica) in replicas[..2].iter().enumerate() {
        let state = replica.state().clone();
        wait_until(
            &format!("replica hub-{} lists the agent", i + 1),
            Duration::from_secs(10),
            || {
                let n = state.pool.agent_count();
                async move { n == 1 }
            },
        )
        .await;
    }
    println!("both replicas list the agent after {:?}", start.elapsed());
    for (i, replica) in replicas[..2].iter().enumerate() {
        check_replica(&pki, &format!("hub-{}", i + 1), replica, &ns).await;
    }
    assert_eq!(
        replicas[2].state().pool.agent_count(),
        0,
        "the agent must only dial addresses the name resolves to"
    );

    // A third replica joins the name: the agent finds it on re-resolution.
    hosts
        .write(&hosts_file(&hub_ips))
        .expect("rewrite hosts file");
    let start = Instant::now();
    let third = replicas[2].state().clone();
    wait_until(
        "the agent opens a tunnel to the third replica after re-resolving",
        RESOLVE_INTERVAL * 5,
        || {
            let n = third.pool.agent_count();
            async move { n == 1 }
        },
    )
    .await;
    println!(
        "the third replica lists the agent after {:?}",
        start.elapsed()
    );
    check_replica(&pki, "hub-3", &replicas[2], &ns).await;
    // Re-resolution adds the new replica without doubling existing tunnels.
    for (i, replica) in replicas[..2].iter().enumerate() {
        assert_eq!(
            replica.state().pool.agent_count(),
            1,
            "hub-{} still holds exactly one tunnel of the agent",
            i + 1
        );
    }
    drop((agent, dest, hosts));
}

/// A local TCP connection relayed through `opened`: the returned end talks
/// to the destination.
async fn relayed(opened: OpenedTunnel) -> (TcpStream, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (theirs, _) = theirs.unwrap();
    let relay = tokio::spawn(async move {
        opened.relay(theirs).await;
    });
    (ours.unwrap(), relay)
}

/// One round trip of a short message over an echoed connection.
async fn round_trip(tcp: &mut TcpStream, i: usize) {
    let msg = format!("ping {i}\n");
    let run = async {
        tcp.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        tcp.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let back = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| panic!("round trip {i} timed out"))
        .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
    assert_eq!(back, msg.as_bytes(), "round trip {i}: data");
}

/// Open connections per agent of `cluster`, from the server's pool.
fn open_per_agent(server: &Server, cluster: &str) -> HashMap<String, u64> {
    server
        .state()
        .pool
        .snapshot()
        .into_iter()
        .filter(|c| c.name == cluster)
        .flat_map(|c| c.agents)
        .map(|a| (a.agent_id, a.open_connections))
        .collect()
}

/// Opens `n` connections to `target` one after another, each checked with a
/// round trip and left open; returns them with the agent that answered each.
async fn open_many(
    client: &TunnelClient,
    target: &Target,
    n: usize,
) -> Vec<(String, TcpStream, tokio::task::JoinHandle<()>)> {
    let mut conns = Vec::new();
    for i in 0..n {
        let opened = tokio::time::timeout(Duration::from_secs(10), client.open(target))
            .await
            .unwrap_or_else(|_| panic!("open {i} timed out"))
            .unwrap_or_else(|e| panic!("open {i}: {e}"));
        let agent = opened.opened.agent_id.clone();
        let (mut tcp, relay) = relayed(opened).await;
        round_trip(&mut tcp, i).await;
        conns.push((agent, tcp, relay));
    }
    conns
}

/// Closes the connections and waits until the server counts none open.
async fn close_all(conns: Vec<(String, TcpStream, tokio::task::JoinHandle<()>)>, server: &Server) {
    let relays: Vec<_> = conns
        .into_iter()
        .map(|(_, tcp, relay)| {
            drop(tcp);
            relay
        })
        .collect();
    for relay in relays {
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("a relay ends once its connection closed")
            .expect("relay task");
    }
    wait_until(
        "the server counts no open connection after all closed",
        Duration::from_secs(5),
        || {
            let open: u64 = open_per_agent(server, "east").values().sum();
            async move { open == 0 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_the_agents_of_a_cluster() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let echo = start_echo().await;
    let mut agents = Vec::new();
    for id in ["east-a", "east-b"] {
        let mut config = agent_config(&pki, "east", &[server.agent_addr]);
        config.agent_id = id.into();
        agents.push(start_agent_with(config, &server).await);
    }
    let client = client(&pki, "app", server.client_addr);
    let target = Target::new("east", "127.0.0.1", echo.port());

    const N: usize = 20;
    let conns = open_many(&client, &target, N).await;

    // What the server counts while all of them are open.
    let open = open_per_agent(&server, "east");
    println!("open connections per agent: {open:?}");
    assert_eq!(open.len(), 2, "two agents of east: {open:?}");
    assert_eq!(
        open.values().sum::<u64>(),
        N as u64,
        "every connection is counted once: {open:?}"
    );
    // The pick weighs each agent's open connections by its answer time, so
    // on a machine busy with other work one agent's answers can be a few
    // times slower and it then gets fewer (by that factor); what must hold
    // is that both carry a share and neither is starved or flooded.
    for (agent, n) in &open {
        assert!(
            (4..=16).contains(n),
            "agent {agent} carries {n} of {N} connections: {open:?}"
        );
    }
    // What the clients were told.
    let mut answered: HashMap<&str, usize> = HashMap::new();
    for (agent, _, _) in &conns {
        *answered.entry(agent.as_str()).or_default() += 1;
    }
    println!("connections per answering agent: {answered:?}");
    for id in ["east-a", "east-b"] {
        let n = answered.get(id).copied().unwrap_or(0);
        assert!(
            (4..=16).contains(&n),
            "agent {id} answered {n} of {N} opens: {answered:?}"
        );
        assert_eq!(
            open.get(id).copied(),
            Some(n as u64),
            "the pool's count of {id} matches the opens it answered"
        );
    }

    close_all(conns, &server).await;
    for agent in agents {
        agent.shutdown(Duration::from_secs(1)).await;
    }
}

/// An agent that passes TLS with a real agent certificate and answers hello,
/// but fails every dial at the transport level (as a tunnel that broke
/// right under a new stream would).
#[derive(Clone, Debug)]
struct BrokenAgent;

#[tonic::async_trait]
impl pb::agent_server::Agent for BrokenAgent {
    async fn hello(
        &self,
        _req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        Ok(Response::new(pb::HelloResponse {
            agent_id: "east-broken".into(),
            cluster: "east".into(),
            version: "broken".into(),
            ..Default::default()
        }))
    }

    async fn leave(
        &self,
        _req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// Aborts a task on drop.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects a [`BrokenAgent`] of east to `server` the way a real agent does
/// (TLS with its certificate, then HTTP/2 with the roles reversed) and waits
/// until the server lists it. Returns its dial counter and the task serving it.
async fn start_broken_agent(pki: &Pki, server: &Server) -> (Arc<AtomicUsize>, AbortOnDrop) {
    let before = server.state().pool.agent_count();
    let dials = Arc::new(AtomicUsize::new(0));
    let tls = tunnel_proto::tls::client_config(&pki.files("agent-east")).expect("agent TLS");
    let tcp = TcpStream::connect(server.agent_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("the broken agent passes TLS");
    let svc = AgentServer::new(BrokenAgent);
    let counter = dials.clone();
    let task = tokio::spawn(async move {
        let h2 = tunnel_proto::h2::H2Settings::default();
        let Ok(mut conn) = tunnel_proto::h2::H2Server::handshake(tls, &h2).await else {
            return;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            if req.method() == http::Method::CONNECT {
                // Every dial fails at the transport level: the stream is refused.
                counter.fetch_add(1, Ordering::SeqCst);
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            } else {
                tokio::spawn(tunnel_proto::grpc::serve(svc.clone(), req, respond));
            }
        }
    });
    let state = server.state().clone();
    wait_until(
        "the server lists the broken agent",
        Duration::from_secs(10),
        || {
            let n = state.pool.agent_count();
            async move { n > before }
        },
    )
    .await;
    (dials, AbortOnDrop(task))
}

/// The server's count of dials that ended with `code`.
async fn dials(server: &Server, code: &str) -> f64 {
    let body = fetch_metrics(server.admin_addr).await;
    metric(
        &body,
        &format!("tunnel_server_dials_total{{code=\"{code}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_agent_is_skipped_and_another_one_serves() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let echo = start_echo().await;
    let (broken_dials, _broken) = start_broken_agent(&pki, &server).await;
    let client = client(&pki, "app", server.client_addr);
    let target = Target::new("east", "127.0.0.1", echo.port());

    // With a working agent next to it, every connection succeeds.
    let mut config = agent_config(&pki, "east", &[server.agent_addr]);
    config.agent_id = "east-real".into();
    let agent = start_agent_with(config, &server).await;
    let agents = open_per_agent(&server, "east");
    assert_eq!(agents.len(), 2, "both agents are in the pool: {agents:?}");

    let (ok_before, broken_code_before) = (
        dials(&server, "ok").await,
        dials(&server, "tunnel_broken").await,
    );
    const N: usize = 20;
    let conns = open_many(&client, &target, N).await;
    for (agent, _, _) in &conns {
        assert_eq!(agent, "east-real", "only the working agent can answer");
    }
    // The broken agent carries no connection, so it is picked as soon as the
    // working one carries one; its failure is retried on the working agent,
    // and then it is passed over (it failed recently).
    assert_eq!(
        broken_dials.load(Ordering::SeqCst),
        1,
        "the broken agent is tried once, then passed over"
    );
    // The server retried on its own: the clients saw no broken tunnel.
    assert_eq!(
        dials(&server, "ok").await - ok_before,
        N as f64,
        "every connection is counted as dialed ok"
    );
    assert_eq!(
        dials(&server, "tunnel_broken").await,
        broken_code_before,
        "no connection reported a broken tunnel to its client"
    );
    close_all(conns, &server).await;
    agent.shutdown(Duration::from_secs(1)).await;
    let st = server.state().clone();
    wait_until("the working agent left", Duration::from_secs(10), || {
        let n = st.pool.agent_count();
        async move { n == 1 }
    })
    .await;

    // With only the broken agent, opening fails with a typed error, promptly
    // (a recently failed agent is still used when it is the only one). The
    // agent refused the stream, so nothing was dialed: `no_agent`, which a
    // client may take to another server.
    let err = tokio::time::timeout(Duration::from_secs(10), client.open(&target))
        .await
        .expect("open with only a broken agent must fail, not hang")
        .expect_err("the only agent fails every dial");
    assert_eq!(err.code, ErrorCode::NoAgent, "{err}");
    assert!(
        err.message.contains("east-broken"),
        "names the agent that failed: {err}"
    );
    assert!(
        broken_dials.load(Ordering::SeqCst) >= 2,
        "the broken agent was asked to dial again"
    );
}
