//! The signer of agent certificates: a controller over the hub's
//! `CertificateSigningRequest`s for [`SIGNER_NAME`] (watched by
//! `spec.signerName`, so requests for any other signer are never even seen).
//!
//! A request is **approved and signed** only when all of this holds:
//!
//! - it is labelled for this addon ([`ADDON_LABEL`](tunnel_api::ocm::ADDON_LABEL)) and a cluster
//!   ([`CLUSTER_LABEL`](tunnel_api::ocm::CLUSTER_LABEL)), a valid cluster name;
//! - the API server says it was sent by that cluster's own registration
//!   agent: user `system:open-cluster-management:<cluster>:<agent>` in group
//!   `system:open-cluster-management:<cluster>` (labels are only hints; the
//!   requester is what the API server authenticated). A registration agent
//!   that reaches the hub over **gRPC** (OCM's gRPC registration driver) does
//!   not create its request itself: OCM's gRPC server does, as
//!   [`GRPC_SERVER_USER`], and names the agent user it authenticated in the
//!   annotation [`CSR_USER_ANNOTATION`]. That annotation is read only on a
//!   request the API server says came from that service account, as
//!   addon-framework's approver does, and must name the cluster's own agent
//!   (the prefix up to its colon, so that `east2` is not `east`). The
//!   requester's groups are the gRPC server's there; OCM's gRPC hub driver
//!   takes the agent's from the request's Organization, which an agent request
//!   must leave empty (below), so none can be claimed;
//! - its signature verifies (the sender holds the key) and its subject is
//!   exactly the agent user the addon registered ([`agent_user`](tunnel_api::ocm::agent_user)), no
//!   organization or unit;
//! - the `ManagedCluster` exists, is accepted and is not being deleted, and
//!   the addon is enabled there (its `ManagedClusterAddOn` exists and is not
//!   being deleted).
//!
//! **Joining without open-cluster-management** (`--join`): a request
//! labelled [`JOIN_CLUSTER_LABEL`]`=<cluster>` is approved and signed when
//! the API server authenticated it as the service account
//! `cluster-tunnel-join-<cluster>` of the manager's namespace (which only the
//! hub's administrators can make, and whose short-lived tokens
//! `tunnel-manager join-token` prints) and it asks for the subject
//! `cluster-tunnel:agent:<cluster>` only. `tunnel-agent join` makes the key in
//! the managed cluster and sends such a request.
//!
//! A request that names another cluster than its sender's, or asks for
//! another subject, or is malformed, is **denied** (with the reason). One for
//! a cluster that is not (or no longer) served is left pending and looked at
//! again: certificates stop being issued when a cluster goes.
//!
//! The certificate keeps the requested subject (OCM's registration agent
//! checks it) and names the agent `spiffe://<trust-domain>/agent/<cluster>`,
//! the identity the servers read; it lives `addonCertificateValidityDays`
//! (7 days by default) when registered through OCM and
//! `certificateValidityDays` when joined (or less, if the request's
//! `expirationSeconds` asks so), never beyond the CA.
//! OCM's registration agent asks for a new one when a fifth of its lifetime
//! is left.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::watch;

use crate::controller::{Clock, ControllerContext};
use crate::signer::{Leaf, Signer, SignerError};
use tunnel_api::configuration::TunnelConfiguration;
use tunnel_api::ocm::{ADDON_NAME, ManagedCluster, ManagedClusterAddOn, SIGNER_NAME};

mod check;

use check::has_condition;
pub use check::{
    CSR_USER_ANNOTATION, GRPC_SERVER_USER, JOIN_CLUSTER_LABEL, Origin, Verdict, check,
    join_service_account, join_subject,
};

/// How often a request for a cluster that is not served yet is looked at again.
pub const PENDING_RECHECK: Duration = Duration::from_secs(30);
/// The shortest certificate lifetime a request may ask for (Kubernetes' minimum).
const MIN_EXPIRATION_SECONDS: i64 = 600;

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// No `TunnelConfiguration` is known (it gives the validity).
    #[error("no TunnelConfiguration named {0}")]
    NoConfiguration(String),
    /// The certificate could not be made.
    #[error(transparent)]
    Signer(#[from] SignerError),
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

impl CsrError {
    fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }
}

