//! The `tunnel-agent` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tunnel_proto::backoff::{DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX};
use tunnel_proto::tls::TlsFiles;
use tunnel_shell::flags::{
    AdminArgs, AgentSide, DeadPeerArgs, DrainArgs, DrainHelp, FlowArgs, LogArgs, ServerArgs,
    TlsArgs,
};
use tunnel_shell::units::{parse_duration, parse_socket_buffer};

use crate::allowlist::Allowlist;
use crate::{Agent, AgentConfig};

/// The cluster-tunnel agent: runs in a managed cluster, dials out to the hub's
/// proxy servers and carries their connections to destinations in this cluster.
#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version = tunnel_proto::version::VERSION)]
pub struct Cli {
    /// The proxy servers (their agent port).
    #[command(flatten)]
    pub servers: ServerArgs<AgentSide>,
    /// The cluster this agent serves; must match its certificate.
    #[arg(long, env = "TUNNEL_CLUSTER")]
    pub cluster: String,
    /// Directory holding agent-<cluster>.pem, agent-<cluster>-key.pem and ca.pem.
    #[arg(long, env = "TUNNEL_CERT_DIR", default_value = "certs")]
    pub cert_dir: PathBuf,
    /// Files that override those in --cert-dir.
    #[command(flatten)]
    pub tls: TlsArgs<AgentSide>,
    /// This agent's id (default: host name plus a random suffix).
    #[arg(long, env = "TUNNEL_AGENT_ID")]
    pub agent_id: Option<String>,
    /// A destination that may be dialed (repeatable or comma-separated):
    /// a CIDR or IP ("10.0.0.0/8", "10.1.2.3"), a host name or wildcard
    /// ("*.svc.cluster.local"), or "*", each with optional ports (":443",
    /// ":80,443", ":8000-8999"). Without any, every destination is allowed
    /// except loopback, link-local (cloud metadata) and unspecified addresses,
    /// which need an explicit IP rule.
    #[arg(long = "allow", env = "TUNNEL_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// NAME=IP: answer NAME with IP before asking DNS, like an /etc/hosts
    /// entry (repeatable or comma-separated). The allowlist still applies to IP.
    #[arg(
        long = "host-alias",
        env = "TUNNEL_HOST_ALIASES",
        value_delimiter = ','
    )]
    pub host_aliases: Vec<String>,
    /// Longest time to resolve and connect to a destination.
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Kernel send and receive buffer of each connection to a destination
    /// (e.g. 256KiB): bounds what a destination that stops reading holds in
    /// this node's kernel. 0 leaves the buffers to the kernel's autotuning,
    /// up to net.ipv4.tcp_wmem/tcp_rmem's maxima per socket.
    #[arg(long, env = "TUNNEL_SOCKET_BUFFER", default_value = "0", value_parser = parse_socket_buffer)]
    pub socket_buffer: usize,
    /// How often server names are re-resolved to find new replicas.
    #[arg(long, env = "TUNNEL_RESOLVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub resolve_interval: Duration,
    /// Liveness of the tunnels.
    #[command(flatten)]
    pub dead_peer: DeadPeerArgs<AgentSide>,
    /// Flow control of the tunnels.
    #[command(flatten)]
    pub flow: FlowArgs,
    /// First reconnection delay (doubles up to --reconnect-max, with jitter).
    #[arg(long, env = "TUNNEL_RECONNECT_BASE", default_value = "200ms", value_parser = parse_duration)]
    pub reconnect_base: Duration,
    /// Longest reconnection delay.
    #[arg(long, env = "TUNNEL_RECONNECT_MAX", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max: Duration,
    /// What SIGTERM waits for.
    #[command(flatten)]
    pub drain: DrainArgs<AgentShutdown>,
    /// The admin port.
    #[command(flatten)]
    pub admin: AdminArgs<8093>,
    /// Join the hub without open-cluster-management: the hub's API server,
    /// where the agent's certificate request goes (with --join-token-file).
    /// The key is made here and written to --tls-key, the certificate to --tls-cert.
    #[arg(long, env = "TUNNEL_JOIN_HUB_API", requires = "join_token_file")]
    pub join_hub_api: Option<String>,
    /// CA bundle of the hub's API server (default: the system's roots).
    #[arg(long, env = "TUNNEL_JOIN_HUB_CA", requires = "join_hub_api")]
    pub join_hub_ca: Option<PathBuf>,
    /// The join token (`tunnel-manager join-token`), re-read when it changes.
    #[arg(long, env = "TUNNEL_JOIN_TOKEN_FILE", requires = "join_hub_api")]
    pub join_token_file: Option<PathBuf>,
    /// Secret of the agent's namespace that keeps its key and certificate.
    #[arg(
        long,
        env = "TUNNEL_JOIN_SECRET",
        default_value = "cluster-tunnel-agent-tls"
    )]
    pub join_secret: String,
    /// Renew the Lease of this name (the addon's, for open-cluster-management's
    /// health check) while the agent holds a tunnel; needs in-cluster credentials.
    #[arg(long, env = "TUNNEL_ADDON_LEASE")]
    pub addon_lease: Option<String>,
    /// Namespace of --addon-lease (the agent's install namespace).
    #[arg(long, env = "TUNNEL_ADDON_LEASE_NAMESPACE", requires = "addon_lease")]
    pub addon_lease_namespace: Option<String>,
    /// How often --addon-lease is renewed.
    #[arg(long, env = "TUNNEL_ADDON_LEASE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub addon_lease_interval: Duration,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The help of the agent's `--drain-timeout` (the default words).
#[derive(Debug, Clone, Copy)]
pub struct AgentShutdown;

