//! The server's own probes: every cluster with an agent is dialed through
//! the tunnel periodically and the result and latency exported as metrics;
//! the probes need no policy rule and leave no connection open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tunnel_server::probes::{ProbeConfig, ProbeTarget};
use tunnel_tests::*;

/// A destination that counts connections: accepted, open now, and those the
/// other side closed with a FIN (rather than a reset).
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    clean: AtomicUsize,
}

/// An echo service that counts its connections; aborting the returned task
/// closes its listener (later dials are refused).
async fn start_counted_echo() -> (SocketAddr, Arc<Counts>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let clean = loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break true,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break false;
                            }
                        }
                        Err(_) => break false,
                    }
                };
                if clean {
                    let _ = tcp.shutdown().await;
                    c.clean.fetch_add(1, Ordering::SeqCst);
                }
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts, task)
}

async fn wait_metric(admin: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let body = fetch_metrics(admin).await;
        if check(&body) {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting until {what}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_success_latency_and_failures_per_cluster() {
    init();
    let pki = Pki::new(&["east", "west"], &["app"]);
    let (echo, counts, echo_task) = start_counted_echo().await;

    let mut config = server_config(&pki);
    // West is known but has no agent.
    config.known_clusters = vec!["west".into()];
    config.dial_timeout = Duration::from_secs(2);
    // A policy that allows nothing: the probe is the server's own and needs no rule.
    let (_policy_tx, policy_rx) =
        tokio::sync::watch::channel(Arc::new(tunnel_server::policy::Policy::deny_all()));
    config.auth.policy = tunnel_server::PolicySource::Fixed(policy_rx);
    config.probe = ProbeConfig {
        interval: Duration::from_millis(100),
        target: ProbeTarget {
            host: "apiserver.probe.test".into(),
            port: echo.port(),
        },
    };
    let server = tunnel_server::Server::start(config).await.unwrap();
    let mut agent_config = agent_config(&pki, "east", &[server.agent_addr]);
    agent_config.host_aliases = [("apiserver.probe.test".to_string(), echo.ip())]
        .into_iter()
        .collect();
    let agent = start_agent_with(agent_config, &server).await;

    // East: reached through its agent, with a latency.
    let body = wait_metric(server.admin_addr, "east's probe succeeds", |b| {
        metric(b, "tunnel_server_probe_success{cluster=\"east\"}") == Some(1.0)
    })
    .await;
    let latency = metric(
        &body,
        "tunnel_server_probe_latency_seconds{cluster=\"east\"}",
    )
    .expect("a latency for east");
    assert!(latency > 0.0 && latency < 2.0, "latency {latency}");
    assert!(
        metric(
            &body,
            "tunnel_server_probes_total{cluster=\"east\",code=\"ok\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    // West: not dialed, reported as having no agent.
    assert_eq!(
        metric(&body, "tunnel_server_probe_success{cluster=\"west\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(
        metric(
            &body,
            "tunnel_server_probes_total{cluster=\"west\",code=\"no_agent\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tunnel_server_probe_latency_seconds{cluster=\"west\"}"
        ),
        None,
        "{body}"
    );

    // A few more rounds, then: the probes closed every connection they
    // opened, with a FIN, and none of it is a user's connection.
    let accepted = counts.accepted.load(Ordering::SeqCst);
    wait_until(
        "more probes reached the destination",
        Duration::from_secs(10),
        || {
            let n = counts.accepted.load(Ordering::SeqCst);
            async move { n >= accepted + 3 }
        },
    )
    .await;
    let probed = Arc::new(AtomicUsize::new(0));
    wait_until(
        "the destination sees no probe connection open",
        Duration::from_secs(10),
        || {
            // Between rounds nothing is open; a round may be in flight.
            let open = counts.open.load(Ordering::SeqCst);
            probed.store(counts.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
            async move { open == 0 }
        },
    )
    .await;
    assert!(
        counts.clean.load(Ordering::SeqCst) + 1 >= probed.load(Ordering::SeqCst),
        "probe connections are closed with a FIN: {} clean of {}",
        counts.clean.load(Ordering::SeqCst),
        probed.load(Ordering::SeqCst)
    );
    let body = fetch_metrics(server.admin_addr).await;
    assert_eq!(server.state().open_connections(), 0);
    assert_eq!(
        metric(&body, "tunnel_server_open_connections"),
        Some(0.0),
        "{body}"
    );
    assert!(
        !body.contains("tunnel_server_dials_total{"),
        "probes are not counted as user dials:\n{body}"
    );
    assert!(
        !body.contains("tunnel_server_authorization_decisions_total{"),
        "probes are not authorized like users:\n{body}"
    );
    let listed = server.state().pool.snapshot();
    let east = listed.iter().find(|c| c.name == "east").unwrap();
    assert!(
        east.agents.iter().all(|a| a.open_connections == 0),
        "probes are not counted against the agent: {east:?}"
    );

    // The destination goes away: east's probe fails as refused.
    echo_task.abort();
    let _ = echo_task.await;
    let body = wait_metric(server.admin_addr, "east's probe fails", |b| {
        metric(b, "tunnel_server_probe_success{cluster=\"east\"}") == Some(0.0)
    })
    .await;
    assert!(
        metric(
            &body,
            "tunnel_server_probes_total{cluster=\"east\",code=\"destination_refused\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tunnel_server_probe_latency_seconds{cluster=\"east\"}"
        ),
        None,
        "no latency while failing:\n{body}"
    );
    assert_eq!(
        metric(&body, "tunnel_server_open_connections"),
        Some(0.0),
        "{body}"
    );

    // The probe task stops with the server rather than holding its shutdown
    // (the drain timeout is 5 s).
    agent.shutdown(Duration::from_millis(100)).await;
    let start = Instant::now();
    server.shutdown().await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_interval_disables_the_probes() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let (echo, counts, _echo_task) = start_counted_echo().await;
    let mut config = server_config(&pki);
    config.probe = ProbeConfig {
        interval: Duration::ZERO,
        target: ProbeTarget {
            host: "127.0.0.1".into(),
            port: echo.port(),
        },
    };
    let server = tunnel_server::Server::start(config).await.unwrap();
    let agent = start_agent(&pki, "east", &server).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = fetch_metrics(server.admin_addr).await;
    assert!(!body.contains("tunnel_server_probe_success{"), "{body}");
    assert!(!body.contains("tunnel_server_probes_total{"), "{body}");
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 0);
    agent.shutdown(Duration::from_millis(100)).await;
    server.shutdown().await;
}
