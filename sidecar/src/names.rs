//! The HTTP proxy's naming scheme: whether a proxy request goes through the
//! tunnel (and to which cluster, host and port) or straight out of the pod.
//!
//! In order:
//! 1. `<host>.<cluster>.<suffix>` ([`tunnel_api::names`], the server's
//!    konnectivity and HTTP CONNECT entries read them alike): `<host>` in
//!    `<cluster>`, e.g. `prometheus.monitoring.svc.east.tunnel.internal:9090`.
//!    `<cluster>.<suffix>` alone is the cluster's kube-apiserver.
//! 2. A bare name that is a cluster the server lists, or one the pod names
//!    (`--known-cluster`) (`east:443`): that cluster's kube-apiserver, as in
//!    cluster-proxy. The cluster wins over a hub Service of the same name,
//!    which stays reachable as `<name>.<namespace>` or
//!    `<name>.<namespace>.svc`. Before the server's list was ever fetched,
//!    the proxy does not decide an unknown bare name at all
//!    ([`crate::clusters::ClusterCache::wait_first_list`]).
//! 3. A default cluster — the proxy URL's user name
//!    (`http://east@127.0.0.1:17080` makes clients send
//!    `Proxy-Authorization`), else the sidecar's `--default-cluster` — takes
//!    every other name into that cluster.
//! 4. Everything else — a hub Service by its short name, `name.namespace`,
//!    a pod or ClusterIP address, a public name — is dialed directly from
//!    the pod, as before the sidecar was injected ([`Route::Direct`]).

pub use tunnel_api::names::{DEFAULT_CLUSTER_SUFFIX, NameError, is_single_label};
use tunnel_api::names::{cluster_of, qualified};
use tunnel_api::sidecar::DEFAULT_APISERVER_HOST;
use tunnel_proto::client::Target;

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

/// Where one proxy request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the tunnel, to a destination in a cluster.
    Tunnel(Target),
    /// Straight out of the pod: a destination outside every cluster.
    Direct {
        /// The host as the client named it (a name or an IP address).
        host: String,
        /// The port.
        port: u16,
    },
}

impl Naming {
    /// Decides where `host:port` goes. `user_cluster` is the cluster named by
    /// the proxy user, `is_known_cluster` tells whether a single label is a
    /// cluster the server knows.
    pub fn route(
        &self,
        host: &str,
        port: u16,
        user_cluster: Option<&str>,
        is_known_cluster: impl Fn(&str) -> bool,
    ) -> Result<Route, NameError> {
        if let Some(named) = qualified(host, &self.suffix) {
            let named = named?;
            let host = named.host.as_deref().unwrap_or(&self.apiserver_host);
            return Ok(Route::Tunnel(Target::new(named.cluster, host, port)));
        }
        let trimmed = host.trim_end_matches('.');
        let lower = trimmed.to_ascii_lowercase();
        if is_single_label(&lower) && is_known_cluster(&lower) {
            return Ok(Route::Tunnel(Target::new(
                lower.clone(),
                &self.apiserver_host,
                port,
            )));
        }
        match user_cluster.or(self.default_cluster.as_deref()) {
            Some(c) => Ok(Route::Tunnel(Target::new(
                cluster_of(trimmed, c)?,
                trimmed,
                port,
            ))),
            None => Ok(Route::Direct {
                host: host.to_owned(),
                port,
            }),
        }
    }

