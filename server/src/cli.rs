//! The `tunnel-server` command line: serve (the default), or write certificates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN;
use tunnel_shell::flags::{
    AdminArgs, DeadPeerArgs, DrainArgs, DrainHelp, FlowArgs, LogArgs, ServerSide,
    ShutdownDelayArgs, ShutdownDelayHelp, TlsArgs,
};
use tunnel_shell::units::parse_duration;

use std::collections::BTreeMap;

use crate::{AuthConfig, PolicySource, Server, ServerConfig};

/// The cluster-tunnel proxy server: agents in managed clusters dial in,
/// clients on the hub reach those clusters through them.
#[derive(Debug, Parser)]
#[command(
    name = "tunnel-server",
    version = tunnel_proto::version::VERSION,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a command the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a CA and the certificates of a standalone installation.
    Certs(CertArgs),
    /// Print the TunnelPolicy CustomResourceDefinition (YAML).
    Crd,
}

/// Flags of `tunnel-server certs`.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// Directory to write into (created if missing; an existing CA there is reused).
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// A managed cluster to issue an agent certificate for (repeatable).
    #[arg(long = "cluster")]
    pub clusters: Vec<String>,
    /// A client (sidecar, tool) to issue a client certificate for (repeatable).
    #[arg(long = "client")]
    pub clients: Vec<String>,
    /// A workload to issue a workload certificate for, NAMESPACE/SERVICE-ACCOUNT
    /// (identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>; repeatable).
    #[arg(long = "workload")]
    pub workloads: Vec<String>,
    /// A DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    pub server_names: Vec<String>,
    /// Trust domain of the identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Validity of the leaf certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub validity_days: u32,
}

