//! The HTTP proxy's naming scheme: which cluster, host and port a proxy
//! request names.
//!
//! In order:
//! 1. `<host>.<cluster>.<suffix>` (suffix `tunnel.internal` by default, a
//!    name under the `.internal` top-level domain that ICANN reserved for
//!    private use, so it never collides with a public name): `<host>` in
//!    `<cluster>`, e.g. `prometheus.monitoring.svc.east.tunnel.internal:9090`.
//!    `<cluster>.<suffix>` alone is the cluster's kube-apiserver.
//! 2. A bare cluster name (`east:443`, a single label that is a known
//!    cluster, or any single label when no default cluster is set): that
//!    cluster's kube-apiserver, as in cluster-proxy.
//! 3. Anything else goes to the default cluster: the proxy URL's user name
//!    (`http://east@127.0.0.1:15080` makes clients send
//!    `Proxy-Authorization`), else the sidecar's `--default-cluster`.
//! 4. Otherwise the request is refused (400) with this explanation.

use tunnel_proto::client::Target;
use tunnel_proto::identity::validate_cluster_name;

/// Default suffix of cluster-qualified names.
pub const DEFAULT_CLUSTER_SUFFIX: &str = "tunnel.internal";
/// Default in-cluster host of a cluster's kube-apiserver.
pub const DEFAULT_APISERVER_HOST: &str = "kubernetes.default.svc";

/// How names are read.
#[derive(Debug, Clone)]
pub struct Naming {
    /// Suffix of cluster-qualified names, without leading dot.
    pub suffix: String,
    /// In-cluster host of the kube-apiserver.
    pub apiserver_host: String,
    /// Cluster of unqualified names when the client names none.
    pub default_cluster: Option<String>,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            suffix: DEFAULT_CLUSTER_SUFFIX.into(),
            apiserver_host: DEFAULT_APISERVER_HOST.into(),
            default_cluster: None,
        }
    }
}

/// Why a name could not be mapped to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The cluster part is not a valid cluster name.
    #[error("{name:?}: {reason}")]
    BadCluster {
        /// The name as given.
        name: String,
        /// Why.
        reason: String,
    },
    /// Nothing says which cluster the name is in.
    #[error(
        "cannot tell which cluster {host:?} is in: use <host>.<cluster>.{suffix}, a bare cluster name, \
         or a proxy user naming the cluster (http://<cluster>@<proxy>)"
    )]
    NoCluster {
        /// The host as given.
        host: String,
        /// The configured suffix.
        suffix: String,
    },
}

