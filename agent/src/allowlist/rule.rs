//! Allowlist rules: their text forms (see the table in [`super`]), parsed
//! into [`Rule`]s with their [`Ports`], and why a rule text is refused
//! ([`RuleError`]).

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

/// Longest DNS name.
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Destination ports a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ports {
    /// Inclusive ranges; empty means every port.
    ranges: Vec<RangeInclusive<u16>>,
}

impl Ports {
    /// Every port.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only the given ranges (an empty list means every port).
    pub fn from_ranges(ranges: impl IntoIterator<Item = RangeInclusive<u16>>) -> Self {
        Self {
            ranges: ranges.into_iter().collect(),
        }
    }

    /// Whether every port is allowed.
    pub fn is_any(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `port` is allowed.
    pub fn contains(&self, port: u16) -> bool {
        self.is_any() || self.ranges.iter().any(|r| r.contains(&port))
    }
}

impl fmt::Display for Ports {
    /// `*` for every port, else the list form: `80,443,8000-8999`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return f.write_str("*");
        }
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if range.start() == range.end() {
                write!(f, "{}", range.start())?;
            } else {
                write!(f, "{}-{}", range.start(), range.end())?;
            }
        }
        Ok(())
    }
}

impl FromStr for Ports {
    type Err = RuleError;

    /// Parses `443`, `80,443` or `8000-8999` (ports 1 to 65535).
    fn from_str(s: &str) -> Result<Self, RuleError> {
        if s.is_empty() {
            return Err(RuleError::EmptyPorts);
        }
        let mut ranges = Vec::new();
        for item in s.split(',') {
            let (start, end) = match item.split_once('-') {
                Some((start, end)) => (parse_port(start)?, parse_port(end)?),
                None => {
                    let port = parse_port(item)?;
                    (port, port)
                }
            };
            if start > end {
                return Err(RuleError::ReversedPortRange {
                    range: item.to_owned(),
                });
            }
            ranges.push(start..=end);
        }
        Ok(Self { ranges })
    }
}

fn parse_port(s: &str) -> Result<u16, RuleError> {
    let invalid = || RuleError::InvalidPort { port: s.to_owned() };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(port) => Ok(port),
    }
}

/// One allowlist rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `*`: any host name or IP address.
    Any {
        /// Ports the rule allows.
        ports: Ports,
    },
    /// An IP address (as a /32 or /128) or CIDR block. IPv4-mapped IPv6 rules are
    /// stored as IPv4, since addresses are compared in their IPv4 form.
    Network {
        /// The network.
        net: IpNet,
        /// Ports the rule allows.
        ports: Ports,
    },
    /// One host name, lowercase, without trailing dot.
    Host {
        /// The name.
        name: String,
        /// Ports the rule allows.
        ports: Ports,
    },
    /// `*.suffix`: every name ending in `.suffix`, but not `suffix` itself.
    Suffix {
        /// The suffix without the leading `*.`, lowercase, without trailing dot.
        suffix: String,
        /// Ports the rule allows.
        ports: Ports,
    },
}

impl Rule {
    /// Ports the rule allows.
    pub fn ports(&self) -> &Ports {
        match self {
            Rule::Any { ports }
            | Rule::Network { ports, .. }
            | Rule::Host { ports, .. }
            | Rule::Suffix { ports, .. } => ports,
        }
    }

    /// Whether this name rule (or `*`) matches the normalized host name `host`.
    pub(super) fn matches_name(&self, host: &str) -> bool {
        match self {
            Rule::Any { .. } => true,
            Rule::Host { name, .. } => name == host,
            Rule::Suffix { suffix, .. } => host
                .strip_suffix(suffix.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'))
                .is_some_and(|prefix| !prefix.is_empty()),
            Rule::Network { .. } => false,
        }
    }
}

impl fmt::Display for Rule {
    /// The canonical rule text, which parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = self.ports();
        let target = match self {
            Rule::Any { .. } => "*".to_owned(),
            Rule::Network { net, .. } => {
                let text = if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                match net {
                    IpNet::V6(_) if !ports.is_any() => format!("[{text}]"),
                    _ => text,
                }
            }
            Rule::Host { name, .. } => name.clone(),
            Rule::Suffix { suffix, .. } => format!("*.{suffix}"),
        };
        if ports.is_any() {
            f.write_str(&target)
        } else {
            write!(f, "{target}:{ports}")
        }
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    /// Parses one rule; see the module documentation for the forms.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        let (target, ports, bracketed) = split_ports(s)?;
        if target.is_empty() {
            return Err(RuleError::MissingHost);
        }
        if bracketed {
            let net = parse_net(target)?;
            if !net.addr().is_ipv6() {
                return Err(RuleError::InvalidAddress {
                    addr: target.to_owned(),
                    reason: "brackets are only for IPv6",
                });
            }
            return Ok(Rule::Network {
                net: canonical_net(net),
                ports,
            });
        }
        if target == "*" {
            return Ok(Rule::Any { ports });
        }
        if let Some(suffix) = target.strip_prefix("*.") {
            let suffix = normalize_name(suffix).map_err(|reason| RuleError::InvalidName {
                name: suffix.to_owned(),
                reason,
            })?;
            return Ok(Rule::Suffix { suffix, ports });
        }
        if target.contains('*') {
            return Err(RuleError::MisplacedWildcard);
        }
        if looks_like_ip(target) {
            return Ok(Rule::Network {
                net: canonical_net(parse_net(target)?),
                ports,
            });
        }
        let name = normalize_name(target).map_err(|reason| RuleError::InvalidName {
            name: target.to_owned(),
            reason,
        })?;
        Ok(Rule::Host { name, ports })
    }
}

