//! The hub's own objects, kept as the [`TunnelConfiguration`] says: the
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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use tunnel_api::configuration::{
    AntiAffinity, Authorization, EntrypointType, InjectorSpec, ServerSpec, TunnelConfiguration,
};
use tunnel_api::labels::APP_NAME;
use tunnel_api::pod::TLS_DIR;

use crate::controller::{ControllerContext, RESYNC, RETRY_DELAY};
use crate::signer::FIELD_MANAGER;
use crate::status::StatusBoard;

/// The status condition this controller owns.
pub const CONDITION: &str = "ServerDeployed";

/// Where the hub's objects live and what they are called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubNames {
    /// The installation's name (the Helm release): prefix of every object
    /// and `app.kubernetes.io/instance`.
    pub instance: String,
    /// The manager's namespace, where the servers run.
    pub namespace: String,
    /// Trust domain of the identities.
    pub trust_domain: String,
}

impl HubNames {
    /// Name of the servers' Deployment, client Service, ServiceAccount,
    /// PodDisruptionBudget and RBAC objects.
    pub fn server(&self) -> String {
        format!("{}-server", self.instance)
    }
    fn labels(&self, component: Option<&str>) -> Value {
        let mut labels = json!({
            "app.kubernetes.io/name": APP_NAME,
            "app.kubernetes.io/instance": self.instance,
        });
        if let Some(c) = component {
            labels["app.kubernetes.io/component"] = json!(c);
        }
        labels
    }
    fn selector(&self) -> Value {
        self.labels(Some("server"))
    }
    fn meta(&self, name: &str, namespaced: bool, component: Option<&str>) -> Value {
        let mut meta = json!({ "name": name, "labels": self.labels(component) });
        if namespaced {
            meta["namespace"] = json!(self.namespace);
        }
        meta
    }
}

/// A configuration that cannot be turned into objects.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
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

/// What the API server can be given in the webhook configuration, from its
/// version: `matchConditions` are beta, on by default, from Kubernetes 1.28.
/// Older API servers drop them (1.27 with the feature gate off) or refuse
/// them (1.26 and older), and without them `failurePolicy: Fail` would hold
/// every pod of a labelled namespace while no injector answers: there the
/// webhook has no conditions and `Ignore`, as the chart renders it
/// (`semverCompare ">=1.28-0" .Capabilities.KubeVersion.Version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookSupport {
    /// Whether `matchConditions` are honoured.
    pub match_conditions: bool,
}

impl WebhookSupport {
    /// What a 1.28 or later API server supports.
    pub const CURRENT: Self = Self {
        match_conditions: true,
    };

    /// From a version as `/version` reports it (`gitVersion`, e.g.
    /// `v1.27.3-eks-2d98532`, else `major` and `minor`, e.g. "1" and "27+").
    /// A version that cannot be read counts as old: the safe side.
    pub fn of_version(git_version: &str, major: &str, minor: &str) -> Self {
        let number = |s: &str| -> Option<u32> {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let from_git = || {
            let mut parts = git_version.trim_start_matches('v').split('.');
            Some((number(parts.next()?)?, number(parts.next()?)?))
        };
        let version = from_git().or_else(|| Some((number(major)?, number(minor)?)));
        if version.is_none() {
            tracing::warn!(
                git_version,
                major,
                minor,
                "cannot read the API server's version; the webhook gets no matchConditions and failurePolicy Ignore"
            );
        }
        Self {
            match_conditions: version.is_some_and(|v| v >= (1, 28)),
        }
    }

    /// Asks the API server.
    pub async fn of_api_server(client: &kube::Client) -> Result<Self, HubError> {
        let info = client
            .apiserver_version()
            .await
            .map_err(|source| HubError::Api {
                action: "read the API server's version".into(),
                source,
            })?;
        Ok(Self::of_version(
            &info.git_version,
            &info.major,
            &info.minor,
        ))
    }
}

/// Every object the configuration asks for, in the order they are applied
/// (identity and permissions before the pods that use them); the webhook
/// configuration as `webhooks` allows.
pub fn desired_objects(
    config: &TunnelConfiguration,
    names: &HubNames,
    webhooks: WebhookSupport,
) -> Result<Vec<Value>, HubError> {
    let server = &config.spec.server;
    let mut out = vec![service_account(names)];
    if server.authorization == Authorization::Kubernetes {
        out.extend(server_rbac(server, names));
    }
    out.push(headless_service(server, names));
    out.push(agent_service(server, names));
    out.push(client_service(server, names));
    out.push(disruption_budget(server, names));
    out.push(server_deployment(server, names)?);
    if let Some(injector) = &config.spec.injector {
        out.push(webhook_configuration(injector, names, webhooks));
    }
    Ok(out)
}

fn service_account(names: &HubNames) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": names.meta(&names.server(), true, None),
        "automountServiceAccountToken": false,
    })
}

