//! The signer: a CA kept in a Secret of the manager's namespace (generated
//! when absent), and the certificates it issues into Secrets — the servers',
//! one per managed cluster's agent (`spiffe://<td>/agent/<cluster>`) and one
//! per injection-enabled namespace for its sidecars
//! (`spiffe://<td>/client/sidecar-<namespace>`, see [`crate::namespaces`]).
//! A certificate is re-issued when a fifth of its lifetime is left, when it
//! is not signed by the current CA, or when it cannot be read.
//!
//! Time is a parameter everywhere, so tests decide what "now" is.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PatchParams, PostParams};
use rcgen::{Issuer, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};
use tunnel_api::labels::MANAGED_BY;
use tunnel_identity::Identity;
use tunnel_identity::pki::{self, LeafUsage, PkiError};

/// Field manager of everything the manager applies.
pub const FIELD_MANAGER: &str = "tunnel-manager";
/// Lifetime of a generated CA.
pub const CA_VALIDITY: Duration = Duration::days(3650);

/// A failure of the signer.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA Secret exists but cannot be used.
    #[error("signer Secret {name} is unusable: {source}")]
    BadCa {
        /// The Secret.
        name: String,
        /// What is wrong.
        #[source]
        source: CaError,
    },
    /// The API server failed a request.
    #[error("cannot {action} Secret {name}: {source}")]
    Api {
        /// get, create, apply.
        action: &'static str,
        /// The Secret.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Why a certificate and key (a Secret's `tls.crt` and `tls.key`) make no CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The certificate is no PEM.
    #[error("tls.crt is not a PEM certificate: {0}")]
    Certificate(#[source] rustls_pki_types::pem::Error),
    /// The key is no PEM key rcgen can use.
    #[error("tls.key: {0}")]
    Key(#[source] rcgen::Error),
    /// The certificate is no X.509 certificate.
    #[error("cannot parse tls.crt: {0}")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The key is another certificate's.
    #[error("tls.key does not belong to tls.crt")]
    KeyMismatch,
    /// The certificate's expiry cannot be read.
    #[error(transparent)]
    Validity(PkiError),
    /// The certificate's subject cannot be signed with.
    #[error(transparent)]
    Subject(PkiError),
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// A proxy server, with the DNS names and IPs agents and clients dial.
    Server {
        /// DNS names or IP literals.
        names: Vec<String>,
    },
    /// The agent of one managed cluster.
    Agent {
        /// The cluster's name.
        cluster: String,
    },
    /// A client of the servers' client port (the manager itself, sidecars).
    Client {
        /// The client's name.
        name: String,
    },
}

impl Leaf {
    /// The identity this leaf's certificate proves.
    pub fn identity(&self) -> Identity {
        match self {
            Leaf::Server { .. } => Identity::Server,
            Leaf::Agent { cluster } => Identity::Agent {
                cluster: cluster.clone(),
            },
            Leaf::Client { name } => Identity::Client { name: name.clone() },
        }
    }

    /// The identity URI of this leaf.
    pub fn uri(&self, trust_domain: &str) -> String {
        self.identity().uri(trust_domain)
    }

    fn usage(&self) -> LeafUsage {
        match self {
            Leaf::Server { .. } => LeafUsage::ServerAndClient,
            Leaf::Agent { .. } | Leaf::Client { .. } => LeafUsage::Client,
        }
    }
}

/// A certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The CA.
pub struct Signer {
    /// The CA certificate and key.
    pub ca: Issued,
    issuer: Issuer<'static, KeyPair>,
    subject_der: Vec<u8>,
    /// Subject key identifier: leaves name it as their authority key id.
    key_id: Option<Vec<u8>>,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new CA valid from `now` for [`CA_VALIDITY`].
    pub fn generate(trust_domain: &str, now: OffsetDateTime) -> Result<Self, SignerError> {
        let key = pki::new_key()?;
        let params = pki::ca_params(format!("{trust_domain} signer"), now, now + CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem()).map_err(|source| SignerError::BadCa {
            name: "(generated)".into(),
            source,
        })
    }

    /// A CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(CaError::Certificate)?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(CaError::Parse)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let not_after = pki::not_after(&x509).map_err(CaError::Validity)?;
        let subject_der = x509.subject().as_raw().to_vec();
        let key_id = pki::subject_key_id(&x509);
        let issuer = pki::issuer_of(&x509, key).map_err(CaError::Subject)?;
        Ok(Self {
            ca: Issued {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
            issuer,
            subject_der,
            key_id,
            not_after,
        })
    }

    /// Issues a certificate for `leaf`, valid from `now` for `validity`
    /// (never beyond the CA).
    pub fn issue(
        &self,
        leaf: &Leaf,
        trust_domain: &str,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Issued, SignerError> {
        let key = pki::new_key()?;
        let uri = leaf.uri(trust_domain);
        let mut sans = vec![SanType::URI(uri.clone().try_into()?)];
        if let Leaf::Server { names } = leaf {
            for name in names {
                sans.push(match name.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(name.clone().try_into()?),
                });
            }
        }
        let not_after = (now + validity).min(self.not_after);
        let params = pki::leaf_params(Some(uri), sans, leaf.usage(), now, not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Whether `cert_pem` must be re-issued at `now`: unreadable, not signed
    /// by this CA, or less than a fifth of its lifetime left.
    pub fn needs_renewal(&self, cert_pem: &[u8], now: OffsetDateTime) -> bool {
        let Ok(der) = CertificateDer::from_pem_slice(cert_pem) else {
            return true;
        };
        let Ok((_, x509)) = x509_parser::parse_x509_certificate(&der) else {
            return true;
        };
        if x509.issuer().as_raw() != self.subject_der.as_slice()
            || x509.subject().as_raw() == x509.issuer().as_raw()
        {
            // Another CA's, or self-signed.
            return true;
        }
        let authority = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        if self.key_id.is_some() && authority != self.key_id {
            // Same name, another key: a replaced CA.
            return true;
        }
        let v = x509.validity();
        let (from, to) = (v.not_before.timestamp(), v.not_after.timestamp());
        let left = to - now.unix_timestamp();
        left * 5 < to - from
    }
}

/// A certificate request (PKCS #10) that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a PEM `CERTIFICATE REQUEST`.
    #[error("not a PEM CERTIFICATE REQUEST")]
    NotPem,
    /// The DER does not parse.
    #[error("the certificate request does not parse: {0}")]
    Parse(String),
    /// Its signature does not verify: the sender does not hold the key.
    #[error("the certificate request's signature does not verify")]
    BadSignature,
    /// A key type the signer does not issue for.
    #[error("unsupported public key algorithm {0}")]
    UnsupportedKey(String),
    /// The subject holds something else than UTF-8 or printable text.
    #[error("the subject is not text")]
    Subject,
}

/// A certificate request whose signature verified: the subject it asks for
/// and its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// Common names of the subject (a well-formed request has one).
    pub common_names: Vec<String>,
    /// Organizations (OCM's groups).
    pub organizations: Vec<String>,
    /// Organizational units.
    pub organizational_units: Vec<String>,
    key: RequestKey,
}

/// The public key of a request, as rcgen writes it into a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestKey {
    alg: &'static rcgen::SignatureAlgorithm,
    key: Vec<u8>,
}

impl rcgen::PublicKeyData for RequestKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl CertRequest {
    /// Reads a PEM certificate request and verifies its signature.
    pub fn from_pem(pem: &[u8]) -> Result<Self, RequestError> {
        use rustls_pki_types::CertificateSigningRequestDer;
        use x509_parser::oid_registry as oids;
        use x509_parser::prelude::FromDer as _;
        let der =
            CertificateSigningRequestDer::from_pem_slice(pem).map_err(|_| RequestError::NotPem)?;
        let (rest, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .map_err(|e| RequestError::Parse(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RequestError::Parse("trailing bytes".into()));
        }
        req.verify_signature()
            .map_err(|_| RequestError::BadSignature)?;
        let info = &req.certification_request_info;
        let spki = &info.subject_pki;
        let oid = &spki.algorithm.algorithm;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let alg: &'static rcgen::SignatureAlgorithm = if *oid == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
            match curve {
                Some(c) if c == oids::OID_EC_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                Some(c) if c == oids::OID_NIST_EC_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                other => {
                    return Err(RequestError::UnsupportedKey(format!(
                        "EC curve {}",
                        other.map_or_else(|| "(none)".into(), |c| c.to_id_string())
                    )));
                }
            }
        } else if *oid == oids::OID_SIG_ED25519 {
            &rcgen::PKCS_ED25519
        } else if *oid == oids::OID_PKCS1_RSAENCRYPTION {
            &rcgen::PKCS_RSA_SHA256
        } else {
            return Err(RequestError::UnsupportedKey(oid.to_id_string()));
        };
        let text = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
            it.map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .map_err(|_| RequestError::Subject)
            })
            .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            common_names: text(&mut info.subject.iter_common_name())?,
            organizations: text(&mut info.subject.iter_organization())?,
            organizational_units: text(&mut info.subject.iter_organizational_unit())?,
            key: RequestKey {
                alg,
                key: spki.subject_public_key.data.to_vec(),
            },
        })
    }
}