/// Flags of the server.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address of the agent port (agents dial in here).
    #[arg(long, env = "TUNNEL_AGENT_LISTEN", default_value = "0.0.0.0:8091")]
    pub agent_listen: SocketAddr,
    /// Address of the client port (sidecars and tools).
    #[arg(long, env = "TUNNEL_CLIENT_LISTEN", default_value = "0.0.0.0:8090")]
    pub client_listen: SocketAddr,
    /// The admin port.
    #[command(flatten)]
    pub admin: AdminArgs<8092>,
    /// Directory holding server.pem, server-key.pem and ca.pem (as written by `certs`).
    #[arg(long, env = "TUNNEL_CERT_DIR", default_value = "certs")]
    pub cert_dir: PathBuf,
    /// Files that override those in --cert-dir.
    #[command(flatten)]
    pub tls: TlsArgs<ServerSide>,
    /// Trust domain of identities in certificates.
    #[arg(long, env = "TUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// This server's id (default: host name plus a random suffix); unique
    /// among the replicas, told to agents in every hello.
    #[arg(long, env = "TUNNEL_SERVER_ID")]
    pub server_id: Option<String>,
    /// How many server replicas there are, told to agents in every hello: an
    /// agent that reaches the replicas through one address (a load balancer)
    /// keeps connecting through it until it holds a tunnel to this many
    /// distinct server ids. 1: one tunnel per address the agent resolves.
    #[arg(
        long,
        env = "TUNNEL_SERVER_COUNT",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::MAX_SERVER_COUNT))
    )]
    pub server_count: u32,
    /// A cluster known before its agents connect: reported as "no agent" rather
    /// than "unknown cluster" (repeatable).
    #[arg(
        long = "known-cluster",
        env = "TUNNEL_KNOWN_CLUSTERS",
        value_delimiter = ','
    )]
    pub known_clusters: Vec<String>,
    /// Time an agent gets to reach a destination.
    #[arg(long, env = "TUNNEL_DIAL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// How often the server probes every cluster through its agents (metrics
    /// tunnel_server_probe_*); 0 disables the probes.
    #[arg(long, env = "TUNNEL_PROBE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// What the probes dial in every cluster, HOST:PORT; the agents' --allow
    /// must allow it. No TunnelPolicy rule is needed: the probe is the server's own.
    #[arg(long, env = "TUNNEL_PROBE_TARGET", default_value = crate::probes::DEFAULT_PROBE_TARGET)]
    pub probe_target: crate::probes::ProbeTarget,
    /// What SIGTERM waits for.
    #[command(flatten)]
    pub drain: DrainArgs<ServerShutdown>,
    /// How long the server stays up, not ready, on SIGTERM.
    #[command(flatten)]
    pub shutdown: ShutdownDelayArgs<ServerShutdown>,
    /// A new server reports ready once agents have connected (and none came
    /// for a second), or after this long without them.
    #[arg(long, env = "TUNNEL_READY_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub ready_wait: Duration,
    /// Time an agent has to acknowledge an open; after it the open goes to
    /// another agent of the cluster, and the silent one is passed over.
    #[arg(long, env = "TUNNEL_ACK_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Liveness of tunnel connections.
    #[command(flatten)]
    pub dead_peer: DeadPeerArgs<ServerSide>,
    /// Flow control of tunnel connections.
    #[command(flatten)]
    pub flow: FlowArgs,
    /// Connections one client identity (token subject, else certificate) may
    /// have open; more are refused with resource_exhausted.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS_PER_IDENTITY", default_value_t = crate::DEFAULT_MAX_CONNECTIONS_PER_IDENTITY)]
    pub max_connections_per_identity: u64,
    /// Connections one agent tunnel may carry; when every agent of a cluster
    /// is full, more are refused with resource_exhausted.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS_PER_AGENT", default_value_t = crate::DEFAULT_MAX_CONNECTIONS_PER_AGENT)]
    pub max_connections_per_agent: u64,
    /// Cut (reset) a connection that moved no byte for this long; 0 = never.
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Authorization policy file (YAML, the `spec` of a TunnelPolicy); re-read
    /// when it changes. Without it, --policy-kubernetes or --allow-all, every
    /// connection is refused (deny unless a policy allows).
    #[arg(long, env = "TUNNEL_POLICY_FILE", conflicts_with = "policy_kubernetes")]
    pub policy_file: Option<PathBuf>,
    /// How often --policy-file is checked for changes.
    #[arg(long, env = "TUNNEL_POLICY_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub policy_reload_interval: Duration,
    /// Take the policy from the TunnelPolicy objects of the cluster the server runs in.
    #[arg(long, env = "TUNNEL_POLICY_KUBERNETES")]
    pub policy_kubernetes: bool,
    /// Turn authorization off: every authenticated client may reach every
    /// cluster (for trials and tests; logged as a warning).
    #[arg(long, env = "TUNNEL_ALLOW_ALL", conflicts_with_all = ["policy_file", "policy_kubernetes"])]
    pub allow_all: bool,
    /// A label of a cluster for policies' matchLabels, CLUSTER=KEY=VALUE (repeatable).
    #[arg(
        long = "cluster-label",
        env = "TUNNEL_CLUSTER_LABELS",
        value_delimiter = ','
    )]
    pub cluster_labels: Vec<String>,
    /// With --policy-kubernetes: also follow open-cluster-management's
    /// ManagedClusters and ManagedClusterSets, so that policies select clusters
    /// by their own labels (matchLabels) and by cluster set (clusterSet); and
    /// admit only agents of accepted ManagedClusters with the cluster-tunnel
    /// addon (a ManagedClusterAddOn), closing their tunnels when that ends.
    #[arg(long, env = "TUNNEL_CLUSTERS_FROM_OCM", requires = "policy_kubernetes")]
    pub clusters_from_ocm: bool,
    /// Cut open connections that a changed policy no longer allows.
    #[arg(long, env = "TUNNEL_ENFORCE_ON_CHANGE")]
    pub enforce_on_change: bool,
    /// Identify workloads by the service-account token they send, checked with
    /// the Kubernetes TokenReview API (callers without a token are their certificate).
    #[arg(long, env = "TUNNEL_TOKEN_REVIEW")]
    pub token_review: bool,
    /// Audience tokens must be issued for (repeatable).
    #[arg(long = "token-audience", env = "TUNNEL_TOKEN_AUDIENCES", value_delimiter = ',', default_value = crate::authn::DEFAULT_TOKEN_AUDIENCE)]
    pub token_audiences: Vec<String>,
    /// How long a TokenReview result is reused.
    #[arg(long, env = "TUNNEL_TOKEN_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub token_cache_ttl: Duration,
    /// Suffix of the names konnectivity and HTTP CONNECT clients dial to
    /// reach a host in a cluster (<host>.<cluster>.<suffix>:<port>); the
    /// sidecars' --cluster-suffix.
    #[arg(long, env = "TUNNEL_CLUSTER_SUFFIX", default_value = tunnel_api::names::DEFAULT_CLUSTER_SUFFIX)]
    pub cluster_suffix: String,
    /// In-cluster host of every cluster's kube-apiserver: what konnectivity
    /// and HTTP CONNECT clients reach when they dial <cluster>:<port>.
    #[arg(long, env = "TUNNEL_APISERVER_HOST", default_value = tunnel_api::sidecar::DEFAULT_APISERVER_HOST)]
    pub apiserver_host: String,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The help of the server's shutdown flags.
#[derive(Debug, Clone, Copy)]
pub struct ServerShutdown;

