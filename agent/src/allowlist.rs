//! The agent's destination allowlist: which host names, addresses and ports a tunnel
//! may reach inside the managed cluster.
//!
//! Rule forms, each optionally followed by ports (`:443`, `:80,443`, `:8000-8999`):
//!
//! | Rule | Matches |
//! |------|---------|
//! | `*` | any host name or IP address |
//! | `10.0.0.0/8`, `10.1.2.3` | IPv4 networks and addresses |
//! | `fd00::/8`, `fd00::1` | IPv6 networks and addresses, without ports |
//! | `[fd00::/8]:443`, `[fd00::1]:443` | IPv6 with ports: brackets are required |
//! | `kubernetes.default.svc` | that host name (case-insensitive, trailing dot ignored) |
//! | `*.svc.cluster.local` | any name ending in `.svc.cluster.local`, not the suffix itself |
//!
//! Protected addresses (loopback, link-local including cloud metadata, unspecified,
//! multicast, and their IPv4-mapped IPv6 forms) are denied even when a rule matches,
//! unless an IP/CIDR rule lying inside the protected range names them: `127.0.0.1`,
//! `127.0.0.0/8:80` or `169.254.169.254` lift the protection, `*`, host name rules and
//! wide blocks such as `0.0.0.0/0` do not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

mod rule;

use rule::normalize_name;
pub use rule::{Ports, Rule, RuleError};

/// A configured rule that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowlistError {
    /// The rule text is invalid.
    #[error("invalid allowlist rule {rule:?}: {reason}")]
    InvalidRule {
        /// The rule as configured.
        rule: String,
        /// Why it is invalid.
        #[source]
        reason: RuleError,
    },
}

/// Why a destination is refused. The message is meant for the caller of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No rule allows this host and port.
    #[error("destination {host}:{port} is not allowed by the agent's allowlist")]
    NotAllowed {
        /// The requested host.
        host: String,
        /// The requested port.
        port: u16,
    },
    /// No rule allows this port, whatever the host resolves to.
    #[error("destination {host}:{port} is not allowed: no allowlist rule permits port {port}")]
    PortNotAllowed {
        /// The requested host.
        host: String,
        /// The requested port.
        port: u16,
    },
    /// The address is in a protected range and no IP rule names it.
    #[error(
        "destination {} is {what}; allow it explicitly with an IP rule",
        describe(.host, .addr)
    )]
    Protected {
        /// The requested host.
        host: String,
        /// The address it resolved to.
        addr: SocketAddr,
        /// Which protected range, e.g. "loopback".
        what: &'static str,
    },
    /// The host is neither an IP address nor a valid DNS name.
    #[error("destination host {host:?} is not a valid host name or IP address: {reason}")]
    InvalidHost {
        /// The requested host.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Denied {
    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Denied::NotAllowed { .. } => "not_allowed",
            Denied::PortNotAllowed { .. } => "port_not_allowed",
            Denied::Protected { .. } => "protected",
            Denied::InvalidHost { .. } => "invalid_host",
        }
    }
}

/// `10.0.0.1:80` when the host is the address, else `name (10.0.0.1:80)`.
fn describe(host: &str, addr: &SocketAddr) -> String {
    match parse_ip_literal(host) {
        Some(ip) if ip == addr.ip() => addr.to_string(),
        _ => format!("{host} ({addr})"),
    }
}

/// A protected address range.
struct Protected {
    net: IpNet,
    what: &'static str,
}

