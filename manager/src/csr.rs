//! The signer of agent certificates: a controller over the hub's
//! `CertificateSigningRequest`s for [`SIGNER_NAME`] (watched by
//! `spec.signerName`, so requests for any other signer are never even seen).
//!
//! A request is **approved and signed** only when all of this holds:
//!
//! - it is labelled for this addon ([`ADDON_LABEL`]) and a cluster
//!   ([`CLUSTER_LABEL`]), a valid cluster name;
//! - the API server says it was sent by that cluster's own registration
//!   agent: user `system:open-cluster-management:<cluster>:<agent>` in group
//!   `system:open-cluster-management:<cluster>` (labels are only hints; the
//!   requester is what the API server authenticated);
//! - its signature verifies (the sender holds the key) and its subject is
//!   exactly the agent user the addon registered ([`agent_user`]), no
//!   organization or unit;
//! - the `ManagedCluster` exists, is accepted and is not being deleted, and
//!   the addon is enabled there (its `ManagedClusterAddOn` exists and is not
//!   being deleted).
//!
//! A request that names another cluster than its sender's, or asks for
//! another subject, or is malformed, is **denied** (with the reason). One for
//! a cluster that is not (or no longer) served is left pending and looked at
//! again: certificates stop being issued when a cluster goes.
//!
//! The certificate keeps the requested subject (OCM's registration agent
//! checks it) and names the agent `spiffe://<trust-domain>/agent/<cluster>`,
//! the identity the servers read; it lives `certificateValidityDays` (or
//! less, if the request's `expirationSeconds` asks so), never beyond the CA.
//! OCM's registration agent asks for a new one when a fifth of its lifetime
//! is left.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::watch;

use crate::addons::Clock;
use crate::crd::TunnelConfiguration;
use crate::ocm::{
    ADDON_LABEL, ADDON_NAME, CLUSTER_LABEL, ManagedCluster, ManagedClusterAddOn, SIGNER_NAME,
    agent_user, cluster_group, cluster_user_prefix,
};
use crate::signer::{CertRequest, Leaf, Signer, SignerError};

/// How often a request for a cluster that is not served yet is looked at again.
pub const PENDING_RECHECK: Duration = Duration::from_secs(30);
/// Delay before a failed reconciliation is retried.
pub const RETRY_DELAY: Duration = Duration::from_secs(15);
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
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// What is to be done with a request, from the request alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to decide (another signer), or already decided or issued.
    Skip,
    /// Refused, with the reason.
    Deny(String),
    /// A well-formed request from `cluster`'s registration agent for its own agent.
    Valid {
        /// The cluster.
        cluster: String,
        /// The request.
        request: Box<CertRequest>,
    },
}

