//! The hub's open-cluster-management clusters as policies see them
//! (`--clusters-from-ocm`): each `ManagedCluster`'s labels, and the
//! `ManagedClusterSet`s it belongs to, computed the way OCM's Placements do:
//!
//! - a set whose `spec.clusterSelector.selectorType` is
//!   `ExclusiveClusterSetLabel` (the default; `LegacyClusterSetLabel` is its
//!   old name) holds the clusters labelled
//!   `cluster.open-cluster-management.io/clusterset=<set>`;
//! - a `LabelSelector` set holds the clusters its `labelSelector` matches
//!   (an empty selector, as the `global` set has, matches every cluster).
//!
//! And which clusters' agents the servers admit at all ([`admitted`]): an
//! accepted `ManagedCluster` (`hubAcceptsClient`) with the addon enabled (a
//! `ManagedClusterAddOn` [`ADDON_NAME`] in its namespace; these types and
//! `ManagedClusterSet` are `tunnel_api::ocm`'s), neither being
//! deleted. An agent of any other cluster is refused when it connects, and
//! its tunnels close when its cluster stops being admitted: a cluster
//! detached from OCM keeps no working identity here, whatever certificate it
//! still holds.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::ResourceExt as _;
use tokio::sync::watch;

use tunnel_api::ocm::{
    ADDON_NAME, CLUSTER_SET_LABEL, ManagedCluster, ManagedClusterAddOn, ManagedClusterSet,
};

use crate::policy::ClusterInventory;

/// The clusters whose agents are admitted, `None` until the
/// `ManagedCluster`s and `ManagedClusterAddOn`s were first listed.
pub type Admitted = watch::Receiver<Option<Arc<BTreeSet<String>>>>;

/// The clusters that are accepted, not being deleted, and have the addon
/// [`ADDON_NAME`] (not being deleted) in their namespace.
pub fn admitted<'a>(
    clusters: impl IntoIterator<Item = &'a ManagedCluster>,
    addons: impl IntoIterator<Item = &'a ManagedClusterAddOn>,
) -> BTreeSet<String> {
    let enabled: BTreeSet<String> = addons
        .into_iter()
        .filter(|a| a.name_any() == ADDON_NAME && a.metadata.deletion_timestamp.is_none())
        .filter_map(|a| a.namespace())
        .collect();
    clusters
        .into_iter()
        .filter(|c| c.is_served())
        .map(|c| c.name_any())
        .filter(|name| enabled.contains(name))
        .collect()
}

/// Why an agent of `cluster` is not admitted now, waiting up to `first_list`
/// for the clusters to be known; `None` when it is.
pub async fn refusal(
    admitted: &mut Admitted,
    cluster: &str,
    first_list: std::time::Duration,
) -> Option<&'static str> {
    match tokio::time::timeout(first_list, admitted.wait_for(Option::is_some)).await {
        Ok(Ok(set)) => {
            let known = set.as_ref().is_some_and(|s| s.contains(cluster));
            (!known)
                .then_some("not an accepted ManagedCluster with the cluster-tunnel addon enabled")
        }
        Ok(Err(_)) => Some("the open-cluster-management watch ended"),
        Err(_) => Some("the open-cluster-management clusters are not known yet"),
    }
}

/// Completes once `cluster` is no longer admitted; never without a watch.
pub async fn revoked(admitted: &mut Option<Admitted>, cluster: &str) {
    let Some(rx) = admitted else {
        return std::future::pending().await;
    };
    let still =
        |set: &Option<Arc<BTreeSet<String>>>| set.as_ref().is_none_or(|s| s.contains(cluster));
    if rx.wait_for(|set| !still(set)).await.is_err() {
        // The watch ended (the server is stopping): nothing is revoked.
        std::future::pending::<()>().await;
    }
}

/// The inventory of `clusters` and `sets`.
pub fn inventory<'a>(
    clusters: impl IntoIterator<Item = &'a ManagedCluster>,
    sets: impl IntoIterator<Item = &'a ManagedClusterSet> + Clone,
) -> ClusterInventory {
    let mut inv = ClusterInventory::default();
    for cluster in clusters {
        let name = cluster.name_any();
        let labels = cluster.labels().clone();
        let mut member_of = BTreeSet::new();
        for set in sets.clone() {
            let sel = &set.spec.cluster_selector;
            let member = match sel.selector_type.as_deref() {
                None | Some("ExclusiveClusterSetLabel" | "LegacyClusterSetLabel") => {
                    labels.get(CLUSTER_SET_LABEL) == Some(&set.name_any())
                }
                Some("LabelSelector") => sel
                    .label_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&labels)),
                Some(_) => false,
            };
            if member {
                member_of.insert(set.name_any());
            }
        }
        inv.sets.insert(name.clone(), member_of);
        inv.labels.insert(name, labels);
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(name: &str, labels: serde_json::Value) -> ManagedCluster {
        serde_json::from_value(json!({
            "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": { "name": name, "labels": labels }, "spec": {},
        }))
        .unwrap()
    }

    fn set(name: &str, selector: serde_json::Value) -> ManagedClusterSet {
        serde_json::from_value(json!({
            "apiVersion": "cluster.open-cluster-management.io/v1beta2", "kind": "ManagedClusterSet",
            "metadata": { "name": name }, "spec": { "clusterSelector": selector },
        }))
        .unwrap()
    }

    #[test]
    fn set_membership_follows_ocm_selector_types() {
        let clusters = [
            cluster(
                "east",
                json!({ "env": "prod", CLUSTER_SET_LABEL: "payments" }),
            ),
            cluster("west", json!({ "env": "dev", "region": "eu" })),
        ];
        let sets = [
            set(
                "payments",
                json!({ "selectorType": "ExclusiveClusterSetLabel" }),
            ),
            set("legacy", json!({})),
            set(
                "global",
                json!({ "selectorType": "LabelSelector", "labelSelector": {} }),
            ),
            set(
                "eu",
                json!({ "selectorType": "LabelSelector", "labelSelector": {
                "matchExpressions": [{ "key": "region", "operator": "In", "values": ["eu"] }],
            } }),
            ),
            set(
                "not-dev",
                json!({ "selectorType": "LabelSelector", "labelSelector": {
                "matchExpressions": [{ "key": "env", "operator": "NotIn", "values": ["dev"] }],
            } }),
            ),
        ];
        let inv = inventory(clusters.iter(), sets.iter());
        let names = |c: &str| inv.sets[c].iter().cloned().collect::<Vec<_>>();
        assert_eq!(names("east"), ["global", "not-dev", "payments"]);
        assert_eq!(names("west"), ["eu", "global"]);
        assert_eq!(inv.labels["west"]["region"], "eu");
    }
}
