//! One stalled connection must not slow another on the same agent: each
//! proxied connection is its own HTTP/2 stream with its own flow control.
//! (Alone in its test binary so no other test shares the CPU while it
//! measures; the benchmark measures the real figure.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_tests::*;

const MIB: usize = 1024 * 1024;
/// What connection B moves each way per run.
const MOVED: usize = 64 * MIB;
/// What the stalled connection's destination tries to write; far more than
/// every buffer and window on the path holds, so it blocks.
const STALL_WRITE: usize = 128 * MIB;

/// Moves [`MOVED`] each way through `port` to an exchange destination and
/// returns the rate, after checking both checksums.
async fn moved_rate(
    port: std::net::SocketAddr,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Exchanged>>,
    run: &str,
) -> f64 {
    let tcp = TcpStream::connect(port).await.unwrap();
    let started = Instant::now();
    let mine = tokio::time::timeout(Duration::from_secs(120), exchange(tcp, MOVED, 11))
        .await
        .unwrap_or_else(|_| panic!("{run}: 64 MiB each way within 120 s"))
        .unwrap_or_else(|e| panic!("{run}: {e}"));
    let elapsed = started.elapsed();
    let theirs = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .unwrap_or_else(|_| panic!("{run}: the destination reports"))
        .expect("a report")
        .unwrap_or_else(|e| panic!("{run}: destination: {e}"));
    assert_eq!(mine.received, MOVED, "{run}: bytes from the destination");
    assert_eq!(mine.received_hash, theirs.sent_hash, "{run}: checksum back");
    assert_eq!(theirs.received, MOVED, "{run}: bytes to the destination");
    assert_eq!(
        theirs.received_hash, mine.sent_hash,
        "{run}: checksum there"
    );
    let rate = mib_per_s(MOVED, elapsed);
    println!("{run}: 64 MiB each way in {elapsed:?} ({rate:.0} MiB/s)");
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_slow_another_connection() {
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let _agent = start_agent(&pki, "east", &server).await;
    let client = client(&pki, "app", server.client_addr);

    // Connection B's destination: its own stream back while reading ours.
    let (moving, mut seen) = start_exchange(MOVED, 22).await;
    let b_port = forward_port(
        client.clone(),
        Target::new("east", "127.0.0.1", moving.port()),
    )
    .await;
    // Connection A's destination writes as fast as it can, counting.
    let written = Arc::new(AtomicU64::new(0));
    let (a_tx, mut a_sent) = tokio::sync::mpsc::unbounded_channel();
    let flooding = {
        let written = written.clone();
        start_service(move |tcp| {
            let written = written.clone();
            let a_tx = a_tx.clone();
            async move {
                let mut w = Counted::new(tcp, written);
                let res = write_random(&mut w, STALL_WRITE, 33).await;
                let _ = w.shutdown().await;
                let _ = a_tx.send(res);
            }
        })
        .await
    };
    let a_port = forward_port(client, Target::new("east", "127.0.0.1", flooding.port())).await;

    let before = moved_rate(b_port, &mut seen, "unstalled, before").await;

    // A: the client reads nothing while the destination writes into it.
    let mut stalled = TcpStream::connect(a_port).await.unwrap();
    let mut last = 0;
    let mut steady_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::Relaxed);
        if now != last || now == 0 {
            last = now;
            steady_since = Instant::now();
        } else if steady_since.elapsed() > Duration::from_millis(750) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connection's destination never blocked (wrote {now} bytes)"
        );
    }
    let pending = written.load(Ordering::Relaxed) as usize;
    assert!(
        (4 * MIB..STALL_WRITE).contains(&pending),
        "the stalled connection should hold megabytes and block its writer; it took {pending} bytes"
    );
    println!("stalled connection: {} MiB pending", pending / MIB);

    let during = moved_rate(b_port, &mut seen, "while A is stalled").await;
    // Stream windows adapt per tunnel connection: B's throughput may raise
    // them, and A, on the same connections, gets the raise too. So A may take
    // in more, but at most one larger window per hop, never the rest.
    let after = written.load(Ordering::Relaxed) as usize;
    let most = pending + 2 * tunnel_proto::h2::DEFAULT_MAX_STREAM_WINDOW as usize;
    assert!(
        after <= most,
        "A must stay stalled while B runs: its destination wrote {after} bytes, {pending} before B ran (at most {most})"
    );
    println!(
        "stalled connection while B ran: {} MiB pending",
        after / MIB
    );

    // A resumes and gets every byte, in order.
    let (got, hash) = tokio::time::timeout(Duration::from_secs(120), read_hash(&mut stalled))
        .await
        .expect("the stalled connection drains within 120 s once read")
        .expect("reading the stalled connection");
    let sent = tokio::time::timeout(Duration::from_secs(10), a_sent.recv())
        .await
        .expect("A's destination finishes")
        .expect("a report")
        .expect("A's destination wrote everything");
    assert_eq!(got, STALL_WRITE, "bytes of the stalled connection");
    assert_eq!(hash, sent, "checksum of the stalled connection");

    let after = moved_rate(b_port, &mut seen, "unstalled, after").await;
    let ratio = during / ((before + after) / 2.0);
    println!("stalled/unstalled ratio: {ratio:.2}");
    assert!(
        ratio >= 0.5,
        "B moved {during:.0} MiB/s while A was stalled, against {before:.0} and {after:.0} MiB/s unstalled (ratio {ratio:.2})"
    );
}
