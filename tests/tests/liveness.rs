//! A peer that stops answering (process frozen with SIGSTOP: its kernel still
//! ACKs TCP, so only HTTP/2 keepalive can tell) is declared dead within the
//! configured time, on both sides, and the tunnel comes back when it resumes.

use std::time::Duration;

use tunnel_proto::net::Liveness;
use tunnel_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_drops_a_frozen_agent_and_takes_it_back_when_it_resumes() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    config.h2.liveness = Liveness::from_timeout(Duration::from_secs(2));
    let server = tunnel_server::Server::start(config).await.unwrap();
    let admin = free_port();
    let agent = Proc::spawn(
        "agent",
        "tunnel-agent",
        &[
            "--server".into(),
            server.agent_addr.to_string(),
            "--server-name".into(),
            "localhost".into(),
            "--cluster".into(),
            "east".into(),
            "--cert-dir".into(),
            pki.dir.path().display().to_string(),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
            "--dead-peer-timeout".into(),
            "2s".into(),
            "--reconnect-max".into(),
            "500ms".into(),
        ],
        &[],
    );
    let state = server.state().clone();
    let st = state.clone();
    wait_until("the agent connects", Duration::from_secs(20), || {
        let n = st.pool.agent_count();
        async move { n == 1 }
    })
    .await;

    agent.signal("STOP");
    let st = state.clone();
    wait_until(
        "the server drops the frozen agent",
        Duration::from_secs(10),
        || {
            let n = st.pool.agent_count();
            async move { n == 0 }
        },
    )
    .await;

    agent.signal("CONT");
    let st = state.clone();
    wait_until(
        "the resumed agent reconnects",
        Duration::from_secs(20),
        || {
            let n = st.pool.agent_count();
            async move { n == 1 }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notices_a_frozen_server_and_reports_not_ready() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let (agent_port, client_port, admin_port) = (free_port(), free_port(), free_port());
    let server = Proc::spawn(
        "server",
        "tunnel-server",
        &[
            "--agent-listen".into(),
            format!("127.0.0.1:{agent_port}"),
            "--client-listen".into(),
            format!("127.0.0.1:{client_port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
            "--cert-dir".into(),
            pki.dir.path().display().to_string(),
            "--dead-peer-timeout".into(),
            "2s".into(),
            "--allow-all".into(),
        ],
        &[],
    );
    let agent_addr = format!("127.0.0.1:{agent_port}").parse().unwrap();
    wait_listening(agent_addr, "server agent port").await;
    let mut config = agent_config(&pki, "east", &[agent_addr]);
    config.h2.liveness = Liveness::from_timeout(Duration::from_secs(2));
    let agent = tunnel_agent::Agent::start(config).await.unwrap();
    let admin = agent.admin_addr;
    wait_until(
        "the agent is ready",
        Duration::from_secs(20),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
    )
    .await;

    server.signal("STOP");
    wait_until(
        "the agent reports not ready",
        Duration::from_secs(10),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((503, _))) },
    )
    .await;
    server.signal("CONT");
    wait_until(
        "the agent is ready again",
        Duration::from_secs(20),
        || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
    )
    .await;
}