impl DrainHelp for ServerShutdown {
    const DRAIN_TIMEOUT_HELP: &'static str =
        "Time open connections get to finish after SIGTERM (after the shutdown delay)";
}

impl ShutdownDelayHelp for ServerShutdown {
    const SHUTDOWN_DELAY_HELP: &'static str = "On SIGTERM, time the server keeps serving while \
        not ready, with its agents told to find another replica, before it sends clients \
        GOAWAY: endpoints and load balancers stop sending it connections meanwhile";
}

impl RunArgs {
    /// Where the policy comes from. With none configured and no --allow-all,
    /// a policy that allows nothing: deny unless a policy allows.
    pub fn policy_source(&self) -> PolicySource {
        match (&self.policy_file, self.policy_kubernetes) {
            (Some(path), _) => PolicySource::File {
                path: path.clone(),
                reload_interval: self.policy_reload_interval,
            },
            (None, true) => PolicySource::Kubernetes,
            (None, false) if self.allow_all => PolicySource::None,
            (None, false) => {
                tracing::warn!(
                    "no policy configured (--policy-file, --policy-kubernetes): every connection will be refused; \
                     --allow-all turns authorization off"
                );
                let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(
                    crate::policy::Policy::deny_all(),
                ));
                // The policy never changes; the receiver keeps the value.
                drop(tx);
                PolicySource::Fixed(rx)
            }
        }
    }

    /// The server configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let files = self.tls.files(&self.cert_dir, "server");
        for c in &self.known_clusters {
            tunnel_identity::spiffe::validate_cluster_name(c)
                .map_err(|e| anyhow::anyhow!("--known-cluster {c:?}: {e}"))?;
        }
        let h2 = self.flow.settings(self.dead_peer.liveness())?;
        let mut cluster_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for l in &self.cluster_labels {
            let label = crate::policy::parse_cluster_label(l)
                .map_err(|e| anyhow::anyhow!("--cluster-label {e}"))?;
            cluster_labels
                .entry(label.cluster)
                .or_default()
                .insert(label.key, label.value);
        }
        let suffix = self.cluster_suffix.trim_matches('.').to_ascii_lowercase();
        if !suffix.contains('.') {
            anyhow::bail!(
                "--cluster-suffix {:?} must be a dotted DNS suffix such as tunnel.internal",
                self.cluster_suffix
            );
        }
        if self.apiserver_host.is_empty() || self.apiserver_host.contains(char::is_whitespace) {
            anyhow::bail!("--apiserver-host {:?} is not a host", self.apiserver_host);
        }
        let policy = self.policy_source();
        if self.enforce_on_change && matches!(policy, PolicySource::None) {
            anyhow::bail!("--enforce-on-change needs --policy-file or --policy-kubernetes");
        }
        let auth = AuthConfig {
            policy,
            cluster_labels,
            clusters_from_ocm: self.clusters_from_ocm,
            admitted_clusters: None,
            enforce_on_change: self.enforce_on_change,
            token_review: self.token_review.then(|| crate::authn::TokenReviewConfig {
                audiences: self.token_audiences.clone(),
                cache_ttl: self.token_cache_ttl,
            }),
        };
        Ok(ServerConfig {
            agent_listen: self.agent_listen,
            client_listen: self.client_listen,
            admin_listen: self.admin.admin_listen,
            tls: tunnel_proto::tls::ServerTls::server(files)?,
            trust_domain: self.trust_domain.clone(),
            server_id: self
                .server_id
                .clone()
                .unwrap_or_else(tunnel_shell::process::default_instance_id),
            server_count: self.server_count,
            known_clusters: self.known_clusters.clone(),
            dial_timeout: self.dial_timeout,
            drain_timeout: self.drain.drain_timeout,
            h2,
            auth,
            probe: crate::probes::ProbeConfig {
                interval: self.probe_interval,
                target: self.probe_target.clone(),
            },
            limits: crate::Limits {
                max_connections_per_identity: self.max_connections_per_identity,
                max_connections_per_agent: self.max_connections_per_agent,
                idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            },
            ha: crate::HaConfig {
                shutdown_delay: self.shutdown.shutdown_delay,
                ready_wait: self.ready_wait,
                ack_timeout: self.ack_timeout,
            },
            addressing: crate::addresses::Addressing {
                suffix,
                apiserver_host: self.apiserver_host.clone(),
            },
        })
    }
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs::parse_from_defaults()
    }
}

impl RunArgs {
    fn parse_from_defaults() -> Self {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: RunArgs,
        }
        Wrap::parse_from(["tunnel-server"]).args
    }
}

