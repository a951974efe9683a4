//! The controller over `Namespace`s that keeps the injected sidecars'
//! client certificate: the Secret `--sidecar-cert-secret`
//! (`cluster-tunnel-sidecar`, keys `tls.crt`, `tls.key`, `ca.crt`) in every
//! namespace labelled `<--namespace-label>=enabled`
//! (`cluster-tunnel.io/injection=enabled`, the label the injector's webhook
//! selects namespaces by). A pod mounts Secrets of its own namespace only, so
//! the injector mounts this one into every sidecar it adds.
//!
//! For each labelled namespace that is not being deleted the Secret holds a
//! certificate from the signer, issued when missing and renewed like every
//! other leaf (a fifth of its lifetime left, another CA, unreadable); it is
//! checked again every [`RESYNC`], well before that point comes.
//!
//! **Identity.** The certificate names the namespace and nothing more:
//! `spiffe://<trust-domain>/client/sidecar-<namespace>` (see
//! [`sidecar_client_name`]). Every pod of the namespace mounts the same
//! Secret, so it cannot stand for any one of them: it must never read as a
//! service account's identity (`ns/<ns>/sa/<sa>`), or any pod of the
//! namespace could claim any service account of it. The sidecar's real
//! subject is its pod's service account, proven by the projected token the
//! servers check with `TokenReview`; the certificate only lets the sidecar
//! open the TLS connection, and a policy's `namespace:` or `serviceAccount:`
//! subjects never match it.
//!
//! **Secrets the manager did not write are left alone.** A Secret of that
//! name without the manager's label ([`MANAGED_BY`]) — one an
//! administrator made, or cert-manager keeps — is never overwritten (a
//! warning is logged) nor deleted. When a namespace loses the label (or its
//! value is no longer `enabled`) the Secret is deleted only if the manager
//! wrote it, with the `uid` and `resourceVersion` it read as preconditions,
//! so that a Secret replaced in between survives.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher;
use sha2::Digest as _;
use tokio::sync::watch;
use tunnel_api::labels::{INJECTION_ENABLED, MANAGED_BY};
use tunnel_identity::spiffe::{IdentityError, validate_client_name};

use crate::controller::{Clock, ControllerContext, RESYNC};
use crate::signer::{self, Leaf, LeafOutcome, Signer, SignerError};
use tunnel_api::configuration::TunnelConfiguration;

/// Namespaces reconciled at once (at start every namespace is looked at).
const CONCURRENCY: u16 = 8;
/// Longest client name an identity may carry (a DNS-1123 label).
const MAX_CLIENT_NAME: usize = 63;
/// Prefix of the sidecar client names.
const CLIENT_PREFIX: &str = "sidecar-";
/// Hex digits of the namespace's SHA-256 that end a shortened client name.
const HASH_DIGITS: usize = 8;

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// No `TunnelConfiguration` is known (it gives the validity).
    #[error("no TunnelConfiguration named {0}")]
    NoConfiguration(String),
    /// The certificate could not be issued or applied.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// The namespace's name gives no valid client identity.
    #[error("namespace {namespace}: no valid sidecar identity: {source}")]
    BadName {
        /// The namespace.
        namespace: String,
        /// Why the name was refused.
        #[source]
        source: IdentityError,
    },
    /// An API request failed.
    #[error("cannot {action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }
}

/// What reconciliation needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Label key of injection-enabled namespaces (value [`INJECTION_ENABLED`]).
    pub label: String,
    /// Name of the Secret in each namespace.
    pub secret_name: String,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// The signer.
    pub signer: Arc<Signer>,
    /// The configuration (its certificate validity).
    pub config: watch::Receiver<Option<Arc<TunnelConfiguration>>>,
    /// Name of the configuration (for errors).
    pub config_name: String,
    /// Now.
    pub clock: Clock,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
}

impl ControllerContext for Context {
    const NAME: &'static str = "namespaces";
    fn metrics(&self) -> &crate::metrics::ManagerMetrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("label", &self.label)
            .field("secret_name", &self.secret_name)
            .finish_non_exhaustive()
    }
}

