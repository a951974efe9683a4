//! Data integrity, half-close and aborts through client -> server -> agent
//! -> destination, in one process over real TLS on loopback: a FIN travels
//! as a FIN, a reset as a reset, on the sidecar's port, its CONNECT and the
//! client library's port.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_tests::*;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_mib_each_way_at_once_arrive_intact() {
    const SIZE: usize = 256 * MIB;
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    // The destination sends its own stream, not an echo, so a tunnel that
    // crossed or looped the directions would fail the checksums.
    let (dest, mut seen) = start_exchange(SIZE, 0xdead).await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", dest.port())).await;

    let started = Instant::now();
    let tcp = TcpStream::connect(port).await.unwrap();
    let mine = tokio::time::timeout(Duration::from_secs(300), exchange(tcp, SIZE, 0xbeef))
        .await
        .expect("256 MiB each way within 300 s")
        .expect("client side of the exchange");
    let elapsed = started.elapsed();
    let theirs = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the destination reports its side")
        .expect("one report")
        .expect("destination side of the exchange");

    assert_eq!(mine.received, SIZE, "bytes from the destination");
    assert_eq!(
        mine.received_hash, theirs.sent_hash,
        "checksum from the destination"
    );
    assert_eq!(theirs.received, SIZE, "bytes to the destination");
    assert_eq!(
        theirs.received_hash, mine.sent_hash,
        "checksum to the destination"
    );
    println!(
        "256 MiB each way in {elapsed:?} ({:.0} MiB/s per direction)",
        mib_per_s(SIZE, elapsed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_closes_first_and_still_receives_everything() {
    const SIZE: usize = 8 * MIB;
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    // A destination that says goodbye and shuts its write side at once,
    // then keeps reading to the client's FIN.
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let dest = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            tcp.write_all(b"bye from the destination\n").await.unwrap();
            tcp.shutdown().await.unwrap();
            let _ = tx.send(read_hash(&mut tcp).await);
        }
    })
    .await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", dest.port())).await;

    let mut tcp = TcpStream::connect(port).await.unwrap();
    // The destination's FIN reaches the client before it has sent anything.
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut greeting))
        .await
        .expect("the destination's data and FIN arrive")
        .unwrap();
    assert_eq!(greeting, b"bye from the destination\n");
    // The other direction still flows.
    let sent = tokio::time::timeout(Duration::from_secs(60), async {
        let hash = write_random(&mut tcp, SIZE, 7).await?;
        tcp.shutdown().await?;
        Ok::<_, std::io::Error>(hash)
    })
    .await
    .expect("the client can still send 8 MiB after the destination's FIN")
    .expect("writing after the peer's FIN");
    let (received, hash) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("the destination reads to the client's FIN")
        .expect("one report")
        .expect("destination read");
    assert_eq!(received, SIZE, "bytes the destination received");
    assert_eq!(hash, sent, "checksum at the destination");
    // Both FINs went through: the connection ends cleanly on every hop.
    wait_all_closed(&server).await;
    assert_bytes_to_east(&server, SIZE as u64).await;
}

/// The server's metrics count `bytes` sent towards cluster `east`.
async fn assert_bytes_to_east(server: &tunnel_server::Server, bytes: u64) {
    let metrics = fetch_metrics(server.admin_addr).await;
    assert_eq!(
        metric(
            &metrics,
            r#"tunnel_server_bytes_total{cluster="east",direction="to_cluster"}"#
        ),
        Some(bytes as f64),
        "{metrics}"
    );
}

/// A tracing layer that notes, for each close audit line of the server in
/// `server`, how many connections it counted as open while it was written.
#[derive(Clone, Default)]
struct CloseAudit {
    server: Arc<OnceLock<Arc<tunnel_server::ServerState>>>,
    open_while_written: Arc<Mutex<Vec<usize>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CloseAudit {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct IsClose(bool);
        impl tracing::field::Visit for IsClose {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "event" && value == "close" {
                    self.0 = true;
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "event" && format!("{value:?}") == "\"close\"" {
                    self.0 = true;
                }
            }
        }
        if event.metadata().target() != "tunnel_server::audit" {
            return;
        }
        let mut close = IsClose(false);
        event.record(&mut close);
        if let (true, Some(server)) = (close.0, self.server.get()) {
            self.open_while_written
                .lock()
                .unwrap()
                .push(server.open_connections());
        }
    }
}

/// Whoever waits until no connection is open (the drain, a test reading the
/// metrics) finds every closed one recorded: its bytes and close audit line
/// are in before it stops counting as open.
#[test]
fn a_connection_is_recorded_before_it_stops_counting_as_open() {
    use tracing_subscriber::layer::SubscriberExt;
    init();
    let audit = CloseAudit::default();
    // One thread: the server's tasks, and so the records' drops, run under
    // this thread's subscriber.
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(audit.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pki = Pki::new(&["east"], &["app"]);
        let server = start_server(&pki).await;
        let _ = audit.server.set(server.state().clone());
        let _agent = start_agent(&pki, "east", &server).await;
        let echo = start_echo().await;
        let client = client(&pki, "app", server.client_addr);
        let port = forward_port(client, Target::new("east", "127.0.0.1", echo.port())).await;
        check_echo(port, MIB).await;
        wait_all_closed(&server).await;
        assert_bytes_to_east(&server, MIB as u64).await;
    });
    assert_eq!(
        *audit.open_while_written.lock().unwrap(),
        [1],
        "one close audit line, written while its connection still counted as open"
    );
}

