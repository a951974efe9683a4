//! Certificates for tests: an installation's CA and leaves in a temporary
//! directory, and a destination's certificate from the same CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tunnel_proto::tls::TlsFiles;

/// A CA and certificates for the given clusters and clients, in a temp dir.
pub struct Pki {
    /// The directory holding the PEM files.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Generates a fresh installation's certificates.
    pub fn new(clusters: &[&str], clients: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::generate_into(dir.path(), clusters, clients);
        Self { dir }
    }

    /// Generates (or adds to) the certificates in `dir`.
    pub fn generate_into(dir: &Path, clusters: &[&str], clients: &[&str]) {
        let opts = tunnel_identity::cert_dir::CertOptions {
            trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            clusters: clusters.iter().map(|s| s.to_string()).collect(),
            // "ns/sa" names a workload certificate.
            clients: clients
                .iter()
                .filter(|s| !s.contains('/'))
                .map(|s| s.to_string())
                .collect(),
            workloads: clients
                .iter()
                .filter(|s| s.contains('/'))
                .map(|s| s.to_string())
                .collect(),
            validity_days: 30,
        };
        tunnel_identity::cert_dir::generate(dir, &opts).expect("certificates");
    }

    /// The path of a file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// TLS files of `name` (e.g. "server", "agent-east", "client-app").
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), name)
    }
}

impl Pki {
    /// A TLS acceptor for destination services with a certificate for
    /// `server_names` issued by this installation's CA (so `ca.pem` verifies
    /// it), written to the `samples` subdirectory.
    pub fn sample_tls(&self, server_names: &[&str]) -> tokio_rustls::TlsAcceptor {
        let samples = self.path("samples");
        std::fs::create_dir_all(&samples).unwrap();
        for f in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(self.path(f), samples.join(f)).unwrap();
        }
        let opts = tunnel_identity::cert_dir::CertOptions {
            server_names: server_names.iter().map(|s| s.to_string()).collect(),
            ..tunnel_identity::cert_dir::CertOptions::new()
        };
        tunnel_identity::cert_dir::generate(&samples, &opts).expect("sample certificate");
        let files = TlsFiles::in_dir(&samples, "server");
        let certs = tunnel_proto::tls::load_certs(&files.cert, "sample certificate").unwrap();
        let key = tunnel_proto::tls::load_key(&files.key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(tunnel_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
