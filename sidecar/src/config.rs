//! The sidecar's configuration: flags, environment variables (`TUNNEL_*`) and
//! an optional TOML file, in that order of precedence, validated as a whole.
//!
//! The command line is in `flags` ([`Cli`]), the file in `file`
//! ([`FileConfig`]); this module merges them into a [`SidecarConfig`]
//! ([`Cli::resolve`]) and checks the whole: listeners on loopback and not
//! on each other's ports, no open proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tunnel_api::sidecar::{DEFAULT_APISERVER_HOST, DirectPolicy, PortMapping, parse_host_port};
use tunnel_identity::spiffe::validate_cluster_name;
use tunnel_proto::client::Target;
use tunnel_shell::flags::TlsArgs;
use tunnel_shell::logging::LogFormat;
use tunnel_shell::units::{parse_duration, parse_socket_buffer};

use crate::direct::{DirectDialer, parse_allowed_ips, parse_host_aliases};
use crate::names::{DEFAULT_CLUSTER_SUFFIX, Naming};

mod file;
mod flags;

pub use file::FileConfig;
pub use flags::{Cli, Command, ProbeCheck};

/// Default address of the HTTP proxy.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:17080";
/// Default address of the admin port.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:17090";
/// Default limit on the size of a request head.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Default limit on the number of request headers.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default time a client gets to send a request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between refreshes of the cluster list.
pub const DEFAULT_CLUSTER_REFRESH: Duration = Duration::from_secs(10);

