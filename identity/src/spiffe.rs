//! Identities of tunnel peers, carried as SPIFFE-style URI SANs in certificates.
//!
//! Every certificate the tunnel issues names exactly one identity in a trust domain:
//! `spiffe://<td>/agent/<cluster>`, `spiffe://<td>/client/<name>`,
//! `spiffe://<td>/ns/<namespace>/sa/<service-account>` (a workload, in the form Istio and
//! SPIFFE's Kubernetes conventions use) or `spiffe://<td>/server`.
//! This module owns the mapping between those URIs and [`Identity`], and the rule for
//! cluster and client names.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster-tunnel";

/// URI scheme of identity URIs.
const SCHEME: &str = "spiffe://";

/// Longest cluster or client name (a DNS-1123 label).
const MAX_NAME_LEN: usize = 63;

/// Who a peer is, as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agent running in the managed cluster `cluster`.
    Agent {
        /// Name of the cluster the agent serves.
        cluster: String,
    },
    /// A client of the proxy (a user or tool reaching into clusters).
    Client {
        /// Name of the client.
        name: String,
    },
    /// A workload, named like a Kubernetes service account (standalone installations
    /// issue such certificates so that policies can name workloads without Kubernetes).
    Workload {
        /// Namespace of the workload.
        namespace: String,
        /// Service account of the workload.
        service_account: String,
    },
    /// The tunnel proxy server.
    Server,
}

impl Identity {
    /// The URI SAN that names this identity in `trust_domain`,
    /// e.g. `spiffe://cluster-tunnel/agent/east`.
    pub fn uri(&self, trust_domain: &str) -> String {
        format!("{SCHEME}{trust_domain}/{self}")
    }

    /// Whether this identity may open connections on the client port.
    pub fn is_caller(&self) -> bool {
        matches!(self, Identity::Client { .. } | Identity::Workload { .. })
    }
}

impl fmt::Display for Identity {
    /// The path form: `agent/east`, `client/bench`, `server`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { cluster } => write!(f, "agent/{cluster}"),
            Identity::Client { name } => write!(f, "client/{name}"),
            Identity::Workload {
                namespace,
                service_account,
            } => write!(f, "ns/{namespace}/sa/{service_account}"),
            Identity::Server => f.write_str("server"),
        }
    }
}

/// Which kind of name failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A cluster name (agents).
    Cluster,
    /// A client name.
    Client,
    /// A namespace (workloads).
    Namespace,
    /// A service account name (workloads).
    ServiceAccount,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Cluster => "cluster",
            NameKind::Client => "client",
            NameKind::Namespace => "namespace",
            NameKind::ServiceAccount => "service account",
        })
    }
}

/// Why an identity could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A cluster or client name is not a DNS-1123 label.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// Whether it was a cluster or a client name.
        kind: NameKind,
        /// The rejected name.
        name: String,
        /// What rule it broke.
        reason: &'static str,
    },
    /// The URI does not use the `spiffe://` scheme.
    #[error("identity URI {uri:?} does not start with \"spiffe://\"")]
    NotSpiffe {
        /// The rejected URI.
        uri: String,
    },
    /// The URI belongs to another trust domain.
    #[error("identity URI {uri:?} is in trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// The rejected URI.
        uri: String,
        /// The trust domain we accept.
        expected: String,
        /// The trust domain the URI names.
        found: String,
    },
    /// The URI is in our trust domain but its path names no identity.
    #[error(
        "identity URI {uri:?} is malformed: {reason} \
         (expected .../agent/<cluster>, .../client/<name>, .../ns/<ns>/sa/<sa> or .../server)"
    )]
    Malformed {
        /// The rejected URI.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate bytes are not a parseable X.509 certificate.
    #[error("cannot parse peer certificate: {reason}")]
    CertificateParse {
        /// The parser's message.
        reason: String,
    },
    /// The certificate has no URI subject alternative name at all.
    #[error("peer certificate has no URI SAN, so it names no cluster-tunnel identity")]
    NoUriSan,
    /// The certificate has URI SANs, but none is an identity in our trust domain.
    #[error(
        "no URI SAN of the peer certificate is an identity in trust domain {trust_domain:?} (found {uris:?})"
    )]
    NoIdentity {
        /// The trust domain we accept.
        trust_domain: String,
        /// Every URI SAN found.
        uris: Vec<String>,
    },
    /// More than one URI SAN is an identity in our trust domain.
    #[error("peer certificate names more than one identity: {uris:?}")]
    Ambiguous {
        /// The URI SANs that parsed as identities.
        uris: Vec<String>,
    },
}

