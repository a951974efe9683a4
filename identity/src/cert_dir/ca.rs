//! The CA that signs a directory's leaves: reused when `ca.pem` and
//! `ca-key.pem` are there (checked: a CA, its key, not expired), created
//! otherwise; half of one is an error.

use std::path::{Path, PathBuf};

use rcgen::{CertifiedIssuer, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use super::files::{read_file, write_file};
use super::{CA_CERT_FILE, CA_KEY_FILE, CertError, CertOptions, MIN_CA_VALIDITY_DAYS};
use crate::pki;

/// The CA that signs the leaves.
pub(super) struct Ca {
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// DER of the CA's subject name; every leaf's issuer name must equal it.
    subject_der: Vec<u8>,
    pub(super) not_after: OffsetDateTime,
    cert_path: PathBuf,
}

/// The CA in `dir`, or a new one written there (its files added to `written`).
pub(super) fn load_or_create_ca(
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
    ca_from_cert(ca.der(), ca_key, cert_path, not_after)
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
    let not_after = pki::not_after(&x509).map_err(|e| invalid(&cert_path, e.to_string()))?;
    if not_after <= now {
        return Err(CertError::CaExpired {
            path: cert_path,
            not_after,
        });
    }
    ca_from_cert(&cert_der, key, cert_path, not_after)
}

/// The CA of the certificate `der` (read from `cert_path`) and its `key`,
/// to sign leaves with.
fn ca_from_cert(
    der: &[u8],
    key: KeyPair,
    cert_path: PathBuf,
    not_after: OffsetDateTime,
) -> Result<Ca, CertError> {
    let invalid = |reason: String| CertError::CaInvalid {
        path: cert_path.clone(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("cannot parse certificate: {e}")))?;
    let issuer = pki::issuer_of(&x509, key).map_err(|e| invalid(e.to_string()))?;
    Ok(Ca {
        issuer,
        subject_der: x509.subject().as_raw().to_vec(),
        not_after,
        cert_path,
    })
}

/// A leaf is only valid if its issuer name is byte-for-byte the CA's subject.
pub(super) fn check_issuer_name(leaf_der: &[u8], ca: &Ca) -> Result<(), CertError> {
    pki::check_issued_by(leaf_der, &ca.subject_der).map_err(|reason| CertError::CaInvalid {
        path: ca.cert_path.clone(),
        reason: reason.to_string(),
    })
}
