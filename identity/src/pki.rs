//! The one set of certificate parameters every issuer uses: the standalone
//! certificate directory ([`crate::cert_dir`]), the manager's signer and the
//! injector's webhook certificate.
//!
//! Every key is ECDSA P-256; every certificate has a random positive 128-bit
//! serial and a `not_before` [`BACKDATE`] in the past, for clock skew between
//! machines. A CA may sign leaves only (path length 0); a leaf is never a CA
//! and names its CA's key (authority key identifier).

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

/// How far `not_before` lies in the past, to tolerate clock skew between machines.
pub const BACKDATE: Duration = Duration::hours(1);

/// Organization of every CA the project makes.
const CA_ORGANIZATION: &str = "cluster-tunnel";

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafUsage {
    /// TLS server and client (the proxy servers, which also dial each other).
    ServerAndClient,
    /// TLS client only (agents, sidecars, other clients).
    Client,
    /// TLS server only (the injector's webhook).
    Server,
}

impl LeafUsage {
    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            LeafUsage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafUsage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafUsage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        }
    }
}

/// A new ECDSA P-256 key.
pub fn new_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The parameters of a CA named `common_name` (organization
/// `cluster-tunnel`), valid from `now` (backdated) to `not_after`.
pub fn ca_params(
    common_name: String,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params
}

/// The parameters of a leaf: subject `common_name` (none when `None`), the
/// given subject alternative names, valid from `now` (backdated) to
/// `not_after`.
pub fn leaf_params(
    common_name: Option<String>,
    subject_alt_names: Vec<SanType>,
    usage: LeafUsage,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(cn) = common_name {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usage.extended_key_usages();
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params
}

/// Why a certificate's expiry cannot be read, or why a CA certificate cannot
/// issue leaves that name it as their issuer.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The certificate's `notAfter` is outside the dates `time` represents.
    #[error("bad notAfter: {0}")]
    NotAfter(#[source] time::error::ComponentRange),
    /// The CA's subject has a relative distinguished name with several
    /// attributes or none, which rcgen cannot rebuild.
    #[error("subject has a multi-valued or empty RDN")]
    MultiValuedRdn,
    /// An attribute type of the CA's subject is no valid OID.
    #[error("subject attribute type is not a valid OID")]
    InvalidOid,
    /// A text value of the CA's subject is not UTF-8.
    #[error("subject value is not UTF-8")]
    NotUtf8,
    /// A value of the CA's subject does not fit its declared string type.
    #[error("subject value has an unsupported encoding")]
    UnsupportedEncoding,
    /// A value of the CA's subject has a string type rcgen cannot write.
    #[error("subject value has an unsupported string type")]
    UnsupportedStringType,
    /// The certificate just issued does not parse as X.509.
    #[error("issued certificate does not parse")]
    IssuedUnparsable,
    /// The issued certificate's issuer name differs from the CA's subject:
    /// the CA's name cannot be rebuilt byte for byte.
    #[error("its subject name cannot be reproduced exactly in issued certificates")]
    IssuerMismatch,
}

/// The `notAfter` of a parsed certificate.
pub fn not_after(x509: &X509Certificate<'_>) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
        .map_err(PkiError::NotAfter)
}

/// The subject key identifier of a certificate, if it has one.
pub fn subject_key_id(x509: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x509.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
            _ => None,
        })
}

/// Rebuilds the rcgen issuer of a CA certificate (its subject name and key
/// identifier) around its key, so that it signs leaves again. The leaves'
/// issuer name must equal the CA's subject byte for byte: see
/// [`check_issued_by`].
pub fn issuer_of(
    x509: &X509Certificate<'_>,
    key: KeyPair,
) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(x509)?;
    // Leaves name the CA's key by its subject key identifier (authority key identifier).
    params.key_identifier_method = subject_key_id(x509)
        .map(KeyIdMethod::PreSpecified)
        .unwrap_or(KeyIdMethod::Sha256);
    Ok(Issuer::new(params, key))
}

