//! A destination is judged by whether it answers, not by whether it reads.
//!
//! The agent's `--dead-peer-timeout` finds a destination that vanished with
//! data on its way to it, but a destination that is alive and merely stops
//! reading (its window closed) keeps its connection however long it
//! pauses: Linux's `TCP_USER_TIMEOUT` would reset it after the timeout even
//! though the peer answers every window probe, so the agent does not set it
//! on destination sockets and watches the peer itself
//! (`tunnel_proto::net::peer`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_agent::allowlist::Allowlist;
use tunnel_proto::client::Target;
use tunnel_proto::net::Liveness;
use tunnel_tests::*;

/// The agent's dead-peer timeout in these tests.
const DEAD_PEER: Duration = Duration::from_secs(2);
/// How long the destination stops reading: several dead-peer timeouts.
const PAUSE: Duration = Duration::from_secs(8);
/// Bytes sent towards the pausing destination: more than every buffer on
/// the way holds, so that the destination's window closes.
const SENT: usize = 48 * 1024 * 1024;
/// How long a vanished destination may take to be found: the dead-peer
/// timeout and the watch's checks, with room for a loaded machine (the
/// kernel alone would take many minutes).
const LIMIT: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_reading_longer_than_the_dead_peer_timeout_keeps_its_connection() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let mut config = agent_config(&pki, "east", &[server.agent_addr]);
    config.h2.liveness = Liveness::from_timeout(DEAD_PEER);
    let agent = start_agent_with(config, &server).await;

    // Accepts, reads nothing for PAUSE, then reads to the end and answers
    // with the count.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let destination = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(PAUSE).await;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(err) => return Err(format!("after {total} bytes: {err}")),
            }
        }
        tcp.write_all(&total.to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        Ok(total)
    });

    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", dest.port())).await;
    let mut tcp = TcpStream::connect(port).await.unwrap();
    let started = Instant::now();
    let chunk = vec![0x42u8; 1024 * 1024];
    for _ in 0..SENT / chunk.len() {
        tcp.write_all(&chunk)
            .await
            .expect("the connection towards a pausing destination stays open");
    }
    assert!(
        started.elapsed() >= PAUSE - Duration::from_secs(1),
        "the writes never waited for the destination ({:?}): its window never closed, so this test proves nothing",
        started.elapsed()
    );
    tcp.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(60), tcp.read_exact(&mut count))
        .await
        .expect("the destination answers")
        .expect("the destination's count arrives");
    assert_eq!(u64::from_be_bytes(count), SENT as u64);
    assert_eq!(destination.await.unwrap(), Ok(SENT as u64));
    let metrics = fetch_metrics(agent.admin_addr).await;
    assert_eq!(
        metric(&metrics, "tunnel_agent_destinations_gone_total"),
        Some(0.0),
        "a destination that only paused is not counted as gone"
    );
}

/// A destination on `0.0.0.0:port`, run inside the namespace: says
/// `accepted` for each connection, then reads everything (`reads`) or, with
/// a small receive buffer, nothing at all (`never-reads`).
const DESTINATION_PY: &str = r#"
import socket, sys, time
mode = sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if mode == "never-reads":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
print("listening", flush=True)
held = []
while True:
    c, _ = s.accept()
    print("accepted", flush=True)
    if mode == "never-reads":
        held.append(c)
        continue
    try:
        while c.recv(1 << 20):
            pass
    except OSError:
        pass
    c.close()
"#;

/// The port of [`DESTINATION_PY`] in the namespace.
const NS_PORT: u16 = 7071;

/// A server and an agent (with [`DEAD_PEER`]) in this namespace, a
/// destination in `ns` (see [`DESTINATION_PY`]), and a forwarding port to it.
struct VanishingDestination {
    ns: NetNs,
    destination: Proc,
    port: SocketAddr,
    _server: tunnel_server::Server,
    agent: tunnel_agent::Agent,
}

impl VanishingDestination {
    async fn start(mode: &str) -> Self {
        init();
        let ns = NetNs::create();
        let pki = Pki::new(&["east"], &["app"]);
        let server = start_server(&pki).await;
        let mut config = agent_config(&pki, "east", &[server.agent_addr]);
        config.h2.liveness = Liveness::from_timeout(DEAD_PEER);
        config.allowlist = Allowlist::parse(&[format!("{}/32", ns.cluster_ip)]).unwrap();
        let agent = start_agent_with(config, &server).await;
        let mut cmd = ns.command(tunnel_tests::netns::python3());
        cmd.args(["-c", DESTINATION_PY, &NS_PORT.to_string(), mode]);
        let destination = Proc::spawn_command("destination", cmd);
        destination
            .wait_log(&["listening"], 1, Duration::from_secs(20))
            .await;
        let client = client(&pki, "app", server.client_addr);
        let target = Target::new("east", ns.cluster_ip.to_string(), NS_PORT);
        let port = forward_port(client, target).await;
        Self {
            ns,
            destination,
            port,
            _server: server,
            agent,
        }
    }

