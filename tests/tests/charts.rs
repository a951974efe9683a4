//! The Helm charts, rendered offline by Helm's own SDK (the PyPI package
//! `helm-python-sdk`) with several value sets, linted, and every object
//! validated against the Kubernetes schemas (`kubernetes-validate`, strict)
//! or, for our custom resources, against the chart's CRD; then the flags the
//! templates pass are checked against the real binaries' command lines, and
//! the chart's CRD against the one generated from the Rust types.
//!
//! Needs python3 with `pip install helm-python-sdk kubernetes-validate`
//! (`.ci/run` installs them); without them the tests say they are skipped,
//! except under CI, where they fail.

use std::process::Command;

use clap::CommandFactory as _;
use serde_json::{Value, json};

use tunnel_tests::repo_root as root;

struct Rendered {
    objects: Vec<Value>,
    /// What `helm install` prints (NOTES.txt).
    notes: String,
}

impl Rendered {
    fn kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }
    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }
    fn one(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }
}

/// The Kubernetes version charts are rendered for unless a test says otherwise.
const KUBE_VERSION: &str = "1.33.0";

/// Renders `chart` with `values`; `None` when the tools are missing (and not in CI).
fn render(chart: &str, values: &Value) -> Option<Result<Rendered, String>> {
    render_at(chart, values, KUBE_VERSION)
}

/// Renders `chart` with `values` for a cluster of `kube_version` (lint,
/// `.Capabilities.KubeVersion` and the schemas validated against).
fn render_at(chart: &str, values: &Value, kube_version: &str) -> Option<Result<Rendered, String>> {
    let script = root().join("charts/tests/render.py");
    let out = match Command::new("python3")
        .arg(&script)
        .arg(root().join("charts").join(chart))
        .arg(values.to_string())
        .arg(kube_version)
        .output()
    {
        Ok(out) => out,
        Err(e) => return skip(&format!("python3 cannot be run: {e}")),
    };
    if out.status.code() == Some(3) {
        return skip(&String::from_utf8_lossy(&out.stderr));
    }
    if !out.status.success() {
        return Some(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let report: Value = serde_json::from_slice(&out.stdout).expect("render.py prints JSON");
    assert_eq!(
        report["lint"],
        json!([]),
        "helm lint of {chart} with {values}"
    );
    assert_eq!(
        report["invalid"],
        json!([]),
        "schema validation of {chart} with {values}"
    );
    for unchecked in report["unchecked"].as_array().unwrap() {
        let unchecked = unchecked.as_str().unwrap();
        assert!(
            [
                "ServiceMonitor ",
                "Certificate cert-manager.io/",
                "Issuer cert-manager.io/"
            ]
            .iter()
            .any(|k| unchecked.starts_with(k)),
            "no schema for {unchecked}"
        );
    }
    Some(Ok(Rendered {
        objects: report["objects"].as_array().unwrap().clone(),
        notes: report["notes"].as_str().unwrap_or_default().to_owned(),
    }))
}

fn skip<T>(why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("chart tests need python3 with helm-python-sdk and kubernetes-validate: {why}");
    }
    eprintln!(
        "SKIPPED: chart tests need python3 with `pip install helm-python-sdk kubernetes-validate`: {why}"
    );
    None
}

/// Every `--flag` a container passes exists in the binary's command line,
/// and every `TUNNEL_*` variable it sets is one the binary reads.
fn check_flags(container: &Value, cmd: &clap::Command) {
    let longs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let envs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let name = &container["name"];
    for arg in container["args"].as_array().into_iter().flatten() {
        let arg = arg.as_str().unwrap();
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap();
            assert!(
                longs.iter().any(|l| l == flag),
                "container {name} passes --{flag}, which {} does not have",
                cmd.get_name()
            );
        }
    }
    for env in container["env"].as_array().into_iter().flatten() {
        let var = env["name"].as_str().unwrap();
        if var.starts_with("TUNNEL_") {
            assert!(
                envs.iter().any(|e| e == var),
                "container {name} sets {var}, which {} does not read",
                cmd.get_name()
            );
        }
    }
}

fn command_for(container: &str) -> clap::Command {
    match container {
        "server" => tunnel_server::cli::Cli::command(),
        "agent" => tunnel_agent::cli::Cli::command(),
        "injector" => tunnel_injector::cli::Cli::command(),
        "manager" => tunnel_manager::cli::Cli::command()
            .find_subcommand("run")
            .unwrap()
            .clone(),
        other => panic!("no binary known for container {other}"),
    }
}

fn check_every_deployment(r: &Rendered) {
    for d in r.kind("Deployment") {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            let mut cmd = command_for(c["name"].as_str().unwrap());
            // A subcommand's own args: `run` is the manager's first argument.
            let args: Vec<Value> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| *a != "run")
                .cloned()
                .collect();
            let mut c = c.clone();
            c["args"] = Value::Array(args);
            cmd.build();
            check_flags(&c, &cmd);
        }
    }
}

/// The hook Jobs and the test Pod run `tunnel-manager <command>` with flags it has.
fn check_every_job(r: &Rendered) {
    let pods = r
        .kind("Job")
        .into_iter()
        .map(|j| &j["spec"]["template"]["spec"]);
    for spec in pods.chain(r.kind("Pod").into_iter().map(|p| &p["spec"])) {
        for c in spec["containers"].as_array().unwrap() {
            let args = c["args"].as_array().unwrap();
            let command = args[0].as_str().unwrap();
            assert!(
                ["uninstall", "apply-crds", "health"].contains(&command),
                "{spec}"
            );
            let mut cmd = tunnel_manager::cli::Cli::command()
                .find_subcommand(command)
                .unwrap()
                .clone();
            cmd.build();
            let mut c = c.clone();
            c["args"] = Value::Array(args[1..].to_vec());
            check_flags(&c, &cmd);
        }
    }
}

