//! The manager's Prometheus metrics (on its admin port's `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label: a controller and how its reconciliation ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabel {
    /// `hub`, `addons`, `csr`, `namespaces`.
    pub controller: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Label: a condition of the TunnelConfiguration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    /// `Ready`, `ServerDeployed`, ...
    pub condition: String,
}

/// Label: a namespace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    /// The namespace.
    pub namespace: String,
}

/// Every metric of the manager.
#[derive(Clone, Debug, Default)]
pub struct ManagerMetrics {
    /// Reconciliations by controller and result.
    pub reconciliations: Family<ReconcileLabel, Counter>,
    /// 1 while a condition of the configuration is true, else 0.
    pub conditions: Family<ConditionLabel, Gauge>,
    /// 1 while this manager holds the leader Lease (runs the controllers).
    pub leader: Gauge,
    /// Opted-in pods running without the sidecar, per namespace.
    pub pods_without_sidecar: Family<NamespaceLabel, Gauge>,
}

impl ManagerMetrics {
    /// Creates the metrics and registers them under the `tunnel_manager` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tunnel_manager");
        r.register(
            "reconciliations",
            "Reconciliations by controller and result (ok or error)",
            m.reconciliations.clone(),
        );
        r.register(
            "leader",
            "1 while this manager holds the leader lease and runs the controllers",
            m.leader.clone(),
        );
        r.register(
            "pods_without_sidecar",
            "Opted-in pods running without the cluster-tunnel sidecar, per namespace",
            m.pods_without_sidecar.clone(),
        );
        r.register(
            "configuration_condition",
            "1 while the TunnelConfiguration's condition is true, else 0",
            m.conditions.clone(),
        );
        m
    }

    /// Counts one reconciliation of `controller`.
    pub fn reconciled<T, E>(&self, controller: &'static str, result: &Result<T, E>) {
        let result = if result.is_ok() { "ok" } else { "error" };
        self.reconciliations
            .get_or_create(&ReconcileLabel { controller, result })
            .inc();
    }

    /// Counts and logs one result of `controller`'s run stream (kube-runtime
    /// has already logged and requeued a failed reconciliation).
    pub fn observe<T, E: std::fmt::Display>(
        &self,
        controller: &'static str,
        result: &Result<T, E>,
    ) {
        self.reconciled(controller, result);
        if let Err(error) = result {
            tracing::debug!(%error, controller, "controller");
        }
    }

    /// Records a condition's state.
    pub fn condition(&self, condition: &str, ok: bool) {
        self.conditions
            .get_or_create(&ConditionLabel {
                condition: condition.to_owned(),
            })
            .set(i64::from(ok));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciliations_and_conditions_are_exported_by_name() {
        let mut registry = Registry::default();
        let m = ManagerMetrics::register(&mut registry);
        m.reconciled::<(), ()>("hub", &Ok(()));
        m.reconciled::<(), ()>("hub", &Err(()));
        m.reconciled::<(), ()>("hub", &Err(()));
        m.condition("Ready", true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"tunnel_manager_reconciliations_total{controller="hub",result="error"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"tunnel_manager_configuration_condition{condition="Ready"} 1"#),
            "{text}"
        );
    }
}
