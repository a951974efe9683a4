//! `tunnel-manager join-token`: what a cluster needs to join without
//! open-cluster-management, with no key leaving anywhere. For cluster `<c>`:
//!
//! - the service account `cluster-tunnel-join-<c>` in the manager's
//!   namespace (made once; deleting it revokes every token of it);
//! - a ClusterRoleBinding of it to the chart's join ClusterRole (create and
//!   read certificate requests, nothing else);
//! - a token of it that expires after `--duration` (a TokenRequest), printed.
//!
//! `tunnel-agent join` in the managed cluster makes the key there and sends
//! a certificate request with that token; the manager (`--join`) signs it
//! only for cluster `<c>`'s agent (see [`crate::csr`]).
//!
//! A name that is an open-cluster-management `ManagedCluster` is refused:
//! that cluster's agent identity is OCM's to give (and to end when the
//! cluster is detached); a join token would be a second way to it.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::csr::join_service_account;
use tunnel_api::labels::MANAGED_BY;
use tunnel_api::ocm::ManagedCluster;

/// A join token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The cluster name cannot name an agent.
    #[error("cluster {0:?}: {1}")]
    BadCluster(String, #[source] tunnel_identity::spiffe::IdentityError),
    /// An API request failed.
    #[error("cannot {action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The API server answered without a token.
    #[error("the TokenRequest was answered without a token")]
    NoToken,
    /// The name is an open-cluster-management cluster's.
    #[error(
        "{0} is a ManagedCluster: its agent registers through open-cluster-management, not with a join token"
    )]
    ManagedCluster(String),
}

fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> JoinError {
    let action = action.into();
    move |source| JoinError::Api { action, source }
}

fn exists_ok<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes (or reuses) `cluster`'s join service account and its binding to
/// `join_role`, and returns a token of it valid for `duration`.
pub async fn join_token(
    client: &kube::Client,
    namespace: &str,
    cluster: &str,
    join_role: &str,
    duration: Duration,
) -> Result<String, JoinError> {
    tunnel_identity::spiffe::validate_cluster_name(cluster)
        .map_err(|e| JoinError::BadCluster(cluster.to_owned(), e))?;
    // 404 also when OCM is not installed (no such resource): nothing to clash with.
    let managed = Api::<ManagedCluster>::all(client.clone())
        .get_opt(cluster)
        .await
        .map_err(api(format!("get ManagedCluster {cluster}")))?;
    if managed.is_some() {
        return Err(JoinError::ManagedCluster(cluster.to_owned()));
    }
    let name = join_service_account(cluster);
    let labels = Some(std::collections::BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        ("cluster-tunnel.io/cluster".to_owned(), cluster.to_owned()),
    ]));
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: labels.clone(),
            ..ObjectMeta::default()
        },
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    exists_ok(accounts.create(&PostParams::default(), &sa).await)
        .map_err(api(format!("create ServiceAccount {namespace}/{name}")))?;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels,
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: join_role.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    };
    exists_ok(bindings.create(&PostParams::default(), &binding).await)
        .map_err(api(format!("create ClusterRoleBinding {name}")))?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = accounts
        .create_token_request(&name, &PostParams::default(), &request)
        .await
        .map_err(api(format!("request a token of {namespace}/{name}")))?;
    answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or(JoinError::NoToken)
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::mock_api::{self, Reply, finish, serve, status_reply};

    const MANAGED_EAST: &str = "/apis/cluster.open-cluster-management.io/v1/managedclusters/east";

    #[tokio::test]
    async fn a_join_token_is_a_short_lived_token_of_the_clusters_own_service_account() {
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![
                // Not an OCM cluster (here: OCM is not installed).
                (Method::GET, MANAGED_EAST, mock_api::not_found()),
                // Made before: fine.
                (
                    Method::POST,
                    "/api/v1/namespaces/cluster-tunnel/serviceaccounts",
                    status_reply(409, "AlreadyExists"),
                ),
                (
                    Method::POST,
                    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                    Reply::Echo(None),
                ),
                (
                    Method::POST,
                    "/api/v1/namespaces/cluster-tunnel/serviceaccounts/cluster-tunnel-join-east/token",
                    Reply::EchoWith(
                        json!({ "status": { "token": "eyJ.token", "expirationTimestamp": "2026-11-30T13:00:00Z" } }),
                    ),
                ),
            ],
        );
        let token = join_token(
            &client,
            "cluster-tunnel",
            "east",
            "cluster-tunnel-join",
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        assert_eq!(token, "eyJ.token");
        let (_, b) = finish(server).await;
        assert_eq!(b[1]["metadata"]["name"], "cluster-tunnel-join-east");
        assert_eq!(b[2]["roleRef"]["name"], "cluster-tunnel-join");
        assert_eq!(b[2]["subjects"][0]["name"], "cluster-tunnel-join-east");
        assert_eq!(b[3]["spec"]["expirationSeconds"], 3600);
    }

    #[tokio::test]
    async fn a_name_that_is_a_managed_cluster_gets_no_join_token() {
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![(
                Method::GET,
                MANAGED_EAST,
                Reply::With(
                    200,
                    json!({
                        "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
                        "metadata": { "name": "east" }, "spec": { "hubAcceptsClient": true },
                    }),
                ),
            )],
        );
        let err = join_token(
            &client,
            "cluster-tunnel",
            "east",
            "cluster-tunnel-join",
            Duration::from_secs(3600),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, JoinError::ManagedCluster(_)), "{err}");
        assert!(err.to_string().contains("open-cluster-management"), "{err}");
        // Nothing was made.
        finish(server).await;
    }

    #[tokio::test]
    async fn a_cluster_name_that_cannot_name_an_agent_is_refused_before_any_request() {
        let (client, handle) = mock_api::client();
        let server = serve(handle, vec![]);
        let err = join_token(
            &client,
            "cluster-tunnel",
            "East_1",
            "r",
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, JoinError::BadCluster(..)), "{err}");
        finish(server).await;
    }
}
