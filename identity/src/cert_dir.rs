//! Certificates for a standalone installation: a CA and the leaf certificates of the
//! server, the agents and the clients, written as PEM files into one directory.
//!
//! This is the library behind the certificate command. Layout of the directory:
//! `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `agent-<cluster>.pem`,
//! `agent-<cluster>-key.pem`, `client-<name>.pem`, `client-<name>-key.pem`.
//! An existing CA in the directory is reused, so clusters and clients can be added later.
//!
//! This module issues the leaves ([`generate`]); `ca` loads or creates the CA,
//! `names` checks server names and the trust domain, `files` reads and
//! writes the files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{Issuer, KeyPair, SanType};
use time::{Duration, OffsetDateTime};

use crate::pki::{self, LeafUsage};
use crate::spiffe::{self as identity, Identity, IdentityError};

mod ca;
mod files;
mod names;

use ca::{check_issuer_name, load_or_create_ca};
use files::write_file;
use names::{server_san, validate_trust_domain};

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the server certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key.
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Lifetime of the leaf certificates when not configured.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Shortest lifetime of a newly created CA, so leaves can be re-issued for years.
pub const MIN_CA_VALIDITY_DAYS: u32 = 3650;

/// What to generate.
#[derive(Debug, Clone)]
pub struct CertOptions {
    /// Trust domain of the identity URIs (see [`identity::DEFAULT_TRUST_DOMAIN`]).
    pub trust_domain: String,
    /// DNS names or IP literals of the server certificate. When empty, no server
    /// certificate is (re-)issued.
    pub server_names: Vec<String>,
    /// Clusters to issue agent certificates for.
    pub clusters: Vec<String>,
    /// Clients to issue client certificates for.
    pub clients: Vec<String>,
    /// Workloads to issue workload certificates for, written `<namespace>/<service-account>`.
    pub workloads: Vec<String>,
    /// Lifetime of the leaf certificates, in days (at least 1). A new CA lives at least
    /// [`MIN_CA_VALIDITY_DAYS`]; no leaf outlives its CA.
    pub validity_days: u32,
}