    /// How a client names a destination in a cluster, for error messages.
    pub fn how_to_name_a_cluster(&self) -> String {
        format!(
            "name a destination in a cluster as <host>.<cluster>.{}, a bare cluster name, \
             or with a proxy user naming the cluster (http://<cluster>@<proxy>)",
            self.suffix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(c: &str) -> bool {
        c == "east" || c == "west"
    }

    fn tunnel(route: Result<Route, NameError>) -> Target {
        match route {
            Ok(Route::Tunnel(t)) => t,
            other => panic!("expected a tunnel route, got {other:?}"),
        }
    }

    fn direct(host: &str, port: u16) -> Result<Route, NameError> {
        Ok(Route::Direct {
            host: host.into(),
            port,
        })
    }

    #[test]
    fn qualified_names_carry_their_cluster() {
        let n = Naming::default();
        let t = tunnel(n.route(
            "prometheus.monitoring.svc.east.tunnel.internal",
            9090,
            None,
            known,
        ));
        assert_eq!(t, Target::new("east", "prometheus.monitoring.svc", 9090));
        // Case-insensitive suffix, trailing dot, host keeps its spelling.
        let t = tunnel(n.route("Hello.Default.svc.WEST.Tunnel.Internal.", 80, None, known));
        assert_eq!(t, Target::new("west", "Hello.Default.svc", 80));
        // The cluster alone is its kube-apiserver.
        let t = tunnel(n.route("east.tunnel.internal", 443, None, known));
        assert_eq!(t, Target::new("east", "kubernetes.default.svc", 443));
        // Qualified names win over the proxy user.
        let t = tunnel(n.route("a.b.svc.west.tunnel.internal", 80, Some("east"), known));
        assert_eq!(t.cluster, "west");
        // Unknown clusters still go to the tunnel: the server answers
        // unknown_cluster, which tells a typo from an outage.
        let t = tunnel(n.route("a.svc.north.tunnel.internal", 80, None, known));
        assert_eq!(t.cluster, "north");
    }

    #[test]
    fn a_bare_cluster_name_is_its_apiserver() {
        let n = Naming::default();
        let t = tunnel(n.route("east", 443, None, known));
        assert_eq!(t, Target::new("east", "kubernetes.default.svc", 443));
        let t = tunnel(n.route("EAST.", 443, None, known));
        assert_eq!(t.cluster, "east");
        // A known cluster's name wins over the proxy user's cluster.
        let t = tunnel(n.route("west", 443, Some("east"), known));
        assert_eq!(t, Target::new("west", "kubernetes.default.svc", 443));
    }

    #[test]
    fn hub_destinations_go_direct() {
        let n = Naming::default();
        // A hub Service by its short name: the single label is no cluster.
        assert_eq!(
            n.route("backend", 8080, None, known),
            direct("backend", 8080)
        );
        // By name.namespace, by its full name, by a ClusterIP or pod address.
        for host in [
            "backend.team",
            "backend.team.svc",
            "backend.team.svc.cluster.local",
            "10.96.0.10",
            "fd00::1",
            "example.com",
        ] {
            assert_eq!(n.route(host, 80, None, known), direct(host, 80), "{host}");
        }
        // A hub Service whose namespace has a cluster's name is not that cluster.
        assert_eq!(n.route("api.east", 80, None, known), direct("api.east", 80));
    }

    #[test]
    fn the_proxy_user_names_the_default_cluster() {
        let n = Naming::default();
        let t = tunnel(n.route("prometheus.monitoring.svc", 9090, Some("east"), known));
        assert_eq!(t, Target::new("east", "prometheus.monitoring.svc", 9090));
        // A single label that is not a cluster is a host in the default cluster.
        let t = tunnel(n.route("backend", 8080, Some("east"), known));
        assert_eq!(t, Target::new("east", "backend", 8080));
        // IP literals go to the default cluster.
        let t = tunnel(n.route("10.0.0.1", 80, Some("east"), known));
        assert_eq!(t, Target::new("east", "10.0.0.1", 80));
    }

    #[test]
    fn a_configured_default_cluster_applies_without_a_user() {
        let n = Naming {
            default_cluster: Some("west".into()),
            ..Naming::default()
        };
        let t = tunnel(n.route("api.example.svc", 80, None, known));
        assert_eq!(t.cluster, "west");
        let t = tunnel(n.route("api.example.svc", 80, Some("east"), known));
        assert_eq!(t.cluster, "east", "the proxy user wins");
    }

    #[test]
    fn invalid_cluster_names_are_explained() {
        let n = Naming::default();
        let e = n
            .route("x.Bad_Cluster.tunnel.internal", 80, None, known)
            .unwrap_err();
        assert!(matches!(e, NameError::BadCluster { .. }), "{e}");
        let e = n
            .route("example.com", 80, Some("Not Valid"), known)
            .unwrap_err();
        assert!(matches!(e, NameError::BadCluster { .. }), "{e}");
        assert!(n.how_to_name_a_cluster().contains("tunnel.internal"));
    }
}
