//! The `TunnelConfiguration` resource (`cluster-tunnel.io/v1alpha1`,
//! cluster-scoped): how the hub side is installed and what every managed
//! cluster's agent looks like, like cluster-proxy's
//! `ManagedProxyConfiguration`. The CRD YAML is generated from these types
//! ([`crd_yaml`], `tunnel-manager crdgen`); the chart's copy is checked
//! against it by a test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::condition::Condition;
use crate::condition::transition_time;

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
    /// The sidecar injector's webhook configuration, kept by the manager;
    /// absent: the manager leaves webhooks alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injector: Option<InjectorSpec>,
}

/// The `MutatingWebhookConfiguration` of the sidecar injector. Its
/// `caBundle` is the injector's (or cert-manager's) to keep.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InjectorSpec {
    /// The injector's Service in the manager's namespace; also the name of
    /// the webhook configuration.
    pub service_name: String,
    /// Namespaces whose pods are injected carry this label with value `enabled`.
    #[serde(default = "default_namespace_label")]
    pub namespace_label: String,
    /// Namespaces never injected besides the manager's own.
    #[serde(default = "default_excluded_namespaces")]
    pub excluded_namespaces: Vec<String>,
    /// `Fail` (an opted-in pod waits for the injector rather than start
    /// without its sidecar) or `Ignore`. The webhook's `matchConditions`
    /// (Kubernetes 1.28+) send it only opted-in pods, so `Fail` holds no
    /// other pod.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Time the API server waits for the webhook, in seconds.
    #[serde(default = "default_webhook_timeout")]
    #[schemars(range(min = 1, max = 30))]
    pub timeout_seconds: i32,
    /// `namespace/name` of the cert-manager Certificate whose CA cert-manager's
    /// CA injector keeps in the `caBundle` (the annotation
    /// `cert-manager.io/inject-ca-from`); absent: the injector keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_inject_from: Option<String>,
}

/// A webhook's failure policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailurePolicy {
    /// Admit the pod without the sidecar.
    Ignore,
    /// Refuse the pod.
    #[default]
    Fail,
}

/// The proxy server. Everything but `image` and `entrypoint` has the
/// chart's default; the manager keeps the servers' Deployment, Services,
/// PodDisruptionBudget, ServiceAccount and RBAC as this says.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Container image of `tunnel-server`.
    pub image: String,
    /// Pull policy of the server container.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: PullPolicy,
    /// Secrets (in the manager's namespace) to pull the image with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// Number of replicas (every agent dials each of them).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Where agents reach the hub.
    pub entrypoint: Entrypoint,
    /// The servers' ports.
    #[serde(default)]
    pub ports: ServerPorts,
    /// Who may reach what: `Kubernetes` (TunnelPolicy objects decide, deny
    /// unless one allows; tokens checked with TokenReview) or `AllowAll`
    /// (authorization off, for trials).
    #[serde(default)]
    pub authorization: Authorization,
    /// With `Kubernetes` authorization: policies select clusters by their
    /// `ManagedCluster` labels and `ManagedClusterSet`s (the servers follow
    /// them, `--clusters-from-ocm`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clusters_from_open_cluster_management: bool,
    /// Time a destination gets to answer a dial (e.g. `10s`).
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: String,
    /// Time open connections get to finish on shutdown, in seconds (`30s`).
    #[serde(default = "default_drain_timeout")]
    #[schemars(regex(pattern = r"^[0-9]+s$"))]
    pub drain_timeout: String,
    /// A tunnel peer silent this long is declared dead (`20s`).
    #[serde(default = "default_dead_peer_timeout")]
    pub dead_peer_timeout: String,
    /// Secret with the servers' certificate (`tls.crt`, `tls.key`, `ca.crt`).
    #[serde(default = "default_server_tls_secret")]
    pub tls_secret_name: String,
    /// Spread of the replicas over nodes.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    /// Node selector of the server pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the server pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Resources of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Annotations of the agents' Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_service_annotations: BTreeMap<String, String>,
    /// PodDisruptionBudget: at most this many replicas down at once.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub pdb_max_unavailable: i32,
    /// Log format: `json` or `text`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Log filter.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

/// Image pull policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull when the node does not have the image.
    IfNotPresent,
    /// Pull on every start.
    Always,
    /// Never pull.
    Never,
}

/// The servers' ports.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerPorts {
    /// Port the agents dial (TLS, agent certificates only).
    #[schemars(range(min = 1, max = 65535))]
    pub agent: u16,
    /// Port the sidecars and other clients dial (TLS, client certificates only).
    #[schemars(range(min = 1, max = 65535))]
    pub client: u16,
    /// Port of `/healthz`, `/readyz` and `/metrics`.
    #[schemars(range(min = 1, max = 65535))]
    pub admin: u16,
}

impl Default for ServerPorts {
    fn default() -> Self {
        Self {
            agent: 8091,
            client: 8090,
            admin: 8092,
        }
    }
}

/// Authorization of the servers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Authorization {
    /// TunnelPolicy objects decide; sidecar tokens checked with TokenReview.
    #[default]
    Kubernetes,
    /// Authorization off: every client certificate reaches every cluster.
    AllowAll,
}

/// How server replicas are spread over nodes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AntiAffinity {
    /// Preferred: replicas may share a node when there is no other.
    #[default]
    Soft,
    /// Required: at most one replica per node.
    Hard,
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
    /// Resources of the agent container (an `AddOnDeploymentConfig` may
    /// override them per cluster); absent: the agent chart's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// PodDisruptionBudget of the agents: at most this many down at once.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub pdb_max_unavailable: i32,
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
    /// Lifetime of the certificates of agents registered through
    /// open-cluster-management, in days (at most `certificateValidityDays`).
    /// Short, so that a cluster detached from OCM keeps a working identity
    /// for days at most: its registration agent renews it when a fifth is
    /// left, and the manager signs no more once the cluster is gone.
    #[serde(default = "default_addon_validity_days")]
    #[schemars(range(min = 1))]
    pub addon_certificate_validity_days: u32,
}

impl Default for SignerSpec {
    fn default() -> Self {
        Self {
            secret_name: default_signer_secret(),
            certificate_validity_days: default_validity_days(),
            addon_certificate_validity_days: default_addon_validity_days(),
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
        let since = transition_time(&self.conditions, type_, status, now);
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
fn default_one() -> i32 {
    1
}
fn default_pull_policy() -> PullPolicy {
    PullPolicy::IfNotPresent
}
fn default_dial_timeout() -> String {
    "10s".into()
}
fn default_drain_timeout() -> String {
    "30s".into()
}
fn default_dead_peer_timeout() -> String {
    "20s".into()
}
fn default_server_tls_secret() -> String {
    "cluster-tunnel-server-tls".into()
}
fn default_log_format() -> String {
    "json".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_namespace_label() -> String {
    crate::labels::NAMESPACE_INJECTION.into()
}
fn default_excluded_namespaces() -> Vec<String> {
    vec!["kube-system".into()]
}
fn default_webhook_timeout() -> i32 {
    10
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

fn default_addon_validity_days() -> u32 {
    7
}

/// The CRD of [`TunnelConfiguration`] as YAML (`tunnel-manager crdgen`).
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
        assert_eq!(c.signer.addon_certificate_validity_days, 7);
    }
}