impl CertOptions {
    /// Options for the default trust domain, `localhost`/`127.0.0.1`/`::1` server names,
    /// no clusters or clients, and [`DEFAULT_VALIDITY_DAYS`].
    pub fn new() -> Self {
        Self {
            trust_domain: identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            server_names: ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
            clusters: Vec::new(),
            clients: Vec::new(),
            workloads: Vec::new(),
            validity_days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

impl Default for CertOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of [`generate`].
#[derive(Debug)]
pub struct GeneratedCerts {
    /// The directory the files are in.
    pub dir: PathBuf,
    /// Every file written, in the order written (empty of a reused CA's files).
    pub written: Vec<PathBuf>,
}

/// Why certificates could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A cluster or client name is not a valid name.
    #[error(transparent)]
    InvalidName(#[from] IdentityError),
    /// A server name is neither an IP literal nor a DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The trust domain cannot be part of a URI SAN.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected trust domain.
        trust_domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `validity_days` was 0.
    #[error("validity must be at least one day")]
    ZeroValidity,
    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create directory").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Only one of the CA certificate and CA key exists.
    #[error(
        "{} exists but {} does not; restore it, or remove both to create a new CA",
        present.display(),
        missing.display()
    )]
    CaIncomplete {
        /// The CA file that exists.
        present: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
    },
    /// The existing CA certificate or key cannot be used.
    #[error("cannot use existing CA {}: {reason}", path.display())]
    CaInvalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The existing CA certificate has expired.
    #[error("existing CA {} expired at {not_after}; remove ca.pem and ca-key.pem to create a new one", path.display())]
    CaExpired {
        /// The CA certificate.
        path: PathBuf,
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Writes the CA (created, or reused when `ca.pem` and `ca-key.pem` exist) and the leaf
/// certificates asked for by `opts` into `dir`, creating it if needed. Leaves that
/// already exist are re-issued with fresh keys. Inputs are validated before anything
/// is written.
pub fn generate(dir: &Path, opts: &CertOptions) -> Result<GeneratedCerts, CertError> {
    validate_trust_domain(&opts.trust_domain)?;
    if opts.validity_days == 0 {
        return Err(CertError::ZeroValidity);
    }
    let server_sans = opts
        .server_names
        .iter()
        .map(|name| server_san(name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut leaves: Vec<Identity> = Vec::new();
    if !server_sans.is_empty() {
        leaves.push(Identity::Server);
    }
    for cluster in &opts.clusters {
        identity::validate_cluster_name(cluster)?;
        leaves.push(Identity::Agent {
            cluster: cluster.clone(),
        });
    }
    for name in &opts.clients {
        identity::validate_client_name(name)?;
        leaves.push(Identity::Client { name: name.clone() });
    }
    for w in &opts.workloads {
        leaves.push(identity::parse_workload(w)?);
    }
    let mut seen = std::collections::HashSet::new();
    leaves.retain(|id| seen.insert(id.clone()));

    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    let now = OffsetDateTime::now_utc();
    let ca = load_or_create_ca(dir, opts, now, &mut written)?;

    let not_after = (now + Duration::days(i64::from(opts.validity_days))).min(ca.not_after);
    for id in &leaves {
        let sans = match id {
            Identity::Server => server_sans.clone(),
            _ => Vec::new(),
        };
        let leaf = issue_leaf(id, &opts.trust_domain, sans, now, not_after, &ca.issuer)?;
        check_issuer_name(&leaf.cert_der, &ca)?;
        let files = leaf_file_names(id);
        written.push(write_file(
            &dir.join(files.key),
            leaf.key_pem.as_bytes(),
            true,
        )?);
        written.push(write_file(
            &dir.join(files.cert),
            leaf.cert_pem.as_bytes(),
            false,
        )?);
    }
    Ok(GeneratedCerts {
        dir: dir.to_owned(),
        written,
    })
}

/// The file names of a leaf's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFiles {
    /// The certificate's file name.
    pub cert: String,
    /// The private key's file name.
    pub key: String,
}

/// The certificate and key file names of a leaf identity.
pub fn leaf_file_names(id: &Identity) -> LeafFiles {
    let (cert, key) = match id {
        Identity::Server => (SERVER_CERT_FILE.to_owned(), SERVER_KEY_FILE.to_owned()),
        Identity::Agent { cluster } => (
            format!("agent-{cluster}.pem"),
            format!("agent-{cluster}-key.pem"),
        ),
        Identity::Client { name } => (
            format!("client-{name}.pem"),
            format!("client-{name}-key.pem"),
        ),
        // '_' appears in neither a namespace nor a service account name.
        Identity::Workload {
            namespace,
            service_account,
        } => (
            format!("workload-{namespace}_{service_account}.pem"),
            format!("workload-{namespace}_{service_account}-key.pem"),
        ),
    };
    LeafFiles { cert, key }
}

/// A leaf just issued.
struct IssuedLeaf {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
}

/// Issues one leaf with a new key.
fn issue_leaf(
    id: &Identity,
    trust_domain: &str,
    mut sans: Vec<SanType>,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
    ca: &Issuer<'_, KeyPair>,
) -> Result<IssuedLeaf, CertError> {
    let key = pki::new_key()?;
    sans.push(SanType::URI(id.uri(trust_domain).try_into()?));
    let usage = match id {
        Identity::Server => LeafUsage::ServerAndClient,
        Identity::Agent { .. } | Identity::Client { .. } | Identity::Workload { .. } => {
            LeafUsage::Client
        }
    };
    let params = pki::leaf_params(Some(id.to_string()), sans, usage, now, not_after);
    let cert = params.signed_by(&key, ca)?;
    Ok(IssuedLeaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, crypto::CryptoProvider};
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use x509_parser::extensions::ParsedExtension;

    use super::*;
    use crate::spiffe::DEFAULT_TRUST_DOMAIN;

    fn opts() -> CertOptions {
        CertOptions {
            clusters: vec!["east".into(), "west".into()],
            clients: vec!["bench".into()],
            workloads: vec!["team-a/app".into()],
            ..CertOptions::new()
        }
    }

    fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(name)).expect("read cert pem")
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert(dir, CA_CERT_FILE)).expect("add CA");
        Arc::new(roots)
    }

    #[test]
    fn writes_all_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let out = generate(&dir, &opts()).expect("generate");
        assert_eq!(out.dir, dir);
        let mut names: Vec<_> = out
            .written
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "agent-east-key.pem",
                "agent-east.pem",
                "agent-west-key.pem",
                "agent-west.pem",
                "ca-key.pem",
                "ca.pem",
                "client-bench-key.pem",
                "client-bench.pem",
                "server-key.pem",
                "server.pem",
                "workload-team-a_app-key.pem",
                "workload-team-a_app.pem",
            ]
        );
        for path in &out.written {
            assert!(path.is_file(), "{} missing", path.display());
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).expect("read_dir").count(), 12);
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = generate(tmp.path(), &opts()).expect("generate");
        for path in &out.written {
            let mode = fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
            let name = path.to_string_lossy();
            if name.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{name}");
            } else {
                assert_eq!(mode & 0o077, 0o044, "{name}: {mode:o}");
            }
        }
    }

    #[test]
    fn leaves_carry_their_identity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        let td = DEFAULT_TRUST_DOMAIN;
        let check = |file: &str, want: Identity| {
            assert_eq!(
                identity::peer_identity(&cert(dir, file), td),
                Ok(want),
                "{file}"
            );
        };
        check("server.pem", Identity::Server);
        check(
            "agent-east.pem",
            Identity::Agent {
                cluster: "east".into(),
            },
        );
        check(
            "agent-west.pem",
            Identity::Agent {
                cluster: "west".into(),
            },
        );
        check(
            "client-bench.pem",
            Identity::Client {
                name: "bench".into(),
            },
        );
        check(
            "workload-team-a_app.pem",
            Identity::Workload {
                namespace: "team-a".into(),
                service_account: "app".into(),
            },
        );

        let der = cert(dir, "agent-east.pem");
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let cn = x509.subject().iter_common_name().next().expect("CN");
        assert_eq!(cn.as_str().expect("CN str"), "agent/east");
        let eku = x509
            .extended_key_usage()
            .expect("eku")
            .expect("eku present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!x509.is_ca());
    }

    #[test]
    fn ca_is_constrained_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        generate(tmp.path(), &opts()).expect("generate");
        let der = cert(tmp.path(), CA_CERT_FILE);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let bc = x509
            .basic_constraints()
            .expect("bc")
            .expect("bc present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = x509.key_usage().expect("ku").expect("ku present").value;
        assert!(ku.key_cert_sign());
    }

    #[test]
    fn server_cert_verifies_for_localhost_and_loopback_ip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .expect("verifier");
        let server = cert(dir, SERVER_CERT_FILE);
        for name in ["localhost", "127.0.0.1", "::1"] {
            let name = ServerName::try_from(name).expect("server name");
            verifier
                .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let other = ServerName::try_from("example.com").expect("server name");
        assert!(
            verifier
                .verify_server_cert(&server, &[], &other, &[], UnixTime::now())
                .is_err()
        );
        // An agent certificate is not a server certificate.
        let agent = cert(dir, "agent-east.pem");
        let localhost = ServerName::try_from("localhost").expect("server name");
        assert!(
            verifier
                .verify_server_cert(&agent, &[], &localhost, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn client_certs_verify_as_clients() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .expect("verifier");
        for file in ["agent-east.pem", "client-bench.pem"] {
            verifier
                .verify_client_cert(&cert(dir, file), &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn second_run_reuses_ca_and_adds_cluster() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("first run");
        let ca_before = fs::read(dir.join(CA_CERT_FILE)).expect("read ca");
        let key_before = fs::read(dir.join(CA_KEY_FILE)).expect("read ca key");
        let agent_before = fs::read(dir.join("agent-east.pem")).expect("read agent");

        let more = CertOptions {
            server_names: Vec::new(),
            clusters: vec!["north".into(), "east".into()],
            clients: Vec::new(),
            ..CertOptions::new()
        };
        let out = generate(dir, &more).expect("second run");
        assert_eq!(
            fs::read(dir.join(CA_CERT_FILE)).expect("read ca"),
            ca_before
        );
        assert_eq!(
            fs::read(dir.join(CA_KEY_FILE)).expect("read ca key"),
            key_before
        );
        assert!(!out.written.iter().any(|p| p.ends_with(CA_CERT_FILE)));
        assert!(!out.written.iter().any(|p| p.ends_with(SERVER_CERT_FILE)));
        assert_ne!(
            fs::read(dir.join("agent-east.pem")).expect("read agent"),
            agent_before
        );

        // The new leaf chains to the old CA.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
            .build()
            .expect("verifier");
        for file in ["agent-north.pem", "agent-east.pem", "agent-west.pem"] {
            verifier
                .verify_client_cert(&cert(dir, file), &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        // Same authority key identifier as the first run's leaves.
        let aki = |file: &str| {
            let der = cert(dir, file);
            let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
            x509.iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(aki) => {
                        aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                    }
                    _ => None,
                })
                .expect("aki")
        };
        assert_eq!(aki("agent-north.pem"), aki("agent-west.pem"));
    }

    #[test]
    fn bad_names_write_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let bad = CertOptions {
            clusters: vec!["East_1".into()],
            ..CertOptions::new()
        };
        let err = generate(&dir, &bad).unwrap_err();
        assert!(
            err.to_string().contains("invalid cluster name \"East_1\""),
            "{err}"
        );
        assert!(!dir.exists());

        let bad = CertOptions {
            clients: vec!["".into()],
            workloads: Vec::new(),
            ..CertOptions::new()
        };
        assert!(matches!(
            generate(&dir, &bad),
            Err(CertError::InvalidName(_))
        ));

        for name in ["", "a..b", "-a.com", "a_b.com", "exa mple"] {
            let bad = CertOptions {
                server_names: vec![name.into()],
                ..CertOptions::new()
            };
            let err = generate(&dir, &bad).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidServerName { .. }),
                "{name}: {err}"
            );
        }
        let bad = CertOptions {
            trust_domain: "Bad Domain".into(),
            ..CertOptions::new()
        };
        assert!(matches!(
            generate(&dir, &bad),
            Err(CertError::InvalidTrustDomain { .. })
        ));
        let bad = CertOptions {
            validity_days: 0,
            ..CertOptions::new()
        };
        assert!(matches!(generate(&dir, &bad), Err(CertError::ZeroValidity)));
        assert!(!dir.exists());
    }

    #[test]
    fn half_a_ca_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        fs::remove_file(dir.join(CA_KEY_FILE)).expect("remove key");
        let err = generate(dir, &opts()).unwrap_err();
        assert!(matches!(err, CertError::CaIncomplete { .. }), "{err}");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        fs::copy(dir.join(SERVER_KEY_FILE), dir.join(CA_KEY_FILE)).expect("copy");
        let err = generate(dir, &opts()).unwrap_err();
        assert!(err.to_string().contains("key does not belong to"), "{err}");

        fs::write(dir.join(CA_CERT_FILE), "garbage").expect("write");
        let err = generate(dir, &opts()).unwrap_err();
        assert!(matches!(err, CertError::CaInvalid { .. }), "{err}");
    }

    #[test]
    fn leaf_as_ca_is_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        generate(dir, &opts()).expect("generate");
        fs::copy(dir.join(SERVER_CERT_FILE), dir.join(CA_CERT_FILE)).expect("copy");
        fs::copy(dir.join(SERVER_KEY_FILE), dir.join(CA_KEY_FILE)).expect("copy");
        let err = generate(dir, &opts()).unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn leaf_validity_follows_options() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let o = CertOptions {
            validity_days: 2,
            ..opts()
        };
        generate(dir, &o).expect("generate");
        let der = cert(dir, SERVER_CERT_FILE);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let lifetime =
            x509.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (2 * 86400 - 120..=2 * 86400).contains(&lifetime),
            "{lifetime}"
        );
    }
}
