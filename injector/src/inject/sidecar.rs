//! The sidecar container an injected pod gets, and its two volumes (the
//! projected service account token and the client certificate Secret).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, ExecAction, Lifecycle, LifecycleHandler, Probe,
    ProjectedVolumeSource, ResourceRequirements, SecretVolumeSource, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use tunnel_api::pod::{
    ADMIN_PORT_NAME, SIDECAR_CONTAINER, TLS_DIR, TLS_VOLUME, TOKEN_DIR, TOKEN_FILE, TOKEN_VOLUME,
    restricted_security_context,
};
use tunnel_api::sidecar::DirectPolicy;

use super::SidecarTemplate;
use crate::annotations::{Mode, PodOptions};

pub(super) fn token_volume(t: &SidecarTemplate) -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(t.token_audience.clone()),
                    expiration_seconds: Some(t.token_expiration_seconds),
                    path: TOKEN_FILE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn tls_volume(t: &SidecarTemplate) -> Volume {
    Volume {
        name: TLS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(t.cert_secret.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// Seconds the kubelet gives one exec probe: starting a process in the
/// container takes longer than an HTTP request, and the probe's own timeout
/// (1 s) must end first so that its message reaches the pod's events.
const EXEC_PROBE_TIMEOUT_SECONDS: i32 = 3;

/// An exec probe: `command` plus `check` (`readyz` or `healthz`), which asks
/// the admin port on loopback. Not an `httpGet`: the kubelet sends those to
/// the pod's IP, where Istio's or Linkerd's redirection (and Istio's strict
/// mTLS) would take them, and Istio rewrites the probes only of containers
/// its own injector saw.
pub(super) fn exec_probe(command: &[String], check: &str, period: i32, failures: i32) -> Probe {
    let mut command = command.to_vec();
    command.push(check.to_owned());
    Probe {
        exec: Some(ExecAction {
            command: Some(command),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(EXEC_PROBE_TIMEOUT_SECONDS),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The clusters the pod's annotations name (its ports' and its default
/// cluster), for the sidecar's `--known-cluster`: a bare name that is one of
/// them is a cluster before the server's list is known.
pub(super) fn known_clusters(options: &PodOptions) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let named = options
        .ports
        .iter()
        .map(|(_, m)| &m.cluster)
        .chain(options.default_cluster.as_ref());
    for cluster in named {
        if !out.contains(cluster) {
            out.push(cluster.clone());
        }
    }
    out
}

pub(super) fn quantities(
    pairs: [(&str, &Option<String>); 2],
) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), Quantity(v.clone()))))
        .collect();
    (!map.is_empty()).then_some(map)
}

/// The sidecar container of a pod.
pub fn sidecar_container(options: &PodOptions, t: &SidecarTemplate) -> Container {
    let mut env = vec![env_var("TUNNEL_SERVERS", t.servers.join(","))];
    if let Some(name) = &t.server_name {
        env.push(env_var("TUNNEL_SERVER_NAME", name.clone()));
    }
    env.push(env_var("TUNNEL_TLS_CERT", format!("{TLS_DIR}/tls.crt")));
    env.push(env_var("TUNNEL_TLS_KEY", format!("{TLS_DIR}/tls.key")));
    env.push(env_var("TUNNEL_CA", format!("{TLS_DIR}/ca.crt")));
    // The pod's identity for the server's TokenReview (re-read as the kubelet rotates it).
    env.push(env_var(
        "TUNNEL_TOKEN_FILE",
        format!("{TOKEN_DIR}/{TOKEN_FILE}"),
    ));
    if !options.ports.is_empty() {
        let specs: Vec<&str> = options.ports.iter().map(|(s, _)| s.as_str()).collect();
        env.push(env_var("TUNNEL_PORTS", specs.join(",")));
    }
    env.push(env_var(
        "TUNNEL_PROXY_LISTEN",
        match options.proxy_port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "off".into(),
        },
    ));
    let admin_bind = if t.admin_bind.contains(':') {
        format!("[{}]:{}", t.admin_bind, t.admin_port)
    } else {
        format!("{}:{}", t.admin_bind, t.admin_port)
    };
    // Loopback unless the injector was told otherwise (for Prometheus; the
    // sidecar allows that for its admin port alone); the per-cluster ports
    // and the proxy stay on 127.0.0.1 as set above.
    env.push(env_var("TUNNEL_ADMIN_LISTEN", admin_bind));
    if let Some(cluster) = &options.default_cluster {
        env.push(env_var("TUNNEL_DEFAULT_CLUSTER", cluster.clone()));
    }
    let known = known_clusters(options);
    if !known.is_empty() {
        env.push(env_var("TUNNEL_KNOWN_CLUSTERS", known.join(",")));
    }
    if options.direct == DirectPolicy::Deny {
        env.push(env_var("TUNNEL_DIRECT", DirectPolicy::Deny.as_str()));
    }
    env.push(env_var("TUNNEL_LOG_LEVEL", options.log_level.clone()));

    let r = &options.resources;
    let resources = ResourceRequirements {
        requests: quantities([("cpu", &r.cpu_request), ("memory", &r.memory_request)]),
        limits: quantities([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]),
        ..Default::default()
    };
    let startup_failures = i32::try_from(t.startup_timeout.as_secs().max(1)).unwrap_or(i32::MAX);
    let (restart_policy, startup_probe, lifecycle) = match options.mode {
        Mode::Native => (
            Some("Always".to_owned()),
            Some(exec_probe(&t.probe_command, "readyz", 1, startup_failures)),
            None,
        ),
        Mode::Legacy => (
            None,
            None,
            Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(t.legacy_wait_command.clone()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    };
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(t.image.clone()),
        image_pull_policy: t.image_pull_policy.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: i32::from(t.admin_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(resources),
        restart_policy,
        startup_probe,
        liveness_probe: Some(exec_probe(&t.probe_command, "healthz", 10, 3)),
        lifecycle,
        security_context: Some(restricted_security_context(t.run_as_user)),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TLS_VOLUME.into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}