/// Parses an identity URI such as `spiffe://cluster-tunnel/agent/east`,
/// accepting only `trust_domain`.
pub fn parse_identity_uri(uri: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
    let rest = uri
        .get(..SCHEME.len())
        .filter(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
        .map(|_| &uri[SCHEME.len()..])
        .ok_or_else(|| IdentityError::NotSpiffe {
            uri: uri.to_owned(),
        })?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain != trust_domain {
        return Err(IdentityError::WrongTrustDomain {
            uri: uri.to_owned(),
            expected: trust_domain.to_owned(),
            found: domain.to_owned(),
        });
    }
    let malformed = |reason: String| IdentityError::Malformed {
        uri: uri.to_owned(),
        reason,
    };
    if let Some(rest) = path.strip_prefix("ns/") {
        return parse_workload_path(rest).map_err(malformed);
    }
    let mut segments = path.split('/');
    let kind = segments.next().unwrap_or_default();
    let name = segments.next();
    if segments.next().is_some() {
        return Err(malformed("too many path segments".to_owned()));
    }
    match (kind, name) {
        ("server", None) => Ok(Identity::Server),
        ("agent", Some(cluster)) => {
            validate_cluster_name(cluster).map_err(|e| malformed(e.to_string()))?;
            Ok(Identity::Agent {
                cluster: cluster.to_owned(),
            })
        }
        ("client", Some(name)) => {
            validate_client_name(name).map_err(|e| malformed(e.to_string()))?;
            Ok(Identity::Client {
                name: name.to_owned(),
            })
        }
        ("agent" | "client", None) => Err(malformed(format!("{kind:?} needs a name"))),
        ("server", Some(_)) => Err(malformed("\"server\" takes no name".to_owned())),
        ("", _) => Err(malformed("empty path".to_owned())),
        (other, _) => Err(malformed(format!("unknown kind {other:?}"))),
    }
}

/// `<ns>/sa/<sa>`, the rest of a workload path after `ns/`.
fn parse_workload_path(rest: &str) -> Result<Identity, String> {
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [ns, "sa", sa] => {
            validate_namespace(ns).map_err(|e| e.to_string())?;
            validate_service_account(sa).map_err(|e| e.to_string())?;
            Ok(Identity::Workload {
                namespace: (*ns).to_owned(),
                service_account: (*sa).to_owned(),
            })
        }
        _ => Err("a workload path is ns/<namespace>/sa/<service-account>".to_owned()),
    }
}