/// Writes Kubernetes cannot limit by name, each with the reason the chart gives:
/// (kind of role, role, resource).
const UNNAMED_WRITES: [(&str, &str, &str); 8] = [
    // Held only to grant it to the servers, which write every policy's status.
    (
        "ClusterRole",
        "cluster-tunnel-manager",
        "tunnelpolicies/status",
    ),
    // Request names are generated; the signers rule limits the signer.
    (
        "ClusterRole",
        "cluster-tunnel-manager",
        "certificatesigningrequests/approval",
    ),
    (
        "ClusterRole",
        "cluster-tunnel-manager",
        "certificatesigningrequests/status",
    ),
    // A review, not an object; held to grant it to the servers.
    ("ClusterRole", "cluster-tunnel-manager", "tokenreviews"),
    // The signer CA is created once, by a create that must fail when another
    // replica made it first (POST names no object to RBAC); the admission
    // policy keeps it a kubernetes.io/tls Secret.
    ("Role", "cluster-tunnel-manager", "secrets"),
    // Leader election: taking the Lease is such a create too.
    ("Role", "cluster-tunnel-manager", "leases"),
    // Older versions' finalizer, on clusters of any name (the short-lived hook only).
    ("ClusterRole", "cluster-tunnel-cleanup", "managedclusters"),
    // Older versions' key Secrets, found by label (the short-lived hook only).
    ("Role", "cluster-tunnel-cleanup", "secrets"),
];

/// Every rule of the manager's and the cleanup hook's roles that writes
/// (create, patch, update, delete) names its objects, but for
/// [`UNNAMED_WRITES`]. Server-side apply, which the manager writes with, is
/// authorized as create of the object's name when the object is missing, so
/// create is limitable by name for everything it applies.
fn check_writes_are_by_name(r: &Rendered) {
    for kind in ["ClusterRole", "Role"] {
        for role in r.kind(kind) {
            let name = role["metadata"]["name"].as_str().unwrap();
            if name != "cluster-tunnel-manager" && name != "cluster-tunnel-cleanup" {
                continue;
            }
            for rule in role["rules"].as_array().unwrap() {
                let writes = rule["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v == "create" || v == "patch" || v == "update" || v == "delete");
                if !writes || rule["resourceNames"].is_array() {
                    continue;
                }
                for resource in rule["resources"].as_array().unwrap() {
                    assert!(
                        UNNAMED_WRITES.contains(&(kind, name, resource.as_str().unwrap())),
                        "{kind} {name} writes {resource} without resourceNames: {rule}"
                    );
                }
            }
        }
    }
}

/// The manager's Secrets are kubernetes.io/tls only, and outside the release
/// namespace only the sidecars' Secret in labelled namespaces: an admission
/// policy, bound, for the manager's service account alone.
fn check_secret_policy(r: &Rendered, sidecar_certs: bool) {
    let policy = r.one(
        "ValidatingAdmissionPolicy",
        "cluster-tunnel-manager-secrets",
    );
    let spec = &policy["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    assert_eq!(
        spec["matchConstraints"]["resourceRules"],
        json!([{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["secrets"] }])
    );
    assert_eq!(
        spec["matchConditions"][0]["expression"],
        r#"request.userInfo.username == "system:serviceaccount:cluster-tunnel:cluster-tunnel-manager""#
    );
    let validations: Vec<&str> = spec["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["expression"].as_str().unwrap())
        .collect();
    assert_eq!(
        validations[0],
        r#"has(object.type) && object.type == "kubernetes.io/tls""#
    );
    if sidecar_certs {
        for part in [
            r#"request.namespace == "cluster-tunnel""#,
            r#"object.metadata.name == "cluster-tunnel-sidecar""#,
            r#"namespaceObject.metadata.labels["cluster-tunnel.io/injection"] == "enabled""#,
        ] {
            assert!(
                validations[1].contains(part),
                "{part} in {}",
                validations[1]
            );
        }
    } else {
        assert_eq!(validations[1], r#"request.namespace == "cluster-tunnel""#);
    }
    let binding = r.one(
        "ValidatingAdmissionPolicyBinding",
        "cluster-tunnel-manager-secrets",
    );
    assert_eq!(
        binding["spec"],
        json!({ "policyName": "cluster-tunnel-manager-secrets", "validationActions": ["Deny"] })
    );
    // Every Secret the manager writes is one the policy lets through.
    let (now, td) = (time::OffsetDateTime::now_utc(), "cluster-tunnel");
    let signer = tunnel_manager::signer::Signer::generate(td, now).unwrap();
    let secret = tunnel_manager::signer::tls_secret("x", "ns", &signer.ca, "", None);
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
}

/// The addon as OCM knows it: the ClusterManagementAddOn with its install
/// strategy, the chart's Placement only when none is given, the default
/// deployment config, and the uninstall and upgrade hooks.
fn check_addon(r: &Rendered, values: &Value) {
    // The hook's rights go when it ends, also when it fails.
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        let o = r.one(kind, "cluster-tunnel-cleanup");
        assert_eq!(
            o["metadata"]["annotations"]["helm.sh/hook-delete-policy"],
            "before-hook-creation,hook-succeeded,hook-failed",
            "{kind}"
        );
    }
    if values["manager"]["openClusterManagement"] == false {
        for kind in [
            "ClusterManagementAddOn",
            "Placement",
            "AddOnDeploymentConfig",
        ] {
            assert!(r.kind(kind).is_empty(), "{kind} without OCM");
        }
        for job in ["cluster-tunnel-uninstall", "cluster-tunnel-upgrade-cleanup"] {
            assert!(r.find("Job", job).is_none(), "{job} without OCM");
        }
        check_ocm_off_hook(r);
        return;
    }
    assert!(r.find("Job", "cluster-tunnel-ocm-off").is_none());
    let cma = r.one("ClusterManagementAddOn", "cluster-tunnel");
    assert_eq!(
        cma["metadata"]["annotations"]["addon.open-cluster-management.io/lifecycle"],
        "addon-manager"
    );
    let strategy = values["addon"]["installStrategy"]
        .as_str()
        .unwrap_or("Placements");
    assert_eq!(cma["spec"]["installStrategy"]["type"], strategy);
    let own_placement = strategy == "Placements" && values["addon"]["placements"].is_null();
    assert_eq!(
        r.find("Placement", "cluster-tunnel").is_some(),
        own_placement
    );
    if own_placement {
        assert_eq!(
            cma["spec"]["installStrategy"]["placements"],
            json!([{ "namespace": "cluster-tunnel", "name": "cluster-tunnel" }])
        );
        r.one("ManagedClusterSetBinding", "global");
    } else if strategy == "Placements" {
        assert_eq!(
            cma["spec"]["installStrategy"]["placements"],
            values["addon"]["placements"]
        );
    }
    let adc = r.find("AddOnDeploymentConfig", "cluster-tunnel-agent");
    assert_eq!(
        adc.is_some(),
        values["addon"]["deploymentConfig"].is_object()
    );
    if let Some(adc) = adc {
        assert_eq!(adc["spec"], values["addon"]["deploymentConfig"]);
        assert_eq!(
            cma["spec"]["supportedConfigs"][0]["defaultConfig"]["name"],
            "cluster-tunnel-agent"
        );
    }
    for (job, hook) in [
        ("cluster-tunnel-uninstall", "pre-delete"),
        ("cluster-tunnel-upgrade-cleanup", "post-upgrade"),
    ] {
        let j = r.one("Job", job);
        assert_eq!(j["metadata"]["annotations"]["helm.sh/hook"], hook);
        let args = j["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert_eq!(
            args.contains("--legacy-only"),
            hook == "post-upgrade",
            "{args}"
        );
    }
    // The manager approves and signs for its own signer only, and never creates addons.
    let rules = r.one("ClusterRole", "cluster-tunnel-manager")["rules"]
        .as_array()
        .unwrap()
        .clone();
    let signers: Vec<&Value> = rules
        .iter()
        .filter(|rule| rule["resources"] == json!(["signers"]))
        .collect();
    assert_eq!(
        signers,
        [
            &json!({ "apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "resourceNames": ["cluster-tunnel.io/agent"], "verbs": ["approve", "sign"] })
        ]
    );
    for rule in &rules {
        if rule["resources"]
            .to_string()
            .contains("managedclusteraddons")
        {
            assert!(!rule["verbs"].to_string().contains("create"), "{rule}");
        }
    }
}

/// With OCM integration off, an upgrade (or a rollback) to the release first
/// removes the addon everywhere, while the previous manager still runs: Helm
/// is about to delete the ClusterManagementAddOn and no manager of this
/// version would remove its finalizer from the ManagedClusterAddOns OCM then
/// deletes.
fn check_ocm_off_hook(r: &Rendered) {
    let job = r.one("Job", "cluster-tunnel-ocm-off");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "pre-upgrade,pre-rollback"
    );
    let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "uninstall");
    assert!(!args.to_string().contains("--legacy-only"), "{args}");
    assert_eq!(
        job["spec"]["template"]["spec"]["serviceAccountName"],
        "cluster-tunnel-cleanup"
    );
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert_eq!(
            r.one(kind, "cluster-tunnel-cleanup")["metadata"]["annotations"]["helm.sh/hook"],
            "pre-upgrade,pre-rollback",
            "{kind}"
        );
    }
    let role = r.one("ClusterRole", "cluster-tunnel-cleanup").to_string();
    for want in [
        "clustermanagementaddons",
        "managedclusteraddons",
        "manifestworks",
    ] {
        assert!(role.contains(want), "{role}");
    }
}

fn check_rbac_is_narrow(r: &Rendered) {
    for kind in ["ClusterRole", "Role"] {
        for role in r.kind(kind) {
            for rule in role["rules"].as_array().unwrap() {
                for field in ["verbs", "resources", "apiGroups"] {
                    assert!(
                        !rule[field].as_array().unwrap().contains(&json!("*")),
                        "{kind} {} grants * in {field}",
                        role["metadata"]["name"]
                    );
                }
            }
        }
    }
}

/// Where `a` and `b` differ, as `path: a => b` lines.
fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                json_diff(&format!("{path}.{k}"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} => {b}")),
        _ => {}
    }
}

