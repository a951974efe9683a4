//! The `tunnel-sidecar` binary: run the sidecar, or `probe` and `wait-ready`,
//! the commands the pod's probes and hooks run against its admin port.

use std::net::SocketAddr;

use crate::{Sidecar, config};

/// Runs the command line: the binary's whole `main`. Exits on SIGTERM,
/// Ctrl-C or `POST /shutdown`.
pub async fn main(cli: config::Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(config::Command::WaitReady { timeout }) => {
            return wait_ready(cli.admin_listen, timeout).await;
        }
        Some(config::Command::Probe { check, timeout }) => {
            return probe(cli.admin_listen, check, timeout).await;
        }
        None => {}
    }
    let config = cli.resolve()?;
    tunnel_shell::logging::init_logging(config.log_format, &config.log_level);
    let sidecar = Sidecar::start(config).await?;
    let requested = sidecar.shutdown_requested.clone();
    tokio::select! {
        () = tunnel_shell::process::termination_signal() => {}
        () = requested.cancelled() => tracing::info!("shutdown requested on the admin port"),
    }
    sidecar.shutdown().await;
    Ok(())
}

/// The admin address a command of this pod talks to: `--admin-listen`, with
/// a wildcard address replaced by loopback (the command runs in the pod).
fn local_admin(admin: Option<SocketAddr>) -> SocketAddr {
    let mut addr =
        admin.unwrap_or_else(|| config::DEFAULT_ADMIN_LISTEN.parse().expect("valid default"));
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Most of an admin answer a command reads.
const MAX_ADMIN_ANSWER: u64 = 64 * 1024;

/// One `GET path` to the admin port at `addr`: the status and the body.
async fn admin_get(
    addr: SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        tcp.take(MAX_ADMIN_ANSWER).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{addr} answered no HTTP/1.1 status line"))?;
    Ok((status, body.trim_end().to_owned()))
}

/// `tunnel-sidecar wait-ready`: polls the sidecar's `/readyz` until it answers
/// 200 or `timeout` passes.
async fn wait_ready(admin: Option<SocketAddr>, timeout: std::time::Duration) -> anyhow::Result<()> {
    let addr = local_admin(admin);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let once = admin_get(addr, "/readyz", std::time::Duration::from_secs(2)).await;
        if matches!(once, Ok((200, _))) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the sidecar at {addr} was not ready within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `tunnel-sidecar probe readyz|healthz`: one request; its body on stdout
/// and `Ok` for a 200, an error saying what was answered otherwise (the
/// kubelet shows a failed exec probe's output in the pod's events).
async fn probe(
    admin: Option<SocketAddr>,
    check: config::ProbeCheck,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let addr = local_admin(admin);
    let path = check.path();
    let (status, body) = admin_get(addr, path, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("probe {path}: {e:#}"))?;
    anyhow::ensure!(
        status == 200,
        "probe {path}: the sidecar at {addr} answered {status}: {body}"
    );
    println!("{body}");
    Ok(())
}
