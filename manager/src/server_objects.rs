//! The servers' objects, kept as the [`TunnelConfiguration`] says: the
//! servers' Deployment, their three Services (clients, agents, and a
//! headless one so that agents inside the hub find every replica), their
//! PodDisruptionBudget, ServiceAccount and RBAC, and the sidecar injector's
//! `MutatingWebhookConfiguration`.
//!
//! Reconciled, not created once: a controller on the configuration owns
//! every object (an owner reference to the configuration), watches them,
//! and applies the whole desired object with server-side apply whenever the
//! configuration or an object changes, so an edited object is set back and
//! a deleted one comes back. Objects the configuration no longer asks for
//! (the servers' RBAC when authorization is off) are deleted.
//!
//! The chart renders the same objects (so that `helm install` creates them
//! at once); a test checks that both agree field for field, so Helm and the
//! manager never fight over them. The webhook's `caBundle` is left to the
//! injector (or cert-manager), which keeps it under its own field manager.
//!
//! This module is the controller (apply, remove, `ServerDeployed`); the
//! objects are built, as plain functions of the configuration, in
//! `desired` (names, the list, ServiceAccount, RBAC, Services,
//! PodDisruptionBudget), `deployment` (the servers' Deployment) and
//! `webhook` (the injector's webhook configuration).

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

use tunnel_api::configuration::{Authorization, TunnelConfiguration};
use tunnel_api::labels::APP_NAME;

use crate::controller::{ControllerContext, RESYNC, RETRY_DELAY};
use crate::signer::FIELD_MANAGER;
use crate::status::StatusBoard;

mod deployment;
mod desired;
mod webhook;

pub use desired::{ServerObject, ServerObjectNames, desired_objects};
pub use webhook::{OPT_IN_CONDITION, WebhookSupport};

/// The status condition this controller owns.
pub const CONDITION: &str = "ServerDeployed";

/// A configuration that cannot be turned into objects.
#[derive(Debug, thiserror::Error)]
pub enum ServerObjectsError {
    /// A field has a value the objects cannot carry.
    #[error("TunnelConfiguration {field}: {reason}")]
    BadConfiguration {
        /// The field, e.g. `spec.server.drainTimeout`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A bug: the objects built do not match what is applied.
    #[error("internal error: {0}")]
    Internal(String),
    /// The API server failed a request.
    #[error("cannot {action}: {source}")]
    Api {
        /// What was attempted.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the controller needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Names and namespace.
    pub names: ServerObjectNames,
    /// Where conditions are reported.
    pub status: Arc<StatusBoard>,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
}

impl ControllerContext for Context {
    // The module was named `hub` once: the metric label and the logs'
    // `controller` field keep that value so that dashboards and alerts
    // built on it still match.
    const NAME: &'static str = "hub";
    fn metrics(&self) -> &crate::metrics::ManagerMetrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// Applies one desired object (server-side apply, forced: the configuration wins).
async fn apply<K>(api: Api<K>, object: &K) -> Result<K, ServerObjectsError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| ServerObjectsError::Api {
        action: format!("apply {} {name}", K::kind(&())),
        source,
    })
}

/// Deletes an object the configuration no longer asks for; gone is fine.
async fn remove<K>(api: Api<K>, name: &str) -> Result<(), ServerObjectsError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(
                %kind,
                name,
                "removed: the configuration no longer asks for it"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ServerObjectsError::Api {
            action: format!("delete {kind} {name}"),
            source,
        }),
    }
}

fn owner_reference(config: &TunnelConfiguration) -> OwnerReference {
    OwnerReference {
        api_version: TunnelConfiguration::api_version(&()).into_owned(),
        kind: TunnelConfiguration::kind(&()).into_owned(),
        name: config.name_any(),
        uid: config.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        ..OwnerReference::default()
    }
}

