//! `tunnel-manager uninstall`: removes the addon from every cluster before
//! the manager goes, so that no finalizer is left stranded (a stranded one
//! makes deleting a cluster hang) and no agent keeps running. The hub chart
//! runs it as a `pre-delete` hook; it is safe to run twice.
//!
//! 1. The `ClusterManagementAddOn` is deleted, so OCM's addon manager stops
//!    creating `ManagedClusterAddOn`s, and every `ManagedClusterAddOn` of the
//!    addon is deleted. While the manager still runs, its finalizer deletes
//!    each cluster's work (the work agent then removes the agent, and with
//!    its namespace the agent's key).
//! 2. After `--wait`, whatever addon is left (the manager is gone or stuck)
//!    has its work deleted and the finalizer removed here.
//! 3. What older versions left: the finalizer they put on `ManagedCluster`s
//!    (with their agent work), and the agent key Secrets
//!    `cluster-tunnel-agent-<cluster>` they kept in the manager's namespace.
//!    The manager runs this step at start too.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Resource, ResourceExt as _};
use serde_json::json;

use crate::addons::{FINALIZER, ReconcileError, remove_work};
use crate::ocm::{ADDON_NAME, ManagedCluster, ManagedClusterAddOn};
use crate::signer::MANAGED_BY_LABEL;

/// How often the addons are listed while waiting for them to go.
pub const POLL: Duration = Duration::from_secs(2);
/// Prefix of the agent key Secrets older versions kept on the hub.
const LEGACY_SECRET_PREFIX: &str = "cluster-tunnel-agent-";

/// `ClusterManagementAddOn`, for kube's dynamic API.
pub fn cluster_management_addon_resource() -> ApiResource {
    ApiResource {
        group: "addon.open-cluster-management.io".into(),
        version: "v1alpha1".into(),
        api_version: "addon.open-cluster-management.io/v1alpha1".into(),
        kind: "ClusterManagementAddOn".into(),
        plural: "clustermanagementaddons".into(),
    }
}

fn gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Clusters whose addon went on its own (the manager's finalizer).
    pub by_manager: Vec<String>,
    /// Clusters whose work and finalizer were removed here.
    pub forced: Vec<String>,
    /// Clusters cleaned of what older versions left.
    pub legacy: Vec<String>,
}

/// Removes the addon everywhere (see the module doc); waits up to `wait`
/// for the manager to clean up before doing it here.
pub async fn uninstall(
    client: &kube::Client,
    namespace: &str,
    wait: Duration,
) -> Result<Removed, ReconcileError> {
    let cmas: Api<kube::api::DynamicObject> =
        Api::all_with(client.clone(), &cluster_management_addon_resource());
    gone(cmas.delete(ADDON_NAME, &DeleteParams::default()).await).map_err(ReconcileError::api(
        format!("delete ClusterManagementAddOn {ADDON_NAME}"),
    ))?;
    let addons: Api<ManagedClusterAddOn> = Api::all(client.clone());
    let by_name = ListParams::default().fields(&format!("metadata.name={ADDON_NAME}"));
    let list = |addons: Api<ManagedClusterAddOn>, by_name: ListParams| async move {
        addons
            .list(&by_name)
            .await
            .map(|l| l.items)
            .map_err(ReconcileError::api("list ManagedClusterAddOns"))
    };
    let first = list(addons.clone(), by_name.clone()).await?;
    let mut all: Vec<String> = first.iter().filter_map(|a| a.namespace()).collect();
    all.sort();
    for cluster in &all {
        let api: Api<ManagedClusterAddOn> = Api::namespaced(client.clone(), cluster);
        gone(api.delete(ADDON_NAME, &DeleteParams::default()).await).map_err(
            ReconcileError::api(format!("delete ManagedClusterAddOn {cluster}/{ADDON_NAME}")),
        )?;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut left = first;
    while !left.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
        left = list(addons.clone(), by_name.clone()).await?;
    }
    let mut removed = Removed::default();
    for addon in &left {
        let cluster = addon.namespace().unwrap_or_default();
        remove_work(client, &cluster).await?;
        remove_finalizer::<ManagedClusterAddOn>(
            Api::namespaced(client.clone(), &cluster),
            addon,
        )
        .await?;
        tracing::warn!(%cluster, "the manager did not remove the addon in time; removed here");
        removed.forced.push(cluster);
    }
    removed.by_manager = all
        .into_iter()
        .filter(|c| !removed.forced.contains(c))
        .collect();
    removed.legacy = remove_legacy(client, namespace).await?;
    Ok(removed)
}

/// Removes [`FINALIZER`] from `obj`, keeping the others; the
/// `resourceVersion` read makes a concurrent change fail rather than be lost.
async fn remove_finalizer<K>(api: Api<K>, obj: &K) -> Result<(), ReconcileError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let rest: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if rest.len() == obj.finalizers().len() {
        return Ok(());
    }
    let name = obj.name_any();
    let body = json!({ "metadata": { "finalizers": rest, "resourceVersion": obj.resource_version() } });
    gone(api.patch(&name, &PatchParams::default(), &Patch::Merge(body)).await).map_err(
        ReconcileError::api(format!("remove the finalizer of {} {name}", K::kind(&Default::default()))),
    )
}

/// Cleans what older versions left: their finalizer on `ManagedCluster`s
/// (and the agent work it guarded) and the agent key Secrets in `namespace`.
/// Returns the clusters cleaned.
pub async fn remove_legacy(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<String>, ReconcileError> {
    let clusters: Api<ManagedCluster> = Api::all(client.clone());
    let mut cleaned = Vec::new();
    for cluster in clusters
        .list(&ListParams::default())
        .await
        .map_err(ReconcileError::api("list ManagedClusters"))?
        .items
    {
        if !cluster.finalizers().iter().any(|f| f == FINALIZER) {
            continue;
        }
        let name = cluster.name_any();
        remove_work(client, &name).await?;
        remove_finalizer(clusters.clone(), &cluster).await?;
        tracing::info!(cluster = %name, "finalizer of an older version removed");
        cleaned.push(name);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let managed = ListParams::default().labels(&format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1));
    for secret in secrets
        .list(&managed)
        .await
        .map_err(ReconcileError::api(format!("list Secrets in {namespace}")))?
        .items
    {
        let name = secret.name_any();
        if name.starts_with(LEGACY_SECRET_PREFIX) {
            gone(secrets.delete(&name, &DeleteParams::default()).await)
                .map_err(ReconcileError::api(format!("delete Secret {namespace}/{name}")))?;
            tracing::info!(secret = %name, "agent key Secret of an older version deleted");
        }
    }
    Ok(cleaned)
}
