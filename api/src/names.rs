//! Names that say which cluster they are in, read alike wherever a client
//! names a destination by host (the sidecar's HTTP proxy, the server's
//! konnectivity and HTTP CONNECT entries):
//!
//! - `<host>.<cluster>.<suffix>` is `<host>` in `<cluster>`, e.g.
//!   `prometheus.monitoring.svc.east.tunnel.internal`;
//! - `<cluster>.<suffix>` alone is that cluster's kube-apiserver.
//!
//! The suffix (`tunnel.internal` by default) is a name under the `.internal`
//! top-level domain that ICANN reserved for private use, so it never
//! collides with a public name. Each entry adds its own rules for the other
//! names (a bare cluster name, cluster-proxy's `<cluster>.<namespace>`).

use tunnel_identity::spiffe::validate_cluster_name;

/// Default suffix of cluster-qualified names.
pub const DEFAULT_CLUSTER_SUFFIX: &str = "tunnel.internal";

/// Why a name could not be mapped to a destination.
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
}

/// A destination a name places in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InCluster {
    /// The cluster (lowercase, validated).
    pub cluster: String,
    /// The host inside it, as the name spells it; `None`: the cluster's
    /// kube-apiserver.
    pub host: Option<String>,
}

/// `cluster` (as spelled in `name`) as a valid cluster name.
pub fn cluster_of(name: &str, cluster: &str) -> Result<String, NameError> {
    validate_cluster_name(cluster).map_err(|e| NameError::BadCluster {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(cluster.to_owned())
}

/// What `host` names under `suffix` (case-insensitive, a trailing dot
/// ignored); `None` when it does not end in `.<suffix>`.
pub fn qualified(host: &str, suffix: &str) -> Option<Result<InCluster, NameError>> {
    let trimmed = host.trim_end_matches('.');
    let lower = trimmed.to_ascii_lowercase();
    let dotted_suffix = format!(".{}", suffix.to_ascii_lowercase());
    let rest = lower.strip_suffix(&dotted_suffix)?;
    Some(match rest.rsplit_once('.') {
        Some((inner, cluster)) if !inner.is_empty() => {
            cluster_of(trimmed, cluster).map(|cluster| InCluster {
                cluster,
                host: Some(trimmed[..inner.len()].to_owned()),
            })
        }
        _ => cluster_of(trimmed, rest).map(|cluster| InCluster {
            cluster,
            host: None,
        }),
    })
}

/// A name without dots (and not an IPv6 literal) that could be a cluster's.
pub fn is_single_label(lower: &str) -> bool {
    !lower.is_empty() && !lower.contains('.') && !lower.contains(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qualified_ok(host: &str) -> InCluster {
        qualified(host, DEFAULT_CLUSTER_SUFFIX)
            .expect("under the suffix")
            .expect("a valid name")
    }

    #[test]
    fn qualified_names_carry_their_cluster_and_host() {
        let d = qualified_ok("prometheus.monitoring.svc.east.tunnel.internal");
        assert_eq!(d.cluster, "east");
        assert_eq!(d.host.as_deref(), Some("prometheus.monitoring.svc"));
        // Case-insensitive suffix and cluster, trailing dot; the host keeps its spelling.
        let d = qualified_ok("Hello.Default.svc.WEST.Tunnel.Internal.");
        assert_eq!(d.cluster, "west");
        assert_eq!(d.host.as_deref(), Some("Hello.Default.svc"));
        // The cluster alone: its kube-apiserver.
        let d = qualified_ok("east.tunnel.internal");
        assert_eq!((d.cluster.as_str(), d.host), ("east", None));
        assert!(qualified("east", DEFAULT_CLUSTER_SUFFIX).is_none());
        assert!(qualified("api.example.com", DEFAULT_CLUSTER_SUFFIX).is_none());
        let bad = qualified("x.Bad_Cluster.tunnel.internal", DEFAULT_CLUSTER_SUFFIX);
        assert!(matches!(bad, Some(Err(NameError::BadCluster { .. }))));
    }

    #[test]
    fn single_labels_are_names_without_dots() {
        assert!(is_single_label("east"));
        for no in ["", "a.b", "fd00::1"] {
            assert!(!is_single_label(no), "{no}");
        }
    }
}