/// Ranges a tunnel must not reach by default. More specific entries first, so the
/// message names the most specific one. IPv4-mapped IPv6 addresses are compared in
/// IPv4 form, so they are covered by the IPv4 entries.
const PROTECTED: [Protected; 10] = [
    Protected {
        net: v4(Ipv4Addr::new(169, 254, 169, 254), 32),
        what: "link-local (cloud metadata)",
    },
    Protected {
        // AWS instance metadata over IPv6.
        net: v6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128),
        what: "cloud metadata",
    },
    Protected {
        net: v4(Ipv4Addr::new(127, 0, 0, 0), 8),
        what: "loopback",
    },
    Protected {
        net: v6(Ipv6Addr::LOCALHOST, 128),
        what: "loopback",
    },
    Protected {
        net: v4(Ipv4Addr::new(169, 254, 0, 0), 16),
        what: "link-local",
    },
    Protected {
        net: v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
        what: "link-local",
    },
    Protected {
        // 0.0.0.0 reaches the local host on Linux; the rest of 0/8 is never a destination.
        net: v4(Ipv4Addr::new(0, 0, 0, 0), 8),
        what: "unspecified",
    },
    Protected {
        net: v6(Ipv6Addr::UNSPECIFIED, 128),
        what: "unspecified",
    },
    Protected {
        net: v4(Ipv4Addr::new(224, 0, 0, 0), 4),
        what: "multicast",
    },
    Protected {
        net: v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
        what: "multicast",
    },
];

const fn v4(addr: Ipv4Addr, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(addr, len))
}

const fn v6(addr: Ipv6Addr, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(addr, len))
}

/// Parses `10.0.0.1`, `::1` or `[::1]`.
fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

/// The destinations the agent may dial.
#[derive(Debug, Clone)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