/// Labels only Helm sets; the manager leaves them to Helm.
const HELM_ONLY_LABELS: [&str; 3] = [
    "helm.sh/chart",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];

/// The objects the manager keeps, built from the chart's own
/// TunnelConfiguration and the manager's flags, are the chart's objects
/// field for field, so that Helm and the manager never undo each other.
fn check_manager_keeps_what_the_chart_renders(
    r: &Rendered,
    webhooks: tunnel_manager::server_objects::WebhookSupport,
) {
    let config: tunnel_api::configuration::TunnelConfiguration =
        serde_json::from_value(r.kind("TunnelConfiguration")[0].clone())
            .expect("the chart's TunnelConfiguration is one the manager reads");
    let manager = r.one("Deployment", "cluster-tunnel-manager");
    let args: Vec<String> = manager["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("the manager gets --{name}"))
            .to_owned()
    };
    let names = tunnel_manager::server_objects::ServerObjectNames {
        instance: flag("instance"),
        namespace: flag("namespace"),
        trust_domain: flag("trust-domain"),
    };
    let desired: Vec<Value> =
        tunnel_manager::server_objects::desired_objects(&config, &names, webhooks)
            .unwrap()
            .iter()
            .map(|o| o.to_json().unwrap())
            .collect();
    let kinds: Vec<&str> = desired
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "ServiceAccount",
        "Service",
        "PodDisruptionBudget",
        "Deployment",
    ] {
        assert!(kinds.contains(&kind), "the manager keeps a {kind}");
    }
    for want in &desired {
        let (kind, name) = (
            want["kind"].as_str().unwrap(),
            want["metadata"]["name"].as_str().unwrap(),
        );
        let mut have = r.one(kind, name).clone();
        have.as_object_mut().unwrap().remove("__source");
        if let Some(labels) = have["metadata"]["labels"].as_object_mut() {
            for l in HELM_ONLY_LABELS {
                labels.remove(l);
            }
        }
        let mut diffs = Vec::new();
        json_diff("", &have, want, &mut diffs);
        assert!(
            diffs.is_empty(),
            "{kind} {name}: the chart and the manager differ (chart => manager):\n{}",
            diffs.join("\n")
        );
    }
    // And nothing of that kind and instance that the manager would not keep.
    let server_objects = r.objects.iter().filter(|o| {
        o["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
            || o["metadata"]["name"] == "cluster-tunnel-server"
    });
    for o in server_objects {
        if o["kind"] == "NetworkPolicy" || o["kind"] == "ServiceMonitor" {
            continue;
        }
        assert!(
            desired
                .iter()
                .any(|d| d["kind"] == o["kind"] && d["metadata"]["name"] == o["metadata"]["name"]),
            "the chart renders {} {} which the manager does not keep",
            o["kind"],
            o["metadata"]["name"]
        );
    }
}

