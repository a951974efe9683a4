//! The konnectivity protocol at the server's client port, as
//! apiserver-network-proxy's Go client uses it, driven by a client written
//! from the upstream protocol definition (`tunnel_tests::konnectivity`: tonic
//! over hyper's HTTP/2, with keepalive PINGs) through a real server and agent:
//! cluster-proxy's names for a cluster's kube-apiserver and our names for any
//! service, data both ways, a close from each side, the failures a client
//! must tell apart, many connections at once, and packets no client should
//! send (against the real binaries, whose logs are checked).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel_proto::konnectivity::encode;
use tunnel_proto::konnectivity::pb::{Packet, packet::Payload};
use tunnel_server::Server;
use tunnel_tests::konnectivity::{
    Dialed, Http2Channel, Tunnel, close_request, connect, data, dial_request, raw_call, send_random,
};
use tunnel_tests::*;

/// What the stand-in kube-apiserver says first.
const API_GREETING: &[u8] = b"kube-apiserver of east\n";
/// Keepalive PINGs as often as a tight gRPC keepalive would send them.
const KEEPALIVE: Duration = Duration::from_millis(100);

/// A server with an agent of `east` that knows the cluster's kube-apiserver
/// (`kubernetes.default.svc`) and `hello.default.svc` as 127.0.0.1.
struct Hub {
    pki: Pki,
    server: Server,
    _agent: tunnel_agent::Agent,
    /// The stand-in kube-apiserver: greets, then echoes.
    api: SocketAddr,
}

async fn hub(policy: Option<&str>) -> Hub {
    init();
    let pki = Pki::new(&["east"], &["app", "other"]);
    let server = start_server_with_policy(&pki, policy).await;
    let agent = start_agent_resolving(
        &pki,
        "east",
        &server,
        &["kubernetes.default.svc", "hello.default.svc"],
    )
    .await;
    let api = start_service(|mut tcp| async move {
        if tcp.write_all(API_GREETING).await.is_ok() {
            let (mut r, mut w) = tcp.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        }
    })
    .await;
    Hub {
        pki,
        server,
        _agent: agent,
        api,
    }
}

impl Hub {
    async fn channel(&self, cert: &str) -> Http2Channel {
        connect(&self.pki, cert, self.server.client_addr, KEEPALIVE).await
    }
}

/// An echo service that reports how each connection ended: `true` after a
/// clean FIN from the client, `false` after a reset.
async fn start_reporting_echo() -> (SocketAddr, mpsc::UnboundedReceiver<bool>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = tcp.split();
            let clean = tokio::io::copy(&mut r, &mut w).await.is_ok();
            let _ = w.shutdown().await;
            let _ = tx.send(clean);
        }
    })
    .await;
    (addr, rx)
}

