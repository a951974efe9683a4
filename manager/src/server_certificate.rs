//! The servers' certificate, kept current: the Secret `--server-tls-secret`
//! holds a certificate from the signer for the servers' Service names (and
//! the entrypoint's host name), renewed like every other leaf; with
//! `--test-client-secret`, the helm test's client certificate too. Looked
//! at again every [`RESYNC`]; the outcome is the configuration's
//! `ServerCertificateReady` condition.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config_watch::CurrentConfiguration;
use crate::controller::{Clock, RESYNC};
use crate::signer::{self, Leaf, Signer};
use crate::status::StatusBoard;

/// The condition this loop owns.
pub const CONDITION: &str = "ServerCertificateReady";
/// Validity of the certificates while no configuration is known.
const DEFAULT_VALIDITY_DAYS: u32 = 90;

/// What keeping the servers' certificate needs.
pub struct ServerCertificate {
    /// Secrets of the manager's namespace.
    pub secrets: Api<Secret>,
    /// The servers' certificate Secret.
    pub secret_name: String,
    /// Names the certificate carries.
    pub names: Vec<String>,
    /// The helm test's client certificate Secret, if any.
    pub test_client: Option<String>,
    /// The signer.
    pub signer: Arc<Signer>,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// The configuration (its certificate validity).
    pub config: watch::Receiver<CurrentConfiguration>,
    /// Where the condition is reported.
    pub status: Arc<StatusBoard>,
    /// Now.
    pub clock: Clock,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("secret_name", &self.secret_name)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServerCertificate {
    /// One look: issues what is missing or due, logs what failed, and
    /// reports the servers' certificate in the configuration's status.
    pub async fn refresh(&self) {
        let validity_days = self
            .config
            .borrow()
            .as_ref()
            .map_or(DEFAULT_VALIDITY_DAYS, |c| {
                c.spec.signer.certificate_validity_days
            });
        let validity = time::Duration::days(i64::from(validity_days));
        let result = signer::ensure_leaf(
            &self.secrets,
            &self.secret_name,
            &Leaf::Server {
                names: self.names.clone(),
            },
            &self.signer,
            &self.trust_domain,
            validity,
            None,
            (self.clock)(),
        )
        .await;
        if let Err(error) = &result {
            tracing::warn!(%error, "server certificate");
        }
        if let Some(name) = &self.test_client
            && let Err(error) = signer::ensure_leaf(
                &self.secrets,
                name,
                &Leaf::Client { name: name.clone() },
                &self.signer,
                &self.trust_domain,
                validity,
                None,
                (self.clock)(),
            )
            .await
        {
            tracing::warn!(%error, "helm test client certificate");
        }
        let current = self.config.borrow().clone();
        if let Some(current) = current {
            let (ok, reason, message) = match result {
                Ok(_) => (
                    true,
                    "Issued",
                    format!("Secret {} is current", self.secret_name),
                ),
                Err(e) => (false, "IssueFailed", e.to_string()),
            };
            self.status
                .set(&current, CONDITION, ok, reason, message)
                .await;
        }
    }

    /// Looks every [`RESYNC`], until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let keep = async {
            loop {
                self.refresh().await;
                tokio::time::sleep(RESYNC).await;
            }
        };
        stop.run_until_cancelled(keep).await;
    }
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence, against kube's mocked API
    //! server (`tower_test`), each under a timeout.

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use http::Method;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    use serde_json::Value;
    use time::OffsetDateTime;

    use super::*;
    use crate::mock_api::{
        self, ApiHandle, Reply, TIMEOUT, finish, not_found, serve, status_reply,
    };

    const TD: &str = "cluster-tunnel";
    const SERVER_TLS: &str = "/api/v1/namespaces/cluster-tunnel/secrets/cluster-tunnel-server-tls";
    const TEST_CLIENT: &str = "/api/v1/namespaces/cluster-tunnel/secrets/helm-test-client";
    const STATUS: &str =
        "/apis/cluster-tunnel.io/v1alpha1/tunnelconfigurations/cluster-tunnel/status";

    fn keeper(test_client: Option<&str>) -> (ServerCertificate, ApiHandle) {
        let (client, handle) = mock_api::client();
        let now = OffsetDateTime::now_utc();
        let (_tx, config) = watch::channel(Some(mock_api::configuration(30)));
        let metrics = crate::metrics::ManagerMetrics::default();
        let keeper = ServerCertificate {
            secrets: Api::namespaced(client.clone(), "cluster-tunnel"),
            secret_name: "cluster-tunnel-server-tls".into(),
            names: vec![
                "cluster-tunnel-server.cluster-tunnel.svc".into(),
                "hub.example.com".into(),
            ],
            test_client: test_client.map(str::to_owned),
            signer: Arc::new(signer::Signer::generate(TD, now).unwrap()),
            trust_domain: TD.into(),
            config,
            status: Arc::new(StatusBoard::new(Api::all(client), vec![CONDITION], metrics)),
            clock: Arc::new(move || now),
        };
        (keeper, handle)
    }

    fn condition<'a>(status_body: &'a Value, type_: &str) -> &'a Value {
        status_body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} in {status_body}"))
    }

    fn certificate_names(secret: &Value) -> Vec<String> {
        let pem = BASE64
            .decode(secret["data"]["tls.crt"].as_str().unwrap())
            .unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_missing_server_certificate_is_issued_for_the_servers_names_and_reported() {
        let (keeper, handle) = keeper(Some("helm-test-client"));
        let server = serve(
            handle,
            vec![
                (Method::GET, SERVER_TLS, not_found()),
                (Method::PATCH, SERVER_TLS, Reply::Echo(None)),
                (Method::GET, TEST_CLIENT, not_found()),
                (Method::PATCH, TEST_CLIENT, Reply::Echo(None)),
                (Method::PATCH, STATUS, Reply::Echo(None)),
            ],
        );
        tokio::time::timeout(TIMEOUT, keeper.refresh())
            .await
            .expect("refreshed in time");
        let (_, bodies) = finish(server).await;
        assert_eq!(
            certificate_names(&bodies[1]),
            [
                "cluster-tunnel-server.cluster-tunnel.svc",
                "hub.example.com"
            ]
        );
        assert_eq!(bodies[3]["metadata"]["name"], "helm-test-client");
        let ready = condition(&bodies[4], CONDITION);
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["reason"], "Issued");
        assert_eq!(
            ready["message"],
            "Secret cluster-tunnel-server-tls is current"
        );
        assert_eq!(condition(&bodies[4], "Ready")["status"], "True");
    }

    #[tokio::test]
    async fn a_refused_certificate_is_reported_as_not_ready() {
        let (keeper, handle) = keeper(None);
        let server = serve(
            handle,
            vec![
                (Method::GET, SERVER_TLS, not_found()),
                (Method::PATCH, SERVER_TLS, status_reply(403, "Forbidden")),
                (Method::PATCH, STATUS, Reply::Echo(None)),
            ],
        );
        tokio::time::timeout(TIMEOUT, keeper.refresh())
            .await
            .expect("refreshed in time");
        let (_, bodies) = finish(server).await;
        let ready = condition(&bodies[2], CONDITION);
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "IssueFailed");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("cluster-tunnel-server-tls"),
            "{ready}"
        );
        assert_eq!(condition(&bodies[2], "Ready")["status"], "False");
    }
}
