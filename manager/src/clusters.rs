//! The controller over open-cluster-management's `ManagedCluster`s
//! (`cluster.open-cluster-management.io/v1`, cluster-scoped). For each one:
//!
//! 1. the signer CA (read from its Secret once, generated when absent);
//! 2. the agent's certificate Secret `cluster-tunnel-agent-<cluster>` in the
//!    manager's namespace, issued or renewed when a fifth of its lifetime is left;
//! 3. the hub address agents dial (a fixed host name, or the LoadBalancer
//!    Service's ingress address);
//! 4. the `ManifestWork` `cluster-tunnel-agent` in the cluster's namespace
//!    (server-side apply: what the configuration says, every time);
//! 5. the `ManagedClusterAddOn` `cluster-tunnel` and its conditions, from the
//!    server's live view of the cluster's agents.
//!
//! **Removal uses a finalizer** (`cluster-tunnel.io/agent-cleanup`), not
//! only owner references: when a `ManagedCluster` is being deleted the work
//! must be deleted while the cluster's work agent still runs, so that it
//! removes the agent from the managed cluster; garbage collection after the
//! cluster is gone would be too late. Owner references are set as well, so
//! anything left is collected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::watcher;
use kube::{CustomResource, Resource, ResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{OnceCell, watch};

use crate::addon::{self, ADDON_NAME};
use crate::agent_work::{self, AgentCert, HubAddress, WORK_NAME};
use crate::crd::{EntrypointType, TunnelConfiguration};
use crate::signer::{self, FIELD_MANAGER, Leaf, Signer, SignerError};

/// Finalizer on every `ManagedCluster` the manager delivered an agent to.
pub const FINALIZER: &str = "cluster-tunnel.io/agent-cleanup";
/// Periodic re-check (renewals, drift).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Delay before a failed reconciliation is retried.
pub const RETRY_DELAY: Duration = Duration::from_secs(15);

/// The parts of a `ManagedCluster` the manager reads.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "cluster.open-cluster-management.io",
    version = "v1",
    kind = "ManagedCluster",
    plural = "managedclusters"
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedClusterSpec {
    /// Whether the hub accepted the cluster.
    #[serde(default)]
    pub hub_accepts_client: bool,
}

/// Name of the agent certificate Secret of `cluster`.
pub fn agent_secret_name(cluster: &str) -> String {
    format!("cluster-tunnel-agent-{cluster}")
}

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No `TunnelConfiguration` was found (yet).
    #[error("no TunnelConfiguration named {0}")]
    NoConfiguration(String),
    /// Certificates failed.
    #[error(transparent)]
    Signer(#[from] SignerError),
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
    fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }
}

/// The clock (tests set it).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Agents connected per cluster, as the server last listed them; `None`
/// when the server could not be asked.
pub type LiveView = Option<HashMap<String, usize>>;

/// What reconciliation needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// The manager's namespace (Secrets, Services).
    pub namespace: String,
    /// The configuration.
    pub config: watch::Receiver<Option<Arc<TunnelConfiguration>>>,
    /// Name of the configuration (for errors).
    pub config_name: String,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// The server's live view.
    pub live: watch::Receiver<LiveView>,
    /// The signer, once read.
    pub signer: OnceCell<Arc<Signer>>,
    /// Now.
    pub clock: Clock,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Context {
    async fn signer(&self, config: &TunnelConfiguration) -> Result<Arc<Signer>, ReconcileError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let signer = self
            .signer
            .get_or_try_init(|| async {
                signer::ensure_signer(
                    &secrets,
                    &config.spec.signer.secret_name,
                    &self.trust_domain,
                    (self.clock)(),
                )
                .await
                .map(Arc::new)
            })
            .await?;
        Ok(signer.clone())
    }

    async fn hub_address(
        &self,
        config: &TunnelConfiguration,
    ) -> Result<HubAddress, ReconcileError> {
        let entry = &config.spec.server.entrypoint;
        match entry.kind {
            EntrypointType::Hostname => {
                let h = entry
                    .hostname
                    .as_ref()
                    .ok_or(ReconcileError::BadConfiguration(
                        "type Hostname needs hostname",
                    ))?;
                Ok(HubAddress {
                    host: h.value.clone(),
                    port: h.port,
                    server_name: h.value.clone(),
                })
            }
            EntrypointType::LoadBalancerService => {
                let lb = entry.load_balancer_service.as_ref().ok_or(
                    ReconcileError::BadConfiguration(
                        "type LoadBalancerService needs loadBalancerService",
                    ),
                )?;
                let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
                let svc = services
                    .get(&lb.name)
                    .await
                    .map_err(ReconcileError::api(format!("get Service {}", lb.name)))?;
                let mut hub = load_balancer_address(&svc)
                    .ok_or_else(|| ReconcileError::NoEntrypoint(lb.name.clone()))?;
                hub.server_name = format!("{}.{}.svc", lb.name, self.namespace);
                Ok(hub)
            }
        }
    }
}

