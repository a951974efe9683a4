//! The webhook's serving certificate: generated at start, or read from files
//! and reloaded when they change; and the TLS configuration that serves it.
//!
//! The API server verifies the webhook's certificate against the `caBundle`
//! of the `MutatingWebhookConfiguration`, for the name
//! `<service>.<namespace>.svc`. A generated certificate is signed by a CA made
//! in the same breath; both live only in memory (a restarted injector makes
//! new ones, and [`crate::ca_bundle`] puts the new CA in the configuration).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{CertifiedIssuer, SanType};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_identity::pki::{self, LeafUsage};
use tunnel_proto::tls::TlsError;

use crate::ca_bundle::BundlePolicy;
use crate::metrics::{InjectorMetrics, ResultLabel};

/// Lifetime of a generated CA and serving certificate. They exist only in the
/// process's memory, so they are replaced at every restart anyway.
pub const GENERATED_VALIDITY: time::Duration = time::Duration::days(3650);

/// The DNS names the API server may use for the webhook's Service.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A CA and a serving certificate it signed, PEM-encoded.
#[derive(Clone)]
pub struct GeneratedCert {
    /// The CA certificate (for the `caBundle`).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for GeneratedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCert")
            .field("key_pem", &"<secret>")
            .finish_non_exhaustive()
    }
}

