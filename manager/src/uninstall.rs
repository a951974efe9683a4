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
//! 3. What older versions left: the finalizer they put on `ManagedCluster`s,
//!    their agent work where this version will not take it over, and the
//!    agent key Secrets `cluster-tunnel-agent-<cluster>` they kept in the
//!    manager's namespace. With `--legacy-only` this step alone (the chart's
//!    post-upgrade hook), so that the manager itself needs no right to these
//!    objects.
//!
//! The agent work kept its name (`cluster-tunnel-agent`) across versions, so
//! after an upgrade the work in a cluster's namespace may already be this
//! version's (owned by the cluster's `ManagedClusterAddOn`), or be about to
//! become it (the manager applies over it, server-side, when the addon is
//! enabled there). Only a work that is neither is an older version's alone
//! and deleted, conditionally on the version read, so that one the manager
//! applies in between survives.
//!
//! A list answered 404 (the resource's CRD is not installed, say OCM is not
//! there) means there is nothing of that kind to remove.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions};
use kube::{Resource, ResourceExt as _};
use serde_json::json;

use crate::addons::{FINALIZER, ReconcileError, remove_work};
use crate::agent_work::WORK_NAME;
use tunnel_api::labels::MANAGED_BY;
use tunnel_api::ocm::{
    ADDON_NAME, ManagedCluster, ManagedClusterAddOn, cluster_management_addon_resource,
    manifest_work_resource,
};

/// How often the addons are listed while waiting for them to go.
pub const POLL: Duration = Duration::from_secs(2);
/// Prefix of the agent key Secrets older versions kept on the hub.
const LEGACY_SECRET_PREFIX: &str = "cluster-tunnel-agent-";