/// The first ingress address of a LoadBalancer Service and its `agent` port.
pub fn load_balancer_address(svc: &Service) -> Option<HubAddress> {
    let ingress = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?;
    let host = ingress.hostname.clone().or_else(|| ingress.ip.clone())?;
    let ports = svc.spec.as_ref()?.ports.as_ref()?;
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("agent"))
        .or_else(|| ports.first())?
        .port;
    Some(HubAddress {
        server_name: host.clone(),
        host,
        port: u16::try_from(port).ok()?,
    })
}

fn owner_of(cluster: &ManagedCluster) -> OwnerReference {
    OwnerReference {
        api_version: ManagedCluster::api_version(&()).into_owned(),
        kind: ManagedCluster::kind(&()).into_owned(),
        name: cluster.name_any(),
        uid: cluster.metadata.uid.clone().unwrap_or_default(),
        block_owner_deletion: None,
        controller: Some(true),
    }
}

fn secret_bytes(secret: &Secret, key: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

/// Reconciles one cluster (with its finalizer).
pub async fn reconcile(
    cluster: Arc<ManagedCluster>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let api: Api<ManagedCluster> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, cluster, |event| async {
        match event {
            Event::Apply(c) => apply(&c, &ctx).await,
            Event::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

async fn apply(cluster: &ManagedCluster, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = cluster.name_any();
    let config = ctx
        .config
        .borrow()
        .clone()
        .ok_or_else(|| ReconcileError::NoConfiguration(ctx.config_name.clone()))?;
    let now = (ctx.clock)();
    let signer = ctx.signer(&config).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let validity = time::Duration::days(i64::from(config.spec.signer.certificate_validity_days));
    let (secret, _) = signer::ensure_leaf(
        &secrets,
        &agent_secret_name(&name),
        &Leaf::Agent {
            cluster: name.clone(),
        },
        &signer,
        &ctx.trust_domain,
        validity,
        Some(owner_of(cluster)),
        now,
    )
    .await?;
    let cert = AgentCert {
        cert: secret_bytes(&secret, "tls.crt"),
        key: secret_bytes(&secret, "tls.key"),
        ca: secret_bytes(&secret, "ca.crt"),
    };
    let hub = ctx.hub_address(&config).await?;
    let owner = serde_json::to_value(owner_of(cluster)).expect("an owner reference serializes");
    let work = agent_work::manifest_work(&name, &config.spec.agent, &hub, &cert, Some(owner));
    let works: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &name,
        &agent_work::manifest_work_resource(),
    );
    let applied = works
        .patch(
            WORK_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(work),
        )
        .await
        .map_err(ReconcileError::api(format!(
            "apply ManifestWork {name}/{WORK_NAME}"
        )))?;
    let work_created = applied
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok());

    let addons: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &name, &addon::addon_resource());
    let addon_obj = serde_json::json!({
        "apiVersion": "addon.open-cluster-management.io/v1alpha1",
        "kind": "ManagedClusterAddOn",
        "metadata": { "name": ADDON_NAME, "namespace": name },
        "spec": { "installNamespace": config.spec.agent.namespace },
    });
    let current = addons
        .patch(
            ADDON_NAME,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(addon_obj),
        )
        .await
        .map_err(ReconcileError::api(format!(
            "apply ManagedClusterAddOn {name}/{ADDON_NAME}"
        )))?;
    let previous: Vec<serde_json::Value> = current.data["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let agents = ctx
        .live
        .borrow()
        .as_ref()
        .map(|m| m.get(&name).copied().unwrap_or(0));
    let conds = addon::conditions(agents, config.spec.agent.replicas, work_created, now);
    let body = addon::status_body(&name, &conds, &previous, now);
    addons
        .patch_status(
            ADDON_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(ReconcileError::api(format!(
            "apply ManagedClusterAddOn {name}/{ADDON_NAME} status"
        )))?;
    tracing::debug!(cluster = %name, ?agents, "cluster reconciled");
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(cluster: &ManagedCluster, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = cluster.name_any();
    let works: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &name,
        &agent_work::manifest_work_resource(),
    );
    let gone = |r: Result<_, kube::Error>| match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    };
    gone(
        works
            .delete(WORK_NAME, &DeleteParams::default())
            .await
            .map(|_| ()),
    )
    .map_err(ReconcileError::api(format!(
        "delete ManifestWork {name}/{WORK_NAME}"
    )))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = agent_secret_name(&name);
    gone(
        secrets
            .delete(&secret, &DeleteParams::default())
            .await
            .map(|_| ()),
    )
    .map_err(ReconcileError::api(format!("delete Secret {secret}")))?;
    tracing::info!(cluster = %name, "agent removed");
    Ok(Action::await_change())
}

/// Logs a failure and retries after [`RETRY_DELAY`].
pub fn error_policy(
    cluster: Arc<ManagedCluster>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(cluster = %cluster.name_any(), %error, "reconciliation failed; retrying");
    Action::requeue(RETRY_DELAY)
}

/// Runs the controller until `shutdown`; every cluster is reconciled again
/// when the configuration or the live view changes.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<ManagedCluster> = Api::all(ctx.client.clone());
    let changes = |rx: watch::Receiver<_>| {
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    };
    let trigger =
        futures_util::stream::select(changes(ctx.config.clone()), changes_live(ctx.live.clone()));
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            ctx.metrics.observe("clusters", &result);
            std::future::ready(())
        })
        .await;
}

