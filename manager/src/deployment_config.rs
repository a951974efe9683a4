//! An `AddOnDeploymentConfig` turned into what changes in the agent's
//! Deployment, the way OCM's addon-framework applies it to the addons built
//! on it: node selector and tolerations, image registry mirrors, proxy
//! variables, install namespace, container resources (by
//! `<kind>:<name>:<container>`, `*` matching any, the last match winning),
//! and the customized variables `replicas` and `logLevel`.
//!
//! A value the agent cannot use (a replica count that is not a positive
//! number) is an error naming the field, reported on the addon, and nothing
//! is delivered until it is fixed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};

use tunnel_api::ocm::{AddOnDeploymentConfigSpec, ImageMirror, ProxyConfig};

/// Kind and name of the agent's Deployment and its container, as a
/// `containerID` of `resourceRequirements` names them.
pub const AGENT_CONTAINER_ID: [&str; 3] = ["deployments", "cluster-tunnel-agent", "agent"];

/// A deployment config the agent cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("AddOnDeploymentConfig {config}: {field}: {reason}")]
pub struct ConfigError {
    /// `<namespace>/<name>` of the config.
    pub config: String,
    /// The field at fault.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// What a deployment config changes in the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentOverrides {
    /// Namespace of the agent (`agentInstallNamespace`).
    pub namespace: Option<String>,
    /// Node selector of the agent pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the agent pods.
    pub tolerations: Vec<Toleration>,
    /// Image registry mirrors.
    pub registries: Vec<ImageMirror>,
    /// Proxy variables of the agent container.
    pub proxy: Option<ProxyConfig>,
    /// Resources of the agent container.
    pub resources: Option<ResourceRequirements>,
    /// Agents per cluster (customized variable `replicas`).
    pub replicas: Option<i32>,
    /// Log filter (customized variable `logLevel`).
    pub log_level: Option<String>,
}

