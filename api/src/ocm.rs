//! The open-cluster-management resources the manager and the server read
//! and write, with only the fields they use (unknown fields are ignored when
//! read), and the names OCM's registration agent derives from them.
//!
//! - [`ManagedCluster`] (`cluster.open-cluster-management.io/v1`): a cluster
//!   joined to the hub; its name is the namespace of its addon objects.
//! - [`ManagedClusterAddOn`] (`addon.open-cluster-management.io/v1alpha1`):
//!   the addon enabled in one cluster, created by OCM's addon manager from
//!   the `ClusterManagementAddOn`'s install strategy (or by an administrator).
//! - [`ManagedClusterSet`] (`cluster.open-cluster-management.io/v1beta2`):
//!   a set of clusters, by the label [`CLUSTER_SET_LABEL`] or a label
//!   selector; the server's policies select clusters by set.
//! - [`AddOnDeploymentConfig`]: node placement, registries, proxy, install
//!   namespace and resources of the agent, as OCM's addon manager resolves it
//!   into the addon's `status.configReferences`.
//!
//! Registration: the addon's `status.registrations` names the signer
//! [`SIGNER_NAME`] and the subject [`agent_user`]; the cluster's registration
//! agent then makes a key in the managed cluster, sends a
//! `CertificateSigningRequest` to the hub, and keeps the signed certificate
//! and its key in the Secret [`REGISTRATION_SECRET`] of the install namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::CustomResource;
use kube::discovery::ApiResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Name of the addon: of the `ClusterManagementAddOn`, of every
/// `ManagedClusterAddOn`, and of the agent's health Lease.
pub const ADDON_NAME: &str = "cluster-tunnel";
/// The signer of agent certificates (the manager's CA).
pub const SIGNER_NAME: &str = "cluster-tunnel.io/agent";
/// The agent's name in its registration subject.
pub const AGENT_NAME: &str = "tunnel-agent";
/// Secret in the install namespace where OCM's registration agent keeps the
/// agent's key and certificate: `<addon>-<signer with '/' as '-'>-client-cert`.
pub const REGISTRATION_SECRET: &str = "cluster-tunnel-cluster-tunnel.io-agent-client-cert";
/// Label on CSRs (and other hub objects): the cluster they are for.
pub const CLUSTER_LABEL: &str = "open-cluster-management.io/cluster-name";
/// Label on CSRs and addon ManifestWorks: the addon they are for.
pub const ADDON_LABEL: &str = "open-cluster-management.io/addon-name";
/// Annotation of an addon's ManifestWork: the spec hashes of the
/// configurations it was built from, which OCM's addon manager compares with
/// the addon's desired configurations to report the rollout.
pub const CONFIG_SPEC_HASH_ANNOTATION: &str =
    "work.open-cluster-management.io/manifest-config-spec-hash";
/// Where OCM installs an addon when nothing says otherwise.
pub const DEFAULT_INSTALL_NAMESPACE: &str = "open-cluster-management-agent-addon";

/// The user name of `cluster`'s agent, as its certificate request carries
/// it (the addon-framework's default form).
pub fn agent_user(cluster: &str) -> String {
    format!(
        "system:open-cluster-management:cluster:{cluster}:addon:{ADDON_NAME}:agent:{AGENT_NAME}"
    )
}

/// The prefix of the user names `cluster`'s own registration agent has on
/// the hub (`system:open-cluster-management:<cluster>:<agent id>`).
pub fn cluster_user_prefix(cluster: &str) -> String {
    format!("system:open-cluster-management:{cluster}:")
}

/// The group every identity of `cluster`'s registration agent belongs to.
pub fn cluster_group(cluster: &str) -> String {
    format!("system:open-cluster-management:{cluster}")
}

/// The parts of a `ManagedCluster` the manager and the server read.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1",
    kind = "ManagedCluster",
    plural = "managedclusters"
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterSpec {
    /// Whether the hub accepted the cluster: without it the cluster gets no
    /// agent and no certificate.
    #[serde(default)]
    pub hub_accepts_client: bool,
}

