//! Applies the project's CRDs, generated from `tunnel_api`'s types: what
//! `helm upgrade` does not do for a chart's `crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use tunnel_api::configuration::TunnelConfiguration;
use tunnel_api::policy::TunnelPolicy;

use crate::signer::FIELD_MANAGER;

/// Applies the CRDs (server-side apply, field manager `tunnel-manager`,
/// forced). Returns their names.
pub async fn apply_crds(client: &kube::Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut applied = Vec::new();
    for crd in [TunnelConfiguration::crd(), TunnelPolicy::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&crd).map_err(kube::Error::SerdeError)?;
        body["apiVersion"] = "apiextensions.k8s.io/v1".into();
        body["kind"] = "CustomResourceDefinition".into();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
        applied.push(name);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::mock_api::{self, Reply, finish, serve};

    /// The chart's copy (a test in the `tests` crate checks it against the types).
    const CHART_POLICY_CRD: &str =
        include_str!("../../charts/cluster-tunnel/crds/tunnelpolicies.yaml");

    #[tokio::test]
    async fn both_crds_are_applied_whole_as_the_chart_has_them() {
        let (client, handle) = mock_api::client();
        let server = serve(
            handle,
            vec![
                (
                    Method::PATCH,
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tunnelconfigurations.cluster-tunnel.io",
                    Reply::Echo(None),
                ),
                (
                    Method::PATCH,
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tunnelpolicies.cluster-tunnel.io",
                    Reply::Echo(None),
                ),
            ],
        );
        let names = apply_crds(&client).await.unwrap();
        assert_eq!(
            names,
            [
                "tunnelconfigurations.cluster-tunnel.io",
                "tunnelpolicies.cluster-tunnel.io"
            ]
        );
        let (_, b) = finish(server).await;
        let chart_policy: serde_json::Value = serde_yaml::from_str(CHART_POLICY_CRD).unwrap();
        assert_eq!(b[1]["spec"], chart_policy["spec"]);
        assert_eq!(b[0]["kind"], "CustomResourceDefinition");
        assert!(b[0]["spec"]["versions"][0]["schema"].is_object());
    }
}
