//! Workload identity and authorization end to end: a workload certificate
//! (`ns/team-a/sa/app`) allowed to reach `east` but not `west`, through the
//! real sidecar (HTTP proxy: 403; per-cluster port: closed plus a log line)
//! and through the client library against the real server binary with a
//! policy file that changes while connections are open.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tunnel_proto::client::{ClientOptions, Target, TunnelClient};
use tunnel_proto::error::ErrorCode;
use tunnel_proto::h2::H2Settings;
use tunnel_server::policy::{Policy, parse_policy_text};
use tunnel_server::{AuthConfig, PolicySource, Server};
use tunnel_tests::*;

const WORKLOAD: &str = "team-a/app";
const DEADLINE: Duration = Duration::from_secs(20);

fn allow(cluster: &str) -> String {
    format!(
        "rules:\n  - name: app-to-{cluster}\n    subjects:\n      - serviceAccount: team-a/app\n    clusters:\n      - name: {cluster}\n"
    )
}

/// A client with the workload certificate of `team-a/app`.
fn workload_client(pki: &Pki, server: std::net::SocketAddr) -> Arc<TunnelClient> {
    Arc::new(TunnelClient::new(ClientOptions {
        servers: vec![server.to_string()],
        server_name: Some("localhost".into()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files("workload-team-a_app"))
            .expect("workload TLS"),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(15),
        token_file: None,
    }))
}

async fn server_with(pki: &Pki, auth: AuthConfig) -> Server {
    let mut config = server_config(pki);
    config.auth = auth;
    Server::start(config).await.expect("server starts")
}

/// An agent of `cluster` that knows `hello.default.svc` as 127.0.0.1.
async fn agent(pki: &Pki, cluster: &str, server: &Server) -> tunnel_agent::Agent {
    let mut config = agent_config(pki, cluster, &[server.agent_addr]);
    config.host_aliases = [(
        "hello.default.svc".to_string(),
        "127.0.0.1".parse().unwrap(),
    )]
    .into_iter()
    .collect();
    start_agent_with(config, server).await
}

