//! The app's environment: the proxy variables (both spellings of each) and
//! the cluster addresses `CLUSTER_TUNNEL_<CLUSTER>[_<HOST>_<PORT>]_ADDR`
//! every app container gets, unless it sets them itself.

use crate::annotations::PodOptions;

use super::SidecarTemplate;

/// Entries of `NO_PROXY` before the API server's host and the extra ones:
/// loopback and the cluster's own services stay direct.
pub const BASE_NO_PROXY: [&str; 5] = ["localhost", "127.0.0.1", "::1", ".svc", ".cluster.local"];
/// The proxy variables, in pairs of the two spellings programs read.
pub(super) const PROXY_VARS: [(&str, &str); 3] = [
    ("HTTP_PROXY", "http_proxy"),
    ("HTTPS_PROXY", "https_proxy"),
    ("NO_PROXY", "no_proxy"),
];

/// The variables every app container gets (unless it sets them itself).
pub(super) fn app_env(options: &PodOptions, template: &SidecarTemplate) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let (true, Some(port)) = (options.set_proxy_env, options.proxy_port) {
        let url = format!("http://127.0.0.1:{port}");
        let no_proxy = template.no_proxy.join(",");
        for ((upper, lower), value) in PROXY_VARS.iter().zip([&url, &url, &no_proxy]) {
            env.push(((*upper).to_owned(), value.clone()));
            env.push(((*lower).to_owned(), value.clone()));
        }
    }
    for (name, value) in cluster_port_env(options) {
        if !env.iter().any(|(n, _)| *n == name) {
            env.push((name, value));
        }
    }
    env
}

/// `CLUSTER_TUNNEL_<CLUSTER>_ADDR` for the first port of each cluster, and
/// `CLUSTER_TUNNEL_<CLUSTER>_<HOST>_<PORT>_ADDR` for every port.
pub fn cluster_port_env(options: &PodOptions) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (_, mapping) in &options.ports {
        let addr = format!("127.0.0.1:{}", mapping.port);
        let cluster = env_token(&mapping.cluster);
        let short = format!("CLUSTER_TUNNEL_{cluster}_ADDR");
        let long = format!(
            "CLUSTER_TUNNEL_{cluster}_{}_{}_ADDR",
            env_token(&mapping.host),
            mapping.target_port
        );
        for name in [short, long] {
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, addr.clone()));
            }
        }
    }
    out
}

/// Upper case, every character other than a letter or digit turned into `_`.
fn env_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tunnel_api::annotations;

    use super::*;
    use crate::inject::tests::template;

    #[test]
    fn cluster_addresses_are_named_after_cluster_and_destination() {
        let o = PodOptions::from_annotations(
            &[(
                annotations::PORTS.to_owned(),
                "17001=us-east-1,17002=us-east-1:prometheus.monitoring.svc:9090,17003=west:[fd00::1]:8443"
                    .to_owned(),
            )]
            .into(),
            &template().defaults,
            17090,
        )
        .unwrap();
        let env = cluster_port_env(&o);
        let expect = [
            ("CLUSTER_TUNNEL_US_EAST_1_ADDR", "127.0.0.1:17001"),
            (
                "CLUSTER_TUNNEL_US_EAST_1_KUBERNETES_DEFAULT_SVC_443_ADDR",
                "127.0.0.1:17001",
            ),
            (
                "CLUSTER_TUNNEL_US_EAST_1_PROMETHEUS_MONITORING_SVC_9090_ADDR",
                "127.0.0.1:17002",
            ),
            ("CLUSTER_TUNNEL_WEST_ADDR", "127.0.0.1:17003"),
            ("CLUSTER_TUNNEL_WEST_FD00__1_8443_ADDR", "127.0.0.1:17003"),
        ];
        assert_eq!(
            env,
            expect.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec()
        );
    }
}
