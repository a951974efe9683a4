//! Keeps the `caBundle` of the injector's `MutatingWebhookConfiguration` in
//! step with the certificate it serves: a kube-runtime controller on that one
//! object (selected by name), reconciling when it changes, when the CA
//! changes, and every `resync` in any case.
//!
//! Every webhook of the configuration is kept (it is the injector's own). A
//! change is one JSON Patch per reconciliation: for each webhook whose bundle
//! differs, a `test` of its name at its index (so a concurrent reordering
//! fails the patch instead of writing the wrong entry) and an `add` of
//! `clientConfig.caBundle`.
//!
//! With a generated CA ([`BundlePolicy::Include`]) the bundle must *contain*
//! ours rather than equal it: during a rolling update the old pod still serves
//! with its CA, and with several replicas each has its own. Unexpired CAs found
//! in the bundle are kept, newest first, up to `keep` in all; a bundle that
//! already contains ours is left as it is (otherwise replicas would take turns
//! reordering it). A CA provided as a file ([`BundlePolicy::Exact`]) replaces
//! the bundle.
//!
//! RBAC: `get`, `list`, `watch` and `patch` on
//! `admissionregistration.k8s.io/mutatingwebhookconfigurations`, which the
//! chart can restrict to the one name (`resourceNames`) for `get` and `patch`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt as _;
use json_patch::{Patch, PatchOperation, TestOperation};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::sync::watch;

use crate::inject::add;
use crate::metrics::{InjectorMetrics, ResultLabel};

/// Default number of CAs a bundle keeps with a generated CA.
pub const DEFAULT_KEEP: usize = 3;
/// Delay before a failed reconciliation is retried.
pub const RETRY_DELAY: Duration = Duration::from_secs(10);

/// What the `caBundle` of every webhook must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundlePolicy {
    /// Exactly this PEM (a CA file given to the injector).
    Exact(Vec<u8>),
    /// This generated CA (PEM), plus other unexpired CAs already present, up
    /// to `keep` certificates in all.
    Include {
        /// Our CA, PEM.
        ours: Vec<u8>,
        /// Most certificates in the bundle (at least 1).
        keep: usize,
    },
}

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The API server refused or failed the patch.
    #[error("cannot patch MutatingWebhookConfiguration {name}: {source}")]
    Patch {
        /// The configuration.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The configured CA cannot be read as PEM.
    #[error("the CA to publish is not PEM: {0}")]
    BadCa(String),
}

