//! What a server name and a trust domain may be, checked before anything
//! is written.

use std::net::IpAddr;

use rcgen::SanType;

use super::CertError;

/// The SAN of a server name: an IP literal, or a DNS name (a leading `*`
/// label allowed).
pub(super) fn server_san(name: &str) -> Result<SanType, CertError> {
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
pub(super) fn validate_trust_domain(td: &str) -> Result<(), CertError> {
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