impl Signer {
    /// Signs `request` for `leaf`: the certificate keeps the subject the
    /// request asked for (its one common name, as OCM's registration agent
    /// checks it) and carries the identity URI of `leaf`, which is the only
    /// name the servers read; nothing else the request asks for (other
    /// names, extensions) is copied. Valid from `now` for `validity`, never
    /// beyond the CA. Returns the certificate, PEM.
    pub fn sign_request(
        &self,
        request: &CertRequest,
        leaf: &Leaf,
        trust_domain: &str,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<String, SignerError> {
        let sans = vec![SanType::URI(leaf.uri(trust_domain).try_into()?)];
        let not_after = (now + validity).min(self.not_after);
        // Whatever the leaf, a signed request makes a client certificate.
        let params = pki::leaf_params(
            request.common_names.first().cloned(),
            sans,
            LeafUsage::Client,
            now,
            not_after,
        );
        let cert = params.signed_by(&request.key, &self.issuer)?;
        Ok(cert.pem())
    }
}

fn data(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
}

/// A `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and `ca.crt`.
pub fn tls_secret(
    name: &str,
    namespace: &str,
    issued: &Issued,
    ca_pem: &str,
    owner: Option<OwnerReference>,
) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        "tls.crt".into(),
        ByteString(issued.cert_pem.clone().into_bytes()),
    );
    data.insert(
        "tls.key".into(),
        ByteString(issued.key_pem.clone().into_bytes()),
    );
    data.insert("ca.crt".into(), ByteString(ca_pem.as_bytes().to_vec()));
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn api_error(action: &'static str, name: &str) -> impl FnOnce(kube::Error) -> SignerError {
    let name = name.to_owned();
    move |source| SignerError::Api {
        action,
        name,
        source,
    }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

/// Reads the signer Secret `name`, creating it with a new CA when absent
/// (a concurrent creation by another replica is read back).
pub async fn ensure_signer(
    api: &Api<Secret>,
    name: &str,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<Signer, SignerError> {
    let from_secret = |secret: &Secret| {
        let cert = data(secret, "tls.crt").unwrap_or_default();
        let key = data(secret, "tls.key").unwrap_or_default();
        Signer::from_pem(
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
        )
        .map_err(|source| SignerError::BadCa {
            name: name.to_owned(),
            source,
        })
    };
    match api.get_opt(name).await.map_err(api_error("get", name))? {
        Some(secret) => from_secret(&secret),
        None => {
            let signer = Signer::generate(trust_domain, now)?;
            let ns = api_namespace(api);
            let secret = tls_secret(name, &ns, &signer.ca, &signer.ca.cert_pem, None);
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = name, "signer CA generated");
                    Ok(signer)
                }
                Err(e) if is_status(&e, 409) => {
                    let secret = api.get(name).await.map_err(api_error("get", name))?;
                    from_secret(&secret)
                }
                Err(e) => Err(api_error("create", name)(e)),
            }
        }
    }
}

