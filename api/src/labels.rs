//! Labels the components set and select on.

/// `app.kubernetes.io/name` of everything cluster-tunnel runs.
pub const APP_NAME: &str = "cluster-tunnel";
/// On every object the manager writes (Helm's `managed-by: Helm` is someone else's).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tunnel-manager");
/// Default label key of injection-enabled namespaces (the manager's
/// `--namespace-label`, the configuration's `injector.namespaceLabel`).
pub const NAMESPACE_INJECTION: &str = "cluster-tunnel.io/injection";
/// The value of [`NAMESPACE_INJECTION`] that enables injection (what the webhook selects).
pub const INJECTION_ENABLED: &str = "enabled";
