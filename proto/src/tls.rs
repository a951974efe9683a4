//! TLS configuration shared by every component: one crypto provider (ring),
//! TLS 1.3 only, mutual authentication against the installation's CA.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_certs(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads a PEM certificate chain (`what` names it in errors).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read_file(path, what)?, path, what)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(&read_file(path, "private key")?, path)
}

fn parse_roots(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem, path, "CA bundle")? {
        roots.add(cert).map_err(|e| TlsError::File {
            what: "CA bundle",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The contents of [`TlsFiles`], read once so that what is compared and what
/// is built are the same bytes.
#[derive(PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl TlsFiles {
    fn read(&self) -> Result<Pem, TlsError> {
        // Our own certificate first: a missing one is the likelier mistake.
        Ok(Pem {
            cert: read_file(&self.cert, "certificate chain")?,
            key: read_file(&self.key, "private key")?,
            ca: read_file(&self.ca, "CA bundle")?,
        })
    }
}

fn build_server(files: &TlsFiles, pem: &Pem) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = parse_certs(&pem.cert, &files.cert, "certificate chain")?;
    let key = parse_key(&pem.key, &files.key)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(parse_roots(&pem.ca, &files.ca)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| key_mismatch(files, e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

fn build_client(files: &TlsFiles, pem: &Pem) -> Result<Arc<ClientConfig>, TlsError> {
    let chain = parse_certs(&pem.cert, &files.cert, "certificate chain")?;
    let key = parse_key(&pem.key, &files.key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(parse_roots(&pem.ca, &files.ca)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| key_mismatch(files, e))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// rustls's refusal of a certificate and key, naming both files.
fn key_mismatch(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::File {
        what: "private key matching the certificate",
        path: files.key.clone(),
        reason: format!("{e} (certificate {})", files.cert.display()),
    }
}

/// A server configuration that requires a client certificate chaining to the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    build_server(files, &files.read()?)
}

/// A client configuration that presents our certificate and trusts only the CA.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    build_client(files, &files.read()?)
}

/// How often, at most, a [`TlsSource`] re-reads its files.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The TLS configuration to use for the next handshake: fixed, or built from
/// [`TlsFiles`] and rebuilt when their contents change.
///
/// A source built from files re-reads them (at most every
/// [`RELOAD_CHECK_INTERVAL`], on [`TlsSource::current`]) and, when their
/// contents changed, builds a new configuration. A failed rebuild (a file
/// missing, bad PEM, a key that does not match the certificate: often a
/// rotation half-written) is logged naming the file, and the previous
/// configuration stays until the files are good again. Connections already
/// established are never touched; the new certificate, key and CA serve new
/// handshakes. Each configuration has its own session cache, so no session
/// resumes across a reload.
///
/// Cheap to clone; clones share the configuration.
pub struct TlsSource<C>(Arc<SourceInner<C>>);

/// The TLS source of a server: [`TlsSource::server`].
pub type ServerTls = TlsSource<ServerConfig>;
/// The TLS source of a client: [`TlsSource::client`].
pub type ClientTls = TlsSource<ClientConfig>;

struct SourceInner<C> {
    current: RwLock<Arc<C>>,
    watch: Option<Watch<C>>,
}

type Build<C> = fn(&TlsFiles, &Pem) -> Result<Arc<C>, TlsError>;

struct Watch<C> {
    files: TlsFiles,
    build: Build<C>,
    state: Mutex<WatchState>,
}

struct WatchState {
    interval: Duration,
    next_check: Instant,
    /// What the current configuration was built from.
    loaded: Pem,
    /// The last failure, not to repeat it every check.
    failed: Option<String>,
}

impl<C> Clone for TlsSource<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<C> std::fmt::Debug for TlsSource<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.watch {
            Some(w) => f
                .debug_struct("TlsSource")
                .field("files", &w.files)
                .finish_non_exhaustive(),
            None => f.write_str("TlsSource(fixed)"),
        }
    }
}

impl<C> From<Arc<C>> for TlsSource<C> {
    fn from(config: Arc<C>) -> Self {
        Self::fixed(config)
    }
}

impl TlsSource<ServerConfig> {
    /// A server source following `files` (see [`server_config`]).
    pub fn server(files: TlsFiles) -> Result<Self, TlsError> {
        Self::from_files(files, build_server)
    }
}

impl TlsSource<ClientConfig> {
    /// A client source following `files` (see [`client_config`]).
    pub fn client(files: TlsFiles) -> Result<Self, TlsError> {
        Self::from_files(files, build_client)
    }
}

impl<C> TlsSource<C> {
    /// Always `config`.
    pub fn fixed(config: Arc<C>) -> Self {
        Self(Arc::new(SourceInner {
            current: RwLock::new(config),
            watch: None,
        }))
    }

    fn from_files(files: TlsFiles, build: Build<C>) -> Result<Self, TlsError> {
        let loaded = files.read()?;
        let config = build(&files, &loaded)?;
        Ok(Self(Arc::new(SourceInner {
            current: RwLock::new(config),
            watch: Some(Watch {
                files,
                build,
                state: Mutex::new(WatchState {
                    interval: RELOAD_CHECK_INTERVAL,
                    next_check: Instant::now() + RELOAD_CHECK_INTERVAL,
                    loaded,
                    failed: None,
                }),
            }),
        })))
    }

    /// Checks the files at most every `interval` instead of
    /// [`RELOAD_CHECK_INTERVAL`] (zero: at every handshake).
    pub fn with_check_interval(self, interval: Duration) -> Self {
        if let Some(w) = &self.0.watch {
            let mut state = w.state.lock().unwrap_or_else(|e| e.into_inner());
            state.interval = interval;
            state.next_check = Instant::now() + interval;
        }
        self
    }

    /// The configuration for a new handshake, after re-reading the files if
    /// the check interval has passed. A handshake never waits for another
    /// one's check.
    pub fn current(&self) -> Arc<C> {
        if let Some(w) = &self.0.watch
            && let Ok(mut state) = w.state.try_lock()
        {
            let now = Instant::now();
            if now >= state.next_check {
                state.next_check = now + state.interval;
                let _ = self.check(w, &mut state);
            }
        }
        self.installed()
    }

    /// Re-reads the files now. `Ok(true)`: a new configuration serves new
    /// handshakes; `Ok(false)`: nothing changed (or the source is fixed);
    /// an error: the files are unusable and the previous configuration stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        match &self.0.watch {
            Some(w) => {
                let mut state = w.state.lock().unwrap_or_else(|e| e.into_inner());
                self.check(w, &mut state)
            }
            None => Ok(false),
        }
    }

    fn installed(&self) -> Arc<C> {
        self.0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check(&self, w: &Watch<C>, state: &mut WatchState) -> Result<bool, TlsError> {
        let result = w.files.read().and_then(|pem| {
            if pem == state.loaded {
                return Ok(None);
            }
            let config = (w.build)(&w.files, &pem)?;
            Ok(Some((pem, config)))
        });
        match result {
            Ok(None) => {
                state.failed = None;
                Ok(false)
            }
            Ok(Some((pem, config))) => {
                state.loaded = pem;
                state.failed = None;
                *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(
                    cert = %w.files.cert.display(),
                    key = %w.files.key.display(),
                    ca = %w.files.ca.display(),
                    "TLS files changed: new handshakes use the new certificate, key and CA"
                );
                Ok(true)
            }
            Err(err) => {
                let message = err.to_string();
                if state.failed.as_ref() != Some(&message) {
                    tracing::error!(%err, "cannot reload TLS files; the previous certificate, key and CA stay in use");
                    state.failed = Some(message);
                }
                Err(err)
            }
        }
    }
}

/// The leaf certificate a TLS peer presented, if any.
pub fn peer_leaf(conn: &rustls::CommonState) -> Option<&CertificateDer<'static>> {
    conn.peer_certificates().and_then(|c| c.first())
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;

    use super::*;
    use tunnel_identity::cert_dir::{CertOptions, generate};

    /// Issues (or re-issues) the server's and the east agent's certificates in
    /// `dir`, with a new CA when `dir` has none.
    fn issue(dir: &Path, server: bool, agent: bool) {
        let mut opts = CertOptions::new();
        if !server {
            opts.server_names.clear();
        }
        if agent {
            opts.clusters = vec!["east".into()];
        }
        generate(dir, &opts).unwrap();
    }

    fn leaf(dir: &Path, name: &str) -> CertificateDer<'static> {
        load_certs(&dir.join(format!("{name}.pem")), "test").unwrap()[0].clone()
    }

    /// A handshake in memory: the leaves the server and the client saw.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<(CertificateDer<'static>, CertificateDer<'static>), rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        Ok((
            peer_leaf(&s).unwrap().clone(),
            peer_leaf(&c).unwrap().clone(),
        ))
    }

    #[test]
    fn server_source_follows_its_files_and_keeps_the_last_good_config() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        issue(dir, true, true);
        let agent = || client_config(&TlsFiles::in_dir(dir, "agent-east")).unwrap();
        let source = ServerTls::server(TlsFiles::in_dir(dir, "server")).unwrap();
        let first = leaf(dir, "server");
        assert_eq!(handshake(source.current(), agent()).unwrap().1, first);
        assert!(!source.reload().unwrap(), "nothing changed");

        // Re-issued: the next handshake presents the new certificate.
        issue(dir, true, false);
        let second = leaf(dir, "server");
        assert_ne!(first, second);
        // Within the check interval the files are not read again.
        assert_eq!(handshake(source.current(), agent()).unwrap().1, first);
        assert!(source.reload().unwrap());
        assert_eq!(handshake(source.current(), agent()).unwrap().1, second);

        // Broken rewrites are refused, naming the file; the last good config stays.
        let files = TlsFiles::in_dir(dir, "server");
        let good_cert = std::fs::read(&files.cert).unwrap();
        let good_key = std::fs::read(&files.key).unwrap();
        std::fs::write(&files.cert, "not PEM at all").unwrap();
        let err = source.reload().unwrap_err().to_string();
        assert!(err.contains("server.pem"), "{err}");
        assert_eq!(handshake(source.current(), agent()).unwrap().1, second);
        std::fs::write(&files.cert, &good_cert).unwrap();
        std::fs::copy(dir.join("agent-east-key.pem"), &files.key).unwrap();
        let err = source.reload().unwrap_err().to_string();
        assert!(err.contains("server-key.pem"), "{err}");
        assert_eq!(handshake(source.current(), agent()).unwrap().1, second);
        std::fs::write(&files.key, &good_key).unwrap();
        let last_agent = agent();
        std::fs::remove_file(&files.ca).unwrap();
        let err = source.reload().unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
        assert_eq!(handshake(source.current(), last_agent).unwrap().1, second);
    }

    #[test]
    fn sources_check_their_files_on_handshakes_and_follow_a_ca_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        issue(dir, true, true);
        let server = ServerTls::server(TlsFiles::in_dir(dir, "server"))
            .unwrap()
            .with_check_interval(Duration::ZERO);
        let agent = ClientTls::client(TlsFiles::in_dir(dir, "agent-east"))
            .unwrap()
            .with_check_interval(Duration::ZERO);
        let old_agent = agent.current();
        let (seen_agent, _) = handshake(server.current(), agent.current()).unwrap();
        assert_eq!(seen_agent, leaf(dir, "agent-east"));

        // The agent's certificate is re-issued: the server sees the new one.
        issue(dir, false, true);
        let (seen_agent, _) = handshake(server.current(), agent.current()).unwrap();
        assert_eq!(seen_agent, leaf(dir, "agent-east"));

        // A new CA and new certificates for everyone: both sides follow, and
        // the old agent configuration is no longer trusted.
        std::fs::remove_file(dir.join("ca.pem")).unwrap();
        std::fs::remove_file(dir.join("ca-key.pem")).unwrap();
        issue(dir, true, true);
        let (seen_agent, seen_server) = handshake(server.current(), agent.current()).unwrap();
        assert_eq!(seen_agent, leaf(dir, "agent-east"));
        assert_eq!(seen_server, leaf(dir, "server"));
        assert!(handshake(server.current(), old_agent).is_err());
    }

    #[test]
    fn a_fixed_source_never_reloads() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), true, false);
        let config = server_config(&TlsFiles::in_dir(dir.path(), "server")).unwrap();
        let source = ServerTls::from(config.clone());
        assert!(Arc::ptr_eq(&source.current(), &config));
        assert!(!source.reload().unwrap());
    }
}