/// A configuration error, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value does not parse or does not make sense.
    #[error("{key}: {reason}")]
    Invalid {
        /// The flag or file key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Two listeners want the same port.
    #[error("port clash: {first} and {second} both use {addr}")]
    PortClash {
        /// One user of the port.
        first: String,
        /// The other.
        second: String,
        /// The address.
        addr: SocketAddr,
    },
    /// The configuration file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Where the connections of a loopback port go.
pub fn target_of(m: &PortMapping) -> Target {
    Target::new(&m.cluster, &m.host, m.target_port)
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Server addresses.
    pub servers: Vec<String>,
    /// Name the server certificates carry.
    pub server_name: Option<String>,
    /// Certificate files.
    pub tls: tunnel_proto::tls::TlsFiles,
    /// Service-account token file sent to the server.
    pub token_file: Option<PathBuf>,
    /// Per-cluster ports.
    pub ports: Vec<PortMapping>,
    /// HTTP proxy address, if enabled.
    pub proxy_listen: Option<SocketAddr>,
    /// How the proxy reaches destinations outside every cluster.
    pub direct: DirectDialer,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Address the per-cluster ports bind to.
    pub bind_address: IpAddr,
    /// How proxy requests name clusters.
    pub naming: Naming,
    /// Clusters this pod names, known before the server's list.
    pub known_clusters: Vec<String>,
    /// Cluster list refresh interval.
    pub cluster_refresh: Duration,
    /// Request head timeout.
    pub header_timeout: Duration,
    /// Request head size limit.
    pub max_header_bytes: usize,
    /// Request header count limit.
    pub max_headers: usize,
    /// Tunnel open timeout.
    pub open_timeout: Duration,
    /// Dead-peer timeout towards the server.
    pub dead_peer_timeout: Duration,
    /// Kernel buffer of each app connection, in bytes; 0 = autotuning.
    pub socket_buffer: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

/// One address the sidecar listens on, named by the flag that set it.
struct Listener {
    name: String,
    addr: SocketAddr,
}

/// The flag of the admin port's listener.
const ADMIN_LISTEN: &str = "--admin-listen";

/// Refuses listeners beyond loopback (unless `allow_non_loopback`) and two
/// listeners on one port.
fn check_listeners(listeners: &[Listener], allow_non_loopback: bool) -> Result<(), ConfigError> {
    // The admin port serves health and metrics (POST /shutdown only on
    // connections from loopback to loopback), so it may listen beyond
    // loopback for Prometheus to scrape.
    for Listener { name, addr: a } in listeners.iter().filter(|l| l.name != ADMIN_LISTEN) {
        if !a.ip().is_loopback() && !allow_non_loopback {
            return Err(invalid(
                name,
                format!(
                    "{a} is not a loopback address; pass --allow-non-loopback to expose the tunnel beyond this host"
                ),
            ));
        }
    }
    for (i, first) in listeners.iter().enumerate() {
        for second in &listeners[i + 1..] {
            let (a1, a2) = (first.addr, second.addr);
            let overlap = a1.port() == a2.port()
                && a1.port() != 0
                && (a1.ip() == a2.ip() || a1.ip().is_unspecified() || a2.ip().is_unspecified());
            if overlap {
                return Err(ConfigError::PortClash {
                    first: first.name.clone(),
                    second: second.name.clone(),
                    addr: a1,
                });
            }
        }
    }
    Ok(())
}

/// A repeatable setting: the flags' values, or the file's when no flag
/// gave any (lists are not merged).
fn flags_or_file<'a>(flags: &'a [String], file: &'a [String]) -> &'a [String] {
    if flags.is_empty() { file } else { flags }
}

fn dur(
    key: &str,
    cli: Option<Duration>,
    file: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match (cli, file) {
        (Some(d), _) => Ok(d),
        (None, Some(s)) => parse_duration(s).map_err(|e| invalid(key, e.to_string())),
        (None, None) => Ok(default),
    }
}

fn addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an IP:PORT address")))
}

impl Cli {
    /// Merges flags/environment with the file (if any) and validates.
    pub fn resolve(&self) -> Result<SidecarConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let servers = flags_or_file(&self.servers.servers, &file.servers).to_vec();
        if servers.is_empty() {
            return Err(invalid(
                "--server",
                "at least one proxy server address is required",
            ));
        }
        for s in &servers {
            parse_host_port(s).map_err(|e| invalid("--server", e))?;
        }
        let cert_dir = self
            .cert_dir
            .clone()
            .or(file.cert_dir.clone())
            .unwrap_or_else(|| PathBuf::from("certs"));
        let client_name = self
            .client_name
            .clone()
            .or(file.client_name.clone())
            .unwrap_or_else(|| "sidecar".into());
        let file_tls = TlsArgs::new(file.tls_cert.clone(), file.tls_key.clone(), file.ca.clone());
        let tls = self
            .tls
            .or(file_tls)
            .files(&cert_dir, &format!("client-{client_name}"));
        let ports = flags_or_file(&self.ports, &file.ports)
            .iter()
            .map(|p| p.parse::<PortMapping>().map_err(|e| invalid("--port", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let proxy_listen = match self
            .proxy_listen
            .as_deref()
            .or(file.proxy_listen.as_deref())
        {
            Some("off") => None,
            Some(s) => Some(addr("--proxy-listen", s)?),
            None => Some(DEFAULT_PROXY_LISTEN.parse().expect("valid default")),
        };
        let admin_listen = match (self.admin_listen, &file.admin_listen) {
            (Some(a), _) => a,
            (None, Some(s)) => addr(ADMIN_LISTEN, s)?,
            (None, None) => DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
        };
        let bind_address = match (self.bind_address, &file.bind_address) {
            (Some(a), _) => a,
            (None, Some(s)) => s
                .parse()
                .map_err(|_| invalid("--bind-address", format!("{s:?} is not an IP address")))?,
            (None, None) => IpAddr::from([127, 0, 0, 1]),
        };
        let allow_non_loopback =
            self.allow_non_loopback || file.allow_non_loopback.unwrap_or(false);
        let mut listeners = vec![Listener {
            name: ADMIN_LISTEN.into(),
            addr: admin_listen,
        }];
        if let Some(p) = proxy_listen {
            listeners.push(Listener {
                name: "--proxy-listen".into(),
                addr: p,
            });
        }
        for m in &ports {
            listeners.push(Listener {
                name: format!("--port {}={}", m.port, target_of(m)),
                addr: SocketAddr::new(bind_address, m.port),
            });
        }
        check_listeners(&listeners, allow_non_loopback)?;
        let direct_policy = match (self.direct, file.direct.as_deref()) {
            (Some(p), _) => p,
            (None, Some(s)) => s.parse().map_err(|e: String| invalid("direct", e))?,
            (None, None) => DirectPolicy::default(),
        };
        // Direct connections are safe because only the pod can reach the
        // proxy; a proxy beyond loopback that dials anything would be open.
        if let Some(p) = proxy_listen
            && !p.ip().is_loopback()
            && direct_policy == DirectPolicy::Allow
        {
            return Err(invalid(
                "--direct",
                format!(
                    "the proxy listens on {p}, beyond loopback: with direct connections allowed it would be an open proxy; pass --direct deny"
                ),
            ));
        }
        let host_aliases =
            parse_host_aliases(flags_or_file(&self.host_aliases, &file.host_aliases))
                .map_err(|e| invalid("--host-alias", e.to_string()))?;
        let allowed = parse_allowed_ips(flags_or_file(
            &self.direct_allow_ips,
            &file.direct_allow_ips,
        ))
        .map_err(|e| invalid("--direct-allow-ip", e.to_string()))?;
        let mut known_clusters = Vec::new();
        for c in flags_or_file(&self.known_clusters, &file.known_clusters)
            .iter()
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
        {
            validate_cluster_name(c).map_err(|e| invalid("--known-cluster", e.to_string()))?;
            if !known_clusters.iter().any(|k| k == c) {
                known_clusters.push(c.to_owned());
            }
        }
        let default_cluster = self
            .default_cluster
            .clone()
            .or(file.default_cluster.clone());
        if let Some(c) = &default_cluster {
            validate_cluster_name(c).map_err(|e| invalid("--default-cluster", e.to_string()))?;
        }
        let suffix = self
            .cluster_suffix
            .clone()
            .or(file.cluster_suffix.clone())
            .unwrap_or_else(|| DEFAULT_CLUSTER_SUFFIX.into())
            .trim_matches('.')
            .to_ascii_lowercase();
        if suffix.is_empty() || !suffix.contains('.') {
            return Err(invalid(
                "--cluster-suffix",
                format!("{suffix:?} must be a dotted DNS suffix such as tunnel.internal"),
            ));
        }
        let log_format = match (self.log_format, file.log_format.as_deref()) {
            (Some(f), _) => f,
            (None, Some("json")) | (None, None) => LogFormat::Json,
            (None, Some("text")) => LogFormat::Text,
            (None, Some(other)) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: expected json or text"),
                ));
            }
        };
        let max_header_bytes = self
            .max_header_bytes
            .or(file.max_header_bytes)
            .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !(1024..=1024 * 1024).contains(&max_header_bytes) {
            return Err(invalid(
                "--max-header-bytes",
                "must be between 1024 and 1048576",
            ));
        }
        let max_headers = self
            .max_headers
            .or(file.max_headers)
            .unwrap_or(DEFAULT_MAX_HEADERS);
        if !(1..=1000).contains(&max_headers) {
            return Err(invalid("--max-headers", "must be between 1 and 1000"));
        }
        let open_timeout = dur(
            "--open-timeout",
            self.open_timeout,
            file.open_timeout.as_ref(),
            tunnel_proto::client::DEFAULT_OPEN_TIMEOUT,
        )?;
        let socket_buffer = match (self.socket_buffer, file.socket_buffer.as_deref()) {
            (Some(b), _) => b,
            (None, Some(s)) => {
                parse_socket_buffer(s).map_err(|e| invalid("socket_buffer", e.to_string()))?
            }
            (None, None) => 0,
        };
        Ok(SidecarConfig {
            socket_buffer,
            servers,
            server_name: self
                .servers
                .server_name
                .clone()
                .or(file.server_name.clone()),
            tls,
            token_file: self.token_file.clone().or(file.token_file.clone()),
            ports,
            proxy_listen,
            direct: DirectDialer {
                policy: direct_policy,
                host_aliases,
                allowed,
                timeout: open_timeout,
            },
            known_clusters,
            admin_listen,
            bind_address,
            naming: Naming {
                suffix,
                apiserver_host: self
                    .apiserver_host
                    .clone()
                    .or(file.apiserver_host.clone())
                    .unwrap_or_else(|| DEFAULT_APISERVER_HOST.into()),
                default_cluster,
            },
            cluster_refresh: dur(
                "--cluster-refresh",
                self.cluster_refresh,
                file.cluster_refresh.as_ref(),
                DEFAULT_CLUSTER_REFRESH,
            )?
            .max(Duration::from_millis(100)),
            header_timeout: dur(
                "--header-timeout",
                self.header_timeout,
                file.header_timeout.as_ref(),
                DEFAULT_HEADER_TIMEOUT,
            )?,
            max_header_bytes,
            max_headers,
            open_timeout,
            dead_peer_timeout: dur(
                "--dead-peer-timeout",
                self.dead_peer_timeout,
                file.dead_peer_timeout.as_ref(),
                tunnel_proto::net::DEFAULT_DEAD_PEER_TIMEOUT,
            )?,
            log_format,
            log_level: self
                .log_level
                .clone()
                .or(file.log_level.clone())
                .unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use tunnel_api::sidecar::{DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT};

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tunnel-sidecar").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn a_port_clash_names_both_users() {
        let err = cli(&["--server", "hub:8090", "--port", "17080=east"])
            .resolve()
            .unwrap_err();
        assert!(matches!(err, ConfigError::PortClash { .. }), "{err}");
        assert!(err.to_string().contains("--proxy-listen"), "{err}");
        let err = cli(&[
            "--server",
            "hub:8090",
            "--port",
            "17001=east",
            "--port",
            "17001=west",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("17001"), "{err}");
    }

    #[test]
    fn the_admin_port_may_face_prometheus() {
        let ok = cli(&["--server", "hub:8090", "--admin-listen", "0.0.0.0:17090"]).resolve();
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn non_loopback_needs_the_flag_and_no_direct_connections() {
        let err = cli(&["--server", "hub:8090", "--proxy-listen", "0.0.0.0:17080"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("--allow-non-loopback"), "{err}");
        // Beyond loopback, dialing anything for anyone would be an open proxy.
        let err = cli(&[
            "--server",
            "hub:8090",
            "--proxy-listen",
            "0.0.0.0:17080",
            "--allow-non-loopback",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--direct deny"), "{err}");
        let ok = cli(&[
            "--server",
            "hub:8090",
            "--proxy-listen",
            "0.0.0.0:17080",
            "--allow-non-loopback",
            "--direct",
            "deny",
        ])
        .resolve();
        assert!(ok.is_ok(), "{ok:?}");
        // Per-cluster ports reach one destination each: no direct question.
        let ok = cli(&[
            "--server",
            "hub:8090",
            "--bind-address",
            "0.0.0.0",
            "--port",
            "17001=east",
            "--allow-non-loopback",
        ])
        .resolve();
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn the_defaults_stay_clear_of_istio_and_linkerd() {
        // Istio's and Linkerd's documented ports inside a pod.
        const MESH_PORTS: [u16; 14] = [
            15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090, 4140, 4143, 4190,
            4191,
        ];
        let c = cli(&["--server", "hub:8090"]).resolve().unwrap();
        for port in [c.admin_listen.port(), c.proxy_listen.unwrap().port()] {
            assert!(!MESH_PORTS.contains(&port), "{port}");
            assert!(
                !(15000..=15090).contains(&port),
                "{port} is in Istio's range"
            );
        }
        assert_eq!(c.proxy_listen.unwrap().port(), DEFAULT_PROXY_PORT);
        assert_eq!(c.admin_listen.port(), DEFAULT_ADMIN_PORT);
        assert_eq!(c.direct.policy, DirectPolicy::Allow);
    }

    #[test]
    fn direct_and_host_aliases_come_from_flags_or_file() {
        let c = cli(&[
            "--server",
            "hub:8090",
            "--direct",
            "deny",
            "--host-alias",
            "backend=127.0.3.1,backend.team=127.0.3.1",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.direct.policy, DirectPolicy::Deny);
        assert_eq!(c.direct.host_aliases.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        std::fs::write(
            &path,
            "servers = [\"hub:8090\"]\ndirect = \"deny\"\nhost_aliases = [\"db=10.0.0.5\"]\n",
        )
        .unwrap();
        let c = cli(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(c.direct.policy, DirectPolicy::Deny);
        assert_eq!(
            c.direct.host_aliases.get("db"),
            Some(&"10.0.0.5".parse().unwrap())
        );
        std::fs::write(&path, "servers = [\"hub:8090\"]\ndirect = \"sometimes\"\n").unwrap();
        let err = cli(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("allow or deny"), "{err}");
        let err = cli(&["--server", "hub:8090", "--host-alias", "db"])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("--host-alias"), "{err}");
        let c = cli(&[
            "--server",
            "hub:8090",
            "--direct-allow-ip",
            "127.0.3.1,127.0.4.0/24",
            "--known-cluster",
            "east,west,east",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.direct.allowed.len(), 2);
        assert_eq!(c.known_clusters, ["east", "west"]);
        assert!(
            cli(&["--server", "hub:8090"])
                .resolve()
                .unwrap()
                .direct
                .allowed
                .is_empty(),
            "nothing refused is allowed by default"
        );
        for (flag, value) in [("--direct-allow-ip", "hub"), ("--known-cluster", "East")] {
            let err = cli(&["--server", "hub:8090", flag, value])
                .resolve()
                .unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn the_file_fills_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        std::fs::write(
            &path,
            "servers = [\"hub:8090\"]\nports = [\"17001=east\"]\ndefault_cluster = \"east\"\nheader_timeout = \"3s\"\n",
        )
        .unwrap();
        let c = cli(&[
            "--config",
            path.to_str().unwrap(),
            "--default-cluster",
            "west",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.servers, vec!["hub:8090"]);
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.naming.default_cluster.as_deref(), Some("west"));
        assert_eq!(c.header_timeout, Duration::from_secs(3));
    }

    #[test]
    fn unknown_file_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, "servers = [\"hub:8090\"]\nprot = [\"17001=east\"]\n").unwrap();
        let err = cli(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn a_server_is_required() {
        let err = cli(&[]).resolve().unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
    }
}