fn gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The items of a list; none when the resource does not exist (404: its CRD
/// is not installed).
async fn list_or_none<K>(api: &Api<K>, params: &ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(params).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
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
        list_or_none(&addons, &by_name)
            .await
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
        remove_finalizer::<ManagedClusterAddOn>(Api::namespaced(client.clone(), &cluster), addon)
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
    let body =
        json!({ "metadata": { "finalizers": rest, "resourceVersion": obj.resource_version() } });
    gone(
        api.patch(&name, &PatchParams::default(), &Patch::Merge(body))
            .await,
    )
    .map_err(ReconcileError::api(format!(
        "remove the finalizer of {} {name}",
        K::kind(&Default::default())
    )))
}

/// Cleans what older versions left: their finalizer on `ManagedCluster`s,
/// their agent work where no addon takes it over (see the module doc) and
/// the agent key Secrets in `namespace`. Returns the clusters cleaned.
pub async fn remove_legacy(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<String>, ReconcileError> {
    let clusters: Api<ManagedCluster> = Api::all(client.clone());
    let mut cleaned = Vec::new();
    for cluster in list_or_none(&clusters, &ListParams::default())
        .await
        .map_err(ReconcileError::api("list ManagedClusters"))?
    {
        if !cluster.finalizers().iter().any(|f| f == FINALIZER) {
            continue;
        }
        let name = cluster.name_any();
        remove_legacy_work(client, &name).await?;
        remove_finalizer(clusters.clone(), &cluster).await?;
        tracing::info!(cluster = %name, "finalizer of an older version removed");
        cleaned.push(name);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let managed = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    for secret in secrets
        .list(&managed)
        .await
        .map_err(ReconcileError::api(format!("list Secrets in {namespace}")))?
        .items
    {
        let name = secret.name_any();
        if name.starts_with(LEGACY_SECRET_PREFIX) {
            gone(secrets.delete(&name, &DeleteParams::default()).await).map_err(
                ReconcileError::api(format!("delete Secret {namespace}/{name}")),
            )?;
            tracing::info!(secret = %name, "agent key Secret of an older version deleted");
        }
    }
    Ok(cleaned)
}

/// Whether a `ManagedClusterAddOn` owns `work` (this version's work).
fn owned_by_addon(work: &DynamicObject) -> bool {
    work.owner_references().iter().any(|o| {
        o.kind == ManagedClusterAddOn::kind(&())
            && o.api_version.split('/').next() == Some(ManagedClusterAddOn::group(&()).as_ref())
    })
}

/// How often a legacy work is looked at again when it changed between the
/// read and the delete.
const LEGACY_WORK_ATTEMPTS: usize = 3;

/// Deletes the agent work in `cluster`'s namespace if it is an older
/// version's alone: not owned by a `ManagedClusterAddOn`, and no addon there
/// for the manager to apply this version's work over it. The delete holds
/// only for the version read. Returns whether a work was deleted.
async fn remove_legacy_work(client: &kube::Client, cluster: &str) -> Result<bool, ReconcileError> {
    let works: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), cluster, &manifest_work_resource());
    let addons: Api<ManagedClusterAddOn> = Api::namespaced(client.clone(), cluster);
    for _ in 0..LEGACY_WORK_ATTEMPTS {
        let Some(work) = works
            .get_opt(WORK_NAME)
            .await
            .map_err(ReconcileError::api(format!(
                "get ManifestWork {cluster}/{WORK_NAME}"
            )))?
        else {
            return Ok(false);
        };
        if owned_by_addon(&work) {
            tracing::info!(%cluster, "the agent work is this version's (owned by the addon); kept");
            return Ok(false);
        }
        let addon = addons
            .get_opt(ADDON_NAME)
            .await
            .map_err(ReconcileError::api(format!(
                "get ManagedClusterAddOn {cluster}/{ADDON_NAME}"
            )))?;
        if addon.is_some() {
            tracing::info!(%cluster, "the addon is enabled here; the manager applies this version's agent work over the older one");
            return Ok(false);
        }
        let read = Preconditions {
            resource_version: work.resource_version(),
            uid: work.uid(),
        };
        match works
            .delete(WORK_NAME, &DeleteParams::default().preconditions(read))
            .await
        {
            Ok(_) => {
                tracing::info!(%cluster, "agent work of an older version deleted");
                return Ok(true);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            // Changed since it was read (the manager applied it): look again.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                return Err(ReconcileError::api(format!(
                    "delete ManifestWork {cluster}/{WORK_NAME}"
                ))(e));
            }
        }
    }
    tracing::warn!(%cluster, "the agent work kept changing; left to the manager");
    Ok(false)
}

#[cfg(test)]
mod tests {
    //! The uninstall sequence against kube's mocked API server, with time
    //! set by the test (paused: the wait passes at once).

    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::mock_api::{self, Reply, deleted, finish, not_found, serve};

    const CMA: &str =
        "/apis/addon.open-cluster-management.io/v1alpha1/clustermanagementaddons/cluster-tunnel";
    const ADDONS: &str = "/apis/addon.open-cluster-management.io/v1alpha1/managedclusteraddons";
    const EAST_ADDON: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel";
    const WEST_ADDON: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/west/managedclusteraddons/cluster-tunnel";
    const WEST_WORK: &str = "/apis/work.open-cluster-management.io/v1/namespaces/west/manifestworks/cluster-tunnel-agent";
    const NORTH_WORK: &str = "/apis/work.open-cluster-management.io/v1/namespaces/north/manifestworks/cluster-tunnel-agent";
    const CLUSTERS: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters";
    const NORTH: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters/north";
    const SECRETS: &str = "/api/v1/namespaces/cluster-tunnel/secrets";

    fn addon(cluster: &str) -> Value {
        json!({
            "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": "ManagedClusterAddOn",
            "metadata": { "name": "cluster-tunnel", "namespace": cluster, "resourceVersion": "11",
                          "finalizers": ["example.io/other", FINALIZER] },
            "spec": {},
        })
    }