/// What reconciliation needs.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// The signer.
    pub signer: Arc<Signer>,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// The configuration (the certificates' validity).
    pub config: watch::Receiver<Option<Arc<TunnelConfiguration>>>,
    /// Name of the configuration (for errors).
    pub config_name: String,
    /// Now.
    pub clock: Clock,
    /// Reconciliations are counted here.
    pub metrics: crate::metrics::ManagerMetrics,
    /// With `--join`: the manager's namespace, whose join service accounts
    /// may request agent certificates.
    pub join_namespace: Option<String>,
    /// With `--open-cluster-management`: requests of OCM's registration agents.
    pub addons: bool,
}

impl ControllerContext for Context {
    const NAME: &'static str = "csr";
    fn metrics(&self) -> &crate::metrics::ManagerMetrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}
fn condition(type_: &str, reason: &str, message: &str, now: &str) -> serde_json::Value {
    json!({ "type": type_, "status": "True", "reason": reason, "message": message, "lastUpdateTime": now })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Approves, signs, denies or leaves one request.
pub async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Context>,
) -> Result<Action, CsrError> {
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let now = (ctx.clock)();
    let (cluster, request, origin) = match check(&csr, ctx.addons, ctx.join_namespace.as_deref()) {
        Verdict::Skip => return Ok(Action::await_change()),
        Verdict::Deny(reason) if has_condition(&csr, "Approved") => {
            // Someone else approved it; an approval cannot be withdrawn, but
            // nothing is signed.
            tracing::warn!(csr = %name, %reason, "approved certificate request not signed");
            return Ok(Action::await_change());
        }
        Verdict::Deny(reason) => {
            tracing::warn!(csr = %name, %reason, "certificate request denied");
            let body = json!({ "status": { "conditions": [
                condition("Denied", "NotClusterTunnelAgent", &reason, &rfc3339(now))
            ] } });
            api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map_err(CsrError::api(format!(
                    "deny CertificateSigningRequest {name}"
                )))?;
            return Ok(Action::await_change());
        }
        Verdict::Valid {
            cluster,
            request,
            origin,
        } => (cluster, request, origin),
    };

    // An addon's cluster must be served and the addon enabled there, now.
    if origin == Origin::Addon && !addon_enabled(&ctx.client, &cluster).await? {
        tracing::info!(csr = %name, %cluster, "certificate request left pending: the cluster is not accepted or the addon is not enabled there");
        return Ok(Action::requeue(PENDING_RECHECK));
    }

    let validity_days = ctx
        .config
        .borrow()
        .as_ref()
        .map(|c| match origin {
            // Short: a cluster detached from OCM keeps its identity for days at most.
            Origin::Addon => c
                .spec
                .signer
                .addon_certificate_validity_days
                .min(c.spec.signer.certificate_validity_days),
            Origin::Join => c.spec.signer.certificate_validity_days,
        })
        .ok_or_else(|| CsrError::NoConfiguration(ctx.config_name.clone()))?;
    let mut validity = time::Duration::days(i64::from(validity_days));
    if let Some(secs) = csr.spec.expiration_seconds {
        validity = validity.min(time::Duration::seconds(
            i64::from(secs).max(MIN_EXPIRATION_SECONDS),
        ));
    }

    if !has_condition(&csr, "Approved") {
        let body = json!({ "status": { "conditions": [
            condition("Approved", "AutoApprovedByTunnelManager", &format!("cluster {cluster}'s agent ({origin:?})"), &rfc3339(now))
        ] } });
        api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map_err(CsrError::api(format!(
                "approve CertificateSigningRequest {name}"
            )))?;
    }
    let pem = ctx.signer.sign_request(
        &request,
        &Leaf::Agent {
            cluster: cluster.clone(),
        },
        &ctx.trust_domain,
        now,
        validity,
    )?;
    let body = json!({ "status": { "certificate": k8s_openapi::ByteString(pem.into_bytes()) } });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map_err(CsrError::api(format!(
            "sign CertificateSigningRequest {name}"
        )))?;
    tracing::info!(csr = %name, %cluster, "agent certificate issued");
    Ok(Action::await_change())
}

