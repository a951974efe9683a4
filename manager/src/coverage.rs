//! Opted-in pods running without the sidecar: a pod annotated
//! `cluster-tunnel.io/inject` with any value but `"false"` (and not opted
//! out by label) in an injection-enabled namespace that has no
//! `cluster-tunnel-sidecar` container. Such a pod was admitted while the
//! webhook did not answer (`failurePolicy: Ignore`, a cluster older than
//! 1.28 without `matchConditions`, a deleted webhook configuration, the
//! injector's own trouble without `--fail-closed`) and cannot reach any
//! cluster. A value other than `"true"` counts: the webhook refuses it, so
//! a pod that carries one was not seen by it.
//!
//! [`run`] looks every [`SCAN_INTERVAL`], sets
//! `tunnel_manager_pods_without_sidecar{namespace}` and logs a warning naming
//! the pods whenever the set changes; `tunnel-manager health --pods` prints
//! them ([`scan`]) and fails while there are any.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::metrics::{ManagerMetrics, NamespaceLabel};
use tunnel_api::annotations::INJECT;
use tunnel_api::labels::INJECTION_ENABLED;
use tunnel_api::pod::SIDECAR_CONTAINER;

/// How often [`run`] looks.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(60);

/// One opted-in pod without the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Uninjected {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
}

/// Whether `pod` asked for the sidecar (any value of the annotation but
/// "false", as the webhook's `matchConditions` read it) and runs without it.
/// Finished pods are left out.
pub fn is_uninjected(pod: &Pod) -> bool {
    // As the webhook's matchConditions: present and not "false".
    let opted_in = pod
        .annotations()
        .get(INJECT)
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("false"));
    let opted_out = pod
        .labels()
        .get(INJECT)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"));
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let Some(spec) = &pod.spec else {
        return false;
    };
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_CONTAINER);
    opted_in && !opted_out && !finished && !has_sidecar
}

/// Every opted-in pod without the sidecar in the namespaces labelled
/// `<namespace_label>=enabled`.
pub async fn scan(
    client: &kube::Client,
    namespace_label: &str,
) -> Result<Vec<Uninjected>, kube::Error> {
    let selector = format!("{namespace_label}={INJECTION_ENABLED}");
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?;
    let mut out = Vec::new();
    for ns in namespaces.items {
        if ns.metadata.deletion_timestamp.is_some()
            || ns.labels().get(namespace_label).map(String::as_str) != Some(INJECTION_ENABLED)
        {
            continue;
        }
        let name = ns.name_any();
        let pods = Api::<Pod>::namespaced(client.clone(), &name)
            .list(&ListParams::default())
            .await?;
        out.extend(
            pods.items
                .iter()
                .filter(|p| is_uninjected(p))
                .map(|p| Uninjected {
                    namespace: name.clone(),
                    pod: p.name_any(),
                }),
        );
    }
    out.sort();
    Ok(out)
}

/// Sets the gauge per namespace from `found` (namespaces seen before and
/// clear now go to 0) and warns when the set changed; returns the set.
pub fn report(
    found: &[Uninjected],
    previous: &BTreeSet<Uninjected>,
    metrics: &ManagerMetrics,
) -> BTreeSet<Uninjected> {
    let mut per_namespace: BTreeMap<&str, i64> =
        previous.iter().map(|u| (u.namespace.as_str(), 0)).collect();
    for u in found {
        *per_namespace.entry(&u.namespace).or_default() += 1;
    }
    for (namespace, n) in per_namespace {
        metrics
            .pods_without_sidecar
            .get_or_create(&NamespaceLabel {
                namespace: namespace.to_owned(),
            })
            .set(n);
    }
    let now: BTreeSet<Uninjected> = found.iter().cloned().collect();
    if now != *previous {
        if now.is_empty() {
            tracing::info!("every opted-in pod has the sidecar again");
        } else {
            let pods: Vec<String> = now
                .iter()
                .map(|u| format!("{}/{}", u.namespace, u.pod))
                .collect();
            tracing::warn!(
                count = pods.len(),
                ?pods,
                "opted-in pods run without the cluster-tunnel sidecar (admitted while the webhook did not answer); recreate them"
            );
        }
    }
    now
}