/// Sends `len` random bytes on `connect_id` while reading them back (an
/// echo), both at once; checks they are the same.
async fn echo_both_ways(tunnel: &mut Tunnel, connect_id: i64, len: usize, seed: u64) {
    use sha2::Digest;
    let tx = tunnel.sender();
    let sent = tokio::spawn(async move { send_random(&tx, connect_id, len, seed).await });
    let back = tunnel.read_data(connect_id, len).await;
    let sent = sent.await.expect("the writer");
    assert_eq!(back.len(), len);
    assert_eq!(
        <[u8; 32]>::from(sha2::Sha256::digest(&back)),
        sent,
        "the echo is what was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_proxy_s_names_reach_the_kube_apiserver_and_ours_reach_a_service() {
    let hub = hub(None).await;
    let (echo, mut ended) = start_reporting_echo().await;
    let channel = hub.channel("client-app").await;
    // `cfg.Host = clusterName`: the Go client dials <cluster>:<port>, and
    // cluster-proxy's other name for it, <cluster>.<addon namespace>.
    let port = hub.api.port();
    for address in [
        format!("east:{port}"),
        format!("east.open-cluster-management-agent-addon:{port}"),
    ] {
        let mut tunnel = Tunnel::open(&channel).await;
        let Dialed::Opened(id) = tunnel.dial(&address).await else {
            panic!("{address} was not opened");
        };
        assert_eq!(tunnel.read_data(id, API_GREETING.len()).await, API_GREETING);
        echo_both_ways(&mut tunnel, id, 1 << 20, 7).await;
        // The client closes: CLOSE_RSP, then the stream ends cleanly.
        tunnel.send(close_request(id)).await;
        tunnel.expect_closed(id).await;
    }
    // A service by our name, on the same HTTP/2 connection after a pause
    // full of keepalive PINGs.
    tokio::time::sleep(KEEPALIVE * 10).await;
    let mut tunnel = Tunnel::open(&channel).await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    let Dialed::Opened(id) = tunnel.dial(&address).await else {
        panic!("{address} was not opened");
    };
    echo_both_ways(&mut tunnel, id, 256 * 1024, 8).await;
    tunnel.send(close_request(id)).await;
    tunnel.expect_closed(id).await;
    // The destination saw the client's close as a FIN, not a reset.
    let clean = tokio::time::timeout(Duration::from_secs(10), ended.recv())
        .await
        .expect("the destination's connection ended");
    assert_eq!(clean, Some(true), "the destination read a clean end");
    // Counted like any connection, once closed.
    wait_all_closed(&hub.server).await;
    let metrics = fetch_metrics(hub.server.admin_addr).await;
    assert_eq!(
        metric(&metrics, r#"tunnel_server_dials_total{code="ok"}"#),
        Some(3.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            r#"tunnel_server_bytes_total{cluster="east",direction="from_cluster"}"#
        )
        .unwrap_or(0.0)
            >= f64::from(2 * (1 << 20) + 256 * 1024),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_closes_ends_the_stream_with_close_rsp() {
    let hub = hub(None).await;
    let bye = start_service(|mut tcp| async move {
        let mut request = [0u8; 5];
        if tcp.read_exact(&mut request).await.is_ok() {
            let _ = tcp.write_all(b"bye\n").await;
            let _ = tcp.shutdown().await;
        }
    })
    .await;
    let channel = hub.channel("client-app").await;
    let mut tunnel = Tunnel::open(&channel).await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", bye.port());
    let Dialed::Opened(id) = tunnel.dial(&address).await else {
        panic!("{address} was not opened");
    };
    tunnel.send(data(id, Bytes::from_static(b"quit\n"))).await;
    assert_eq!(tunnel.read_data(id, 4).await, b"bye\n");
    // The destination's FIN: CLOSE_RSP and the end of the stream, as upstream.
    tunnel.expect_closed(id).await;
    let admin = hub.server.admin_addr;
    wait_until(
        "the connection is counted closed",
        Duration::from_secs(10),
        || async move {
            let metrics = fetch_metrics(admin).await;
            metric(&metrics, "tunnel_server_open_connections") == Some(0.0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dials_carry_the_code_and_the_reason() {
    let (echo, _ended) = start_reporting_echo().await;
    // The policy is checked before the cluster is looked up (a caller learns
    // nothing of clusters it may not reach): app may reach every cluster's
    // kube-apiserver on 443, so that an unknown cluster says so.
    let policy = format!(
        "rules:\n  - name: app-to-hello\n    subjects:\n      - identity: client/app\n    clusters:\n      - name: east\n    destinations:\n      - host: hello.default.svc\n        ports: [{}]\n  - name: app-to-apiservers\n    subjects:\n      - identity: client/app\n    clusters:\n      - name: \"*\"\n    destinations:\n      - host: kubernetes.default.svc\n        ports: [443]\n",
        echo.port()
    );
    let hub = hub(Some(&policy)).await;
    let app = hub.channel("client-app").await;
    let other = hub.channel("client-other").await;
    let allowed = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    for (channel, address, code) in [
        (&app, "nowhere:443".to_string(), "unknown_cluster: "),
        (&app, format!("east:{}", hub.api.port()), "forbidden: "),
        (&other, allowed.clone(), "forbidden: "),
        (&app, "10.0.0.1:443".to_string(), "bad_request: "),
        (
            &app,
            "hello.default.svc.Bad_Cluster.tunnel.internal:80".into(),
            "bad_request: ",
        ),
    ] {
        let mut tunnel = Tunnel::open(channel).await;
        match tunnel.dial(&address).await {
            Dialed::Failed(error) => assert!(error.starts_with(code), "{address}: {error}"),
            Dialed::Opened(_) => panic!("{address} was opened"),
        }
        // After the failed dial the stream ends, as upstream's does.
        assert!(
            matches!(tunnel.next().await, Ok(None)),
            "{address}: the stream ends"
        );
    }
    // The allowed one opens.
    let mut tunnel = Tunnel::open(&app).await;
    let Dialed::Opened(id) = tunnel.dial(&allowed).await else {
        panic!("{allowed} was not opened");
    };
    echo_both_ways(&mut tunnel, id, 4096, 1).await;
    let metrics = fetch_metrics(hub.server.admin_addr).await;
    for (code, n) in [
        ("unknown_cluster", 1.0),
        ("forbidden", 2.0),
        ("bad_request", 2.0),
    ] {
        let series = format!(r#"tunnel_server_dials_total{{code="{code}"}}"#);
        assert_eq!(metric(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_each_on_its_own_stream() {
    let hub = hub(None).await;
    let (echo, _ended) = start_reporting_echo().await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    // Six streams on one HTTP/2 connection (the Go client's reusable
    // tunnel) and two more connections with one stream each.
    let shared = hub.channel("client-app").await;
    let mut channels = vec![shared; 6];
    channels.push(hub.channel("client-app").await);
    channels.push(hub.channel("client-app").await);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, channel) in channels.into_iter().enumerate() {
        let address = address.clone();
        tasks.spawn(async move {
            let mut tunnel = Tunnel::open(&channel).await;
            let Dialed::Opened(id) = tunnel.dial(&address).await else {
                panic!("{address} was not opened");
            };
            echo_both_ways(&mut tunnel, id, 512 * 1024, i as u64).await;
            tunnel.send(close_request(id)).await;
            tunnel.expect_closed(id).await;
            id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = tasks.join_next().await {
        ids.push(id.expect("a connection"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8, "every connection has its own id");
    wait_all_closed(&hub.server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_out_of_place_end_the_stream_with_a_status_and_a_log_line() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let addrs = ServerAddrs::free();
    let server = spawn_server("server", pki.dir.path(), &addrs, &[]).await;
    let _agent = spawn_agent("agent", pki.dir.path(), "east", addrs.agent, free_addr());
    let (echo, _ended) = start_reporting_echo().await;
    let address = format!("127.0.0.1.east.tunnel.internal:{}", echo.port());
    let channel = connect(&pki, "client-app", addrs.client, KEEPALIVE).await;
    wait_until("the agent serves east", Duration::from_secs(10), || {
        let channel = channel.clone();
        let address = address.clone();
        async move {
            let mut tunnel = Tunnel::open(&channel).await;
            matches!(tunnel.dial(&address).await, Dialed::Opened(_))
        }
    })
    .await;

    let dial = encode(&dial_request(&address, 42));
    let concat = |parts: &[&[u8]]| Bytes::from(parts.concat());
    for (what, body, status, reason) in [
        (
            "bytes that are no Packet",
            Bytes::from_static(b"\x00\x00\x00\x00\x05\xff\xff\xff\xff\xff"),
            "3",
            "not a konnectivity Packet",
        ),
        (
            "a compressed message",
            Bytes::from_static(b"\x01\x00\x00\x00\x01\x00"),
            "12",
            "compressed",
        ),
        (
            "a message said to be 4 GiB",
            Bytes::from_static(b"\x00\xff\xff\xff\xff"),
            "8",
            "larger than the most accepted",
        ),
        (
            "a message cut short",
            Bytes::from_static(b"\x00\x00\x00\x00\x64\x08\x04"),
            "3",
            "inside a message",
        ),
        (
            "DATA first",
            encode(&data(1, Bytes::from_static(b"x"))),
            "3",
            "the first packet must be DIAL_REQ",
        ),
        (
            "DATA before DIAL_RSP",
            concat(&[&dial, &encode(&data(1, Bytes::from_static(b"x")))]),
            "3",
            "DATA before the dial was answered",
        ),
    ] {
        let answer = raw_call(&channel, body).await;
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        assert!(answer.message.contains(reason), "{what}: {answer:?}");
    }

    // On an open connection: DATA for another connection, a second dial,
    // and a packet over the limit.
    for (what, reason) in [
        ("an unknown connectID", "DATA for connection"),
        ("a second DIAL_REQ", "one connection per stream"),
        ("a 5 MiB packet", "larger than the most accepted"),
    ] {
        let mut tunnel = Tunnel::open(&channel).await;
        let Dialed::Opened(id) = tunnel.dial(&address).await else {
            panic!("{what}: {address} was not opened");
        };
        let packet = match what {
            "an unknown connectID" => data(id.wrapping_add(1), Bytes::from_static(b"x")),
            "a second DIAL_REQ" => dial_request(&address, 43),
            _ => data(id, Bytes::from(vec![0u8; 5 << 20])),
        };
        tunnel.send(packet).await;
        let status = tunnel.final_status().await;
        assert!(status.message().contains(reason), "{what}: {status:?}");
    }
    server
        .wait_log(
            &["konnectivity protocol violation"],
            9,
            Duration::from_secs(10),
        )
        .await;
    // The server serves on: a connection works as before.
    let mut tunnel = Tunnel::open(&channel).await;
    let Dialed::Opened(id) = tunnel.dial(&address).await else {
        panic!("{address} was not opened after the hostile packets");
    };
    echo_both_ways(&mut tunnel, id, 64 * 1024, 3).await;
    tunnel.send(close_request(id)).await;
    tunnel.expect_closed(id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_resets_the_destination_s_connection() {
    let hub = hub(None).await;
    let (echo, mut ended) = start_reporting_echo().await;
    let channel = hub.channel("client-app").await;
    let mut tunnel = Tunnel::open(&channel).await;
    let address = format!("hello.default.svc.east.tunnel.internal:{}", echo.port());
    let Dialed::Opened(id) = tunnel.dial(&address).await else {
        panic!("{address} was not opened");
    };
    echo_both_ways(&mut tunnel, id, 64 * 1024, 5).await;
    // The Go client's context is cancelled: its connection closes at once.
    channel.close();
    let clean = tokio::time::timeout(Duration::from_secs(10), ended.recv())
        .await
        .expect("the destination's connection ended");
    assert_eq!(clean, Some(false), "the destination's connection was reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_window_is_received_within_the_connection_s_budget() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let mut config = server_config(&pki);
    // Windows of 64 KiB that do not grow, and the smallest budget: 1 MiB.
    let window = 64 * 1024;
    config.h2.stream_window = window;
    config.h2.min_stream_window = window;
    config.h2.max_stream_window = window;
    config.h2.window_budget = 1 << 20;
    let server = Server::start(config).await.expect("server starts");
    let channel = connect(&pki, "client-app", server.client_addr, KEEPALIVE).await;
    // A DIAL_REQ ten windows long arrives whole (its start is given back
    // and held within the budget): the answer is about its address.
    let long_address = format!("{}:443", "a".repeat(640 * 1024));
    let answer = raw_call(&channel, encode(&dial_request(&long_address, 7))).await;
    assert_eq!(answer.status, "0", "{answer:?}");
    let rsp = <Packet as prost::Message>::decode(answer.body.slice(5..)).expect("a packet");
    let Some(Payload::DialResponse(rsp)) = rsp.payload else {
        panic!("not a DIAL_RSP: {rsp:?}");
    };
    assert_eq!(rsp.random, 7);
    assert!(rsp.error.starts_with("bad_request: "), "{}", rsp.error);
    // A message of 3 MiB on a connection whose budget is 1 MiB: its start
    // cannot all be held while the rest comes. Without the charge, the
    // server would hold the 2 MiB sent (and, on 10,000 streams, 40 GiB).
    let mut huge = vec![0u8, 0, 0x30, 0, 0];
    huge.extend(std::iter::repeat_n(0u8, 2 << 20));
    let answer = raw_call(&channel, Bytes::from(huge)).await;
    assert_eq!(answer.status, "8", "RESOURCE_EXHAUSTED: {answer:?}");
    assert!(
        answer.message.contains("budget"),
        "the reason names the budget: {}",
        answer.message
    );
}