/// Splits `target[:ports]`; returns (target, ports, whether the target was bracketed).
/// A target with several colons and no brackets is a bare IPv6 address or network.
fn split_ports(s: &str) -> Result<(&str, Ports, bool), RuleError> {
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(RuleError::UnclosedBracket)?;
        let ports = match after {
            "" => Ports::any(),
            _ => match after.strip_prefix(':') {
                Some(ports) => ports.parse()?,
                None => {
                    return Err(RuleError::InvalidAddress {
                        addr: s.to_owned(),
                        reason: "expected ':' and ports after ']' (write [fd00::/8]:443)",
                    });
                }
            },
        };
        return Ok((inside, ports, true));
    }
    match s.matches(':').count() {
        0 => Ok((s, Ports::any(), false)),
        1 => {
            let (target, ports) = s.split_once(':').unwrap_or((s, ""));
            Ok((target, ports.parse()?, false))
        }
        _ => Ok((s, Ports::any(), false)),
    }
}

/// IP literals and CIDR blocks: anything with ':' (IPv6), or whose last label (before
/// any '/') is numeric, as no top-level domain is numeric.
fn looks_like_ip(target: &str) -> bool {
    let addr = target.split('/').next().unwrap_or(target);
    addr.contains(':')
        || target.contains('/')
        || addr
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses `addr` or `addr/prefix`, rejecting host bits set under the prefix.
fn parse_net(text: &str) -> Result<IpNet, RuleError> {
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| RuleError::InvalidAddress {
        addr: addr_text.to_owned(),
        reason: "not an IP address",
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(prefix) if p.bytes().all(|b| b.is_ascii_digit()) && prefix <= max => prefix,
            _ => {
                return Err(RuleError::InvalidPrefix {
                    prefix: p.to_owned(),
                    max,
                });
            }
        },
    };
    let net = IpNet::new(addr, prefix).map_err(|_| RuleError::InvalidPrefix {
        prefix: prefix.to_string(),
        max,
    })?;
    if net.trunc() != net {
        return Err(RuleError::HostBitsSet {
            cidr: text.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// IPv4-mapped IPv6 networks (inside `::ffff:0:0/96`) become IPv4 networks.
fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    match (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96)) {
        (Some(v4), Some(prefix)) => Ipv4Net::new(v4, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// Lowercases and drops a trailing dot; checks DNS name syntax (letters, digits, '-',
/// '_', labels of 1 to 63 characters not starting or ending with '-').
pub(super) fn normalize_name(name: &str) -> Result<String, &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("empty host name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("host name longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("host name has an empty label");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("host name label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("host names may contain only letters, digits, '-', '_' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("host name labels must not start or end with '-'");
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// What is wrong with a rule's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule is empty.
    #[error("empty rule")]
    Empty,
    /// Nothing before the `:ports` part.
    #[error("missing host or address before ':'")]
    MissingHost,
    /// Nothing after `:`.
    #[error("missing ports after ':'")]
    EmptyPorts,
    /// A port is not a number from 1 to 65535.
    #[error("port {port:?} is not a number from 1 to 65535")]
    InvalidPort {
        /// The rejected port text.
        port: String,
    },
    /// A port range ends before it starts.
    #[error("port range {range:?} ends before it starts")]
    ReversedPortRange {
        /// The rejected range text.
        range: String,
    },
    /// `[` without `]`.
    #[error("'[' without a closing ']'")]
    UnclosedBracket,
    /// The address part is not an IP address.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The rejected address text.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The CIDR prefix length is not a number up to 32 (IPv4) or 128 (IPv6).
    #[error("prefix length {prefix:?} is not a number from 0 to {max}")]
    InvalidPrefix {
        /// The rejected prefix text.
        prefix: String,
        /// The longest prefix for the address family.
        max: u8,
    },
    /// The address has bits set below the prefix, e.g. `10.0.0.1/8`.
    #[error("{cidr} has host bits set; did you mean {network}?")]
    HostBitsSet {
        /// The rejected CIDR text.
        cidr: String,
        /// The network it probably meant.
        network: IpNet,
    },
    /// The host name is not a valid DNS name.
    #[error("invalid host name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `*` used other than as the whole rule or a leading `*.` label.
    #[error("'*' is only allowed as the whole host (\"*\") or as a leading \"*.\" label")]
    MisplacedWildcard,
}
