//! Direct connections: what the HTTP proxy is asked for outside every
//! cluster (a hub Service by short name, `name.namespace`, a pod or
//! ClusterIP address, a public name) is dialed from the pod itself, as an
//! ordinary forward proxy does, so that injecting the sidecar never changes
//! where hub traffic goes.
//!
//! Names resolve as the application's own would (the pod's resolver, with its
//! search domains), after the `--host-alias` entries. The proxy listens on
//! loopback only, so only processes of the pod can ask it for a direct
//! connection, which they could open themselves; `--direct deny` refuses them
//! for pods that must reach nothing but the clusters.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tunnel_proto::error::{ErrorCode, TunnelError, dial_error};

/// Whether the proxy dials destinations outside the clusters itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DirectPolicy {
    /// Dial them from the pod (the default: hub traffic works as before).
    #[default]
    Allow,
    /// Refuse them (403 `destination_not_allowed`).
    Deny,
}

impl DirectPolicy {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectPolicy::Allow => "allow",
            DirectPolicy::Deny => "deny",
        }
    }
}

impl std::str::FromStr for DirectPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "allow" => Ok(DirectPolicy::Allow),
            "deny" => Ok(DirectPolicy::Deny),
            other => Err(format!("{other:?}: expected allow or deny")),
        }
    }
}

/// Opens direct connections.
#[derive(Debug, Clone)]
pub struct DirectDialer {
    /// Allow or deny.
    pub policy: DirectPolicy,
    /// Names answered before the resolver, lower case, like /etc/hosts.
    pub host_aliases: HashMap<String, IpAddr>,
    /// Longest time to resolve and connect.
    pub timeout: Duration,
}

impl DirectDialer {
    /// Resolves `host` and connects to `port` on the first address that
    /// answers. Errors carry the codes a tunnelled dial would.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, TunnelError> {
        let dest = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if self.policy == DirectPolicy::Deny {
            return Err(TunnelError::new(
                ErrorCode::DestinationNotAllowed,
                format!(
                    "{dest} is in no cluster, and direct connections are turned off for this pod (--direct deny)"
                ),
            ));
        }
        let attempt = async {
            let addrs = self.resolve(host, port).await?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(tcp) => {
                        tunnel_proto::net::set_nodelay_or_warn(&tcp);
                        return Ok(tcp);
                    }
                    Err(e) => last = Some(dial_error(&dest, &e)),
                }
            }
            Err(last.unwrap_or_else(|| {
                TunnelError::new(
                    ErrorCode::DnsFailure,
                    format!("resolve {host}: no addresses"),
                )
            }))
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(TunnelError::new(
                ErrorCode::DialTimeout,
                format!("dial {dest}: no answer within {:?}", self.timeout),
            )),
        }
    }

    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, TunnelError> {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ip) = self.host_aliases.get(&name) {
            return Ok(vec![SocketAddr::new(*ip, port)]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| TunnelError::new(ErrorCode::DnsFailure, format!("resolve {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(TunnelError::new(
                ErrorCode::DnsFailure,
                format!("resolve {host}: no addresses"),
            ));
        }
        Ok(addrs)
    }
}

/// Parses `NAME=IP` host aliases.
pub fn parse_host_aliases(specs: &[String]) -> Result<HashMap<String, IpAddr>, String> {
    let mut out = HashMap::new();
    for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (name, ip) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: expected NAME=IP"))?;
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("{spec:?}: invalid name"));
        }
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{spec:?}: {ip:?} is not an IP address"))?;
        out.insert(name, ip);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer(policy: DirectPolicy) -> DirectDialer {
        DirectDialer {
            policy,
            host_aliases: parse_host_aliases(&["Backend.Team.=127.0.0.1".into()]).unwrap(),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn aliases_and_addresses_are_dialed_and_deny_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let d = dialer(DirectPolicy::Allow);
        for host in ["backend.team", "BACKEND.team.", "127.0.0.1"] {
            let tcp = d
                .dial(host, port)
                .await
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(tcp.peer_addr().unwrap().port(), port);
        }
        let err = dialer(DirectPolicy::Deny)
            .dial("backend.team", port)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DestinationNotAllowed);
        assert!(err.message.contains("--direct deny"), "{err}");
    }

    #[tokio::test]
    async fn failures_carry_the_dial_codes() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dialer(DirectPolicy::Allow);
        let err = d.dial("127.0.0.1", closed).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DestinationRefused, "{err}");
        // `.invalid` never resolves (RFC 6761).
        let err = d.dial("nothing.invalid", 80).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::DnsFailure, "{err}");
    }

    #[test]
    fn bad_aliases_are_named() {
        assert!(
            parse_host_aliases(&["backend".into()])
                .unwrap_err()
                .contains("NAME=IP")
        );
        assert!(
            parse_host_aliases(&["backend=not-an-ip".into()])
                .unwrap_err()
                .contains("not an IP")
        );
        assert!("maybe".parse::<DirectPolicy>().is_err());
        assert_eq!("deny".parse::<DirectPolicy>(), Ok(DirectPolicy::Deny));
    }
}
