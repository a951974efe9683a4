//! Joining a hub without open-cluster-management, with the agent's key made
//! here and never sent anywhere (`--join-token-file`):
//!
//! 1. The agent's key and certificate are kept in a Secret of its own
//!    namespace (`--join-secret`), so that a restart needs no new token.
//! 2. When that Secret has no certificate, or one with less than a fifth of
//!    its lifetime left, the agent makes a new P-256 key, sends a
//!    `CertificateSigningRequest` for the signer [`SIGNER_NAME`] to the hub's
//!    API server (`--join-hub-api`) with the join token the hub's
//!    administrator gave (`tunnel-manager join-token`: a short-lived token of
//!    the cluster's own join service account), waits for the manager to sign
//!    it, and stores key and certificate in the Secret.
//! 3. Key and certificate are written to `--tls-key` and `--tls-cert` (an
//!    in-memory volume), which the agent reads and reloads when they change.
//!
//! The manager signs such a request only for this cluster's agent, and only
//! with this cluster's token (see `tunnel-manager`'s `csr` module). A token
//! that has expired by the time the certificate needs renewing is reported
//! (renew it with a new `join-token`); the running certificate stays in use
//! until then.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The signer of agent certificates (the hub's `tunnel-manager`).
pub const SIGNER_NAME: &str = "cluster-tunnel.io/agent";
/// Label of a join request: the cluster it is for.
pub const JOIN_CLUSTER_LABEL: &str = "cluster-tunnel.io/cluster";
/// How often a pending request is looked at.
pub const POLL: Duration = Duration::from_secs(2);
/// How long a request may stay unsigned before it is given up.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(300);
/// Delay before a failed join is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// The subject a join request for `cluster` asks for.
pub fn join_subject(cluster: &str) -> String {
    format!("cluster-tunnel:agent:{cluster}")
}

