//! Names inside the pods the project runs: what the injector adds to a pod
//! and the sidecar reads, where certificates are mounted, and the security
//! context every container of the project gets.

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
/// User and group the project's images run as (distroless `nonroot`).
pub const NONROOT_USER: i64 = 65532;

/// The `restricted` Pod Security Standard for a container of the project
/// (server, agent, injected sidecar) running as `user`, group `user`:
/// non-root, no privilege escalation, a read-only root file system, no
/// capabilities, the runtime's seccomp profile.
#[cfg(feature = "crd")]
pub fn restricted_security_context(user: i64) -> k8s_openapi::api::core::v1::SecurityContext {
    use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, SecurityContext};
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        run_as_group: Some(user),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}