/// The servers read TunnelPolicy objects (and write their `Accepted`
/// condition), check sidecars' tokens, and with open-cluster-management read
/// the clusters' labels and sets and which clusters have the addon (only
/// their agents are admitted): nothing more.
fn server_rbac(server: &ServerSpec, names: &HubNames) -> [Value; 2] {
    let name = names.server();
    let mut rules = vec![
        json!({ "apiGroups": ["cluster-tunnel.io"], "resources": ["tunnelpolicies"], "verbs": ["get", "list", "watch"] }),
        json!({ "apiGroups": ["cluster-tunnel.io"], "resources": ["tunnelpolicies/status"], "verbs": ["patch"] }),
        json!({ "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] }),
    ];
    if server.clusters_from_open_cluster_management {
        rules.push(json!({ "apiGroups": ["cluster.open-cluster-management.io"], "resources": ["managedclusters", "managedclustersets"], "verbs": ["get", "list", "watch"] }));
        rules.push(json!({ "apiGroups": ["addon.open-cluster-management.io"], "resources": ["managedclusteraddons"], "resourceNames": [crate::ocm::ADDON_NAME], "verbs": ["get", "list", "watch"] }));
    }
    [
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": names.meta(&name, false, None),
            "rules": rules,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": names.meta(&name, false, None),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
            "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": names.namespace }],
        }),
    ]
}

fn headless_service(server: &ServerSpec, names: &HubNames) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.meta(&format!("{}-headless", names.server()), true, Some("server")),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": false,
            "selector": names.selector(),
            "ports": [port("agent", server.ports.agent)],
        },
    })
}

fn agent_service(server: &ServerSpec, names: &HubNames) -> Value {
    let mut meta = names.meta(&format!("{}-agents", names.server()), true, Some("server"));
    if !server.agent_service_annotations.is_empty() {
        meta["annotations"] = json!(server.agent_service_annotations);
    }
    let kind = match server.entrypoint.kind {
        EntrypointType::LoadBalancerService => "LoadBalancer",
        EntrypointType::Hostname => "ClusterIP",
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": kind,
            "selector": names.selector(),
            "ports": [port("agent", server.ports.agent)],
        },
    })
}

fn client_service(server: &ServerSpec, names: &HubNames) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.meta(&names.server(), true, Some("server")),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector(),
            "ports": [port("client", server.ports.client), port("admin", server.ports.admin)],
        },
    })
}

fn port(name: &str, number: u16) -> Value {
    json!({ "name": name, "port": number, "targetPort": name, "protocol": "TCP" })
}

fn disruption_budget(server: &ServerSpec, names: &HubNames) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": names.meta(&names.server(), true, None),
        "spec": {
            "maxUnavailable": server.pdb_max_unavailable,
            "selector": { "matchLabels": names.selector() },
        },
    })
}

/// Seconds of a `<n>s` duration (the chart's form of the drain timeout).
fn whole_seconds(field: &'static str, value: &str) -> Result<i64, HubError> {
    value
        .strip_suffix('s')
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| HubError::BadConfiguration {
            field,
            reason: format!("{value:?} is not a number of seconds like \"30s\""),
        })
}

fn check_duration(field: &'static str, value: &str) -> Result<(), HubError> {
    tunnel_proto::cli::parse_duration(value)
        .map(drop)
        .map_err(|reason| HubError::BadConfiguration { field, reason })
}