fn api_namespace(api: &Api<Secret>) -> String {
    api.namespace().unwrap_or("default").to_owned()
}

/// What [`ensure_leaf`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafOutcome {
    /// The Secret's certificate is good.
    Current,
    /// A certificate was issued (new, renewed or replaced).
    Issued,
}

/// Makes the Secret `name` hold a current certificate for `leaf`: read, and
/// when missing or due for renewal, re-issued and applied (server-side).
/// Returns the Secret as it now is.
#[allow(clippy::too_many_arguments)]
pub async fn ensure_leaf(
    api: &Api<Secret>,
    name: &str,
    leaf: &Leaf,
    signer: &Signer,
    trust_domain: &str,
    validity: Duration,
    owner: Option<OwnerReference>,
    now: OffsetDateTime,
) -> Result<(Secret, LeafOutcome), SignerError> {
    let existing = api.get_opt(name).await.map_err(api_error("get", name))?;
    ensure_leaf_over(
        api,
        name,
        existing,
        leaf,
        signer,
        trust_domain,
        validity,
        owner,
        now,
    )
    .await
}

/// [`ensure_leaf`] for a caller that has already read the Secret
/// (`existing`, `None` when absent) — to look at it before anything is
/// written, as the sidecar certificates do with Secrets they do not manage.
#[allow(clippy::too_many_arguments)]
pub async fn ensure_leaf_over(
    api: &Api<Secret>,
    name: &str,
    existing: Option<Secret>,
    leaf: &Leaf,
    signer: &Signer,
    trust_domain: &str,
    validity: Duration,
    owner: Option<OwnerReference>,
    now: OffsetDateTime,
) -> Result<(Secret, LeafOutcome), SignerError> {
    if let Some(secret) = existing {
        let cert = data(&secret, "tls.crt").unwrap_or_default();
        let ca = data(&secret, "ca.crt").unwrap_or_default();
        if !signer.needs_renewal(&cert, now) && ca == signer.ca.cert_pem.as_bytes() {
            return Ok((secret, LeafOutcome::Current));
        }
    }
    let namespace = api_namespace(api);
    let issued = signer.issue(leaf, trust_domain, now, validity)?;
    let secret = tls_secret(name, &namespace, &issued, &signer.ca.cert_pem, owner);
    let mut body = serde_json::to_value(&secret).expect("a Secret serializes");
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(body),
    )
    .await
    .map_err(api_error("apply", name))?;
    tracing::info!(%namespace, secret = name, identity = %leaf.uri(trust_domain), "certificate issued");
    Ok((secret, LeafOutcome::Issued))
}