#[test]
fn the_hub_chart_renders_valid_objects_with_every_value_set() {
    let sets = [
        json!({}),
        json!({
            "server": {
                "replicas": 3, "antiAffinity": "hard",
                "entrypoint": { "type": "Hostname", "hostname": "hub.example.com", "port": 8443 },
                "nodeSelector": { "node-role.kubernetes.io/infra": "" },
                "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "tunnel", "effect": "NoSchedule" }],
                "agentServiceAnnotations": { "service.beta.kubernetes.io/aws-load-balancer-type": "nlb" },
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } },
                "drainTimeout": "120s",
            },
            "injector": { "failurePolicy": "Ignore", "timeoutSeconds": 5, "failClosed": true, "excludedNamespaces": ["kube-system", "monitoring"],
                          "certManager": { "enabled": true } },
            "sidecar": { "issueCertificates": false },
            "serviceMonitor": { "enabled": true, "labels": { "release": "prometheus" } },
            "networkPolicy": { "enabled": true, "agentSourceCidrs": ["203.0.113.0/24"] },
            "imagePullSecrets": ["regcred"],
            "logFormat": "text",
            "addon": {
                "installStrategy": "Manual",
                "deploymentConfig": {
                    "agentInstallNamespace": "tunnel",
                    "nodePlacement": { "nodeSelector": { "role": "infra" } },
                    "registries": [{ "source": "ghcr.io/cluster-tunnel", "mirror": "mirror.example.com/ct" }],
                    "customizedVariables": [{ "name": "replicas", "value": "3" }],
                },
            },
        }),
        json!({
            "addon": { "placements": [{ "namespace": "fleet", "name": "tunnel-clusters" }] },
            "agent": { "resources": { "requests": { "cpu": "10m" } }, "pdbMaxUnavailable": 0 },
        }),
        json!({
            "injector": { "enabled": false },
            "manager": { "openClusterManagement": false, "keepHubObjects": false },
            "server": { "authorization": "allowAll" }, "sidecar": { "issueCertificates": false },
            "join": { "enabled": true },
        }),
    ];
    for values in &sets {
        let Some(rendered) = render("cluster-tunnel", values) else {
            return;
        };
        let r = rendered.unwrap_or_else(|e| panic!("render with {values}: {e}"));
        check_every_deployment(&r);
        check_every_job(&r);
        check_rbac_is_narrow(&r);
        check_writes_are_by_name(&r);
        check_secret_policy(&r, values["sidecar"]["issueCertificates"] != false);
        check_addon(&r, values);
        check_manager_keeps_what_the_chart_renders(
            &r,
            tunnel_manager::server_objects::WebhookSupport::CURRENT,
        );
        // The manager's metrics have a Service (and a ServiceMonitor when asked).
        assert_eq!(
            r.one("Service", "cluster-tunnel-manager")["spec"]["ports"][0]["name"],
            "admin"
        );
        assert_eq!(
            r.find("ServiceMonitor", "cluster-tunnel-manager").is_some(),
            values["serviceMonitor"]["enabled"] == true
        );
        let manager_args =
            r.one("Deployment", "cluster-tunnel-manager")["spec"]["template"]["spec"]["containers"]
                [0]["args"]
                .to_string();
        let manager = r.one("Deployment", "cluster-tunnel-manager");
        assert_eq!(manager["spec"]["replicas"], 2, "a leader and a standby");
        assert!(
            manager["spec"]["strategy"].is_null(),
            "rolling updates: a standby takes over"
        );
        r.one("PodDisruptionBudget", "cluster-tunnel-manager");
        let role = r.one("Role", "cluster-tunnel-manager").to_string();
        assert!(role.contains("leases"), "{role}");
        // Writes to RBAC objects and webhooks are limited to the installation's own names.
        let cluster_role = r.one("ClusterRole", "cluster-tunnel-manager");
        for rule in cluster_role["rules"].as_array().unwrap() {
            let resources = rule["resources"].to_string();
            if resources.contains("clusterrole") || resources.contains("mutatingwebhook") {
                let verbs = rule["verbs"].to_string();
                if verbs.contains("patch") || verbs.contains("delete") {
                    assert!(rule["resourceNames"].is_array(), "unlimited {rule}");
                }
            }
        }
        assert_eq!(
            manager_args.contains("--no-hub-objects"),
            values["manager"]["keepHubObjects"] == false,
            "{manager_args}"
        );

        let server = r.one("Deployment", "cluster-tunnel-server");
        let replicas = values["server"]["replicas"].as_i64().unwrap_or(2);
        assert_eq!(server["spec"]["replicas"], replicas);
        // Agents behind the load balancer learn the replica count from the servers.
        assert!(
            server["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("--server-count={replicas}"))),
            "{}",
            server["spec"]["template"]["spec"]["containers"][0]["args"]
        );
        // A draining server serves for its shutdown delay, then drains: the
        // pod's grace covers both (docs/ha.md).
        let args = server["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("--shutdown-delay=5s"), "{args}");
        let drain: i64 = values["server"]["drainTimeout"]
            .as_str()
            .unwrap_or("30s")
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert_eq!(
            server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            5 + drain + 10
        );
        let anti = &server["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
        if values["server"]["antiAffinity"] == "hard" {
            assert!(anti["requiredDuringSchedulingIgnoredDuringExecution"].is_array());
        } else {
            assert!(anti["preferredDuringSchedulingIgnoredDuringExecution"].is_array());
        }
        assert_eq!(
            r.one("Service", "cluster-tunnel-server-headless")["spec"]["clusterIP"],
            "None"
        );
        let agents = r.one("Service", "cluster-tunnel-server-agents");
        let lb = values["server"]["entrypoint"]["type"] != "Hostname";
        assert_eq!(
            agents["spec"]["type"],
            if lb { "LoadBalancer" } else { "ClusterIP" }
        );
        r.one("Service", "cluster-tunnel-server");
        // Authorization: policies and token reviews with their RBAC, or explicitly off.
        let args = server["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        if values["server"]["authorization"] == "allowAll" {
            assert!(args.contains("--allow-all"), "{args}");
            assert!(r.find("ClusterRole", "cluster-tunnel-server").is_none());
        } else {
            assert!(
                args.contains("--policy-kubernetes") && args.contains("--token-review"),
                "{args}"
            );
            let role = r.one("ClusterRole", "cluster-tunnel-server").to_string();
            assert!(
                role.contains("tunnelpolicies") && role.contains("tokenreviews"),
                "{role}"
            );
            // With OCM the servers admit only agents of accepted clusters with
            // the addon: they read the addons, by name only.
            let ocm = values["manager"]["openClusterManagement"] != false;
            assert_eq!(args.contains("--clusters-from-ocm"), ocm, "{args}");
            let addons: Vec<&Value> = r.one("ClusterRole", "cluster-tunnel-server")["rules"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|rule| rule["resources"] == json!(["managedclusteraddons"]))
                .collect();
            if ocm {
                assert_eq!(
                    addons,
                    [
                        &json!({ "apiGroups": ["addon.open-cluster-management.io"], "resources": ["managedclusteraddons"], "resourceNames": ["cluster-tunnel"], "verbs": ["get", "list", "watch"] })
                    ]
                );
            } else {
                assert!(addons.is_empty(), "{role}");
            }
        }
        r.one("PodDisruptionBudget", "cluster-tunnel-server");
        r.one(
            "CustomResourceDefinition",
            "tunnelconfigurations.cluster-tunnel.io",
        );

        if values["injector"]["enabled"] == false {
            assert!(r.kind("MutatingWebhookConfiguration").is_empty());
        } else {
            r.one("PodDisruptionBudget", "cluster-tunnel-injector");
            let hook =
                &r.one("MutatingWebhookConfiguration", "cluster-tunnel-injector")["webhooks"][0];
            assert_eq!(hook["sideEffects"], "None");
            assert_eq!(
                hook["failurePolicy"],
                values["injector"]["failurePolicy"]
                    .as_str()
                    .unwrap_or("Fail")
            );
            // Only opted-in pods reach the webhook, so Fail holds no other.
            assert_eq!(
                hook["matchConditions"],
                json!([{ "name": "opted-in", "expression": tunnel_manager::server_objects::OPT_IN_CONDITION }])
            );
            assert_eq!(
                hook["timeoutSeconds"],
                values["injector"]["timeoutSeconds"].as_i64().unwrap_or(10)
            );
            let exprs = hook["namespaceSelector"]["matchExpressions"]
                .as_array()
                .unwrap();
            assert!(exprs.contains(&json!({ "key": "cluster-tunnel.io/injection", "operator": "In", "values": ["enabled"] })));
            let excluded = exprs.iter().find(|e| e["operator"] == "NotIn").unwrap();
            assert!(
                excluded["values"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("cluster-tunnel")),
                "own namespace excluded"
            );
            // The webhook's Service is the one the injector's certificate names.
            let injector = r.one("Deployment", "cluster-tunnel-injector");
            let args = injector["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
            assert!(
                args.contains("--service-name=cluster-tunnel-injector"),
                "{args}"
            );
            assert!(
                args.contains("--webhook-config-name=cluster-tunnel-injector"),
                "{args}"
            );
            assert!(args.contains("--shutdown-delay=5s"), "{args}");
            // The sidecars' admin port stays on loopback, where their exec probes ask.
            assert!(args.contains("--sidecar-admin-bind=127.0.0.1"), "{args}");
            let pod = &injector["spec"]["template"]["spec"];
            assert_eq!(pod["terminationGracePeriodSeconds"], 20);
            assert_eq!(
                injector["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
                0
            );
            check_injector_certificates(&r, values["injector"]["certManager"]["enabled"] == true);
        }
        let monitors = r.kind("ServiceMonitor").len();
        assert_eq!(monitors > 0, values["serviceMonitor"]["enabled"] == true);
        let policies = r.kind("NetworkPolicy").len();
        assert_eq!(policies > 0, values["networkPolicy"]["enabled"] == true);
        let manager_role = r.one("ClusterRole", "cluster-tunnel-manager").to_string();
        assert_eq!(
            manager_role.contains("manifestworks"),
            values["manager"]["openClusterManagement"] != false
        );
        check_sidecar_certificates(&r, values["sidecar"]["issueCertificates"] != false);
        check_join(&r, values["join"]["enabled"] == true);
        check_upgrades_and_tests(&r, values);
    }
}

/// The webhook fits the cluster's version: from Kubernetes 1.28 with its
/// matchConditions and the configured failurePolicy; before (1.27, where
/// the field is dropped unless a feature gate is on, and 1.26, which does
/// not know it) without them and with Ignore, so that no pod of a labelled
/// namespace waits for the injector, and `helm install` says so. The
/// manager, told the same version, keeps the same objects.
#[test]
fn the_webhook_fits_the_cluster_s_version() {
    let values = json!({ "injector": { "failurePolicy": "Fail" } });
    for (version, current) in [("1.26.0", false), ("1.27.0", false), ("1.28.0", true)] {
        let Some(rendered) = render_at("cluster-tunnel", &values, version) else {
            return;
        };
        let r = rendered.unwrap_or_else(|e| panic!("render for {version}: {e}"));
        let hook = &r.one("MutatingWebhookConfiguration", "cluster-tunnel-injector")["webhooks"][0];
        if current {
            assert_eq!(hook["failurePolicy"], "Fail", "{version}");
            assert_eq!(
                hook["matchConditions"][0]["expression"],
                tunnel_manager::server_objects::OPT_IN_CONDITION,
                "{version}"
            );
            assert!(!r.notes.contains("WARNING"), "{version}: {}", r.notes);
        } else {
            assert_eq!(hook["failurePolicy"], "Ignore", "{version}");
            assert!(hook.get("matchConditions").is_none(), "{version}: {hook}");
            assert!(
                r.notes.contains(&format!("v{version} is older than 1.28")),
                "{version}: {}",
                r.notes
            );
        }
        let webhooks = tunnel_manager::server_objects::WebhookSupport::of_version(
            &format!("v{version}"),
            "",
            "",
        );
        assert_eq!(webhooks.match_conditions, current, "{version}");
        check_manager_keeps_what_the_chart_renders(&r, webhooks);
    }
}

/// Evaluates `expression` for each of `activations` with `charts/tests/cel.py`
/// (cel-python); `None` when it is missing (and not in CI).
fn cel(expression: &str, activations: &[Value]) -> Option<Vec<Value>> {
    let out = match Command::new("python3")
        .arg(root().join("charts/tests/cel.py"))
        .arg(expression)
        .arg(Value::from(activations.to_vec()).to_string())
        .output()
    {
        Ok(out) => out,
        Err(e) => return skip(&format!("python3 cannot be run: {e}")),
    };
    if out.status.code() == Some(3) {
        return skip(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "cel.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("cel.py prints JSON"))
}

/// The webhook's matchConditions, evaluated as CEL, call the injector for
/// every pod the injector does not read as opted out: "true" in any case
/// and spacing, and every value it refuses ("yes", ""), so that a typo gets
/// the injector's message instead of a pod silently without its sidecar;
/// pods without the annotation or with "false" never wait for it. The
/// manager's report of pods without the sidecar reads it the same way.
#[test]
fn the_match_condition_calls_the_injector_for_every_pod_it_does_not_skip() {
    use std::collections::BTreeMap;
    use tunnel_api::annotations::INJECT;
    use tunnel_injector::annotations::{OptIn, opt_in};
    let values: [Option<&str>; 9] = [
        None,
        Some("true"),
        Some(" True "),
        Some("TRUE"),
        Some("yes"),
        Some(""),
        Some("1"),
        Some("false"),
        Some(" FALSE "),
    ];
    let pods: Vec<Value> = values
        .iter()
        .map(|v| {
            let annotations = match v {
                Some(v) => json!({ INJECT: v, "other": "x" }),
                None => json!({ "other": "x" }),
            };
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "app", "namespace": "fleet", "annotations": annotations },
                "spec": { "containers": [{ "name": "app" }] },
                "status": { "phase": "Running" },
            })
        })
        .collect();
    let activations: Vec<Value> = pods.iter().map(|p| json!({ "object": p })).collect();
    let Some(called) = cel(
        tunnel_manager::server_objects::OPT_IN_CONDITION,
        &activations,
    ) else {
        return;
    };
    for ((value, pod), called) in values.iter().zip(&pods).zip(called) {
        let annotations: BTreeMap<String, String> = value
            .map(|v| (INJECT.to_owned(), v.to_owned()))
            .into_iter()
            .collect();
        let skipped = matches!(opt_in(&annotations, &BTreeMap::new()), Ok(OptIn::No(_)));
        assert_eq!(
            called,
            json!(!skipped),
            "{value:?}: the webhook is called iff the injector does not skip the pod"
        );
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone()).unwrap();
        assert_eq!(
            tunnel_manager::coverage::is_uninjected(&pod),
            !skipped,
            "{value:?}: reported without the sidecar iff the webhook would have been called"
        );
    }
    // A pod without any annotation at all.
    let bare = json!({ "object": { "metadata": { "name": "app" } } });
    assert_eq!(
        cel(tunnel_manager::server_objects::OPT_IN_CONDITION, &[bare]),
        Some(vec![json!(false)])
    );
}

/// CRDs applied on upgrade by a hook that may patch only them; `helm test`
/// connects through the tunnel with a certificate the manager keeps, allowed
/// by a policy to reach the probe destination only.
fn check_upgrades_and_tests(r: &Rendered, values: &Value) {
    let job = r.one("Job", "cluster-tunnel-crds");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "pre-upgrade"
    );
    assert_eq!(
        r.one("ClusterRole", "cluster-tunnel-crds")["rules"],
        json!([{ "apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                 "resourceNames": ["tunnelconfigurations.cluster-tunnel.io", "tunnelpolicies.cluster-tunnel.io"],
                 "verbs": ["get", "patch"] }])
    );
    let pod = r.one("Pod", "cluster-tunnel-test");
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let args = pod["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--min-healthy=1"), "{args}");
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["secretName"],
        "cluster-tunnel-test"
    );
    let manager = r.one("Deployment", "cluster-tunnel-manager");
    assert!(
        manager["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string()
            .contains("--test-client-secret=cluster-tunnel-test")
    );
    let policy = r.find("TunnelPolicy", "cluster-tunnel-test");
    assert_eq!(
        policy.is_some(),
        values["server"]["authorization"] != "allowAll"
    );
    if let Some(policy) = policy {
        let rule = &policy["spec"]["rules"][0];
        assert_eq!(
            rule["subjects"],
            json!([{ "identity": "client/cluster-tunnel-test" }])
        );
        assert_eq!(
            rule["destinations"],
            json!([{ "host": "kubernetes.default.svc", "ports": [443] }])
        );
        // The policy the chart ships is one the server accepts.
        let spec: tunnel_api::policy::TunnelPolicySpec =
            serde_json::from_value(policy["spec"].clone()).unwrap();
        tunnel_server::policy::Policy::compile("cluster-tunnel-test", &spec).unwrap();
    }
}