// ---------------------------------------------------------------------------
// Aborts: a reset (RST) from either end reaches the other end as a reset,
// never as a clean end of data, on every path an app uses.

/// Deadline of each step of the abort tests: only a hang misses it.
const ABORT_DEADLINE: Duration = Duration::from_secs(20);

/// A server, an agent of `east`, a sidecar (per-cluster port to `dest` and
/// its proxy) and the client library's own port to `dest`.
struct AbortPaths {
    _pki: Pki,
    _server: tunnel_server::Server,
    _agent: tunnel_agent::Agent,
    _sidecar: tunnel_sidecar::Sidecar,
    sidecar_port: std::net::SocketAddr,
    proxy: std::net::SocketAddr,
    library_port: std::net::SocketAddr,
    dest: std::net::SocketAddr,
}

impl AbortPaths {
    async fn start(dest: std::net::SocketAddr) -> Self {
        init();
        let pki = Pki::new(&["east"], &["app"]);
        let server = start_server(&pki).await;
        let agent = start_agent(&pki, "east", &server).await;
        let sidecar = start_sidecar(
            &pki,
            "app",
            server.client_addr,
            &[format!("east:127.0.0.1:{}", dest.port())],
        )
        .await;
        let library_port = forward_port(
            client(&pki, "app", server.client_addr),
            Target::new("east", "127.0.0.1", dest.port()),
        )
        .await;
        Self {
            sidecar_port: sidecar.port_addrs[0],
            proxy: sidecar.proxy_addr.expect("proxy"),
            library_port,
            dest,
            _pki: pki,
            _server: server,
            _agent: agent,
            _sidecar: sidecar,
        }
    }

    const NAMES: [&'static str; 3] = [
        "the sidecar's per-cluster port",
        "the sidecar's CONNECT",
        "the client library's port",
    ];

    /// A new connection to `dest` on path `i` of [`Self::NAMES`].
    async fn open(&self, i: usize) -> TcpStream {
        match i {
            0 => TcpStream::connect(self.sidecar_port).await.unwrap(),
            1 => {
                let mut tcp = TcpStream::connect(self.proxy).await.unwrap();
                connect_on(&mut tcp, "east", "127.0.0.1", self.dest.port())
                    .await
                    .expect("CONNECT answered 200");
                tcp
            }
            _ => TcpStream::connect(self.library_port).await.unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_reaches_the_destination_as_a_reset() {
    // The destination answers "ok" to the client's "hello" (so the client
    // knows the whole path is up), then reads until the connection ends.
    let (tx, mut endings) = tokio::sync::mpsc::unbounded_channel();
    let dest = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut hello = [0u8; 5];
            if tcp.read_exact(&mut hello).await.is_ok() && tcp.write_all(b"ok").await.is_ok() {
                let _ = tx.send(read_ending(&mut tcp, ABORT_DEADLINE).await);
            }
        }
    })
    .await;
    let paths = AbortPaths::start(dest).await;
    let mut failures = Vec::new();
    for (i, name) in AbortPaths::NAMES.iter().enumerate() {
        let mut tcp = paths.open(i).await;
        tcp.write_all(b"hello").await.unwrap();
        let mut ok = [0u8; 2];
        tokio::time::timeout(ABORT_DEADLINE, tcp.read_exact(&mut ok))
            .await
            .unwrap_or_else(|_| panic!("{name}: the destination answers"))
            .unwrap();
        reset(tcp);
        let ending = tokio::time::timeout(ABORT_DEADLINE + Duration::from_secs(5), endings.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: the destination reports"))
            .expect("a report");
        println!("{name}: the destination saw {ending:?}");
        if ending != Ending::Reset(0) {
            failures.push(format!(
                "{name}: the client reset; the destination saw {ending:?} instead of a reset"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_reset_reaches_the_client_as_a_reset() {
    // The destination greets, waits for the client's "ok", then resets.
    let dest = start_service(|mut tcp| async move {
        if tcp.write_all(b"hello").await.is_ok() {
            let mut ok = [0u8; 2];
            if tcp.read_exact(&mut ok).await.is_ok() {
                reset(tcp);
            }
        }
    })
    .await;
    let paths = AbortPaths::start(dest).await;
    let mut failures = Vec::new();
    for (i, name) in AbortPaths::NAMES.iter().enumerate() {
        let mut tcp = paths.open(i).await;
        let mut hello = [0u8; 5];
        tokio::time::timeout(ABORT_DEADLINE, tcp.read_exact(&mut hello))
            .await
            .unwrap_or_else(|_| panic!("{name}: the destination greets"))
            .unwrap();
        tcp.write_all(b"ok").await.unwrap();
        let ending = read_ending(&mut tcp, ABORT_DEADLINE).await;
        println!("{name}: the client saw {ending:?}");
        if ending != Ending::Reset(0) {
            failures.push(format!(
                "{name}: the destination reset; the client saw {ending:?} instead of a reset"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