impl ManagedCluster {
    /// Whether the cluster may have an agent: accepted and not being deleted.
    pub fn is_served(&self) -> bool {
        self.spec.hub_accepts_client && self.metadata.deletion_timestamp.is_none()
    }
}

/// The parts of a `ManagedClusterAddOn` the manager and the server read
/// (the server only its name and namespace, the cluster).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "addon.open-cluster-management.io",
    version = "v1alpha1",
    kind = "ManagedClusterAddOn",
    plural = "managedclusteraddons",
    namespaced,
    status = "ManagedClusterAddOnStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterAddOnSpec {}

/// The parts of a `ManagedClusterAddOn`'s status the manager reads.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterAddOnStatus {
    /// The conditions, as OCM's `metav1.Condition`s.
    #[serde(default)]
    pub conditions: Vec<serde_json::Value>,
    /// The configurations OCM's addon manager resolved for this addon.
    #[serde(default)]
    pub config_references: Vec<ConfigReference>,
}

/// One resolved configuration of an addon.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigReference {
    /// API group of the configuration.
    #[serde(default)]
    pub group: String,
    /// Resource (plural) of the configuration.
    #[serde(default)]
    pub resource: String,
    /// The configuration to apply and its spec hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_config: Option<ConfigSpecHash>,
}

/// A configuration by namespace, name and spec hash.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSpecHash {
    /// Namespace (empty: cluster-scoped).
    #[serde(default)]
    pub namespace: String,
    /// Name (always set by OCM; defaulted so that a status written
    /// without it cannot stop the server and manager reading the add-on).
    #[serde(default)]
    pub name: String,
    /// SHA-256 of its spec, computed by OCM's addon manager.
    #[serde(default)]
    pub spec_hash: String,
}

/// API group of addon configurations.
pub const ADDON_GROUP: &str = "addon.open-cluster-management.io";
/// Resource of `AddOnDeploymentConfig`s.
pub const DEPLOYMENT_CONFIG_RESOURCE: &str = "addondeploymentconfigs";

impl ManagedClusterAddOn {
    /// The `AddOnDeploymentConfig` OCM resolved for this addon, if any.
    pub fn desired_deployment_config(&self) -> Option<&ConfigSpecHash> {
        self.status
            .as_ref()?
            .config_references
            .iter()
            .find(|r| r.group == ADDON_GROUP && r.resource == DEPLOYMENT_CONFIG_RESOURCE)?
            .desired_config
            .as_ref()
    }

    /// The value of [`CONFIG_SPEC_HASH_ANNOTATION`] for a work built from
    /// these configurations (OCM's format: `<resource>.<group>/<ns>/<name>` to hash).
    pub fn config_spec_hashes(&self) -> BTreeMap<String, String> {
        let Some(status) = &self.status else {
            return BTreeMap::new();
        };
        status
            .config_references
            .iter()
            .filter_map(|r| {
                let d = r.desired_config.as_ref()?;
                let resource = if r.group.is_empty() {
                    r.resource.clone()
                } else {
                    format!("{}.{}", r.resource, r.group)
                };
                Some((
                    format!("{resource}/{}/{}", d.namespace, d.name),
                    d.spec_hash.clone(),
                ))
            })
            .collect()
    }
}

/// The parts of an `AddOnDeploymentConfig` the agent honours.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "addon.open-cluster-management.io",
    version = "v1alpha1",
    kind = "AddOnDeploymentConfig",
    plural = "addondeploymentconfigs",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct AddOnDeploymentConfigSpec {
    /// Variables; the agent reads `replicas` and `logLevel`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customized_variables: Vec<CustomizedVariable>,
    /// Node selector and tolerations of the agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_placement: Option<NodePlacement>,
    /// Image registry mirrors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<ImageMirror>,
    /// Proxy the agent dials the hub through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_config: Option<ProxyConfig>,
    /// Namespace of the agent in the managed cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_install_namespace: Option<String>,
    /// Resources of containers, by `<kind>:<name>:<container>` (`*` matches any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_requirements: Vec<ContainerResourceRequirements>,
}

