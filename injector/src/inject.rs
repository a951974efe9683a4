//! What injection does to a pod: the sidecar container, its volumes, the
//! app's environment, as a JSON Patch (RFC 6902) against the pod the API
//! server sent.
//!
//! [`plan`] is pure: a pod and a [`SidecarTemplate`] in, an [`Outcome`] out.
//! The patch is built against the pod exactly as received: each operation
//! names a path that exists at that point of the patch (lists that are missing
//! are added whole), and every key is escaped as a JSON Pointer token
//! (`/` → `~1`, `~` → `~0`).

use std::collections::BTreeMap;
use std::time::Duration;

use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use tunnel_api::annotations;
use tunnel_api::pod::{SIDECAR_CONTAINER, TLS_VOLUME, TOKEN_VOLUME};

use crate::annotations::{AnnotationError, Defaults, Mode, OptIn, PodOptions};
use crate::mesh::{self, Mesh};

mod env;
mod patch;
mod ports;
mod sidecar;

use env::app_env;
pub use env::{BASE_NO_PROXY, cluster_port_env};
pub use patch::add;
use patch::{add_env, add_list_items, add_map_entries, to_value};
use ports::{check_ports, injected_ports};
pub use sidecar::sidecar_container;
use sidecar::{tls_volume, token_volume};

/// Annotation `kubectl logs`/`exec` read to pick a container (legacy mode
/// puts the sidecar first, which would otherwise be the default).
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Labels that mark a Job's pod (besides an owner reference of kind Job).
const JOB_LABELS: [&str; 2] = ["batch.kubernetes.io/job-name", "job-name"];

/// Everything about the sidecar that comes from the injector's configuration
/// rather than from the pod.
#[derive(Debug, Clone)]
pub struct SidecarTemplate {
    /// The sidecar image.
    pub image: String,
    /// Its pull policy; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Server client-port addresses (`TUNNEL_SERVERS`).
    pub servers: Vec<String>,
    /// Name the server certificate must carry (`TUNNEL_SERVER_NAME`).
    pub server_name: Option<String>,
    /// Secret in the pod's namespace with the sidecar's client certificate.
    pub cert_secret: String,
    /// Audience of the projected service-account token.
    pub token_audience: String,
    /// Lifetime of the projected token; the kubelet renews it at 80%.
    pub token_expiration_seconds: i64,
    /// The sidecar's admin port (probes, metrics, `POST /shutdown`).
    pub admin_port: u16,
    /// Address the admin port binds to: loopback by default, since the
    /// probes are `exec`s of [`SidecarTemplate::probe_command`] inside the
    /// container (an `httpGet` to the pod's IP would meet a mesh's traffic
    /// redirection); `0.0.0.0` (or `::`) for Prometheus to scrape the pod.
    pub admin_bind: String,
    /// Command of the exec probes, run in the sidecar's container; `readyz`
    /// or `healthz` is appended (`tunnel-sidecar probe`).
    pub probe_command: Vec<String>,
    /// User and group the sidecar runs as.
    pub run_as_user: i64,
    /// How long the sidecar may take to become ready before the kubelet
    /// restarts it (native mode's startup probe).
    pub startup_timeout: Duration,
    /// Command of the legacy mode's `postStart` hook; it must block until the
    /// sidecar is ready.
    pub legacy_wait_command: Vec<String>,
    /// The full `NO_PROXY` list.
    pub no_proxy: Vec<String>,
    /// Defaults of what annotations can change.
    pub defaults: Defaults,
    /// Written to the `cluster-tunnel.io/injected` annotation.
    pub version: String,
}

/// The decision about one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Not opted in (or opted out); why.
    Skipped(&'static str),
    /// The pod already has the sidecar: nothing to do.
    AlreadyInjected,
    /// The changes, and warnings for whoever created the pod.
    Injected {
        /// The JSON Patch.
        patch: Patch,
        /// Admission warnings (`kubectl` prints them).
        warnings: Vec<String>,
    },
}

/// Why an opted-in pod cannot get the sidecar; the pod is refused with this
/// message, so it says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An annotation has an invalid value.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The pod clashes with what the sidecar needs.
    #[error("{0}")]
    Conflict(String),
}