impl Naming {
    /// Maps `host:port` to a target. `user_cluster` is the cluster named by the
    /// proxy user, `is_known_cluster` tells whether a single label is a
    /// cluster the server knows.
    pub fn resolve(
        &self,
        host: &str,
        port: u16,
        user_cluster: Option<&str>,
        is_known_cluster: impl Fn(&str) -> bool,
    ) -> Result<Target, NameError> {
        let host = host.trim_end_matches('.');
        let lower = host.to_ascii_lowercase();
        let cluster_of = |c: &str| -> Result<String, NameError> {
            validate_cluster_name(c).map_err(|e| NameError::BadCluster {
                name: host.to_owned(),
                reason: e.to_string(),
            })?;
            Ok(c.to_owned())
        };
        let dotted_suffix = format!(".{}", self.suffix.to_ascii_lowercase());
        if let Some(rest) = lower.strip_suffix(&dotted_suffix) {
            return match rest.rsplit_once('.') {
                Some((inner, cluster)) if !inner.is_empty() => Ok(Target::new(
                    cluster_of(cluster)?,
                    &host[..inner.len()],
                    port,
                )),
                _ => Ok(Target::new(cluster_of(rest)?, &self.apiserver_host, port)),
            };
        }
        let default = user_cluster.or(self.default_cluster.as_deref());
        let single_label = !lower.is_empty() && !lower.contains('.') && !lower.contains(':');
        if single_label && (is_known_cluster(&lower) || default.is_none()) {
            return Ok(Target::new(cluster_of(&lower)?, &self.apiserver_host, port));
        }
        match default {
            Some(c) => Ok(Target::new(cluster_of(c)?, host, port)),
            None => Err(NameError::NoCluster {
                host: host.to_owned(),
                suffix: self.suffix.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(c: &str) -> bool {
        c == "east" || c == "west"
    }

    #[test]
    fn qualified_names_carry_their_cluster() {
        let n = Naming::default();
        let t = n
            .resolve(
                "prometheus.monitoring.svc.east.tunnel.internal",
                9090,
                None,
                known,
            )
            .unwrap();
        assert_eq!(t, Target::new("east", "prometheus.monitoring.svc", 9090));
        // Case-insensitive suffix, trailing dot, host keeps its spelling.
        let t = n
            .resolve("Hello.Default.svc.WEST.Tunnel.Internal.", 80, None, known)
            .unwrap();
        assert_eq!(t, Target::new("west", "Hello.Default.svc", 80));
        // The cluster alone is its kube-apiserver.
        let t = n.resolve("east.tunnel.internal", 443, None, known).unwrap();
        assert_eq!(t, Target::new("east", "kubernetes.default.svc", 443));
        // Qualified names win over the proxy user.
        let t = n
            .resolve("a.b.svc.west.tunnel.internal", 80, Some("east"), known)
            .unwrap();
        assert_eq!(t.cluster, "west");
    }

    #[test]
    fn a_bare_cluster_name_is_its_apiserver() {
        let n = Naming::default();
        let t = n.resolve("east", 443, None, known).unwrap();
        assert_eq!(t, Target::new("east", "kubernetes.default.svc", 443));
        // Unknown single labels without a default are still read as clusters
        // (the server then answers "unknown cluster").
        let t = n.resolve("north", 443, None, known).unwrap();
        assert_eq!(t.cluster, "north");
    }

    #[test]
    fn the_proxy_user_names_the_default_cluster() {
        let n = Naming::default();
        let t = n
            .resolve("prometheus.monitoring.svc", 9090, Some("east"), known)
            .unwrap();
        assert_eq!(t, Target::new("east", "prometheus.monitoring.svc", 9090));
        // A single label that is not a cluster is a host in the default cluster.
        let t = n.resolve("backend", 8080, Some("east"), known).unwrap();
        assert_eq!(t, Target::new("east", "backend", 8080));
        // ... but a known cluster's name is still that cluster.
        let t = n.resolve("west", 443, Some("east"), known).unwrap();
        assert_eq!(t, Target::new("west", "kubernetes.default.svc", 443));
        // IP literals go to the default cluster.
        let t = n.resolve("10.0.0.1", 80, Some("east"), known).unwrap();
        assert_eq!(t, Target::new("east", "10.0.0.1", 80));
    }

    #[test]
    fn a_configured_default_cluster_applies_without_a_user() {
        let n = Naming {
            default_cluster: Some("west".into()),
            ..Naming::default()
        };
        let t = n.resolve("api.example.svc", 80, None, known).unwrap();
        assert_eq!(t.cluster, "west");
        let t = n
            .resolve("api.example.svc", 80, Some("east"), known)
            .unwrap();
        assert_eq!(t.cluster, "east", "the proxy user wins");
    }

    #[test]
    fn names_without_a_cluster_are_explained() {
        let n = Naming::default();
        let e = n.resolve("example.com", 80, None, known).unwrap_err();
        assert!(e.to_string().contains("tunnel.internal"), "{e}");
        let e = n
            .resolve("x.Bad_Cluster.tunnel.internal", 80, None, known)
            .unwrap_err();
        assert!(matches!(e, NameError::BadCluster { .. }), "{e}");
        let e = n
            .resolve("example.com", 80, Some("Not Valid"), known)
            .unwrap_err();
        assert!(matches!(e, NameError::BadCluster { .. }), "{e}");
    }
}
