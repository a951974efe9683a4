//! `TunnelPolicy` objects followed with kube-runtime reflectors: every
//! change recompiles the set and publishes it.
//!
//! **An object that does not compile grants nothing** (fail closed): not its
//! previous version, which a replica that restarted would not have, so that
//! every replica decides the same from the same objects. The error, with the
//! field at fault, is logged and written to the object's `Accepted`
//! condition (`kubectl get tunnelpolicy` shows it); the other objects are
//! unaffected. Every replica computes the same condition and writes it only
//! when the object does not carry it yet, so they do not fight.
//!
//! With `--clusters-from-ocm` the `ManagedCluster`s and `ManagedClusterSet`s
//! are followed too, and the published policy decides with their labels and
//! set membership ([`crate::ocm_clusters`]); with the addon's
//! `ManagedClusterAddOn`s they also give the clusters whose agents are
//! admitted ([`crate::ocm_clusters::admitted`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::metrics::ServerMetrics;
use crate::ocm_clusters::{self, Admitted};
use tunnel_api::condition::transition_time;
use tunnel_api::ocm::{ADDON_NAME, ManagedCluster, ManagedClusterAddOn, ManagedClusterSet};
use tunnel_api::policy::TunnelPolicy;

use crate::policy::{ClusterInventory, Policy, PolicyError};

/// The condition the servers write on each object.
pub const ACCEPTED: &str = "Accepted";

/// Which source changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Policies,
    Clusters,
    Sets,
    Addons,
}

/// One watch as a stream of changes; `synced` once its first list is in.
fn changes<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    change: fn() -> Change,
) -> impl Stream<Item = Option<(Change, bool)>> + Send
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflector(writer, watcher(api, config))
        .default_backoff()
        .map(move |event| match event {
            Ok(watcher::Event::InitDone) => Some((change(), true)),
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some((change(), false)),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
            Err(err) => {
                tracing::warn!(%err, "watch failed; retrying");
                None
            }
        })
}

/// Starts following `TunnelPolicy` objects (and, with `clusters_from_ocm`,
/// the clusters, cluster sets and the addon's `ManagedClusterAddOn`s). Until
/// every first list arrived the policy denies everything and no cluster is
/// admitted. The second receiver (with `clusters_from_ocm`) says which
/// clusters' agents are admitted.
pub fn watch_policies(
    client: Client,
    metrics: ServerMetrics,
    clusters_from_ocm: bool,
) -> (
    watch::Receiver<Arc<Policy>>,
    Option<Admitted>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(Arc::new(Policy::deny_all()));
    let (admitted_tx, admitted_rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let policies: Api<TunnelPolicy> = Api::all(client.clone());
        let (policy_reader, policy_writer) = reflector::store();
        let (cluster_reader, cluster_writer) = reflector::store();
        let (set_reader, set_writer) = reflector::store();
        let (addon_reader, addon_writer) = reflector::store();
        let all = watcher::Config::default;
        let mut streams =
            vec![changes(policies.clone(), all(), policy_writer, || Change::Policies).boxed()];
        if clusters_from_ocm {
            let clusters: Api<ManagedCluster> = Api::all(client.clone());
            let sets: Api<ManagedClusterSet> = Api::all(client.clone());
            let addons: Api<ManagedClusterAddOn> = Api::all(client.clone());
            let ours = all().fields(&format!("metadata.name={ADDON_NAME}"));
            streams.push(changes(clusters, all(), cluster_writer, || Change::Clusters).boxed());
            streams.push(changes(sets, all(), set_writer, || Change::Sets).boxed());
            streams.push(changes(addons, ours, addon_writer, || Change::Addons).boxed());
        }
        let mut pending = streams.len();
        let mut merged = futures_util::stream::select_all(streams);
        let mut compiled = Compiled::default();
        let mut inventory = Arc::new(ClusterInventory::default());
        while let Some(event) = merged.next().await {
            let Some((change, init_done)) = event else {
                continue;
            };
            let first = init_done && pending == 1;
            if init_done && pending > 0 {
                pending -= 1;
            }
            if pending > 0 {
                continue;
            }
            // Once every first list is in, everything is computed once.
            let changed = |c: Change| first || change == c;
            if changed(Change::Policies) {
                let objects = policy_reader.state();
                let ok = compiled.update(objects.iter().map(|o| o.as_ref()));
                metrics.policy_reload(ok);
                let now = now_rfc3339();
                for obj in &objects {
                    write_status(&policies, obj, compiled.verdict(&obj.name_any()), &now).await;
                }
            }
            if clusters_from_ocm && (changed(Change::Clusters) || changed(Change::Sets)) {
                let clusters = cluster_reader.state();
                let sets = set_reader.state();
                inventory = Arc::new(ocm_clusters::inventory(
                    clusters.iter().map(|c| c.as_ref()),
                    sets.iter().map(|s| s.as_ref()),
                ));
            }
            if clusters_from_ocm && (changed(Change::Clusters) || changed(Change::Addons)) {
                let clusters = cluster_reader.state();
                let addons = addon_reader.state();
                let now = ocm_clusters::admitted(
                    clusters.iter().map(|c| c.as_ref()),
                    addons.iter().map(|a| a.as_ref()),
                );
                admitted_tx.send_if_modified(|old| {
                    if old.as_deref() == Some(&now) {
                        return false;
                    }
                    tracing::info!(clusters = ?now, "clusters whose agents are admitted (accepted, with the addon)");
                    *old = Some(Arc::new(now));
                    true
                });
            }
            let policy = compiled.policy().with_inventory(inventory.clone());
            tracing::info!(
                objects = compiled.by_name.len(),
                rules = policy.len(),
                clusters = inventory.labels.len(),
                "TunnelPolicy objects loaded"
            );
            if tx.send(Arc::new(policy)).is_err() {
                return;
            }
        }
    });
    (rx, clusters_from_ocm.then_some(admitted_rx), task)
}

