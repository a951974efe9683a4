//! The `ManifestWork` (`work.open-cluster-management.io/v1`) that delivers an
//! agent to one managed cluster: its namespace, service account, certificate
//! Secret and Deployment. The work agent of open-cluster-management applies
//! it in the managed cluster and removes it all when the work is deleted.
//!
//! The agent reads its certificate at start, so the pod template carries the
//! certificate's SHA-256: a renewed certificate rolls the agents.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use crate::crd::AgentSpec;

/// Name of the work in each cluster's namespace.
pub const WORK_NAME: &str = "cluster-tunnel-agent";
/// Port of the agent's admin endpoints.
pub const AGENT_ADMIN_PORT: u16 = 8093;

/// `ManifestWork`, for kube's dynamic API.
pub fn manifest_work_resource() -> ApiResource {
    ApiResource {
        group: "work.open-cluster-management.io".into(),
        version: "v1".into(),
        api_version: "work.open-cluster-management.io/v1".into(),
        kind: "ManifestWork".into(),
        plural: "manifestworks".into(),
    }
}

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

/// The agent's certificate, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentCert {
    /// Certificate.
    pub cert: Vec<u8>,
    /// Key.
    pub key: Vec<u8>,
    /// The hub's CA.
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for AgentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCert { .. }")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The work for `cluster` (in the cluster's namespace on the hub).
pub fn manifest_work(
    cluster: &str,
    spec: &AgentSpec,
    hub: &HubAddress,
    cert: &AgentCert,
    owner: Option<Value>,
) -> Value {
    let ns = &spec.namespace;
    let labels = json!({ "app.kubernetes.io/name": "cluster-tunnel-agent", "app.kubernetes.io/managed-by": "tunnel-manager" });
    let mut args = vec![
        format!("--cluster={cluster}"),
        format!("--server={}:{}", hub.host, hub.port),
        format!("--server-name={}", hub.server_name),
        "--tls-cert=/etc/cluster-tunnel/tls/tls.crt".into(),
        "--tls-key=/etc/cluster-tunnel/tls/tls.key".into(),
        "--ca=/etc/cluster-tunnel/tls/ca.crt".into(),
        format!("--admin-listen=0.0.0.0:{AGENT_ADMIN_PORT}"),
    ];
    args.extend(spec.allow.iter().map(|a| format!("--allow={a}")));
    let manifests = json!([
        { "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } },
        {
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": "cluster-tunnel-agent", "namespace": ns, "labels": labels },
            "automountServiceAccountToken": false,
        },
        {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": { "name": "cluster-tunnel-agent-tls", "namespace": ns, "labels": labels },
            "data": {
                "tls.crt": BASE64.encode(&cert.cert),
                "tls.key": BASE64.encode(&cert.key),
                "ca.crt": BASE64.encode(&cert.ca),
            },
        },
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "cluster-tunnel-agent", "namespace": ns, "labels": labels },
            "spec": {
                "replicas": spec.replicas,
                "selector": { "matchLabels": { "app.kubernetes.io/name": "cluster-tunnel-agent" } },
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": { "cluster-tunnel.io/certificate-sha256": sha256_hex(&cert.cert) },
                    },
                    "spec": {
                        "serviceAccountName": "cluster-tunnel-agent",
                        "automountServiceAccountToken": false,
                        "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": { "matchLabels": { "app.kubernetes.io/name": "cluster-tunnel-agent" } },
                            },
                        }] } },
                        "containers": [{
                            "name": "agent",
                            "image": spec.image,
                            "args": args,
                            "env": [{ "name": "TUNNEL_AGENT_ID", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                            "ports": [{ "name": "admin", "containerPort": AGENT_ADMIN_PORT }],
                            "readinessProbe": { "httpGet": { "path": "/readyz", "port": "admin" }, "periodSeconds": 5 },
                            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "admin" }, "periodSeconds": 10 },
                            "securityContext": {
                                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                "capabilities": { "drop": ["ALL"] }, "seccompProfile": { "type": "RuntimeDefault" },
                            },
                            "volumeMounts": [{ "name": "tls", "mountPath": "/etc/cluster-tunnel/tls", "readOnly": true }],
                        }],
                        "volumes": [{ "name": "tls", "secret": { "secretName": "cluster-tunnel-agent-tls" } }],
                    },
                },
            },
        },
    ]);
    let mut metadata = json!({
        "name": WORK_NAME,
        "namespace": cluster,
        "labels": { "app.kubernetes.io/managed-by": "tunnel-manager" },
    });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({
        "apiVersion": "work.open-cluster-management.io/v1",
        "kind": "ManifestWork",
        "metadata": metadata,
        "spec": {
            "workload": {
                "manifests": manifests,
            },
            "deleteOption": { "propagationPolicy": "Foreground" },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_carries_the_agent_and_rolls_it_when_the_certificate_changes() {
        let spec: AgentSpec = serde_json::from_value(
            json!({ "image": "agent:1", "replicas": 3, "allow": ["*.svc:443"] }),
        )
        .unwrap();
        let hub = HubAddress {
            host: "hub.example.com".into(),
            port: 443,
            server_name: "hub.example.com".into(),
        };
        let cert = AgentCert {
            cert: b"cert".to_vec(),
            key: b"key".to_vec(),
            ca: b"ca".to_vec(),
        };
        let work = manifest_work("east", &spec, &hub, &cert, None);
        assert_eq!(work["metadata"]["namespace"], "east");
        let manifests = work["spec"]["workload"]["manifests"].as_array().unwrap();
        let kinds: Vec<&str> = manifests
            .iter()
            .map(|m| m["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["Namespace", "ServiceAccount", "Secret", "Deployment"]
        );
        let deployment = &manifests[3];
        assert_eq!(deployment["spec"]["replicas"], 3);
        let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(args.as_array().unwrap().contains(&json!("--cluster=east")));
        assert!(
            args.as_array()
                .unwrap()
                .contains(&json!("--server=hub.example.com:443"))
        );
        assert!(
            args.as_array()
                .unwrap()
                .contains(&json!("--allow=*.svc:443"))
        );
        let sha = |w: &Value| {
            w["spec"]["workload"]["manifests"][3]["spec"]["template"]["metadata"]["annotations"]["cluster-tunnel.io/certificate-sha256"].clone()
        };
        assert_eq!(sha(&work).as_str().unwrap().len(), 64);
        let renewed = AgentCert {
            cert: b"cert2".to_vec(),
            ..cert.clone()
        };
        assert_ne!(
            sha(&work),
            sha(&manifest_work("east", &spec, &hub, &renewed, None))
        );
        // The delivered Deployment is a valid k8s-openapi Deployment.
        let _: k8s_openapi::api::apps::v1::Deployment =
            serde_json::from_value(deployment.clone()).unwrap();
    }
}