fn changes_live(rx: watch::Receiver<LiveView>) -> impl futures_util::Stream<Item = ()> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server (`tower_test`), each under a timeout; time is the test's.

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;
    use crate::crd::TunnelConfigurationSpec;
    use crate::mock_api::{Reply, deleted, finish, not_found, serve};

    const NS: &str = "cluster-tunnel";
    const TD: &str = "cluster-tunnel";
    const TIMEOUT: Duration = Duration::from_secs(5);
    const WORK: &str = "/apis/work.open-cluster-management.io/v1/namespaces/east/manifestworks/cluster-tunnel-agent";
    const ADDON: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel";
    const CLUSTER: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters/east";
    const AGENT_SECRET: &str =
        "/api/v1/namespaces/cluster-tunnel/secrets/cluster-tunnel-agent-east";

    fn config(validity_days: u32, replicas: i32) -> Arc<TunnelConfiguration> {
        let spec: TunnelConfigurationSpec = serde_json::from_value(json!({
            "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com", "port": 443 } } },
            "agent": { "image": "agent:1", "replicas": replicas },
            "signer": { "certificateValidityDays": validity_days },
        }))
        .unwrap();
        Arc::new(TunnelConfiguration::new(crate::crd::DEFAULT_NAME, spec))
    }

    fn cluster(finalizer: bool, deleting: bool) -> Arc<ManagedCluster> {
        let mut c: ManagedCluster = serde_json::from_value(json!({
            "apiVersion": "cluster.open-cluster-management.io/v1",
            "kind": "ManagedCluster",
            "metadata": { "name": "east", "uid": "uid-east", "resourceVersion": "7" },
            "spec": { "hubAcceptsClient": true },
        }))
        .unwrap();
        if finalizer {
            c.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            c.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-01-01T00:00:00Z".parse().unwrap(),
                ));
        }
        Arc::new(c)
    }

    struct Scenario {
        ctx: Arc<Context>,
        handle: mock::Handle<Request<Body>, Response<Body>>,
        live: watch::Sender<LiveView>,
    }

    fn scenario(
        config: Arc<TunnelConfiguration>,
        signer: Option<Arc<Signer>>,
        now: OffsetDateTime,
    ) -> Scenario {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (_config_tx, config_rx) = watch::channel(Some(config));
        let (live, live_rx) = watch::channel(Some(HashMap::new()));
        Scenario {
            ctx: Arc::new(Context {
                client,
                namespace: NS.into(),
                config: config_rx,
                config_name: crate::crd::DEFAULT_NAME.into(),
                trust_domain: TD.into(),
                live: live_rx,
                signer: OnceCell::new_with(signer),
                clock: Arc::new(move || now),
                metrics: crate::metrics::ManagerMetrics::default(),
            }),
            handle,
            live,
        }
    }

    async fn reconcile_once(
        c: Arc<ManagedCluster>,
        ctx: &Arc<Context>,
    ) -> Result<Action, ReconcileError> {
        tokio::time::timeout(TIMEOUT, reconcile(c, ctx.clone()))
            .await
            .expect("reconcile in time")
    }

    fn conditions_of(status_body: &Value) -> Vec<(String, String)> {
        status_body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap().into(),
                    c["status"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    fn agent_secret(issued: &signer::Issued, ca: &str) -> Value {
        serde_json::to_value(signer::tls_secret(
            "cluster-tunnel-agent-east",
            NS,
            issued,
            ca,
            None,
        ))
        .unwrap()
    }

    fn secret_in_work(work: &Value) -> Vec<u8> {
        let secret = &work["spec"]["workload"]["manifests"][2];
        BASE64
            .decode(secret["data"]["tls.crt"].as_str().unwrap())
            .unwrap()
    }

    #[tokio::test]
    async fn a_new_cluster_first_gets_the_finalizer() {
        let now = OffsetDateTime::now_utc();
        let s = scenario(config(90, 2), None, now);
        let server = serve(
            s.handle,
            vec![(
                Method::PATCH,
                CLUSTER,
                Reply::With(200, serde_json::to_value(&*cluster(true, false)).unwrap()),
            )],
        );
        let action = reconcile_once(cluster(false, false), &s.ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        let (_, bodies) = finish(server).await;
        assert!(bodies[0].to_string().contains(FINALIZER), "{}", bodies[0]);
    }

    #[tokio::test]
    async fn a_new_cluster_gets_a_signer_a_certificate_its_manifest_work_and_addon_status() {
        let now = OffsetDateTime::now_utc();
        let s = scenario(config(90, 2), None, now);
        let created = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let created: &'static str = Box::leak(created.into_boxed_str());
        let server = serve(
            s.handle,
            vec![
                (
                    Method::GET,
                    "/api/v1/namespaces/cluster-tunnel/secrets/cluster-tunnel-signer",
                    not_found(),
                ),
                (
                    Method::POST,
                    "/api/v1/namespaces/cluster-tunnel/secrets",
                    Reply::Echo(None),
                ),
                (Method::GET, AGENT_SECRET, not_found()),
                (Method::PATCH, AGENT_SECRET, Reply::Echo(None)),
                (Method::PATCH, WORK, Reply::Echo(Some(created))),
                (Method::PATCH, ADDON, Reply::Echo(None)),
                (
                    Method::PATCH,
                    "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel/status",
                    Reply::Echo(None),
                ),
            ],
        );
        let action = reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let (_, b) = finish(server).await;
        // The generated signer is a CA kept in its Secret.
        assert_eq!(b[1]["metadata"]["name"], "cluster-tunnel-signer");
        let ca = String::from_utf8(
            BASE64
                .decode(b[1]["data"]["tls.crt"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        // The agent's certificate names the cluster and is owned by it.
        assert_eq!(b[3]["metadata"]["ownerReferences"][0]["uid"], "uid-east");
        let cert = BASE64
            .decode(b[3]["data"]["tls.crt"].as_str().unwrap())
            .unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&cert).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(
            format!(
                "{:?}",
                x509.subject_alternative_name().unwrap().unwrap().value
            )
            .contains("spiffe://cluster-tunnel/agent/east")
        );
        // The work delivers that certificate, with the hub's CA, to the cluster's namespace.
        assert_eq!(b[4]["metadata"]["namespace"], "east");
        assert_eq!(secret_in_work(&b[4]), cert);
        let ca_in_work = BASE64
            .decode(
                b[4]["spec"]["workload"]["manifests"][2]["data"]["ca.crt"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(ca_in_work, ca.as_bytes());
        assert_eq!(b[5]["spec"]["installNamespace"], "cluster-tunnel-agent");
        // No agent yet, the work is new: progressing, not degraded.
        assert_eq!(
            conditions_of(&b[6]),
            [
                ("Available".into(), "False".into()),
                ("Degraded".into(), "False".into()),
                ("Progressing".into(), "True".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_deleted_cluster_loses_its_work_and_certificate_before_the_finalizer_goes() {
        let s = scenario(config(90, 2), None, OffsetDateTime::now_utc());
        let server = serve(
            s.handle,
            vec![
                (Method::DELETE, WORK, deleted()),
                // Already gone: fine.
                (Method::DELETE, AGENT_SECRET, not_found()),
                (
                    Method::PATCH,
                    CLUSTER,
                    Reply::With(200, serde_json::to_value(&*cluster(false, true)).unwrap()),
                ),
            ],
        );
        let action = reconcile_once(cluster(true, true), &s.ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        let (_, b) = finish(server).await;
        assert!(
            b[2].to_string().contains("remove") || b[2].to_string().contains("finalizers"),
            "{}",
            b[2]
        );
    }

    /// The requests of a reconciliation whose certificate is current.
    fn steady(created: &'static str, secret: Value) -> Vec<(Method, &'static str, Reply)> {
        vec![
            (Method::GET, AGENT_SECRET, Reply::With(200, secret)),
            (Method::PATCH, WORK, Reply::Echo(Some(created))),
            (Method::PATCH, ADDON, Reply::Echo(None)),
            (
                Method::PATCH,
                "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel/status",
                Reply::Echo(None),
            ),
        ]
    }

    #[tokio::test]
    async fn addon_status_follows_the_agents_the_server_lists() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        let issued = signer
            .issue(
                &Leaf::Agent {
                    cluster: "east".into(),
                },
                TD,
                now,
                time::Duration::days(90),
            )
            .unwrap();
        let secret = agent_secret(&issued, &signer.ca.cert_pem);
        let s = scenario(config(90, 2), Some(signer), now);
        let old = "2026-01-01T00:00:00Z";

        s.live
            .send_replace(Some(HashMap::from([("east".to_string(), 2)])));
        let server = serve(s.handle, steady(old, secret.clone()));
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (handle, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[3]),
            [
                ("Available".into(), "True".into()),
                ("Degraded".into(), "False".into()),
                ("Progressing".into(), "False".into())
            ]
        );

        s.live
            .send_replace(Some(HashMap::from([("east".to_string(), 1)])));
        let server = serve(handle, steady(old, secret.clone()));
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (handle, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[3])[..2],
            [
                ("Available".into(), "True".into()),
                ("Degraded".into(), "True".into())
            ]
        );

        // The cluster is gone from the server's list: unavailable and, long after delivery, degraded.
        s.live.send_replace(Some(HashMap::new()));
        let server = serve(handle, steady(old, secret.clone()));
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (handle, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[3])[..2],
            [
                ("Available".into(), "False".into()),
                ("Degraded".into(), "True".into())
            ]
        );

        // The server cannot be asked: unknown, not a guess.
        s.live.send_replace(None);
        let server = serve(handle, steady(old, secret));
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(
            conditions_of(&b[3])[0],
            ("Available".into(), "Unknown".into())
        );
    }

    #[tokio::test]
    async fn an_agent_certificate_is_renewed_when_a_fifth_of_its_lifetime_is_left() {
        let t0 = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, t0).unwrap());
        let issued = signer
            .issue(
                &Leaf::Agent {
                    cluster: "east".into(),
                },
                TD,
                t0,
                time::Duration::days(90),
            )
            .unwrap();
        let secret = agent_secret(&issued, &signer.ca.cert_pem);
        let old = "2026-01-01T00:00:00Z";

        // Day 70 of 90: more than a fifth left, the certificate stays.
        let s = scenario(
            config(90, 2),
            Some(signer.clone()),
            t0 + time::Duration::days(70),
        );
        let server = serve(s.handle, steady(old, secret.clone()));
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (_, b) = finish(server).await;
        assert_eq!(secret_in_work(&b[1]), issued.cert_pem.as_bytes());

        // Day 73: less than a fifth (18 days) left: re-issued, delivered, agents rolled.
        let later = t0 + time::Duration::days(73);
        let s = scenario(config(90, 2), Some(signer.clone()), later);
        let mut expected = steady(old, secret);
        expected.insert(1, (Method::PATCH, AGENT_SECRET, Reply::Echo(None)));
        let server = serve(s.handle, expected);
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (_, b) = finish(server).await;
        let renewed = BASE64
            .decode(b[1]["data"]["tls.crt"].as_str().unwrap())
            .unwrap();
        assert_ne!(renewed, issued.cert_pem.as_bytes());
        assert!(!signer.needs_renewal(&renewed, later));
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&renewed).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let not_after = x509.validity().not_after.timestamp();
        assert_eq!(
            not_after,
            (later + time::Duration::days(90)).unix_timestamp()
        );
        assert_eq!(secret_in_work(&b[2]), renewed);
    }

    #[tokio::test]
    async fn a_load_balancer_entrypoint_is_dialled_by_address_and_verified_by_service_name() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        let issued = signer
            .issue(
                &Leaf::Agent {
                    cluster: "east".into(),
                },
                TD,
                now,
                time::Duration::days(90),
            )
            .unwrap();
        let secret = agent_secret(&issued, &signer.ca.cert_pem);
        let mut config = (*config(90, 2)).clone();
        config.spec.server.entrypoint = serde_json::from_value(json!({
            "type": "LoadBalancerService",
            "loadBalancerService": { "name": "cluster-tunnel-server-agents" },
        }))
        .unwrap();
        let service = |ingress: Value| {
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "cluster-tunnel-server-agents", "namespace": NS },
                "spec": { "type": "LoadBalancer", "ports": [{ "name": "agent", "port": 8091 }] },
                "status": { "loadBalancer": { "ingress": ingress } },
            })
        };
        const SERVICE: &str =
            "/api/v1/namespaces/cluster-tunnel/services/cluster-tunnel-server-agents";

        // No address yet: an error (retried), and no work with a wrong address.
        let s = scenario(Arc::new(config.clone()), Some(signer.clone()), now);
        let server = serve(
            s.handle,
            vec![
                (Method::GET, AGENT_SECRET, Reply::With(200, secret.clone())),
                (Method::GET, SERVICE, Reply::With(200, service(json!([])))),
            ],
        );
        let err = reconcile_once(cluster(true, false), &s.ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, ReconcileError::NoEntrypoint(_)), "{err}");
        finish(server).await;

        let s = scenario(Arc::new(config), Some(signer), now);
        let mut expected = steady("2026-01-01T00:00:00Z", secret);
        expected.insert(
            1,
            (
                Method::GET,
                SERVICE,
                Reply::With(200, service(json!([{ "ip": "203.0.113.10" }]))),
            ),
        );
        let server = serve(s.handle, expected);
        reconcile_once(cluster(true, false), &s.ctx).await.unwrap();
        let (_, b) = finish(server).await;
        let args = b[2]["spec"]["workload"]["manifests"][3]["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("--server=203.0.113.10:8091"), "{args}");
        assert!(
            args.contains("--server-name=cluster-tunnel-server-agents.cluster-tunnel.svc"),
            "{args}"
        );
    }

    use rustls_pki_types::pem::PemObject as _;
}