/// A named value.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CustomizedVariable {
    /// Name.
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Where the pods run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePlacement {
    /// Node selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

/// An image registry replaced by a mirror.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ImageMirror {
    /// The mirror.
    pub mirror: String,
    /// The registry it replaces (empty: every registry).
    #[serde(default)]
    pub source: String,
}

/// Proxy settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// `HTTP_PROXY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// `HTTPS_PROXY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// `NO_PROXY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
}

/// Resources of the containers an id matches.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerResourceRequirements {
    /// `<kind>:<name>:<container>`, e.g. `deployments:cluster-tunnel-agent:agent` or `*:*:*`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The resources.
    pub resources: ResourceRequirements,
}

/// The label that puts a cluster in an exclusive cluster set.
pub const CLUSTER_SET_LABEL: &str = "cluster.open-cluster-management.io/clusterset";

/// A `ManagedClusterSet`: which clusters it holds.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1beta2",
    kind = "ManagedClusterSet",
    plural = "managedclustersets"
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterSetSpec {
    /// How the set selects its clusters.
    #[serde(default)]
    pub cluster_selector: ClusterSelector,
}

/// A cluster set's selector.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSelector {
    /// `ExclusiveClusterSetLabel` (default), `LegacyClusterSetLabel` or `LabelSelector`.
    #[serde(default)]
    pub selector_type: Option<String>,
    /// With `LabelSelector`: the clusters' labels to match.
    #[serde(default)]
    pub label_selector: Option<LabelSelector>,
}

/// A Kubernetes label selector.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Expressions that must all hold.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One expression of a label selector.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label.
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// The values of `In` and `NotIn`.
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` match; an unknown operator matches nothing.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// `ManifestWork`, for kube's dynamic API.
pub fn manifest_work_resource() -> ApiResource {
    ApiResource {
        group: "work.open-cluster-management.io".into(),
        version: "v1".into(),
        api_version: "work.open-cluster-management.io/v1".into(),
        kind: "ManifestWork".into(),
        plural: "manifestworks".into(),
    }
}

/// `ClusterManagementAddOn` (the addon's hub-wide registration), for kube's
/// dynamic API.
pub fn cluster_management_addon_resource() -> ApiResource {
    ApiResource {
        group: ADDON_GROUP.into(),
        version: "v1alpha1".into(),
        api_version: format!("{ADDON_GROUP}/v1alpha1"),
        kind: "ClusterManagementAddOn".into(),
        plural: "clustermanagementaddons".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_ocm_conventions() {
        assert_eq!(
            agent_user("east"),
            "system:open-cluster-management:cluster:east:addon:cluster-tunnel:agent:tunnel-agent"
        );
        // OCM's registration agent names the Secret after the addon and the signer.
        assert_eq!(
            REGISTRATION_SECRET,
            format!("{ADDON_NAME}-{}-client-cert", SIGNER_NAME.replace('/', "-"))
        );
    }

    #[test]
    fn the_desired_deployment_config_and_its_hash_come_from_the_status() {
        let addon: ManagedClusterAddOn = serde_json::from_value(json!({
            "apiVersion": "addon.open-cluster-management.io/v1alpha1",
            "kind": "ManagedClusterAddOn",
            "metadata": { "name": "cluster-tunnel", "namespace": "east" },
            "spec": {},
            "status": { "configReferences": [
                { "group": "addon.open-cluster-management.io", "resource": "addondeploymentconfigs",
                  "name": "old", "lastObservedGeneration": 1,
                  "desiredConfig": { "namespace": "fleet", "name": "agents", "specHash": "abc" } },
                { "group": "example.io", "resource": "others", "name": "x", "lastObservedGeneration": 1 },
            ] },
        }))
        .unwrap();
        let d = addon.desired_deployment_config().unwrap();
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("fleet", "agents"));
        assert_eq!(
            addon.config_spec_hashes(),
            BTreeMap::from([(
                "addondeploymentconfigs.addon.open-cluster-management.io/fleet/agents".to_string(),
                "abc".to_string()
            )])
        );
    }
}