/// Every object's compilation, by name: its rules, or why it grants nothing.
#[derive(Debug, Default)]
pub struct Compiled {
    by_name: BTreeMap<String, (Option<String>, Result<Policy, PolicyError>)>,
}

impl Compiled {
    /// Recompiles from the objects now present (an unchanged
    /// `resourceVersion` is not compiled again); returns whether all compiled.
    pub fn update<'a>(&mut self, objects: impl Iterator<Item = &'a TunnelPolicy>) -> bool {
        let mut next = BTreeMap::new();
        for obj in objects {
            let name = obj.name_any();
            let version = obj.resource_version();
            let entry = match self.by_name.remove(&name) {
                Some(prev) if prev.0 == version && version.is_some() => prev,
                _ => {
                    let result = Policy::compile(&name, &obj.spec);
                    if let Err(err) = &result {
                        tracing::error!(policy = %name, %err, "TunnelPolicy rejected; it grants nothing");
                    }
                    (version, result)
                }
            };
            next.insert(name, entry);
        }
        self.by_name = next;
        self.by_name.values().all(|(_, r)| r.is_ok())
    }

    /// The rules of every object that compiled, in name order.
    pub fn policy(&self) -> Policy {
        let mut policy = Policy::deny_all();
        for (_, p) in self.by_name.values() {
            if let Ok(p) = p {
                policy.extend(p);
            }
        }
        policy
    }

    /// How the object `name` compiled: its rule count, or the error.
    pub fn verdict(&self, name: &str) -> Result<usize, &PolicyError> {
        match self.by_name.get(name) {
            Some((_, Ok(p))) => Ok(p.len()),
            Some((_, Err(e))) => Err(e),
            None => Ok(0),
        }
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The status patch that gives `obj` its `Accepted` condition, or `None`
/// when it already carries it (same status, reason, message, generation).
pub fn status_patch(
    obj: &TunnelPolicy,
    verdict: Result<usize, &PolicyError>,
    now: &str,
) -> Option<Value> {
    let (status, reason, message) = match verdict {
        Ok(n) => (
            "True",
            "Compiled",
            format!("{n} rule{} in force", if n == 1 { "" } else { "s" }),
        ),
        Err(e) => (
            "False",
            "Invalid",
            format!("{e}; this policy grants nothing"),
        ),
    };
    let generation = obj.metadata.generation;
    let current = obj
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    if let Some(c) = current
        && c.status == status
        && c.reason == reason
        && c.message == message
        && c.observed_generation == generation
    {
        return None;
    }
    let since = transition_time(current, ACCEPTED, status, now);
    Some(json!({ "status": {
        "observedGeneration": generation,
        "conditions": [{
            "type": ACCEPTED, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation,
        }],
    } }))
}

/// Writes `obj`'s `Accepted` condition when it differs; a failure is logged
/// (the decision does not depend on it).
pub async fn write_status(
    api: &Api<TunnelPolicy>,
    obj: &TunnelPolicy,
    verdict: Result<usize, &PolicyError>,
    now: &str,
) {
    let Some(patch) = status_patch(obj, verdict, now) else {
        return;
    };
    let name = obj.name_any();
    if let Err(err) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::warn!(policy = %name, %err, "cannot write the TunnelPolicy's status");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use tunnel_api::policy::TunnelPolicySpec;

    use crate::policy::{Access, Decision};
    use tunnel_identity::spiffe::Identity;

    fn obj(name: &str, version: &str, yaml: &str) -> TunnelPolicy {
        let spec: TunnelPolicySpec = serde_yaml::from_str(yaml).unwrap();
        let mut o = TunnelPolicy::new(name, spec);
        o.metadata.resource_version = Some(version.into());
        o.metadata.generation = Some(version.parse().unwrap());
        o
    }

    const BROAD: &str = "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: '*'}]\n";
    const BAD: &str = "rules:\n  - subjects: [{namespace: A}]\n    clusters: [{name: east}]\n";
    const PROD: &str =
        "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{matchLabels: {env: prod}}]\n";
    const PAYMENTS_SET: &str =
        "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{clusterSet: payments}]\n";

    fn allowed(p: &Policy, cluster: &str) -> bool {
        let who = Identity::Workload {
            namespace: "a".into(),
            service_account: "default".into(),
        };
        p.decide(&Access {
            subject: &who,
            cluster,
            cluster_labels: &BTreeMap::new(),
            host: "svc",
            port: 443,
        }) != Decision::Deny
    }

    #[test]
    fn an_invalid_update_grants_nothing_not_the_previous_version() {
        let mut c = Compiled::default();
        assert!(c.update([obj("p1", "1", BROAD)].iter()));
        assert!(allowed(&c.policy(), "east"));
        // p1 edited into something invalid: its broader version 1 is gone too.
        assert!(!c.update([obj("p1", "2", BAD)].iter()));
        assert!(c.policy().is_empty());
        assert!(!allowed(&c.policy(), "east"));
        // A replica that starts now, from the same objects, decides the same.
        let mut fresh = Compiled::default();
        assert!(!fresh.update([obj("p1", "2", BAD)].iter()));
        assert_eq!(fresh.policy().len(), c.policy().len());
        // Fixed: in force again. Deleted objects go away.
        assert!(c.update([obj("p1", "3", BROAD)].iter()));
        assert!(allowed(&c.policy(), "east"));
        assert!(c.update(std::iter::empty()));
        assert!(c.policy().is_empty());
    }

    #[test]
    fn an_invalid_object_does_not_take_the_others_down() {
        let mut c = Compiled::default();
        assert!(!c.update([obj("good", "1", BROAD), obj("bad", "1", BAD)].iter()));
        assert_eq!(c.policy().len(), 1);
        assert_eq!(c.verdict("good"), Ok(1));
        let err = c.verdict("bad").unwrap_err().to_string();
        assert!(err.contains("rules[0].subjects[0].namespace"), "{err}");
    }

    #[test]
    fn managed_cluster_labels_and_sets_select_clusters() {
        let clusters: Vec<ManagedCluster> = serde_json::from_value(serde_json::json!([
            { "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
              "metadata": { "name": "east", "labels": { "env": "prod", "cluster.open-cluster-management.io/clusterset": "payments" } }, "spec": {} },
            { "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
              "metadata": { "name": "west", "labels": { "env": "dev" } }, "spec": {} },
        ]))
        .unwrap();
        let sets: Vec<ManagedClusterSet> = serde_json::from_value(serde_json::json!([
            { "apiVersion": "cluster.open-cluster-management.io/v1beta2", "kind": "ManagedClusterSet",
              "metadata": { "name": "payments" }, "spec": { "clusterSelector": { "selectorType": "ExclusiveClusterSetLabel" } } },
        ]))
        .unwrap();
        let inventory = Arc::new(ocm_clusters::inventory(clusters.iter(), sets.iter()));
        let mut c = Compiled::default();
        assert!(c.update([obj("prod", "1", PROD)].iter()));
        // Without the inventory (no --clusters-from-ocm) a label matches nothing.
        assert!(!allowed(&c.policy(), "east"));
        let p = c.policy().with_inventory(inventory.clone());
        assert!(allowed(&p, "east"));
        assert!(!allowed(&p, "west"));
        assert!(!allowed(&p, "north"));
        let mut c = Compiled::default();
        assert!(c.update([obj("payments", "1", PAYMENTS_SET)].iter()));
        let p = c.policy().with_inventory(inventory);
        assert!(allowed(&p, "east"));
        assert!(!allowed(&p, "west"));
    }

    #[test]
    fn the_accepted_condition_is_written_once_per_change() {
        let now = "2026-11-30T12:00:00Z";
        let good = obj("p1", "4", BROAD);
        let patch = status_patch(&good, Ok(1), now).unwrap();
        let cond = &patch["status"]["conditions"][0];
        assert_eq!(
            (cond["type"].as_str(), cond["status"].as_str()),
            (Some("Accepted"), Some("True"))
        );
        assert_eq!(cond["observedGeneration"], 4);
        // An object already carrying it gets no write (another replica wrote it).
        let mut written = good.clone();
        written.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        assert_eq!(status_patch(&written, Ok(1), "2026-11-30T12:00:05Z"), None);
        // An invalid edit: False, with the field, since now.
        let mut bad = obj("p1", "5", BAD);
        bad.status = written.status.clone();
        let mut c = Compiled::default();
        c.update([bad.clone()].iter());
        let patch = status_patch(&bad, c.verdict("p1"), "2026-11-30T12:01:00Z").unwrap();
        let cond = &patch["status"]["conditions"][0];
        assert_eq!(cond["status"], "False");
        assert_eq!(cond["reason"], "Invalid");
        assert!(
            cond["message"]
                .as_str()
                .unwrap()
                .contains("subjects[0].namespace"),
            "{cond}"
        );
        assert_eq!(cond["lastTransitionTime"], "2026-11-30T12:01:00Z");
    }

    #[tokio::test]
    async fn the_status_is_written_to_the_status_subresource() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        use tower_test::mock;
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<TunnelPolicy> = Api::all(kube::Client::new(service, "default"));
        let bad = obj("payments", "2", BAD);
        let mut c = Compiled::default();
        c.update([bad.clone()].iter());
        let answer_obj = bad.clone();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(
                (req.method(), req.uri().path()),
                (
                    &Method::PATCH,
                    "/apis/cluster-tunnel.io/v1alpha1/tunnelpolicies/payments/status"
                )
            );
            let body = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            let mut answer = serde_json::to_value(&answer_obj).unwrap();
            answer["status"] = body["status"].clone();
            send.send_response(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            body
        });
        let write = write_status(&api, &bad, c.verdict("payments"), "2026-11-30T12:00:00Z");
        tokio::time::timeout(std::time::Duration::from_secs(5), write)
            .await
            .expect("written in time");
        let body = server.await.unwrap();
        assert_eq!(body["status"]["conditions"][0]["status"], "False");
    }

    #[tokio::test]
    async fn with_ocm_the_first_lists_give_the_policy_and_the_admitted_clusters_at_once() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        use std::collections::BTreeSet;
        use tower_test::mock;
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let list = |kind: &str, items: Value| json!({ "apiVersion": "v1", "kind": kind, "metadata": { "resourceVersion": "1" }, "items": items });
        let cluster = |name: &str, accepted: bool, deleting: bool| {
            let mut c = json!({
                "apiVersion": "cluster.open-cluster-management.io/v1", "kind": "ManagedCluster",
                "metadata": { "name": name }, "spec": { "hubAcceptsClient": accepted },
            });
            if deleting {
                c["metadata"]["deletionTimestamp"] = json!("2026-11-30T12:00:00Z");
                c["metadata"]["finalizers"] = json!(["x"]);
            }
            c
        };
        let addon = |cluster: &str| {
            json!({
                "apiVersion": "addon.open-cluster-management.io/v1alpha1", "kind": "ManagedClusterAddOn",
                "metadata": { "name": "cluster-tunnel", "namespace": cluster }, "spec": {},
            })
        };
        let policy = json!({
            "apiVersion": "cluster-tunnel.io/v1alpha1", "kind": "TunnelPolicy",
            "metadata": { "name": "p1", "resourceVersion": "1", "generation": 1 },
            "spec": { "rules": [{ "subjects": [{ "namespace": "a" }], "clusters": [{ "name": "*" }] }] },
        });
        let answers = [
            (
                "/apis/cluster-tunnel.io/v1alpha1/tunnelpolicies",
                list("TunnelPolicyList", json!([policy])),
            ),
            (
                "/apis/cluster.open-cluster-management.io/v1/managedclusters",
                list(
                    "ManagedClusterList",
                    json!([
                        // Accepted, with the addon: admitted.
                        cluster("east", true, false),
                        // Accepted, without the addon.
                        cluster("west", true, false),
                        // With the addon, not (or no longer) accepted.
                        cluster("north", false, false),
                        // Being deleted.
                        cluster("south", true, true),
                    ]),
                ),
            ),
            (
                "/apis/cluster.open-cluster-management.io/v1beta2/managedclustersets",
                list("ManagedClusterSetList", json!([])),
            ),
            (
                "/apis/addon.open-cluster-management.io/v1alpha1/managedclusteraddons",
                list(
                    "ManagedClusterAddOnList",
                    json!([addon("east"), addon("north"), addon("south")]),
                ),
            ),
        ];
        let respond = |send: mock::SendResponse<Response<Body>>, body: &Value| {
            send.send_response(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(body).unwrap()))
                    .unwrap(),
            );
        };
        let server = tokio::spawn(async move {
            // The four first lists, answered policies first: the policy's
            // list is complete before the others are.
            let mut lists = Vec::new();
            let mut queries = Vec::new();
            let mut held = Vec::new();
            while lists.len() < answers.len() {
                let (req, send) = handle.next_request().await.expect("a request");
                let query = req.uri().query().unwrap_or_default().to_owned();
                assert_eq!(req.method(), Method::GET, "{}", req.uri());
                if query.contains("watch=true") {
                    held.push(send);
                    continue;
                }
                queries.push((req.uri().path().to_owned(), query));
                lists.push((req.uri().path().to_owned(), send));
            }
            lists.sort_by_key(|(path, _)| !path.ends_with("/tunnelpolicies"));
            for (i, (path, send)) in lists.into_iter().enumerate() {
                let (_, body) = answers
                    .iter()
                    .find(|(p, _)| *p == path)
                    .expect("a known list");
                respond(send, body);
                if i == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            // Then the watches (held open) and the policy's status.
            loop {
                let Some((req, send)) = handle.next_request().await else {
                    return queries;
                };
                if req.uri().query().unwrap_or_default().contains("watch=true") {
                    held.push(send);
                } else {
                    assert_eq!(
                        (req.method(), req.uri().path()),
                        (
                            &Method::PATCH,
                            "/apis/cluster-tunnel.io/v1alpha1/tunnelpolicies/p1/status"
                        )
                    );
                    let mut answer = policy.clone();
                    let body = req.into_body().collect_bytes().await.unwrap();
                    answer["status"] =
                        serde_json::from_slice::<Value>(&body).unwrap()["status"].clone();
                    respond(send, &answer);
                }
            }
        });
        let (mut policy_rx, admitted, task) = watch_policies(
            client,
            ServerMetrics::register(&mut Default::default()),
            true,
        );
        let mut admitted = admitted.expect("admitted clusters with --clusters-from-ocm");
        let set = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            admitted.wait_for(Option::is_some),
        )
        .await
        .expect("the admitted clusters are published")
        .unwrap()
        .clone()
        .unwrap();
        assert_eq!(*set, BTreeSet::from(["east".to_string()]));
        // The policy listed first is in force too, with the clusters' inventory.
        let policy = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            policy_rx.wait_for(|p| !p.is_empty()),
        )
        .await
        .expect("the policy is compiled once every first list is in")
        .unwrap()
        .clone();
        assert!(allowed(&policy, "east"));
        task.abort();
        let _ = task.await;
        let queries = server.await.unwrap();
        // The addons are watched by name: the servers may read no other.
        let (_, addons) = queries
            .iter()
            .find(|(p, _)| p.ends_with("/managedclusteraddons"))
            .unwrap();
        assert!(
            addons.contains("fieldSelector=metadata.name%3Dcluster-tunnel"),
            "{addons}"
        );
    }
}