/// Applies every desired object and removes the unwanted ones; returns the
/// servers' Deployment as the API server has it.
pub async fn apply_all(
    config: &TunnelConfiguration,
    ctx: &Context,
) -> Result<Deployment, ServerObjectsError> {
    let names = &ctx.names;
    let client = &ctx.client;
    let ns = names.namespace.as_str();
    let owner = owner_reference(config);
    let mut deployment = None;
    // Read each time: a cluster upgraded past 1.28 gets matchConditions
    // without a restart of the manager.
    let webhooks = if config.spec.injector.is_some() {
        WebhookSupport::of_api_server(client).await?
    } else {
        WebhookSupport::CURRENT
    };
    for mut object in desired_objects(config, names, webhooks)? {
        object.metadata_mut().owner_references = Some(vec![owner.clone()]);
        match &object {
            ServerObject::ServiceAccount(o) => {
                apply(Api::namespaced(client.clone(), ns), o).await?;
            }
            ServerObject::ClusterRole(o) => {
                apply(Api::all(client.clone()), o).await?;
            }
            ServerObject::ClusterRoleBinding(o) => {
                apply(Api::all(client.clone()), o).await?;
            }
            ServerObject::Service(o) => {
                apply(Api::namespaced(client.clone(), ns), o).await?;
            }
            ServerObject::PodDisruptionBudget(o) => {
                apply(Api::namespaced(client.clone(), ns), o).await?;
            }
            ServerObject::Deployment(o) => {
                deployment = Some(apply(Api::namespaced(client.clone(), ns), o).await?);
            }
            ServerObject::Webhook(o) => {
                apply(Api::all(client.clone()), o).await?;
            }
        }
    }
    if config.spec.server.authorization == Authorization::AllowAll {
        let name = names.server();
        remove::<ClusterRoleBinding>(Api::all(client.clone()), &name).await?;
        remove::<ClusterRole>(Api::all(client.clone()), &name).await?;
    }
    deployment
        .ok_or_else(|| ServerObjectsError::Internal("no server Deployment was applied".into()))
}

/// The `ServerDeployed` condition, as read from the servers' Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// Whether every replica of the current generation is available.
    pub ok: bool,
    /// `Available` or `Progressing`.
    pub reason: &'static str,
    /// How many replicas are available and updated, of how many.
    pub message: String,
}

/// `ServerDeployed` from the Deployment's status: true once every replica
/// of the current generation is available.
pub fn deployed_condition(deployment: &Deployment) -> Deployed {
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let available = status.available_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let current = status.observed_generation.is_some()
        && status.observed_generation == deployment.metadata.generation;
    let message = format!("{available}/{wanted} server replicas available, {updated} updated");
    let ok = current && available >= wanted && updated >= wanted;
    Deployed {
        ok,
        reason: if ok { "Available" } else { "Progressing" },
        message,
    }
}

/// Reconciles the configuration's objects and reports `ServerDeployed`.
pub async fn reconcile(
    config: Arc<TunnelConfiguration>,
    ctx: Arc<Context>,
) -> Result<Action, ServerObjectsError> {
    match apply_all(&config, &ctx).await {
        Ok(deployment) => {
            let Deployed {
                ok,
                reason,
                message,
            } = deployed_condition(&deployment);
            tracing::debug!(ok, %message, "server objects applied");
            ctx.status
                .set(&config, CONDITION, ok, reason, message)
                .await;
            // Until the rollout is done, look again soon; the Deployment's
            // own changes also wake the controller.
            Ok(Action::requeue(if ok { RESYNC } else { RETRY_DELAY }))
        }
        Err(error) => {
            ctx.status
                .set(&config, CONDITION, false, "ApplyFailed", error.to_string())
                .await;
            Err(error)
        }
    }
}

