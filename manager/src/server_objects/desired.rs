//! What the configuration asks for: the installation's names
//! ([`ServerObjectNames`]), every [`ServerObject`] in the order it is applied
//! ([`desired_objects`]), and the small objects built here: the servers'
//! ServiceAccount, RBAC, Services and PodDisruptionBudget. The Deployment
//! and the webhook configuration have modules of their own.

use std::collections::BTreeMap;

use k8s_openapi::Resource as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use tunnel_api::configuration::{Authorization, EntrypointType, ServerSpec, TunnelConfiguration};
use tunnel_api::labels::APP_NAME;

use super::ServerObjectsError;
use super::deployment::server_deployment;
use super::webhook::{WebhookSupport, webhook_configuration};

/// Where the servers' objects live and what they are called: the names of
/// the hub's installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerObjectNames {
    /// The installation's name (the Helm release): prefix of every object
    /// and `app.kubernetes.io/instance`.
    pub instance: String,
    /// The manager's namespace, where the servers run.
    pub namespace: String,
    /// Trust domain of the identities.
    pub trust_domain: String,
}

impl ServerObjectNames {
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
    pub(super) fn selector(&self) -> BTreeMap<String, String> {
        self.labels(Some("server"))
    }
    pub(super) fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector()),
            ..LabelSelector::default()
        }
    }
    pub(super) fn meta(&self, name: &str, namespaced: bool, component: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: namespaced.then(|| self.namespace.clone()),
            labels: Some(self.labels(component)),
            ..ObjectMeta::default()
        }
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

    pub(super) fn metadata_mut(&mut self) -> &mut ObjectMeta {
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
    names: &ServerObjectNames,
    webhooks: WebhookSupport,
) -> Result<Vec<ServerObject>, ServerObjectsError> {
    let server = &config.spec.server;
    let mut out = vec![ServerObject::ServiceAccount(service_account(names))];
    if server.authorization == Authorization::Kubernetes {
        let rbac = server_rbac(server, names);
        out.push(ServerObject::ClusterRole(rbac.role));
        out.push(ServerObject::ClusterRoleBinding(rbac.binding));
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

fn service_account(names: &ServerObjectNames) -> ServiceAccount {
    ServiceAccount {
        metadata: names.meta(&names.server(), true, None),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub(super) fn strings(items: &[&str]) -> Vec<String> {
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

/// The servers' permissions and the binding that gives them to the servers'
/// ServiceAccount.
struct ServerRbac {
    role: ClusterRole,
    binding: ClusterRoleBinding,
}

/// The servers read TunnelPolicy objects (and write their `Accepted`
/// condition), check sidecars' tokens, and with open-cluster-management read
/// the clusters' labels and sets and which clusters have the addon (only
/// their agents are admitted): nothing more.
fn server_rbac(server: &ServerSpec, names: &ServerObjectNames) -> ServerRbac {
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
            resource_names: Some(vec![tunnel_api::ocm::ADDON_NAME.to_owned()]),
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
    ServerRbac { role, binding }
}

fn headless_service(server: &ServerSpec, names: &ServerObjectNames) -> Service {
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

fn agent_service(server: &ServerSpec, names: &ServerObjectNames) -> Service {
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

fn client_service(server: &ServerSpec, names: &ServerObjectNames) -> Service {
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

fn disruption_budget(server: &ServerSpec, names: &ServerObjectNames) -> PodDisruptionBudget {
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
