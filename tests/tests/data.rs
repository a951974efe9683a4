//! Data integrity and half-close through client -> server -> agent ->
//! destination, in one process over real TLS on loopback.

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
    let state = server.state().clone();
    wait_until(
        "the server has no open connection left",
        Duration::from_secs(10),
        || {
            let n = state.open_connections();
            async move { n == 0 }
        },
    )
    .await;
    let metrics = fetch_metrics(server.admin_addr).await;
    assert_eq!(
        metric(
            &metrics,
            r#"tunnel_server_bytes_total{cluster="east",direction="to_cluster"}"#
        ),
        Some(SIZE as f64),
        "{metrics}"
    );
}
