//! The components as library calls in this process: a server, agents, a
//! tunnel client and a port forwarded through it, and a sidecar configured
//! through its binary's own flags.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tunnel_agent::allowlist::Allowlist;
use tunnel_agent::{Agent, AgentConfig};
use tunnel_proto::client::{ClientOptions, Target, TunnelClient};
use tunnel_proto::h2::H2Settings;
use tunnel_server::{Server, ServerConfig};

use crate::{Pki, free_addr, free_listen_port, wait_until};

/// A server configuration on loopback with ephemeral ports.
pub fn server_config(pki: &Pki) -> ServerConfig {
    ServerConfig {
        agent_listen: "127.0.0.1:0".parse().unwrap(),
        client_listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        tls: tunnel_proto::tls::ServerTls::server(pki.files("server")).expect("server TLS"),
        trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
        server_id: "test-server".into(),
        server_count: 1,
        known_clusters: vec![],
        dial_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        h2: H2Settings::default(),
        auth: Default::default(),
        // Off by default so that tests' dial counts stay their own; see tests/tests/probes.rs.
        probe: tunnel_server::probes::ProbeConfig::disabled(),
        limits: tunnel_server::Limits::default(),
        // In-process servers stop at once and are ready at once; the HA tests
        // run the binaries with the real defaults.
        ha: tunnel_server::HaConfig {
            shutdown_delay: Duration::ZERO,
            ready_wait: Duration::ZERO,
            ..Default::default()
        },
    }
}

/// Starts a server in this process.
pub async fn start_server(pki: &Pki) -> Server {
    Server::start(server_config(pki))
        .await
        .expect("server starts")
}

/// An agent configuration for `cluster` that may dial loopback destinations.
pub fn agent_config(pki: &Pki, cluster: &str, servers: &[SocketAddr]) -> AgentConfig {
    AgentConfig {
        servers: servers.iter().map(|a| a.to_string()).collect(),
        server_name: Some("localhost".into()),
        cluster: cluster.into(),
        agent_id: format!("{cluster}-agent-{}", rand::random::<u16>()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files(&format!("agent-{cluster}")))
            .expect("agent TLS"),
        h2: H2Settings::default(),
        allowlist: Allowlist::parse(&["127.0.0.0/8".to_string()]).unwrap(),
        dial_timeout: Duration::from_secs(5),
        socket_buffer: 0,
        host_aliases: Default::default(),
        resolve_interval: Duration::from_secs(30),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        proxy: tunnel_agent::proxy::ProxySettings::none(),
    }
}

/// Starts an agent in this process and waits until its tunnel is up and the
/// server lists it.
pub async fn start_agent(pki: &Pki, cluster: &str, server: &Server) -> Agent {
    start_agent_with(agent_config(pki, cluster, &[server.agent_addr]), server).await
}

/// Starts an agent with `config` and waits until `server` lists one more agent.
pub async fn start_agent_with(config: AgentConfig, server: &Server) -> Agent {
    let before = server.state().pool.agent_count();
    let agent = Agent::start(config).await.expect("agent starts");
    let state = server.state().clone();
    wait_until(
        "the agent's tunnel is registered",
        Duration::from_secs(10),
        || {
            let n = state.pool.agent_count();
            async move { n > before }
        },
    )
    .await;
    agent
}

/// A client of `server` with the certificate of client `name`.
pub fn client(pki: &Pki, name: &str, server: SocketAddr) -> Arc<TunnelClient> {
    Arc::new(TunnelClient::new(ClientOptions {
        servers: vec![server.to_string()],
        server_name: Some("localhost".into()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files(&format!("client-{name}")))
            .expect("client TLS"),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(15),
        token_file: None,
    }))
}

/// Listens on a loopback port and forwards each connection to `target`
/// through the tunnel (what a sidecar's per-cluster port does).
pub async fn forward_port(client: Arc<TunnelClient>, target: Target) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tunnel_proto::client::serve_port(
        listener,
        client,
        target,
        |_| {},
        std::future::pending(),
    ));
    addr
}

/// Starts a sidecar in this process (the library the `tunnel-sidecar`
/// binary runs), configured through the binary's own flags so that new
/// settings keep their defaults: client certificate `client-<client_name>`,
/// the server's client port `server`, an HTTP proxy on a free loopback port,
/// and one per-cluster port per `ports` entry (`CLUSTER:HOST:PORT`), in
/// order (`Sidecar::port_addrs`). Waits until it is connected to the server.
pub async fn start_sidecar(
    pki: &Pki,
    client_name: &str,
    server: SocketAddr,
    ports: &[String],
) -> tunnel_sidecar::Sidecar {
    use clap::Parser as _;
    let mut args: Vec<String> = [
        "tunnel-sidecar",
        "--server",
        &server.to_string(),
        "--server-name",
        "localhost",
        "--cert-dir",
        &pki.dir.path().display().to_string(),
        "--client-name",
        client_name,
        "--proxy-listen",
        &free_addr().to_string(),
        "--admin-listen",
        &free_addr().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in ports {
        args.push("--port".into());
        args.push(format!("{}={p}", free_listen_port()));
    }
    let config = tunnel_sidecar::config::Cli::parse_from(args)
        .resolve()
        .expect("sidecar configuration");
    let sidecar = tunnel_sidecar::Sidecar::start(config)
        .await
        .expect("sidecar starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sidecar.is_connected() {
        assert!(
            Instant::now() < deadline,
            "the sidecar did not connect to the server within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sidecar
}