/// Decides what to do with `pod` and builds the patch.
pub fn plan(pod: &Pod, template: &SidecarTemplate) -> Result<Outcome, Refusal> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Outcome::Skipped("pod has no spec"));
    };
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if let Some(ours) = spec
        .containers
        .iter()
        .chain(init_containers)
        .find(|c| c.name == SIDECAR_CONTAINER)
    {
        // Re-invoked (or a pod re-created from an injected spec): another
        // webhook, a mesh's injector say, may have added a container since.
        check_ports(&injected_ports(ours), spec, "was added after the sidecar")?;
        return Ok(Outcome::AlreadyInjected);
    }
    if let OptIn::No(why) = crate::annotations::opt_in(annotations, labels)? {
        return Ok(Outcome::Skipped(why));
    }
    let options =
        PodOptions::from_annotations(annotations, &template.defaults, template.admin_port)?;

    if spec.host_network == Some(true) {
        return Err(Refusal::Conflict(
            "pods with hostNetwork cannot get the cluster-tunnel sidecar: its loopback ports \
             would be the node's; remove the cluster-tunnel.io/inject annotation"
                .into(),
        ));
    }
    for volume in spec.volumes.iter().flatten() {
        if volume.name == TOKEN_VOLUME || volume.name == TLS_VOLUME {
            return Err(Refusal::Conflict(format!(
                "the pod already has a volume named {:?}, which the cluster-tunnel sidecar needs; rename it",
                volume.name
            )));
        }
    }
    check_ports(
        &options.listening_ports(template.admin_port),
        spec,
        "is already in the pod",
    )?;

    let mut ops = Vec::new();
    let mut warnings: Vec<String> = options
        .unknown
        .iter()
        .map(|k| format!("cluster-tunnel: unknown annotation {k} ignored"))
        .collect();

    // Metadata first: nothing below moves it.
    let mut new_annotations = vec![(annotations::INJECTED, template.version.clone())];
    if options.mode == Mode::Legacy
        && !annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION)
        && let Some(first) = spec.containers.iter().find(|c| Mesh::of(c).is_none())
    {
        new_annotations.push((DEFAULT_CONTAINER_ANNOTATION, first.name.clone()));
    }
    add_map_entries(
        &mut ops,
        &["metadata", "annotations"],
        pod.metadata.annotations.is_some(),
        &new_annotations,
    );

    let volumes = [token_volume(template), tls_volume(template)].map(to_value);
    add_list_items(
        &mut ops,
        &["spec", "volumes"],
        spec.volumes.is_some(),
        &volumes,
    );

    // The app's environment, by index in the pod as received: done before the
    // sidecar is inserted, which shifts the indices of its list.
    // A mesh's own containers are left alone.
    let env = app_env(&options, template);
    for (i, container) in spec.containers.iter().enumerate() {
        if Mesh::of(container).is_none() {
            add_env(&mut ops, "containers", i, container, &env);
        }
    }
    // A native sidecar starts before the other init containers, so they can use
    // the tunnel too; in legacy mode they run before it exists.
    if options.mode == Mode::Native {
        for (i, container) in init_containers.iter().enumerate() {
            if Mesh::of(container).is_none() {
                add_env(&mut ops, "initContainers", i, container, &env);
            }
        }
    }

    // First, or right after a mesh's leading containers.
    let sidecar = to_value(sidecar_container(&options, template));
    match options.mode {
        Mode::Native => match &spec.init_containers {
            None => ops.push(add(&["spec", "initContainers"], json!([sidecar]))),
            Some(list) => {
                let at = mesh::insert_index(list).to_string();
                ops.push(add(&["spec", "initContainers", &at], sidecar));
            }
        },
        Mode::Legacy => {
            let at = mesh::insert_index(&spec.containers).to_string();
            ops.push(add(&["spec", "containers", &at], sidecar));
            if is_job_pod(pod) {
                warnings.push(format!(
                    "cluster-tunnel: legacy mode in a Job's pod: the sidecar keeps the pod running \
                     until the app calls POST http://127.0.0.1:{}/shutdown when it is done",
                    template.admin_port
                ));
            }
        }
    }
    Ok(Outcome::Injected {
        patch: Patch(ops),
        warnings,
    })
}