/// A join that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// A key or request could not be made.
    #[error("cannot make the key or the request: {0}")]
    Generate(#[from] rcgen::Error),
    /// An API request failed (to the hub or to this cluster).
    #[error("cannot {action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The hub refused the request.
    #[error("the hub denied certificate request {name}: {reason}")]
    Denied {
        /// The request.
        name: String,
        /// The manager's reason.
        reason: String,
    },
    /// The hub did not sign in time.
    #[error(
        "certificate request {0} was not signed within {SIGN_TIMEOUT:?}; is the hub's tunnel-manager running with --join?"
    )]
    Timeout(String),
    /// The key or certificate files could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The hub's API server address is no URL.
    #[error("the hub's API server {url:?}: {source}")]
    HubUrl {
        /// The address given.
        url: String,
        /// What is wrong with it.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The hub's CA bundle is no PEM certificate bundle.
    #[error("the hub's CA bundle: {0}")]
    HubCa(#[source] rustls_pki_types::pem::Error),
    /// No client for the hub could be made with these settings.
    #[error("cannot make a client for the hub: {0}")]
    HubClient(#[source] kube::Error),
}

fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> JoinError {
    let action = action.into();
    move |source| JoinError::Api { action, source }
}

/// Where the join happens.
#[derive(Clone)]
pub struct Join {
    /// The hub's API server, authenticated with the join token.
    pub hub: kube::Client,
    /// Secrets of the agent's namespace in this cluster.
    pub local: Api<Secret>,
    /// The Secret keeping key and certificate.
    pub secret: String,
    /// The cluster.
    pub cluster: String,
    /// Where the certificate is written.
    pub cert_file: PathBuf,
    /// Where the key is written.
    pub key_file: PathBuf,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("secret", &self.secret)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// `not_before` and `not_after` (Unix seconds) of a PEM certificate.
fn validity(cert_pem: &[u8]) -> Option<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = x509.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When a certificate valid `from`..`to` is renewed: a fifth of its life before the end.
pub fn renew_at(from: i64, to: i64) -> i64 {
    to - (to - from) / 5
}

fn data(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|b| b.0.clone())
}

impl Join {
    /// Makes sure a current certificate is in the Secret and the files;
    /// returns the Unix time at which it is to be renewed.
    pub async fn ensure(&self, now: i64) -> Result<i64, JoinError> {
        let existing = self
            .local
            .get_opt(&self.secret)
            .await
            .map_err(api(format!("read Secret {}", self.secret)))?;
        if let Some(secret) = &existing
            && let (Some(cert), Some(key)) = (data(secret, "tls.crt"), data(secret, "tls.key"))
            && let Some((from, to)) = validity(&cert)
            && now < renew_at(from, to)
        {
            self.write_files(&cert, &key)?;
            return Ok(renew_at(from, to));
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, join_subject(&self.cluster));
        params.distinguished_name = dn;
        let request = params.serialize_request(&key)?.pem()?;
        let cert = self.request(request.as_bytes()).await?;
        let key_pem = key.serialize_pem();
        self.store(existing, &cert, key_pem.as_bytes()).await?;
        self.write_files(&cert, key_pem.as_bytes())?;
        let (from, to) = validity(&cert).unwrap_or((now, now));
        tracing::info!(cluster = %self.cluster, secret = %self.secret, "agent certificate issued by the hub");
        Ok(renew_at(from, to))
    }

    /// Sends the request to the hub and waits for the certificate.
    async fn request(&self, pem: &[u8]) -> Result<Vec<u8>, JoinError> {
        let csrs: Api<CertificateSigningRequest> = Api::all(self.hub.clone());
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(format!("cluster-tunnel-join-{}-", self.cluster)),
                labels: Some(BTreeMap::from([(
                    JOIN_CLUSTER_LABEL.to_owned(),
                    self.cluster.clone(),
                )])),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                signer_name: SIGNER_NAME.into(),
                request: ByteString(pem.to_vec()),
                usages: Some(vec!["digital signature".into(), "client auth".into()]),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        };
        let created = csrs
            .create(&PostParams::default(), &csr)
            .await
            .map_err(api("send the certificate request to the hub"))?;
        let name = created.metadata.name.unwrap_or_default();
        tracing::info!(csr = %name, "certificate request sent to the hub");
        let deadline = tokio::time::Instant::now() + SIGN_TIMEOUT;
        loop {
            let current = csrs
                .get(&name)
                .await
                .map_err(api(format!("read certificate request {name}")))?;
            let status = current.status.unwrap_or_default();
            if let Some(denied) = status
                .conditions
                .iter()
                .flatten()
                .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
            {
                return Err(JoinError::Denied {
                    name,
                    reason: denied.message.clone().unwrap_or_default(),
                });
            }
            if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                return Ok(cert.0);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(JoinError::Timeout(name));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Keeps key and certificate in the Secret (created, or replaced with
    /// the version read).
    async fn store(
        &self,
        existing: Option<Secret>,
        cert: &[u8],
        key: &[u8],
    ) -> Result<(), JoinError> {
        let data = BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.to_vec())),
            ("tls.key".to_owned(), ByteString(key.to_vec())),
        ]);
        match existing {
            Some(mut secret) => {
                secret.data = Some(data);
                self.local
                    .replace(&self.secret, &PostParams::default(), &secret)
                    .await
                    .map_err(api(format!("update Secret {}", self.secret)))?;
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.secret.clone()),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(data),
                    ..Secret::default()
                };
                self.local
                    .create(&PostParams::default(), &secret)
                    .await
                    .map_err(api(format!("create Secret {}", self.secret)))?;
            }
        }
        Ok(())
    }

    fn write_files(&self, cert: &[u8], key: &[u8]) -> Result<(), JoinError> {
        for (path, bytes) in [(&self.key_file, key), (&self.cert_file, cert)] {
            if std::fs::read(path).is_ok_and(|b| b == bytes) {
                continue;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|source| JoinError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Keeps the certificate current forever: renews it when due, retries
    /// after [`RETRY`] when that fails.
    pub async fn run(self) {
        loop {
            let now = unix_now();
            let wait = match self.ensure(now).await {
                Ok(at) => Duration::from_secs(u64::try_from(at - now).unwrap_or(0).max(60)),
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the agent certificate; retrying");
                    RETRY
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A client for the hub's API server at `url`, trusting `ca_pem` (or the
/// system's roots when `None`), authenticated with the token in `token_file`
/// (re-read as it changes).
pub fn hub_client(
    url: &str,
    ca_pem: Option<&[u8]>,
    token_file: &str,
) -> Result<kube::Client, JoinError> {
    let uri = url.parse().map_err(|source| JoinError::HubUrl {
        url: url.to_owned(),
        source,
    })?;
    let mut config = kube::Config::new(uri);
    if let Some(pem) = ca_pem {
        let roots: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(JoinError::HubCa)?;
        config.root_cert = Some(roots);
    }
    config.auth_info.token_file = Some(token_file.to_owned());
    kube::Client::try_from(config).map_err(JoinError::HubClient)
}

#[cfg(test)]
mod tests {
    //! The join against two mocked API servers (`tower_test`): the hub's and
    //! this cluster's, each with its exact request sequence, under paused time.

    use base64::Engine as _;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn client() -> (kube::Client, Handle) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(service, "cluster-tunnel-agent"), handle)
    }

    /// Serves (method, path, status, answer or `None` to echo) in order;
    /// `hook` may change an answer from the request body.
    fn serve(
        mut handle: Handle,
        expected: Vec<(Method, &'static str, u16, Option<Value>)>,
        hook: fn(&Value, Value) -> Value,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let mut bodies = Vec::new();
            for (method, path, status, answer) in expected {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!((req.method(), req.uri().path()), (&method, path));
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let answer = hook(&body, answer.unwrap_or_else(|| body.clone()));
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
                bodies.push(body);
            }
            bodies
        })
    }

    const SECRET: &str = "/api/v1/namespaces/cluster-tunnel-agent/secrets/cluster-tunnel-agent-tls";
    const SECRETS: &str = "/api/v1/namespaces/cluster-tunnel-agent/secrets";
    const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    const CSR: &str =
        "/apis/certificates.k8s.io/v1/certificatesigningrequests/cluster-tunnel-join-east-abcde";

    fn not_found() -> Option<Value> {
        Some(
            json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404 }),
        )
    }

    fn join(hub: kube::Client, local: kube::Client, dir: &std::path::Path) -> Join {
        Join {
            hub,
            local: Api::namespaced(local, "cluster-tunnel-agent"),
            secret: "cluster-tunnel-agent-tls".into(),
            cluster: "east".into(),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
        }
    }

    /// A stand-in for what the hub signs: a certificate valid `days` from `from`.
    fn cert(from: time::OffsetDateTime, days: i64) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.not_before = from;
        p.not_after = from + time::Duration::days(days);
        p.self_signed(&key).unwrap().pem()
    }

    fn pending_csr(certificate: Option<&str>) -> Option<Value> {
        let mut v = json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": { "name": "cluster-tunnel-join-east-abcde" },
            "spec": { "signerName": SIGNER_NAME, "request": "" },
            "status": {},
        });
        if let Some(c) = certificate {
            v["status"]["certificate"] = json!(b64(c.as_bytes()));
        }
        Some(v)
    }

    fn named(_: &Value, mut answer: Value) -> Value {
        if answer["metadata"]["generateName"].is_string() {
            answer["metadata"]["name"] = json!("cluster-tunnel-join-east-abcde");
        }
        answer
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_agent_makes_its_key_here_and_stores_what_the_hub_signed() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_handle) = client();
        let (local, local_handle) = client();
        let issued = cert(time::OffsetDateTime::now_utc(), 90);
        let issued_static: &'static str = Box::leak(issued.clone().into_boxed_str());
        let hub_server = serve(
            hub_handle,
            vec![
                (Method::POST, CSRS, 201, None),
                // Pending, then signed.
                (Method::GET, CSR, 200, pending_csr(None)),
                (Method::GET, CSR, 200, pending_csr(Some(issued_static))),
            ],
            named,
        );
        let local_server = serve(
            local_handle,
            vec![
                (Method::GET, SECRET, 404, not_found()),
                (Method::POST, SECRETS, 201, None),
            ],
            |_, a| a,
        );
        let j = join(hub, local, dir.path());
        let renew = j.ensure(unix_now()).await.unwrap();
        let hub_bodies = hub_server.await.unwrap();
        let local_bodies = local_server.await.unwrap();
        // The request: for east's agent, labelled for east, our signer; no key in it.
        let csr = &hub_bodies[0];
        assert_eq!(csr["metadata"]["labels"][JOIN_CLUSTER_LABEL], "east");
        assert_eq!(csr["spec"]["signerName"], SIGNER_NAME);
        let request = base64::engine::general_purpose::STANDARD
            .decode(csr["spec"]["request"].as_str().unwrap())
            .unwrap();
        let request = String::from_utf8(request).unwrap();
        assert!(
            request.contains("CERTIFICATE REQUEST") && !csr.to_string().contains("PRIVATE KEY")
        );
        // The key stays here: in this cluster's Secret and the agent's file.
        let secret = &local_bodies[1];
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["tls.key"].as_str().unwrap())
            .unwrap();
        assert!(String::from_utf8_lossy(&key).contains("PRIVATE KEY"));
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), key);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(),
            issued
        );
        let (from, to) = validity(issued.as_bytes()).unwrap();
        assert_eq!(renew, renew_at(from, to));
    }

    #[tokio::test]
    async fn a_current_certificate_is_reused_without_asking_the_hub() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_handle) = client();
        let (local, local_handle) = client();
        let now = time::OffsetDateTime::now_utc();
        let current = cert(now - time::Duration::days(10), 90);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "cluster-tunnel-agent-tls", "resourceVersion": "3" },
            "data": { "tls.crt": b64(current.as_bytes()), "tls.key": b64(b"KEY") },
        });
        // Not one request to the hub.
        let hub_server = serve(hub_handle, vec![], |_, a| a);
        let local_server = serve(
            local_handle,
            vec![(Method::GET, SECRET, 200, Some(secret))],
            |_, a| a,
        );
        let j = join(hub, local, dir.path());
        j.ensure(now.unix_timestamp()).await.unwrap();
        hub_server.await.unwrap();
        local_server.await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"KEY");
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_with_a_fifth_of_its_life_left_is_renewed_and_a_denial_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, hub_handle) = client();
        let (local, local_handle) = client();
        let now = time::OffsetDateTime::now_utc();
        let old = cert(now - time::Duration::days(73), 90);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "cluster-tunnel-agent-tls", "resourceVersion": "3" },
            "data": { "tls.crt": b64(old.as_bytes()), "tls.key": b64(b"OLD") },
        });
        let mut denied = pending_csr(None).unwrap();
        denied["status"]["conditions"] = json!([{ "type": "Denied", "status": "True", "message": "not with cluster east's join token" }]);
        let hub_server = serve(
            hub_handle,
            vec![
                (Method::POST, CSRS, 201, None),
                (Method::GET, CSR, 200, Some(denied)),
            ],
            named,
        );
        let local_server = serve(
            local_handle,
            vec![(Method::GET, SECRET, 200, Some(secret))],
            |_, a| a,
        );
        let j = join(hub, local, dir.path());
        let err = j.ensure(now.unix_timestamp()).await.unwrap_err();
        assert!(err.to_string().contains("join token"), "{err}");
        hub_server.await.unwrap();
        local_server.await.unwrap();
    }
}