/// Scans every `interval` until `stop`.
pub async fn run(
    client: kube::Client,
    namespace_label: String,
    metrics: ManagerMetrics,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut previous = BTreeSet::new();
    loop {
        match scan(&client, &namespace_label).await {
            Ok(found) => previous = report(&found, &previous, &metrics),
            Err(error) => tracing::warn!(%error, "cannot look for pods without the sidecar"),
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The `health` command's section about them.
pub fn table(found: &[Uninjected]) -> String {
    if found.is_empty() {
        return "every opted-in pod has the sidecar\n".into();
    }
    let mut out = format!(
        "{} opted-in pod(s) without the sidecar (admitted while the webhook did not answer; recreate them):\n",
        found.len()
    );
    for u in found {
        out.push_str(&format!("  {}/{}\n", u.namespace, u.pod));
    }
    out
}

#[cfg(test)]
mod tests {
    use http::Method;
    use prometheus_client::registry::Registry;
    use serde_json::{Value, json};

    use super::*;
    use crate::mock_api::{self, Reply};

    fn pod(name: &str, annotations: Value, labels: Value, spec: Value, phase: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "annotations": annotations, "labels": labels },
            "spec": spec,
            "status": { "phase": phase },
        })
    }

    fn list(kind: &str, items: Vec<Value>) -> Reply {
        Reply::With(
            200,
            json!({ "apiVersion": "v1", "kind": kind, "metadata": { "resourceVersion": "1" }, "items": items }),
        )
    }

    fn namespace(name: &str, enabled: bool) -> Value {
        let labels = if enabled {
            json!({ "cluster-tunnel.io/injection": "enabled" })
        } else {
            json!({})
        };
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
    }

    #[tokio::test]
    async fn opted_in_pods_without_the_sidecar_are_found_counted_and_cleared() {
        let app = json!({ "containers": [{ "name": "app" }] });
        let injected = json!({ "initContainers": [{ "name": SIDECAR_CONTAINER }], "containers": [{ "name": "app" }] });
        let legacy = json!({ "containers": [{ "name": SIDECAR_CONTAINER }, { "name": "app" }] });
        let opt_in = json!({ INJECT: "True " });
        let fleet = vec![
            pod("missed", opt_in.clone(), json!({}), app.clone(), "Running"),
            pod("native", opt_in.clone(), json!({}), injected, "Running"),
            pod("legacy", opt_in.clone(), json!({}), legacy, "Pending"),
            pod(
                "opted-out",
                opt_in.clone(),
                json!({ INJECT: "false" }),
                app.clone(),
                "Running",
            ),
            pod("not-asking", json!({}), json!({}), app.clone(), "Running"),
            // A mistyped opt-in: the webhook would have refused it, so it
            // was admitted without being seen.
            pod(
                "mistyped",
                json!({ INJECT: "yes" }),
                json!({}),
                app.clone(),
                "Running",
            ),
            pod(
                "declined",
                json!({ INJECT: " FALSE " }),
                json!({}),
                app.clone(),
                "Running",
            ),
            pod("done", opt_in.clone(), json!({}), app.clone(), "Succeeded"),
        ];
        let batch = vec![pod("nightly", opt_in, json!({}), app, "Pending")];
        let (client, handle) = mock_api::client();
        let server = mock_api::serve(
            handle,
            vec![
                (
                    Method::GET,
                    "/api/v1/namespaces",
                    // An unlabelled namespace in the answer is skipped too.
                    list(
                        "NamespaceList",
                        vec![
                            namespace("fleet", true),
                            namespace("batch", true),
                            namespace("other", false),
                        ],
                    ),
                ),
                (
                    Method::GET,
                    "/api/v1/namespaces/fleet/pods",
                    list("PodList", fleet),
                ),
                (
                    Method::GET,
                    "/api/v1/namespaces/batch/pods",
                    list("PodList", batch),
                ),
            ],
        );
        let found = scan(&client, "cluster-tunnel.io/injection").await.unwrap();
        mock_api::finish(server).await;
        assert_eq!(
            found,
            [
                Uninjected {
                    namespace: "batch".into(),
                    pod: "nightly".into()
                },
                Uninjected {
                    namespace: "fleet".into(),
                    pod: "missed".into()
                },
                Uninjected {
                    namespace: "fleet".into(),
                    pod: "mistyped".into()
                },
            ]
        );

        let mut registry = Registry::default();
        let metrics = ManagerMetrics::register(&mut registry);
        let seen = report(&found, &BTreeSet::new(), &metrics);
        let text = |registry: &Registry| {
            let mut t = String::new();
            prometheus_client::encoding::text::encode(&mut t, registry).unwrap();
            t
        };
        let t = text(&registry);
        assert!(
            t.contains(r#"tunnel_manager_pods_without_sidecar{namespace="fleet"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"tunnel_manager_pods_without_sidecar{namespace="batch"} 1"#),
            "{t}"
        );
        // Recreated: the gauges go back to 0.
        report(&[], &seen, &metrics);
        let t = text(&registry);
        assert!(
            t.contains(r#"tunnel_manager_pods_without_sidecar{namespace="fleet"} 0"#),
            "{t}"
        );

        let out = table(&found);
        assert!(
            out.starts_with("3 opted-in pod(s) without the sidecar"),
            "{out}"
        );
        assert!(out.contains("  fleet/missed\n"), "{out}");
        assert_eq!(table(&[]), "every opted-in pod has the sidecar\n");
    }
}