/// Whether the certificate `leaf_der` names `ca_subject_der` as its issuer,
/// byte for byte (rebuilding an unusual CA name could differ, so issuers
/// check rather than hand out unusable certificates).
pub fn check_issued_by(leaf_der: &[u8], ca_subject_der: &[u8]) -> Result<(), PkiError> {
    let (_, leaf) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|_| PkiError::IssuedUnparsable)?;
    if leaf.issuer().as_raw() != ca_subject_der {
        return Err(PkiError::IssuerMismatch);
    }
    Ok(())
}

/// The subject of a CA certificate as an rcgen name (one attribute per RDN).
fn distinguished_name(x509: &X509Certificate<'_>) -> Result<DistinguishedName, PkiError> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in x509.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(PkiError::MultiValuedRdn);
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or(PkiError::InvalidOid)?
            .collect();
        let value = attr.attr_value();
        let text = || std::str::from_utf8(value.data).map_err(|_| PkiError::NotUtf8);
        let bad = |_| PkiError::UnsupportedEncoding;
        let dn_value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
            Tag::BmpString => DnValue::BmpString(
                rcgen::string::BmpString::from_utf16be(value.data.to_vec()).map_err(bad)?,
            ),
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(value.data.to_vec()).map_err(bad)?,
            ),
            _ => return Err(PkiError::UnsupportedStringType),
        };
        dn.push(DnType::from_oid(&oid), dn_value);
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_and_differ() {
        let a = random_serial();
        let b = random_serial();
        assert_ne!(a, b);
        for s in [a, b] {
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), 16);
            assert_eq!(bytes[0] & 0x80, 0, "the high bit makes a serial negative");
            assert_ne!(bytes[0], 0, "a leading zero byte is not minimal DER");
        }
    }

    #[test]
    fn a_rebuilt_issuer_signs_leaves_its_ca_verifies_by_name_and_key_id() {
        let now = OffsetDateTime::now_utc();
        let ca_key = new_key().unwrap();
        let ca = ca_params("test CA".into(), now, now + Duration::days(10))
            .self_signed(&ca_key)
            .unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.der()).unwrap();
        let issuer = issuer_of(&ca_x509, ca_key).unwrap();
        let key = new_key().unwrap();
        let leaf = leaf_params(
            Some("leaf".into()),
            vec![SanType::DnsName("a.example".try_into().unwrap())],
            LeafUsage::Client,
            now,
            now + Duration::days(1),
        )
        .signed_by(&key, &issuer)
        .unwrap();
        check_issued_by(leaf.der(), ca_x509.subject().as_raw()).unwrap();
        let (_, leaf_x509) = x509_parser::parse_x509_certificate(leaf.der()).unwrap();
        let aki = leaf_x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(aki, subject_key_id(&ca_x509));
        let backdated = now - BACKDATE;
        assert_eq!(
            leaf_x509.validity().not_before.timestamp(),
            backdated.unix_timestamp()
        );
        assert!(!leaf_x509.is_ca());
    }

    #[test]
    fn another_cas_leaf_is_not_issued_by_this_one() {
        let now = OffsetDateTime::now_utc();
        let make = |cn: &str| {
            let key = new_key().unwrap();
            let cert = ca_params(cn.into(), now, now + Duration::days(10))
                .self_signed(&key)
                .unwrap();
            (cert, key)
        };
        let (a, a_key) = make("A");
        let (b, _) = make("B");
        let (_, a_x509) = x509_parser::parse_x509_certificate(a.der()).unwrap();
        let (_, b_x509) = x509_parser::parse_x509_certificate(b.der()).unwrap();
        let issuer = issuer_of(&a_x509, a_key).unwrap();
        let leaf = leaf_params(
            None,
            vec![],
            LeafUsage::Server,
            now,
            now + Duration::days(1),
        )
        .signed_by(&new_key().unwrap(), &issuer)
        .unwrap();
        assert!(check_issued_by(leaf.der(), a_x509.subject().as_raw()).is_ok());
        assert!(check_issued_by(leaf.der(), b_x509.subject().as_raw()).is_err());
    }
}
