//! The [`TunnelPolicy`] resource (`cluster-tunnel.io/v1alpha1`,
//! cluster-scoped): which subjects may reach which clusters and
//! destinations. Deny unless a rule allows.
//!
//! Cluster-scoped because a policy grants access to *other* clusters: a
//! namespaced policy would let whoever can write in a namespace grant its own
//! workloads access. Only the hub's administrators write policies. The same
//! `spec` is the top level of a standalone policy file. The CRD validates
//! what it can before an object is stored (CEL rules: one kind of subject,
//! cluster selector and destination each; ports in range; at least one rule,
//! subject and cluster); the servers compile the rest
//! (`tunnel_server::policy`) and report each object's `Accepted` condition.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// A set of rules allowing subjects to reach destinations in clusters.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cluster-tunnel.io",
    version = "v1alpha1",
    kind = "TunnelPolicy",
    plural = "tunnelpolicies",
    shortname = "tunpol",
    status = "TunnelPolicyStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Accepted\")].message"}"#,
    doc = "Allows workloads on the hub to reach destinations in managed clusters through cluster-tunnel. Deny unless a rule allows."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelPolicySpec {
    /// Each rule allows its subjects to reach its destinations in its clusters.
    #[schemars(length(min = 1, max = 256))]
    pub rules: Vec<PolicyRule>,
}

/// What the servers observed of a policy: its `Accepted` condition (false
/// with the field at fault when it does not compile; it then grants nothing).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelPolicyStatus {
    /// `Accepted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One rule: subjects x clusters x destinations.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// Name of the rule, shown in the audit log (default: its index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who the rule is for (at least one).
    #[schemars(length(min = 1, max = 64))]
    pub subjects: Vec<SubjectSelector>,
    /// Which clusters (at least one).
    #[schemars(length(min = 1, max = 64))]
    pub clusters: Vec<ClusterSelector>,
    /// Which destinations in those clusters; none listed means any destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub destinations: Vec<DestinationSelector>,
}

/// A subject: exactly one field set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.serviceAccount) ? 1 : 0) + (has(self.namespace) ? 1 : 0) + (has(self.identity) ? 1 : 0) == 1",
    "message": "exactly one of serviceAccount, namespace, identity must be set",
}]))]
pub struct SubjectSelector {
    /// A service account, `<namespace>/<name>` (from a token or a workload certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Every service account of a namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A certificate identity in path form: `client/<name>` or `ns/<ns>/sa/<sa>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Clusters: by name (`*` for all), by labels or by cluster set; exactly one field set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.name) ? 1 : 0) + (has(self.matchLabels) ? 1 : 0) + (has(self.clusterSet) ? 1 : 0) == 1",
    "message": "exactly one of name, matchLabels, clusterSet must be set",
}, {
    "rule": "!has(self.matchLabels) || size(self.matchLabels) > 0",
    "message": "matchLabels must name at least one label (use name: \"*\" for every cluster)",
}]))]
pub struct ClusterSelector {
    /// A cluster name, or `*` for every cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels the cluster must carry, all of them: its `ManagedCluster`'s
    /// labels (with `--clusters-from-ocm`) and the server's `--cluster-label`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// An open-cluster-management `ManagedClusterSet`: every cluster in it
    /// (with `--clusters-from-ocm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_set: Option<String>,
}

/// Destinations: a host pattern or a CIDR (exactly one), on some ports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.host) ? 1 : 0) + (has(self.cidr) ? 1 : 0) == 1",
    "message": "exactly one of host, cidr must be set",
}]))]
pub struct DestinationSelector {
    /// A host name (`kubernetes.default.svc`), a wildcard (`*.monitoring.svc`,
    /// which matches any name ending so) or `*`; matched case-insensitively
    /// against the name the caller asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// An IP network (`10.0.0.0/8`, `fd00::/8`) or address; matches callers that
    /// name an IP address in it (names are not resolved on the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Allowed ports; with `portRanges` empty too, any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// Allowed port ranges, `FROM-TO` inclusive, e.g. `8000-8999`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = r"^[0-9]{1,5}-[0-9]{1,5}$")))]
    pub port_ranges: Vec<String>,
}

/// The CRD of [`TunnelPolicy`] as YAML (`tunnel-server crd`).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&TunnelPolicy::crd()).expect("a CRD serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_is_cluster_scoped_in_our_group() {
        let yaml = crd_yaml();
        assert!(yaml.contains("group: cluster-tunnel.io"), "{yaml}");
        assert!(yaml.contains("scope: Cluster"), "{yaml}");
        assert!(yaml.contains("v1alpha1"), "{yaml}");
        assert!(yaml.contains("serviceAccount"), "{yaml}");
        // What the chart will apply must be what the server reads.
        let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(crd["kind"], "CustomResourceDefinition");
        // The API server refuses what it can check, before any server sees it.
        let v = &crd["spec"]["versions"][0];
        assert!(v["subresources"]["status"].is_mapping());
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Accepted", "Reason", "Age", "Message"]);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["rules"]["minItems"], 1);
        let rule = &spec["rules"]["items"]["properties"];
        for (field, one_of) in [
            ("subjects", "serviceAccount, namespace, identity"),
            ("clusters", "name, matchLabels, clusterSet"),
            ("destinations", "host, cidr"),
        ] {
            let cel =
                serde_yaml::to_string(&rule[field]["items"]["x-kubernetes-validations"]).unwrap();
            assert!(
                cel.contains(&format!("exactly one of {one_of}")),
                "{field}: {cel}"
            );
        }
        assert_eq!(rule["subjects"]["minItems"], 1);
        assert_eq!(rule["clusters"]["minItems"], 1);
        let ports = &rule["destinations"]["items"]["properties"]["ports"]["items"];
        assert_eq!(
            (ports["minimum"].as_f64(), ports["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
    }
}