/// Parses a workload written `<namespace>/<service-account>` (as `certs --workload` and
/// policies take it).
pub fn parse_workload(s: &str) -> Result<Identity, IdentityError> {
    let (ns, sa) = s
        .split_once('/')
        .ok_or_else(|| IdentityError::InvalidName {
            kind: NameKind::ServiceAccount,
            name: s.to_owned(),
            reason: "must be written <namespace>/<service-account>",
        })?;
    validate_namespace(ns)?;
    validate_service_account(sa)?;
    Ok(Identity::Workload {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

/// Checks a Kubernetes namespace name: a DNS-1123 label.
pub fn validate_namespace(name: &str) -> Result<(), IdentityError> {
    validate_label(name, NameKind::Namespace)
}

/// Checks a service account name: a DNS-1123 subdomain (labels joined by dots).
pub fn validate_service_account(name: &str) -> Result<(), IdentityError> {
    if name.len() > 253 {
        return Err(IdentityError::InvalidName {
            kind: NameKind::ServiceAccount,
            name: name.to_owned(),
            reason: "must be at most 253 characters",
        });
    }
    name.split('.')
        .try_for_each(|label| validate_label(label, NameKind::ServiceAccount))
        .map_err(|e| match e {
            IdentityError::InvalidName { reason, .. } => IdentityError::InvalidName {
                kind: NameKind::ServiceAccount,
                name: name.to_owned(),
                reason,
            },
            other => other,
        })
}

/// Reads the identity from a DER certificate: exactly one of its URI SANs must be an
/// identity URI in `trust_domain` (other URI SANs are ignored).
pub fn peer_identity(cert_der: &[u8], trust_domain: &str) -> Result<Identity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
        IdentityError::CertificateParse {
            reason: e.to_string(),
        }
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::CertificateParse {
            reason: e.to_string(),
        })?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();

    let mut found = Vec::new();
    let mut last_error = None;
    for uri in &uris {
        match parse_identity_uri(uri, trust_domain) {
            Ok(identity) => found.push((*uri, identity)),
            Err(e) => last_error = Some(e),
        }
    }
    match (found.len(), uris.len()) {
        (1, _) => Ok(found.remove(0).1),
        (0, 0) => Err(IdentityError::NoUriSan),
        // With a single URI SAN, its own parse error says the most.
        (0, 1) => Err(last_error.unwrap_or(IdentityError::NoUriSan)),
        (0, _) => Err(IdentityError::NoIdentity {
            trust_domain: trust_domain.to_owned(),
            uris: uris.iter().map(|u| (*u).to_owned()).collect(),
        }),
        _ => Err(IdentityError::Ambiguous {
            uris: found.into_iter().map(|(u, _)| u.to_owned()).collect(),
        }),
    }
}

/// Checks that `name` can name a cluster: a DNS-1123 label.
pub fn validate_cluster_name(name: &str) -> Result<(), IdentityError> {
    validate_label(name, NameKind::Cluster)
}

/// Checks that `name` can name a client: a DNS-1123 label.
pub fn validate_client_name(name: &str) -> Result<(), IdentityError> {
    validate_label(name, NameKind::Client)
}

/// DNS-1123 label: 1 to 63 characters of `[a-z0-9-]`, starting and ending alphanumeric.
fn validate_label(name: &str, kind: NameKind) -> Result<(), IdentityError> {
    let fail = |reason| {
        Err(IdentityError::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("may contain only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return fail("must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = DEFAULT_TRUST_DOMAIN;

    fn agent(cluster: &str) -> Identity {
        Identity::Agent {
            cluster: cluster.to_owned(),
        }
    }

    #[test]
    fn uri_and_display() {
        assert_eq!(agent("east").uri(TD), "spiffe://cluster-tunnel/agent/east");
        assert_eq!(
            Identity::Client {
                name: "bench".into()
            }
            .uri("example.org"),
            "spiffe://example.org/client/bench"
        );
        assert_eq!(Identity::Server.uri(TD), "spiffe://cluster-tunnel/server");
        assert_eq!(agent("east").to_string(), "agent/east");
        assert_eq!(
            Identity::Client {
                name: "bench".into()
            }
            .to_string(),
            "client/bench"
        );
        assert_eq!(Identity::Server.to_string(), "server");
    }

    #[test]
    fn uri_round_trips() {
        for id in [
            agent("east"),
            Identity::Client {
                name: "ci-1".into(),
            },
            Identity::Workload {
                namespace: "team-a".into(),
                service_account: "payments.v2".into(),
            },
            Identity::Server,
        ] {
            assert_eq!(parse_identity_uri(&id.uri(TD), TD), Ok(id));
        }
    }

    #[test]
    fn parse_rejects_wrong_trust_domain() {
        let err = parse_identity_uri("spiffe://other/agent/east", TD).unwrap_err();
        assert!(
            matches!(err, IdentityError::WrongTrustDomain { ref found, .. } if found == "other")
        );
        assert!(
            err.to_string().contains("expected \"cluster-tunnel\""),
            "{err}"
        );
    }

    #[test]
    fn parse_rejects_malformed() {
        for uri in [
            "spiffe://cluster-tunnel",
            "spiffe://cluster-tunnel/",
            "spiffe://cluster-tunnel/agent",
            "spiffe://cluster-tunnel/agent/",
            "spiffe://cluster-tunnel/agent/East",
            "spiffe://cluster-tunnel/agent/east/extra",
            "spiffe://cluster-tunnel/server/x",
            "spiffe://cluster-tunnel/admin/x",
            "spiffe://cluster-tunnel/client/a?b",
            "spiffe://cluster-tunnel/ns/a",
            "spiffe://cluster-tunnel/ns/a/sa",
            "spiffe://cluster-tunnel/ns/a/sa/b/c",
            "spiffe://cluster-tunnel/ns/A/sa/b",
            "spiffe://cluster-tunnel/ns/a/xx/b",
        ] {
            let err = parse_identity_uri(uri, TD).unwrap_err();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{uri}: {err:?}"
            );
        }
        assert!(matches!(
            parse_identity_uri("https://cluster-tunnel/server", TD),
            Err(IdentityError::NotSpiffe { .. })
        ));
        assert!(matches!(
            parse_identity_uri("", TD),
            Err(IdentityError::NotSpiffe { .. })
        ));
    }

    #[test]
    fn workloads() {
        let w = parse_workload("team-a/payments").unwrap();
        assert_eq!(w.uri(TD), "spiffe://cluster-tunnel/ns/team-a/sa/payments");
        assert_eq!(w.to_string(), "ns/team-a/sa/payments");
        assert!(w.is_caller());
        assert!(!Identity::Server.is_caller());
        for bad in ["team-a", "Team/a", "a/", "/a", "a/b/c"] {
            assert!(parse_workload(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn name_rules() {
        for ok in ["a", "east", "us-east-1", "0", &"a".repeat(63)] {
            assert_eq!(validate_cluster_name(ok), Ok(()), "{ok}");
            assert_eq!(validate_client_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "East", "-a", "a-", "a.b", "a_b", "é", &"a".repeat(64)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad}");
            assert!(validate_client_name(bad).is_err(), "{bad}");
        }
        let err = validate_cluster_name("East").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid cluster name \"East\": may contain only lowercase letters, digits and '-'"
        );
        let err = validate_client_name("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid client name \"\": must not be empty"
        );
    }

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().expect("ia5 uri")))
            .collect();
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            "example.com".try_into().expect("dns"),
        ));
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn peer_identity_finds_the_one_uri() {
        let der = cert_with_uris(&[
            "https://example.com/x",
            "spiffe://cluster-tunnel/agent/east",
        ]);
        assert_eq!(peer_identity(&der, TD), Ok(agent("east")));
    }

    #[test]
    fn peer_identity_errors() {
        assert_eq!(
            peer_identity(&cert_with_uris(&[]), TD),
            Err(IdentityError::NoUriSan)
        );
        assert!(matches!(
            peer_identity(&cert_with_uris(&["spiffe://other/server"]), TD),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            peer_identity(&cert_with_uris(&["spiffe://cluster-tunnel/nope"]), TD),
            Err(IdentityError::Malformed { .. })
        ));
        let err = peer_identity(
            &cert_with_uris(&["spiffe://other/server", "https://example.com"]),
            TD,
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::NoIdentity { ref uris, .. } if uris.len() == 2));
        let err = peer_identity(
            &cert_with_uris(&[
                "spiffe://cluster-tunnel/server",
                "spiffe://cluster-tunnel/agent/x",
            ]),
            TD,
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::Ambiguous { .. }));
        assert!(matches!(
            peer_identity(b"not a certificate", TD),
            Err(IdentityError::CertificateParse { .. })
        ));
    }
}
