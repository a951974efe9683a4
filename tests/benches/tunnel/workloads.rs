//! The per-path workloads: throughput, first byte, round trips, idle
//! connections, and throughput beside one stalled connection.

use super::*;

// ---------------------------------------------------------------- workloads

/// Sends `bytes` and waits for the sink's acknowledgement; returns Gbit/s.
pub(crate) async fn send_bytes(ep: Endpoint, bytes: u64) -> f64 {
    try_send_bytes(ep, bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) async fn try_send_bytes(ep: Endpoint, bytes: u64) -> Result<f64, String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        tcp.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack)
        .await
        .map_err(|e| format!("the sink's acknowledgement: {e}"))?;
    Ok(gbps(bytes, start.elapsed()))
}

/// The median throughput of `runs` transfers of `bytes` to `ep`'s sink.
pub(crate) async fn median_send(ep: Endpoint, bytes: u64, runs: usize) -> Result<f64, String> {
    let mut gbps = Vec::with_capacity(runs);
    for _ in 0..runs {
        gbps.push(try_send_bytes(ep, bytes).await?);
    }
    gbps.sort_by(f64::total_cmp);
    Ok(gbps[gbps.len() / 2])
}

pub(crate) fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

pub(crate) async fn multi_stream(ep: Endpoint) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..MULTI_STREAMS)
        .map(|_| tokio::spawn(send_bytes(ep, MULTI_BYTES_EACH)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    gbps(MULTI_BYTES_EACH * MULTI_STREAMS as u64, start.elapsed())
}

pub(crate) fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// New connection to first byte, sequentially; returns (p50, p99) in µs.
pub(crate) async fn first_byte(ep: Endpoint) -> (f64, f64) {
    first_byte_n(ep, FIRST_BYTE_CONNS)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) async fn first_byte_n(ep: Endpoint, n: usize) -> Result<(f64, f64), String> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b)
            .await
            .map_err(|e| format!("first byte: {e}"))?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
}

/// 64-byte request/response on one open connection; (p50, p99) in µs.
pub(crate) async fn round_trips(ep: Endpoint) -> (f64, f64) {
    round_trips_n(ep, RTT_ROUNDS)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) async fn round_trips_n(ep: Endpoint, rounds: usize) -> Result<(f64, f64), String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..200 + rounds {
        let start = Instant::now();
        tcp.write_all(&msg)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tcp.read_exact(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        // The first 200 warm up.
        if i >= 200 {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
}

/// Opens IDLE_CONNS connections that each completed one round trip, then
/// returns them (kept open by the caller while memory is read).
pub(crate) async fn open_idle(ep: Endpoint) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(IDLE_CONNS);
    for _ in 0..IDLE_CONNS {
        let mut tcp = ep.connect().await;
        tcp.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        conns.push(tcp);
    }
    conns
}

/// Throughput of one connection while another's reader is stalled with
/// megabytes pending, as a ratio to the same transfer without the stall.
pub(crate) async fn stalled_ratio(p: &Path_) -> f64 {
    let unstalled = send_bytes(p.sink, ISOLATION_BYTES).await;
    let stalled = p.flood.connect().await;
    // Let the flood fill every buffer on the way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let with_stall = send_bytes(p.sink, ISOLATION_BYTES).await;
    drop(stalled);
    with_stall / unstalled
}
