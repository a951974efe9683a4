//! What the injector writes and the sidecar reads: the sidecar's default
//! ports, its per-cluster loopback ports (`PORT=CLUSTER[:HOST:PORT]`, the
//! `--port` flag and the `cluster-tunnel.io/ports` annotation) and its
//! policy for destinations outside every cluster.

use std::net::IpAddr;
use std::str::FromStr;

use tunnel_identity::spiffe::validate_cluster_name;

/// Default port of the HTTP proxy. The sidecar's default ports stay clear of
/// the ports Istio (15000-15090) and Linkerd (4140-4191) reserve in a pod.
pub const DEFAULT_PROXY_PORT: u16 = 17080;
/// Default port of the admin endpoint (see [`DEFAULT_PROXY_PORT`]).
pub const DEFAULT_ADMIN_PORT: u16 = 17090;
/// Default in-cluster host of a cluster's kube-apiserver.
pub const DEFAULT_APISERVER_HOST: &str = "kubernetes.default.svc";
/// Default port of the kube-apiserver when a port mapping names only a cluster.
pub const DEFAULT_APISERVER_PORT: u16 = 443;

/// One per-cluster loopback port: `PORT=CLUSTER[:HOST:PORT]`; without a
/// destination, the cluster's kube-apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    /// The local port.
    pub port: u16,
    /// The cluster its connections go to.
    pub cluster: String,
    /// The destination's host inside that cluster.
    pub host: String,
    /// The destination's port.
    pub target_port: u16,
}

impl FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (port, dest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected PORT=CLUSTER or PORT=CLUSTER:HOST:PORT"))?;
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535)"))?;
        let dest = dest.trim();
        let (cluster, rest) = match dest.split_once(':') {
            Some((c, r)) => (c, Some(r)),
            None => (dest, None),
        };
        validate_cluster_name(cluster).map_err(|e| format!("{s:?}: {e}"))?;
        let (host, target_port) = match rest {
            None => (DEFAULT_APISERVER_HOST.to_owned(), DEFAULT_APISERVER_PORT),
            Some(r) => parse_host_port(r).map_err(|e| format!("{s:?}: {e}"))?,
        };
        Ok(Self {
            port,
            cluster: cluster.to_owned(),
            host,
            target_port,
        })
    }
}

/// Why a `host:port` destination does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// A `[`-bracketed IPv6 address without `]:PORT` after it.
    #[error("destination {0:?}: expected [IPv6]:PORT")]
    MissingV6Port(String),
    /// No `:PORT`.
    #[error("destination {0:?}: expected HOST:PORT")]
    MissingPort(String),
    /// The host is empty, has white space, or has colons without being an
    /// IPv6 address.
    #[error("destination {input:?}: invalid host {host:?}")]
    InvalidHost {
        /// The destination as given.
        input: String,
        /// Its host part.
        host: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("destination {input:?}: {port:?} is not a port (1-65535)")]
    InvalidPort {
        /// The destination as given.
        input: String,
        /// Its port part.
        port: String,
    },
}

// The error's text, for callers that carry it on as a message (a
// `TunnelError`'s text on the wire, a flag's complaint).
impl From<HostPortError> for String {
    fn from(err: HostPortError) -> Self {
        err.to_string()
    }
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_host_port(s: &str) -> Result<(String, u16), HostPortError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        rest.split_once("]:")
            .ok_or_else(|| HostPortError::MissingV6Port(s.to_owned()))?
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| HostPortError::MissingPort(s.to_owned()))?
    };
    if host.is_empty()
        || host.contains(':') && host.parse::<IpAddr>().is_err()
        || host.contains(char::is_whitespace)
    {
        return Err(HostPortError::InvalidHost {
            input: s.to_owned(),
            host: host.to_owned(),
        });
    }
    let port: u16 =
        port.parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| HostPortError::InvalidPort {
                input: s.to_owned(),
                port: port.to_owned(),
            })?;
    Ok((host.to_owned(), port))
}

/// Whether the proxy dials destinations outside the clusters itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DirectPolicy {
    /// Dial them from the pod (the default: hub traffic works as before).
    #[default]
    Allow,
    /// Refuse them (403 `destination_not_allowed`).
    Deny,
}

impl DirectPolicy {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectPolicy::Allow => "allow",
            DirectPolicy::Deny => "deny",
        }
    }
}

impl FromStr for DirectPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "allow" => Ok(DirectPolicy::Allow),
            "deny" => Ok(DirectPolicy::Deny),
            other => Err(format!("{other:?}: expected allow or deny")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(port: u16, cluster: &str, host: &str, target_port: u16) -> PortMapping {
        PortMapping {
            port,
            cluster: cluster.into(),
            host: host.into(),
            target_port,
        }
    }

    #[test]
    fn port_mappings_default_to_the_apiserver() {
        let m: PortMapping = "17001=east".parse().unwrap();
        assert_eq!(m, mapping(17001, "east", "kubernetes.default.svc", 443));
        let m: PortMapping = "17002=east:prometheus.monitoring.svc:9090".parse().unwrap();
        assert_eq!(m, mapping(17002, "east", "prometheus.monitoring.svc", 9090));
        let m: PortMapping = "17003=west:[fd00::1]:8443".parse().unwrap();
        assert_eq!(m, mapping(17003, "west", "fd00::1", 8443));
    }

    #[test]
    fn invalid_destinations_say_why() {
        for (spec, why) in [
            ("17001", "expected PORT=CLUSTER"),
            ("0=east", "not a port"),
            ("17001=East", "east"),
            ("17001=east:svc", "HOST:PORT"),
            ("17001=east:svc:http", "not a port"),
            ("17001=east:svc:70000", "not a port"),
        ] {
            let err = spec.parse::<PortMapping>().unwrap_err();
            assert!(
                err.to_lowercase().contains(&why.to_lowercase()),
                "{spec}: {err}"
            );
        }
    }

    #[test]
    fn a_destination_names_what_is_wrong_with_it() {
        assert_eq!(parse_host_port("[::1]:443"), Ok(("::1".to_owned(), 443)));
        assert_eq!(
            parse_host_port("[::1]443"),
            Err(HostPortError::MissingV6Port("[::1]443".into()))
        );
        assert_eq!(
            parse_host_port("backend"),
            Err(HostPortError::MissingPort("backend".into()))
        );
        assert!(matches!(
            parse_host_port("a b:80"),
            Err(HostPortError::InvalidHost { host, .. }) if host == "a b"
        ));
        let err = parse_host_port("backend:0").unwrap_err();
        assert!(matches!(&err, HostPortError::InvalidPort { port, .. } if port == "0"));
        assert_eq!(
            err.to_string(),
            "destination \"backend:0\": \"0\" is not a port (1-65535)"
        );
    }

    #[test]
    fn the_direct_policy_reads_its_two_values_and_names_them_when_wrong() {
        assert_eq!(" deny ".parse(), Ok(DirectPolicy::Deny));
        assert_eq!("allow".parse(), Ok(DirectPolicy::Allow));
        let err = "block".parse::<DirectPolicy>().unwrap_err();
        assert!(err.contains("allow or deny"), "{err}");
        assert_eq!(DirectPolicy::default().as_str(), "allow");
    }
}
