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
//!
//! Some addresses are never dialed, checked after resolution so that a name
//! resolving to them (DNS rebinding) is refused too ([`refused_kind`]):
//! loopback (the pod's own ports, such as the sidecar's admin port and its
//! `POST /shutdown`), unspecified (`0.0.0.0` reaches loopback on Linux) and
//! link-local (a cloud's metadata service at `169.254.169.254`, `fe80::/10`).
//! A request-forging bug in the app must not turn the proxy into a way to
//! those. `--direct-allow-ip` lets named ones through (tests, or a pod whose
//! processes talk to each other through the proxy).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnel_api::sidecar::DirectPolicy;
use tunnel_proto::error::{ErrorCode, TunnelError, dial_error};

/// Least time one address of several gets to connect (as Go's dialer does):
/// the rest of the budget is shared among the addresses left, so that one
/// that never answers does not use up the time of those after it.
pub const MIN_ADDRESS_TIMEOUT: Duration = Duration::from_secs(2);

/// AWS's instance metadata service over IPv6 (not link-local, but the same service).
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Why the proxy never dials `ip` directly, if it does not: the kind of
/// address, for the error message.
pub fn refused_kind(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.octets()[0] == 0 => {
            Some("unspecified (it reaches this pod's own ports)")
        }
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("link-local (where a cloud's metadata service answers)")
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            Some("unspecified (it reaches this pod's own ports)")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        IpAddr::V6(v6) if v6 == AWS_METADATA_V6 => Some("a cloud's metadata service"),
        _ => None,
    }
}

/// Opens direct connections.
#[derive(Debug, Clone)]
pub struct DirectDialer {
    /// Allow or deny.
    pub policy: DirectPolicy,
    /// Names answered before the resolver, lower case, like /etc/hosts.
    pub host_aliases: HashMap<String, IpAddr>,
    /// Addresses among the refused ones ([`refused_kind`]) that may be dialed anyway.
    pub allowed: Vec<IpNet>,
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
        let deadline = Instant::now() + self.timeout;
        let attempt = async {
            let resolved = self.resolve(host, port).await?;
            let addrs = self.permitted(host, &dest, resolved)?;
            self.connect_any(&dest, &addrs, deadline).await
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => Err(TunnelError::new(
                ErrorCode::DialTimeout,
                format!("dial {dest}: no answer within {:?}", self.timeout),
            )),
        }
    }

    /// The addresses of `resolved` the proxy may dial; an error naming the
    /// first one when none is.
    fn permitted(
        &self,
        host: &str,
        dest: &str,
        resolved: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, TunnelError> {
        let mut refused = None;
        let mut ok = Vec::with_capacity(resolved.len());
        for addr in resolved {
            let ip = addr.ip().to_canonical();
            match refused_kind(ip) {
                Some(kind) if !self.allowed.iter().any(|n| n.contains(&ip)) => {
                    refused.get_or_insert((ip, kind));
                }
                _ => ok.push(addr),
            }
        }
        match (ok.is_empty(), refused) {
            (true, Some((ip, kind))) => {
                let what = if host.parse::<IpAddr>().is_ok() {
                    format!("{dest} is a {kind} address")
                } else {
                    format!("{dest}: {host} resolves to {ip}, a {kind} address")
                };
                Err(TunnelError::new(
                    ErrorCode::DestinationNotAllowed,
                    format!(
                        "{what}; the proxy never dials loopback, unspecified or link-local addresses \
                         (this pod's own ports, a cloud's metadata service): reach them without the \
                         proxy (NO_PROXY), or allow them with --direct-allow-ip"
                    ),
                ))
            }
            _ => Ok(ok),
        }
    }

    /// Connects to the first of `addrs` that answers by `deadline`, each
    /// getting an equal share of the time left (at least
    /// [`MIN_ADDRESS_TIMEOUT`]).
    async fn connect_any(
        &self,
        dest: &str,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<TcpStream, TunnelError> {
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            let wait = share.max(MIN_ADDRESS_TIMEOUT).min(left);
            match tokio::time::timeout(wait, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    tunnel_proto::net::set_nodelay_or_warn(&tcp);
                    return Ok(tcp);
                }
                Ok(Err(e)) => last = Some(dial_error(dest, &e)),
                Err(_) => {
                    tracing::debug!(%addr, ?wait, "direct dial: no answer; trying the next address");
                    last = Some(TunnelError::new(
                        ErrorCode::DialTimeout,
                        format!("dial {dest} ({addr}): no answer within {wait:?}"),
                    ));
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            TunnelError::new(
                ErrorCode::DialTimeout,
                format!("dial {dest}: no answer within {:?}", self.timeout),
            )
        }))
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

/// Why a `--host-alias` or `--direct-allow-ip` entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectSpecError {
    /// A host alias without `=IP`.
    #[error("{0:?}: expected NAME=IP")]
    MissingIp(String),
    /// A host alias whose name is empty or has white space.
    #[error("{0:?}: invalid name")]
    InvalidName(String),
    /// A host alias whose IP part is no IP address.
    #[error("{spec:?}: {ip:?} is not an IP address")]
    InvalidIp {
        /// The entry as given.
        spec: String,
        /// Its IP part.
        ip: String,
    },
    /// An allowed entry that is neither an address nor a network.
    #[error("{0:?} is neither an IP address nor a network (ADDR/PREFIX)")]
    NotAnAddress(String),
}