impl AgentOverrides {
    /// The overrides of `spec`, the config `<name>` (`namespace/name`).
    pub fn from_config(name: &str, spec: &AddOnDeploymentConfigSpec) -> Result<Self, ConfigError> {
        let err = |field: String, reason: String| ConfigError {
            config: name.to_owned(),
            field,
            reason,
        };
        let mut out = AgentOverrides {
            namespace: spec
                .agent_install_namespace
                .clone()
                .filter(|n| !n.is_empty()),
            registries: spec.registries.clone(),
            proxy: spec.proxy_config.clone().filter(|p| {
                p.http_proxy.is_some() || p.https_proxy.is_some() || p.no_proxy.is_some()
            }),
            ..Default::default()
        };
        // The agent reaches the hub through an http:// proxy (HTTP CONNECT);
        // one reached over TLS (and its proxyConfig.caBundle) it cannot use.
        if let Some(url) = out.proxy.as_ref().and_then(|p| p.https_proxy.as_deref())
            && let Some((scheme, _)) = url.split_once("://")
            && !scheme.eq_ignore_ascii_case("http")
        {
            return Err(err(
                "proxyConfig.httpsProxy".into(),
                format!(
                    "{scheme}:// is not supported; the agent dials the hub through an http:// proxy (HTTP CONNECT)"
                ),
            ));
        }
        if let Some(p) = &spec.node_placement {
            out.node_selector = p.node_selector.clone().unwrap_or_default();
            out.tolerations = p.tolerations.clone().unwrap_or_default();
        }
        for (i, r) in spec.resource_requirements.iter().enumerate() {
            let parts: Vec<&str> = r.container_id.split(':').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
                return Err(err(
                    format!("resourceRequirements[{i}].containerID"),
                    format!("{:?} is not <kind>:<name>:<container>", r.container_id),
                ));
            }
            let matches = parts
                .iter()
                .zip(AGENT_CONTAINER_ID)
                .all(|(want, have)| *want == "*" || *want == have);
            if matches {
                out.resources = Some(r.resources.clone());
            }
        }
        for (i, v) in spec.customized_variables.iter().enumerate() {
            match v.name.as_str() {
                "replicas" => {
                    let n = v.value.trim().parse::<i32>().ok().filter(|n| *n >= 1);
                    out.replicas = Some(n.ok_or_else(|| {
                        err(
                            format!("customizedVariables[{i}] (replicas)"),
                            format!("{:?} is not a number of agents (1 or more)", v.value),
                        )
                    })?);
                }
                "logLevel" => out.log_level = Some(v.value.clone()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// `image` with the first matching registry replaced by its mirror
    /// (OCM's rule: a mirror without a source replaces every registry; the
    /// last matching mirror wins).
    pub fn image(&self, image: &str) -> String {
        let mut out = image.to_owned();
        for m in &self.registries {
            let replaced = mirror_image(&m.source, &m.mirror, image);
            if replaced != image {
                out = replaced;
            }
        }
        out
    }
}

fn mirror_image(source: &str, mirror: &str, image: &str) -> String {
    let source = source.trim_end_matches('/');
    let mirror = mirror.trim_end_matches('/');
    if source.is_empty() {
        let name_tag = image.rsplit('/').next().unwrap_or(image);
        return if mirror.is_empty() {
            name_tag.to_owned()
        } else {
            format!("{mirror}/{name_tag}")
        };
    }
    match image.strip_prefix(source) {
        Some(rest) => format!("{mirror}{rest}"),
        None => image.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> AddOnDeploymentConfigSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_supported_field_changes_the_agent() {
        let o = AgentOverrides::from_config(
            "fleet/agents",
            &spec(json!({
                "agentInstallNamespace": "tunnel",
                "nodePlacement": {
                    "nodeSelector": { "role": "infra" },
                    "tolerations": [{ "key": "infra", "operator": "Exists", "effect": "NoSchedule" }],
                },
                "registries": [{ "source": "ghcr.io/cluster-tunnel", "mirror": "mirror.example.com/ct" }],
                "proxyConfig": { "httpsProxy": "http://proxy:3128", "noProxy": ".svc" },
                "resourceRequirements": [
                    { "containerID": "*:*:*", "resources": { "requests": { "cpu": "10m" } } },
                    { "containerID": "deployments:cluster-tunnel-agent:agent", "resources": { "requests": { "cpu": "200m" } } },
                    { "containerID": "deployments:other:agent", "resources": { "requests": { "cpu": "9" } } },
                ],
                "customizedVariables": [{ "name": "replicas", "value": "3" }, { "name": "logLevel", "value": "debug" }],
            })),
        )
        .unwrap();
        assert_eq!(o.namespace.as_deref(), Some("tunnel"));
        assert_eq!(o.node_selector["role"], "infra");
        assert_eq!(o.tolerations.len(), 1);
        assert_eq!(
            o.image("ghcr.io/cluster-tunnel/tunnel-agent:1.0"),
            "mirror.example.com/ct/tunnel-agent:1.0"
        );
        assert_eq!(o.image("quay.io/other:1"), "quay.io/other:1");
        assert_eq!(
            o.proxy.as_ref().unwrap().https_proxy.as_deref(),
            Some("http://proxy:3128")
        );
        // The last matching entry wins; another Deployment's does not match.
        let cpu = &o.resources.unwrap().requests.unwrap()["cpu"];
        assert_eq!(cpu.0, "200m");
        assert_eq!(o.replicas, Some(3));
        assert_eq!(o.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn a_mirror_without_a_source_replaces_every_registry() {
        let o = AgentOverrides {
            registries: vec![ImageMirror {
                source: String::new(),
                mirror: "mirror.example.com/".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            o.image("ghcr.io/cluster-tunnel/tunnel-agent:1"),
            "mirror.example.com/tunnel-agent:1"
        );
    }

    #[test]
    fn values_the_agent_cannot_use_name_the_field() {
        let e = AgentOverrides::from_config(
            "fleet/agents",
            &spec(json!({ "customizedVariables": [{ "name": "replicas", "value": "zero" }] })),
        )
        .unwrap_err();
        assert_eq!(e.field, "customizedVariables[0] (replicas)");
        let e = AgentOverrides::from_config(
            "fleet/agents",
            &spec(json!({ "resourceRequirements": [{ "containerID": "agent", "resources": {} }] })),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("resourceRequirements[0].containerID"),
            "{e}"
        );
        // A proxy reached over TLS: the agent cannot dial through it.
        let e = AgentOverrides::from_config(
            "fleet/agents",
            &spec(json!({ "proxyConfig": { "httpsProxy": "https://proxy:3129", "caBundle": "Y2E=" } })),
        )
        .unwrap_err();
        assert_eq!(e.field, "proxyConfig.httpsProxy");
        assert!(e.reason.contains("https://"), "{e}");
    }
}
