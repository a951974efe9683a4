//! The `TunnelConfiguration` resource (`cluster-tunnel.io/v1alpha1`,
//! cluster-scoped): how the hub side is installed and what every managed
//! cluster's agent looks like, like cluster-proxy's
//! `ManagedProxyConfiguration`. The CRD YAML is generated from these types
//! ([`crd_yaml`], `tunnel-manager crdgen`); the chart's copy is checked
//! against it by a test.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the one configuration the manager reads.
pub const DEFAULT_NAME: &str = "cluster-tunnel";

/// The configuration of an installation.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cluster-tunnel.io",
    version = "v1alpha1",
    kind = "TunnelConfiguration",
    plural = "tunnelconfigurations",
    shortname = "tunnelconfig",
    status = "TunnelConfigurationStatus",
    printcolumn = r#"{"name":"Entrypoint","type":"string","jsonPath":".spec.server.entrypoint.type"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelConfigurationSpec {
    /// The proxy server on the hub.
    pub server: ServerSpec,
    /// The agent delivered to every managed cluster.
    pub agent: AgentSpec,
    /// Defaults of the injected sidecar.
    #[serde(default)]
    pub sidecar: SidecarDefaults,
    /// The CA that signs server and agent certificates.
    #[serde(default)]
    pub signer: SignerSpec,
}

/// The proxy server.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Container image of `tunnel-server`.
    pub image: String,
    /// Number of replicas (every agent dials each of them).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Where agents reach the hub.
    pub entrypoint: Entrypoint,
}

/// How agents reach the servers' agent port from outside the hub.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entrypoint {
    /// `LoadBalancerService` or `Hostname`.
    #[serde(rename = "type")]
    pub kind: EntrypointType,
    /// The LoadBalancer Service whose address agents dial (type `LoadBalancerService`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_service: Option<LoadBalancerServiceEntrypoint>,
    /// A fixed name agents dial (type `Hostname`), e.g. a DNS name in front of an ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<HostnameEntrypoint>,
}

/// The kinds of entrypoint.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EntrypointType {
    /// A LoadBalancer Service; its ingress address is what agents dial.
    LoadBalancerService,
    /// A fixed host name.
    Hostname,
}

/// A LoadBalancer Service entrypoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerServiceEntrypoint {
    /// The Service's name, in the manager's namespace.
    pub name: String,
}

/// A host name entrypoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostnameEntrypoint {
    /// The name agents dial; it is also put in the server certificate.
    pub value: String,
    /// The port agents dial.
    #[serde(default = "default_agent_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// The agent.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image of `tunnel-agent`.
    pub image: String,
    /// Agents per managed cluster.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Namespace the agent is installed in, in each managed cluster.
    #[serde(default = "default_agent_namespace")]
    pub namespace: String,
    /// The agent's `--allow` rules; empty: everything but loopback and link-local.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// Defaults of the injected sidecar.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarDefaults {
    /// Container image of `tunnel-sidecar`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Port of the sidecar's HTTP proxy on loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_port: Option<u16>,
    /// Log filter of the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// CPU request of the sidecar (a Kubernetes quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<String>,
    /// Memory request of the sidecar (a Kubernetes quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<String>,
}

/// The signer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignerSpec {
    /// Secret (`tls.crt`, `tls.key`) in the manager's namespace holding the
    /// CA; generated when absent.
    #[serde(default = "default_signer_secret")]
    pub secret_name: String,
    /// Lifetime of issued certificates, in days; each is renewed when a
    /// fifth of it is left.
    #[serde(default = "default_validity_days")]
    #[schemars(range(min = 1))]
    pub certificate_validity_days: u32,
}

impl Default for SignerSpec {
    fn default() -> Self {
        Self {
            secret_name: default_signer_secret(),
            certificate_validity_days: default_validity_days(),
        }
    }
}

/// What the manager observed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelConfigurationStatus {
    /// `SignerReady`, `AgentsDelivered`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition, as in `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type, in CamelCase.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Last time the status changed (RFC 3339).
    pub last_transition_time: String,
    /// Machine-readable reason, in CamelCase.
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl TunnelConfigurationStatus {
    /// Sets condition `type_`, keeping its `lastTransitionTime` when its
    /// status did not change. `now` is RFC 3339.
    pub fn set(
        &mut self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: String,
        generation: Option<i64>,
        now: &str,
    ) {
        let status = if ok { "True" } else { "False" };
        let since = self
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
        self.conditions.retain(|c| c.type_ != type_);
        self.conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: since,
            reason: reason.into(),
            message,
            observed_generation: generation,
        });
        self.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        self.observed_generation = generation;
    }
}

fn default_replicas() -> i32 {
    1
}
fn default_agent_port() -> u16 {
    443
}
fn default_agent_namespace() -> String {
    "cluster-tunnel-agent".into()
}
fn default_signer_secret() -> String {
    "cluster-tunnel-signer".into()
}
fn default_validity_days() -> u32 {
    90
}

/// The CRDs this crate defines, as one multi-document YAML text.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crd = TunnelConfiguration::crd();
    format!(
        "# Generated by `tunnel-manager crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_is_cluster_scoped_with_a_status_subresource() {
        use kube::CustomResourceExt as _;
        let crd = TunnelConfiguration::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "cluster-tunnel.io");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut status = TunnelConfigurationStatus::default();
        status.set("SignerReady", true, "Loaded", String::new(), Some(1), "t1");
        status.set("SignerReady", true, "Loaded", String::new(), Some(2), "t2");
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(status.conditions[0].last_transition_time, "t1");
        status.set("SignerReady", false, "Broken", "why".into(), Some(2), "t3");
        assert_eq!(status.conditions[0].last_transition_time, "t3");
        assert_eq!(status.observed_generation, Some(2));
    }

    #[test]
    fn a_minimal_configuration_gets_its_defaults() {
        let c: TunnelConfigurationSpec = serde_json::from_value(serde_json::json!({
            "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com" } } },
            "agent": { "image": "a:1" },
        }))
        .unwrap();
        assert_eq!(c.server.replicas, 1);
        assert_eq!(c.server.entrypoint.hostname.unwrap().port, 443);
        assert_eq!(c.agent.namespace, "cluster-tunnel-agent");
        assert_eq!(c.signer.secret_name, "cluster-tunnel-signer");
        assert_eq!(c.signer.certificate_validity_days, 90);
    }
}