/// Runs the controller until `shutdown`: the one configuration `config_name`
/// and every object it owns.
pub async fn run(
    ctx: Arc<Context>,
    config_name: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.names.namespace.clone();
    let configs: Api<TunnelConfiguration> = Api::all(client.clone());
    let mine = watcher::Config::default().fields(&format!("metadata.name={config_name}"));
    let labelled = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/name={APP_NAME},app.kubernetes.io/instance={}",
        ctx.names.instance
    ));
    let by_name =
        watcher::Config::default().fields(&format!("metadata.name={}", ctx.names.server()));
    let controller = Controller::new(configs, mine)
        .owns(
            Api::<Deployment>::namespaced(client.clone(), &ns),
            labelled.clone(),
        )
        .owns(
            Api::<Service>::namespaced(client.clone(), &ns),
            labelled.clone(),
        )
        .owns(
            Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            labelled.clone(),
        )
        .owns(
            Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
            labelled.clone(),
        )
        // By name, so that RBAC can limit the manager's reads of RBAC
        // objects to the servers' own (resourceNames with a name selector).
        .owns(Api::<ClusterRole>::all(client.clone()), by_name.clone())
        .owns(Api::<ClusterRoleBinding>::all(client.clone()), by_name)
        .owns(
            Api::<MutatingWebhookConfiguration>::all(client.clone()),
            labelled,
        );
    crate::controller::run(controller, reconcile, ctx, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server, each under a timeout.

    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::controller::error_policy;
    use crate::mock_api::{self, Reply, TIMEOUT, deleted, finish, not_found, serve, status_reply};
    use tunnel_api::configuration::TunnelConfigurationSpec;

    const SA: &str = "/api/v1/namespaces/cluster-tunnel/serviceaccounts/cluster-tunnel-server";
    const ROLE: &str = "/apis/rbac.authorization.k8s.io/v1/clusterroles/cluster-tunnel-server";
    const BINDING: &str =
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/cluster-tunnel-server";
    const HEADLESS: &str =
        "/api/v1/namespaces/cluster-tunnel/services/cluster-tunnel-server-headless";
    const AGENTS: &str = "/api/v1/namespaces/cluster-tunnel/services/cluster-tunnel-server-agents";
    const CLIENTS: &str = "/api/v1/namespaces/cluster-tunnel/services/cluster-tunnel-server";
    const PDB: &str =
        "/apis/policy/v1/namespaces/cluster-tunnel/poddisruptionbudgets/cluster-tunnel-server";
    const DEPLOYMENT: &str =
        "/apis/apps/v1/namespaces/cluster-tunnel/deployments/cluster-tunnel-server";
    const WEBHOOK: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/cluster-tunnel-injector";
    const STATUS: &str =
        "/apis/cluster-tunnel.io/v1alpha1/tunnelconfigurations/cluster-tunnel/status";

    fn config(server: serde_json::Value, injector: bool) -> Arc<TunnelConfiguration> {
        let mut spec = json!({
            "server": server,
            "agent": { "image": "agent:1" },
        });
        if injector {
            spec["injector"] =
                json!({ "serviceName": "cluster-tunnel-injector", "failurePolicy": "Fail" });
        }
        let spec: TunnelConfigurationSpec = serde_json::from_value(spec).unwrap();
        let mut c = TunnelConfiguration::new("cluster-tunnel", spec);
        c.metadata.uid = Some("uid-config".into());
        c.metadata.generation = Some(4);
        Arc::new(c)
    }

    fn default_server() -> serde_json::Value {
        json!({
            "image": "registry.example/tunnel-server:2",
            "replicas": 3,
            "entrypoint": { "type": "LoadBalancerService", "loadBalancerService": { "name": "cluster-tunnel-server-agents" } },
        })
    }

    /// `/version` as an API server of `git_version` answers it.
    fn version(git_version: &str) -> Reply {
        let minor = git_version.split('.').nth(1).unwrap_or_default();
        Reply::With(
            200,
            json!({
                "major": "1", "minor": minor, "gitVersion": git_version,
                "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
            }),
        )
    }

    fn context() -> (Arc<Context>, mock_api::ApiHandle) {
        let (client, handle) = mock_api::client();
        let metrics = crate::metrics::ManagerMetrics::default();
        let status = Arc::new(StatusBoard::new(
            Api::all(client.clone()),
            vec![CONDITION],
            metrics.clone(),
        ));
        let ctx = Context {
            client,
            metrics,
            names: ServerObjectNames {
                instance: "cluster-tunnel".into(),
                namespace: "cluster-tunnel".into(),
                trust_domain: "cluster-tunnel".into(),
            },
            status,
        };
        (Arc::new(ctx), handle)
    }

    async fn reconcile_once(
        config: Arc<TunnelConfiguration>,
        ctx: &Arc<Context>,
    ) -> Result<Action, ServerObjectsError> {
        tokio::time::timeout(TIMEOUT, reconcile(config, ctx.clone()))
            .await
            .expect("reconcile in time")
    }

    fn condition<'a>(status_body: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
        status_body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no condition {type_} in {status_body}"))
    }

    fn rolled_out(generation: i64, replicas: i32) -> Reply {
        Reply::EchoWith(json!({
            "metadata": { "name": "cluster-tunnel-server", "namespace": "cluster-tunnel", "generation": generation },
            "status": { "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas },
        }))
    }

    /// The requests of one reconciliation, in order: the API server's
    /// version when `webhook` (a 1.33 one), RBAC when `rbac`, the
    /// Deployment answered with `deployment`, the webhook when `webhook`.
    fn applies(rbac: bool, deployment: Reply, webhook: bool) -> Vec<(Method, &'static str, Reply)> {
        let mut out = Vec::new();
        if webhook {
            out.push((Method::GET, "/version", version("v1.33.1")));
        }
        out.push((Method::PATCH, SA, Reply::Echo(None)));
        if rbac {
            out.push((Method::PATCH, ROLE, Reply::Echo(None)));
            out.push((Method::PATCH, BINDING, Reply::Echo(None)));
        }
        for path in [HEADLESS, AGENTS, CLIENTS, PDB] {
            out.push((Method::PATCH, path, Reply::Echo(None)));
        }
        out.push((Method::PATCH, DEPLOYMENT, deployment));
        if webhook {
            out.push((Method::PATCH, WEBHOOK, Reply::Echo(None)));
        }
        out
    }

    #[tokio::test]
    async fn every_object_is_applied_whole_and_owned_then_server_deployed_waits_for_the_rollout() {
        let (ctx, handle) = context();
        // A new Deployment: nothing available yet.
        let mut expected = applies(true, Reply::Echo(None), true);
        expected.push((Method::PATCH, STATUS, Reply::Echo(None)));
        let server = serve(handle, expected);
        let action = reconcile_once(config(default_server(), true), &ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RETRY_DELAY), "looks again soon");
        let (_, mut bodies) = finish(server).await;
        assert_eq!(bodies.remove(0), Value::Null, "GET /version first");
        for body in &bodies[..9] {
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "TunnelConfiguration", "{body}");
            assert_eq!(owner["uid"], "uid-config");
            assert_eq!(owner["controller"], true);
            assert_eq!(
                body["metadata"]["labels"]["app.kubernetes.io/instance"],
                "cluster-tunnel"
            );
        }
        // Whole objects, so that a deleted one is created again from them.
        let deployment = &bodies[7];
        assert_eq!(deployment["spec"]["replicas"], 3);
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["image"],
            "registry.example/tunnel-server:2"
        );
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"],
            deployment["spec"]["template"]["metadata"]["labels"]
        );
        let args = pod["containers"][0]["args"].to_string();
        assert!(
            args.contains("--policy-kubernetes") && args.contains("--token-review"),
            "{args}"
        );
        assert!(args.contains("--server-count=3"), "{args}");
        assert_eq!(
            pod["terminationGracePeriodSeconds"], 45,
            "shutdown delay, drain, 10 s"
        );
        assert_eq!(bodies[4]["spec"]["type"], "LoadBalancer");
        assert_eq!(bodies[3]["spec"]["clusterIP"], "None");
        let hook = &bodies[8]["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(
            hook["matchConditions"],
            json!([{ "name": "opted-in", "expression": OPT_IN_CONDITION }])
        );
        assert!(
            hook["clientConfig"].get("caBundle").is_none(),
            "the caBundle is the injector's"
        );
        let status = &bodies[9];
        let deployed = condition(status, CONDITION);
        assert_eq!(deployed["status"], "False");
        assert_eq!(deployed["reason"], "Progressing");
        assert!(
            deployed["message"].as_str().unwrap().contains("0/3"),
            "{deployed}"
        );
        assert_eq!(condition(status, "Ready")["status"], "False");
        assert_eq!(status["status"]["observedGeneration"], 4);
    }

    /// On an API server older than 1.28 the webhook gets no matchConditions
    /// and failurePolicy Ignore, whatever the configuration says.
    #[tokio::test]
    async fn an_older_api_server_gets_the_webhook_without_conditions_and_ignore() {
        let (ctx, handle) = context();
        let mut expected = applies(true, rolled_out(4, 3), true);
        expected[0] = (Method::GET, "/version", version("v1.27.9"));
        expected.push((Method::PATCH, STATUS, Reply::Echo(None)));
        let server = serve(handle, expected);
        reconcile_once(config(default_server(), true), &ctx)
            .await
            .unwrap();
        let (_, bodies) = finish(server).await;
        let hook = &bodies[9]["webhooks"][0];
        assert_eq!(hook["name"], "inject.cluster-tunnel.io");
        assert_eq!(hook["failurePolicy"], "Ignore", "configured Fail");
        assert!(hook.get("matchConditions").is_none(), "{hook}");
    }

    #[tokio::test]
    async fn a_rolled_out_deployment_makes_the_configuration_ready() {
        let (ctx, handle) = context();
        let mut expected = applies(true, rolled_out(2, 3), false);
        expected.push((Method::PATCH, STATUS, Reply::Echo(None)));
        let server = serve(handle, expected);
        let action = reconcile_once(config(default_server(), false), &ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let (_, bodies) = finish(server).await;
        let status = bodies.last().unwrap();
        let deployed = condition(status, CONDITION);
        assert_eq!(deployed["status"], "True", "{deployed}");
        assert!(
            deployed["message"].as_str().unwrap().starts_with("3/3"),
            "{deployed}"
        );
        assert_eq!(condition(status, "Ready")["status"], "True");
    }

    #[tokio::test]
    async fn authorization_off_removes_the_servers_rbac() {
        let (ctx, handle) = context();
        let mut server_spec = default_server();
        server_spec["authorization"] = json!("AllowAll");
        server_spec["entrypoint"] =
            json!({ "type": "Hostname", "hostname": { "value": "hub.example.com" } });
        let server = serve(
            handle,
            vec![
                (Method::PATCH, SA, Reply::Echo(None)),
                (Method::PATCH, HEADLESS, Reply::Echo(None)),
                (Method::PATCH, AGENTS, Reply::Echo(None)),
                (Method::PATCH, CLIENTS, Reply::Echo(None)),
                (Method::PATCH, PDB, Reply::Echo(None)),
                (Method::PATCH, DEPLOYMENT, rolled_out(1, 3)),
                // The binding is already gone; the role is deleted.
                (Method::DELETE, BINDING, not_found()),
                (Method::DELETE, ROLE, deleted()),
                (Method::PATCH, STATUS, Reply::Echo(None)),
            ],
        );
        reconcile_once(config(server_spec, false), &ctx)
            .await
            .unwrap();
        let (_, bodies) = finish(server).await;
        assert_eq!(
            bodies[2]["spec"]["type"], "ClusterIP",
            "a Hostname entrypoint needs no LoadBalancer"
        );
        let args = bodies[5]["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            args.contains("--allow-all") && !args.contains("--token-review"),
            "{args}"
        );
    }

    #[tokio::test]
    async fn a_refused_apply_is_reported_in_the_status_and_retried() {
        let (ctx, handle) = context();
        let server = serve(
            handle,
            vec![
                (Method::PATCH, SA, status_reply(403, "Forbidden")),
                (Method::PATCH, STATUS, Reply::Echo(None)),
            ],
        );
        let err = reconcile_once(config(default_server(), false), &ctx)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("apply ServiceAccount cluster-tunnel-server"),
            "{err}"
        );
        let (_, bodies) = finish(server).await;
        let deployed = condition(&bodies[1], CONDITION);
        assert_eq!(deployed["reason"], "ApplyFailed");
        assert!(
            deployed["message"]
                .as_str()
                .unwrap()
                .contains("ServiceAccount"),
            "{deployed}"
        );
        assert_eq!(
            error_policy(config(default_server(), false), &err, ctx),
            Action::requeue(RETRY_DELAY)
        );
    }

    #[tokio::test]
    async fn a_drain_timeout_that_is_not_whole_seconds_is_refused_before_anything_is_applied() {
        let (ctx, handle) = context();
        let mut server_spec = default_server();
        server_spec["drainTimeout"] = json!("1m");
        let server = serve(handle, vec![(Method::PATCH, STATUS, Reply::Echo(None))]);
        let err = reconcile_once(config(server_spec, false), &ctx)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("spec.server.drainTimeout"),
            "{err}"
        );
        let (_, bodies) = finish(server).await;
        assert_eq!(condition(&bodies[0], CONDITION)["status"], "False");
    }

    #[test]
    fn the_deployment_is_deployed_only_when_the_current_generation_is_available() {
        let mut d = Deployment::default();
        d.spec.replicas = Some(2);
        d.metadata.generation = Some(3);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            observed_generation: Some(2),
            available_replicas: Some(2),
            updated_replicas: Some(2),
            ..Default::default()
        });
        assert!(
            !deployed_condition(&d).ok,
            "an old generation's replicas do not count"
        );
        d.status.as_mut().unwrap().observed_generation = Some(3);
        assert!(deployed_condition(&d).ok);
        d.status.as_mut().unwrap().available_replicas = Some(1);
        let Deployed {
            ok,
            reason,
            message,
        } = deployed_condition(&d);
        assert!(!ok);
        assert_eq!(reason, "Progressing");
        assert!(message.starts_with("1/2"), "{message}");
    }
}
