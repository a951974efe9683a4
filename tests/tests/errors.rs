//! Every failure to open a connection reaches the client as a typed error
//! (`TunnelError::code`), and the server counts it by code in `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tunnel_agent::allowlist::Allowlist;
use tunnel_proto::client::{ClientOptions, Target, TunnelClient};
use tunnel_proto::error::ErrorCode;
use tunnel_proto::h2::H2Settings;
use tunnel_tests::*;

/// A loopback listener whose accept queue is full: it never accepts, and
/// further SYNs are dropped by the kernel, so a connect neither succeeds nor
/// is refused until it times out. Nothing leaves this machine.
struct BlackHole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<TcpStream>,
}

async fn black_hole() -> BlackHole {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        // Loopback answers a SYN at once unless the kernel dropped it.
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => queued.push(tcp),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            // This SYN was dropped: the queue is full.
            Err(_) => {
                return BlackHole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    free_port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dial_failure_is_typed_and_counted() {
    const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
    init();
    let pki = Pki::new(&["east", "north"], &["app"]);
    let mut config = server_config(&pki);
    config.known_clusters = vec!["west".into()];
    config.dial_timeout = DIAL_TIMEOUT;
    let server = tunnel_server::Server::start(config).await.unwrap();
    // east may dial all of loopback; north only its echo port.
    let _east = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    let mut north = agent_config(&pki, "north", &[server.agent_addr]);
    north.allowlist = Allowlist::parse(&[format!("127.0.0.1:{}", echo.port())]).unwrap();
    let _north = start_agent_with(north, &server).await;
    let client = client(&pki, "app", server.client_addr);
    let hole = black_hole().await;

    let cases = [
        (
            Target::new("nowhere", "127.0.0.1", echo.port()),
            ErrorCode::UnknownCluster,
        ),
        (
            Target::new("west", "127.0.0.1", echo.port()),
            ErrorCode::NoAgent,
        ),
        (
            Target::new("east", "127.0.0.1", closed_port()),
            ErrorCode::DestinationRefused,
        ),
        // Cloud metadata is refused by default, whatever the rules.
        (
            Target::new("east", "169.254.169.254", 80),
            ErrorCode::DestinationNotAllowed,
        ),
        // A port the agent's allowlist does not name.
        (
            Target::new("north", "127.0.0.1", closed_port()),
            ErrorCode::DestinationNotAllowed,
        ),
        // `.invalid` never resolves (RFC 6761).
        (
            Target::new("east", "no-such-host.invalid", 80),
            ErrorCode::DnsFailure,
        ),
        (
            Target::new("east", "127.0.0.1", hole.addr.port()),
            ErrorCode::DialTimeout,
        ),
    ];
    for (target, want) in &cases {
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), client.open(target))
            .await
            .unwrap_or_else(|_| panic!("{target}: no answer within 20 s"))
            .expect_err(&format!("{target} must fail"));
        assert_eq!(err.code, *want, "{target}: {err}");
        assert!(!err.message.is_empty(), "{target}: a message for people");
        if *want == ErrorCode::DialTimeout {
            let took = started.elapsed();
            assert!(
                took >= DIAL_TIMEOUT && took < DIAL_TIMEOUT * 5,
                "{target}: the dial timeout is {DIAL_TIMEOUT:?}, the answer took {took:?}"
            );
        }
    }

    // What the destination could reach still works on the same client.
    let opened = client
        .open(&Target::new("north", "127.0.0.1", echo.port()))
        .await
        .expect("north's allowed destination");
    assert_eq!(opened.opened.peer, format!("127.0.0.1:{}", echo.port()));
    drop(opened);

    let metrics = fetch_metrics(server.admin_addr).await;
    for (code, n) in [
        ("unknown_cluster", 1.0),
        ("no_agent", 1.0),
        ("destination_refused", 1.0),
        ("destination_not_allowed", 2.0),
        ("dns_failure", 1.0),
        ("dial_timeout", 1.0),
        ("ok", 1.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("tunnel_server_dials_total{{code=\"{code}\"}}")
            ),
            Some(n),
            "tunnel_server_dials_total for {code} in:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_cannot_open_client_connections() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let echo = start_echo().await;
    // A valid certificate of the same CA, but it names an agent, not a client.
    let impostor = TunnelClient::new(ClientOptions {
        servers: vec![server.client_addr.to_string()],
        server_name: Some("localhost".into()),
        tls: tunnel_proto::tls::ClientTls::client(pki.files("agent-east")).unwrap(),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(5),
        token_file: None,
    });
    let target = Target::new("east", "127.0.0.1", echo.port());
    let err = tokio::time::timeout(Duration::from_secs(20), impostor.open(&target))
        .await
        .expect("an answer within 20 s")
        .expect_err("an agent certificate must not open connections");
    assert_eq!(err.code, ErrorCode::Unauthenticated, "{err}");
    assert!(
        impostor.list_clusters().await.is_err(),
        "an agent certificate must not list clusters"
    );
    let metrics = fetch_metrics(server.admin_addr).await;
    assert!(
        metric(
            &metrics,
            r#"tunnel_server_rejected_connections_total{listener="client",reason="identity"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"tunnel_server_dials_total{code="ok"}"#),
        None,
        "nothing was dialed: {metrics}"
    );
    // A real client is still served.
    let client = client(&pki, "app", server.client_addr);
    client
        .open(&target)
        .await
        .expect("a client certificate opens");
}