/// Whether the signer wrote `secret` (it carries [`MANAGED_BY`] with
/// its value; Helm's `managed-by: Helm` is someone else's). Secrets in other
/// namespaces than the manager's — the sidecars' — are overwritten or deleted
/// only when this holds; one an administrator (or cert-manager) made is left alone.
pub fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster-tunnel";

    #[test]
    fn a_leaf_is_renewed_when_a_fifth_of_its_lifetime_is_left() {
        let t0 = OffsetDateTime::now_utc();
        let signer = Signer::generate(TD, t0).unwrap();
        let leaf = Leaf::Agent {
            cluster: "east".into(),
        };
        let issued = signer.issue(&leaf, TD, t0, Duration::days(100)).unwrap();
        let cert = issued.cert_pem.as_bytes();
        // Lifetime is 100 days + 1 h backdate: renewal starts just before day 80.
        assert!(!signer.needs_renewal(cert, t0));
        assert!(!signer.needs_renewal(cert, t0 + Duration::days(79)));
        assert!(signer.needs_renewal(cert, t0 + Duration::days(81)));
        assert!(signer.needs_renewal(cert, t0 + Duration::days(101)));
        // Another CA's certificate, or garbage, is replaced at once.
        let other = Signer::generate(TD, t0).unwrap();
        assert!(other.needs_renewal(cert, t0));
        assert!(signer.needs_renewal(b"nonsense", t0));
        assert!(signer.needs_renewal(signer.ca.cert_pem.as_bytes(), t0));
    }

    #[test]
    fn only_secrets_the_signer_wrote_count_as_managed() {
        let now = OffsetDateTime::now_utc();
        let signer = Signer::generate(TD, now).unwrap();
        let mut secret = tls_secret("s", "fleet", &signer.ca, &signer.ca.cert_pem, None);
        assert!(is_managed(&secret));
        // Helm's (or anyone's) managed-by, or none: someone else's.
        secret.metadata.labels = Some(BTreeMap::from([(
            MANAGED_BY.0.to_owned(),
            "Helm".to_owned(),
        )]));
        assert!(!is_managed(&secret));
        secret.metadata.labels = None;
        assert!(!is_managed(&secret));
    }

    #[test]
    fn an_agent_certificate_carries_the_cluster_identity_and_is_verified_by_the_ca() {
        let now = OffsetDateTime::now_utc();
        let signer = Signer::generate(TD, now).unwrap();
        let issued = signer
            .issue(
                &Leaf::Agent {
                    cluster: "east".into(),
                },
                TD,
                now,
                Duration::days(30),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://cluster-tunnel/agent/east"]);
        let ca_der = CertificateDer::from_pem_slice(signer.ca.cert_pem.as_bytes()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(x509.issuer().as_raw(), ca.subject().as_raw());
        // A signer read back from its PEM signs the same way.
        let again = Signer::from_pem(&signer.ca.cert_pem, &signer.ca.key_pem).unwrap();
        assert!(!again.needs_renewal(issued.cert_pem.as_bytes(), now));
    }

    #[test]
    fn a_ca_secret_that_cannot_sign_says_which_file_is_wrong() {
        let now = OffsetDateTime::now_utc();
        let (a, b) = (
            Signer::generate(TD, now).unwrap(),
            Signer::generate(TD, now).unwrap(),
        );
        let err = Signer::from_pem(&a.ca.cert_pem, &b.ca.key_pem).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");
        let err = Signer::from_pem("", &a.ca.key_pem).unwrap_err();
        assert!(matches!(err, CaError::Certificate(_)), "{err}");
        assert!(err.to_string().starts_with("tls.crt"), "{err}");
        let err = Signer::from_pem(&a.ca.cert_pem, "not a key").unwrap_err();
        assert!(matches!(err, CaError::Key(_)), "{err}");
        assert!(err.to_string().starts_with("tls.key"), "{err}");
    }
}
