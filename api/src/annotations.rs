//! The pod annotations that opt a pod in and tune its sidecar. The injector
//! reads and writes them; the manager's webhook configuration and its
//! coverage scan look for [`INJECT`] and [`INJECTED`].

/// Prefix of every annotation and label of the injector.
pub const PREFIX: &str = "cluster-tunnel.io/";
/// `"true"` opts the pod in (annotation); `"false"` opts it out (annotation or label).
pub const INJECT: &str = "cluster-tunnel.io/inject";
/// Per-cluster loopback ports, `PORT=CLUSTER[:HOST:PORT]`, comma-separated.
pub const PORTS: &str = "cluster-tunnel.io/ports";
/// Port of the sidecar's HTTP proxy on loopback, or `off`.
pub const PROXY_PORT: &str = "cluster-tunnel.io/proxy-port";
/// `"false"` leaves the proxy environment variables of the app alone.
pub const SET_PROXY_ENV: &str = "cluster-tunnel.io/set-proxy-env";
/// Cluster of unqualified proxy names (the sidecar's `--default-cluster`).
pub const DEFAULT_CLUSTER: &str = "cluster-tunnel.io/default-cluster";
/// `allow` (default) or `deny`: whether the proxy dials destinations outside
/// every cluster from the pod (the sidecar's `--direct`).
pub const DIRECT: &str = "cluster-tunnel.io/direct";
/// The sidecar's CPU request.
pub const CPU_REQUEST: &str = "cluster-tunnel.io/cpu-request";
/// The sidecar's memory request.
pub const MEMORY_REQUEST: &str = "cluster-tunnel.io/memory-request";
/// The sidecar's CPU limit.
pub const CPU_LIMIT: &str = "cluster-tunnel.io/cpu-limit";
/// The sidecar's memory limit.
pub const MEMORY_LIMIT: &str = "cluster-tunnel.io/memory-limit";
/// The sidecar's log filter (the sidecar's `--log-level`).
pub const LOG_LEVEL: &str = "cluster-tunnel.io/log-level";
/// `native` (an init container with `restartPolicy: Always`, Kubernetes 1.29+)
/// or `legacy` (first app container with a `postStart` hook).
pub const MODE: &str = "cluster-tunnel.io/mode";
/// Set by the injector on the pods it changed: the injector's version.
pub const INJECTED: &str = "cluster-tunnel.io/injected";

/// Every annotation the injector reads or writes.
pub const KNOWN: [&str; 13] = [
    INJECT,
    PORTS,
    PROXY_PORT,
    SET_PROXY_ENV,
    DEFAULT_CLUSTER,
    DIRECT,
    CPU_REQUEST,
    MEMORY_REQUEST,
    CPU_LIMIT,
    MEMORY_LIMIT,
    LOG_LEVEL,
    MODE,
    INJECTED,
];
