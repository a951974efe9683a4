//! What a certificate request says about itself, checked before any API
//! call: who sent it, for which cluster, for which subject ([`check`], the
//! rules of the parent module's documentation), and the names the checks
//! use (labels, annotations, the join service accounts and subjects).

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::ResourceExt as _;

use crate::signer::CertRequest;
use tunnel_api::ocm::{
    ADDON_LABEL, ADDON_NAME, CLUSTER_LABEL, SIGNER_NAME, agent_user, cluster_group,
    cluster_user_prefix,
};

/// Label of a join request: the cluster it is for.
pub const JOIN_CLUSTER_LABEL: &str = "cluster-tunnel.io/cluster";
/// The user OCM's gRPC server creates certificate requests as, for
/// registration agents that reach the hub over gRPC (as addon-framework
/// knows it).
pub const GRPC_SERVER_USER: &str =
    "system:serviceaccount:open-cluster-management-hub:grpc-server-sa";
/// Where OCM's gRPC server names the agent user it authenticated
/// (`operatorv1.CSRUsernameAnnotation` of open-cluster-management's API).
pub const CSR_USER_ANNOTATION: &str = "open-cluster-management.io/csr-user";

/// The service account whose tokens let `cluster` join.
pub fn join_service_account(cluster: &str) -> String {
    format!("cluster-tunnel-join-{cluster}")
}

/// The subject a join request for `cluster` asks for.
pub fn join_subject(cluster: &str) -> String {
    format!("cluster-tunnel:agent:{cluster}")
}

/// How a request came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From OCM's registration agent, for the addon.
    Addon,
    /// From `tunnel-agent join`, with a join token.
    Join,
}

/// What is to be done with a request, from the request alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to decide (another signer), or already decided or issued.
    Skip,
    /// Refused, with the reason.
    Deny(String),
    /// A well-formed request for `cluster`'s agent from one allowed to ask.
    Valid {
        /// The cluster.
        cluster: String,
        /// The request.
        request: Box<CertRequest>,
        /// Who asked.
        origin: Origin,
    },
}

pub(super) fn has_condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Checks everything a request says about itself (see the module doc):
/// addon requests when `addons`, join requests when `join_namespace` is set.
pub fn check(
    csr: &CertificateSigningRequest,
    addons: bool,
    join_namespace: Option<&str>,
) -> Verdict {
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
    if let (Some(cluster), Some(ns)) = (labels.get(JOIN_CLUSTER_LABEL), join_namespace) {
        return check_join(csr, cluster, ns);
    }
    if !addons || labels.get(ADDON_LABEL).map(String::as_str) != Some(ADDON_NAME) {
        return Verdict::Deny(format!(
            "not labelled {ADDON_LABEL}={ADDON_NAME}{}",
            if join_namespace.is_some() {
                format!(" nor {JOIN_CLUSTER_LABEL}")
            } else {
                String::new()
            }
        ));
    }
    let Some(cluster) = labels.get(CLUSTER_LABEL).cloned() else {
        return Verdict::Deny(format!("no {CLUSTER_LABEL} label"));
    };
    if let Err(e) = tunnel_identity::spiffe::validate_cluster_name(&cluster) {
        return Verdict::Deny(format!("cluster {cluster:?}: {e}"));
    }
    let sender = csr.spec.username.as_deref().unwrap_or_default();
    let is_agent = |user: &str| {
        user.strip_prefix(&cluster_user_prefix(&cluster))
            .is_some_and(|id| !id.is_empty())
    };
    if sender == GRPC_SERVER_USER {
        // Created by OCM's gRPC server for the agent it authenticated.
        let user = csr
            .annotations()
            .get(CSR_USER_ANNOTATION)
            .map_or("", String::as_str);
        if !is_agent(user) {
            return Verdict::Deny(format!(
                "requested through OCM's gRPC server for {user:?} ({CSR_USER_ANNOTATION}), which is not cluster {cluster}'s registration agent"
            ));
        }
    } else {
        let in_group = csr
            .spec
            .groups
            .as_ref()
            .is_some_and(|g| g.contains(&cluster_group(&cluster)));
        if !is_agent(sender) || !in_group {
            return Verdict::Deny(format!(
                "requested by {sender:?}, which is not cluster {cluster}'s registration agent"
            ));
        }
    }
    let want = agent_user(&cluster);
    valid(csr, cluster, &want, Origin::Addon)
}

/// A join request for `cluster`: sent with `cluster`'s join token, for its agent's subject only.
fn check_join(csr: &CertificateSigningRequest, cluster: &str, namespace: &str) -> Verdict {
    if let Err(e) = tunnel_identity::spiffe::validate_cluster_name(cluster) {
        return Verdict::Deny(format!("cluster {cluster:?}: {e}"));
    }
    let user = csr.spec.username.as_deref().unwrap_or_default();
    let want_user = format!(
        "system:serviceaccount:{namespace}:{}",
        join_service_account(cluster)
    );
    if user != want_user {
        return Verdict::Deny(format!(
            "requested by {user:?}, not with cluster {cluster}'s join token ({want_user})"
        ));
    }
    let want = join_subject(cluster);
    valid(csr, cluster.to_owned(), &want, Origin::Join)
}

/// A request from one allowed to ask for `cluster`'s agent: valid when it
/// parses (its signature verifies) and asks for the subject `CN=<want>`
/// and nothing more.
fn valid(csr: &CertificateSigningRequest, cluster: String, want: &str, origin: Origin) -> Verdict {
    let request = match CertRequest::from_pem(&csr.spec.request.0) {
        Ok(r) => r,
        Err(e) => return Verdict::Deny(e.to_string()),
    };
    if request.common_names != [want]
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
        origin,
    }
}