/// Generates a self-signed CA and a serving certificate for `dns_names`
/// (ECDSA P-256, server authentication only).
pub fn generate(dns_names: &[String]) -> Result<GeneratedCert, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let not_after = now + GENERATED_VALIDITY;
    let ca = pki::ca_params(
        format!("tunnel-injector webhook CA {}", now.unix_timestamp()),
        now,
        not_after,
    );
    let ca = CertifiedIssuer::self_signed(ca, pki::new_key()?)?;

    let key = pki::new_key()?;
    let common_name = dns_names.get(2).or(dns_names.first()).cloned();
    let sans = dns_names
        .iter()
        .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    let leaf = pki::leaf_params(
        Some(common_name.unwrap_or_default()),
        sans,
        LeafUsage::Server,
        now,
        not_after,
    );
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(GeneratedCert {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving certificate that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate chain is no PEM.
    #[error("certificate chain: {0}")]
    Chain(#[source] rustls_pki_types::pem::Error),
    /// The certificate chain holds no certificate.
    #[error("certificate chain: no PEM certificate")]
    NoCertificate,
    /// The private key is no PEM key.
    #[error("private key: {0}")]
    Key(#[source] rustls_pki_types::pem::Error),
    /// rustls refuses the pair (the key does not match the certificate, ...).
    #[error("certificate and key: {0}")]
    Pair(#[source] rustls::Error),
    /// The certificate and key files, as a pair, are unusable.
    #[error("{} and {}: {source}", cert.display(), key.display())]
    Files {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What is wrong with them.
        #[source]
        source: Box<CertError>,
    },
    /// The CA bundle is no PEM.
    #[error("CA bundle {}: {source}", path.display())]
    CaBundle {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The CA bundle holds no certificate.
    #[error("CA bundle {}: no PEM certificate", path.display())]
    EmptyCaBundle {
        /// The file.
        path: PathBuf,
    },
}

/// Builds the rustls key of a PEM chain and key.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::Chain)?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(CertError::Key)?;
    CertifiedKey::from_der(chain, key, &tunnel_proto::tls::provider()).map_err(CertError::Pair)
}

/// The certificate the webhook presents now; swapped when files change.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    /// Starts with `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// The certificate presented now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The webhook's TLS configuration: TLS 1.3 with the project's ring provider,
/// no client certificates (the API server authenticates by the caBundle),
/// HTTP/2 and HTTP/1.1.
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The files of a provided serving certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle to put in the `caBundle`, when the injector keeps it.
    pub ca: Option<PathBuf>,
}

/// What was read from [`CertFiles`].
#[derive(Debug, Clone)]
pub struct LoadedFiles {
    /// The serving key.
    pub key: CertifiedKey,
    /// The CA file's contents, if any.
    pub ca_pem: Option<Vec<u8>>,
    /// Digest of everything read, to notice changes.
    pub digest: [u8; 32],
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl CertFiles {
    /// Reads and checks the files.
    pub fn load(&self) -> Result<LoadedFiles, CertError> {
        let cert = read(&self.cert, "certificate")?;
        let key_pem = read(&self.key, "private key")?;
        let ca_pem = match &self.ca {
            Some(path) => {
                let pem = read(path, "CA bundle")?;
                let count = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| CertError::CaBundle {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                if count == 0 {
                    return Err(CertError::EmptyCaBundle { path: path.clone() });
                }
                Some(pem)
            }
            None => None,
        };
        let key = certified_key(&cert, &key_pem).map_err(|e| CertError::Files {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source: Box::new(e),
        })?;
        let mut digest = Sha256::new();
        for part in [&cert, &key_pem, ca_pem.as_ref().unwrap_or(&Vec::new())] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        Ok(LoadedFiles {
            key,
            ca_pem,
            digest: digest.finalize().into(),
        })
    }
}

/// Re-reads the files every `interval` and, when their contents changed and
/// are valid, serves the new certificate and publishes the new CA (when the
/// injector keeps the `caBundle`).
/// Invalid files (a half-written rotation) keep the old certificate and are
/// retried at the next tick. Runs until `stop` is cancelled.
pub async fn watch_files(
    files: CertFiles,
    mut digest: [u8; 32],
    serving: Arc<ServingCert>,
    ca_bundle: Option<watch::Sender<BundlePolicy>>,
    interval: Duration,
    metrics: InjectorMetrics,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        match files.load() {
            Ok(loaded) if loaded.digest == digest => {}
            Ok(loaded) => {
                digest = loaded.digest;
                serving.replace(loaded.key);
                if let (Some(tx), Some(ca)) = (&ca_bundle, loaded.ca_pem) {
                    tx.send_if_modified(|policy| {
                        let new = BundlePolicy::Exact(ca);
                        let changed = *policy != new;
                        *policy = new;
                        changed
                    });
                }
                metrics
                    .certificate_reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            Err(error) => {
                metrics
                    .certificate_reloads
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                tracing::warn!(%error, "cannot reload the serving certificate; keeping the current one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    #[test]
    fn generated_certificates_verify_for_every_service_name() {
        tunnel_proto::tls::install_crypto_provider();
        let names = service_dns_names("tunnel-injector", "cluster-tunnel");
        assert_eq!(
            names,
            [
                "tunnel-injector",
                "tunnel-injector.cluster-tunnel",
                "tunnel-injector.cluster-tunnel.svc",
                "tunnel-injector.cluster-tunnel.svc.cluster.local",
            ]
        );
        let generated = generate(&names).unwrap();
        let key =
            certified_key(generated.cert_pem.as_bytes(), generated.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(generated.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            tunnel_proto::tls::provider(),
        )
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for name in &names {
            let server_name = rustls_pki_types::ServerName::try_from(name.clone()).unwrap();
            verifier
                .verify_server_cert(&key.cert[0], &[], &server_name, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = rustls_pki_types::ServerName::try_from("other.cluster-tunnel.svc").unwrap();
        assert!(
            verifier
                .verify_server_cert(&key.cert[0], &[], &other, &[], now)
                .is_err()
        );
    }

    #[test]
    fn broken_files_say_which() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(&["a".into()]).unwrap();
        let files = CertFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: Some(dir.path().join("ca.crt")),
        };
        let err = files.load().unwrap_err();
        assert!(
            matches!(
                err,
                CertError::Read {
                    what: "certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("tls.crt"), "{err}");
        std::fs::write(&files.cert, &generated.cert_pem).unwrap();
        std::fs::write(&files.key, &generated.key_pem).unwrap();
        std::fs::write(files.ca.as_ref().unwrap(), "not a certificate").unwrap();
        let err = files.load().unwrap_err();
        assert!(matches!(err, CertError::EmptyCaBundle { .. }), "{err}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        std::fs::write(files.ca.as_ref().unwrap(), &generated.ca_pem).unwrap();
        let other = generate(&["b".into()]).unwrap();
        std::fs::write(&files.key, &other.key_pem).unwrap();
        let err = files.load().unwrap_err();
        let CertError::Files { source, .. } = &err else {
            panic!("{err}");
        };
        assert!(matches!(**source, CertError::Pair(_)), "{err}");
        assert!(err.to_string().contains("tls.key"), "{err}");
        std::fs::write(&files.key, &generated.key_pem).unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.ca_pem.as_deref(), Some(generated.ca_pem.as_bytes()));
    }
}
