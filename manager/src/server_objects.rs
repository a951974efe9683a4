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

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::Resource as _;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    LocalObjectReference, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use tunnel_api::configuration::{
    AntiAffinity, Authorization, EntrypointType, FailurePolicy, InjectorSpec, PullPolicy,
    ServerSpec, TunnelConfiguration,
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
    fn labels(&self, component: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
            (
                "app.kubernetes.io/instance".to_owned(),
                self.instance.clone(),
            ),
        ]);
        if let Some(c) = component {
            labels.insert("app.kubernetes.io/component".to_owned(), c.to_owned());
        }
        labels
    }
    fn selector(&self) -> BTreeMap<String, String> {
        self.labels(Some("server"))
    }
    fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector()),
            ..LabelSelector::default()
        }
    }
    fn meta(&self, name: &str, namespaced: bool, component: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: namespaced.then(|| self.namespace.clone()),
            labels: Some(self.labels(component)),
            ..ObjectMeta::default()
        }
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

/// One object the servers need, typed: what is built, applied and compared
/// with the chart's.
// A handful are built per reconciliation and applied one by one: the
// variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ServerObject {
    /// The servers' identity.
    ServiceAccount(ServiceAccount),
    /// What the servers may read and write.
    ClusterRole(ClusterRole),
    /// The role, bound to the servers' identity.
    ClusterRoleBinding(ClusterRoleBinding),
    /// The headless, agents' or clients' Service.
    Service(Service),
    /// How many servers a voluntary disruption may take.
    PodDisruptionBudget(PodDisruptionBudget),
    /// The servers.
    Deployment(Deployment),
    /// The sidecar injector's webhook.
    Webhook(MutatingWebhookConfiguration),
}