fn server_deployment(server: &ServerSpec, names: &HubNames) -> Result<Value, HubError> {
    let drain = whole_seconds("spec.server.drainTimeout", &server.drain_timeout)?;
    check_duration("spec.server.dialTimeout", &server.dial_timeout)?;
    check_duration("spec.server.deadPeerTimeout", &server.dead_peer_timeout)?;
    let ports = &server.ports;
    let mut args = vec![
        format!("--agent-listen=0.0.0.0:{}", ports.agent),
        format!("--client-listen=0.0.0.0:{}", ports.client),
        format!("--admin-listen=0.0.0.0:{}", ports.admin),
        format!("--tls-cert={TLS_DIR}/tls.crt"),
        format!("--tls-key={TLS_DIR}/tls.key"),
        format!("--ca={TLS_DIR}/ca.crt"),
        format!("--trust-domain={}", names.trust_domain),
        format!("--dial-timeout={}", server.dial_timeout),
        format!("--drain-timeout={}", server.drain_timeout),
        // Serving, not ready, agents sent elsewhere, before GOAWAY (docs/ha.md);
        // the chart's default, counted in the termination grace below.
        "--shutdown-delay=5s".to_owned(),
        format!("--dead-peer-timeout={}", server.dead_peer_timeout),
        // Agents behind a LoadBalancer or hostname connect until they hold
        // a tunnel to this many replicas.
        format!("--server-count={}", server.replicas),
        format!("--log-format={}", server.log_format),
        format!("--log-level={}", server.log_level),
    ];
    match server.authorization {
        Authorization::Kubernetes => {
            args.extend(["--policy-kubernetes".into(), "--token-review".into()]);
            if server.clusters_from_open_cluster_management {
                args.push("--clusters-from-ocm".into());
            }
        }
        Authorization::AllowAll => args.push("--allow-all".into()),
    }
    let term = json!({ "topologyKey": "kubernetes.io/hostname", "labelSelector": { "matchLabels": names.selector() } });
    let anti = match server.anti_affinity {
        AntiAffinity::Hard => json!({ "requiredDuringSchedulingIgnoredDuringExecution": [term] }),
        AntiAffinity::Soft => json!({
            "preferredDuringSchedulingIgnoredDuringExecution": [{ "weight": 100, "podAffinityTerm": term }],
        }),
    };
    let mut container = json!({
        "name": "server",
        "image": server.image,
        "imagePullPolicy": server.image_pull_policy,
        "args": args,
        "env": [{ "name": "TUNNEL_SERVER_ID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
        "ports": [
            { "name": "agent", "containerPort": ports.agent, "protocol": "TCP" },
            { "name": "client", "containerPort": ports.client, "protocol": "TCP" },
            { "name": "admin", "containerPort": ports.admin, "protocol": "TCP" },
        ],
        "readinessProbe": { "httpGet": { "path": "/readyz", "port": "admin" }, "periodSeconds": 5 },
        "livenessProbe": { "httpGet": { "path": "/healthz", "port": "admin" }, "periodSeconds": 10, "failureThreshold": 3 },
        "securityContext": restricted_security_context(),
        "volumeMounts": [{ "name": "tls", "mountPath": TLS_DIR, "readOnly": true }],
    });
    if let Some(resources) = &server.resources {
        container["resources"] = json!(resources);
    }
    let mut pod = json!({
        "serviceAccountName": names.server(),
        "automountServiceAccountToken": false,
        // The server's default shutdown delay (5 s), the drain, then 10 s.
        "terminationGracePeriodSeconds": drain + 15,
        "affinity": { "podAntiAffinity": anti },
        "containers": [container],
        "volumes": [{ "name": "tls", "secret": { "secretName": server.tls_secret_name } }],
    });
    if !server.image_pull_secrets.is_empty() {
        let secrets: Vec<Value> = server
            .image_pull_secrets
            .iter()
            .map(|n| json!({ "name": n }))
            .collect();
        pod["imagePullSecrets"] = json!(secrets);
    }
    if !server.node_selector.is_empty() {
        pod["nodeSelector"] = json!(server.node_selector);
    }
    if !server.tolerations.is_empty() {
        pod["tolerations"] = json!(server.tolerations);
    }
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": names.meta(&names.server(), true, Some("server")),
        "spec": {
            "replicas": server.replicas,
            "selector": { "matchLabels": names.selector() },
            "template": { "metadata": { "labels": names.selector() }, "spec": pod },
        },
    }))
}

