//! The webhook as the API server sees it: real `AdmissionReview` JSON
//! (`tests/fixtures/`) sent over HTTPS to a running injector, the returned
//! base64 JSON Patch applied with json-patch to the pod, and the result
//! compared with `tests/golden/` (`UPDATE_GOLDEN=1` rewrites the golden
//! files; a difference fails the test).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tunnel_api::pod::SIDECAR_CONTAINER;
use tunnel_injector::annotations::{Defaults, Mode, Resources};
use tunnel_injector::certs::{CertFiles, generate, service_dns_names};
use tunnel_injector::inject::{BASE_NO_PROXY, SidecarTemplate};
use tunnel_injector::{CertSource, Injector, InjectorConfig};

/// Every wait in these tests.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The name the API server uses for the webhook's Service.
const SERVICE_HOST: &str = "tunnel-injector.cluster-tunnel.svc";

fn template() -> SidecarTemplate {
    SidecarTemplate {
        image: "ghcr.io/cluster-tunnel/tunnel-sidecar:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        servers: vec![
            "tunnel-server-0.tunnel-server.cluster-tunnel.svc:8090".into(),
            "tunnel-server-1.tunnel-server.cluster-tunnel.svc:8090".into(),
        ],
        server_name: Some("tunnel-server.cluster-tunnel.svc".into()),
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
                cpu_limit: None,
                memory_limit: None,
            },
            log_level: "info".into(),
            mode: Mode::Native,
        },
        version: "0.1.0".into(),
    }
}

fn config(certs: CertSource) -> InjectorConfig {
    InjectorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        certs,
        cert_reload_interval: Duration::from_millis(100),
        ca_bundle_sync: None,
        template: template(),
        fail_closed: false,
        config_name: None,
    }
}

/// A running injector with a generated certificate, and a client that
/// trusts its CA.
struct Webhook {
    injector: Injector,
    ca_pem: String,
}

async fn start() -> Webhook {
    tunnel_proto::tls::install_crypto_provider();
    let injector = Injector::start(
        config(CertSource::Generated {
            dns_names: service_dns_names("tunnel-injector", "cluster-tunnel"),
        }),
        None,
    )
    .await
    .expect("injector starts");
    let ca_pem = injector
        .generated_ca_pem()
        .expect("generated CA")
        .to_owned();
    Webhook { injector, ca_pem }
}

/// One HTTP answer.
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        assert_eq!(self.content_type, "application/json", "{}", self.text());
        serde_json::from_slice(&self.body).expect("a JSON answer")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn tls_client(ca_pem: &str, alpn: &[u8]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Sends one request over HTTPS, verifying the certificate for the Service's
/// name, as the API server does; HTTP/2 when `h2`.
async fn send_as(
    addr: SocketAddr,
    ca_pem: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
    h2: bool,
) -> Answer {
    tokio::time::timeout(TIMEOUT, async {
        let connector = tls_client(ca_pem, if h2 { b"h2" } else { b"http/1.1" });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = connector
            .connect(ServerName::try_from(SERVICE_HOST).unwrap(), tcp)
            .await
            .expect("TLS handshake with the webhook's certificate");
        let request = Request::builder()
            .method(method)
            .uri(format!("https://{SERVICE_HOST}:443{path}"))
            .header(HOST, SERVICE_HOST)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await.expect("response")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await.expect("response")
        };
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            content_type,
            body: body.to_vec(),
        }
    })
    .await
    .expect("an answer in time")
}

impl Webhook {
    async fn post(&self, body: Vec<u8>) -> Answer {
        send_as(
            self.injector.webhook_addr,
            &self.ca_pem,
            Method::POST,
            "/mutate?timeout=10s",
            body,
            false,
        )
        .await
    }