async fn proxy_get(proxy: std::net::SocketAddr, url: &str) -> String {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut out))
        .await
        .expect("the proxy answers")
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_allowed_east_is_refused_west_by_proxy_and_by_port() {
    init();
    let pki = Pki::new(&["east", "west"], &[WORKLOAD]);
    let (_tx, rx) = watch::channel(Arc::new(parse_policy_text("test", &allow("east")).unwrap()));
    let server = server_with(
        &pki,
        AuthConfig {
            policy: PolicySource::Fixed(rx),
            ..Default::default()
        },
    )
    .await;
    let _east = agent(&pki, "east", &server).await;
    let _west = agent(&pki, "west", &server).await;
    let hello = start_http_hello("svc").await;

    let (east_port, west_port) = (free_listen_port(), free_listen_port());
    let (proxy, admin) = (free_addr(), free_addr());
    let dir = pki.dir.path();
    let args: Vec<String> = [
        "--server".to_string(),
        server.client_addr.to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--tls-cert".into(),
        dir.join("workload-team-a_app.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("workload-team-a_app-key.pem")
            .display()
            .to_string(),
        "--ca".into(),
        dir.join("ca.pem").display().to_string(),
        "--port".into(),
        format!("{east_port}=east:hello.default.svc:{}", hello.port()),
        "--port".into(),
        format!("{west_port}=west:hello.default.svc:{}", hello.port()),
        "--proxy-listen".into(),
        proxy.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--log-format".into(),
        "text".into(),
    ]
    .to_vec();
    let sidecar = Proc::spawn("sidecar", "tunnel-sidecar", &args, &[]);
    wait_ready(admin, "sidecar").await;

    // Through the HTTP proxy: east answers, west is 403 forbidden.
    let ok = proxy_get(
        proxy,
        &format!(
            "http://hello.default.svc.east.tunnel.internal:{}/",
            hello.port()
        ),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}\n{}", sidecar.logs());
    assert!(ok.contains("hello from svc"), "{ok}");
    let refused = proxy_get(
        proxy,
        &format!(
            "http://hello.default.svc.west.tunnel.internal:{}/",
            hello.port()
        ),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-tunnel-error: forbidden"),
        "{refused}"
    );
    assert!(
        refused.contains("ns/team-a/sa/app may not reach"),
        "{refused}"
    );

    // Through the per-cluster ports: east answers, west is closed and logged.
    let (status, body) = http_get(([127, 0, 0, 1], east_port).into(), "/")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut tcp = TcpStream::connect(("127.0.0.1", west_port)).await.unwrap();
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut buf))
        .await
        .expect("the connection is closed");
    assert!(
        read.is_err() || buf.is_empty(),
        "west answered: {:?}",
        String::from_utf8_lossy(&buf)
    );
    sidecar
        .wait_log(&["cannot open tunnel", "forbidden", "west"], 1, DEADLINE)
        .await;
    let metrics = fetch_metrics(server.admin_addr).await;
    assert!(
        metric(
            &metrics,
            "tunnel_server_authorization_decisions_total{decision=\"deny\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
}

async fn echo_once(io: &mut tunnel_proto::client::TunnelIo, msg: &[u8]) {
    io.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(DEADLINE, io.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .unwrap();
    assert_eq!(back, msg);
}

fn write_policy(path: &Path, text: &str) {
    // Write then rename, as an editor or a ConfigMap update would.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_policy_file_applies_to_new_connections_and_a_malformed_one_is_rejected() {
    init();
    let pki = Pki::new(&["east", "west"], &[WORKLOAD]);
    let policy = pki.path("policy.yaml");
    write_policy(&policy, &allow("east"));
    let addrs = ServerAddrs::free();
    let server = spawn_server(
        "server",
        pki.dir.path(),
        &addrs,
        &[
            "--policy-file",
            &policy.display().to_string(),
            "--policy-reload-interval",
            "100ms",
        ],
    )
    .await;
    let _east = spawn_agent(
        "agent-east",
        pki.dir.path(),
        "east",
        addrs.agent,
        free_addr(),
    );
    let _west = spawn_agent(
        "agent-west",
        pki.dir.path(),
        "west",
        addrs.agent,
        free_addr(),
    );
    let echo = start_echo().await;
    let client = workload_client(&pki, addrs.client);
    wait_listed_agents(&client, "east", 1).await;
    wait_listed_agents(&client, "west", 1).await;
    let east = Target::new("east", "127.0.0.1", echo.port());
    let west = Target::new("west", "127.0.0.1", echo.port());

    let mut open_east = client.open_io(&east).await.expect("east is allowed");
    echo_once(&mut open_east, b"before").await;
    let err = client.open_io(&west).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
    server
        .wait_log(
            &["tunnel_server::audit", "deny", "default-deny", "west"],
            1,
            DEADLINE,
        )
        .await;

    // Now west only: new connections follow, the open one stays.
    write_policy(&policy, &allow("west"));
    wait_until("west is allowed", DEADLINE, || async {
        client.open_io(&west).await.is_ok()
    })
    .await;
    let err = client.open_io(&east).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
    echo_once(&mut open_east, b"after the change").await;
    server
        .wait_log(
            &["tunnel_server::audit", "allow", "policy.yaml/app-to-west"],
            1,
            DEADLINE,
        )
        .await;

    // A malformed file is rejected naming the field; the previous policy stays.
    write_policy(
        &policy,
        "rules:\n  - subjects: [{serviceAcount: team-a/app}]\n    clusters: [{name: east}]\n",
    );
    server
        .wait_log(
            &[
                "policy file rejected",
                "rules[0].subjects[0]",
                "serviceAcount",
            ],
            1,
            DEADLINE,
        )
        .await;
    assert!(
        client.open_io(&west).await.is_ok(),
        "the previous policy stays in force"
    );
    assert_eq!(
        client.open_io(&east).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    echo_once(&mut open_east, b"still open").await;
    open_east.shutdown().await.unwrap();
    drop(open_east);
    // The open connection's close line carries its bytes and the rule that allowed it.
    server
        .wait_log(
            &[
                "tunnel_server::audit",
                "connection closed",
                "policy.yaml/app-to-east",
                "bytes_to_cluster=32",
            ],
            1,
            DEADLINE,
        )
        .await;
}

/// An echo destination that reports how each of its connections ended.
async fn start_reporting_echo() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Ending>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut n = 0;
            let ending = loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break Ending::Fin(n),
                    Ok(k) => {
                        n += k;
                        if let Err(e) = tcp.write_all(&buf[..k]).await {
                            break if is_reset(&e) {
                                Ending::Reset(n)
                            } else {
                                Ending::Error(n, e.to_string())
                            };
                        }
                    }
                    Err(e) if is_reset(&e) => break Ending::Reset(n),
                    Err(e) => break Ending::Error(n, e.to_string()),
                }
            };
            let _ = tx.send(ending);
        }
    })
    .await;
    (addr, rx)
}

