//! The reverse tunnel for real: the destination and the agent live in a
//! network namespace the hub cannot route into; only the agent's outbound
//! connection joins them. Needs root (CI runs as root) and the binaries
//! (`cargo build --workspace --bins`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_proto::error::ErrorCode;
use tunnel_tests::*;

/// The destination's port on the namespace's own loopback.
const DEST_PORT: u16 = 7070;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_tunnel_reaches_a_destination_the_hub_cannot_route_to() {
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    init();
    let ns = NetNs::create();
    let pki = Pki::new(&["east"], &["app"]);
    // The hub: agents connect to its side of the veth pair.
    let mut config = server_config(&pki);
    config.agent_listen = SocketAddr::from((ns.hub_ip, 0));
    let server = tunnel_server::Server::start(config).await.unwrap();

    let dest = Proc::spawn_command("destination", ns.echo_command(DEST_PORT));
    let mut agent = ns.command(bin("tunnel-agent"));
    agent.args(agent_args(
        pki.dir.path(),
        "east",
        server.agent_addr,
        "127.0.0.1:9093".parse().unwrap(),
        &[
            "--allow",
            &format!("127.0.0.1:{DEST_PORT}"),
            "--agent-id",
            "east-in-netns",
        ],
    ));
    let agent = Proc::spawn_command("agent", agent);
    dest.wait_log(&["listening"], 1, Duration::from_secs(20))
        .await;

    // The hub side cannot reach the destination: nothing answers on the
    // namespace's address, and its loopback is its own.
    for addr in [
        SocketAddr::from((ns.cluster_ip, DEST_PORT)),
        SocketAddr::from(([127, 0, 0, 1], DEST_PORT)),
    ] {
        let direct = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await;
        assert!(
            !matches!(direct, Ok(Ok(_))),
            "the hub must not reach the destination directly at {addr}"
        );
    }

    // Through the tunnel it can.
    let client = client(&pki, "app", server.client_addr);
    wait_listed_agents(&client, "east", 1).await;
    let listed = client.list_clusters().await.unwrap();
    assert_eq!(listed[0].agents[0].agent_id, "east-in-netns");
    assert_eq!(
        listed[0].agents[0].remote_addr.split(':').next(),
        Some(ns.cluster_ip.to_string().as_str()),
        "the agent dialed out from inside the namespace: {listed:?}"
    );
    let target = Target::new("east", "127.0.0.1", DEST_PORT);
    let opened = client.open(&target).await.expect("the tunnel opens");
    assert_eq!(opened.opened.agent_id, "east-in-netns");
    assert_eq!(opened.opened.peer, format!("127.0.0.1:{DEST_PORT}"));
    drop(opened);
    let port = forward_port(client.clone(), target).await;
    check_echo(port, 4 << 20).await;
    check_echo(port, 1).await;

    // The agent's allowlist still applies inside the namespace.
    let err = client
        .open(&Target::new("east", "127.0.0.1", 9093))
        .await
        .expect_err("the agent's own admin port is not allowed");
    assert_eq!(err.code, ErrorCode::DestinationNotAllowed, "{err}");
    drop((agent, dest));
}
