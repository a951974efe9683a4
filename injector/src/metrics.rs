//! The injector's Prometheus metrics, served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Label: the result of one admission review or one sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result.
    pub result: &'static str,
}

/// What became of one admission review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectionResult {
    /// The sidecar was added.
    Injected,
    /// Not opted in, opted out, not a pod, not a creation.
    Skipped,
    /// The pod already had the sidecar.
    AlreadyInjected,
    /// The pod was refused (invalid annotation, conflict).
    Refused,
    /// The review could not be handled (malformed, or our own failure).
    Error,
}

impl InjectionResult {
    /// Every result, so each series exists from the start.
    pub const ALL: [InjectionResult; 5] = [
        InjectionResult::Injected,
        InjectionResult::Skipped,
        InjectionResult::AlreadyInjected,
        InjectionResult::Refused,
        InjectionResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InjectionResult::Injected => "injected",
            InjectionResult::Skipped => "skipped",
            InjectionResult::AlreadyInjected => "already_injected",
            InjectionResult::Refused => "refused",
            InjectionResult::Error => "error",
        }
    }
}

/// Every metric of the injector.
#[derive(Clone, Debug, Default)]
pub struct InjectorMetrics {
    /// Admission reviews by result.
    pub injections: Family<ResultLabel, Counter>,
    /// caBundle reconciliations by result (`updated`, `unchanged`, `error`).
    pub ca_bundle_syncs: Family<ResultLabel, Counter>,
    /// Loads of the serving certificate from files by result (`ok`, `error`).
    pub certificate_reloads: Family<ResultLabel, Counter>,
}

impl InjectorMetrics {
    /// Creates the metrics and registers them under the `tunnel_injector` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for r in InjectionResult::ALL {
            let _ = m
                .injections
                .get_or_create(&ResultLabel { result: r.as_str() });
        }
        let r = registry.sub_registry_with_prefix("tunnel_injector");
        r.register(
            "injections",
            "Admission reviews by result",
            m.injections.clone(),
        );
        r.register(
            "ca_bundle_syncs",
            "caBundle reconciliations of the webhook configuration by result",
            m.ca_bundle_syncs.clone(),
        );
        r.register(
            "certificate_reloads",
            "Loads of the serving certificate from its files by result",
            m.certificate_reloads.clone(),
        );
        m
    }

    /// Counts one admission review.
    pub fn injection(&self, result: InjectionResult) {
        self.injections
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }
}
