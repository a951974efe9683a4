//! `TunnelPolicy` objects followed with a kube-runtime reflector: every
//! change recompiles the set and publishes it. An object that does not
//! compile is logged (with the field at fault) and its previous version, if
//! any, stays in force; the other objects are unaffected.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::metrics::ServerMetrics;
use crate::policy::{Policy, TunnelPolicy};

/// Starts following `TunnelPolicy` objects. Until the first list arrives the
/// policy denies everything.
pub fn watch_policies(
    client: Client,
    metrics: ServerMetrics,
) -> (watch::Receiver<Arc<Policy>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Policy::deny_all()));
    let api: Api<TunnelPolicy> = Api::all(client);
    let task = tokio::spawn(async move {
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut compiled = Compiled::default();
        let mut synced = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => synced = true,
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(err) => {
                    tracing::warn!(%err, "watching TunnelPolicy objects failed; retrying");
                    continue;
                }
            }
            if !synced {
                continue;
            }
            let objects = reader.state();
            let ok = compiled.update(objects.iter().map(|o| o.as_ref()));
            metrics.policy_reload(ok);
            let policy = compiled.policy();
            tracing::info!(
                objects = objects.len(),
                rules = policy.len(),
                "TunnelPolicy objects loaded"
            );
            if tx.send(Arc::new(policy)).is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// The last good compilation of each object, by name.
#[derive(Debug, Default)]
pub struct Compiled {
    by_name: BTreeMap<String, (Option<String>, Policy)>,
}

impl Compiled {
    /// Recompiles from the objects now present; returns whether all compiled.
    pub fn update<'a>(&mut self, objects: impl Iterator<Item = &'a TunnelPolicy>) -> bool {
        let mut all_ok = true;
        let mut next = BTreeMap::new();
        for obj in objects {
            let name = obj.name_any();
            let version = obj.resource_version();
            if let Some(prev) = self.by_name.get(&name)
                && prev.0 == version
            {
                next.insert(name, prev.clone());
                continue;
            }
            match Policy::compile(&name, &obj.spec) {
                Ok(p) => {
                    next.insert(name, (version, p));
                }
                Err(err) => {
                    all_ok = false;
                    match self.by_name.get(&name) {
                        Some(prev) => {
                            tracing::error!(policy = %name, %err, "TunnelPolicy rejected; its previous version stays in force");
                            next.insert(name, prev.clone());
                        }
                        None => {
                            tracing::error!(policy = %name, %err, "TunnelPolicy rejected; it allows nothing")
                        }
                    }
                }
            }
        }
        self.by_name = next;
        all_ok
    }

    /// Every object's rules, in name order.
    pub fn policy(&self) -> Policy {
        let mut policy = Policy::deny_all();
        for (_, p) in self.by_name.values() {
            policy.extend(p);
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TunnelPolicySpec;

    fn obj(name: &str, version: &str, yaml: &str) -> TunnelPolicy {
        let spec: TunnelPolicySpec = serde_yaml::from_str(yaml).unwrap();
        let mut o = TunnelPolicy::new(name, spec);
        o.metadata.resource_version = Some(version.into());
        o
    }

    const A: &str = "rules:\n  - subjects: [{namespace: a}]\n    clusters: [{name: east}]\n";
    const BAD: &str = "rules:\n  - subjects: [{namespace: A}]\n    clusters: [{name: east}]\n";

    #[test]
    fn a_bad_object_keeps_its_previous_version() {
        let mut c = Compiled::default();
        assert!(c.update([obj("p1", "1", A)].iter()));
        assert_eq!(c.policy().len(), 1);
        // p1 updated with an invalid namespace: its version 1 stays; p2 is new and bad.
        assert!(!c.update([obj("p1", "2", BAD), obj("p2", "1", BAD)].iter()));
        assert_eq!(c.policy().len(), 1);
        // Deleted objects go away.
        assert!(c.update(std::iter::empty()));
        assert!(c.policy().is_empty());
    }
}