fn has_condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Checks everything a request says about itself (see the module doc).
pub fn check(csr: &CertificateSigningRequest) -> Verdict {
    if csr.spec.signer_name != SIGNER_NAME
        || has_condition(csr, "Denied")
        || has_condition(csr, "Failed")
        || csr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty())
    {
        return Verdict::Skip;
    }
    let labels = csr.labels();
    if labels.get(ADDON_LABEL).map(String::as_str) != Some(ADDON_NAME) {
        return Verdict::Deny(format!("not labelled {ADDON_LABEL}={ADDON_NAME}"));
    }
    let Some(cluster) = labels.get(CLUSTER_LABEL).cloned() else {
        return Verdict::Deny(format!("no {CLUSTER_LABEL} label"));
    };
    if let Err(e) = tunnel_proto::identity::validate_cluster_name(&cluster) {
        return Verdict::Deny(format!("cluster {cluster:?}: {e}"));
    }
    let user = csr.spec.username.as_deref().unwrap_or_default();
    let in_group = csr
        .spec
        .groups
        .as_ref()
        .is_some_and(|g| g.contains(&cluster_group(&cluster)));
    if !user.starts_with(&cluster_user_prefix(&cluster)) || !in_group {
        return Verdict::Deny(format!(
            "requested by {user:?}, which is not cluster {cluster}'s registration agent"
        ));
    }
    let request = match CertRequest::from_pem(&csr.spec.request.0) {
        Ok(r) => r,
        Err(e) => return Verdict::Deny(e.to_string()),
    };
    let want = agent_user(&cluster);
    if request.common_names != [want.clone()]
        || !request.organizations.is_empty()
        || !request.organizational_units.is_empty()
    {
        return Verdict::Deny(format!(
            "the request asks for subject CN={:?} O={:?} OU={:?}; cluster {cluster}'s agent is CN={want:?} only",
            request.common_names, request.organizations, request.organizational_units
        ));
    }
    Verdict::Valid {
        cluster,
        request: Box::new(request),
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
    let (cluster, request) = match check(&csr) {
        Verdict::Skip => return Ok(Action::await_change()),
        Verdict::Deny(reason) => {
            tracing::warn!(csr = %name, %reason, "certificate request denied");
            let body = json!({ "status": { "conditions": [
                condition("Denied", "NotClusterTunnelAgent", &reason, &rfc3339(now))
            ] } });
            api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map_err(CsrError::api(format!("deny CertificateSigningRequest {name}")))?;
            return Ok(Action::await_change());
        }
        Verdict::Valid { cluster, request } => (cluster, request),
    };

    // The cluster must be served and the addon enabled there, now.
    let clusters: Api<ManagedCluster> = Api::all(ctx.client.clone());
    let served = clusters
        .get_opt(&cluster)
        .await
        .map_err(CsrError::api(format!("get ManagedCluster {cluster}")))?
        .is_some_and(|c| c.is_served());
    let enabled = served
        && Api::<ManagedClusterAddOn>::namespaced(ctx.client.clone(), &cluster)
            .get_opt(ADDON_NAME)
            .await
            .map_err(CsrError::api(format!(
                "get ManagedClusterAddOn {cluster}/{ADDON_NAME}"
            )))?
            .is_some_and(|a| a.meta().deletion_timestamp.is_none());
    if !enabled {
        tracing::info!(csr = %name, %cluster, "certificate request left pending: the cluster is not accepted or the addon is not enabled there");
        return Ok(Action::requeue(PENDING_RECHECK));
    }

    let validity_days = ctx
        .config
        .borrow()
        .as_ref()
        .map(|c| c.spec.signer.certificate_validity_days)
        .ok_or_else(|| CsrError::NoConfiguration(ctx.config_name.clone()))?;
    let mut validity = time::Duration::days(i64::from(validity_days));
    if let Some(secs) = csr.spec.expiration_seconds {
        validity = validity.min(time::Duration::seconds(
            i64::from(secs).max(MIN_EXPIRATION_SECONDS),
        ));
    }

    if !has_condition(&csr, "Approved") {
        let body = json!({ "status": { "conditions": [
            condition("Approved", "AutoApprovedByTunnelManager", &format!("cluster {cluster}'s agent"), &rfc3339(now))
        ] } });
        api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map_err(CsrError::api(format!("approve CertificateSigningRequest {name}")))?;
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
        .map_err(CsrError::api(format!("sign CertificateSigningRequest {name}")))?;
    tracing::info!(csr = %name, %cluster, "agent certificate issued");
    Ok(Action::await_change())
}

/// Logs a failure and retries after [`RETRY_DELAY`].
pub fn error_policy(
    csr: Arc<CertificateSigningRequest>,
    error: &CsrError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(csr = %csr.name_any(), %error, "certificate request not handled; retrying");
    Action::requeue(RETRY_DELAY)
}

/// Runs the controller until `shutdown`: the requests for [`SIGNER_NAME`] only.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let ours = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    Controller::new(api, ours)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            ctx.metrics.observe("csr", &result);
            std::future::ready(())
        })
        .await;
}
