//! Names inside the pods the project runs: what the injector adds to a pod
//! and the sidecar reads, and where certificates are mounted.

/// Name of the injected container; a pod that has a container of this name
/// (init or app) is left alone, and one without it was admitted uninjected.
pub const SIDECAR_CONTAINER: &str = "cluster-tunnel-sidecar";
/// Default name of the sidecars' certificate Secret in every
/// injection-enabled namespace (the manager writes it, the injector mounts it).
pub const SIDECAR_SECRET: &str = "cluster-tunnel-sidecar";
/// Volume with the projected service-account token.
pub const TOKEN_VOLUME: &str = "cluster-tunnel-token";
/// Directory of the token in the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/cluster-tunnel";
/// File name of the token inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "token";
/// Volume with the sidecar's client certificate (a Secret).
pub const TLS_VOLUME: &str = "cluster-tunnel-tls";
/// Directory of a pod's certificate (sidecars, servers, agents): `tls.crt`,
/// `tls.key`, `ca.crt`, as in a `kubernetes.io/tls` Secret written by
/// cert-manager or the manager.
pub const TLS_DIR: &str = "/etc/cluster-tunnel/tls";
/// Name of the sidecar's admin port in the pod spec.
pub const ADMIN_PORT_NAME: &str = "tunnel-admin";
