//! TLS configuration shared by every component: one crypto provider (ring),
//! TLS 1.3 only, mutual authentication against the installation's CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of every tunnel connection.
pub const ALPN_H2: &[u8] = b"h2";

/// A failure to load certificates or build a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {what} from {path}: {reason}")]
    File {
        /// What the file should hold ("certificate chain", "private key", "CA bundle").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// rustls refused the material (key does not match, bad CA, ...).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("invalid CA for client verification: {0}")]
    Verifier(String),
}

/// The process's crypto provider: ring, with the cheapest strong suite first
/// (AES-128-GCM is faster than AES-256-GCM with AES-NI and equally safe here).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Installs [`provider`] as the process default. Call once at start-up;
/// calling again is harmless.
pub fn install_crypto_provider() {
    let _ = CryptoProvider::install_default(provider().as_ref().clone());
}

/// The files of one TLS identity and the CA that peers must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM CA bundle that peers' certificates must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `<dir>/<name>.pem`, `<dir>/<name>-key.pem` and `<dir>/ca.pem`, as the
    /// certificate command writes them.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            ca: dir.join("ca.pem"),
        }
    }
}

/// Reads a PEM certificate chain (`what` names it in errors).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA bundle")? {
        roots.add(cert).map_err(|e| TlsError::File {
            what: "CA bundle",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A server configuration that requires a client certificate chaining to the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    // Our own certificate first: a missing one is the likelier mistake.
    let chain = load_certs(&files.cert, "certificate chain")?;
    let key = load_key(&files.key)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(load_roots(&files.ca)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that presents our certificate and trusts only the CA.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    // Our own certificate first: a missing one is the likelier mistake.
    let chain = load_certs(&files.cert, "certificate chain")?;
    let key = load_key(&files.key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(&files.ca)?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The leaf certificate a TLS peer presented, if any.
pub fn peer_leaf(conn: &rustls::CommonState) -> Option<&CertificateDer<'static>> {
    conn.peer_certificates().and_then(|c| c.first())
}