/// Joining without OCM: the manager signs join requests (`--join`), with
/// the certificate request rights even without OCM, and the join
/// ClusterRole lets a cluster's token create and read requests only.
fn check_join(r: &Rendered, enabled: bool) {
    let manager = r.one("Deployment", "cluster-tunnel-manager");
    let args = manager["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert_eq!(args.contains("--join"), enabled, "{args}");
    let role = r.find("ClusterRole", "cluster-tunnel-join");
    assert_eq!(role.is_some(), enabled);
    if let Some(role) = role {
        assert_eq!(
            role["rules"],
            json!([{ "apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get"] }])
        );
        let manager_role = r.one("ClusterRole", "cluster-tunnel-manager").to_string();
        assert!(
            manager_role.contains("cluster-tunnel.io/agent"),
            "{manager_role}"
        );
    }
}

/// With cert-manager, a Certificate for the injector's Service is mounted and
/// served, its CA is injected into the webhook configuration, and the
/// injector has no access to webhook configurations; without, the injector
/// keeps the caBundle itself.
fn check_injector_certificates(r: &Rendered, cert_manager: bool) {
    let injector = r.one("Deployment", "cluster-tunnel-injector");
    let args = injector["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    let hook = r.one("MutatingWebhookConfiguration", "cluster-tunnel-injector");
    let role = r.one("ClusterRole", "cluster-tunnel-injector").to_string();
    let inject_from = &hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"];
    if cert_manager {
        assert!(args.contains("--cert-manager"), "{args}");
        let cert = r.one("Certificate", "cluster-tunnel-injector");
        assert_eq!(cert["spec"]["secretName"], "cluster-tunnel-injector-tls");
        assert!(
            cert["spec"]["dnsNames"]
                .as_array()
                .unwrap()
                .contains(&json!("cluster-tunnel-injector.cluster-tunnel.svc")),
            "{cert}"
        );
        // The standard chain: self-signed Issuer -> CA Certificate -> CA
        // Issuer -> serving Certificate, so that the anchor in the caBundle
        // (the serving certificate's ca.crt) outlives its renewals.
        assert_eq!(
            cert["spec"]["issuerRef"]["name"],
            "cluster-tunnel-injector-ca"
        );
        assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer");
        assert!(
            cert["spec"]["isCA"].is_null(),
            "the serving certificate is no CA"
        );
        let ca_issuer = r.one("Issuer", "cluster-tunnel-injector-ca");
        let ca_secret = &ca_issuer["spec"]["ca"]["secretName"];
        let ca = r
            .kind("Certificate")
            .into_iter()
            .find(|c| &c["spec"]["secretName"] == ca_secret)
            .unwrap_or_else(|| panic!("no Certificate makes the CA Issuer's Secret {ca_secret}"));
        assert_eq!(ca["spec"]["isCA"], true, "{ca}");
        assert_eq!(ca["spec"]["privateKey"]["rotationPolicy"], "Never", "{ca}");
        let root_issuer = r.one("Issuer", ca["spec"]["issuerRef"]["name"].as_str().unwrap());
        assert!(
            root_issuer["spec"]["selfSigned"].is_object(),
            "{root_issuer}"
        );
        let volumes = injector["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(volumes.contains("cluster-tunnel-injector-tls"), "{volumes}");
        // The CA injector reads the serving certificate (its ca.crt is the CA).
        assert_eq!(inject_from, "cluster-tunnel/cluster-tunnel-injector");
        assert!(!role.contains("mutatingwebhookconfigurations"), "{role}");
    } else {
        assert!(!args.contains("--cert-manager"), "{args}");
        assert!(r.kind("Certificate").is_empty());
        assert!(inject_from.is_null(), "{hook}");
        assert!(role.contains("mutatingwebhookconfigurations"), "{role}");
    }
}

/// The manager issues the sidecars' Secret into labelled namespaces (the
/// label and Secret the injector uses), with Secret access outside its own
/// namespace only then, and reading, renewing and deleting only that name.
fn check_sidecar_certificates(r: &Rendered, issued: bool) {
    let manager = r.one("Deployment", "cluster-tunnel-manager");
    let args = manager["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--namespace-label=cluster-tunnel.io/injection"),
        "{args}"
    );
    assert!(
        args.contains("--sidecar-cert-secret=cluster-tunnel-sidecar"),
        "{args}"
    );
    assert_eq!(args.contains("--no-sidecar-certs"), !issued, "{args}");
    let rules = r.one("ClusterRole", "cluster-tunnel-manager")["rules"]
        .as_array()
        .unwrap()
        .clone();
    let on = |resource: &str| -> Vec<Value> {
        rules
            .iter()
            .filter(|rule| {
                rule["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(resource))
            })
            .cloned()
            .collect()
    };
    if issued {
        assert_eq!(
            on("namespaces"),
            [
                json!({ "apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"] })
            ]
        );
        assert_eq!(
            on("secrets"),
            [
                json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cluster-tunnel-sidecar"], "verbs": ["get", "create", "patch", "delete"] }),
            ]
        );
    } else {
        assert!(on("secrets").is_empty(), "{rules:?}");
    }
    // Opted-in pods without the sidecar are looked for while there is an injector.
    let injector = !r.kind("MutatingWebhookConfiguration").is_empty();
    assert_eq!(args.contains("--no-pod-report"), !injector, "{args}");
    if injector {
        assert_eq!(
            on("pods"),
            [json!({ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] })]
        );
        assert!(
            on("namespaces")
                .iter()
                .any(|r| r["verbs"].as_array().unwrap().contains(&json!("list"))),
            "{rules:?}"
        );
    } else {
        assert!(
            on("pods").is_empty() && on("namespaces").is_empty(),
            "{rules:?}"
        );
    }
    // The signer's, server's and agents' Secrets: the release namespace's Role, either way.
    let role = r.one("Role", "cluster-tunnel-manager").to_string();
    assert!(role.contains("secrets"), "{role}");
}