impl Allowlist {
    /// An allowlist of `rules`; no rules allows any destination except protected ones.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Parses configured rules; the error names the first bad rule and why.
    pub fn parse(rules: &[String]) -> Result<Self, AllowlistError> {
        let rules = rules
            .iter()
            .map(|rule| {
                rule.parse().map_err(|reason| AllowlistError::InvalidRule {
                    rule: rule.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::new(rules))
    }

    /// The rules, in configured order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Before resolving: is this host name/IP literal + port possibly allowed? (a name that
    /// no name rule matches may still be allowed by a CIDR rule after resolution, so only
    /// reject names here when no rule at all could allow them: e.g. port not allowed by
    /// any rule)
    ///
    /// An IP literal gets the final decision right away.
    pub fn check_request(&self, host: &str, port: u16) -> Result<(), Denied> {
        if let Some(ip) = parse_ip_literal(host) {
            return self.check_resolved(host, SocketAddr::new(ip, port));
        }
        let name = normalize_name(host).map_err(|reason| Denied::InvalidHost {
            host: host.to_owned(),
            reason,
        })?;
        if self.rules.is_empty() {
            return Ok(());
        }
        let could_allow = self.rules.iter().any(|rule| {
            rule.ports().contains(port)
                && (matches!(rule, Rule::Network { .. }) || rule.matches_name(&name))
        });
        if could_allow {
            return Ok(());
        }
        let host = host.to_owned();
        if self.rules.iter().any(|rule| rule.ports().contains(port)) {
            Err(Denied::NotAllowed { host, port })
        } else {
            Err(Denied::PortNotAllowed { host, port })
        }
    }

    /// After resolving `host` to `addr`: the final decision.
    pub fn check_resolved(&self, host: &str, addr: SocketAddr) -> Result<(), Denied> {
        let ip = addr.ip().to_canonical();
        let port = addr.port();
        // Name rules match names only, never an IP literal written as the host.
        let name = match parse_ip_literal(host) {
            Some(_) => None,
            None => normalize_name(host).ok(),
        };
        let mut allowed = self.rules.is_empty();
        for rule in self.rules.iter().filter(|r| r.ports().contains(port)) {
            match rule {
                Rule::Network { net, .. } => allowed |= net.contains(&ip),
                Rule::Any { .. } => allowed = true,
                _ => allowed |= name.as_deref().is_some_and(|n| rule.matches_name(n)),
            }
        }
        if !allowed {
            return Err(Denied::NotAllowed {
                host: host.to_owned(),
                port,
            });
        }
        let Some(protected) = PROTECTED.iter().find(|p| p.net.contains(&ip)) else {
            return Ok(());
        };
        // Only a rule inside a protected range that holds the address lifts protection,
        // so `127.0.0.1` does but `0.0.0.0/0` does not.
        let lifted = self.rules.iter().any(|rule| match rule {
            Rule::Network { net, ports } => {
                ports.contains(port)
                    && net.contains(&ip)
                    && PROTECTED
                        .iter()
                        .any(|p| p.net.contains(&ip) && p.net.contains(net))
            }
            _ => false,
        });
        if lifted {
            return Ok(());
        }
        Err(Denied::Protected {
            host: host.to_owned(),
            addr,
            what: protected.what,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> Allowlist {
        let rules: Vec<String> = rules.iter().map(|r| (*r).to_owned()).collect();
        Allowlist::parse(&rules).expect("valid rules")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket addr")
    }

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parse_err(s: &str) -> String {
        Allowlist::parse(&[s.to_owned()])
            .expect_err("rule must be rejected")
            .to_string()
    }

    #[test]
    fn parses_each_form() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        assert_eq!(
            rule("*"),
            Rule::Any {
                ports: Ports::any()
            }
        );
        assert_eq!(
            rule("*:443"),
            Rule::Any {
                ports: Ports::from_ranges([443..=443])
            }
        );
        assert_eq!(
            rule("10.0.0.0/8"),
            Rule::Network {
                net: net("10.0.0.0/8"),
                ports: Ports::any()
            }
        );
        assert_eq!(
            rule("10.1.2.3:80,443"),
            Rule::Network {
                net: net("10.1.2.3/32"),
                ports: Ports::from_ranges([80..=80, 443..=443])
            }
        );
        assert_eq!(
            rule("fd00::/8"),
            Rule::Network {
                net: net("fd00::/8"),
                ports: Ports::any()
            }
        );
        assert_eq!(
            rule("[fd00::1]:443"),
            Rule::Network {
                net: net("fd00::1/128"),
                ports: Ports::from_ranges([443..=443])
            }
        );
        assert_eq!(
            rule("[fd00::/8]:8000-8999"),
            Rule::Network {
                net: net("fd00::/8"),
                ports: Ports::from_ranges([8000..=8999])
            }
        );
        assert_eq!(
            rule("Kubernetes.Default.SVC."),
            Rule::Host {
                name: "kubernetes.default.svc".into(),
                ports: Ports::any()
            }
        );
        assert_eq!(
            rule("*.svc.cluster.local:80,443"),
            Rule::Suffix {
                suffix: "svc.cluster.local".into(),
                ports: Ports::from_ranges([80..=80, 443..=443])
            }
        );
        // IPv4-mapped IPv6 rules compare as IPv4.
        assert_eq!(
            rule("::ffff:10.0.0.0/104"),
            Rule::Network {
                net: net("10.0.0.0/8"),
                ports: Ports::any()
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "*",
            "*:443",
            "10.0.0.0/8",
            "10.1.2.3:80,443",
            "fd00::/8",
            "fd00::1",
            "[fd00::1]:443",
            "[fd00::/8]:8000-8999",
            "kubernetes.default.svc:443",
            "*.svc.cluster.local",
        ] {
            let parsed = rule(text);
            assert_eq!(parsed.to_string(), text);
            assert_eq!(rule(&parsed.to_string()), parsed);
        }
    }

    #[test]
    fn bad_rules_say_why() {
        assert_eq!(
            parse_err("10.0.0.0/33"),
            "invalid allowlist rule \"10.0.0.0/33\": prefix length \"33\" is not a number from 0 to 32"
        );
        assert_eq!(
            parse_err("a..b"),
            "invalid allowlist rule \"a..b\": invalid host name \"a..b\": host name has an empty label"
        );
        assert_eq!(
            parse_err(":99999"),
            "invalid allowlist rule \":99999\": port \"99999\" is not a number from 1 to 65535"
        );
        assert_eq!(parse_err(""), "invalid allowlist rule \"\": empty rule");
        assert_eq!(
            parse_err(":443"),
            "invalid allowlist rule \":443\": missing host or address before ':'"
        );
        assert_eq!(
            parse_err("10.0.0.1/8"),
            "invalid allowlist rule \"10.0.0.1/8\": 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
        let cases = [
            ("host:", "missing ports after ':'"),
            ("host:0", "port \"0\" is not a number from 1 to 65535"),
            ("host:80,", "port \"\" is not a number from 1 to 65535"),
            ("host:9-1", "port range \"9-1\" ends before it starts"),
            ("host:http", "port \"http\" is not a number from 1 to 65535"),
            (
                "fd00::/129",
                "prefix length \"129\" is not a number from 0 to 128",
            ),
            (
                "10.0.0.256",
                "invalid address \"10.0.0.256\": not an IP address",
            ),
            ("[fd00::1", "'[' without a closing ']'"),
            ("[10.0.0.1]:80", "brackets are only for IPv6"),
            ("a.*.b", "'*' is only allowed"),
            ("*foo", "'*' is only allowed"),
            ("*.", "empty host name"),
            ("-a.b", "must not start or end with '-'"),
            ("a b", "may contain only letters"),
        ];
        for (text, want) in cases {
            let err = parse_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn empty_rules_allow_anything_unprotected() {
        let allow = Allowlist::new(Vec::new());
        assert_eq!(allow.check_request("example.com", 443), Ok(()));
        assert_eq!(
            allow.check_resolved("example.com", addr("93.184.216.34:443")),
            Ok(())
        );
        assert_eq!(allow.check_resolved("db", addr("[fd00::5]:5432")), Ok(()));
        assert!(allow.check_resolved("db", addr("127.0.0.1:5432")).is_err());
    }

    #[test]
    fn each_protected_range_is_denied_by_default() {
        let allow = list(&["*"]);
        let cases = [
            ("127.0.0.1:80", "loopback"),
            ("127.9.9.9:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("169.254.169.254:80", "link-local (cloud metadata)"),
            ("169.254.1.1:80", "link-local"),
            ("[fe80::1]:80", "link-local"),
            ("[fd00:ec2::254]:80", "cloud metadata"),
            ("0.0.0.0:80", "unspecified"),
            ("[::]:80", "unspecified"),
            ("224.0.0.1:80", "multicast"),
            ("239.255.255.250:1900", "multicast"),
            ("[ff02::1]:80", "multicast"),
            // IPv4-mapped IPv6 forms.
            ("[::ffff:127.0.0.1]:80", "loopback"),
            ("[::ffff:169.254.169.254]:80", "link-local (cloud metadata)"),
            ("[::ffff:0.0.0.0]:80", "unspecified"),
            ("[::ffff:224.0.0.1]:80", "multicast"),
        ];
        for (a, what) in cases {
            let a = addr(a);
            let host = a.ip().to_string();
            match allow.check_resolved(&host, a) {
                Err(Denied::Protected { what: got, .. }) => assert_eq!(got, what, "{a}"),
                other => panic!("{a}: {other:?}"),
            }
            // An IP literal is decided before resolution too.
            assert!(allow.check_request(&host, a.port()).is_err(), "{a}");
        }
        assert_eq!(
            allow.check_resolved("10.0.0.1", addr("10.0.0.1:80")),
            Ok(())
        );
        assert_eq!(
            allow.check_resolved("x", addr("[::ffff:10.0.0.1]:80")),
            Ok(())
        );
    }

    #[test]
    fn protected_message_is_fit_for_the_caller() {
        let allow = Allowlist::new(Vec::new());
        let err = allow
            .check_resolved("169.254.169.254", addr("169.254.169.254:80"))
            .expect_err("metadata is protected");
        assert_eq!(
            err.to_string(),
            "destination 169.254.169.254:80 is link-local (cloud metadata); allow it explicitly with an IP rule"
        );
        assert_eq!(err.metric_label(), "protected");
        let err = allow
            .check_resolved("localhost", addr("127.0.0.1:80"))
            .expect_err("loopback is protected");
        assert_eq!(
            err.to_string(),
            "destination localhost (127.0.0.1:80) is loopback; allow it explicitly with an IP rule"
        );
    }

    #[test]
    fn explicit_ip_rules_lift_protection() {
        let localhost = addr("127.0.0.1:80");
        assert!(list(&[]).check_resolved("localhost", localhost).is_err());
        assert!(list(&["*"]).check_resolved("localhost", localhost).is_err());
        assert!(
            list(&["localhost"])
                .check_resolved("localhost", localhost)
                .is_err()
        );
        assert_eq!(
            list(&["127.0.0.1"]).check_resolved("localhost", localhost),
            Ok(())
        );
        assert_eq!(
            list(&["127.0.0.0/8:80"]).check_resolved("localhost", localhost),
            Ok(())
        );
        assert_eq!(
            list(&["127.0.0.0/8:80"]).check_request("127.0.0.1", 80),
            Ok(())
        );
        // The explicit rule must cover the port.
        assert!(
            list(&["*", "127.0.0.1:22"])
                .check_resolved("localhost", localhost)
                .is_err()
        );
        // A wide block is not an explicit choice to reach the node's loopback or metadata.
        assert!(
            list(&["0.0.0.0/0"])
                .check_resolved("localhost", localhost)
                .is_err()
        );
        assert!(
            list(&["::/0"])
                .check_resolved("x", addr("[::1]:80"))
                .is_err()
        );
        assert_eq!(
            list(&["0.0.0.0/0"]).check_resolved("x", addr("10.0.0.1:80")),
            Ok(())
        );
        // Metadata: the address itself or the link-local block.
        let metadata = addr("169.254.169.254:80");
        assert_eq!(
            list(&["169.254.169.254"]).check_resolved("m", metadata),
            Ok(())
        );
        assert_eq!(
            list(&["169.254.0.0/16"]).check_resolved("m", metadata),
            Ok(())
        );
        assert!(
            list(&["169.254.1.0/24"])
                .check_resolved("m", metadata)
                .is_err()
        );
        // IPv6 loopback, and the mapped form of an allowed IPv4 address.
        assert_eq!(list(&["::1"]).check_resolved("x", addr("[::1]:80")), Ok(()));
        assert_eq!(
            list(&["127.0.0.1"]).check_resolved("x", addr("[::ffff:127.0.0.1]:80")),
            Ok(())
        );
        assert_eq!(
            list(&["[::ffff:127.0.0.1]:80"]).check_resolved("x", localhost),
            Ok(())
        );
    }

    #[test]
    fn name_rules() {
        let allow = list(&["kubernetes.default.svc:443", "*.svc.cluster.local"]);
        let ip = addr("10.96.0.1:443");
        assert_eq!(allow.check_resolved("kubernetes.default.svc", ip), Ok(()));
        assert_eq!(allow.check_resolved("KUBERNETES.Default.svc.", ip), Ok(()));
        assert!(
            allow
                .check_resolved("kubernetes.default.svc", addr("10.96.0.1:80"))
                .is_err()
        );
        assert_eq!(allow.check_resolved("api.ns.svc.cluster.local", ip), Ok(()));
        assert_eq!(
            allow.check_resolved("API.NS.SVC.Cluster.Local.", ip),
            Ok(())
        );
        // "*.x" does not match "x" itself, nor names that merely end in "x".
        assert!(allow.check_resolved("svc.cluster.local", ip).is_err());
        assert!(allow.check_resolved("evilsvc.cluster.local", ip).is_err());
        assert!(allow.check_resolved("example.com", ip).is_err());
        // Name rules never lift protection.
        assert!(
            allow
                .check_resolved("a.svc.cluster.local", addr("127.0.0.1:80"))
                .is_err()
        );
        // Name rules do not match IP literal hosts.
        assert!(allow.check_resolved("10.96.0.1", ip).is_err());
    }

    #[test]
    fn ports_forms() {
        let allow = list(&["*:80,443", "10.0.0.0/8:8000-8999"]);
        assert_eq!(allow.check_resolved("a", addr("1.2.3.4:80")), Ok(()));
        assert_eq!(allow.check_resolved("a", addr("1.2.3.4:443")), Ok(()));
        assert!(allow.check_resolved("a", addr("1.2.3.4:8080")).is_err());
        assert_eq!(allow.check_resolved("a", addr("10.1.1.1:8000")), Ok(()));
        assert_eq!(allow.check_resolved("a", addr("10.1.1.1:8999")), Ok(()));
        assert!(allow.check_resolved("a", addr("10.1.1.1:9000")).is_err());
        assert!(allow.check_resolved("a", addr("10.1.1.1:7999")).is_err());
    }

    #[test]
    fn ipv6_rules() {
        let allow = list(&["fd00::/8", "[2001:db8::1]:443"]);
        assert_eq!(allow.check_resolved("a", addr("[fd12::1]:5432")), Ok(()));
        assert!(allow.check_resolved("a", addr("[fe00::1]:5432")).is_err());
        assert_eq!(allow.check_request("2001:db8::1", 443), Ok(()));
        assert_eq!(allow.check_request("[2001:db8::1]", 443), Ok(()));
        assert!(allow.check_request("2001:db8::1", 80).is_err());
        assert!(allow.check_resolved("a", addr("10.0.0.1:443")).is_err());
    }

    #[test]
    fn check_request_only_rejects_what_no_rule_could_allow() {
        let allow = list(&["10.0.0.0/8:5432", "api.example.com:443"]);
        // A name may still resolve into 10/8.
        assert_eq!(allow.check_request("db.internal", 5432), Ok(()));
        assert_eq!(allow.check_request("api.example.com", 443), Ok(()));
        assert_eq!(allow.check_request("API.example.com.", 443), Ok(()));
        assert_eq!(
            allow.check_request("db.internal", 22),
            Err(Denied::PortNotAllowed {
                host: "db.internal".into(),
                port: 22
            })
        );
        assert_eq!(
            allow
                .check_request("db.internal", 22)
                .map_err(|e| e.to_string()),
            Err(
                "destination db.internal:22 is not allowed: no allowlist rule permits port 22"
                    .into()
            )
        );
        // Port 443 is allowed, but only for a name that does not match and no IP rule has it.
        let err = allow
            .check_request("other.example.com", 443)
            .expect_err("denied");
        assert_eq!(err.metric_label(), "not_allowed");
        assert_eq!(
            err.to_string(),
            "destination other.example.com:443 is not allowed by the agent's allowlist"
        );
        // IP literals are decided at once.
        assert!(allow.check_request("192.168.1.1", 5432).is_err());
        assert_eq!(allow.check_request("10.2.3.4", 5432), Ok(()));
        // Garbage host names are refused.
        for bad in ["", "a b", "a..b", "-x"] {
            let err = allow.check_request(bad, 5432).expect_err("invalid host");
            assert_eq!(err.metric_label(), "invalid_host", "{bad:?}");
        }
        // With no rules, names pass until resolution.
        assert_eq!(
            Allowlist::new(Vec::new()).check_request("localhost", 80),
            Ok(())
        );
    }

    #[test]
    fn resolved_names_must_match_a_rule() {
        let allow = list(&["10.0.0.0/8"]);
        assert_eq!(
            allow.check_resolved("db.internal", addr("10.1.2.3:5432")),
            Ok(())
        );
        let err = allow
            .check_resolved("db.internal", addr("192.168.0.1:5432"))
            .expect_err("denied");
        assert_eq!(
            err,
            Denied::NotAllowed {
                host: "db.internal".into(),
                port: 5432
            }
        );
    }
}