impl DrainHelp for AgentShutdown {}

impl Cli {
    /// The certificate, key and CA files these flags name.
    pub fn tls_files(&self) -> TlsFiles {
        self.tls
            .files(&self.cert_dir, &format!("agent-{}", self.cluster))
    }

    /// The agent configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<AgentConfig> {
        tunnel_identity::spiffe::validate_cluster_name(&self.cluster)
            .map_err(|e| anyhow::anyhow!("--cluster {:?}: {e}", self.cluster))?;
        let files = self.tls_files();
        let proxy = crate::proxy::ProxySettings::from_env()?;
        for s in &self.servers.servers {
            if !s.contains(':') || s.ends_with(':') {
                anyhow::bail!("--server {s:?}: expected host:port");
            }
        }
        let mut host_aliases = std::collections::HashMap::new();
        for spec in &self.host_aliases {
            let (name, ip) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--host-alias {spec:?}: expected NAME=IP"))?;
            let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                anyhow::anyhow!("--host-alias {spec:?}: {ip:?} is not an IP address")
            })?;
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                anyhow::bail!("--host-alias {spec:?}: empty name");
            }
            host_aliases.insert(name, ip);
        }
        let allowlist =
            Allowlist::parse(&self.allow).map_err(|e| anyhow::anyhow!("--allow: {e}"))?;
        let base = if self.reconnect_base.is_zero() {
            DEFAULT_BACKOFF_BASE
        } else {
            self.reconnect_base
        };
        let max = if self.reconnect_max < base {
            DEFAULT_BACKOFF_MAX.max(base)
        } else {
            self.reconnect_max
        };
        Ok(AgentConfig {
            servers: self.servers.servers.clone(),
            server_name: self.servers.server_name.clone(),
            cluster: self.cluster.clone(),
            agent_id: self
                .agent_id
                .clone()
                .unwrap_or_else(tunnel_shell::process::default_instance_id),
            tls: tunnel_proto::tls::ClientTls::client(files)?,
            h2: self.flow.settings(self.dead_peer.liveness())?,
            allowlist,
            dial_timeout: self.dial_timeout,
            socket_buffer: self.socket_buffer,
            host_aliases,
            resolve_interval: self.resolve_interval.max(Duration::from_secs(1)),
            admin_listen: self.admin.admin_listen,
            backoff: (base, max),
            proxy,
        })
    }
}

/// Runs the command line: the binary's whole `main`.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    cli.log.init();
    let join = match (&cli.join_hub_api, &cli.join_token_file) {
        (Some(url), Some(token)) => {
            tunnel_identity::spiffe::validate_cluster_name(&cli.cluster)
                .map_err(|e| anyhow::anyhow!("--cluster {:?}: {e}", cli.cluster))?;
            let ca = match &cli.join_hub_ca {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("--join-hub-ca {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let hub = crate::join::hub_client(url, ca.as_deref(), &token.to_string_lossy())?;
            let local = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("--join-hub-api needs in-cluster Kubernetes credentials: {e}")
            })?;
            let files = cli.tls_files();
            let join = crate::join::Join {
                hub,
                local: kube::Api::default_namespaced(local),
                secret: cli.join_secret.clone(),
                cluster: cli.cluster.clone(),
                cert_file: files.cert,
                key_file: files.key,
            };
            // The agent starts once it has a certificate.
            loop {
                match join.ensure(crate::join::unix_now()).await {
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "cannot join the hub yet; retrying");
                        tokio::time::sleep(crate::join::RETRY).await;
                    }
                }
            }
            Some(tokio::spawn(join.run()))
        }
        _ => None,
    };
    let config = cli.to_config()?;
    if config.proxy.is_set() {
        tracing::info!(proxy = ?config.proxy, "servers are reached through the HTTPS_PROXY (HTTP CONNECT), but those NO_PROXY exempts");
    }
    let holder = config.agent_id.clone();
    let agent = Agent::start(config).await?;
    let lease = match &cli.addon_lease {
        Some(name) => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("--addon-lease needs in-cluster Kubernetes credentials: {e}")
            })?;
            let api = match &cli.addon_lease_namespace {
                Some(ns) => kube::Api::namespaced(client, ns),
                None => kube::Api::default_namespaced(client),
            };
            Some(tokio::spawn(crate::addon_lease::run(
                api,
                name.clone(),
                holder,
                agent.admin_addr,
                cli.addon_lease_interval,
            )))
        }
        None => None,
    };
    tunnel_shell::process::termination_signal().await;
    for task in [lease, join].into_iter().flatten() {
        task.abort();
    }
    agent.shutdown(cli.drain.drain_timeout).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_flags_name_the_flag() {
        let cli = Cli::try_parse_from([
            "tunnel-agent",
            "--server",
            "hub:8091",
            "--cluster",
            "East_1",
        ])
        .unwrap();
        assert!(
            cli.to_config()
                .unwrap_err()
                .to_string()
                .contains("--cluster")
        );
        let cli =
            Cli::try_parse_from(["tunnel-agent", "--server", "hub", "--cluster", "east"]).unwrap();
        assert!(
            cli.to_config()
                .unwrap_err()
                .to_string()
                .contains("--server")
        );
        let cli = Cli::try_parse_from([
            "tunnel-agent",
            "--server",
            "h:1",
            "--cluster",
            "east",
            "--host-alias",
            "x=nope",
        ])
        .unwrap();
        assert!(
            cli.to_config()
                .unwrap_err()
                .to_string()
                .contains("--host-alias")
        );
        let err = Cli::try_parse_from(["tunnel-agent", "--cluster", "east"]).unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
    }
}