/// Whether `cluster` is accepted and not going, and the addon is enabled there.
async fn addon_enabled(client: &kube::Client, cluster: &str) -> Result<bool, CsrError> {
    let clusters: Api<ManagedCluster> = Api::all(client.clone());
    let served = clusters
        .get_opt(cluster)
        .await
        .map_err(CsrError::api(format!("get ManagedCluster {cluster}")))?
        .is_some_and(|c| c.is_served());
    Ok(served
        && Api::<ManagedClusterAddOn>::namespaced(client.clone(), cluster)
            .get_opt(ADDON_NAME)
            .await
            .map_err(CsrError::api(format!(
                "get ManagedClusterAddOn {cluster}/{ADDON_NAME}"
            )))?
            .is_some_and(|a| a.meta().deletion_timestamp.is_none()))
}

/// Runs the controller until `shutdown`: the requests for [`SIGNER_NAME`] only.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let ours = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    crate::controller::run(Controller::new(api, ours), reconcile, ctx, shutdown).await;
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server (`tower_test`), each under a timeout. A request a scenario does
    //! not expect is never answered, so the reconciliation times out.

    use http::Method;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    use serde_json::{Value, json};
    use time::OffsetDateTime;

    use super::*;
    use crate::mock_api::{self, ApiHandle, Reply, TIMEOUT, finish, not_found, serve};
    use tunnel_api::ocm::agent_user;

    const TD: &str = "cluster-tunnel";
    const CLUSTER: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters/east";
    const ADDON: &str = "/apis/addon.open-cluster-management.io/v1alpha1/namespaces/east/managedclusteraddons/cluster-tunnel";
    const APPROVAL: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests/addon-east-cluster-tunnel-x7k2p/approval";
    const STATUS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests/addon-east-cluster-tunnel-x7k2p/status";

    fn config() -> watch::Receiver<Option<Arc<TunnelConfiguration>>> {
        let (tx, rx) = watch::channel(Some(mock_api::configuration(30)));
        std::mem::forget(tx);
        rx
    }

    fn scenario(now: OffsetDateTime) -> (Arc<Context>, ApiHandle) {
        let (client, handle) = mock_api::client();
        let ctx = Arc::new(Context {
            client,
            signer: Arc::new(Signer::generate(TD, now).unwrap()),
            trust_domain: TD.into(),
            config: config(),
            config_name: tunnel_api::configuration::DEFAULT_NAME.into(),
            clock: Arc::new(move || now),
            metrics: crate::metrics::ManagerMetrics::default(),
            join_namespace: Some("cluster-tunnel".into()),
            addons: true,
        });
        (ctx, handle)
    }

    /// A key made "in the managed cluster" and a request for `subject`.
    fn request(cn: &str, org: Option<&str>) -> (rcgen::KeyPair, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        if let Some(o) = org {
            dn.push(rcgen::DnType::OrganizationName, o);
        }
        params.distinguished_name = dn;
        // OCM's registration agent asks for this name too; it is not copied.
        params.subject_alt_names = vec![rcgen::SanType::DnsName(
            "cluster-tunnel.addon.open-cluster-management.io"
                .try_into()
                .unwrap(),
        )];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    /// A CSR as the API server holds it: labels, signer, the authenticated requester.
    fn csr(
        labels: Value,
        signer: &str,
        user: &str,
        groups: &[&str],
        pem: &str,
    ) -> Arc<CertificateSigningRequest> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "certificates.k8s.io/v1",
                "kind": "CertificateSigningRequest",
                "metadata": { "name": "addon-east-cluster-tunnel-x7k2p", "labels": labels },
                "spec": {
                    "signerName": signer,
                    "request": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem),
                    "usages": ["digital signature", "client auth"],
                    "username": user,
                    "groups": groups,
                },
            }))
            .unwrap(),
        )
    }

    fn ours() -> Value {
        json!({ "open-cluster-management.io/cluster-name": "east", "open-cluster-management.io/addon-name": "cluster-tunnel" })
    }

    const EAST_AGENT: &str = "system:open-cluster-management:east:agent-8f2k";
    const EAST_GROUPS: [&str; 3] = [
        "system:open-cluster-management:east",
        "system:open-cluster-management:managed-clusters",
        "system:authenticated",
    ];

    fn cluster(accepted: bool) -> Reply {
        Reply::With(
            200,
            json!({
                "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
                "metadata": { "name": "east" }, "spec": { "hubAcceptsClient": accepted },
            }),
        )
    }

    fn addon() -> Reply {
        Reply::With(
            200,
            json!({
                "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": "ManagedClusterAddOn",
                "metadata": { "name": "cluster-tunnel", "namespace": "east" }, "spec": {},
            }),
        )
    }

    fn csr_echo() -> Reply {
        Reply::EchoWith(json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": { "name": "addon-east-cluster-tunnel-x7k2p" },
            "spec": { "signerName": SIGNER_NAME, "request": "" },
        }))
    }

    async fn reconcile_once(c: Arc<CertificateSigningRequest>, ctx: &Arc<Context>) -> Action {
        tokio::time::timeout(TIMEOUT, reconcile(c, ctx.clone()))
            .await
            .expect("reconcile in time")
            .unwrap()
    }

    /// The PEM certificate a status patch carries (base64, as the API
    /// server holds it).
    fn issued_pem(status_body: &Value) -> Vec<u8> {
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            status_body["status"]["certificate"].as_str().unwrap(),
        )
        .unwrap()
    }

    fn denial(body: &Value) -> String {
        let c = &body["status"]["conditions"][0];
        assert_eq!(
            (c["type"].as_str(), c["status"].as_str()),
            (Some("Denied"), Some("True")),
            "{body}"
        );
        c["message"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn an_agent_request_from_its_own_cluster_is_approved_and_signed_for_its_key() {
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(now);
        let (key, pem) = request(&agent_user("east"), None);
        let server = serve(
            handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADDON, addon()),
                (Method::PATCH, APPROVAL, csr_echo()),
                (Method::PATCH, STATUS, csr_echo()),
            ],
        );
        let c = csr(ours(), SIGNER_NAME, EAST_AGENT, &EAST_GROUPS, &pem);
        assert_eq!(reconcile_once(c, &ctx).await, Action::await_change());
        let (_, b) = finish(server).await;
        let approved = &b[2]["status"]["conditions"][0];
        assert_eq!(
            (approved["type"].as_str(), approved["status"].as_str()),
            (Some("Approved"), Some("True"))
        );
        let pem = issued_pem(&b[3]);
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        // The servers read the agent's identity from it.
        assert_eq!(
            tunnel_identity::spiffe::peer_identity(&der, TD)
                .unwrap()
                .uri(TD),
            "spiffe://cluster-tunnel/agent/east"
        );
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        // The requested subject (OCM's registration agent checks it), the requester's own key.
        assert_eq!(
            x509.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            agent_user("east")
        );
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        // No name the request asked for besides the identity.
        let san = format!(
            "{:?}",
            x509.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(!san.contains("addon.open-cluster-management.io"), "{san}");
        // Signed by the hub's CA, for the short lifetime of OCM-registered
        // agents (7 days, not the 30 configured for other certificates): a
        // detached cluster's identity ends within days.
        let ca = CertificateDer::from_pem_slice(ctx.signer.ca.cert_pem.as_bytes()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        x509.verify_signature(Some(ca.public_key())).unwrap();
        assert_eq!(
            x509.validity().not_after.timestamp(),
            (now + time::Duration::days(7)).unix_timestamp()
        );
        assert!(
            !ctx.signer
                .needs_renewal(&pem, now + time::Duration::days(5))
        );
        assert!(
            ctx.signer
                .needs_renewal(&pem, now + time::Duration::days(6))
        );
    }

    #[tokio::test]
    async fn a_request_from_another_cluster_is_denied_and_never_signed() {
        let (_, pem) = request(&agent_user("east"), None);
        for (user, groups) in [
            // west's registration agent asking for east's agent.
            (
                "system:open-cluster-management:west:agent-1",
                vec!["system:open-cluster-management:west"],
            ),
            // A cluster whose name starts with east's.
            (
                "system:open-cluster-management:east2:agent-1",
                vec!["system:open-cluster-management:east2"],
            ),
            // The right user name without the cluster's group (not a cluster credential).
            (EAST_AGENT, vec!["system:authenticated"]),
            // Anybody else.
            (
                "system:serviceaccount:fleet:default",
                vec!["system:serviceaccounts"],
            ),
        ] {
            let (ctx, handle) = scenario(OffsetDateTime::now_utc());
            let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
            reconcile_once(csr(ours(), SIGNER_NAME, user, &groups, &pem), &ctx).await;
            let (_, b) = finish(server).await;
            assert!(
                denial(&b[0]).contains("registration agent"),
                "{user}: {}",
                b[0]
            );
        }
    }

    /// A request OCM's gRPC server created for the agent user it authenticated.
    fn grpc_csr(agent: Option<&str>, pem: &str) -> Arc<CertificateSigningRequest> {
        let mut c = (*csr(
            ours(),
            SIGNER_NAME,
            GRPC_SERVER_USER,
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:open-cluster-management-hub",
                "system:authenticated",
            ],
            pem,
        ))
        .clone();
        if let Some(agent) = agent {
            c.metadata.annotations = Some(
                [(CSR_USER_ANNOTATION.to_string(), agent.to_string())]
                    .into_iter()
                    .collect(),
            );
        }
        Arc::new(c)
    }

    #[tokio::test]
    async fn a_request_through_ocms_grpc_server_for_the_clusters_agent_is_signed() {
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(now);
        let (key, pem) = request(&agent_user("east"), None);
        let server = serve(
            handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADDON, addon()),
                (Method::PATCH, APPROVAL, csr_echo()),
                (Method::PATCH, STATUS, csr_echo()),
            ],
        );
        reconcile_once(grpc_csr(Some(EAST_AGENT), &pem), &ctx).await;
        let (_, b) = finish(server).await;
        assert_eq!(b[2]["status"]["conditions"][0]["type"], "Approved");
        let pem = issued_pem(&b[3]);
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[tokio::test]
    async fn a_request_through_ocms_grpc_server_for_another_agent_is_denied() {
        let (_, pem) = request(&agent_user("east"), None);
        for (c, why) in [
            // west's agent asking for east's certificate.
            (
                grpc_csr(Some("system:open-cluster-management:west:agent-1"), &pem),
                "gRPC",
            ),
            // A cluster whose name starts with east's.
            (
                grpc_csr(Some("system:open-cluster-management:east2:agent-1"), &pem),
                "gRPC",
            ),
            // The prefix alone names no agent.
            (
                grpc_csr(Some("system:open-cluster-management:east:"), &pem),
                "gRPC",
            ),
            // No agent named.
            (grpc_csr(None, &pem), "gRPC"),
            // The annotation counts only on what the gRPC server sent: anyone
            // else who sets it is still only who the API server says.
            (
                {
                    let mut c = (*grpc_csr(Some(EAST_AGENT), &pem)).clone();
                    c.spec.username = Some("system:serviceaccount:fleet:default".into());
                    Arc::new(c)
                },
                "system:serviceaccount:fleet:default",
            ),
        ] {
            let (ctx, handle) = scenario(OffsetDateTime::now_utc());
            let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
            reconcile_once(c.clone(), &ctx).await;
            let (_, b) = finish(server).await;
            let message = denial(&b[0]);
            assert!(
                message.contains(why) && message.contains("registration agent"),
                "{why}: {message}"
            );
        }
        // A request for another subject is denied whoever sent it.
        let (_, west) = request(&agent_user("west"), None);
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
        reconcile_once(grpc_csr(Some(EAST_AGENT), &west), &ctx).await;
        let (_, b) = finish(server).await;
        assert!(denial(&b[0]).contains("subject"), "{}", b[0]);
    }

    #[tokio::test]
    async fn a_request_for_another_signer_is_never_approved_nor_signed() {
        let (_, pem) = request(&agent_user("east"), None);
        for signer in ["kubernetes.io/kube-apiserver-client", "example.com/other"] {
            let (ctx, handle) = scenario(OffsetDateTime::now_utc());
            // Not one request: an unexpected one would never be answered.
            let server = serve(handle, vec![]);
            let c = csr(ours(), signer, EAST_AGENT, &EAST_GROUPS, &pem);
            assert_eq!(check(&c, true, Some("cluster-tunnel")), Verdict::Skip);
            assert_eq!(reconcile_once(c, &ctx).await, Action::await_change());
            finish(server).await;
        }
    }

    #[tokio::test]
    async fn a_request_for_another_subject_or_a_forged_one_is_denied() {
        let (_, other_cluster) = request(&agent_user("west"), None);
        let (_, with_group) = request(&agent_user("east"), Some("system:masters"));
        let (_, good) = request(&agent_user("east"), None);
        // A request whose signature does not verify: its sender does not hold the key.
        let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
            .unwrap();
        let mut bytes = der.as_ref().to_vec();
        let n = bytes.len();
        bytes[n - 5] ^= 0x55;
        let forged = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes)
        );
        for (pem, why) in [
            (other_cluster.as_str(), "subject"),
            (with_group.as_str(), "subject"),
            (forged.as_str(), "signature"),
            ("not a request", "PEM"),
        ] {
            let (ctx, handle) = scenario(OffsetDateTime::now_utc());
            let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
            reconcile_once(
                csr(ours(), SIGNER_NAME, EAST_AGENT, &EAST_GROUPS, pem),
                &ctx,
            )
            .await;
            let (_, b) = finish(server).await;
            let message = denial(&b[0]);
            assert!(message.contains(why), "{why}: {message}");
        }
        // Labelled for another addon: denied too.
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
        let labels = json!({ "open-cluster-management.io/cluster-name": "east", "open-cluster-management.io/addon-name": "cluster-proxy" });
        reconcile_once(
            csr(labels, SIGNER_NAME, EAST_AGENT, &EAST_GROUPS, &good),
            &ctx,
        )
        .await;
        let (_, b) = finish(server).await;
        assert!(denial(&b[0]).contains("addon-name"), "{}", b[0]);
    }

    #[tokio::test]
    async fn a_request_for_a_cluster_not_accepted_or_without_the_addon_is_left_pending() {
        let (_, pem) = request(&agent_user("east"), None);
        let c = csr(ours(), SIGNER_NAME, EAST_AGENT, &EAST_GROUPS, &pem);
        // Not accepted (or detached): no certificate.
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(handle, vec![(Method::GET, CLUSTER, cluster(false))]);
        assert_eq!(
            reconcile_once(c.clone(), &ctx).await,
            Action::requeue(PENDING_RECHECK)
        );
        finish(server).await;
        // Gone.
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(handle, vec![(Method::GET, CLUSTER, not_found())]);
        assert_eq!(
            reconcile_once(c.clone(), &ctx).await,
            Action::requeue(PENDING_RECHECK)
        );
        finish(server).await;
        // Accepted, but the addon is not enabled there.
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(
            handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADDON, not_found()),
            ],
        );
        assert_eq!(
            reconcile_once(c, &ctx).await,
            Action::requeue(PENDING_RECHECK)
        );
        finish(server).await;
    }

    #[tokio::test]
    async fn a_request_approved_by_someone_else_is_still_checked_before_signing() {
        let (_, pem) = request(&agent_user("east"), None);
        let approved = |user: &str, groups: &[&str]| {
            let mut c = (*csr(ours(), SIGNER_NAME, user, groups, &pem)).clone();
            c.status = Some(
                serde_json::from_value(json!({ "conditions": [
                { "type": "Approved", "status": "True", "reason": "ByHand" }
            ] }))
                .unwrap(),
            );
            Arc::new(c)
        };
        // From another cluster: neither denied (an approval stays) nor signed.
        let (ctx, handle) = scenario(OffsetDateTime::now_utc());
        let server = serve(handle, vec![]);
        reconcile_once(
            approved(
                "system:open-cluster-management:west:a",
                &["system:open-cluster-management:west"],
            ),
            &ctx,
        )
        .await;
        finish(server).await;
        // From the cluster itself: signed without approving again; a lifetime
        // the request asks for that is shorter is honoured.
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(now);
        let server = serve(
            handle,
            vec![
                (Method::GET, CLUSTER, cluster(true)),
                (Method::GET, ADDON, addon()),
                (Method::PATCH, STATUS, csr_echo()),
            ],
        );
        let mut c = (*approved(EAST_AGENT, &EAST_GROUPS)).clone();
        c.spec.expiration_seconds = Some(3600);
        reconcile_once(Arc::new(c), &ctx).await;
        let (_, b) = finish(server).await;
        let pem = issued_pem(&b[2]);
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x509.validity().not_after.timestamp(),
            (now + time::Duration::hours(1)).unix_timestamp()
        );
    }

    #[tokio::test]
    async fn an_issued_or_denied_request_is_left_alone() {
        let (_, pem) = request(&agent_user("east"), None);
        for status in [
            json!({ "certificate": "Y2VydA==" }),
            json!({ "conditions": [{ "type": "Denied", "status": "True" }] }),
        ] {
            let mut c = (*csr(ours(), SIGNER_NAME, EAST_AGENT, &EAST_GROUPS, &pem)).clone();
            c.status = Some(serde_json::from_value(status).unwrap());
            assert_eq!(check(&c, true, Some("cluster-tunnel")), Verdict::Skip);
        }
    }

    #[tokio::test]
    async fn a_join_request_with_the_clusters_join_token_is_signed_without_ocm() {
        let now = OffsetDateTime::now_utc();
        let (ctx, handle) = scenario(now);
        let (key, pem) = request(&join_subject("east"), None);
        // No ManagedCluster, no addon: nothing of OCM is asked.
        let server = serve(
            handle,
            vec![
                (Method::PATCH, APPROVAL, csr_echo()),
                (Method::PATCH, STATUS, csr_echo()),
            ],
        );
        let c = csr(
            json!({ JOIN_CLUSTER_LABEL: "east" }),
            SIGNER_NAME,
            "system:serviceaccount:cluster-tunnel:cluster-tunnel-join-east",
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:cluster-tunnel",
            ],
            &pem,
        );
        reconcile_once(c, &ctx).await;
        let (_, b) = finish(server).await;
        let pem = issued_pem(&b[1]);
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(
            tunnel_identity::spiffe::peer_identity(&der, TD)
                .unwrap()
                .uri(TD),
            "spiffe://cluster-tunnel/agent/east"
        );
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        // A joined agent's certificate lives certificateValidityDays.
        assert_eq!(
            x509.validity().not_after.timestamp(),
            (now + time::Duration::days(30)).unix_timestamp()
        );
    }

    #[tokio::test]
    async fn a_join_request_with_another_clusters_token_or_subject_is_denied() {
        let (_, east) = request(&join_subject("east"), None);
        let (_, west) = request(&join_subject("west"), None);
        for (user, pem, why) in [
            // west's join token asking for east.
            (
                "system:serviceaccount:cluster-tunnel:cluster-tunnel-join-west",
                &east,
                "join token",
            ),
            // A service account of the same name in another namespace.
            (
                "system:serviceaccount:fleet:cluster-tunnel-join-east",
                &east,
                "join token",
            ),
            // east's token asking for west's subject.
            (
                "system:serviceaccount:cluster-tunnel:cluster-tunnel-join-east",
                &west,
                "subject",
            ),
        ] {
            let (ctx, handle) = scenario(OffsetDateTime::now_utc());
            let server = serve(handle, vec![(Method::PATCH, APPROVAL, csr_echo())]);
            let c = csr(
                json!({ JOIN_CLUSTER_LABEL: "east" }),
                SIGNER_NAME,
                user,
                &[],
                pem,
            );
            reconcile_once(c, &ctx).await;
            let (_, b) = finish(server).await;
            assert!(denial(&b[0]).contains(why), "{user}: {}", b[0]);
        }
        // With joining off (no --join), a join request is denied whoever sends it.
        let c = csr(
            json!({ JOIN_CLUSTER_LABEL: "east" }),
            SIGNER_NAME,
            "system:serviceaccount:cluster-tunnel:cluster-tunnel-join-east",
            &[],
            &east,
        );
        assert!(matches!(check(&c, true, None), Verdict::Deny(_)));
    }
}
