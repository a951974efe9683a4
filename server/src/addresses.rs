//! The addresses konnectivity and HTTP CONNECT clients dial, read as a
//! cluster and a destination in it. These clients name only an address
//! (`host:port`), so the address says the cluster:
//!
//! | address | destination |
//! | --- | --- |
//! | `<host>.<cluster>.<suffix>:<port>` | `<host>:<port>` in `<cluster>` ([`tunnel_api::names`]) |
//! | `<cluster>.<suffix>:<port>` | `<cluster>`'s kube-apiserver, on `<port>` |
//! | `<cluster>:<port>` | the same: what cluster-proxy's users dial (`cfg.Host = clusterName`) |
//! | `<cluster>.<namespace>:<port>` | the same: cluster-proxy's other name for it (`<cluster>.<addon namespace>`), whatever the namespace |
//!
//! Anything else (an IP address, a longer name without the suffix) names
//! no cluster and is refused as `bad_request`. The kube-apiserver is
//! `--apiserver-host` in the cluster (`kubernetes.default.svc`).

use tunnel_api::names::{InCluster, cluster_of, is_single_label, qualified};
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::stream::Open;

/// How the server reads dialed addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// Suffix of cluster-qualified names, without leading dot.
    pub suffix: String,
    /// In-cluster host of every cluster's kube-apiserver.
    pub apiserver_host: String,
}

impl Default for Addressing {
    fn default() -> Self {
        Self {
            suffix: tunnel_api::names::DEFAULT_CLUSTER_SUFFIX.into(),
            apiserver_host: tunnel_api::sidecar::DEFAULT_APISERVER_HOST.into(),
        }
    }
}

impl Addressing {
    /// The open for `host:port` (`[v6]:port`), with a fresh connection id.
    pub fn open(&self, address: &str) -> Result<Open, TunnelError> {
        let (host, port) = tunnel_api::sidecar::parse_host_port(address)
            .map_err(|e| TunnelError::new(ErrorCode::BadRequest, e))?;
        self.open_host(&host, port)
    }

    /// The open for `host` and `port`.
    pub fn open_host(&self, host: &str, port: u16) -> Result<Open, TunnelError> {
        let bad = |reason: String| TunnelError::new(ErrorCode::BadRequest, reason);
        let named = match qualified(host, &self.suffix) {
            Some(named) => named.map_err(|e| bad(e.to_string()))?,
            None => {
                let trimmed = host.trim_end_matches('.');
                let lower = trimmed.to_ascii_lowercase();
                let cluster = match lower.split_once('.') {
                    None if is_single_label(&lower) => lower.as_str(),
                    // cluster-proxy's <cluster>.<addon namespace>.
                    Some((cluster, namespace)) if is_single_label(namespace) => cluster,
                    _ => {
                        return Err(bad(format!(
                            "{host:?} names no cluster: dial <cluster>:<port> (its kube-apiserver) \
                             or <host>.<cluster>.{}:<port>",
                            self.suffix
                        )));
                    }
                };
                InCluster {
                    cluster: cluster_of(trimmed, cluster).map_err(|e| bad(e.to_string()))?,
                    host: None,
                }
            }
        };
        let host = named.host.unwrap_or_else(|| self.apiserver_host.clone());
        Ok(Open::new(named.cluster, host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(address: &str) -> (String, String, u16) {
        let open = Addressing::default().open(address).expect(address);
        (open.cluster, open.host, open.port)
    }

    #[test]
    fn cluster_proxy_s_names_reach_the_kube_apiserver() {
        let api = |c: &str| (c.to_owned(), "kubernetes.default.svc".to_owned(), 443);
        assert_eq!(dest("east:443"), api("east"));
        assert_eq!(dest("EAST.:443"), api("east"));
        assert_eq!(
            dest("east.open-cluster-management-agent-addon:443"),
            api("east")
        );
        assert_eq!(dest("east.tunnel.internal:443"), api("east"));
    }

    #[test]
    fn qualified_names_reach_any_destination() {
        assert_eq!(
            dest("hello.default.svc.east.tunnel.internal:8080"),
            ("east".into(), "hello.default.svc".into(), 8080)
        );
        let custom = Addressing {
            suffix: "clusters.example".into(),
            apiserver_host: "10.96.0.1".into(),
        };
        let open = custom.open("db.west.clusters.example:5432").unwrap();
        assert_eq!((open.cluster.as_str(), open.host.as_str()), ("west", "db"));
        let open = custom.open("west:6443").unwrap();
        assert_eq!(open.host, "10.96.0.1");
    }

    #[test]
    fn addresses_that_name_no_cluster_are_bad_requests() {
        for bad in [
            "10.0.0.1:443",
            "[fd00::1]:443",
            "a.b.c:443",
            "east",
            "east:0",
            "Bad_Cluster:443",
            "x.Bad_Cluster.tunnel.internal:80",
        ] {
            let err = Addressing::default().open(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad}: {err}");
        }
    }
}