/// A revoked connection is cut in both directions: the client's end and the
/// destination's end each see a reset (an abort, not a clean end of data),
/// for a connection of the client library and one through its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enforce_on_change_a_revoked_connection_is_cut() {
    init();
    let pki = Pki::new(&["east"], &[WORKLOAD]);
    let (tx, rx) = watch::channel(Arc::new(parse_policy_text("test", &allow("east")).unwrap()));
    let server = server_with(
        &pki,
        AuthConfig {
            policy: PolicySource::Fixed(rx),
            enforce_on_change: true,
            ..Default::default()
        },
    )
    .await;
    let _east = start_agent(&pki, "east", &server).await;
    let (echo, mut dest_endings) = start_reporting_echo().await;
    let target = Target::new("east", "127.0.0.1", echo.port());
    let client = workload_client(&pki, server.client_addr);
    let mut io = client.open_io(&target).await.expect("allowed");
    echo_once(&mut io, b"allowed").await;
    let port = forward_port(client.clone(), target.clone()).await;
    let mut tcp = TcpStream::connect(port).await.unwrap();
    tcp.write_all(b"allowed too").await.unwrap();
    let mut back = [0u8; 11];
    tokio::time::timeout(DEADLINE, tcp.read_exact(&mut back))
        .await
        .expect("echo through the port")
        .unwrap();
    // A change that still allows it leaves it alone.
    tx.send_replace(Arc::new(
        parse_policy_text("test2", &allow("east")).unwrap(),
    ));
    echo_once(&mut io, b"still allowed").await;
    tx.send_replace(Arc::new(Policy::deny_all()));

    let mut failures = Vec::new();
    // The client library's connection.
    let mut buf = [0u8; 16];
    let res = tokio::time::timeout(DEADLINE, async {
        let _ = io.write_all(b"x").await;
        io.read(&mut buf).await
    })
    .await;
    match res {
        Ok(Err(e)) if is_reset(&e) => {}
        other => failures.push(format!(
            "client library: the revoked connection's client end saw {other:?} instead of a reset"
        )),
    }
    // The connection through the port: the app's TCP connection is reset.
    let ending = read_ending(&mut tcp, DEADLINE).await;
    if ending != Ending::Reset(0) {
        failures.push(format!(
            "port: the revoked connection's client end saw {ending:?} instead of a reset"
        ));
    }
    // Both connections' destination ends are cut too, as aborts.
    let mut ends = Vec::new();
    while ends.len() < 2 {
        match tokio::time::timeout(DEADLINE, dest_endings.recv()).await {
            Ok(Some(ending)) => ends.push(ending),
            _ => break,
        }
    }
    if ends.len() < 2 || ends.iter().any(|e| !matches!(e, Ending::Reset(_))) {
        failures.push(format!(
            "destination ends of the 2 revoked connections: saw {ends:?}; {} still open {DEADLINE:?} after the revocation (each should see a reset)",
            2 - ends.len()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Connections of `cluster`'s kind the server refused because the cluster
/// is not admitted (`--clusters-from-ocm`: not an accepted ManagedCluster
/// with the addon).
async fn refused_clusters(server: &Server) -> f64 {
    let body = fetch_metrics(server.admin_addr).await;
    metric(
        &body,
        r#"tunnel_server_rejected_connections_total{listener="agent",reason="cluster"}"#,
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admitted_clusters_agents_connect_and_a_detached_clusters_tunnel_closes() {
    use std::collections::BTreeSet;
    init();
    let pki = Pki::new(&["east", "west"], &[WORKLOAD]);
    // What --clusters-from-ocm keeps from OCM: east is accepted with the addon, west is not.
    let (admitted, rx) = watch::channel(Some(Arc::new(BTreeSet::from(["east".to_string()]))));
    let server = server_with(
        &pki,
        AuthConfig {
            admitted_clusters: Some(rx),
            ..Default::default()
        },
    )
    .await;
    let east = start_agent(&pki, "east", &server).await;
    // west holds a valid agent certificate, and is refused each time it connects.
    let west = tunnel_agent::Agent::start(agent_config(&pki, "west", &[server.agent_addr]))
        .await
        .unwrap();
    wait_until("west's agent is refused twice", DEADLINE, || async {
        refused_clusters(&server).await >= 2.0
    })
    .await;
    assert_eq!(server.state().pool.agent_count(), 1, "east's agent only");
    assert_eq!(west.tunnels_up(), 0);
    assert_eq!(east.tunnels_up(), 1);

    // east detached from OCM (or its addon disabled): its open tunnel closes,
    // and it is refused when it connects again.
    let before = refused_clusters(&server).await;
    admitted.send_replace(Some(Arc::new(BTreeSet::new())));
    wait_until("east's tunnel is closed", DEADLINE, || {
        let n = server.state().pool.agent_count();
        async move { n == 0 }
    })
    .await;
    wait_until("east's agent knows its tunnel is gone", DEADLINE, || {
        let up = east.tunnels_up();
        async move { up == 0 }
    })
    .await;
    wait_until(
        "east's agent is refused when it reconnects",
        DEADLINE,
        || async { refused_clusters(&server).await > before },
    )
    .await;
    assert_eq!(server.state().pool.agent_count(), 0);

    // Admitted again (re-accepted): east comes back by itself.
    admitted.send_replace(Some(Arc::new(BTreeSet::from(["east".to_string()]))));
    wait_until("east's agent is back", DEADLINE, || {
        let up = east.tunnels_up();
        async move { up == 1 }
    })
    .await;
    assert_eq!(west.tunnels_up(), 0);
}