    async fn review(&self, review: &Value) -> Value {
        let answer = self.post(serde_json::to_vec(review).unwrap()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let out = answer.json();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"], review["request"]["uid"],
            "the response carries the request's uid"
        );
        out["response"].clone()
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.injector.admin_addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut buf = String::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let status = buf.split(' ').nth(1).unwrap().parse().unwrap();
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"))
}

/// Decodes the base64 patch of an allowed response.
fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let encoded = response["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("patch is a base64 string, not {}", response["patch"]));
    let bytes = BASE64.decode(encoded).expect("base64");
    serde_json::from_slice(&bytes).expect("a JSON Patch")
}

/// Checks what the API server's validation would: unique container and
/// volume names, mounts of existing volumes, unique variables.
fn assert_valid_pod(pod: &Pod) {
    let spec = pod.spec.as_ref().expect("spec");
    let mut names = BTreeSet::new();
    let all: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    for c in &all {
        assert!(names.insert(c.name.clone()), "container {} twice", c.name);
        let mut vars = BTreeSet::new();
        for e in c.env.iter().flatten() {
            assert!(
                vars.insert(e.name.clone()),
                "{}: variable {} twice",
                c.name,
                e.name
            );
        }
    }
    let volumes: BTreeSet<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(
        volumes.len(),
        spec.volumes.as_ref().map_or(0, Vec::len),
        "volume names are unique"
    );
    for c in &all {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&m.name),
                "{} mounts missing volume {}",
                c.name,
                m.name
            );
        }
    }
}

/// Sends the fixture, applies the patch, compares with the golden file,
/// checks the result is a valid Pod and that a second review of it changes
/// nothing. Returns the response.
async fn assert_injection_matches_golden(webhook: &Webhook, name: &str) -> Value {
    let review = fixture(name);
    let response = webhook.review(&review).await;
    let patch = patch_of(&response);
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");

    let got = serde_json::to_string_pretty(&pod).unwrap() + "\n";
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "{name}: the patched pod differs from {} at line {} (UPDATE_GOLDEN=1 rewrites it)\n  got:  {}\n  want: {}\n--- got\n{got}",
            path.display(),
            first + 1,
            got.lines().nth(first).unwrap_or("<end>"),
            want.lines().nth(first).unwrap_or("<end>"),
        );
    }

    let typed: Pod =
        serde_json::from_value(pod.clone()).expect("the patched pod is a k8s-openapi Pod");
    assert_valid_pod(&typed);

    // Re-invocation (reinvocationPolicy: IfNeeded) leaves the pod alone.
    let mut again = review.clone();
    again["request"]["object"] = pod;
    let second = webhook.review(&again).await;
    assert_eq!(second["allowed"], true);
    assert!(second.get("patch").is_none(), "{second}");
    response
}

fn sidecar_of(pod: &Value, list: &str) -> Value {
    pod["spec"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == SIDECAR_CONTAINER)
        .cloned()
        .expect("the sidecar")
}

fn patched(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden_path(name)).unwrap()).unwrap()
}