    /// The agent's count of connections reset because their destination was gone.
    async fn destinations_gone(&self) -> Option<f64> {
        let body = fetch_metrics(self.agent.admin_addr).await;
        metric(&body, "tunnel_agent_destinations_gone_total")
    }

    /// A connection through the tunnel that the destination accepted.
    async fn connect(&self) -> TcpStream {
        let tcp = TcpStream::connect(self.port).await.unwrap();
        self.destination
            .wait_log(&["accepted"], 1, Duration::from_secs(20))
            .await;
        tcp
    }

    /// The destination's host vanishes ([`NetNs::vanish`]).
    fn vanish(&self) -> Instant {
        self.ns.vanish().expect("the destination's link goes down");
        Instant::now()
    }
}

/// Reads `rd` until the connection ends, which it must within `limit` and
/// not before `silent` since `vanished`.
async fn ends_in_time(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    vanished: Instant,
    silent: Duration,
    limit: Duration,
) {
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(limit, rd.read(&mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!("the connection to a vanished destination did not end within {limit:?}")
        });
    assert!(
        !matches!(ended, Ok(n) if n > 0),
        "the destination never answers: {ended:?}"
    );
    let took = vanished.elapsed();
    assert!(
        took >= silent,
        "ended after {took:?}, before {silent:?}: something else cut it ({ended:?})"
    );
    println!("vanished destination found after {took:?}: {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_vanishes_with_data_on_its_way_is_reset_within_the_dead_peer_timeout() {
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let dest = VanishingDestination::start("reads").await;
    let (mut rd, mut wr) = dest.connect().await.into_split();
    // Data flows; then the destination's host vanishes.
    let writer = tokio::spawn(async move {
        let chunk = vec![0x17u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            if let Err(err) = wr.write_all(&chunk).await {
                return (total, err);
            }
            total += chunk.len() as u64;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let vanished = dest.vanish();
    // The agent resets the connection: the client reads a reset (or an
    // end), and its writes fail, well before the kernel's own limit
    // (15 retransmissions, many minutes).
    // Its silence counts from its last answer, a few milliseconds (the
    // writer's pace) before its link went down.
    let silent = DEAD_PEER - Duration::from_millis(100);
    ends_in_time(&mut rd, vanished, silent, Duration::from_secs(20)).await;
    let (sent, err) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer fails once the connection ended")
        .unwrap();
    assert!(
        sent > 0,
        "no data flowed before the destination vanished: {err}"
    );
    assert_eq!(
        dest.destinations_gone().await,
        Some(1.0),
        "the agent counts the reset in tunnel_agent_destinations_gone_total"
    );
}

/// A request written in one go (the agent's write never waits) to a
/// destination that vanished, and then nothing more: found all the same,
/// while the client waits for an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_vanished_destination_is_reset_within_the_dead_peer_timeout() {
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let dest = VanishingDestination::start("reads").await;
    let mut tcp = dest.connect().await;
    let vanished = dest.vanish();
    tcp.write_all(&[0x42; 1024]).await.unwrap();
    // Nothing acknowledges the request: reset once that lasted the timeout.
    ends_in_time(&mut tcp, vanished, DEAD_PEER, LIMIT).await;
}

/// A destination that stopped reading (its window closed on a few bytes
/// that wait in the agent's socket, the agent's write long done), then
/// vanished: its window probes go unanswered, and it is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_vanishes_while_its_window_is_closed_is_reset() {
    if !is_root() {
        println!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let dest = VanishingDestination::start("never-reads").await;
    let mut tcp = dest.connect().await;
    // More than its window, far less than the agent's socket takes.
    tcp.write_all(&[0x42; 8 * 1024]).await.unwrap();
    // Alive and not reading for a moment (its probes answered, backing off
    // from 0.2 s): the connection holds.
    let mut buf = [0u8; 16];
    let held = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
    assert!(
        held.is_err(),
        "cut while the destination was alive: {held:?}"
    );
    let vanished = dest.vanish();
    // Its silence is counted from its last answer, before it vanished.
    ends_in_time(&mut tcp, vanished, Duration::ZERO, LIMIT).await;
}