/// Whether a Job controls the pod.
fn is_job_pod(pod: &Pod) -> bool {
    let owned = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job" && o.api_version.starts_with("batch/"));
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| JOB_LABELS.iter().any(|k| l.contains_key(*k)));
    owned || labelled
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::Value;
    use tunnel_api::pod::TLS_DIR;

    use super::*;
    use crate::annotations::Resources;

    pub(crate) fn template() -> SidecarTemplate {
        SidecarTemplate {
            image: "ghcr.io/cluster-tunnel/tunnel-sidecar:0.1.0".into(),
            image_pull_policy: None,
            servers: vec!["tunnel-server.cluster-tunnel.svc:8090".into()],
            server_name: None,
            cert_secret: "cluster-tunnel-sidecar".into(),
            token_audience: "cluster-tunnel".into(),
            token_expiration_seconds: 3600,
            admin_port: 17090,
            admin_bind: "127.0.0.1".into(),
            probe_command: vec!["tunnel-sidecar".into(), "probe".into()],
            run_as_user: 65532,
            startup_timeout: Duration::from_secs(120),
            legacy_wait_command: vec!["tunnel-sidecar".into(), "wait-ready".into()],
            no_proxy: BASE_NO_PROXY
                .iter()
                .map(|s| (*s).to_owned())
                .chain(["10.96.0.1".to_owned()])
                .collect(),
            defaults: Defaults {
                proxy_port: Some(17080),
                set_proxy_env: true,
                resources: Resources {
                    cpu_request: Some("10m".into()),
                    memory_request: Some("32Mi".into()),
                    ..Default::default()
                },
                log_level: "info".into(),
                mode: Mode::Native,
            },
            version: "0.1.0".into(),
        }
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn apply(pod_json: &Value, patch: &Patch) -> Value {
        let mut doc = pod_json.clone();
        json_patch::patch(&mut doc, patch).unwrap();
        doc
    }

    fn opted_in(annotations: Value, spec: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "app", "namespace": "team", "annotations": annotations },
            "spec": spec,
        })
    }

    fn injected(v: &Value) -> (Patch, Vec<String>) {
        match plan(&pod(v.clone()), &template()).unwrap() {
            Outcome::Injected { patch, warnings } => (patch, warnings),
            other => panic!("expected injection, got {other:?}"),
        }
    }

    fn env_of(container: &Value) -> Vec<(String, String)> {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().unwrap_or("<from>").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_pod_without_the_annotation_is_skipped() {
        let p = json!({ "metadata": {}, "spec": { "containers": [{ "name": "app" }] } });
        assert!(matches!(
            plan(&pod(p), &template()),
            Ok(Outcome::Skipped(_))
        ));
    }

    #[test]
    fn a_pod_with_the_sidecar_is_left_alone_whatever_its_annotations() {
        for spec in [
            json!({ "containers": [{ "name": "app" }, { "name": SIDECAR_CONTAINER }] }),
            json!({ "containers": [{ "name": "app" }], "initContainers": [{ "name": SIDECAR_CONTAINER }] }),
        ] {
            let p = opted_in(
                json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/mode": "bad" }),
                spec,
            );
            assert_eq!(plan(&pod(p), &template()), Ok(Outcome::AlreadyInjected));
        }
    }

    #[test]
    fn injecting_twice_changes_nothing_the_second_time() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/ports": "17001=east" }),
            json!({ "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let once = apply(&p, &patch);
        assert_eq!(plan(&pod(once), &template()), Ok(Outcome::AlreadyInjected));
    }

    #[test]
    fn native_mode_puts_the_sidecar_first_among_init_containers() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true" }),
            json!({ "initContainers": [{ "name": "migrate" }], "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let init = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], SIDECAR_CONTAINER);
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert_eq!(
            init[0]["startupProbe"]["exec"]["command"],
            json!(["tunnel-sidecar", "probe", "readyz"])
        );
        assert_eq!(
            init[0]["livenessProbe"]["exec"]["command"],
            json!(["tunnel-sidecar", "probe", "healthz"])
        );
        assert!(init[0]["startupProbe"].get("httpGet").is_none());
        // The probes ask loopback, where the admin port listens.
        assert!(
            env_of(&init[0]).contains(&("TUNNEL_ADMIN_LISTEN".into(), "127.0.0.1:17090".into())),
            "{:?}",
            env_of(&init[0])
        );
        assert_eq!(init[1]["name"], "migrate");
        assert!(env_of(&init[1]).iter().any(|(n, _)| n == "HTTP_PROXY"));
        assert_eq!(out["spec"]["containers"][0]["name"], "app");
    }

    #[test]
    fn legacy_mode_puts_the_sidecar_first_among_containers() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/mode": "legacy" }),
            json!({ "initContainers": [{ "name": "migrate" }], "containers": [{ "name": "app" }] }),
        );
        let (patch, warnings) = injected(&p);
        assert!(warnings.is_empty(), "{warnings:?}");
        let out = apply(&p, &patch);
        let containers = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers[0]["name"], SIDECAR_CONTAINER);
        assert!(containers[0].get("restartPolicy").is_none());
        assert_eq!(
            containers[0]["lifecycle"]["postStart"]["exec"]["command"],
            json!(["tunnel-sidecar", "wait-ready"])
        );
        assert_eq!(containers[1]["name"], "app");
        assert!(
            env_of(&containers[1])
                .iter()
                .any(|(n, _)| n == "HTTP_PROXY")
        );
        // Init containers run before a legacy sidecar exists.
        assert!(out["spec"]["initContainers"][0].get("env").is_none());
        assert_eq!(
            out["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION],
            "app"
        );
    }

    #[test]
    fn proxy_variables_the_pod_sets_are_kept_by_pair() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/ports": "17001=east" }),
            json!({ "containers": [{ "name": "app", "env": [
                { "name": "HTTP_PROXY", "value": "http://corp-proxy:3128" },
                { "name": "no_proxy", "value": "internal.example.com" },
                { "name": "CLUSTER_TUNNEL_EAST_ADDR", "value": "mine" },
            ] }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let env = env_of(&out["spec"]["containers"][0]);
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "HTTP_PROXY",
                "no_proxy",
                "CLUSTER_TUNNEL_EAST_ADDR",
                "HTTPS_PROXY",
                "https_proxy",
                "CLUSTER_TUNNEL_EAST_KUBERNETES_DEFAULT_SVC_443_ADDR",
            ]
        );
        assert_eq!(env[0].1, "http://corp-proxy:3128");
        assert_eq!(env[2].1, "mine");
        assert_eq!(env[3].1, "http://127.0.0.1:17080");
    }

    #[test]
    fn set_proxy_env_false_keeps_only_the_cluster_addresses() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/set-proxy-env": "false", "cluster-tunnel.io/ports": "17001=east" }),
            json!({ "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let names: Vec<String> = env_of(&out["spec"]["containers"][0])
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("CLUSTER_TUNNEL_")),
            "{names:?}"
        );
    }

    #[test]
    fn conflicts_are_refused_with_what_to_change() {
        let cases = [
            (
                json!({ "hostNetwork": true, "containers": [{ "name": "app" }] }),
                "hostNetwork",
            ),
            (
                json!({ "containers": [{ "name": "app" }], "volumes": [{ "name": TOKEN_VOLUME, "emptyDir": {} }] }),
                "rename it",
            ),
            (
                json!({ "containers": [{ "name": "app", "ports": [{ "containerPort": 17080 }] }] }),
                "cluster-tunnel.io/proxy-port",
            ),
            (
                json!({ "containers": [{ "name": "app", "ports": [{ "containerPort": 17001 }] }] }),
                "cluster-tunnel.io/ports",
            ),
        ];
        for (spec, why) in cases {
            let p = opted_in(
                json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/ports": "17001=east" }),
                spec.clone(),
            );
            let err = plan(&pod(p), &template()).unwrap_err();
            assert!(err.to_string().contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn a_port_a_mesh_holds_is_refused_naming_the_mesh() {
        // istio-proxy declares only 15090, but listens on 15001 (outbound).
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/ports": "15001=east" }),
            json!({
                "initContainers": [{ "name": "istio-init" }],
                "containers": [
                    { "name": "app" },
                    { "name": "istio-proxy", "ports": [{ "containerPort": 15090 }] },
                ],
            }),
        );
        let err = plan(&pod(p), &template()).unwrap_err().to_string();
        assert!(err.contains("port 15001"), "{err}");
        assert!(err.contains("\"istio-proxy\" (Istio's)"), "{err}");
        assert!(
            err.contains("choose another with cluster-tunnel.io/ports"),
            "{err}"
        );
        // Linkerd's outbound port, chosen as the proxy port.
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/proxy-port": "4140" }),
            json!({ "containers": [{ "name": "linkerd-proxy" }, { "name": "app" }] }),
        );
        let err = plan(&pod(p), &template()).unwrap_err().to_string();
        assert!(err.contains("\"linkerd-proxy\" (Linkerd's)"), "{err}");
        assert!(err.contains("cluster-tunnel.io/proxy-port"), "{err}");
    }

    #[test]
    fn the_default_ports_fit_beside_istio_and_linkerd() {
        for spec in [
            json!({ "initContainers": [{ "name": "istio-init" }, { "name": "istio-proxy", "restartPolicy": "Always" }],
                    "containers": [{ "name": "app" }] }),
            json!({ "initContainers": [{ "name": "linkerd-init" }],
                    "containers": [{ "name": "linkerd-proxy", "ports": [{ "containerPort": 4143 }, { "containerPort": 4191 }] }, { "name": "app" }] }),
        ] {
            let p = opted_in(json!({ "cluster-tunnel.io/inject": "true" }), spec.clone());
            assert!(
                matches!(plan(&pod(p), &template()), Ok(Outcome::Injected { .. })),
                "{spec}"
            );
        }
    }

    #[test]
    fn the_sidecar_follows_a_mesh_s_leading_containers_which_get_no_proxy_env() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true" }),
            json!({
                "initContainers": [{ "name": "istio-init" }, { "name": "istio-proxy", "restartPolicy": "Always" }, { "name": "migrate" }],
                "containers": [{ "name": "app" }],
            }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let init = out["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["istio-init", "istio-proxy", SIDECAR_CONTAINER, "migrate"]
        );
        assert!(init[0].get("env").is_none() && init[1].get("env").is_none());
        assert!(env_of(&init[3]).iter().any(|(n, _)| n == "HTTP_PROXY"));

        // Legacy: after linkerd-proxy, before the app, which stays kubectl's default.
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/mode": "legacy" }),
            json!({ "containers": [{ "name": "linkerd-proxy" }, { "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let containers = out["spec"]["containers"].as_array().unwrap();
        let names: Vec<&str> = containers
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["linkerd-proxy", SIDECAR_CONTAINER, "app"]);
        assert!(containers[0].get("env").is_none());
        assert_eq!(
            out["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION],
            "app"
        );
    }

    #[test]
    fn a_mesh_added_after_the_sidecar_is_checked_on_reinvocation() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/ports": "17001=east" }),
            json!({ "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let mut once = apply(&p, &patch);
        // Istio's webhook runs next and adds its containers.
        once["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({ "name": "istio-init" }));
        once["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "name": "istio-proxy", "ports": [{ "containerPort": 15090 }] }));
        assert_eq!(
            plan(&pod(once.clone()), &template()),
            Ok(Outcome::AlreadyInjected)
        );
        // A sidecar injected with Istio's ports (an older injector's
        // defaults: admin 15090, proxy 15080 is fine) clashes.
        let sidecar = once["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c["name"] == SIDECAR_CONTAINER)
            .unwrap();
        for var in sidecar["env"].as_array_mut().unwrap() {
            if var["name"] == "TUNNEL_ADMIN_LISTEN" {
                var["value"] = json!("0.0.0.0:15090");
            }
        }
        let err = plan(&pod(once.clone()), &template())
            .unwrap_err()
            .to_string();
        assert!(err.contains("port 15090"), "{err}");
        assert!(err.contains("was added after the sidecar"), "{err}");
        assert!(err.contains("--sidecar-admin-port"), "{err}");
        // Without the variables, the sidecar's defaults count.
        let sidecar = once["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == SIDECAR_CONTAINER)
            .unwrap();
        once["spec"]["initContainers"][sidecar]["env"] = json!([]);
        once["spec"]["containers"][0]["ports"] = json!([{ "containerPort": 17080 }]);
        let err = plan(&pod(once), &template()).unwrap_err().to_string();
        assert!(err.contains("port 17080"), "{err}");
    }

    #[test]
    fn direct_deny_reaches_the_sidecar() {
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/direct": "deny" }),
            json!({ "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let env = env_of(&out["spec"]["initContainers"][0]);
        assert!(
            env.contains(&("TUNNEL_DIRECT".to_owned(), "deny".to_owned())),
            "{env:?}"
        );
        let p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true" }),
            json!({ "containers": [{ "name": "app" }] }),
        );
        let (patch, _) = injected(&p);
        let out = apply(&p, &patch);
        let env = env_of(&out["spec"]["initContainers"][0]);
        assert!(!env.iter().any(|(n, _)| n == "TUNNEL_DIRECT"), "{env:?}");
    }

    #[test]
    fn a_legacy_jobs_pod_gets_a_warning_about_shutdown() {
        let mut p = opted_in(
            json!({ "cluster-tunnel.io/inject": "true", "cluster-tunnel.io/mode": "legacy" }),
            json!({ "restartPolicy": "Never", "containers": [{ "name": "work" }] }),
        );
        p["metadata"]["labels"] = json!({ "batch.kubernetes.io/job-name": "nightly" });
        let (_, warnings) = injected(&p);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("POST http://127.0.0.1:17090/shutdown"),
            "{warnings:?}"
        );
    }

    /// The sidecar's own configuration code accepts the environment the
    /// injector writes: each `TUNNEL_*` variable becomes the flag that reads
    /// it, and the result resolves.
    #[test]
    fn the_sidecar_accepts_the_environment_it_is_given() {
        use clap::{CommandFactory as _, Parser as _};
        let command = tunnel_sidecar::config::Cli::command();
        let cases = [
            vec![],
            vec![
                (annotations::PORTS, "17001=east,17002=west:[fd00::1]:8443"),
                (annotations::DEFAULT_CLUSTER, "east"),
                (annotations::LOG_LEVEL, "debug"),
            ],
            vec![
                (annotations::PROXY_PORT, "off"),
                (annotations::PORTS, "17001=east"),
                (annotations::DIRECT, "deny"),
            ],
        ];
        let known = [vec![], vec!["east", "west"], vec!["east"]];
        let binds = ["127.0.0.1", "::", "0.0.0.0"];
        for ((annotations, admin_bind), known) in cases.iter().zip(binds).zip(known) {
            let mut t = template();
            t.admin_bind = admin_bind.into();
            let map = annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let options = PodOptions::from_annotations(&map, &t.defaults, t.admin_port).unwrap();
            let container = sidecar_container(&options, &t);
            let mut args = vec!["tunnel-sidecar".to_owned()];
            for var in container.env.iter().flatten() {
                let arg = command
                    .get_arguments()
                    .find(|a| a.get_env().is_some_and(|e| e == var.name.as_str()))
                    .unwrap_or_else(|| panic!("the sidecar reads no variable {}", var.name));
                let flag = format!("--{}", arg.get_long().unwrap());
                let value = var.value.clone().unwrap();
                if arg.get_action().takes_values() {
                    args.extend([flag, value]);
                } else if value == "true" {
                    args.push(flag);
                }
            }
            let cli = tunnel_sidecar::config::Cli::try_parse_from(&args)
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let config = cli.resolve().unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(config.admin_listen.port(), 17090);
            assert_eq!(
                config.admin_listen.ip(),
                admin_bind.parse::<std::net::IpAddr>().unwrap()
            );
            assert_eq!(config.known_clusters, known);
            assert_eq!(config.ports.len(), options.ports.len());
            assert_eq!(config.proxy_listen.map(|a| a.port()), options.proxy_port);
            assert_eq!(
                config.tls.key,
                std::path::Path::new(TLS_DIR).join("tls.key")
            );
            // The exec probes are commands of the sidecar, given the same
            // environment (the command's first word is the binary).
            for probe in [&container.startup_probe, &container.liveness_probe]
                .into_iter()
                .flatten()
            {
                let command = probe.exec.as_ref().unwrap().command.clone().unwrap();
                let mut with_env = args.clone();
                with_env.extend(command[1..].iter().cloned());
                let cli = tunnel_sidecar::config::Cli::try_parse_from(&with_env)
                    .unwrap_or_else(|e| panic!("{with_env:?}: {e}"));
                assert!(
                    matches!(
                        cli.command,
                        Some(tunnel_sidecar::config::Command::Probe { .. })
                    ),
                    "{command:?}"
                );
            }
        }
    }

    #[test]
    fn missing_annotations_map_is_added_whole() {
        let mut ops = Vec::new();
        add_map_entries(
            &mut ops,
            &["metadata", "annotations"],
            false,
            &[("a/b", "1".into())],
        );
        let mut doc = json!({ "metadata": {} });
        json_patch::patch(&mut doc, &ops).unwrap();
        assert_eq!(
            doc,
            json!({ "metadata": { "annotations": { "a/b": "1" } } })
        );
    }
}