/// The client name of `namespace`'s sidecars: `sidecar-<namespace>`. A name
/// longer than a DNS-1123 label (namespaces of more than 55 characters) is
/// cut and ends with 8 hex digits of the namespace's SHA-256, so that it
/// stays valid and distinct.
pub fn sidecar_client_name(namespace: &str) -> String {
    let name = format!("{CLIENT_PREFIX}{namespace}");
    if name.len() <= MAX_CLIENT_NAME {
        return name;
    }
    let hash: String = sha2::Sha256::digest(namespace.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = MAX_CLIENT_NAME - CLIENT_PREFIX.len() - 1 - HASH_DIGITS;
    let kept: String = namespace.chars().take(room).collect();
    format!(
        "{CLIENT_PREFIX}{}-{}",
        kept.trim_end_matches('-'),
        &hash[..HASH_DIGITS]
    )
}

/// The certificate of `namespace`'s sidecars: a client, never a workload.
pub fn sidecar_leaf(namespace: &str) -> Result<Leaf, ReconcileError> {
    let name = sidecar_client_name(namespace);
    validate_client_name(&name).map_err(|source| ReconcileError::BadName {
        namespace: namespace.to_owned(),
        source,
    })?;
    Ok(Leaf::Client { name })
}

/// Whether `ns` asks for sidecars: `<label>=enabled`.
pub fn injection_enabled(ns: &Namespace, label: &str) -> bool {
    ns.labels()
        .get(label)
        .is_some_and(|v| v == INJECTION_ENABLED)
}

/// Reconciles one namespace: a labelled one gets a current Secret, an
/// unlabelled one loses the Secret the manager wrote, one being deleted is
/// left to the namespace controller.
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let name = ns.name_any();
    if ns.metadata.deletion_timestamp.is_some() {
        tracing::debug!(namespace = %name, "namespace being deleted; its Secrets go with it");
        return Ok(Action::await_change());
    }
    if injection_enabled(&ns, &ctx.label) {
        ensure(&name, &ctx).await
    } else {
        remove(&name, &ctx).await
    }
}

/// Issues or renews the Secret of a labelled namespace, unless a Secret of
/// that name that the manager did not write is there.
async fn ensure(namespace: &str, ctx: &Context) -> Result<Action, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret_name = &ctx.secret_name;
    let existing = secrets
        .get_opt(secret_name)
        .await
        .map_err(ReconcileError::api(format!(
            "get Secret {namespace}/{secret_name}"
        )))?;
    if let Some(secret) = &existing
        && !signer::is_managed(secret)
    {
        tracing::warn!(
            %namespace,
            secret = %secret_name,
            "the sidecar certificate Secret was not made by tunnel-manager (no {}={} label); left alone",
            MANAGED_BY.0,
            MANAGED_BY.1,
        );
        return Ok(Action::requeue(RESYNC));
    }
    let leaf = sidecar_leaf(namespace)?;
    let validity = ctx
        .config
        .borrow()
        .as_ref()
        .map(|c| time::Duration::days(i64::from(c.spec.signer.certificate_validity_days)))
        .ok_or_else(|| ReconcileError::NoConfiguration(ctx.config_name.clone()))?;
    let (_, outcome) = signer::ensure_leaf_over(
        &secrets,
        secret_name,
        existing,
        &leaf,
        &ctx.signer,
        &ctx.trust_domain,
        validity,
        None,
        (ctx.clock)(),
    )
    .await?;
    if outcome == LeafOutcome::Current {
        tracing::debug!(%namespace, secret = %secret_name, "sidecar certificate current");
    }
    Ok(Action::requeue(RESYNC))
}