#[test]
fn the_agent_chart_renders_valid_objects_with_every_value_set() {
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let sets = [
        json!({ "cluster": "east", "servers": ["hub.example.com:443"], "tls": { "cert": pem, "key": pem, "ca": pem } }),
        json!({
            "cluster": "north", "servers": ["hub.example.com:443"],
            "tls": { "ca": pem },
            "join": { "enabled": true, "hubApiServer": "https://hub.example.com:6443", "hubApiCA": pem, "token": "eyJhbGciOi" },
        }),
        json!({
            "cluster": "west", "replicas": 3,
            "servers": ["hub-a.example.com:443", "hub-b.example.com:443"], "serverName": "hub.example.com",
            "tls": { "existingSecret": "agent-certs" },
            "allow": ["*.svc:443", "10.0.0.0/8"], "hostAliases": ["kubernetes.default.svc=10.96.0.1"],
            "networkPolicy": { "enabled": true }, "logFormat": "text",
        }),
    ];
    for values in &sets {
        let Some(rendered) = render("cluster-tunnel-agent", values) else {
            return;
        };
        let r = rendered.unwrap_or_else(|e| panic!("render with {values}: {e}"));
        check_every_deployment(&r);
        let d = r.one("Deployment", "cluster-tunnel-agent");
        assert_eq!(
            d["spec"]["replicas"],
            values["replicas"].as_i64().unwrap_or(2)
        );
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            args.contains(&format!(
                "--cluster={}",
                values["cluster"].as_str().unwrap()
            )),
            "{args}"
        );
        let pod = &d["spec"]["template"]["spec"];
        if values["join"]["enabled"] == true {
            // The key is made by the agent: in memory, kept in its own Secret,
            // which its Role lets it read and renew by name, and nothing else.
            assert_eq!(pod["automountServiceAccountToken"], true);
            assert_eq!(pod["volumes"][0]["emptyDir"]["medium"], "Memory");
            for flag in [
                "--join-hub-api=https://hub.example.com:6443",
                "--join-secret=cluster-tunnel-agent-tls",
                "--join-token-file=",
            ] {
                assert!(args.contains(flag), "{args}");
            }
            let secret = r.one("Secret", "cluster-tunnel-agent-tls");
            assert!(
                secret["data"].is_null(),
                "Helm owns the object, not the key"
            );
            assert_eq!(
                r.one("Role", "cluster-tunnel-agent")["rules"],
                json!([{ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cluster-tunnel-agent-tls"], "verbs": ["get", "update"] }])
            );
            r.one("PodDisruptionBudget", "cluster-tunnel-agent");
            continue;
        }
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert!(r.kind("Role").is_empty());
        let secret = d["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"].clone();
        if values["tls"]["existingSecret"].is_string() {
            assert_eq!(secret, values["tls"]["existingSecret"]);
            assert!(r.kind("Secret").is_empty());
        } else {
            assert_eq!(r.kind("Secret")[0]["metadata"]["name"], secret);
        }
        r.one("PodDisruptionBudget", "cluster-tunnel-agent");
    }
    // Without a cluster name or credentials the chart refuses to render.
    if let Some(result) = render(
        "cluster-tunnel-agent",
        &json!({ "servers": ["hub:443"], "tls": { "existingSecret": "x" } }),
    ) {
        let err = result.err().expect("rendering without a cluster fails");
        assert!(err.contains("cluster is required"), "{err}");
    }
}

#[test]
fn the_charts_crd_is_the_one_generated_from_the_rust_types() {
    let path = root().join("charts/cluster-tunnel/crds/tunnelconfigurations.yaml");
    let generated = tunnel_api::configuration::crd_yaml();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let in_chart = std::fs::read_to_string(&path).unwrap();
    assert!(
        in_chart == generated,
        "{} differs from `tunnel-manager crdgen`; run `cargo run -p tunnel-manager -- crdgen > {}` (or UPDATE_CRDS=1 cargo test)",
        path.display(),
        path.display()
    );
}

#[test]
fn the_charts_tunnel_policy_crd_is_the_servers() {
    let path = root().join("charts/cluster-tunnel/crds/tunnelpolicies.yaml");
    let generated = tunnel_api::policy::crd_yaml();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let in_chart = std::fs::read_to_string(&path).unwrap();
    assert!(
        in_chart == generated,
        "{} differs from `tunnel-server crd`; run `cargo run --bin tunnel-server -- crd > {}` (or UPDATE_CRDS=1 cargo test)",
        path.display(),
        path.display()
    );
}

#[test]
fn the_delivered_agent_uses_only_flags_the_agent_has() {
    let spec: tunnel_api::configuration::AgentSpec =
        serde_json::from_value(json!({ "image": "agent:1", "allow": ["*.svc:443"] })).unwrap();
    let overrides = tunnel_manager::deployment_config::AgentOverrides {
        log_level: Some("debug".into()),
        ..Default::default()
    };
    let work =
        tunnel_manager::agent_work::manifest_work(&tunnel_manager::agent_work::AgentWorkInput {
            cluster: "east",
            spec: &spec,
            hub: &tunnel_manager::agent_work::HubAddress {
                host: "hub.example.com".into(),
                port: 443,
                server_name: "hub.example.com".into(),
            },
            ca_pem: "",
            overrides: &overrides,
            config_hashes: &Default::default(),
            owner: None,
        });
    let deployment = work["spec"]["workload"]["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "Deployment")
        .unwrap();
    let mut cmd = tunnel_agent::cli::Cli::command();
    cmd.build();
    check_flags(
        &deployment["spec"]["template"]["spec"]["containers"][0],
        &cmd,
    );
}

#[test]
fn the_agent_asks_for_what_the_manager_signs() {
    // The agent does not depend on the manager: the names they share are checked here.
    assert_eq!(
        tunnel_agent::join::SIGNER_NAME,
        tunnel_api::ocm::SIGNER_NAME
    );
    assert_eq!(
        tunnel_agent::join::JOIN_CLUSTER_LABEL,
        tunnel_manager::csr::JOIN_CLUSTER_LABEL
    );
    assert_eq!(
        tunnel_agent::join::join_subject("east"),
        tunnel_manager::csr::join_subject("east")
    );
    // The addon's health Lease is the one OCM reads: named after the addon.
    let spec: tunnel_api::configuration::AgentSpec =
        serde_json::from_value(json!({ "image": "agent:1" })).unwrap();
    let work =
        tunnel_manager::agent_work::manifest_work(&tunnel_manager::agent_work::AgentWorkInput {
            cluster: "east",
            spec: &spec,
            hub: &tunnel_manager::agent_work::HubAddress {
                host: "h".into(),
                port: 1,
                server_name: "h".into(),
            },
            ca_pem: "",
            overrides: &Default::default(),
            config_hashes: &Default::default(),
            owner: None,
        });
    assert!(
        work.to_string()
            .contains(&format!("--addon-lease={}", tunnel_api::ocm::ADDON_NAME))
    );
}

#[test]
fn values_the_schemas_refuse_fail_the_install_not_the_pod() {
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    for (chart, values, says) in [
        (
            "cluster-tunnel",
            json!({ "manager": { "replicaz": 2 } }),
            "replicaz",
        ),
        (
            "cluster-tunnel",
            json!({ "server": { "replicas": 0 } }),
            "/server/replicas",
        ),
        (
            "cluster-tunnel",
            json!({ "server": { "authorization": "none" } }),
            "/server/authorization",
        ),
        (
            "cluster-tunnel",
            json!({ "addon": { "installStrategy": "Auto" } }),
            "/addon/installStrategy",
        ),
        (
            "cluster-tunnel",
            json!({ "server": { "drainTimeout": "1m" } }),
            "/server/drainTimeout",
        ),
        (
            "cluster-tunnel-agent",
            json!({ "cluster": "East_1", "servers": ["hub:443"], "tls": { "existingSecret": "x" } }),
            "/cluster",
        ),
        (
            "cluster-tunnel-agent",
            json!({ "cluster": "east", "servers": ["hub"], "tls": { "existingSecret": "x" } }),
            "/servers/0",
        ),
        (
            "cluster-tunnel-agent",
            json!({ "cluster": "east", "servers": ["hub:443"], "tls": { "ca": pem }, "join": { "enabled": true, "hubApiServer": "http://hub" } }),
            "/join/hubApiServer",
        ),
    ] {
        let Some(result) = render(chart, &values) else {
            return;
        };
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{chart} rendered with {values}"));
        assert!(err.contains(says), "{chart} {values}: {err}");
    }
}

#[test]
fn turning_the_manager_off_with_an_upgrade_removes_the_addon_first() {
    // manager.enabled=false: no manager of this version at all; the previous
    // one still runs when the pre-upgrade hook removes the addon.
    let values = json!({ "manager": { "enabled": false } });
    let Some(rendered) = render("cluster-tunnel", &values) else {
        return;
    };
    let r = rendered.unwrap_or_else(|e| panic!("render with {values}: {e}"));
    assert!(r.find("Deployment", "cluster-tunnel-manager").is_none());
    assert!(r.kind("ClusterManagementAddOn").is_empty());
    check_ocm_off_hook(&r);
    check_every_job(&r);
}
