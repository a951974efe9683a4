//! `tunnel-manager health` against a real server and agents in this process
//! (the tests crate's harness): every listed cluster is probed through the
//! tunnel, by TCP connect and by `GET /healthz` over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tunnel_manager::cli::{Cli, Command};
use tunnel_manager::health::{self, ProbeOptions};
use tunnel_tests as harness;

const DEADLINE: Duration = Duration::from_secs(30);

/// An HTTPS service answering `GET /healthz` with `ok`, like a kube-apiserver.
async fn start_healthz(pki: &harness::Pki) -> SocketAddr {
    let files = pki.files("server");
    let chain = tunnel_proto::tls::load_certs(&files.cert, "server certificate").unwrap();
    let key = tunnel_proto::tls::load_key(&files.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let ok = buf[..n].starts_with(b"GET /healthz ");
                let answer: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = tls.write_all(answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn health_args(
    pki: &harness::Pki,
    server: SocketAddr,
    extra: &[&str],
) -> tunnel_manager::cli::HealthArgs {
    let mut argv = vec![
        "tunnel-manager".to_string(),
        "health".into(),
        format!("--server={server}"),
        "--server-name=localhost".into(),
        format!("--cert-dir={}", pki.dir.path().display()),
        "--client-name=sidecar".into(),
        "--timeout=10s".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Health(args) => args,
        other => panic!("parsed {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_every_cluster_through_the_tunnel() {
    harness::init();
    tokio::time::timeout(DEADLINE, async {
        let pki = harness::Pki::new(&["east", "west"], &["sidecar"]);
        let server = harness::start_server(&pki).await;
        let _east = harness::start_agent(&pki, "east", &server).await;
        let _east2 = harness::start_agent(&pki, "east", &server).await;
        let _west = harness::start_agent(&pki, "west", &server).await;
        let healthz = start_healthz(&pki).await;

        // The table: TCP connect and /healthz over TLS, both clusters healthy.
        let port = healthz.port().to_string();
        let args = health_args(
            &pki,
            server.client_addr,
            &["--probe-host=127.0.0.1", "--probe-port", &port, "--healthz"],
        );
        let (table, all_healthy) = tunnel_manager::cli::health_command(&args).await.unwrap();
        assert!(all_healthy, "{table}");
        let lines: Vec<&str> = table.lines().collect();
        let header: Vec<&str> = lines[0]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "CLUSTER",
                "INSTALLED",
                "AVAILABLE",
                "PROBED HEALTH",
                "LATENCY"
            ],
            "{table}"
        );
        assert!(
            lines[1].starts_with("east ")
                && lines[1].contains("true (2 agents)")
                && lines[1].ends_with("ms"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("west ") && lines[2].contains("true (1 agent)"),
            "{table}"
        );
        // `helm test` asks for at least one answering cluster: two answered;
        // asking for three fails the command.
        for (min, ok) in [("--min-healthy=1", true), ("--min-healthy=3", false)] {
            let args = health_args(
                &pki,
                server.client_addr,
                &["--probe-host=127.0.0.1", "--probe-port", &port, min],
            );
            let (table, all_healthy) = tunnel_manager::cli::health_command(&args).await.unwrap();
            assert_eq!(all_healthy, ok, "{min}: {table}");
        }

        // JSON, and a probe that fails: nothing listens on the port in either cluster.
        let closed = harness::free_port().to_string();
        let args = health_args(
            &pki,
            server.client_addr,
            &["--probe-host=127.0.0.1", "--probe-port", &closed, "--json"],
        );
        let (json, all_healthy) = tunnel_manager::cli::health_command(&args).await.unwrap();
        assert!(!all_healthy, "{json}");
        let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(rows[0]["cluster"], "east");
        assert_eq!(rows[0]["available"], true);
        assert_eq!(rows[0]["healthy"], false);
        assert!(
            rows[0]["probe"].as_str().unwrap().contains("refused"),
            "{json}"
        );
        assert!(rows[0]["latency_ms"].is_null());

        // A cluster installed on the hub whose agent never connected.
        let client = harness::client(&pki, "sidecar", server.client_addr);
        let opts = ProbeOptions {
            host: "127.0.0.1".into(),
            port: healthz.port(),
            healthz: false,
            timeout: Duration::from_secs(10),
        };
        let installed = std::collections::BTreeMap::from([
            ("east".to_string(), Some(true)),
            ("north".to_string(), None),
        ]);
        let rows = health::check(&client, Some(&installed), &opts)
            .await
            .unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.cluster.as_str()).collect();
        assert_eq!(names, ["east", "north", "west"]);
        assert_eq!((rows[0].installed, rows[0].healthy), (Some(true), true));
        assert_eq!(
            (rows[1].installed, rows[1].available, rows[1].healthy),
            (Some(true), false, false)
        );
        assert_eq!(rows[2].installed, Some(false));
    })
    .await
    .expect("health checks finished in time");
}

#[tokio::test]
async fn a_certificate_from_elsewhere_needs_its_key() {
    harness::init();
    let pki = harness::Pki::new(&["east"], &["sidecar"]);
    // Nothing listens there: the flags are refused before any connection.
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for flag in [
        "--tls-cert=/elsewhere/tls.crt",
        "--tls-key=/elsewhere/tls.key",
    ] {
        let args = health_args(&pki, nowhere, &[flag]);
        let err = tunnel_manager::cli::health_command(&args)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("--tls-cert and --tls-key go together"),
            "{flag}: {err}"
        );
    }
}
