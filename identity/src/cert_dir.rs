//! Certificates for a standalone installation: a CA and the leaf certificates of the
//! server, the agents and the clients, written as PEM files into one directory.
//!
//! This is the library behind the certificate command. Layout of the directory:
//! `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, `agent-<cluster>.pem`,
//! `agent-<cluster>-key.pem`, `client-<name>.pem`, `client-<name>-key.pem`.
//! An existing CA in the directory is reused, so clusters and clients can be added later.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{CertifiedIssuer, Issuer, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use crate::pki::{self, LeafUsage};
use crate::spiffe::{self as identity, Identity, IdentityError};

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
        let (cert_pem, cert_der, key_pem) =
            issue_leaf(id, &opts.trust_domain, sans, now, not_after, &ca.issuer)?;
        check_issuer_name(&cert_der, &ca)?;
        let (cert_file, key_file) = leaf_file_names(id);
        written.push(write_file(&dir.join(key_file), key_pem.as_bytes(), true)?);
        written.push(write_file(
            &dir.join(cert_file),
            cert_pem.as_bytes(),
            false,
        )?);
    }
    Ok(GeneratedCerts {
        dir: dir.to_owned(),
        written,
    })
}

/// The certificate and key file names of a leaf identity.
pub fn leaf_file_names(id: &Identity) -> (String, String) {
    match id {
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
    }
}

/// The CA that signs the leaves.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// DER of the CA's subject name; every leaf's issuer name must equal it.
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
    cert_path: PathBuf,
}

fn load_or_create_ca(
    dir: &Path,
    opts: &CertOptions,
    now: OffsetDateTime,
    written: &mut Vec<PathBuf>,
) -> Result<Ca, CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => load_ca(cert_path, &key_path, now),
        (false, false) => {
            let ca = create_ca(opts, now, cert_path, &key_path, written)?;
            Ok(ca)
        }
        (true, false) => Err(CertError::CaIncomplete {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(CertError::CaIncomplete {
            present: key_path,
            missing: cert_path,
        }),
    }
}

fn create_ca(
    opts: &CertOptions,
    now: OffsetDateTime,
    cert_path: PathBuf,
    key_path: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<Ca, CertError> {
    let key = pki::new_key()?;
    let days = opts.validity_days.max(MIN_CA_VALIDITY_DAYS);
    let params = pki::ca_params(
        format!("{} CA", opts.trust_domain),
        now,
        now + Duration::days(i64::from(days)),
    );
    let not_after = params.not_after;

    let ca = CertifiedIssuer::self_signed(params, key)?;
    written.push(write_file(
        key_path,
        ca.key().serialize_pem().as_bytes(),
        true,
    )?);
    written.push(write_file(&cert_path, ca.pem().as_bytes(), false)?);
    // Re-read what we wrote, so a new CA and a reused CA sign the same way.
    let ca_key = KeyPair::from_pem(&ca.key().serialize_pem())?;
    let (subject_der, issuer) = issuer_from_cert(ca.der(), ca_key, &cert_path)?;
    Ok(Ca {
        issuer,
        subject_der,
        not_after,
        cert_path,
    })
}

fn load_ca(cert_path: PathBuf, key_path: &Path, now: OffsetDateTime) -> Result<Ca, CertError> {
    let invalid = |path: &Path, reason: String| CertError::CaInvalid {
        path: path.to_owned(),
        reason,
    };
    let cert_pem = read_file(&cert_path)?;
    let key_pem = read_file(key_path)?;
    let cert_der = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| invalid(&cert_path, format!("no PEM certificate: {e}")))?;
    let key_str = std::str::from_utf8(&key_pem)
        .map_err(|_| invalid(key_path, "key file is not text".to_owned()))?;
    let key = KeyPair::from_pem(key_str)
        .map_err(|e| invalid(key_path, format!("cannot load private key: {e}")))?;

    let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| invalid(&cert_path, format!("cannot parse certificate: {e}")))?;
    match x509.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(invalid(
                &cert_path,
                "not a CA certificate (no CA:true)".to_owned(),
            ));
        }
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            key_path,
            format!("key does not belong to {}", cert_path.display()),
        ));
    }
    let not_after = pki::not_after(&x509).map_err(|e| invalid(&cert_path, e))?;
    if not_after <= now {
        return Err(CertError::CaExpired {
            path: cert_path,
            not_after,
        });
    }
    let (subject_der, issuer) = issuer_from_cert(&cert_der, key, &cert_path)?;
    Ok(Ca {
        issuer,
        subject_der,
        not_after,
        cert_path,
    })
}

/// The subject (DER) of a CA certificate and its rcgen issuer, to sign leaves with.
fn issuer_from_cert(
    der: &[u8],
    key: KeyPair,
    path: &Path,
) -> Result<(Vec<u8>, Issuer<'static, KeyPair>), CertError> {
    let invalid = |reason: String| CertError::CaInvalid {
        path: path.to_owned(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("cannot parse certificate: {e}")))?;
    let issuer = pki::issuer_of(&x509, key).map_err(|r| invalid(r.to_owned()))?;
    Ok((x509.subject().as_raw().to_vec(), issuer))
}

/// A leaf is only valid if its issuer name is byte-for-byte the CA's subject.
fn check_issuer_name(leaf_der: &[u8], ca: &Ca) -> Result<(), CertError> {
    pki::check_issued_by(leaf_der, &ca.subject_der).map_err(|reason| CertError::CaInvalid {
        path: ca.cert_path.clone(),
        reason: reason.to_owned(),
    })
}

/// Issues one leaf; returns (certificate PEM, certificate DER, key PEM).
fn issue_leaf(
    id: &Identity,
    trust_domain: &str,
    mut sans: Vec<SanType>,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
    ca: &Issuer<'_, KeyPair>,
) -> Result<(String, Vec<u8>, String), CertError> {
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
    Ok((cert.pem(), cert.der().to_vec(), key.serialize_pem()))
}

fn server_san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let fail = |reason| CertError::InvalidServerName {
        name: name.to_owned(),
        reason,
    };
    let dns = name.strip_suffix('.').unwrap_or(name);
    if dns.is_empty() {
        return Err(fail("must not be empty"));
    }
    if dns.len() > 253 {
        return Err(fail("DNS names are at most 253 characters"));
    }
    for (i, label) in dns.split('.').enumerate() {
        if i == 0 && label == "*" && dns.len() > 1 {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return Err(fail("each DNS label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(fail(
                "not an IP address, and a DNS name may contain only letters, digits, '-' and '.'",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(fail("DNS labels must not start or end with '-'"));
        }
    }
    Ok(SanType::DnsName(dns.to_owned().try_into()?))
}

/// SPIFFE trust domains: lowercase letters, digits, '.', '-' and '_'.
fn validate_trust_domain(td: &str) -> Result<(), CertError> {
    let fail = |reason| CertError::InvalidTrustDomain {
        trust_domain: td.to_owned(),
        reason,
    };
    if td.is_empty() {
        return Err(fail("must not be empty"));
    }
    if td.len() > 255 {
        return Err(fail("must be at most 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(fail(
            "may contain only lowercase letters, digits, '.', '-' and '_'",
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes via a temporary file and a rename, so a reader never sees half a file; key
/// files are created with mode 0600 on unix.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<PathBuf, CertError> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io {
            action,
            path,
            source,
        }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &tmp)(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(io_err("write", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("write", path))?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, crypto::CryptoProvider};
    use rustls_pki_types::{ServerName, UnixTime};
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