/// Deletes the Secret of a namespace that is no longer labelled, if the
/// manager wrote it (and it has not been replaced since it was read).
async fn remove(namespace: &str, ctx: &Context) -> Result<Action, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret_name = &ctx.secret_name;
    let Some(secret) = secrets
        .get_opt(secret_name)
        .await
        .map_err(ReconcileError::api(format!(
            "get Secret {namespace}/{secret_name}"
        )))?
    else {
        return Ok(Action::await_change());
    };
    if !signer::is_managed(&secret) {
        tracing::debug!(%namespace, secret = %secret_name, "namespace not labelled; its own Secret left alone");
        return Ok(Action::await_change());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.metadata.uid.clone(),
            resource_version: secret.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match secrets.delete(secret_name, &params).await {
        Ok(_) => {
            tracing::info!(%namespace, secret = %secret_name, "namespace no longer labelled for injection; sidecar certificate deleted");
            Ok(Action::await_change())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(ReconcileError::api(format!(
            "delete Secret {namespace}/{secret_name}"
        ))(e)),
    }
}

/// Runs the controller until `shutdown`. It watches every namespace, not
/// only labelled ones: a namespace that loses the label must be seen to
/// remove its Secret.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    tracing::info!(label = %format!("{}={INJECTION_ENABLED}", ctx.label), secret = %ctx.secret_name, "issuing sidecar certificates");
    let controller = Controller::new(api, watcher::Config::default())
        .with_config(controller::Config::default().concurrency(CONCURRENCY));
    crate::controller::run(controller, reconcile, ctx, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server (`tower_test`), each under a timeout; time is the test's. A
    //! request the scenario does not expect is never answered, so the
    //! reconciliation times out and the test fails.

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use http::Method;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, UnixTime};
    use serde_json::{Value, json};
    use time::OffsetDateTime;

    use std::time::Duration;

    use super::*;
    use crate::controller::{RETRY_DELAY, error_policy};
    use crate::mock_api::{self, ApiHandle, Reply, TIMEOUT, deleted, finish, not_found, serve};

    const TD: &str = "cluster-tunnel";
    const SECRET: &str = "/api/v1/namespaces/fleet/secrets/cluster-tunnel-sidecar";

    fn namespace(labels: Value, deleting: bool) -> Arc<Namespace> {
        let mut ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": "fleet", "uid": "uid-fleet", "labels": labels },
        }))
        .unwrap();
        if deleting {
            ns.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-01-01T00:00:00Z".parse().unwrap(),
                ));
        }
        Arc::new(ns)
    }

    fn labelled() -> Arc<Namespace> {
        namespace(json!({ "cluster-tunnel.io/injection": "enabled" }), false)
    }

    fn scenario(signer: Arc<Signer>, now: OffsetDateTime) -> (Arc<Context>, ApiHandle) {
        let (client, handle) = mock_api::client();
        let (_config_tx, config_rx) = watch::channel(Some(mock_api::configuration(90)));
        let ctx = Arc::new(Context {
            client,
            label: tunnel_api::labels::NAMESPACE_INJECTION.into(),
            secret_name: tunnel_api::pod::SIDECAR_SECRET.into(),
            trust_domain: TD.into(),
            signer,
            config: config_rx,
            config_name: tunnel_api::configuration::DEFAULT_NAME.into(),
            clock: Arc::new(move || now),
            metrics: crate::metrics::ManagerMetrics::default(),
        });
        (ctx, handle)
    }

    async fn reconcile_once(
        ns: Arc<Namespace>,
        ctx: &Arc<Context>,
    ) -> Result<Action, ReconcileError> {
        tokio::time::timeout(TIMEOUT, reconcile(ns, ctx.clone()))
            .await
            .expect("reconcile in time")
    }

    /// The Secret the manager would have written for `fleet`, as the API
    /// server returns it.
    fn managed_secret(issued: &signer::Issued, ca: &str) -> Value {
        let mut v = serde_json::to_value(signer::tls_secret(
            tunnel_api::pod::SIDECAR_SECRET,
            "fleet",
            issued,
            ca,
            None,
        ))
        .unwrap();
        v["metadata"]["uid"] = json!("uid-secret");
        v["metadata"]["resourceVersion"] = json!("41");
        v
    }

    /// A Secret of the same name that an administrator made (cert-manager's).
    fn unmanaged_secret(issued: &signer::Issued, ca: &str) -> Value {
        let mut v = managed_secret(issued, ca);
        v["metadata"]["labels"] = json!({ "controller.cert-manager.io/fao": "true" });
        v["metadata"]["annotations"] = json!({ "cert-manager.io/certificate-name": "sidecar" });
        v
    }

    fn decoded(secret: &Value, key: &str) -> Vec<u8> {
        BASE64
            .decode(secret["data"][key].as_str().unwrap())
            .unwrap()
    }

    fn uri_sans(cert_pem: &[u8]) -> Vec<String> {
        let der = CertificateDer::from_pem_slice(cert_pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    fn not_after(cert_pem: &[u8]) -> i64 {
        let der = CertificateDer::from_pem_slice(cert_pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        x509.validity().not_after.timestamp()
    }

    /// Verifies `cert_pem` as the servers verify a client certificate:
    /// chained to `ca_pem` and valid at `at`.
    fn verify_as_server(cert_pem: &[u8], ca_pem: &[u8], at: OffsetDateTime) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            tunnel_proto::tls::provider(),
        )
        .build()
        .unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem).unwrap();
        let at = UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(at.unix_timestamp()).unwrap(),
        ));
        verifier
            .verify_client_cert(&cert, &[], at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The private key in `key_pem` is the one `cert_pem` certifies.
    fn key_matches(cert_pem: &[u8], key_pem: &[u8]) -> bool {
        let der = CertificateDer::from_pem_slice(cert_pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = rcgen::KeyPair::from_pem(std::str::from_utf8(key_pem).unwrap()).unwrap();
        x509.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
    }

    #[tokio::test]
    async fn a_labelled_namespace_without_a_secret_is_read_then_gets_one_applied() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        let (ctx, handle) = scenario(signer.clone(), now);
        let server = serve(
            handle,
            vec![
                (Method::GET, SECRET, not_found()),
                (Method::PATCH, SECRET, Reply::Echo(None)),
            ],
        );
        let action = reconcile_once(labelled(), &ctx).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let (_, b) = finish(server).await;
        let secret = &b[1];
        assert_eq!(secret["metadata"]["namespace"], "fleet");
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(
            secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "tunnel-manager"
        );
        let (cert, key, ca) = (
            decoded(secret, "tls.crt"),
            decoded(secret, "tls.key"),
            decoded(secret, "ca.crt"),
        );
        // A client identity that names the namespace, not a service account.
        assert_eq!(
            uri_sans(&cert),
            ["spiffe://cluster-tunnel/client/sidecar-fleet"]
        );
        // It chains to the signer, which ca.crt is, and its key comes with it.
        assert_eq!(ca, signer.ca.cert_pem.as_bytes());
        verify_as_server(&cert, &ca, now).unwrap();
        assert!(key_matches(&cert, &key));
        assert_eq!(
            not_after(&cert),
            (now + time::Duration::days(90)).unix_timestamp()
        );
    }

    #[tokio::test]
    async fn a_current_secret_is_only_read_and_one_with_a_fifth_of_its_lifetime_left_is_read_then_renewed()
     {
        let t0 = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, t0).unwrap());
        let issued = signer
            .issue(
                &sidecar_leaf("fleet").unwrap(),
                TD,
                t0,
                time::Duration::days(90),
            )
            .unwrap();
        let secret = managed_secret(&issued, &signer.ca.cert_pem);

        // Day 70 of 90: more than a fifth left, nothing is written.
        let (ctx, handle) = scenario(signer.clone(), t0 + time::Duration::days(70));
        let server = serve(
            handle,
            vec![(Method::GET, SECRET, Reply::With(200, secret.clone()))],
        );
        let action = reconcile_once(labelled(), &ctx).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        finish(server).await;

        // Day 73: less than a fifth (18 days) left: re-issued in place.
        let later = t0 + time::Duration::days(73);
        let (ctx, handle) = scenario(signer.clone(), later);
        let server = serve(
            handle,
            vec![
                (Method::GET, SECRET, Reply::With(200, secret)),
                (Method::PATCH, SECRET, Reply::Echo(None)),
            ],
        );
        let action = reconcile_once(labelled(), &ctx).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let (_, b) = finish(server).await;
        let renewed = decoded(&b[1], "tls.crt");
        assert_ne!(renewed, issued.cert_pem.as_bytes());
        assert_eq!(
            uri_sans(&renewed),
            ["spiffe://cluster-tunnel/client/sidecar-fleet"]
        );
        verify_as_server(&renewed, signer.ca.cert_pem.as_bytes(), later).unwrap();
        assert!(key_matches(&renewed, &decoded(&b[1], "tls.key")));
        assert_eq!(
            not_after(&renewed),
            (later + time::Duration::days(90)).unix_timestamp()
        );
    }

    #[tokio::test]
    async fn an_unmanaged_secret_in_a_labelled_namespace_is_only_read() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        // Another CA's certificate: the signer would replace its own at once.
        let other = Signer::generate(TD, now).unwrap();
        let theirs = other
            .issue(
                &Leaf::Client {
                    name: "payments".into(),
                },
                TD,
                now,
                time::Duration::days(30),
            )
            .unwrap();
        let (ctx, handle) = scenario(signer, now);
        let server = serve(
            handle,
            vec![(
                Method::GET,
                SECRET,
                Reply::With(200, unmanaged_secret(&theirs, &other.ca.cert_pem)),
            )],
        );
        let action = reconcile_once(labelled(), &ctx).await.unwrap();
        // Looked at again later (the administrator may remove it), never written.
        assert_eq!(action, Action::requeue(RESYNC));
        finish(server).await;
    }

    #[tokio::test]
    async fn a_namespace_whose_label_was_removed_is_read_then_loses_the_managed_secret() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        let issued = signer
            .issue(
                &sidecar_leaf("fleet").unwrap(),
                TD,
                now,
                time::Duration::days(90),
            )
            .unwrap();
        let (ctx, handle) = scenario(signer, now);
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    SECRET,
                    Reply::With(200, managed_secret(&issued, "ca")),
                ),
                (Method::DELETE, SECRET, deleted()),
            ],
        );
        let unlabelled = namespace(json!({ "team": "fleet" }), false);
        let action = reconcile_once(unlabelled, &ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        let (_, b) = finish(server).await;
        // Only the Secret that was read goes, not one put there since.
        assert_eq!(b[1]["preconditions"]["uid"], "uid-secret");
        assert_eq!(b[1]["preconditions"]["resourceVersion"], "41");
    }

    #[tokio::test]
    async fn an_unlabelled_namespace_with_an_unmanaged_secret_or_none_is_only_read() {
        let now = OffsetDateTime::now_utc();
        let signer = Arc::new(Signer::generate(TD, now).unwrap());
        let theirs = signer
            .issue(
                &Leaf::Client {
                    name: "payments".into(),
                },
                TD,
                now,
                time::Duration::days(30),
            )
            .unwrap();
        // A label value other than "enabled" does not ask for sidecars.
        let disabled = namespace(json!({ "cluster-tunnel.io/injection": "disabled" }), false);

        let (ctx, handle) = scenario(signer.clone(), now);
        let server = serve(
            handle,
            vec![(
                Method::GET,
                SECRET,
                Reply::With(200, unmanaged_secret(&theirs, &signer.ca.cert_pem)),
            )],
        );
        let action = reconcile_once(disabled.clone(), &ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        finish(server).await;

        let (ctx, handle) = scenario(signer, now);
        let server = serve(handle, vec![(Method::GET, SECRET, not_found())]);
        let action = reconcile_once(disabled, &ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        finish(server).await;
    }

    #[tokio::test]
    async fn a_namespace_being_deleted_makes_no_request() {
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(Arc::new(Signer::generate(TD, now).unwrap()), now);
        let server = serve(handle, vec![]);
        let deleting = namespace(json!({ "cluster-tunnel.io/injection": "enabled" }), true);
        let action = reconcile_once(deleting, &ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        finish(server).await;
    }

    #[tokio::test]
    async fn a_failed_apply_is_an_error_naming_the_secret() {
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(Arc::new(Signer::generate(TD, now).unwrap()), now);
        let forbidden = Reply::With(
            403,
            json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "secrets \"cluster-tunnel-sidecar\" is forbidden" }),
        );
        let server = serve(
            handle,
            vec![
                (Method::GET, SECRET, not_found()),
                (Method::PATCH, SECRET, forbidden),
            ],
        );
        let err = reconcile_once(labelled(), &ctx).await.unwrap_err();
        assert!(err.to_string().contains("cluster-tunnel-sidecar"), "{err}");
        assert_eq!(
            error_policy(labelled(), &err, ctx.clone()),
            Action::requeue(RETRY_DELAY)
        );
        finish(server).await;
    }

    #[test]
    fn every_namespace_name_gives_a_valid_distinct_client_identity() {
        assert_eq!(sidecar_client_name("fleet"), "sidecar-fleet");
        // 63 characters, the longest namespace: cut, with a hash to stay distinct.
        let a = format!("{}a", "x".repeat(62));
        let b = format!("{}b", "x".repeat(62));
        let (na, nb) = (sidecar_client_name(&a), sidecar_client_name(&b));
        assert_ne!(na, nb);
        for name in [&na, &nb] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.starts_with("sidecar-xxxx"), "{name}");
            validate_client_name(name).unwrap();
        }
        // A cut that ends in '-' loses it before the hash.
        let dashed = format!("{}-{}", "y".repeat(45), "z".repeat(17));
        let leaf = sidecar_leaf(&dashed).unwrap();
        assert!(
            leaf.uri(TD).starts_with(&format!(
                "spiffe://cluster-tunnel/client/sidecar-{}-",
                "y".repeat(45)
            )),
            "{}",
            leaf.uri(TD)
        );
    }
}
