//! The command line: every flag with the `TUNNEL_*` variable it also reads,
//! and the commands besides running the sidecar (`wait-ready`, `probe`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tunnel_api::sidecar::DirectPolicy;
use tunnel_shell::flags::{ClientSide, ServerArgs, TlsArgs};
use tunnel_shell::logging::LogFormat;
use tunnel_shell::units::{parse_duration, parse_socket_buffer};

/// The command line. Every flag also reads an environment variable; values
/// not given either way come from `--config`, then the defaults.
#[derive(Debug, Default, Parser)]
#[command(
    name = "tunnel-sidecar",
    version = tunnel_proto::version::VERSION,
    about = "The cluster-tunnel sidecar: per-cluster loopback ports and an HTTP proxy that reach \
             services in managed clusters through the tunnel.",
    long_about = "The cluster-tunnel sidecar: per-cluster loopback ports and an HTTP proxy that reach \
                  services in managed clusters through the tunnel.\n\nEvery flag also reads the \
                  environment variable shown; values given neither way come from --config (TOML, \
                  same names in snake_case), then the defaults."
)]
pub struct Cli {
    /// A command instead of running the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "TUNNEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The proxy servers (their client port); not required, as they may
    /// come from --config.
    #[command(flatten)]
    pub servers: ServerArgs<ClientSide, false>,
    /// Directory holding client-<client-name>.pem, its key and ca.pem.
    #[arg(long, env = "TUNNEL_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Client name whose certificate to use from --cert-dir [default: sidecar].
    #[arg(long, env = "TUNNEL_CLIENT_NAME")]
    pub client_name: Option<String>,
    /// Files that override those in --cert-dir.
    #[command(flatten)]
    pub tls: TlsArgs<ClientSide>,
    /// The pod's projected service-account token, sent with every connection
    /// so the server knows which workload asks; re-read when it changes.
    #[arg(long, env = "TUNNEL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A per-cluster loopback port: PORT=CLUSTER (the cluster's
    /// kube-apiserver) or PORT=CLUSTER:HOST:PORT (repeatable or comma-separated).
    #[arg(long = "port", env = "TUNNEL_PORTS", value_delimiter = ',')]
    pub ports: Vec<String>,
    /// Address of the HTTP proxy (CONNECT and http:// requests); "off" disables it
    /// [default: 127.0.0.1:17080].
    #[arg(long, env = "TUNNEL_PROXY_LISTEN")]
    pub proxy_listen: Option<String>,
    /// Whether the proxy dials destinations outside every cluster (hub
    /// Services, pod and ClusterIP addresses, public names) from the pod:
    /// allow or deny [default: allow].
    #[arg(long, env = "TUNNEL_DIRECT", value_enum)]
    pub direct: Option<DirectPolicy>,
    /// NAME=IP: answer NAME with IP before the resolver for direct
    /// connections, like an /etc/hosts entry (repeatable or comma-separated).
    #[arg(
        long = "host-alias",
        env = "TUNNEL_HOST_ALIASES",
        value_delimiter = ','
    )]
    pub host_aliases: Vec<String>,
    /// An address (or ADDR/PREFIX network) the proxy may dial directly
    /// although it is loopback, unspecified or link-local, which it refuses
    /// otherwise (this pod's own ports, a cloud's metadata service);
    /// repeatable or comma-separated.
    #[arg(
        long = "direct-allow-ip",
        env = "TUNNEL_DIRECT_ALLOW_IPS",
        value_delimiter = ','
    )]
    pub direct_allow_ips: Vec<String>,
    /// A cluster this pod names (its ports, its default cluster): a bare
    /// name that is one goes through the tunnel even before the server's
    /// cluster list is known (repeatable or comma-separated).
    #[arg(
        long = "known-cluster",
        env = "TUNNEL_KNOWN_CLUSTERS",
        value_delimiter = ','
    )]
    pub known_clusters: Vec<String>,
    /// Address of the admin port (/healthz, /readyz, /metrics, POST /shutdown)
    /// [default: 127.0.0.1:17090].
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// IP address the per-cluster ports bind to [default: 127.0.0.1].
    #[arg(long, env = "TUNNEL_BIND_ADDRESS")]
    pub bind_address: Option<IpAddr>,
    /// Allow listeners on non-loopback addresses (they are an open door into
    /// every cluster for anyone who can reach them).
    #[arg(long, env = "TUNNEL_ALLOW_NON_LOOPBACK")]
    pub allow_non_loopback: bool,
    /// Cluster of unqualified names in HTTP proxy requests when the proxy URL
    /// names no user.
    #[arg(long, env = "TUNNEL_DEFAULT_CLUSTER")]
    pub default_cluster: Option<String>,
    /// Suffix of cluster-qualified names (<host>.<cluster>.<suffix>)
    /// [default: tunnel.internal].
    #[arg(long, env = "TUNNEL_CLUSTER_SUFFIX")]
    pub cluster_suffix: Option<String>,
    /// In-cluster host of each cluster's kube-apiserver [default: kubernetes.default.svc].
    #[arg(long, env = "TUNNEL_APISERVER_HOST")]
    pub apiserver_host: Option<String>,
    /// How often the cluster list is fetched from the server [default: 10s].
    #[arg(long, env = "TUNNEL_CLUSTER_REFRESH", value_parser = parse_duration)]
    pub cluster_refresh: Option<Duration>,
    /// Time a proxy client gets to send its request head [default: 10s].
    #[arg(long, env = "TUNNEL_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub header_timeout: Option<Duration>,
    /// Largest request head the proxy accepts, in bytes [default: 32768].
    #[arg(long, env = "TUNNEL_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Most request headers the proxy accepts [default: 100].
    #[arg(long, env = "TUNNEL_MAX_HEADERS")]
    pub max_headers: Option<usize>,
    /// Time allowed from opening a tunnel to the destination's answer, and
    /// for a direct connection to resolve and connect [default: 30s].
    #[arg(long, env = "TUNNEL_OPEN_TIMEOUT", value_parser = parse_duration)]
    pub open_timeout: Option<Duration>,
    /// A server that answers nothing for this long is declared dead [default: 20s].
    #[arg(long, env = "TUNNEL_DEAD_PEER_TIMEOUT", value_parser = parse_duration)]
    pub dead_peer_timeout: Option<Duration>,
    /// Kernel send and receive buffer of each connection from the app (e.g.
    /// 256KiB): bounds what an app that stops reading or a stalled tunnel
    /// holds in the pod's kernel memory; 0 leaves them to the kernel's
    /// autotuning [default: 0].
    #[arg(long, env = "TUNNEL_SOCKET_BUFFER", value_parser = parse_socket_buffer)]
    pub socket_buffer: Option<usize>,
    /// Log format [default: json].
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (RUST_LOG overrides) [default: info].
    #[arg(long, env = "TUNNEL_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// Commands besides running the sidecar.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Wait until the sidecar of this pod (at --admin-listen, or
    /// TUNNEL_ADMIN_LISTEN) is ready; exit 0 when it is, 1 on timeout. For a
    /// postStart hook where the sidecar cannot run as a native sidecar.
    WaitReady {
        /// Give up after this long.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Ask the sidecar of this pod (at --admin-listen, or TUNNEL_ADMIN_LISTEN,
    /// on loopback) once: print its answer and exit 0 if it is 200, else
    /// print why and exit 1. The injected sidecar's exec probes: they reach
    /// the admin port on loopback, where no mesh redirects them.
    Probe {
        /// Which endpoint: readyz (also says whether a server is connected) or healthz.
        #[arg(value_enum)]
        check: ProbeCheck,
        /// Give up after this long (keep it below the probe's timeoutSeconds).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// What `tunnel-sidecar probe` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeCheck {
    /// `GET /readyz`: listeners bound (the body says whether a server is connected).
    Readyz,
    /// `GET /healthz`: the process answers.
    Healthz,
}

impl ProbeCheck {
    /// The admin path.
    pub fn path(self) -> &'static str {
        match self {
            ProbeCheck::Readyz => "/readyz",
            ProbeCheck::Healthz => "/healthz",
        }
    }
}