/// The `restricted` Pod Security Standard for a container.
fn restricted_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// The webhook's `matchConditions` expression: the pod carries the
/// annotation `cluster-tunnel.io/inject` with any value but "false" (any
/// case, spaces trimmed), which the injector reads as an opt-out. So "true"
/// reaches the injector, and so does a mistyped value ("yes"), which it
/// refuses with a message naming the annotation instead of the pod starting
/// silently without its sidecar. The chart renders the same (`ct.injectOptIn`).
pub const OPT_IN_CONDITION: &str = "has(object.metadata.annotations) && 'cluster-tunnel.io/inject' in object.metadata.annotations && object.metadata.annotations['cluster-tunnel.io/inject'].trim().lowerAscii() != 'false'";

fn webhook_configuration(
    injector: &InjectorSpec,
    names: &HubNames,
    webhooks: WebhookSupport,
) -> Value {
    let mut excluded = vec![names.namespace.clone()];
    excluded.extend(injector.excluded_namespaces.iter().cloned());
    let mut metadata = names.meta(&injector.service_name, false, None);
    if let Some(from) = &injector.ca_inject_from {
        metadata["annotations"] = json!({ "cert-manager.io/inject-ca-from": from });
    }
    let mut config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [{
            "name": "inject.cluster-tunnel.io",
            "clientConfig": {
                "service": { "name": injector.service_name, "namespace": names.namespace, "path": "/mutate", "port": 443 },
            },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced" }],
            "namespaceSelector": { "matchExpressions": [
                { "key": injector.namespace_label, "operator": "In", "values": ["enabled"] },
                { "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded },
            ]},
            "objectSelector": { "matchExpressions": [
                { "key": "cluster-tunnel.io/inject", "operator": "NotIn", "values": ["false"] },
            ]},
            // Only opted-in pods reach the webhook (an objectSelector cannot
            // see annotations), so failurePolicy Fail holds no other pod.
            "matchConditions": [{ "name": "opted-in", "expression": OPT_IN_CONDITION }],
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": injector.timeout_seconds,
            "failurePolicy": injector.failure_policy,
        }],
    });
    if !webhooks.match_conditions {
        let hook = &mut config["webhooks"][0];
        if let Some(hook) = hook.as_object_mut() {
            hook.remove("matchConditions");
        }
        hook["failurePolicy"] = json!("Ignore");
    }
    config
}

/// What the controller needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Names and namespace.
    pub names: HubNames,
    /// Where conditions are reported.
    pub status: Arc<StatusBoard>,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
}

impl ControllerContext for Context {
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
async fn apply<K>(api: Api<K>, object: Value) -> Result<K, HubError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| HubError::Api {
        action: format!("apply {kind} {name}"),
        source,
    })
}

/// Deletes an object the configuration no longer asks for; gone is fine.
async fn remove<K>(api: Api<K>, kind: &str, name: &str) -> Result<(), HubError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(
                kind,
                name,
                "removed: the configuration no longer asks for it"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(HubError::Api {
            action: format!("delete {kind} {name}"),
            source,
        }),
    }
}

fn owner_reference(config: &TunnelConfiguration) -> Value {
    json!({
        "apiVersion": TunnelConfiguration::api_version(&()),
        "kind": TunnelConfiguration::kind(&()),
        "name": config.name_any(),
        "uid": config.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
    })
}

/// Applies every desired object and removes the unwanted ones; returns the
/// servers' Deployment as the API server has it.
pub async fn apply_all(
    config: &TunnelConfiguration,
    ctx: &Context,
) -> Result<Deployment, HubError> {
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
        object["metadata"]["ownerReferences"] = json!([owner]);
        match object["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                apply::<ServiceAccount>(Api::namespaced(client.clone(), ns), object).await?;
            }
            "ClusterRole" => {
                apply::<ClusterRole>(Api::all(client.clone()), object).await?;
            }
            "ClusterRoleBinding" => {
                apply::<ClusterRoleBinding>(Api::all(client.clone()), object).await?;
            }
            "Service" => {
                apply::<Service>(Api::namespaced(client.clone(), ns), object).await?;
            }
            "PodDisruptionBudget" => {
                apply::<PodDisruptionBudget>(Api::namespaced(client.clone(), ns), object).await?;
            }
            "Deployment" => {
                deployment =
                    Some(apply::<Deployment>(Api::namespaced(client.clone(), ns), object).await?);
            }
            "MutatingWebhookConfiguration" => {
                apply::<MutatingWebhookConfiguration>(Api::all(client.clone()), object).await?;
            }
            other => return Err(HubError::Internal(format!("no API for kind {other:?}"))),
        }
    }
    if config.spec.server.authorization == Authorization::AllowAll {
        let name = names.server();
        remove::<ClusterRoleBinding>(Api::all(client.clone()), "ClusterRoleBinding", &name).await?;
        remove::<ClusterRole>(Api::all(client.clone()), "ClusterRole", &name).await?;
    }
    deployment.ok_or_else(|| HubError::Internal("no server Deployment was applied".into()))
}

