//! The sidecar injector's `MutatingWebhookConfiguration`, and what the API
//! server's version lets it carry ([`WebhookSupport`]).

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use tunnel_api::configuration::{FailurePolicy, InjectorSpec};

use super::desired::strings;
use super::{ServerObjectNames, ServerObjectsError};

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
    pub async fn of_api_server(client: &kube::Client) -> Result<Self, ServerObjectsError> {
        let info = client
            .apiserver_version()
            .await
            .map_err(|source| ServerObjectsError::Api {
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

pub(super) fn webhook_configuration(
    injector: &InjectorSpec,
    names: &ServerObjectNames,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_webhook_takes_only_opted_in_pods_and_fails_closed_by_default() {
        let names = ServerObjectNames {
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
}
