//! The `health` command, like `clusteradm proxy health`: for every cluster,
//! whether the addon is installed (a `ManagedClusterAddOn` on the hub, when
//! asked to look) and what OCM shows as its `Available` condition, whether
//! agents are connected (the servers' live view, the same facts the agents'
//! health Lease follows), and a probe through the tunnel — a TCP connect to
//! the cluster's kube-apiserver and, with `--healthz`, `GET /healthz` over
//! TLS — with its latency.
//!
//! The probe's TLS does not verify the apiserver's certificate: it checks
//! liveness through the tunnel and trusts nothing it reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tunnel_proto::client::{Target, TunnelClient};

/// One row of the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterHealth {
    /// The cluster.
    pub cluster: String,
    /// Whether the addon is enabled there (`None`: not looked up).
    pub installed: Option<bool>,
    /// The addon's `Available` condition as OCM shows it (`None`: not
    /// looked up, unknown, or not set yet).
    pub addon_available: Option<bool>,
    /// Agents connected to the server asked.
    pub agents: usize,
    /// At least one agent connected.
    pub available: bool,
    /// The probe's result: `ok`, or the failure.
    pub probe: String,
    /// Whether the probe succeeded.
    pub healthy: bool,
    /// Time the probe took, in milliseconds (when it succeeded).
    pub latency_ms: Option<f64>,
}

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Host inside each cluster.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Also `GET /healthz` over TLS (the kube-apiserver).
    pub healthz: bool,
    /// Time allowed for each probe.
    pub timeout: Duration,
}

/// The `Available` condition of an addon: `Some(true)` / `Some(false)`, or
/// `None` when it is `Unknown` or not set.
pub fn addon_available(addon: &tunnel_api::ocm::ManagedClusterAddOn) -> Option<bool> {
    let c = addon
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c["type"] == "Available")?;
    match c["status"].as_str() {
        Some("True") => Some(true),
        Some("False") => Some(false),
        _ => None,
    }
}

/// Probes every cluster the server lists plus `installed` ones it does not.
/// `installed` maps the clusters the addon is enabled in to its `Available`
/// condition; `None` when installation was not looked up.
pub async fn check(
    client: &TunnelClient,
    installed: Option<&BTreeMap<String, Option<bool>>>,
    opts: &ProbeOptions,
) -> Result<Vec<ClusterHealth>, tunnel_proto::error::TunnelError> {
    let listed = client.list_clusters().await?;
    let mut agents: BTreeMap<String, usize> = listed
        .into_iter()
        .map(|c| (c.name, c.agents.len()))
        .collect();
    for name in installed.into_iter().flat_map(BTreeMap::keys) {
        agents.entry(name.clone()).or_insert(0);
    }
    let probes = agents.iter().map(|(cluster, &n)| async move {
        let (healthy, probe, latency_ms) = if n == 0 {
            (false, "skipped: no agent connected".to_string(), None)
        } else {
            match tokio::time::timeout(opts.timeout, probe(client, cluster, opts)).await {
                Ok(Ok(elapsed)) => (true, "ok".to_string(), Some(elapsed.as_secs_f64() * 1e3)),
                Ok(Err(e)) => (false, e.to_string(), None),
                Err(_) => (false, format!("timed out after {:?}", opts.timeout), None),
            }
        };
        ClusterHealth {
            cluster: cluster.clone(),
            installed: installed.map(|i| i.contains_key(cluster)),
            addon_available: installed.and_then(|i| i.get(cluster).copied().flatten()),
            agents: n,
            available: n > 0,
            probe,
            healthy,
            latency_ms,
        }
    });
    Ok(futures_util::future::join_all(probes).await)
}

/// Why the probe of a cluster failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// The tunnel to the probed address could not be opened.
    #[error(transparent)]
    Open(tunnel_proto::error::TunnelError),
    /// The TLS client could not be configured.
    #[error(transparent)]
    TlsConfig(rustls::Error),
    /// The probed host is not a DNS name or address.
    #[error(transparent)]
    ServerName(rustls_pki_types::InvalidDnsNameError),
    /// The TLS handshake with the probed address failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// Sending the request or reading the answer failed.
    #[error(transparent)]
    Io(std::io::Error),
    /// `/healthz` answered other than 200; the status line.
    #[error("/healthz answered {0:?}")]
    Status(String),
}

async fn probe(
    client: &TunnelClient,
    cluster: &str,
    opts: &ProbeOptions,
) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let io = client
        .open_io(&Target::new(cluster, opts.host.clone(), opts.port))
        .await
        .map_err(ProbeError::Open)?;
    if !opts.healthz {
        return Ok(start.elapsed());
    }
    let tls = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(ProbeError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(opts.host.clone())
        .map_err(ProbeError::ServerName)?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, io)
        .await
        .map_err(ProbeError::Tls)?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        opts.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(ProbeError::Io)?;
        if n == 0 || head.len() > 8192 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(start.elapsed())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// Accepts any server certificate (a liveness probe, nothing is trusted).
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &tunnel_proto::tls::provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &tunnel_proto::tls::provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tunnel_proto::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The report as a table: `CLUSTER  INSTALLED  AVAILABLE  PROBED HEALTH  LATENCY`.
pub fn table(rows: &[ClusterHealth]) -> String {
    let mut lines = vec![[
        "CLUSTER".to_string(),
        "INSTALLED".into(),
        "AVAILABLE".into(),
        "PROBED HEALTH".into(),
        "LATENCY".into(),
    ]];
    for r in rows {
        lines.push([
            r.cluster.clone(),
            r.installed.map_or("-".into(), |i| i.to_string()),
            format!(
                "{} ({} agent{}{})",
                r.available,
                r.agents,
                if r.agents == 1 { "" } else { "s" },
                match (r.installed, r.addon_available) {
                    (Some(true), Some(a)) =>
                        format!(", addon {}", if a { "True" } else { "False" }),
                    (Some(true), None) => ", addon Unknown".into(),
                    _ => String::new(),
                }
            ),
            if r.healthy {
                "true".into()
            } else {
                format!("false ({})", r.probe)
            },
            r.latency_ms.map_or("-".into(), |ms| format!("{ms:.1}ms")),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 4 {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_the_documented_columns() {
        let rows = vec![
            ClusterHealth {
                cluster: "east".into(),
                installed: Some(true),
                addon_available: Some(true),
                agents: 2,
                available: true,
                probe: "ok".into(),
                healthy: true,
                latency_ms: Some(1.25),
            },
            ClusterHealth {
                cluster: "west".into(),
                installed: None,
                addon_available: None,
                agents: 0,
                available: false,
                probe: "skipped: no agent connected".into(),
                healthy: false,
                latency_ms: None,
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        let header: Vec<&str> = lines[0]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "CLUSTER",
                "INSTALLED",
                "AVAILABLE",
                "PROBED HEALTH",
                "LATENCY"
            ],
            "{t}"
        );
        assert!(
            lines[1].starts_with("east") && lines[1].ends_with("1.2ms"),
            "{t}"
        );
        assert!(
            lines[2].contains("false (skipped: no agent connected)"),
            "{t}"
        );
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["latency_ms"], 1.25);
    }
}