/// The new bundle for a webhook whose bundle is `current`, or `None` when it
/// is right as it is. `now` is Unix seconds.
pub fn desired_bundle(
    current: &[u8],
    policy: &BundlePolicy,
    now: i64,
) -> Result<Option<Vec<u8>>, SyncError> {
    match policy {
        BundlePolicy::Exact(pem) => Ok((current != pem.as_slice()).then(|| pem.clone())),
        BundlePolicy::Include { ours, keep } => {
            let ours_der = CertificateDer::from_pem_slice(ours)
                .map_err(|e| SyncError::BadCa(e.to_string()))?;
            let mut tidy = true;
            let mut has_ours = false;
            let mut others: Vec<(i64, CertificateDer<'static>)> = Vec::new();
            for item in CertificateDer::pem_slice_iter(current) {
                let Ok(der) = item else {
                    tidy = false;
                    continue;
                };
                if der == ours_der {
                    has_ours = true;
                    continue;
                }
                match validity(&der) {
                    Some((not_before, not_after)) if not_after > now => {
                        if !others.iter().any(|(_, d)| *d == der) {
                            others.push((not_before, der));
                        }
                    }
                    _ => tidy = false,
                }
            }
            let keep = (*keep).max(1);
            if has_ours && tidy && others.len() < keep {
                return Ok(None);
            }
            others.sort_by_key(|(not_before, _)| std::cmp::Reverse(*not_before));
            let mut bundle = pem(&ours_der);
            for (_, der) in others.iter().take(keep - 1) {
                bundle.push_str(&pem(der));
            }
            Ok(Some(bundle.into_bytes()))
        }
    }
}

/// `notBefore` and `notAfter` of a certificate, in Unix seconds.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// PEM encoding of one certificate.
fn pem(der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The patch that brings every webhook's bundle in line, or `None`.
pub fn bundle_patch(
    config: &MutatingWebhookConfiguration,
    policy: &BundlePolicy,
    now: i64,
) -> Result<Option<Patch>, SyncError> {
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        let current = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            .unwrap_or_default();
        if let Some(bundle) = desired_bundle(current, policy, now)? {
            let index = i.to_string();
            ops.push(PatchOperation::Test(TestOperation {
                path: json_patch::jsonptr::PointerBuf::from_tokens(["webhooks", &index, "name"]),
                value: Value::String(webhook.name.clone()),
            }));
            ops.push(add(
                &["webhooks", &index, "clientConfig", "caBundle"],
                Value::String(BASE64.encode(bundle)),
            ));
        }
    }
    Ok((!ops.is_empty()).then_some(Patch(ops)))
}

/// What reconciliation needs.
pub struct SyncContext {
    /// The configurations (cluster-scoped).
    pub api: Api<MutatingWebhookConfiguration>,
    /// The current policy (changes when a CA file changes).
    pub policy: watch::Receiver<BundlePolicy>,
    /// Metrics.
    pub metrics: InjectorMetrics,
    /// Interval of the periodic re-check.
    pub resync: Duration,
    /// Set once a reconciliation succeeded (readiness).
    pub synced: Arc<AtomicBool>,
}

impl std::fmt::Debug for SyncContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncContext")
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

impl SyncContext {
    fn count(&self, result: &'static str) {
        self.metrics
            .ca_bundle_syncs
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// Brings one configuration's bundles in line.
pub async fn reconcile(
    config: Arc<MutatingWebhookConfiguration>,
    ctx: Arc<SyncContext>,
) -> Result<Action, SyncError> {
    let name = config.metadata.name.clone().unwrap_or_default();
    let policy = ctx.policy.borrow().clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    match bundle_patch(&config, &policy, now)? {
        None => {
            ctx.count("unchanged");
            tracing::debug!(%name, "caBundle up to date");
        }
        Some(patch) => {
            let webhooks = patch.0.len() / 2;
            ctx.api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &kube::api::Patch::Json::<()>(patch),
                )
                .await
                .map_err(|source| SyncError::Patch {
                    name: name.clone(),
                    source,
                })?;
            ctx.count("updated");
            tracing::info!(%name, webhooks, "caBundle updated");
        }
    }
    ctx.synced.store(true, Ordering::Release);
    Ok(Action::requeue(ctx.resync))
}

/// Counts and logs a failure, and retries after [`RETRY_DELAY`].
pub fn error_policy(
    config: Arc<MutatingWebhookConfiguration>,
    error: &SyncError,
    ctx: Arc<SyncContext>,
) -> Action {
    ctx.count("error");
    tracing::warn!(name = ?config.metadata.name, %error, "caBundle sync failed; retrying");
    Action::requeue(RETRY_DELAY)
}

/// Runs the controller for the configuration `name` until `shutdown`
/// completes. Reconciles everything again whenever the policy changes.
pub async fn run(
    client: kube::Client,
    name: String,
    ctx_parts: (
        watch::Receiver<BundlePolicy>,
        InjectorMetrics,
        Arc<AtomicBool>,
    ),
    resync: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (policy, metrics, synced) = ctx_parts;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let trigger = futures_util::stream::unfold(policy.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let ctx = Arc::new(SyncContext {
        api: api.clone(),
        policy,
        metrics,
        resync,
        synced,
    });
    tracing::info!(%name, "keeping the webhook configuration's caBundle in sync");
    Controller::new(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .reconcile_all_on(trigger)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "caBundle controller");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, header::CONTENT_TYPE};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    use super::*;
    use crate::certs::generate;

    const NAME: &str = "cluster-tunnel-injector";
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn ca() -> Vec<u8> {
        generate(&["svc".into()]).unwrap().ca_pem.into_bytes()
    }

    fn config(bundles: &[Option<&[u8]>]) -> MutatingWebhookConfiguration {
        let webhooks: Vec<Value> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut client = json!({ "service": { "name": "tunnel-injector", "namespace": "cluster-tunnel", "path": "/mutate" } });
                if let Some(b) = b {
                    client["caBundle"] = json!(BASE64.encode(b));
                }
                json!({
                    "name": format!("w{i}.cluster-tunnel.io"),
                    "clientConfig": client,
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                })
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": NAME, "resourceVersion": "1" },
            "webhooks": webhooks,
        }))
        .unwrap()
    }

    /// A mocked API server, the context around it, and the metrics.
    struct Scenario {
        ctx: Arc<SyncContext>,
        handle: mock::Handle<Request<Body>, Response<Body>>,
    }

    fn scenario(policy: BundlePolicy) -> Scenario {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (_tx, rx) = watch::channel(policy);
        Scenario {
            ctx: Arc::new(SyncContext {
                api: Api::all(client),
                policy: rx,
                metrics: InjectorMetrics::default(),
                resync: Duration::from_secs(300),
                synced: Arc::new(AtomicBool::new(false)),
            }),
            handle,
        }
    }

    impl Scenario {
        fn count(&self, result: &'static str) -> u64 {
            self.ctx
                .metrics
                .ca_bundle_syncs
                .get_or_create(&ResultLabel { result })
                .get()
        }

        /// Expects one JSON Patch of the configuration and answers it with
        /// `status`; returns the operations sent.
        fn expect_patch(
            mut self,
            status: u16,
        ) -> (Arc<SyncContext>, tokio::task::JoinHandle<Value>) {
            let server = tokio::spawn(async move {
                let (request, send) = self.handle.next_request().await.expect("a request");
                assert_eq!(request.method(), Method::PATCH);
                assert_eq!(
                    request.uri().path(),
                    format!(
                        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{NAME}"
                    )
                );
                assert_eq!(
                    request.headers()[CONTENT_TYPE],
                    "application/json-patch+json"
                );
                let body = request.into_body().collect_bytes().await.unwrap();
                let ops: Value = serde_json::from_slice(&body).unwrap();
                let reply = if status == 200 {
                    serde_json::to_vec(&config(&[])).unwrap()
                } else {
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "the server rejected our request", "reason": "Invalid", "code": status,
                    }))
                    .unwrap()
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header(CONTENT_TYPE, "application/json")
                        .body(Body::from(reply))
                        .unwrap(),
                );
                ops
            });
            (self.ctx, server)
        }
    }

    fn bundle_in(ops: &Value, index: usize) -> Vec<u8> {
        BASE64
            .decode(ops[index]["value"].as_str().unwrap())
            .unwrap()
    }

    #[tokio::test]
    async fn stale_and_missing_bundles_are_patched_in_one_request() {
        let ours = ca();
        let expired_or_foreign =
            b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n";
        let obj = config(&[Some(expired_or_foreign), None, Some(&ours)]);
        let s = scenario(BundlePolicy::Include {
            ours: ours.clone(),
            keep: DEFAULT_KEEP,
        });
        let (ctx, server) = s.expect_patch(200);
        let action = tokio::time::timeout(TIMEOUT, reconcile(Arc::new(obj), ctx.clone()))
            .await
            .expect("reconcile in time")
            .expect("reconcile succeeds");
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
        let ops = tokio::time::timeout(TIMEOUT, server)
            .await
            .unwrap()
            .unwrap();
        let ops_list = ops.as_array().unwrap();
        assert_eq!(ops_list.len(), 4, "{ops}");
        assert_eq!(
            ops[0],
            json!({ "op": "test", "path": "/webhooks/0/name", "value": "w0.cluster-tunnel.io" })
        );
        assert_eq!(ops[1]["op"], "add");
        assert_eq!(ops[1]["path"], "/webhooks/0/clientConfig/caBundle");
        assert_eq!(bundle_in(&ops, 1), ours);
        assert_eq!(ops[2]["path"], "/webhooks/1/name");
        assert_eq!(ops[3]["path"], "/webhooks/1/clientConfig/caBundle");
        assert_eq!(bundle_in(&ops, 3), ours);
        assert!(ctx.synced.load(Ordering::Acquire));
        assert_eq!(
            ctx.metrics
                .ca_bundle_syncs
                .get_or_create(&ResultLabel { result: "updated" })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_bundle_in_sync_sends_no_request() {
        let ours = ca();
        let other = ca();
        let mut both = other.clone();
        both.extend_from_slice(&ours);
        let obj = config(&[Some(&ours), Some(&both)]);
        let s = scenario(BundlePolicy::Include {
            ours,
            keep: DEFAULT_KEEP,
        });
        // No request is answered: one would hang until the timeout.
        let action = tokio::time::timeout(TIMEOUT, reconcile(Arc::new(obj), s.ctx.clone()))
            .await
            .expect("no request was made")
            .expect("reconcile succeeds");
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
        assert_eq!(s.count("unchanged"), 1);
        assert_eq!(s.count("updated"), 0);
        assert!(s.ctx.synced.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_provided_ca_replaces_the_bundle() {
        let provided = ca();
        let obj = config(&[Some(&ca())]);
        let s = scenario(BundlePolicy::Exact(provided.clone()));
        let (ctx, server) = s.expect_patch(200);
        tokio::time::timeout(TIMEOUT, reconcile(Arc::new(obj), ctx))
            .await
            .unwrap()
            .unwrap();
        let ops = tokio::time::timeout(TIMEOUT, server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bundle_in(&ops, 1), provided);
    }

    #[tokio::test]
    async fn a_refused_patch_is_an_error_and_is_retried() {
        let obj = Arc::new(config(&[None]));
        let s = scenario(BundlePolicy::Exact(ca()));
        let (ctx, server) = s.expect_patch(422);
        let err = tokio::time::timeout(TIMEOUT, reconcile(obj.clone(), ctx.clone()))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains(NAME), "{err}");
        assert!(err.to_string().contains("rejected our request"), "{err}");
        tokio::time::timeout(TIMEOUT, server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            error_policy(obj, &err, ctx.clone()),
            Action::requeue(RETRY_DELAY)
        );
        assert_eq!(
            ctx.metrics
                .ca_bundle_syncs
                .get_or_create(&ResultLabel { result: "error" })
                .get(),
            1
        );
        assert!(!ctx.synced.load(Ordering::Acquire));
    }

    /// Answers a controller's requests (its list, its watches, never
    /// answered: nothing changes) until it sends a patch; returns the patch.
    async fn serve_until_patch(
        handle: &mut mock::Handle<Request<Body>, Response<Body>>,
        open_watches: &mut Vec<mock::SendResponse<Response<Body>>>,
        listed: &MutatingWebhookConfiguration,
    ) -> Value {
        loop {
            let (request, send) = handle.next_request().await.expect("a request");
            let uri = request.uri().to_string();
            let selector = format!("fieldSelector=metadata.name%3D{NAME}");
            match *request.method() {
                Method::GET if uri.contains("watch=true") => {
                    assert!(uri.contains(&selector), "{uri}");
                    open_watches.push(send);
                }
                Method::GET => {
                    assert!(uri.contains(&selector), "{uri}");
                    let list = json!({
                        "apiVersion": "admissionregistration.k8s.io/v1",
                        "kind": "MutatingWebhookConfigurationList",
                        "metadata": { "resourceVersion": "10" },
                        "items": [listed],
                    });
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&list).unwrap()))
                            .unwrap(),
                    );
                }
                Method::PATCH => {
                    assert!(request.uri().path().ends_with(NAME), "{uri}");
                    let body = request.into_body().collect_bytes().await.unwrap();
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(listed).unwrap()))
                            .unwrap(),
                    );
                    return serde_json::from_slice(&body).unwrap();
                }
                ref other => panic!("unexpected {other} {uri}"),
            }
        }
    }

    /// The whole controller: it lists the one configuration by name, watches
    /// it, patches the stale bundle it found, and patches again when the CA
    /// it publishes changes.
    #[tokio::test]
    async fn the_controller_patches_what_it_lists_and_again_when_the_ca_changes() {
        let first = ca();
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (policy_tx, policy_rx) = watch::channel(BundlePolicy::Exact(first.clone()));
        let metrics = InjectorMetrics::default();
        let synced = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let controller = tokio::spawn(run(
            client,
            NAME.into(),
            (policy_rx, metrics.clone(), synced.clone()),
            Duration::from_secs(300),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let listed = config(&[None]);
        let mut open_watches = Vec::new();
        let ops = tokio::time::timeout(
            TIMEOUT,
            serve_until_patch(&mut handle, &mut open_watches, &listed),
        )
        .await
        .expect("the controller patched in time");
        assert_eq!(ops[1]["path"], "/webhooks/0/clientConfig/caBundle");
        assert_eq!(bundle_in(&ops, 1), first);
        // The patch's answer reaches the reconciler just after it was sent.
        tokio::time::timeout(TIMEOUT, async {
            while !synced.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("synced after the first patch");

        let second = ca();
        policy_tx.send_replace(BundlePolicy::Exact(second.clone()));
        let ops = tokio::time::timeout(
            TIMEOUT,
            serve_until_patch(&mut handle, &mut open_watches, &listed),
        )
        .await
        .expect("the controller patched again in time");
        assert_eq!(bundle_in(&ops, 1), second);

        let updated = || {
            metrics
                .ca_bundle_syncs
                .get_or_create(&ResultLabel { result: "updated" })
                .get()
        };
        tokio::time::timeout(TIMEOUT, async {
            while updated() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("two updates counted");
        let _ = stop_tx.send(());
        tokio::time::timeout(TIMEOUT, controller)
            .await
            .expect("the controller stops")
            .unwrap();
        assert_eq!(updated(), 2);
    }

    #[test]
    fn included_bundles_keep_the_newest_valid_cas() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let ours = ca();
        let policy = BundlePolicy::Include {
            ours: ours.clone(),
            keep: 2,
        };
        // Empty: just ours.
        assert_eq!(
            desired_bundle(b"", &policy, now).unwrap(),
            Some(ours.clone())
        );
        // Another replica's CA is kept after ours.
        let other = ca();
        let out = desired_bundle(&other, &policy, now).unwrap().unwrap();
        let mut expected = ours.clone();
        expected.extend_from_slice(&other);
        assert_eq!(out, expected);
        // Already contains ours, in any order: unchanged.
        let mut reversed = other.clone();
        reversed.extend_from_slice(&ours);
        assert_eq!(desired_bundle(&reversed, &policy, now).unwrap(), None);
        // Too many: trimmed to `keep`, newest first.
        let third = ca();
        let mut crowded = other.clone();
        crowded.extend_from_slice(&ours);
        crowded.extend_from_slice(&third);
        let out = desired_bundle(&crowded, &policy, now).unwrap().unwrap();
        let count = CertificateDer::pem_slice_iter(&out).count();
        assert_eq!(count, 2);
        assert!(out.starts_with(&ours));
        // Certificates expired by `now` are dropped.
        let later = now + 20 * 365 * 24 * 3600;
        assert_eq!(
            desired_bundle(&reversed, &policy, later).unwrap(),
            Some(ours)
        );
    }
}