impl ServerObject {
    /// The object's kind, as the API server names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ServiceAccount(_) => ServiceAccount::KIND,
            Self::ClusterRole(_) => ClusterRole::KIND,
            Self::ClusterRoleBinding(_) => ClusterRoleBinding::KIND,
            Self::Service(_) => Service::KIND,
            Self::PodDisruptionBudget(_) => PodDisruptionBudget::KIND,
            Self::Deployment(_) => Deployment::KIND,
            Self::Webhook(_) => MutatingWebhookConfiguration::KIND,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::ServiceAccount(o) => &o.metadata,
            Self::ClusterRole(o) => &o.metadata,
            Self::ClusterRoleBinding(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::PodDisruptionBudget(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::Webhook(o) => &o.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::ServiceAccount(o) => &mut o.metadata,
            Self::ClusterRole(o) => &mut o.metadata,
            Self::ClusterRoleBinding(o) => &mut o.metadata,
            Self::Service(o) => &mut o.metadata,
            Self::PodDisruptionBudget(o) => &mut o.metadata,
            Self::Deployment(o) => &mut o.metadata,
            Self::Webhook(o) => &mut o.metadata,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// The object as the API server receives it (`apiVersion` and `kind`
    /// included).
    pub fn to_json(&self) -> serde_json::Result<Value> {
        match self {
            Self::ServiceAccount(o) => serde_json::to_value(o),
            Self::ClusterRole(o) => serde_json::to_value(o),
            Self::ClusterRoleBinding(o) => serde_json::to_value(o),
            Self::Service(o) => serde_json::to_value(o),
            Self::PodDisruptionBudget(o) => serde_json::to_value(o),
            Self::Deployment(o) => serde_json::to_value(o),
            Self::Webhook(o) => serde_json::to_value(o),
        }
    }
}

/// Every object the configuration asks for, in the order they are applied
/// (identity and permissions before the pods that use them); the webhook
/// configuration as `webhooks` allows.
pub fn desired_objects(
    config: &TunnelConfiguration,
    names: &HubNames,
    webhooks: WebhookSupport,
) -> Result<Vec<ServerObject>, HubError> {
    let server = &config.spec.server;
    let mut out = vec![ServerObject::ServiceAccount(service_account(names))];
    if server.authorization == Authorization::Kubernetes {
        let (role, binding) = server_rbac(server, names);
        out.push(ServerObject::ClusterRole(role));
        out.push(ServerObject::ClusterRoleBinding(binding));
    }
    out.push(ServerObject::Service(headless_service(server, names)));
    out.push(ServerObject::Service(agent_service(server, names)));
    out.push(ServerObject::Service(client_service(server, names)));
    out.push(ServerObject::PodDisruptionBudget(disruption_budget(
        server, names,
    )));
    out.push(ServerObject::Deployment(server_deployment(server, names)?));
    if let Some(injector) = &config.spec.injector {
        out.push(ServerObject::Webhook(webhook_configuration(
            injector, names, webhooks,
        )));
    }
    Ok(out)
}

fn service_account(names: &HubNames) -> ServiceAccount {
    ServiceAccount {
        metadata: names.meta(&names.server(), true, None),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|&s| s.to_owned()).collect()
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

/// The servers read TunnelPolicy objects (and write their `Accepted`
/// condition), check sidecars' tokens, and with open-cluster-management read
/// the clusters' labels and sets and which clusters have the addon (only
/// their agents are admitted): nothing more.
fn server_rbac(server: &ServerSpec, names: &HubNames) -> (ClusterRole, ClusterRoleBinding) {
    let name = names.server();
    let read = ["get", "list", "watch"];
    let mut rules = vec![
        rule("cluster-tunnel.io", &["tunnelpolicies"], &read),
        rule("cluster-tunnel.io", &["tunnelpolicies/status"], &["patch"]),
        rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
    ];
    if server.clusters_from_open_cluster_management {
        rules.push(rule(
            "cluster.open-cluster-management.io",
            &["managedclusters", "managedclustersets"],
            &read,
        ));
        rules.push(PolicyRule {
            resource_names: Some(vec![crate::ocm::ADDON_NAME.to_owned()]),
            ..rule(
                "addon.open-cluster-management.io",
                &["managedclusteraddons"],
                &read,
            )
        });
    }
    let role = ClusterRole {
        metadata: names.meta(&name, false, None),
        rules: Some(rules),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: names.meta(&name, false, None),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: ClusterRole::KIND.to_owned(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: ServiceAccount::KIND.to_owned(),
            name,
            namespace: Some(names.namespace.clone()),
            ..Subject::default()
        }]),
    };
    (role, binding)
}

fn headless_service(server: &ServerSpec, names: &HubNames) -> Service {
    Service {
        metadata: names.meta(
            &format!("{}-headless", names.server()),
            true,
            Some("server"),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(false),
            selector: Some(names.selector()),
            ports: Some(vec![port("agent", server.ports.agent)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn agent_service(server: &ServerSpec, names: &HubNames) -> Service {
    let mut metadata = names.meta(&format!("{}-agents", names.server()), true, Some("server"));
    if !server.agent_service_annotations.is_empty() {
        metadata.annotations = Some(server.agent_service_annotations.clone());
    }
    let kind = match server.entrypoint.kind {
        EntrypointType::LoadBalancerService => "LoadBalancer",
        EntrypointType::Hostname => "ClusterIP",
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(kind.to_owned()),
            selector: Some(names.selector()),
            ports: Some(vec![port("agent", server.ports.agent)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn client_service(server: &ServerSpec, names: &HubNames) -> Service {
    Service {
        metadata: names.meta(&names.server(), true, Some("server")),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(names.selector()),
            ports: Some(vec![
                port("client", server.ports.client),
                port("admin", server.ports.admin),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn port(name: &str, number: u16) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: i32::from(number),
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

fn disruption_budget(server: &ServerSpec, names: &HubNames) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: names.meta(&names.server(), true, None),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(server.pdb_max_unavailable)),
            selector: Some(names.label_selector()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
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
    tunnel_shell::units::parse_duration(value)
        .map(drop)
        .map_err(|e| HubError::BadConfiguration {
            field,
            reason: e.to_string(),
        })
}

fn pull_policy(policy: PullPolicy) -> &'static str {
    match policy {
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Always => "Always",
        PullPolicy::Never => "Never",
    }
}

fn container_port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(number),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn admin_probe(path: &str, period_seconds: i32, failure_threshold: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold,
        ..Probe::default()
    }
}

fn server_deployment(server: &ServerSpec, names: &HubNames) -> Result<Deployment, HubError> {
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
    let term = PodAffinityTerm {
        topology_key: "kubernetes.io/hostname".to_owned(),
        label_selector: Some(names.label_selector()),
        ..PodAffinityTerm::default()
    };
    let anti = match server.anti_affinity {
        AntiAffinity::Hard => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Soft => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
    };
    let container = Container {
        name: "server".to_owned(),
        image: Some(server.image.clone()),
        image_pull_policy: Some(pull_policy(server.image_pull_policy).to_owned()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "TUNNEL_SERVER_ID".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            container_port("agent", ports.agent),
            container_port("client", ports.client),
            container_port("admin", ports.admin),
        ]),
        readiness_probe: Some(admin_probe("/readyz", 5, None)),
        liveness_probe: Some(admin_probe("/healthz", 10, Some(3))),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(vec![VolumeMount {
            name: "tls".to_owned(),
            mount_path: TLS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        resources: server.resources.clone(),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(names.server()),
        automount_service_account_token: Some(false),
        // The server's default shutdown delay (5 s), the drain, then 10 s.
        termination_grace_period_seconds: Some(drain + 15),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(anti),
            ..Affinity::default()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(server.tls_secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        image_pull_secrets: (!server.image_pull_secrets.is_empty()).then(|| {
            server
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        node_selector: (!server.node_selector.is_empty()).then(|| server.node_selector.clone()),
        tolerations: (!server.tolerations.is_empty()).then(|| server.tolerations.clone()),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: names.meta(&names.server(), true, Some("server")),
        spec: DeploymentSpec {
            replicas: Some(server.replicas),
            selector: names.label_selector(),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names.selector()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    })
}

/// The `restricted` Pod Security Standard for a container.
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// The webhook's `matchConditions` expression: the pod carries the
/// annotation `cluster-tunnel.io/inject` with any value but "false" (any
/// case, spaces trimmed), which the injector reads as an opt-out. So "true"
/// reaches the injector, and so does a mistyped value ("yes"), which it
/// refuses with a message naming the annotation instead of the pod starting
/// silently without its sidecar. The chart renders the same (`ct.injectOptIn`).
pub const OPT_IN_CONDITION: &str = "has(object.metadata.annotations) && 'cluster-tunnel.io/inject' in object.metadata.annotations && object.metadata.annotations['cluster-tunnel.io/inject'].trim().lowerAscii() != 'false'";

fn failure_policy(policy: FailurePolicy) -> &'static str {
    match policy {
        FailurePolicy::Ignore => "Ignore",
        FailurePolicy::Fail => "Fail",
    }
}

fn requirement(key: &str, operator: &str, values: Vec<String>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: Some(values),
    }
}

fn webhook_configuration(
    injector: &InjectorSpec,
    names: &HubNames,
    webhooks: WebhookSupport,
) -> MutatingWebhookConfiguration {
    let mut excluded = vec![names.namespace.clone()];
    excluded.extend(injector.excluded_namespaces.iter().cloned());
    let mut metadata = names.meta(&injector.service_name, false, None);
    if let Some(from) = &injector.ca_inject_from {
        metadata.annotations = Some(BTreeMap::from([(
            "cert-manager.io/inject-ca-from".to_owned(),
            from.clone(),
        )]));
    }
    let (match_conditions, failure) = if webhooks.match_conditions {
        // Only opted-in pods reach the webhook (an objectSelector cannot
        // see annotations), so failurePolicy Fail holds no other pod.
        let opted_in = MatchCondition {
            name: "opted-in".to_owned(),
            expression: OPT_IN_CONDITION.to_owned(),
        };
        (Some(vec![opted_in]), injector.failure_policy)
    } else {
        (None, FailurePolicy::Ignore)
    };
    let hook = MutatingWebhook {
        name: "inject.cluster-tunnel.io".to_owned(),
        client_config: WebhookClientConfig {
            service: Some(ServiceReference {
                name: injector.service_name.clone(),
                namespace: names.namespace.clone(),
                path: Some("/mutate".to_owned()),
                port: Some(443),
            }),
            ..WebhookClientConfig::default()
        },
        rules: Some(vec![RuleWithOperations {
            operations: Some(strings(&["CREATE"])),
            api_groups: Some(strings(&[""])),
            api_versions: Some(strings(&["v1"])),
            resources: Some(strings(&["pods"])),
            scope: Some("Namespaced".to_owned()),
        }]),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![
                requirement(&injector.namespace_label, "In", strings(&["enabled"])),
                requirement("kubernetes.io/metadata.name", "NotIn", excluded),
            ]),
            ..LabelSelector::default()
        }),
        object_selector: Some(LabelSelector {
            match_expressions: Some(vec![requirement(
                "cluster-tunnel.io/inject",
                "NotIn",
                strings(&["false"]),
            )]),
            ..LabelSelector::default()
        }),
        match_conditions,
        admission_review_versions: strings(&["v1"]),
        side_effects: "None".to_owned(),
        reinvocation_policy: Some("IfNeeded".to_owned()),
        timeout_seconds: Some(injector.timeout_seconds),
        failure_policy: Some(failure_policy(failure).to_owned()),
        ..MutatingWebhook::default()
    };
    MutatingWebhookConfiguration {
        metadata,
        webhooks: Some(vec![hook]),
    }
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
async fn apply<K>(api: Api<K>, object: &K) -> Result<K, HubError>
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
    .map_err(|source| HubError::Api {
        action: format!("apply {} {name}", K::kind(&())),
        source,
    })
}

/// Deletes an object the configuration no longer asks for; gone is fine.
async fn remove<K>(api: Api<K>, name: &str) -> Result<(), HubError>
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
        Err(source) => Err(HubError::Api {
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

    #[test]
    fn the_webhook_takes_only_opted_in_pods_and_fails_closed_by_default() {
        let names = HubNames {
            instance: "cluster-tunnel".into(),
            namespace: "cluster-tunnel".into(),
            trust_domain: "cluster.local".into(),
        };
        let spec: InjectorSpec =
            serde_json::from_value(json!({ "serviceName": "cluster-tunnel-injector" })).unwrap();
        let config = serde_json::to_value(webhook_configuration(
            &spec,
            &names,
            WebhookSupport::CURRENT,
        ))
        .unwrap();
        let hook = &config["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["matchConditions"][0]["expression"], OPT_IN_CONDITION);
        assert!(config["metadata"].get("annotations").is_none());
        // Before 1.28: no conditions, so Ignore whatever is configured.
        let old = WebhookSupport {
            match_conditions: false,
        };
        let config = serde_json::to_value(webhook_configuration(&spec, &names, old)).unwrap();
        let hook = &config["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert!(hook.get("matchConditions").is_none(), "{hook}");
        // cert-manager keeps the caBundle.
        let spec: InjectorSpec = serde_json::from_value(json!({
            "serviceName": "cluster-tunnel-injector",
            "caInjectFrom": "cluster-tunnel/cluster-tunnel-injector",
        }))
        .unwrap();
        let config = serde_json::to_value(webhook_configuration(
            &spec,
            &names,
            WebhookSupport::CURRENT,
        ))
        .unwrap();
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