    fn list(kind: &str, items: Vec<Value>) -> Reply {
        Reply::With(
            200,
            json!({ "apiVersion": "v1", "kind": kind, "metadata": {}, "items": items }),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn uninstall_removes_every_agent_and_leaves_no_finalizer_behind() {
        let (client, handle) = mock_api::client();
        let cluster = |name: &str, finalizer: bool| {
            let mut c = json!({
                "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
                "metadata": { "name": name, "resourceVersion": "5" }, "spec": { "hubAcceptsClient": true },
            });
            if finalizer {
                c["metadata"]["finalizers"] = json!([FINALIZER]);
            }
            c
        };
        let secret = |name: &str| json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "cluster-tunnel" } });
        let server = serve(
            handle,
            vec![
                // No more addons from the install strategy.
                (Method::DELETE, CMA, deleted()),
                (
                    Method::GET,
                    ADDONS,
                    list(
                        "ManagedClusterAddOnList",
                        vec![addon("east"), addon("west")],
                    ),
                ),
                (Method::DELETE, EAST_ADDON, Reply::With(200, addon("east"))),
                (Method::DELETE, WEST_ADDON, not_found()),
                // The manager cleans east; west stays (say the manager is gone).
                (
                    Method::GET,
                    ADDONS,
                    list("ManagedClusterAddOnList", vec![addon("west")]),
                ),
                (
                    Method::GET,
                    ADDONS,
                    list("ManagedClusterAddOnList", vec![addon("west")]),
                ),
                // After the wait: done here.
                (Method::DELETE, WEST_WORK, deleted()),
                (Method::PATCH, WEST_ADDON, Reply::With(200, addon("west"))),
                // An older version's finalizer on a cluster, and its key Secret.
                (
                    Method::GET,
                    CLUSTERS,
                    list(
                        "ManagedClusterList",
                        vec![cluster("north", true), cluster("south", false)],
                    ),
                ),
                (Method::GET, NORTH_WORK, not_found()),
                (
                    Method::PATCH,
                    NORTH,
                    Reply::With(200, cluster("north", false)),
                ),
                (
                    Method::GET,
                    SECRETS,
                    list(
                        "SecretList",
                        vec![
                            secret("cluster-tunnel-agent-north"),
                            secret("cluster-tunnel-signer"),
                        ],
                    ),
                ),
                (
                    Method::DELETE,
                    "/api/v1/namespaces/cluster-tunnel/secrets/cluster-tunnel-agent-north",
                    deleted(),
                ),
            ],
        );
        let removed = uninstall(&client, "cluster-tunnel", Duration::from_secs(3))
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(
            removed,
            Removed {
                by_manager: vec!["east".into()],
                forced: vec!["west".into()],
                legacy: vec!["north".into()],
            }
        );
        // Only our finalizer goes, and only from the version read.
        assert_eq!(
            b[7],
            json!({ "metadata": { "finalizers": ["example.io/other"], "resourceVersion": "11" } })
        );
        assert_eq!(
            b[10],
            json!({ "metadata": { "finalizers": [], "resourceVersion": "5" } })
        );
    }

    fn work(cluster: &str, owner: Option<&str>, version: &str) -> Value {
        let mut w = json!({
            "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
            "metadata": { "name": "cluster-tunnel-agent", "namespace": cluster, "uid": format!("uid-{cluster}"), "resourceVersion": version },
            "spec": {},
        });
        if let Some(kind) = owner {
            w["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": kind,
                "name": "cluster-tunnel", "uid": "uid-addon", "controller": true,
            }]);
        }
        w
    }

    fn legacy_cluster(name: &str) -> Value {
        json!({
            "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": { "name": name, "resourceVersion": "5", "finalizers": [FINALIZER] },
            "spec": { "hubAcceptsClient": true },
        })
    }

    #[tokio::test]
    async fn after_an_upgrade_only_works_no_addon_takes_over_are_deleted() {
        const CLUSTERS_PATH: &str = CLUSTERS;
        let work_path = |c: &str| -> &'static str {
            Box::leak(format!("/apis/work.open-cluster-management.io/v1/namespaces/{c}/manifestworks/cluster-tunnel-agent").into_boxed_str())
        };
        let addon_path = |c: &str| -> &'static str {
            Box::leak(format!("/apis/addon.open-cluster-management.io/v1alpha1/namespaces/{c}/managedclusteraddons/cluster-tunnel").into_boxed_str())
        };
        let cluster_path = |c: &str| -> &'static str {
            Box::leak(format!("{CLUSTERS_PATH}/{c}").into_boxed_str())
        };
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    CLUSTERS,
                    list(
                        "ManagedClusterList",
                        vec![
                            legacy_cluster("east"),
                            legacy_cluster("west"),
                            legacy_cluster("north"),
                            legacy_cluster("south"),
                        ],
                    ),
                ),
                // east: the new manager already applied this version's work (owned by the addon).
                (
                    Method::GET,
                    work_path("east"),
                    Reply::With(200, work("east", Some("ManagedClusterAddOn"), "20")),
                ),
                (
                    Method::PATCH,
                    cluster_path("east"),
                    Reply::With(200, cluster_json("east")),
                ),
                // west: still the old work, but the addon is enabled there: the manager applies over it.
                (
                    Method::GET,
                    work_path("west"),
                    Reply::With(200, work("west", None, "3")),
                ),
                (
                    Method::GET,
                    addon_path("west"),
                    Reply::With(200, addon("west")),
                ),
                (
                    Method::PATCH,
                    cluster_path("west"),
                    Reply::With(200, cluster_json("west")),
                ),
                // north: an old work and no addon: deleted, for the version read only. The
                // manager applied it in between (409): read again, now owned, kept.
                (
                    Method::GET,
                    work_path("north"),
                    Reply::With(200, work("north", None, "4")),
                ),
                (Method::GET, addon_path("north"), not_found()),
                (
                    Method::DELETE,
                    work_path("north"),
                    mock_api::status_reply(409, "Conflict"),
                ),
                (
                    Method::GET,
                    work_path("north"),
                    Reply::With(200, work("north", Some("ManagedClusterAddOn"), "21")),
                ),
                (
                    Method::PATCH,
                    cluster_path("north"),
                    Reply::With(200, cluster_json("north")),
                ),
                // south: an old work and no addon: deleted.
                (
                    Method::GET,
                    work_path("south"),
                    Reply::With(200, work("south", None, "6")),
                ),
                (Method::GET, addon_path("south"), not_found()),
                (Method::DELETE, work_path("south"), deleted()),
                (
                    Method::PATCH,
                    cluster_path("south"),
                    Reply::With(200, cluster_json("south")),
                ),
                (Method::GET, SECRETS, list("SecretList", vec![])),
            ],
        );
        let cleaned = remove_legacy(&client, "cluster-tunnel").await.unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(cleaned, ["east", "west", "north", "south"]);
        // Each delete names the version it read.
        assert_eq!(
            b[8]["preconditions"],
            json!({ "resourceVersion": "4", "uid": "uid-north" })
        );
        assert_eq!(
            b[13]["preconditions"],
            json!({ "resourceVersion": "6", "uid": "uid-south" })
        );
    }

    fn cluster_json(name: &str) -> Value {
        json!({
            "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
            "metadata": { "name": name, "resourceVersion": "6" }, "spec": {},
        })
    }

    #[tokio::test(start_paused = true)]
    async fn uninstall_without_the_ocm_crds_finds_nothing_to_remove() {
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![
                (Method::DELETE, CMA, not_found()),
                (Method::GET, ADDONS, not_found()),
                (Method::GET, CLUSTERS, not_found()),
                (Method::GET, SECRETS, list("SecretList", vec![])),
            ],
        );
        let removed = uninstall(&client, "cluster-tunnel", Duration::from_secs(60))
            .await
            .unwrap();
        finish(server).await;
        assert_eq!(removed, Removed::default());
    }
}
