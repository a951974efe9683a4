//! The controller over the addon's `ManagedClusterAddOn`s (one per cluster
//! the addon is enabled in, named [`ADDON_NAME`], in the cluster's
//! namespace). OCM's addon manager creates and deletes them from the
//! `ClusterManagementAddOn`'s install strategy (Placements), or an
//! administrator does (`clusteradm addon enable`, strategy Manual); this
//! controller installs and removes the agent to match. For each one:
//!
//! 1. the `ManagedCluster` must be accepted (`hubAcceptsClient`) and not being
//!    deleted; otherwise the agent's work is removed (and [`crate::csr`]
//!    signs nothing for it);
//! 2. the `AddOnDeploymentConfig` OCM resolved for it (if any) is read and
//!    turned into [`AgentOverrides`]; one the agent cannot follow is reported
//!    (`ManifestApplied=False`, `InvalidDeploymentConfig`) and nothing changes;
//! 3. the hub address agents dial (a fixed host name, or the LoadBalancer
//!    Service's ingress address);
//! 4. the `ManifestWork` `cluster-tunnel-agent` in the cluster's namespace
//!    (server-side apply: what the configuration says, every time), owned by
//!    the addon;
//! 5. the addon's status: registration, install namespace, health check mode,
//!    `ManifestApplied` and `Degraded` (see [`crate::addon_status`]).
//!
//! **Removal uses a finalizer** (`cluster-tunnel.io/agent-cleanup`) on the
//! addon, so the work is deleted while the cluster's work agent still runs
//! and removes the agent (and with its namespace the registration Secret)
//! from the managed cluster: when the placement no longer selects the
//! cluster, the addon is disabled, the `ClusterManagementAddOn` is deleted
//! (OCM's owner reference), or the cluster is detached (its namespace goes).
//! `tunnel-manager uninstall` (a Helm pre-delete hook) removes the finalizers
//! when the manager itself goes, so nothing is left stranded.

use std::sync::Arc;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::addon_status;
use crate::agent_work::{self, AgentWorkInput, WORK_NAME};
use crate::controller::{Clock, ControllerContext, RESYNC};
use crate::deployment_config::{AgentOverrides, ConfigError};
use crate::live_view::LiveView;
use crate::signer::{FIELD_MANAGER, Signer};
use tunnel_api::configuration::TunnelConfiguration;
use tunnel_api::ocm::{
    ADDON_LABEL, ADDON_NAME, AddOnDeploymentConfig, ManagedCluster, ManagedClusterAddOn,
    manifest_work_resource,
};

mod hub_address;

pub use hub_address::load_balancer_address;

/// Finalizer on every addon the manager delivered an agent for.
pub const FINALIZER: &str = "cluster-tunnel.io/agent-cleanup";

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No `TunnelConfiguration` was found (yet).
    #[error("no TunnelConfiguration named {0}")]
    NoConfiguration(String),
    /// The LoadBalancer Service has no address yet.
    #[error("Service {0} has no load balancer address yet")]
    NoEntrypoint(String),
    /// The configuration is inconsistent.
    #[error("invalid TunnelConfiguration: {0}")]
    BadConfiguration(&'static str),
    /// An API request failed.
    #[error("cannot {action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl ReconcileError {
    pub(crate) fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }
}

/// What reconciliation needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// The manager's namespace (Services).
    pub namespace: String,
    /// The configuration.
    pub config: watch::Receiver<Option<Arc<TunnelConfiguration>>>,
    /// Name of the configuration (for errors).
    pub config_name: String,
    /// The server's live view.
    pub live: watch::Receiver<LiveView>,
    /// The signer (its CA certificate is delivered to the agents).
    pub signer: Arc<Signer>,
    /// Now.
    pub clock: Clock,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
}

impl ControllerContext for Context {
    const NAME: &'static str = "addons";
    fn metrics(&self) -> &crate::metrics::ManagerMetrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn owner_of(addon: &ManagedClusterAddOn) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ManagedClusterAddOn::api_version(&()),
        "kind": ManagedClusterAddOn::kind(&()),
        "name": addon.name_any(),
        "uid": addon.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
    })
}