/// `ServerDeployed` from the Deployment's status: true once every replica
/// of the current generation is available.
pub fn deployed_condition(deployment: &Deployment) -> (bool, &'static str, String) {
    let wanted = deployment.spec.replicas.unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let available = status.available_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let current = status.observed_generation.is_some()
        && status.observed_generation == deployment.metadata.generation;
    let message = format!("{available}/{wanted} server replicas available, {updated} updated");
    if current && available >= wanted && updated >= wanted {
        (true, "Available", message)
    } else {
        (false, "Progressing", message)
    }
}

/// Reconciles the configuration's objects and reports `ServerDeployed`.
pub async fn reconcile(
    config: Arc<TunnelConfiguration>,
    ctx: Arc<Context>,
) -> Result<Action, HubError> {
    match apply_all(&config, &ctx).await {
        Ok(deployment) => {
            let (ok, reason, message) = deployed_condition(&deployment);
            tracing::debug!(ok, %message, "hub objects applied");
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
    use serde_json::json;

    use super::*;
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

    #[test]
    fn the_webhook_takes_only_opted_in_pods_and_fails_closed_by_default() {
        let names = HubNames {
            instance: "cluster-tunnel".into(),
            namespace: "cluster-tunnel".into(),
            trust_domain: "cluster.local".into(),
        };
        let spec: InjectorSpec =
            serde_json::from_value(json!({ "serviceName": "cluster-tunnel-injector" })).unwrap();
        let config = webhook_configuration(&spec, &names, WebhookSupport::CURRENT);
        let hook = &config["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["matchConditions"][0]["expression"], OPT_IN_CONDITION);
        assert!(config["metadata"].get("annotations").is_none());
        // Before 1.28: no conditions, so Ignore whatever is configured.
        let old = WebhookSupport {
            match_conditions: false,
        };
        let config = webhook_configuration(&spec, &names, old);
        let hook = &config["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert!(hook.get("matchConditions").is_none(), "{hook}");
        // cert-manager keeps the caBundle.
        let spec: InjectorSpec = serde_json::from_value(json!({
            "serviceName": "cluster-tunnel-injector",
            "caInjectFrom": "cluster-tunnel/cluster-tunnel-injector",
        }))
        .unwrap();
        let config = webhook_configuration(&spec, &names, WebhookSupport::CURRENT);
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "cluster-tunnel/cluster-tunnel-injector"
        );
    }

    #[test]
    fn match_conditions_come_with_kubernetes_1_28() {
        for (git, major, minor, want) in [
            ("v1.28.0", "1", "28", true),
            ("v1.33.1", "1", "33", true),
            ("v1.30.4-eks-a737599", "1", "30+", true),
            ("v1.29.2-gke.1217000", "1", "29+", true),
            ("v2.0.0", "2", "0", true),
            ("v1.27.9", "1", "27", false),
            ("v1.26.15+k3s1", "1", "26", false),
            // No usable gitVersion: major and minor.
            ("", "1", "28+", true),
            ("", "1", "27+", false),
            // Nothing readable: the safe side.
            ("", "", "", false),
        ] {
            assert_eq!(
                WebhookSupport::of_version(git, major, minor).match_conditions,
                want,
                "{git} {major}.{minor}"
            );
        }
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
            names: HubNames {
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
    ) -> Result<Action, HubError> {
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
            !deployed_condition(&d).0,
            "an old generation's replicas do not count"
        );
        d.status.as_mut().unwrap().observed_generation = Some(3);
        assert!(deployed_condition(&d).0);
        d.status.as_mut().unwrap().available_replicas = Some(1);
        let (ok, reason, message) = deployed_condition(&d);
        assert!(!ok);
        assert_eq!(reason, "Progressing");
        assert!(message.starts_with("1/2"), "{message}");
    }
}
