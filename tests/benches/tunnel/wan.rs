//! `wan`: one stream over an emulated WAN against a plain TCP connection
//! through an identical relay, each direction.

use super::*;

/// Each WAN transfer runs this long, or until [`WAN_MAX_BYTES`].
pub(crate) const WAN_SECS: Duration = Duration::from_secs(5);
pub(crate) const WAN_MAX_BYTES: u64 = 500_000_000;
pub(crate) const WAN_DEADLINE: Duration = Duration::from_secs(60);

/// Sends for [`WAN_SECS`] (or [`WAN_MAX_BYTES`]) into a sink and waits for
/// its acknowledgement; Gbit/s over the whole transfer.
pub(crate) async fn timed_upload(ep: Endpoint) -> Result<f64, String> {
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < WAN_SECS && sent < WAN_MAX_BYTES {
        let n = buf.len().min((WAN_MAX_BYTES - sent) as usize);
        tcp.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        sent += n as u64;
    }
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack)
        .await
        .map_err(|e| format!("the sink's acknowledgement: {e}"))?;
    Ok(gbps(sent, start.elapsed()))
}

/// Reads a source (see [`start_source`]) to its end; Gbit/s from connect.
pub(crate) async fn timed_download(ep: Endpoint) -> Result<f64, String> {
    let start = Instant::now();
    let mut tcp = ep.try_connect(SocketBuffers::default()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => return Err(format!("read after {got} bytes: {e}")),
        }
    }
    if got == 0 {
        return Err("the connection ended before any data".into());
    }
    Ok(gbps(got, start.elapsed()))
}

/// One stream over an emulated WAN (25 ms each way, 1 Gbit/s) between the
/// agent and the server, against a plain TCP connection through an
/// identical relay; each direction. `wan_ratio` is the worse direction.
pub(crate) async fn wan(pki: &Pki, services: &Services) -> Extras {
    use tunnel_tests::wan::{Link, WanRelay};
    let link = Link::wan_1g_25ms();
    let mut out = Extras::new();
    let mut messages = Vec::new();
    let mut run = async |what: &'static str, f: Result<f64, String>| -> Option<f64> {
        match f {
            Ok(g) => {
                eprintln!("[wan] {what}: {g:.3} Gbit/s");
                Some(g)
            }
            Err(e) => {
                eprintln!("[wan] {what}: {e}");
                messages.push(e);
                None
            }
        }
    };
    eprintln!("[wan] direct TCP through the relay, {WAN_SECS:?} each way");
    let to_sink = WanRelay::start(services.sink, link).await.expect("relay");
    let direct_up = run(
        "direct up",
        within(
            "direct up",
            WAN_DEADLINE,
            timed_upload(Endpoint::Tcp(to_sink.addr)),
        )
        .await,
    )
    .await;
    let to_source = WanRelay::start(services.source, link).await.expect("relay");
    let direct_down = run(
        "direct down",
        within(
            "direct down",
            WAN_DEADLINE,
            timed_download(Endpoint::Tcp(to_source.addr)),
        )
        .await,
    )
    .await;
    drop((to_sink, to_source));

    eprintln!("[wan] one tunnelled stream, the agent dialing through the relay");
    let sys = System::start_with(pki, None, Some(link), None).await;
    let client = client(pki, "bench", sys.client_addr);
    client.ensure_connected().await.expect("client connects");
    let path = tunnel_path(services, client).await;
    let tunnel_up = run(
        "tunnel up",
        within("tunnel up", WAN_DEADLINE, timed_upload(path.sink)).await,
    )
    .await;
    let tunnel_down = run(
        "tunnel down",
        within("tunnel down", WAN_DEADLINE, timed_download(path.source)).await,
    )
    .await;
    if tunnel_up.is_none() || tunnel_down.is_none() {
        sys.print_logs("wan");
    }
    drop(sys);

    let ratio = |t: Option<f64>, d: Option<f64>| match (t, d) {
        (Some(t), Some(d)) if d > 0.0 => t / d,
        _ => 0.0,
    };
    let (up, down) = (ratio(tunnel_up, direct_up), ratio(tunnel_down, direct_down));
    out.push(("wan_ratio", num(up.min(down))));
    out.push(("wan_up_ratio", num(up)));
    out.push(("wan_down_ratio", num(down)));
    out.push(("wan_direct_up_gbps", Extra::Num(direct_up)));
    out.push(("wan_direct_down_gbps", Extra::Num(direct_down)));
    out.push(("wan_tunnel_up_gbps", Extra::Num(tunnel_up)));
    out.push(("wan_tunnel_down_gbps", Extra::Num(tunnel_down)));
    if !messages.is_empty() {
        out.push(("wan_message", Extra::Text(messages.join("; "))));
    }
    out
}