/// Reconciles one addon (with its finalizer).
pub async fn reconcile(
    addon: Arc<ManagedClusterAddOn>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if addon.name_any() != ADDON_NAME {
        return Ok(Action::await_change());
    }
    let cluster = addon.namespace().unwrap_or_default();
    let api: Api<ManagedClusterAddOn> = Api::namespaced(ctx.client.clone(), &cluster);
    finalizer(&api, FINALIZER, addon, |event| async {
        match event {
            Event::Apply(a) => apply(&a, &ctx).await,
            Event::Cleanup(a) => {
                remove_work(&ctx.client, &a.namespace().unwrap_or_default()).await?;
                tracing::info!(cluster = %a.namespace().unwrap_or_default(), "addon removed; agent work deleted");
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

/// Deletes the agent's work in `cluster`'s namespace; gone is fine.
pub async fn remove_work(client: &kube::Client, cluster: &str) -> Result<(), ReconcileError> {
    let works: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), cluster, &manifest_work_resource());
    match works.delete(WORK_NAME, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(ReconcileError::api(format!(
            "delete ManifestWork {cluster}/{WORK_NAME}"
        ))(e)),
    }
}

async fn apply(addon: &ManagedClusterAddOn, ctx: &Context) -> Result<Action, ReconcileError> {
    let cluster = addon.namespace().unwrap_or_default();
    let now = (ctx.clock)();
    let config = ctx
        .config
        .borrow()
        .clone()
        .ok_or_else(|| ReconcileError::NoConfiguration(ctx.config_name.clone()))?;
    let previous = addon
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let addons: Api<ManagedClusterAddOn> = Api::namespaced(ctx.client.clone(), &cluster);
    let write_status = |namespace: String, conds: Vec<addon_status::AddonCondition>| {
        let body = addon_status::status_body(&cluster, &namespace, &conds, &previous, now);
        let addons = addons.clone();
        let cluster = cluster.clone();
        async move {
            addons
                .patch_status(
                    ADDON_NAME,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await
                .map_err(ReconcileError::api(format!(
                    "apply ManagedClusterAddOn {cluster}/{ADDON_NAME} status"
                )))
        }
    };

    // 1. Only an accepted cluster that stays gets an agent.
    let clusters: Api<ManagedCluster> = Api::all(ctx.client.clone());
    let managed = clusters
        .get_opt(&cluster)
        .await
        .map_err(ReconcileError::api(format!("get ManagedCluster {cluster}")))?;
    if !managed.as_ref().is_some_and(ManagedCluster::is_served) {
        remove_work(&ctx.client, &cluster).await?;
        let why = match &managed {
            None => "the ManagedCluster does not exist",
            Some(m) if m.metadata.deletion_timestamp.is_some() => {
                "the ManagedCluster is being deleted"
            }
            Some(_) => "the hub does not accept the cluster (hubAcceptsClient is false)",
        };
        tracing::info!(%cluster, why, "no agent for this cluster");
        let applied = addon_status::manifest_applied(Err(("ClusterNotAccepted", why.into())));
        write_status(config.spec.agent.namespace.clone(), vec![applied]).await?;
        return Ok(Action::requeue(RESYNC));
    }

    // 2. The deployment config OCM resolved for this addon.
    let overrides = match deployment_config(addon, ctx).await? {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%cluster, error = %e, "deployment config refused");
            let applied =
                addon_status::manifest_applied(Err(("InvalidDeploymentConfig", e.to_string())));
            write_status(config.spec.agent.namespace.clone(), vec![applied]).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    let install_namespace = agent_work::install_namespace(&config.spec.agent, &overrides);

    // 3, 4. The work.
    let hub = ctx.hub_address(&config).await?;
    let hashes = addon.config_spec_hashes();
    let work = agent_work::manifest_work(&AgentWorkInput {
        cluster: &cluster,
        spec: &config.spec.agent,
        hub: &hub,
        ca_pem: &ctx.signer.ca.cert_pem,
        overrides: &overrides,
        config_hashes: &hashes,
        owner: Some(owner_of(addon)),
    });
    let works: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &cluster, &manifest_work_resource());
    let applied = works
        .patch(
            WORK_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(work),
        )
        .await
        .map_err(ReconcileError::api(format!(
            "apply ManifestWork {cluster}/{WORK_NAME}"
        )))?;
    let work_created = applied
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok());

    // 5. The status.
    let agents = ctx
        .live
        .borrow()
        .as_ref()
        .map(|m| m.get(&cluster).copied().unwrap_or(0));
    let replicas = overrides.replicas.unwrap_or(config.spec.agent.replicas);
    let conds = vec![
        addon_status::manifest_applied(Ok(())),
        addon_status::degraded(agents, replicas, work_created, now),
    ];
    write_status(install_namespace, conds).await?;
    tracing::debug!(%cluster, ?agents, "addon reconciled");
    Ok(Action::requeue(RESYNC))
}

/// The overrides of the addon's deployment config: none without one, an
/// error (reported on the addon) for one the agent cannot follow.
async fn deployment_config(
    addon: &ManagedClusterAddOn,
    ctx: &Context,
) -> Result<Result<AgentOverrides, ConfigError>, ReconcileError> {
    let Some(desired) = addon.desired_deployment_config() else {
        return Ok(Ok(AgentOverrides::default()));
    };
    let api: Api<AddOnDeploymentConfig> = Api::namespaced(ctx.client.clone(), &desired.namespace);
    let name = format!("{}/{}", desired.namespace, desired.name);
    let adc = api
        .get(&desired.name)
        .await
        .map_err(ReconcileError::api(format!(
            "get AddOnDeploymentConfig {name}"
        )))?;
    Ok(AgentOverrides::from_config(&name, &adc.spec))
}

/// Runs the controller until `shutdown`: every addon named [`ADDON_NAME`],
/// again when its cluster or its work changes, and every addon when the
/// configuration or the live view changes.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let addons: Api<ManagedClusterAddOn> = Api::all(client.clone());
    let by_name = watcher::Config::default().fields(&format!("metadata.name={ADDON_NAME}"));
    let works: Api<DynamicObject> = Api::all_with(client.clone(), &manifest_work_resource());
    let trigger =
        futures_util::stream::select(changes(ctx.config.clone()), changes(ctx.live.clone()));
    let controller = Controller::new(addons, by_name)
        .owns_with(
            works,
            manifest_work_resource(),
            watcher::Config::default().labels(&format!("{ADDON_LABEL}={ADDON_NAME}")),
        )
        .watches(
            Api::<ManagedCluster>::all(client),
            watcher::Config::default(),
            |cluster| Some(ObjectRef::new(ADDON_NAME).within(&cluster.name_any())),
        )
        .reconcile_all_on(trigger);
    crate::controller::run(controller, reconcile, ctx, shutdown).await;
}

/// One item each time `rx`'s value changes; ends when the sender is gone.
fn changes<T>(rx: watch::Receiver<T>) -> impl futures_util::Stream<Item = ()> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server (`tower_test`), each under a timeout; time is the test's.

    use http::Method;
    use serde_json::{Value, json};

    use std::collections::HashMap;

    use super::*;
    use crate::mock_api::{self, ApiHandle, Reply, TIMEOUT, deleted, finish, not_found, serve};
    use tunnel_api::configuration::TunnelConfigurationSpec;

    const NS: &str = "cluster-tunnel";
    const TD: &str = "cluster-tunnel";
    const WORK: &str = "/apis/work.open-cluster-management.io/v1/namespaces/east/manifestworks/cluster-tunnel-agent";
    const ADDON: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel";
    const ADDON_STATUS: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel/status";
    const CLUSTER: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters/east";
    const ADC: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/fleet/addondeploymentconfigs/agents";

    fn config(replicas: i32) -> Arc<TunnelConfiguration> {
        let spec: TunnelConfigurationSpec = serde_json::from_value(json!({
            "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com", "port": 443 } } },
            "agent": { "image": "ghcr.io/cluster-tunnel/tunnel-agent:1", "replicas": replicas },
        }))
        .unwrap();
        Arc::new(TunnelConfiguration::new(
            tunnel_api::configuration::DEFAULT_NAME,
            spec,
        ))
    }

    /// The addon in `east`, with our finalizer or not, being deleted or not,
    /// and with a resolved deployment config or not.
    fn addon(finalizer: bool, deleting: bool, adc: bool) -> Arc<ManagedClusterAddOn> {
        let mut a = json!({
            "apiVersion": "addon.open-cluster-management.io/v1alpha1",
            "kind": "ManagedClusterAddOn",
            "metadata": { "name": "cluster-tunnel", "namespace": "east", "uid": "uid-addon", "resourceVersion": "7" },
            "spec": {},
            "status": { "conditions": [
                { "type": "Available", "status": "True", "reason": "ManagedClusterAddOnLeaseUpdated", "lastTransitionTime": "2026-01-01T00:00:00Z" },
            ] },
        });
        if finalizer {
            a["metadata"]["finalizers"] = json!([FINALIZER]);
        }
        if deleting {
            a["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        if adc {
            a["status"]["configReferences"] = json!([{
                "group": "addon.open-cluster-management.io", "resource": "addondeploymentconfigs",
                "name": "agents", "namespace": "fleet", "lastObservedGeneration": 2,
                "desiredConfig": { "name": "agents", "namespace": "fleet", "specHash": "hash-2" },
            }]);
        }
        Arc::new(serde_json::from_value(a).unwrap())
    }

    fn cluster(accepted: bool) -> Reply {
        Reply::With(
            200,
            json!({
                "apiVersion": "cluster.open-cluster-management.io/v1",
                "kind": "ManagedCluster",
                "metadata": { "name": "east", "uid": "uid-east" },
                "spec": { "hubAcceptsClient": accepted },
            }),
        )
    }

    struct Scenario {
        ctx: Arc<Context>,
        handle: ApiHandle,
        live: watch::Sender<LiveView>,
    }

    fn scenario(config: Arc<TunnelConfiguration>, now: OffsetDateTime) -> Scenario {
        let (client, handle) = mock_api::client();
        let (_config_tx, config_rx) = watch::channel(Some(config));
        let (live, live_rx) = watch::channel(Some(HashMap::new()));
        Scenario {
            ctx: Arc::new(Context {
                client,
                namespace: NS.into(),
                config: config_rx,
                config_name: tunnel_api::configuration::DEFAULT_NAME.into(),
                live: live_rx,
                signer: Arc::new(Signer::generate(TD, now).unwrap()),
                clock: Arc::new(move || now),
                metrics: crate::metrics::ManagerMetrics::default(),
            }),
            handle,
            live,
        }
    }

    async fn reconcile_once(
        a: Arc<ManagedClusterAddOn>,
        ctx: &Arc<Context>,
    ) -> Result<Action, ReconcileError> {
        tokio::time::timeout(TIMEOUT, reconcile(a, ctx.clone()))
            .await
            .expect("reconcile in time")
    }

    fn conditions_of(status_body: &Value) -> Vec<(String, String, String)> {
        status_body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().into(),
                    c["status"].as_str().unwrap().into(),
                    c["reason"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    fn manifest<'a>(work: &'a Value, kind: &str) -> &'a Value {
        work["spec"]["workload"]["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["kind"] == kind)
            .unwrap()
    }

    /// What the API server answers a status apply: the whole object.
    fn status_echo() -> Reply {
        Reply::EchoWith(json!({ "spec": {} }))
    }

    /// The requests of a reconciliation of an accepted cluster without a deployment config.
    fn steady(created: &'static str) -> Vec<(Method, &'static str, Reply)> {
        vec![
            (Method::GET, CLUSTER, cluster(true)),
            (Method::PATCH, WORK, Reply::Echo(Some(created))),
            (Method::PATCH, ADDON_STATUS, status_echo()),
        ]
    }

    #[tokio::test]
    async fn a_new_addon_first_gets_the_finalizer() {
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let answer = serde_json::to_value(&*addon(true, false, false)).unwrap();
        let server = serve(
            s.handle,
            vec![(Method::PATCH, ADDON, Reply::With(200, answer))],
        );
        let action = reconcile_once(addon(false, false, false), &s.ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        let (_, bodies) = finish(server).await;
        assert!(bodies[0].to_string().contains(FINALIZER), "{}", bodies[0]);
    }

    #[tokio::test]
    async fn an_enabled_addon_gets_its_agent_work_and_registers_it_with_our_signer() {
        let now = OffsetDateTime::now_utc();
        let s = scenario(config(2), now);
        let server = serve(s.handle, steady("2026-01-01T00:00:00Z"));
        let action = reconcile_once(addon(true, false, false), &s.ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let (_, b) = finish(server).await;
        // The work: in the cluster's namespace, owned by the addon, with the
        // hub's CA and no private key.
        let work = &b[1];
        assert_eq!(work["metadata"]["namespace"], "east");
        assert_eq!(work["metadata"]["ownerReferences"][0]["uid"], "uid-addon");
        assert_eq!(
            work["metadata"]["labels"]["open-cluster-management.io/addon-name"],
            "cluster-tunnel"
        );
        assert!(!work.to_string().contains("PRIVATE KEY"));
        assert_eq!(
            manifest(work, "ConfigMap")["data"]["ca.crt"],
            s.ctx.signer.ca.cert_pem.as_str()
        );
        // The status: registration with our signer for the agent's user, the
        // install namespace, Lease health; Available is not ours to write.
        let st = &b[2]["status"];
        assert_eq!(
            st["registrations"][0]["signerName"],
            "cluster-tunnel.io/agent"
        );
        assert_eq!(
            st["registrations"][0]["subject"]["user"],
            "system:open-cluster-management:cluster:east:addon:cluster-tunnel:agent:tunnel-agent"
        );
        assert_eq!(st["namespace"], "cluster-tunnel-agent");
        assert_eq!(st["healthCheck"]["mode"], "Lease");
        assert_eq!(
            conditions_of(&b[2]),
            [
                (
                    "ManifestApplied".into(),
                    "True".into(),
                    "AddonManifestApplied".into()
                ),
                ("Degraded".into(), "True".into(), "NoAgentConnected".into()),
            ]
        );
    }

    #[tokio::test]
    async fn degraded_follows_the_agents_the_servers_list_and_available_is_never_written() {
        let now = OffsetDateTime::now_utc();
        let s = scenario(config(2), now);
        let created: &'static str = Box::leak(
            now.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
                .into_boxed_str(),
        );
        let mut handle = s.handle;
        for (live, want) in [
            (Some(0), ("False", "WaitingForAgents")),
            (Some(1), ("True", "AgentsMissing")),
            (Some(2), ("False", "AgentsConnected")),
            (None, ("Unknown", "ServerUnreachable")),
        ] {
            s.live
                .send_replace(live.map(|n| HashMap::from([("east".to_string(), n)])));
            let server = serve(handle, steady(created));
            reconcile_once(addon(true, false, false), &s.ctx)
                .await
                .unwrap();
            let (h, b) = finish(server).await;
            handle = h;
            let conds = conditions_of(&b[2]);
            assert_eq!(
                conds[1],
                ("Degraded".into(), want.0.into(), want.1.into()),
                "{live:?}"
            );
            assert!(
                conds
                    .iter()
                    .all(|c| c.0 != "Available" && c.0 != "Progressing")
            );
        }
    }

    #[tokio::test]
    async fn a_cluster_the_hub_does_not_accept_gets_no_agent() {
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let server = serve(
            s.handle,
            vec![
                (Method::GET, CLUSTER, cluster(false)),
                // A work delivered before is removed.
                (Method::DELETE, WORK, deleted()),
                (Method::PATCH, ADDON_STATUS, status_echo()),
            ],
        );
        reconcile_once(addon(true, false, false), &s.ctx)
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[2]),
            [(
                "ManifestApplied".into(),
                "False".into(),
                "ClusterNotAccepted".into()
            )]
        );

        // A cluster that is gone from the hub: the same.
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let server = serve(
            s.handle,
            vec![
                (Method::GET, CLUSTER, not_found()),
                (Method::DELETE, WORK, not_found()),
                (Method::PATCH, ADDON_STATUS, status_echo()),
            ],
        );
        reconcile_once(addon(true, false, false), &s.ctx)
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        assert!(b[2].to_string().contains("does not exist"), "{}", b[2]);
    }

    #[tokio::test]
    async fn the_deployment_config_shapes_the_agent_and_its_hash_is_reported_on_the_work() {
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let adc = json!({
            "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": "AddOnDeploymentConfig",
            "metadata": { "name": "agents", "namespace": "fleet" },
            "spec": {
                "agentInstallNamespace": "tunnel",
                "nodePlacement": { "nodeSelector": { "role": "infra" } },
                "registries": [{ "source": "ghcr.io/cluster-tunnel", "mirror": "mirror.example.com/ct" }],
                "customizedVariables": [{ "name": "replicas", "value": "3" }],
            },
        });
        let server = serve(
            s.handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADC, Reply::With(200, adc)),
                (Method::PATCH, WORK, Reply::Echo(None)),
                (Method::PATCH, ADDON_STATUS, status_echo()),
            ],
        );
        reconcile_once(addon(true, false, true), &s.ctx)
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        let work = &b[2];
        let d = manifest(work, "Deployment");
        assert_eq!(d["metadata"]["namespace"], "tunnel");
        assert_eq!(d["spec"]["replicas"], 3);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["role"], "infra");
        assert_eq!(
            pod["containers"][0]["image"],
            "mirror.example.com/ct/tunnel-agent:1"
        );
        assert_eq!(
            work["metadata"]["annotations"]["work.open-cluster-management.io/manifest-config-spec-hash"],
            r#"{"addondeploymentconfigs.addon.open-cluster-management.io/fleet/agents":"hash-2"}"#
        );
        // The registration Secret and the Lease are looked for in the new namespace.
        assert_eq!(b[3]["status"]["namespace"], "tunnel");
    }

    #[tokio::test]
    async fn a_deployment_config_the_agent_cannot_follow_is_reported_and_nothing_is_delivered() {
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let adc = json!({
            "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": "AddOnDeploymentConfig",
            "metadata": { "name": "agents", "namespace": "fleet" },
            "spec": { "customizedVariables": [{ "name": "replicas", "value": "many" }] },
        });
        let server = serve(
            s.handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADC, Reply::With(200, adc)),
                (Method::PATCH, ADDON_STATUS, status_echo()),
            ],
        );
        reconcile_once(addon(true, false, true), &s.ctx)
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[2]),
            [(
                "ManifestApplied".into(),
                "False".into(),
                "InvalidDeploymentConfig".into()
            )]
        );
        let message = b[2]["status"]["conditions"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("fleet/agents") && message.contains("replicas"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_deleted_addon_loses_its_work_before_the_finalizer_goes() {
        let s = scenario(config(2), OffsetDateTime::now_utc());
        let answer = serde_json::to_value(&*addon(false, true, false)).unwrap();
        let server = serve(
            s.handle,
            vec![
                (Method::DELETE, WORK, deleted()),
                (Method::PATCH, ADDON, Reply::With(200, answer)),
            ],
        );
        let action = reconcile_once(addon(true, true, false), &s.ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        let (_, b) = finish(server).await;
        // kube-runtime removes its finalizer with a JSON patch naming it.
        assert!(b[1].to_string().contains("finalizers"), "{}", b[1]);
    }

    #[tokio::test]
    async fn a_load_balancer_entrypoint_is_dialled_by_address_and_verified_by_service_name() {
        let now = OffsetDateTime::now_utc();
        let mut config = (*config(2)).clone();
        config.spec.server.entrypoint = serde_json::from_value(json!({
            "type": "LoadBalancerService",
            "loadBalancerService": { "name": "cluster-tunnel-server-agents" },
        }))
        .unwrap();
        let service = |ingress: Value| {
            Reply::With(
                200,
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": "cluster-tunnel-server-agents", "namespace": NS },
                    "spec": { "type": "LoadBalancer", "ports": [{ "name": "agent", "port": 8091 }] },
                    "status": { "loadBalancer": { "ingress": ingress } },
                }),
            )
        };
        const SERVICE: &str =
            "/api/v1/namespaces/cluster-tunnel/services/cluster-tunnel-server-agents";

        // No address yet: an error (retried), and no work with a wrong address.
        let s = scenario(Arc::new(config.clone()), now);
        let server = serve(
            s.handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, SERVICE, service(json!([]))),
            ],
        );
        let err = reconcile_once(addon(true, false, false), &s.ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, ReconcileError::NoEntrypoint(_)), "{err}");
        finish(server).await;

        let s = scenario(Arc::new(config), now);
        let mut expected = steady("2026-01-01T00:00:00Z");
        expected.insert(
            1,
            (
                Method::GET,
                SERVICE,
                service(json!([{ "ip": "203.0.113.10" }])),
            ),
        );
        let server = serve(s.handle, expected);
        reconcile_once(addon(true, false, false), &s.ctx)
            .await
            .unwrap();
        let (_, b) = finish(server).await;
        let args =
            manifest(&b[2], "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
                .to_string();
        assert!(args.contains("--server=203.0.113.10:8091"), "{args}");
        assert!(
            args.contains("--server-name=cluster-tunnel-server-agents.cluster-tunnel.svc"),
            "{args}"
        );
    }
}
