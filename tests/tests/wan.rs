//! The user-space WAN emulator (`tunnel_tests::wan`) and a tunnel over it:
//! the relay delays, carries bytes intact in both directions at once,
//! carries a FIN as a FIN and a reset as a reset; an agent that reaches the
//! server only over the emulated WAN carries connections intact.
//!
//! Only lower bounds the relay enforces by construction are asserted (a
//! round trip cannot be shorter than twice the one-way delay); speed over
//! the WAN belongs to the benchmark (`wan_ratio`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::client::Target;
use tunnel_tests::wan::{Link, WanRelay};
use tunnel_tests::*;

const MIB: usize = 1024 * 1024;
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wan_relay_delays_and_carries_data_fin_and_reset() {
    init();
    let link = Link::wan_1g_25ms();

    // Data both ways at once, then FINs both ways.
    let (dest, mut seen) = start_exchange(4 * MIB, 1).await;
    let relay = WanRelay::start(dest, link).await.unwrap();
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let mine = tokio::time::timeout(DEADLINE, exchange(tcp, 4 * MIB, 2))
        .await
        .expect("4 MiB each way through the relay")
        .unwrap();
    let theirs = seen.recv().await.unwrap().unwrap();
    assert_eq!(mine.received, 4 * MIB);
    assert_eq!(mine.received_hash, theirs.sent_hash);
    assert_eq!(theirs.received, 4 * MIB);
    assert_eq!(theirs.received_hash, mine.sent_hash);

    // A round trip takes at least the two one-way delays.
    let echo = start_echo().await;
    let relay = WanRelay::start(echo, link).await.unwrap();
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    let started = Instant::now();
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(DEADLINE, tcp.read_exact(&mut back))
        .await
        .expect("echo through the relay")
        .unwrap();
    assert!(
        started.elapsed() >= 2 * link.delay,
        "a round trip took {:?}, less than twice the one-way delay",
        started.elapsed()
    );

    // A reset on one side reaches the other as a reset.
    let (tx, mut endings) = tokio::sync::mpsc::unbounded_channel();
    let dest = start_service(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut b = [0u8; 1];
            if tcp.read_exact(&mut b).await.is_ok() && tcp.write_all(b"k").await.is_ok() {
                let _ = tx.send(read_ending(&mut tcp, DEADLINE).await);
            }
        }
    })
    .await;
    let relay = WanRelay::start(dest, link).await.unwrap();
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut k = [0u8; 1];
    tcp.read_exact(&mut k).await.unwrap();
    reset(tcp);
    let ending = tokio::time::timeout(DEADLINE, endings.recv())
        .await
        .expect("the destination reports")
        .unwrap();
    assert_eq!(ending, Ending::Reset(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_agent_reaches_the_server_over_a_wan_carries_data_intact() {
    const SIZE: usize = 16 * MIB;
    init();
    let pki = Pki::new(&["east"], &["app"]);
    let server = start_server(&pki).await;
    let relay = WanRelay::start(server.agent_addr, Link::wan_1g_25ms())
        .await
        .unwrap();
    let _agent = start_agent_with(agent_config(&pki, "east", &[relay.addr]), &server).await;
    let (dest, mut seen) = start_exchange(SIZE, 3).await;
    let client = client(&pki, "app", server.client_addr);
    let port = forward_port(client, Target::new("east", "127.0.0.1", dest.port())).await;
    let tcp = TcpStream::connect(port).await.unwrap();
    let started = Instant::now();
    let mine = tokio::time::timeout(DEADLINE, exchange(tcp, SIZE, 4))
        .await
        .expect("16 MiB each way over the WAN within 60 s")
        .unwrap();
    let theirs = seen.recv().await.unwrap().unwrap();
    assert_eq!(mine.received, SIZE);
    assert_eq!(mine.received_hash, theirs.sent_hash);
    assert_eq!(theirs.received, SIZE);
    assert_eq!(theirs.received_hash, mine.sent_hash);
    println!(
        "16 MiB each way over the WAN in {:?} ({:.0} MiB/s per direction)",
        started.elapsed(),
        mib_per_s(SIZE, started.elapsed())
    );
}
