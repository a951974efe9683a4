//! The servers' Deployment: their command line from the configuration, the
//! pod's anti-affinity, probes, TLS volume and the `restricted` security
//! context.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference,
    ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe,
    SecretVolumeSource, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use tunnel_api::configuration::{AntiAffinity, Authorization, PullPolicy, ServerSpec};
use tunnel_api::pod::{NONROOT_USER, TLS_DIR, restricted_security_context};

use super::{ServerObjectNames, ServerObjectsError};

/// Seconds of a `<n>s` duration (the chart's form of the drain timeout).
fn whole_seconds(field: &'static str, value: &str) -> Result<i64, ServerObjectsError> {
    value
        .strip_suffix('s')
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| ServerObjectsError::BadConfiguration {
            field,
            reason: format!("{value:?} is not a number of seconds like \"30s\""),
        })
}

fn check_duration(field: &'static str, value: &str) -> Result<(), ServerObjectsError> {
    tunnel_shell::units::parse_duration(value)
        .map(drop)
        .map_err(|e| ServerObjectsError::BadConfiguration {
            field,
            reason: e.to_string(),
        })
}

fn pull_policy(policy: PullPolicy) -> &'static str {
    match policy {
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Always => "Always",
        PullPolicy::Never => "Never",
    }
}

fn container_port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(number),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn admin_probe(path: &str, period_seconds: i32, failure_threshold: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold,
        ..Probe::default()
    }
}

pub(super) fn server_deployment(
    server: &ServerSpec,
    names: &ServerObjectNames,
) -> Result<Deployment, ServerObjectsError> {
    let drain = whole_seconds("spec.server.drainTimeout", &server.drain_timeout)?;
    check_duration("spec.server.dialTimeout", &server.dial_timeout)?;
    check_duration("spec.server.deadPeerTimeout", &server.dead_peer_timeout)?;
    let ports = &server.ports;
    let mut args = vec![
        format!("--agent-listen=0.0.0.0:{}", ports.agent),
        format!("--client-listen=0.0.0.0:{}", ports.client),
        format!("--admin-listen=0.0.0.0:{}", ports.admin),
        format!("--tls-cert={TLS_DIR}/tls.crt"),
        format!("--tls-key={TLS_DIR}/tls.key"),
        format!("--ca={TLS_DIR}/ca.crt"),
        format!("--trust-domain={}", names.trust_domain),
        format!("--dial-timeout={}", server.dial_timeout),
        format!("--drain-timeout={}", server.drain_timeout),
        // Serving, not ready, agents sent elsewhere, before GOAWAY (docs/ha.md);
        // the chart's default, counted in the termination grace below.
        "--shutdown-delay=5s".to_owned(),
        format!("--dead-peer-timeout={}", server.dead_peer_timeout),
        // Agents behind a LoadBalancer or hostname connect until they hold
        // a tunnel to this many replicas.
        format!("--server-count={}", server.replicas),
        format!("--log-format={}", server.log_format),
        format!("--log-level={}", server.log_level),
    ];
    match server.authorization {
        Authorization::Kubernetes => {
            args.extend(["--policy-kubernetes".into(), "--token-review".into()]);
            if server.clusters_from_open_cluster_management {
                args.push("--clusters-from-ocm".into());
            }
        }
        Authorization::AllowAll => args.push("--allow-all".into()),
    }
    let term = PodAffinityTerm {
        topology_key: "kubernetes.io/hostname".to_owned(),
        label_selector: Some(names.label_selector()),
        ..PodAffinityTerm::default()
    };
    let anti = match server.anti_affinity {
        AntiAffinity::Hard => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Soft => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
    };
    let container = Container {
        name: "server".to_owned(),
        image: Some(server.image.clone()),
        image_pull_policy: Some(pull_policy(server.image_pull_policy).to_owned()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "TUNNEL_SERVER_ID".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            container_port("agent", ports.agent),
            container_port("client", ports.client),
            container_port("admin", ports.admin),
        ]),
        readiness_probe: Some(admin_probe("/readyz", 5, None)),
        liveness_probe: Some(admin_probe("/healthz", 10, Some(3))),
        security_context: Some(restricted_security_context(NONROOT_USER)),
        volume_mounts: Some(vec![VolumeMount {
            name: "tls".to_owned(),
            mount_path: TLS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        resources: server.resources.clone(),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(names.server()),
        automount_service_account_token: Some(false),
        // The server's default shutdown delay (5 s), the drain, then 10 s.
        termination_grace_period_seconds: Some(drain + 15),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(anti),
            ..Affinity::default()
        }),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(server.tls_secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        image_pull_secrets: (!server.image_pull_secrets.is_empty()).then(|| {
            server
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        node_selector: (!server.node_selector.is_empty()).then(|| server.node_selector.clone()),
        tolerations: (!server.tolerations.is_empty()).then(|| server.tolerations.clone()),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: names.meta(&names.server(), true, Some("server")),
        spec: DeploymentSpec {
            replicas: Some(server.replicas),
            selector: names.label_selector(),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names.selector()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    })
}