/// Runs the command line: the binary's whole `main`.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Certs(args)) => {
            let opts = tunnel_identity::cert_dir::CertOptions {
                trust_domain: args.trust_domain,
                server_names: args.server_names,
                clusters: args.clusters,
                clients: args.clients,
                workloads: args.workloads,
                validity_days: args.validity_days,
            };
            let out = tunnel_identity::cert_dir::generate(&args.dir, &opts)?;
            for path in &out.written {
                println!("{}", path.display());
            }
            Ok(())
        }
        Some(Command::Crd) => {
            print!("{}", tunnel_api::policy::crd_yaml());
            Ok(())
        }
        None => {
            cli.run.log.init();
            let config = cli.run.to_config()?;
            let server = Server::start(config).await?;
            tunnel_shell::process::termination_signal().await;
            server.shutdown().await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_DIAL_TIMEOUT, DEFAULT_DRAIN_TIMEOUT};

    #[test]
    fn defaults_are_sane() {
        let args = RunArgs::default();
        assert_eq!(args.dial_timeout, DEFAULT_DIAL_TIMEOUT);
        assert_eq!(args.drain.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(args.shutdown.shutdown_delay, crate::DEFAULT_SHUTDOWN_DELAY);
        assert_eq!(args.ready_wait, crate::DEFAULT_READY_WAIT);
        assert_eq!(args.ack_timeout, crate::DEFAULT_ACK_TIMEOUT);
        assert_eq!(args.client_listen.port(), 8090);
        assert_eq!(args.probe_interval, crate::probes::DEFAULT_PROBE_INTERVAL);
        assert_eq!(
            args.probe_target.to_string(),
            crate::probes::DEFAULT_PROBE_TARGET
        );
    }

    #[test]
    fn probes_are_configured_or_disabled_by_flags() {
        let args = Cli::try_parse_from([
            "tunnel-server",
            "--probe-interval",
            "5s",
            "--probe-target",
            "[fd00::1]:6443",
        ])
        .unwrap();
        assert_eq!(args.run.probe_interval, Duration::from_secs(5));
        assert_eq!(args.run.probe_target.host, "fd00::1");
        assert_eq!(args.run.probe_target.port, 6443);
        let args = Cli::try_parse_from(["tunnel-server", "--probe-interval", "0"]).unwrap();
        assert!(args.run.probe_interval.is_zero());
        let err = Cli::try_parse_from(["tunnel-server", "--probe-target", "nohost"]).unwrap_err();
        assert!(err.to_string().contains("--probe-target"), "{err}");
    }

    #[test]
    fn without_a_policy_nothing_is_allowed_unless_authorization_is_off() {
        let args = Cli::try_parse_from(["tunnel-server"]).unwrap();
        let PolicySource::Fixed(rx) = args.run.policy_source() else {
            panic!("expected a fixed deny-all policy");
        };
        assert_eq!(rx.borrow().len(), 0, "no rule allows anything");
        let args = Cli::try_parse_from(["tunnel-server", "--allow-all"]).unwrap();
        assert!(matches!(args.run.policy_source(), PolicySource::None));
        let err = Cli::try_parse_from(["tunnel-server", "--allow-all", "--policy-kubernetes"])
            .unwrap_err();
        assert!(err.to_string().contains("--allow-all"), "{err}");
    }

    #[test]
    fn the_server_count_defaults_to_one_and_is_bounded() {
        let args = Cli::try_parse_from(["tunnel-server"]).unwrap();
        assert_eq!(args.run.server_count, 1);
        let args = Cli::try_parse_from(["tunnel-server", "--server-count", "3"]).unwrap();
        assert_eq!(args.run.server_count, 3);
        let max = tunnel_proto::MAX_SERVER_COUNT;
        let args =
            Cli::try_parse_from(["tunnel-server", &format!("--server-count={max}")]).unwrap();
        assert_eq!(
            args.run.server_count, max,
            "as many as an agent keeps tunnels to"
        );
        let beyond = (max + 1).to_string();
        for bad in ["0", "-1", "many", beyond.as_str()] {
            let flag = format!("--server-count={bad}");
            let err = Cli::try_parse_from(["tunnel-server", flag.as_str()]).unwrap_err();
            assert!(err.to_string().contains("--server-count"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let err = Cli::try_parse_from(["tunnel-server", "--dial-timeout", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--dial-timeout"), "{err}");
        let args = Cli::try_parse_from(["tunnel-server", "--known-cluster", "Bad_Name"]).unwrap();
        let err = args.run.to_config().unwrap_err();
        assert!(err.to_string().contains("--known-cluster"), "{err}");
        let args = Cli::try_parse_from(["tunnel-server", "--cluster-suffix", "internal"]).unwrap();
        let err = args.run.to_config().unwrap_err();
        assert!(err.to_string().contains("--cluster-suffix"), "{err}");
    }
}
