//! The `ManifestWork` (`work.open-cluster-management.io/v1`) that delivers an
//! agent to one managed cluster. OCM's work agent applies it in the managed
//! cluster and removes all of it when the work is deleted.
//!
//! **No private key travels.** The work carries the hub's CA certificate
//! (public) in a ConfigMap; the agent's key is made in the managed cluster by
//! OCM's registration agent, which sends a certificate request to the hub
//! (signed by [`crate::csr`]) and keeps key and certificate in the Secret
//! [`REGISTRATION_SECRET`], renewed when a fifth of its lifetime is left. The
//! agent mounts that Secret and reloads the files when they change.
//!
//! The rest: the namespace, a service account with a Role that lets the agent
//! renew its health Lease (named after the addon, in the install namespace,
//! which OCM's registration agent reads to set the addon `Available`), the
//! Deployment (restricted security context, resources, anti-affinity, and
//! what the `AddOnDeploymentConfig` says) and a PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde_json::{Value, json};

use crate::deployment_config::AgentOverrides;
use tunnel_api::configuration::AgentSpec;
use tunnel_api::ocm::{ADDON_LABEL, ADDON_NAME, CONFIG_SPEC_HASH_ANNOTATION, REGISTRATION_SECRET};
use tunnel_api::pod::{NONROOT_USER, TLS_DIR, restricted_security_context};

pub use tunnel_api::ocm::manifest_work_resource;

/// Name of the work in each cluster's namespace.
pub const WORK_NAME: &str = "cluster-tunnel-agent";
/// Name of the agent's Deployment, service account, Role and PDB.
pub const AGENT_NAME: &str = "cluster-tunnel-agent";
/// ConfigMap with the hub's CA certificate.
pub const HUB_CA_CONFIGMAP: &str = "cluster-tunnel-hub-ca";
/// Port of the agent's admin endpoints.
pub const AGENT_ADMIN_PORT: u16 = 8093;
/// Where the agent finds [`HUB_CA_CONFIGMAP`]'s `ca.crt` (the agent chart
/// mounts its CA at the same path).
const HUB_CA_DIR: &str = "/etc/cluster-tunnel/ca";

/// Where the agents dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAddress {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Name the server certificate carries (a load balancer's address is
    /// not in it; the Service's in-cluster name is).
    pub server_name: String,
}

/// What the work is built from.
#[derive(Debug, Clone)]
pub struct AgentWorkInput<'a> {
    /// The managed cluster.
    pub cluster: &'a str,
    /// The configuration's agent section.
    pub spec: &'a AgentSpec,
    /// Where the agents dial.
    pub hub: &'a HubAddress,
    /// The hub's CA certificate (PEM), which the server certificate chains to.
    pub ca_pem: &'a str,
    /// What the `AddOnDeploymentConfig` changes.
    pub overrides: &'a AgentOverrides,
    /// The configurations' spec hashes (OCM's rollout bookkeeping).
    pub config_hashes: &'a BTreeMap<String, String>,
    /// Owner reference (the `ManagedClusterAddOn`).
    pub owner: Option<Value>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The agent's install namespace: the deployment config's, else the configuration's.
pub fn install_namespace(spec: &AgentSpec, overrides: &AgentOverrides) -> String {
    overrides
        .namespace
        .clone()
        .unwrap_or_else(|| spec.namespace.clone())
}

/// The default resources of the agent container (the agent chart's).
pub fn default_resources() -> ResourceRequirements {
    serde_json::from_value(json!({
        "requests": { "cpu": "50m", "memory": "64Mi" },
        "limits": { "memory": "512Mi" },
    }))
    .expect("valid resources")
}