/// Parses `NAME=IP` host aliases.
pub fn parse_host_aliases(specs: &[String]) -> Result<HashMap<String, IpAddr>, DirectSpecError> {
    let mut out = HashMap::new();
    for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (name, ip) = spec
            .split_once('=')
            .ok_or_else(|| DirectSpecError::MissingIp(spec.to_owned()))?;
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(DirectSpecError::InvalidName(spec.to_owned()));
        }
        let ip: IpAddr = ip.trim().parse().map_err(|_| DirectSpecError::InvalidIp {
            spec: spec.to_owned(),
            ip: ip.to_owned(),
        })?;
        out.insert(name, ip);
    }
    Ok(out)
}

/// Parses `--direct-allow-ip` entries: an address (`127.0.3.1`) or a
/// network (`127.0.3.0/24`).
pub fn parse_allowed_ips(specs: &[String]) -> Result<Vec<IpNet>, DirectSpecError> {
    specs
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| DirectSpecError::NotAnAddress(s.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dialer that may dial loopback (where these tests' listeners are).
    fn dialer(policy: DirectPolicy) -> DirectDialer {
        DirectDialer {
            policy,
            host_aliases: parse_host_aliases(&["Backend.Team.=127.0.0.1".into()]).unwrap(),
            allowed: parse_allowed_ips(&["127.0.0.0/8".into()]).unwrap(),
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

    /// The sidecar's own admin port (and its `POST /shutdown`), other
    /// processes of the pod and the cloud's metadata service are not
    /// reachable through the proxy, by address or by a name that resolves
    /// to one, before anything is dialed.
    #[tokio::test]
    async fn loopback_unspecified_and_link_local_addresses_are_refused_after_resolution() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let d = DirectDialer {
            policy: DirectPolicy::Allow,
            host_aliases: parse_host_aliases(&[
                "rebound.example.com=127.0.0.1".into(),
                "metadata.google.internal=169.254.169.254".into(),
            ])
            .unwrap(),
            allowed: Vec::new(),
            timeout: Duration::from_secs(5),
        };
        for host in [
            "127.0.0.1",
            "127.0.0.53",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "localhost",
            "rebound.example.com",
            "metadata.google.internal",
        ] {
            let err = d.dial(host, port).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::DestinationNotAllowed, "{host}: {err}");
            assert!(err.message.contains("--direct-allow-ip"), "{host}: {err}");
        }
        let err = d.dial("rebound.example.com", port).await.unwrap_err();
        assert!(
            err.message
                .contains("resolves to 127.0.0.1, a loopback address"),
            "{err}"
        );
        // Nothing reached the listener.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "a refused address was dialed");
        // Allowed by --direct-allow-ip: dialed.
        let d = DirectDialer {
            allowed: parse_allowed_ips(&["127.0.0.1".into()]).unwrap(),
            ..d
        };
        d.dial("rebound.example.com", port).await.unwrap();
        assert_eq!(
            d.dial("127.0.0.2", port).await.unwrap_err().code,
            ErrorCode::DestinationNotAllowed,
            "only the allowed address"
        );
        // Ordinary addresses are no concern of the list.
        for ip in ["10.96.0.10", "192.168.1.1", "fd00::1", "8.8.8.8"] {
            assert_eq!(refused_kind(ip.parse().unwrap()), None, "{ip}");
        }
    }

    /// A listener whose accept queue is full: a connect to it neither
    /// succeeds nor is refused.
    async fn black_hole() -> (SocketAddr, tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => queued.push(tcp),
                Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
                Err(_) => return (addr, listener, queued),
            }
        }
        panic!("the accept queue of {addr} never filled");
    }

    /// A name with several addresses, the first of which never answers: the
    /// next one still gets its share of the time and is reached.
    #[tokio::test]
    async fn an_address_that_never_answers_leaves_time_for_the_next() {
        let (hole, _listener, _queued) = black_hole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let d = DirectDialer {
            timeout: MIN_ADDRESS_TIMEOUT * 2,
            ..dialer(DirectPolicy::Allow)
        };
        let deadline = Instant::now() + d.timeout;
        let tcp = d
            .connect_any("backend:80", &[hole, good_addr], deadline)
            .await
            .unwrap_or_else(|e| panic!("the second address was not tried in time: {e}"));
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        // Alone, it times out with a message naming it.
        let err = d
            .connect_any("backend:80", &[hole], Instant::now() + MIN_ADDRESS_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::DialTimeout, "{err}");
        assert!(err.message.contains(&hole.to_string()), "{err}");
    }

    #[test]
    fn bad_aliases_and_allowed_addresses_are_named() {
        assert!(
            parse_host_aliases(&["backend".into()])
                .unwrap_err()
                .to_string()
                .contains("NAME=IP")
        );
        assert!(
            parse_host_aliases(&["backend=not-an-ip".into()])
                .unwrap_err()
                .to_string()
                .contains("not an IP")
        );
        assert!("maybe".parse::<DirectPolicy>().is_err());
        assert_eq!("deny".parse::<DirectPolicy>(), Ok(DirectPolicy::Deny));
        assert_eq!(
            parse_allowed_ips(&["127.0.3.1".into(), "127.0.3.9/24".into()]).unwrap(),
            [
                "127.0.3.1/32".parse::<IpNet>().unwrap(),
                "127.0.3.0/24".parse().unwrap()
            ]
        );
        assert!(
            parse_allowed_ips(&["localhost".into()])
                .unwrap_err()
                .to_string()
                .contains("localhost")
        );
    }
}