#[tokio::test]
async fn a_pod_with_one_container_gets_a_native_sidecar() {
    let webhook = start().await;
    let response = assert_injection_matches_golden(&webhook, "one-container").await;
    assert!(response.get("warnings").is_none(), "{response}");
    let pod = patched("one-container");
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], SIDECAR_CONTAINER);
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        pod["metadata"]["annotations"]["cluster-tunnel.io/injected"],
        "0.1.0"
    );
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn init_containers_and_env_keep_their_order_and_get_the_proxy() {
    let webhook = start().await;
    assert_injection_matches_golden(&webhook, "init-containers-and-env").await;
    let pod = patched("init-containers-and-env");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], SIDECAR_CONTAINER);
    assert_eq!(init[1]["name"], "migrate");
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn proxy_variables_the_pod_sets_are_kept() {
    let webhook = start().await;
    assert_injection_matches_golden(&webhook, "existing-proxy-env").await;
    let pod = patched("existing-proxy-env");
    let env = &pod["spec"]["containers"][0]["env"];
    let value = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        value("HTTPS_PROXY"),
        ["http://egress-proxy.corp.example.com:3128"]
    );
    assert!(value("https_proxy").is_empty(), "the pair counts as set");
    assert_eq!(value("no_proxy"), ["localhost,.corp.example.com"]);
    assert!(value("NO_PROXY").is_empty());
    assert_eq!(value("HTTP_PROXY"), ["http://127.0.0.1:17080"]);
    assert_eq!(value("CLUSTER_TUNNEL_EAST_ADDR"), ["127.0.0.1:25001"]);
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn every_container_of_a_pod_with_several_gets_the_environment() {
    let webhook = start().await;
    assert_injection_matches_golden(&webhook, "several-containers").await;
    let pod = patched("several-containers");
    for list in ["containers", "initContainers"] {
        for c in pod["spec"][list].as_array().unwrap() {
            if c["name"] == SIDECAR_CONTAINER {
                continue;
            }
            let env = c["env"].as_array().unwrap();
            assert!(
                env.iter()
                    .any(|e| e["name"] == "HTTP_PROXY" && e["value"] == "http://127.0.0.1:18080"),
                "{}",
                c["name"]
            );
        }
    }
    let sidecar = sidecar_of(&pod, "initContainers");
    assert_eq!(
        sidecar["resources"],
        json!({ "limits": { "cpu": "500m", "memory": "128Mi" }, "requests": { "cpu": "50m", "memory": "32Mi" } })
    );
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn a_jobs_pod_gets_a_native_sidecar_that_does_not_hold_it() {
    let webhook = start().await;
    let response = assert_injection_matches_golden(&webhook, "job").await;
    assert!(response.get("warnings").is_none(), "{response}");
    let pod = patched("job");
    assert_eq!(
        sidecar_of(&pod, "initContainers")["restartPolicy"],
        "Always"
    );
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn a_jobs_pod_in_legacy_mode_is_warned_about_shutdown() {
    let webhook = start().await;
    let response = assert_injection_matches_golden(&webhook, "job-legacy").await;
    let warnings = response["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("POST http://127.0.0.1:17090/shutdown"),
        "{warnings:?}"
    );
    let pod = patched("job-legacy");
    assert_eq!(pod["spec"]["containers"][0]["name"], SIDECAR_CONTAINER);
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "export"
    );
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn odd_annotation_keys_survive_and_unknown_ones_are_warned_about() {
    let webhook = start().await;
    let response = assert_injection_matches_golden(&webhook, "odd-annotations").await;
    assert_eq!(
        response["warnings"],
        json!(["cluster-tunnel: unknown annotation cluster-tunnel.io/port ignored"])
    );
    let before = fixture("odd-annotations")["request"]["object"]["metadata"]["annotations"].clone();
    let after = patched("odd-annotations")["metadata"]["annotations"].clone();
    for (key, value) in before.as_object().unwrap() {
        assert_eq!(&after[key], value, "{key}");
    }
    webhook.injector.shutdown().await;
}

/// The names of a container list of a patched pod.
fn names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

fn has_var(container: &Value, name: &str) -> bool {
    container["env"]
        .as_array()
        .is_some_and(|env| env.iter().any(|e| e["name"] == name))
}

/// Pods Istio's injector already changed (fixtures written from its
/// documented output: `istio-init`, `istio-proxy` as a native sidecar or as
/// the last container, `sidecar.istio.io/status`): the sidecar's default
/// ports fit beside Istio's, it goes after Istio's leading init containers,
/// and Istio's containers get none of the app's proxy variables.
#[tokio::test]
async fn an_istio_injected_pod_gets_the_sidecar_after_istio_s_containers() {
    let webhook = start().await;
    for name in ["istio-native", "istio-classic"] {
        let response = assert_injection_matches_golden(&webhook, name).await;
        assert!(response.get("warnings").is_none(), "{name}: {response}");
        let pod = patched(name);
        let init = names(&pod, "initContainers");
        let at = init.iter().position(|n| n == SIDECAR_CONTAINER).unwrap();
        let want = if name == "istio-native" { 2 } else { 1 };
        assert_eq!(at, want, "{name}: {init:?}");
        for list in ["initContainers", "containers"] {
            for c in pod["spec"][list].as_array().unwrap() {
                let istio = c["name"].as_str().unwrap().starts_with("istio-");
                if c["name"] != SIDECAR_CONTAINER {
                    assert_eq!(has_var(c, "HTTP_PROXY"), !istio, "{name}: {}", c["name"]);
                }
            }
        }
        // Istio redirects what reaches the pod's IP (the kubelet's httpGet
        // probes too) and rewrites only the probes of containers its own
        // injector saw: the sidecar's probes are execs that ask its admin
        // port on loopback, where it listens.
        let sidecar = sidecar_of(&pod, "initContainers");
        for probe in ["startupProbe", "livenessProbe"] {
            assert!(sidecar[probe].get("httpGet").is_none(), "{name}: {probe}");
            assert_eq!(
                sidecar[probe]["exec"]["command"].as_array().unwrap()[..2],
                [json!("tunnel-sidecar"), json!("probe")],
                "{name}: {probe}"
            );
        }
        let admin = sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "TUNNEL_ADMIN_LISTEN")
            .unwrap();
        assert_eq!(admin["value"], "127.0.0.1:17090", "{name}");
    }
    webhook.injector.shutdown().await;
}

/// Pods Linkerd's injector already changed (`linkerd-init`, `linkerd-proxy`
/// first among the containers with its `linkerd-await` hook, or as a native
/// sidecar): in legacy mode the sidecar goes after `linkerd-proxy` and
/// before the app, which stays kubectl's default container.
#[tokio::test]
async fn a_linkerd_injected_pod_gets_the_sidecar_after_linkerd_s_containers() {
    let webhook = start().await;
    assert_injection_matches_golden(&webhook, "linkerd-legacy").await;
    let pod = patched("linkerd-legacy");
    assert_eq!(
        names(&pod, "containers"),
        ["linkerd-proxy", SIDECAR_CONTAINER, "reports"]
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "reports"
    );
    assert!(!has_var(&pod["spec"]["containers"][0], "HTTP_PROXY"));
    assert!(has_var(&pod["spec"]["containers"][2], "HTTP_PROXY"));

    assert_injection_matches_golden(&webhook, "linkerd-native").await;
    let pod = patched("linkerd-native");
    assert_eq!(
        names(&pod, "initContainers"),
        ["linkerd-init", "linkerd-proxy", SIDECAR_CONTAINER]
    );
    assert!(!has_var(&pod["spec"]["initContainers"][1], "HTTP_PROXY"));
    webhook.injector.shutdown().await;
}

/// A port the pod's mesh holds — declared or not — refuses the pod with a
/// message naming the container, also when the mesh's injector ran after
/// ours and ours is re-invoked (`reinvocationPolicy: IfNeeded`).
#[tokio::test]
async fn a_port_a_mesh_holds_refuses_the_pod_also_on_reinvocation() {
    let webhook = start().await;
    let refused = |response: &Value| -> String {
        assert_eq!(response["allowed"], false, "{response}");
        assert_eq!(response["status"]["code"], 400);
        assert!(response.get("patch").is_none());
        response["status"]["message"].as_str().unwrap().to_owned()
    };
    // Istio's outbound port, which istio-proxy does not declare.
    let mut review = fixture("istio-native");
    review["request"]["object"]["metadata"]["annotations"]["cluster-tunnel.io/ports"] =
        json!("15001=east");
    let message = refused(&webhook.review(&review).await);
    assert!(message.contains("port 15001"), "{message}");
    assert!(message.contains("\"istio-proxy\" (Istio's)"), "{message}");
    // Linkerd's admin port as the proxy port.
    let mut review = fixture("linkerd-native");
    review["request"]["object"]["metadata"]["annotations"]["cluster-tunnel.io/proxy-port"] =
        json!("4191");
    let message = refused(&webhook.review(&review).await);
    assert!(
        message.contains("\"linkerd-proxy\" (Linkerd's)"),
        "{message}"
    );

    // Ours first, then Istio's webhook adds its containers: re-invoked, the
    // pod passes unchanged when nothing clashes...
    let istio = fixture("istio-classic")["request"]["object"]["spec"].clone();
    let mut review = fixture("one-container");
    let response = webhook.review(&review).await;
    let pod = &mut review["request"]["object"];
    json_patch::patch(pod, &patch_of(&response)).unwrap();
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .insert(0, istio["initContainers"][0].clone());
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(istio["containers"][1].clone());
    let again = webhook.review(&review).await;
    assert_eq!(again["allowed"], true, "{again}");
    assert!(again.get("patch").is_none(), "{again}");
    // ...and is refused when the sidecar holds one of Istio's ports (here
    // its admin port at the old default, 15090).
    let sidecar = review["request"]["object"]["spec"]["initContainers"]
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
    let message = refused(&webhook.review(&review).await);
    assert!(message.contains("port 15090"), "{message}");
    assert!(message.contains("was added after the sidecar"), "{message}");
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn pods_that_do_not_opt_in_are_left_untouched() {
    let webhook = start().await;
    for name in ["no-annotation", "opted-out-by-label", "deployment"] {
        let response = webhook.review(&fixture(name)).await;
        assert_eq!(response["allowed"], true, "{name}: {response}");
        assert!(response.get("patch").is_none(), "{name}: {response}");
        assert!(response.get("patchType").is_none(), "{name}: {response}");
    }
    let mut update = fixture("one-container");
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    assert!(webhook.review(&update).await.get("patch").is_none());
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn an_invalid_annotation_refuses_the_pod_and_names_it() {
    let webhook = start().await;
    let response = webhook.review(&fixture("invalid-annotation")).await;
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("annotation cluster-tunnel.io/ports"),
        "{message}"
    );
    assert!(message.contains("17001=East"), "{message}");
    assert!(response.get("patch").is_none());
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn malformed_reviews_get_a_clear_400() {
    let webhook = start().await;
    for (body, why) in [
        (b"this is not json".to_vec(), "not JSON"),
        (br#"{"apiVersion":"v1","kind":"Pod","metadata":{}}"#.to_vec(), "expected apiVersion admission.k8s.io/v1"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(),
            "missing field",
        ),
    ] {
        let answer = webhook.post(body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{why}: {}", answer.text());
        assert_eq!(answer.content_type, "text/plain; charset=utf-8");
        assert!(answer.text().starts_with("malformed AdmissionReview"), "{}", answer.text());
        assert!(answer.text().contains(why), "{}", answer.text());
    }
    let addr = webhook.injector.webhook_addr;
    let ca = &webhook.ca_pem;
    let get = send_as(addr, ca, Method::GET, "/mutate", Vec::new(), false).await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    let other = send_as(addr, ca, Method::POST, "/validate", b"{}".to_vec(), false).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let huge = vec![b' '; 9 * 1024 * 1024];
    let too_big = send_as(addr, ca, Method::POST, "/mutate", huge, false).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    // The webhook still serves.
    let response = webhook.review(&fixture("no-annotation")).await;
    assert_eq!(response["allowed"], true);
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn http2_clients_are_served_too() {
    let webhook = start().await;
    let review = fixture("one-container");
    let answer = send_as(
        webhook.injector.webhook_addr,
        &webhook.ca_pem,
        Method::POST,
        "/mutate?timeout=10s",
        serde_json::to_vec(&review).unwrap(),
        true,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    patch_of(&answer.json()["response"]);
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn results_are_counted_and_the_admin_port_answers() {
    let webhook = start().await;
    for name in ["one-container", "no-annotation", "invalid-annotation"] {
        webhook.review(&fixture(name)).await;
    }
    let mut injected = fixture("one-container");
    let response = webhook.review(&injected).await;
    json_patch::patch(&mut injected["request"]["object"], &patch_of(&response)).unwrap();
    webhook.review(&injected).await;
    webhook.post(b"garbage".to_vec()).await;

    assert_eq!(webhook.admin_get("/healthz").await.0, 200);
    assert_eq!(webhook.admin_get("/readyz").await.0, 200);
    let (status, metrics) = webhook.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"tunnel_injector_injections_total{result="injected"} 2"#,
        r#"tunnel_injector_injections_total{result="skipped"} 1"#,
        r#"tunnel_injector_injections_total{result="refused"} 1"#,
        r#"tunnel_injector_injections_total{result="already_injected"} 1"#,
        r#"tunnel_injector_injections_total{result="error"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    webhook.injector.shutdown().await;
}

#[tokio::test]
async fn provided_certificate_files_are_reloaded_when_they_change() {
    tunnel_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let names = service_dns_names("tunnel-injector", "cluster-tunnel");
    let write = |g: &tunnel_injector::certs::GeneratedCert| {
        // Write next to the target and rename, as a Secret volume update does.
        for (file, contents) in [("tls.key", &g.key_pem), ("tls.crt", &g.cert_pem)] {
            let tmp = dir.path().join(format!(".{file}.tmp"));
            std::fs::write(&tmp, contents).unwrap();
            std::fs::rename(&tmp, dir.path().join(file)).unwrap();
        }
    };
    let first = generate(&names).unwrap();
    write(&first);
    let injector = Injector::start(
        config(CertSource::Files(CertFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: None,
        })),
        None,
    )
    .await
    .unwrap();
    let addr = injector.webhook_addr;
    let handshake = |ca: String| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tls_client(&ca, b"http/1.1")
            .connect(ServerName::try_from(SERVICE_HOST).unwrap(), tcp)
            .await
            .is_ok()
    };
    assert!(
        handshake(first.ca_pem.clone()).await,
        "serves the first certificate"
    );

    let second = generate(&names).unwrap();
    write(&second);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !handshake(second.ca_pem.clone()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !handshake(first.ca_pem.clone()).await,
        "the old certificate is gone"
    );

    // A broken rotation keeps the working certificate.
    std::fs::write(dir.path().join("tls.key"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(handshake(second.ca_pem.clone()).await);
    injector.shutdown().await;
}

/// The sidecar image and proxy port an injected "one-container" pod gets.
async fn injected_defaults(webhook: &Webhook) -> (String, Option<String>) {
    let review = fixture("one-container");
    let response = webhook.review(&review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&response)).unwrap();
    let sidecar = &pod["spec"]["initContainers"][0];
    let proxy = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TUNNEL_PROXY_LISTEN")
        .and_then(|e| e["value"].as_str().map(str::to_owned));
    (sidecar["image"].as_str().unwrap().to_owned(), proxy)
}

/// Polls until an injected pod gets `image`.
async fn wait_for_image(webhook: &Webhook, image: &str) -> Option<String> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (got, proxy) = injected_defaults(webhook).await;
        if got == image {
            return proxy;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar image stayed {got}, expected {image}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tunnel_configuration(image: &str, proxy_port: u16) -> Value {
    json!({
        "apiVersion": "cluster-tunnel.io/v1alpha1", "kind": "TunnelConfiguration",
        "metadata": { "name": "cluster-tunnel", "resourceVersion": "7" },
        "spec": {
            "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com" } } },
            "agent": { "image": "a:1" },
            "sidecar": { "image": image, "proxyPort": proxy_port, "logLevel": "debug" },
        },
    })
}

fn api_answer(body: Vec<u8>) -> http::Response<kube::client::Body> {
    http::Response::builder()
        .status(200)
        .header(CONTENT_TYPE, "application/json")
        .body(kube::client::Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn sidecar_defaults_follow_the_tunnel_configuration_without_a_restart() {
    tunnel_proto::tls::install_crypto_provider();
    let (service, mut api) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let mut cfg = config(CertSource::Generated {
        dns_names: service_dns_names("tunnel-injector", "cluster-tunnel"),
    });
    cfg.config_name = Some("cluster-tunnel".into());
    let injector = Injector::start(cfg, Some(kube::Client::new(service, "default")))
        .await
        .unwrap();
    let ca_pem = injector.generated_ca_pem().unwrap().to_owned();
    let webhook = Webhook { injector, ca_pem };
    let mut next = async || {
        tokio::time::timeout(TIMEOUT, api.next_request())
            .await
            .expect("the injector asks the API server")
            .expect("a request")
    };

    // It lists the one configuration by name...
    let (request, send) = next().await;
    let uri = request.uri().to_string();
    assert!(
        uri.starts_with("/apis/cluster-tunnel.io/v1alpha1/tunnelconfigurations?")
            && uri.contains("metadata.name%3Dcluster-tunnel"),
        "{uri}"
    );
    let list = json!({
        "apiVersion": "cluster-tunnel.io/v1alpha1", "kind": "TunnelConfigurationList",
        "metadata": { "resourceVersion": "7" },
        "items": [tunnel_configuration("registry.example/tunnel-sidecar:2", 18080)],
    });
    send.send_response(api_answer(serde_json::to_vec(&list).unwrap()));
    // ...and the next pod gets its defaults (the flags said another image and 17080).
    let proxy = wait_for_image(&webhook, "registry.example/tunnel-sidecar:2").await;
    assert_eq!(proxy.as_deref(), Some("127.0.0.1:18080"));

    // A change arrives on the watch: the pod after it gets the new image.
    let (request, send) = next().await;
    assert!(
        request.uri().to_string().contains("watch=true"),
        "{}",
        request.uri()
    );
    let event = json!({ "type": "MODIFIED", "object": tunnel_configuration("registry.example/tunnel-sidecar:3", 18080) });
    send.send_response(api_answer(
        format!("{}\n", serde_json::to_string(&event).unwrap()).into_bytes(),
    ));
    wait_for_image(&webhook, "registry.example/tunnel-sidecar:3").await;

    // Deleted: back to the flags.
    let (_, send) = next().await;
    let event = json!({ "type": "DELETED", "object": tunnel_configuration("registry.example/tunnel-sidecar:3", 18080) });
    send.send_response(api_answer(
        format!("{}\n", serde_json::to_string(&event).unwrap()).into_bytes(),
    ));
    let proxy = wait_for_image(&webhook, &template().image).await;
    assert_eq!(proxy.as_deref(), Some("127.0.0.1:17080"));
    webhook.injector.shutdown().await;
}