/// The work for one cluster (in the cluster's namespace on the hub).
pub fn manifest_work(input: &AgentWorkInput<'_>) -> Value {
    let AgentWorkInput {
        cluster,
        spec,
        hub,
        ca_pem,
        overrides,
        config_hashes,
        ..
    } = input;
    let ns = install_namespace(spec, overrides);
    let selector = json!({ "app.kubernetes.io/name": AGENT_NAME });
    let labels = json!({ "app.kubernetes.io/name": AGENT_NAME, "app.kubernetes.io/managed-by": "tunnel-manager" });
    let mut args = vec![
        format!("--cluster={cluster}"),
        format!("--server={}:{}", hub.host, hub.port),
        format!("--server-name={}", hub.server_name),
        format!("--tls-cert={TLS_DIR}/tls.crt"),
        format!("--tls-key={TLS_DIR}/tls.key"),
        format!("--ca={HUB_CA_DIR}/ca.crt"),
        format!("--admin-listen=0.0.0.0:{AGENT_ADMIN_PORT}"),
        format!("--addon-lease={ADDON_NAME}"),
    ];
    args.extend(spec.allow.iter().map(|a| format!("--allow={a}")));
    if let Some(level) = &overrides.log_level {
        args.push(format!("--log-level={level}"));
    }
    let mut env = vec![
        json!({ "name": "TUNNEL_AGENT_ID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
        json!({ "name": "TUNNEL_ADDON_LEASE_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } }),
    ];
    if let Some(p) = &overrides.proxy {
        for (name, value) in [
            ("HTTP_PROXY", &p.http_proxy),
            ("HTTPS_PROXY", &p.https_proxy),
            ("NO_PROXY", &p.no_proxy),
        ] {
            if let Some(v) = value {
                env.push(json!({ "name": name, "value": v }));
            }
        }
    }
    let resources = overrides
        .resources
        .clone()
        .or_else(|| spec.resources.clone())
        .unwrap_or_else(default_resources);
    let replicas = overrides.replicas.unwrap_or(spec.replicas);
    let mut pod_spec = json!({
        "serviceAccountName": AGENT_NAME,
        // The token renews the health Lease; the Role allows nothing else.
        "automountServiceAccountToken": true,
        "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
        "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": { "topologyKey": "kubernetes.io/hostname", "labelSelector": { "matchLabels": selector } },
        }] } },
        "containers": [{
            "name": "agent",
            "image": overrides.image(&spec.image),
            "args": args,
            "env": env,
            "ports": [{ "name": "admin", "containerPort": AGENT_ADMIN_PORT }],
            "readinessProbe": { "httpGet": { "path": "/readyz", "port": "admin" }, "periodSeconds": 5 },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "admin" }, "periodSeconds": 10 },
            "resources": resources,
            "securityContext": restricted_security_context(NONROOT_USER),
            "volumeMounts": [
                { "name": "tls", "mountPath": TLS_DIR, "readOnly": true },
                { "name": "ca", "mountPath": HUB_CA_DIR, "readOnly": true },
            ],
        }],
        "volumes": [
            // Made by OCM's registration agent once the hub signed the agent's request.
            { "name": "tls", "secret": { "secretName": REGISTRATION_SECRET } },
            { "name": "ca", "configMap": { "name": HUB_CA_CONFIGMAP } },
        ],
    });
    if !overrides.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(overrides.node_selector);
    }
    if !overrides.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(overrides.tolerations);
    }
    let manifests = json!([
        { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } },
        {
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": AGENT_NAME, "namespace": ns, "labels": labels },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": { "name": AGENT_NAME, "namespace": ns, "labels": labels },
            "rules": [
                // The health Lease, by name. It is made by a create (POST), which names no
                // object to RBAC, so that one verb is not limited by name.
                { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [ADDON_NAME], "verbs": ["get", "update"] },
                { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"] },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": { "name": AGENT_NAME, "namespace": ns, "labels": labels },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_NAME },
            "subjects": [{ "kind": "ServiceAccount", "name": AGENT_NAME, "namespace": ns }],
        },
        {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": HUB_CA_CONFIGMAP, "namespace": ns, "labels": labels },
            "data": { "ca.crt": ca_pem },
        },
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": AGENT_NAME, "namespace": ns, "labels": labels },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": selector },
                "template": {
                    "metadata": {
                        "labels": labels,
                        // A new hub CA rolls the agents.
                        "annotations": { "cluster-tunnel.io/ca-sha256": sha256_hex(ca_pem.as_bytes()) },
                    },
                    "spec": pod_spec,
                },
            },
        },
        {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": { "name": AGENT_NAME, "namespace": ns, "labels": labels },
            "spec": { "maxUnavailable": spec.pdb_max_unavailable, "selector": { "matchLabels": selector } },
        },
    ]);
    let mut metadata = json!({
        "name": WORK_NAME,
        "namespace": cluster,
        "labels": { "app.kubernetes.io/managed-by": "tunnel-manager", ADDON_LABEL: ADDON_NAME },
    });
    if !config_hashes.is_empty() {
        metadata["annotations"] = json!({
            CONFIG_SPEC_HASH_ANNOTATION: serde_json::to_string(config_hashes).expect("a map serializes"),
        });
    }
    if let Some(owner) = &input.owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    // The configured namespace is the agent's own and goes with it (and
    // with it the key Secret). One a deployment config names may be shared
    // (OCM's `open-cluster-management-agent-addon`): it is left in place;
    // the agent's objects in it still go.
    let delete_option = if ns == spec.namespace {
        json!({ "propagationPolicy": "Foreground" })
    } else {
        json!({
            "propagationPolicy": "SelectivelyOrphan",
            "selectivelyOrphans": { "orphaningRules": [{ "group": "", "resource": "namespaces", "name": ns }] },
        })
    };
    json!({
        "apiVersion": "work.open-cluster-management.io/v1",
        "kind": "ManifestWork",
        "metadata": metadata,
        "spec": {
            "workload": { "manifests": manifests },
            "deleteOption": delete_option,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentSpec {
        serde_json::from_value(json!({ "image": "ghcr.io/cluster-tunnel/tunnel-agent:1", "replicas": 3, "allow": ["*.svc:443"] }))
            .unwrap()
    }

    fn hub() -> HubAddress {
        HubAddress {
            host: "hub.example.com".into(),
            port: 443,
            server_name: "hub.example.com".into(),
        }
    }

    fn work(overrides: &AgentOverrides, hashes: &BTreeMap<String, String>) -> Value {
        manifest_work(&AgentWorkInput {
            cluster: "east",
            spec: &spec(),
            hub: &hub(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
            overrides,
            config_hashes: hashes,
            owner: None,
        })
    }

    fn manifest<'a>(work: &'a Value, kind: &str) -> &'a Value {
        work["spec"]["workload"]["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    }

    #[test]
    fn the_work_carries_no_private_key_only_the_hub_ca() {
        let w = work(&AgentOverrides::default(), &BTreeMap::new());
        let text = w.to_string();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(!text.contains("tls.key\":"), "{text}");
        let kinds: Vec<&str> = w["spec"]["workload"]["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "ConfigMap",
                "Deployment",
                "PodDisruptionBudget"
            ]
        );
        assert!(
            manifest(&w, "ConfigMap")["data"]["ca.crt"]
                .as_str()
                .unwrap()
                .contains("CA")
        );
        // The key and certificate come from the Secret OCM's registration agent keeps.
        let d = manifest(&w, "Deployment");
        assert_eq!(
            d["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
            REGISTRATION_SECRET
        );
        assert_eq!(w["metadata"]["labels"][ADDON_LABEL], ADDON_NAME);
        assert!(w["metadata"]["annotations"].is_null());
        // The delivered objects are valid k8s-openapi objects.
        let _: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(d.clone()).unwrap();
        let _: k8s_openapi::api::policy::v1::PodDisruptionBudget =
            serde_json::from_value(manifest(&w, "PodDisruptionBudget").clone()).unwrap();
        let _: k8s_openapi::api::rbac::v1::Role =
            serde_json::from_value(manifest(&w, "Role").clone()).unwrap();
    }

    #[test]
    fn the_agent_is_restricted_sized_spread_and_renews_its_lease() {
        let w = work(&AgentOverrides::default(), &BTreeMap::new());
        let d = manifest(&w, "Deployment");
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["resources"], json!(default_resources()));
        assert!(pod["affinity"]["podAntiAffinity"].is_object());
        let args = c["args"].to_string();
        assert!(args.contains("--addon-lease=cluster-tunnel"), "{args}");
        assert!(args.contains("--allow=*.svc:443"), "{args}");
        assert!(
            c["env"]
                .to_string()
                .contains("TUNNEL_ADDON_LEASE_NAMESPACE")
        );
        // The Role renews the Lease by name, and nothing else.
        let role = manifest(&w, "Role");
        assert_eq!(role["rules"][0]["resourceNames"], json!(["cluster-tunnel"]));
        assert_eq!(role["rules"].as_array().unwrap().len(), 2);
        assert_eq!(
            manifest(&w, "PodDisruptionBudget")["spec"]["maxUnavailable"],
            1
        );
    }

    #[test]
    fn the_deployment_config_changes_namespace_image_placement_proxy_resources_and_replicas() {
        let overrides = AgentOverrides {
            namespace: Some("tunnel".into()),
            node_selector: BTreeMap::from([("role".into(), "infra".into())]),
            tolerations: vec![
                serde_json::from_value(json!({ "key": "infra", "operator": "Exists" })).unwrap(),
            ],
            registries: vec![tunnel_api::ocm::ImageMirror {
                source: "ghcr.io/cluster-tunnel".into(),
                mirror: "mirror.example.com".into(),
            }],
            proxy: Some(tunnel_api::ocm::ProxyConfig {
                https_proxy: Some("http://proxy:3128".into()),
                ..Default::default()
            }),
            resources: Some(serde_json::from_value(json!({ "requests": { "cpu": "1" } })).unwrap()),
            replicas: Some(5),
            log_level: Some("debug".into()),
        };
        let hashes = BTreeMap::from([(
            "addondeploymentconfigs.addon.open-cluster-management.io/fleet/agents".to_string(),
            "abc".to_string(),
        )]);
        let w = work(&overrides, &hashes);
        // A namespace the deployment config names may be shared: removing the agent leaves it.
        assert_eq!(
            w["spec"]["deleteOption"],
            json!({ "propagationPolicy": "SelectivelyOrphan", "selectivelyOrphans": { "orphaningRules": [{ "group": "", "resource": "namespaces", "name": "tunnel" }] } })
        );
        assert_eq!(
            work(&AgentOverrides::default(), &hashes)["spec"]["deleteOption"],
            json!({ "propagationPolicy": "Foreground" })
        );
        for m in w["spec"]["workload"]["manifests"].as_array().unwrap() {
            if m["kind"] == "Namespace" {
                assert_eq!(m["metadata"]["name"], "tunnel");
            } else {
                assert_eq!(m["metadata"]["namespace"], "tunnel", "{}", m["kind"]);
            }
        }
        let d = manifest(&w, "Deployment");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["image"],
            "mirror.example.com/tunnel-agent:1"
        );
        assert_eq!(pod["nodeSelector"]["role"], "infra");
        assert_eq!(pod["tolerations"][0]["key"], "infra");
        assert_eq!(pod["containers"][0]["resources"]["requests"]["cpu"], "1");
        assert_eq!(d["spec"]["replicas"], 5);
        let env = pod["containers"][0]["env"].to_string();
        assert!(
            env.contains("HTTPS_PROXY") && env.contains("http://proxy:3128"),
            "{env}"
        );
        assert!(
            pod["containers"][0]["args"]
                .to_string()
                .contains("--log-level=debug")
        );
        let annotation: BTreeMap<String, String> = serde_json::from_str(
            w["metadata"]["annotations"][CONFIG_SPEC_HASH_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(annotation, hashes);
    }
}
