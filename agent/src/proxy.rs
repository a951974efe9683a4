//! Dialing the hub through an HTTP proxy: the TCP connection to a server is
//! an HTTP `CONNECT` tunnel through the proxy `HTTPS_PROXY` names (the
//! agent speaks TLS to the hub, so it is the HTTPS proxy that applies),
//! unless `NO_PROXY` exempts the server. The TLS handshake then runs inside
//! the tunnel, end to end with the server: the proxy sees only the server's
//! name and port.
//!
//! The variables are read as Go programs read them (open-cluster-management's
//! `AddOnDeploymentConfig.proxyConfig` sets them on the agent, as on every
//! addon): `HTTPS_PROXY`, else `https_proxy`; `NO_PROXY`, else `no_proxy`.
//!
//! - The proxy URL is `http://[user:password@]host[:port]` (a URL without a
//!   scheme is taken as `http://`; port 80 by default). The user and password
//!   (percent-decoded) are sent as `Proxy-Authorization: Basic`. A proxy
//!   reached over TLS (`https://`, which needs `proxyConfig.caBundle`) and
//!   SOCKS are not supported: such a URL is refused when the agent starts.
//! - `NO_PROXY` is a comma-separated list: `*` (no proxy at all); a host name,
//!   which matches it and its subdomains (`example.com`: `example.com` and
//!   `hub.example.com`); a name with a leading `.` or `*.`, its subdomains
//!   only; an IP address or a CIDR (`10.0.0.0/8`), matching the server's host
//!   when it is an address, or the address its name resolved to; each with an
//!   optional `:port`, then only for that port. `localhost` and loopback
//!   addresses never go through the proxy.
//!
//! A proxy that answers the `CONNECT` with anything but `200` fails the
//! attempt with an error naming the proxy, the target and the status line;
//! the agent retries with its backoff like any failed connection.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The longest proxy response head the agent reads.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The proxy settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyConfigError {
    /// The proxy URL cannot be used.
    #[error("{var}={url:?}: {reason}")]
    BadUrl {
        /// The variable that named it.
        var: &'static str,
        /// The URL, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `NO_PROXY` entry cannot be read.
    #[error("{var}: {entry:?} is not a host name, address or CIDR")]
    BadNoProxy {
        /// The variable.
        var: &'static str,
        /// The entry.
        entry: String,
    },
}

/// A connection to a server could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The server (no proxy) did not accept the connection.
    #[error("connect to {addr}: {source}")]
    Direct {
        /// The server's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The proxy did not accept the connection.
    #[error("connect to proxy {proxy}: {source}")]
    Proxy {
        /// The proxy's `host:port`.
        proxy: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection to the proxy failed while asking for the tunnel.
    #[error("proxy {proxy}: {source}")]
    ProxyIo {
        /// The proxy's `host:port`.
        proxy: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The proxy refused the tunnel.
    #[error("proxy {proxy} answered CONNECT {target} with {status:?}")]
    Refused {
        /// The proxy's `host:port`.
        proxy: String,
        /// What was asked for.
        target: String,
        /// The response's status line.
        status: String,
    },
    /// The proxy did not answer like an HTTP proxy.
    #[error("proxy {proxy}: {what}")]
    Protocol {
        /// The proxy's `host:port`.
        proxy: String,
        /// What it did.
        what: String,
    },
}

/// An HTTP proxy: where it is, and the credentials it gets.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    host: String,
    port: u16,
    /// `Basic <base64(user:password)>`.
    authorization: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("address", &self.address())
            .field("credentials", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

impl ProxyUrl {
    /// Reads `url` (named by `var`, for errors).
    pub fn parse(var: &'static str, url: &str) -> Result<Self, ProxyConfigError> {
        let shown = without_password(url);
        let bad = |reason: &str| ProxyConfigError::BadUrl {
            var,
            url: shown.clone(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => ("http".to_owned(), url),
        };
        match scheme.as_str() {
            "http" => {}
            "https" => {
                return Err(bad(
                    "a proxy reached over TLS (https://) is not supported; give its http:// URL (the tunnel to the hub is TLS either way)",
                ));
            }
            other => {
                return Err(bad(&format!(
                    "proxy scheme {other}:// is not supported; use http://"
                )));
            }
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("no proxy host"))?;
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
            None => 80,
        };
        let authorization = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            let credentials = format!("{}:{}", percent_decode(user), percent_decode(password));
            format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
            )
        });
        Ok(Self {
            host: host.to_owned(),
            port,
            authorization,
        })
    }

    /// `host:port` of the proxy.
    pub fn address(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

/// `url` with the password of its user info masked.
fn without_password(url: &str) -> String {
    let (prefix, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{prefix}{user}:***@{host}{}", &rest[end..])
        }
        None => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host` and an optional port of `host[:port]` or `[v6][:port]`.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':');
        return (!host.is_empty()).then_some((host, port));
    }
    let (host, port) = match s.rsplit_once(':') {
        // A bare IPv6 address has more than one colon and no port.
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (s, None),
    };
    (!host.is_empty()).then_some((host, port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exempt {
    /// Every destination.
    All,
    /// A network (an address is a /32 or /128).
    Net(IpNet, Option<u16>),
    /// `name` itself (when `exact`) and its subdomains.
    Domain {
        /// The name, lower-case, without a leading dot.
        name: String,
        /// Whether the name itself matches too.
        exact: bool,
        port: Option<u16>,
    },
}

/// Where the agent's connections to servers go: direct or through a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    proxy: Option<ProxyUrl>,
    exempt: Vec<Exempt>,
}

impl ProxySettings {
    /// No proxy: every connection is direct.
    pub fn none() -> Self {
        Self::default()
    }

    /// `proxy` for every server, except those `no_proxy` (the `NO_PROXY`
    /// syntax) exempts.
    pub fn new(proxy: ProxyUrl, no_proxy: &str) -> Result<Self, ProxyConfigError> {
        Ok(Self {
            proxy: Some(proxy),
            exempt: parse_no_proxy("NO_PROXY", no_proxy)?,
        })
    }

    /// From the process environment (see the module doc).
    pub fn from_env() -> Result<Self, ProxyConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From variables `get` returns, as [`Self::from_env`] reads them.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ProxyConfigError> {
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|n| {
                get(n)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .map(|v| (n, v))
            })
        };
        let Some((var, url)) = first(["HTTPS_PROXY", "https_proxy"]) else {
            return Ok(Self::none());
        };
        let proxy = ProxyUrl::parse(var, &url)?;
        let mut exempt = match first(["NO_PROXY", "no_proxy"]) {
            Some((var, list)) => parse_no_proxy(var, &list)?,
            None => Vec::new(),
        };
        // As Go programs do: the loopback is never proxied.
        exempt.extend([
            Exempt::Domain {
                name: "localhost".into(),
                exact: true,
                port: None,
            },
            Exempt::Net("127.0.0.0/8".parse().expect("a CIDR"), None),
            Exempt::Net("::1/128".parse().expect("a CIDR"), None),
        ]);
        Ok(Self {
            proxy: Some(proxy),
            exempt,
        })
    }

    /// The proxy a connection to `host:port` (which resolved to `addr`)
    /// goes through, if any.
    pub fn proxy_for(&self, host: &str, port: u16, addr: SocketAddr) -> Option<&ProxyUrl> {
        let proxy = self.proxy.as_ref()?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host_ip = host.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        let exempt = self.exempt.iter().any(|e| match e {
            Exempt::All => true,
            Exempt::Net(net, p) => {
                port_ok(p)
                    && (host_ip.is_some_and(|ip| net.contains(&ip)) || net.contains(&addr.ip()))
            }
            Exempt::Domain { name, exact, port } => {
                port_ok(port)
                    && ((*exact && host == *name)
                        || host
                            .strip_suffix(name.as_str())
                            .is_some_and(|rest| rest.ends_with('.')))
            }
        });
        (!exempt).then_some(proxy)
    }

    /// Whether a proxy is configured at all.
    pub fn is_set(&self) -> bool {
        self.proxy.is_some()
    }
}

fn parse_no_proxy(var: &'static str, list: &str) -> Result<Vec<Exempt>, ProxyConfigError> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || ProxyConfigError::BadNoProxy {
            var,
            entry: entry.to_owned(),
        };
        if entry == "*" {
            out.push(Exempt::All);
            continue;
        }
        if entry.contains('/') {
            out.push(Exempt::Net(entry.parse().map_err(|_| bad())?, None));
            continue;
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            out.push(Exempt::Net(IpNet::from(ip), None));
            continue;
        }
        let (host, port) = split_host_port(entry).ok_or_else(bad)?;
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| bad()))
            .transpose()?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.push(Exempt::Net(IpNet::from(ip), port));
            continue;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let (name, exact) = match host.strip_prefix("*.").or_else(|| host.strip_prefix('.')) {
            Some(rest) => (rest.to_owned(), false),
            None => (host.clone(), true),
        };
        if name.is_empty() || name.contains(['*', ' ']) {
            return Err(bad());
        }
        out.push(Exempt::Domain { name, exact, port });
    }
    Ok(out)
}

/// A TCP connection to the server `host:port` (resolved to `addr`): direct,
/// or a `CONNECT` tunnel through the proxy `settings` name for it.
pub async fn connect(
    settings: &ProxySettings,
    host: &str,
    port: u16,
    addr: SocketAddr,
) -> Result<TcpStream, DialError> {
    let Some(proxy) = settings.proxy_for(host, port, addr) else {
        return TcpStream::connect(addr)
            .await
            .map_err(|source| DialError::Direct { addr, source });
    };
    let address = proxy.address();
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| DialError::Proxy {
            proxy: address.clone(),
            source,
        })?;
    let target = join_host_port(host, port);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let io = |e: std::io::Error| DialError::ProxyIo {
        proxy: address.clone(),
        source: e,
    };
    tcp.write_all(request.as_bytes()).await.map_err(io)?;
    // The head, a byte at a time: what follows it is the server's, for TLS.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(DialError::Protocol {
                proxy: address,
                what: format!("a response head longer than {MAX_RESPONSE_HEAD} bytes"),
            });
        }
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await.map_err(io)? == 0 {
            return Err(DialError::Protocol {
                proxy: address,
                what: format!("closed the connection before answering CONNECT {target}"),
            });
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default().trim().to_owned();
    let mut parts = status.split_whitespace();
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    if !version.starts_with("HTTP/1.") {
        return Err(DialError::Protocol {
            proxy: address,
            what: format!("answered CONNECT {target} with {status:?}, not HTTP/1.x"),
        });
    }
    if code != Some("200") {
        return Err(DialError::Refused {
            proxy: address,
            target,
            status,
        });
    }
    tracing::debug!(proxy = %address, %target, "tunnel through the proxy");
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use tokio::net::TcpListener;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_https_proxy_variable_is_read_as_go_reads_it() {
        // Upper case first, lower case otherwise; empty is unset.
        let s = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", "http://lower:3128"),
        ]))
        .unwrap();
        let p = s.proxy_for("hub.example.com", 443, addr("203.0.113.1:443"));
        assert_eq!(p.unwrap().address(), "upper:3128");
        let s = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", ""),
            ("https_proxy", "lower.example.com"),
        ]))
        .unwrap();
        let p = s.proxy_for("hub.example.com", 443, addr("203.0.113.1:443"));
        // No scheme: http, port 80.
        assert_eq!(p.unwrap().address(), "lower.example.com:80");
        // HTTP_PROXY is for plain http:// requests, not the hub's TLS.
        let s = ProxySettings::from_vars(vars(&[("HTTP_PROXY", "http://p:3128")])).unwrap();
        assert!(!s.is_set());
        // An IPv6 proxy.
        let s = ProxySettings::from_vars(vars(&[("HTTPS_PROXY", "http://[2001:db8::1]:3128/")]))
            .unwrap();
        let p = s.proxy_for("hub", 443, addr("203.0.113.1:443"));
        assert_eq!(p.unwrap().address(), "[2001:db8::1]:3128");
    }

    #[test]
    fn a_proxy_the_agent_cannot_use_is_refused_at_start_with_the_variable() {
        for (url, says) in [
            ("https://proxy.example.com:3128", "https://"),
            ("socks5://proxy.example.com:1080", "socks5"),
            ("http://proxy.example.com:port", "port"),
            ("http://", "no proxy host"),
        ] {
            let err = ProxySettings::from_vars(vars(&[("https_proxy", url)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("https_proxy="), "{err}");
            assert!(err.contains(says), "{url}: {err}");
        }
        // The password never shows in an error.
        let err = ProxySettings::from_vars(vars(&[("HTTPS_PROXY", "https://me:s3cret@p:3128")]))
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("s3cret") && err.contains("me:***@p:3128"),
            "{err}"
        );
        let err = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", "http://p:3128"),
            ("NO_PROXY", "10.0.0.0/33"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("NO_PROXY") && err.contains("10.0.0.0/33"),
            "{err}"
        );
    }

    #[test]
    fn credentials_are_sent_as_basic_auth_and_never_printed() {
        let p = ProxyUrl::parse("HTTPS_PROXY", "http://tunnel%40east:p%3Ass@proxy:3128").unwrap();
        assert_eq!(
            p.authorization.as_deref(),
            Some(format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    "tunnel@east:p:ss"
                )
            ))
            .as_deref()
        );
        let shown = format!("{p:?}");
        assert!(!shown.contains("Basic") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn no_proxy_exempts_hosts_subdomains_addresses_and_ports() {
        let s = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            (
                "no_proxy",
                "example.com, .internal, *.corp.example.net, 10.0.0.0/8, 192.0.2.7, edge.example.org:8443, [2001:db8::5]:443",
            ),
        ]))
        .unwrap();
        let public = addr("203.0.113.1:443");
        let direct = |host: &str, port: u16, resolved: SocketAddr| {
            s.proxy_for(host, port, resolved).is_none()
        };
        // A name: itself and its subdomains, any case, a trailing dot ignored.
        assert!(direct("example.com", 443, public));
        assert!(direct("Hub.Example.COM.", 443, public));
        assert!(!direct("notexample.com", 443, public));
        // A leading dot or "*.": subdomains only.
        assert!(direct("hub.internal", 443, public));
        assert!(!direct("internal", 443, public));
        assert!(direct("a.corp.example.net", 443, public));
        assert!(!direct("corp.example.net", 443, public));
        // A CIDR or an address: the host when it is one, or what the name resolved to.
        assert!(direct("10.1.2.3", 443, addr("10.1.2.3:443")));
        assert!(direct("hub.example.org", 443, addr("10.9.9.9:443")));
        assert!(direct("192.0.2.7", 8091, addr("192.0.2.7:8091")));
        assert!(!direct("192.0.2.8", 8091, addr("192.0.2.8:8091")));
        // With a port: only that port.
        assert!(direct("edge.example.org", 8443, public));
        assert!(!direct("edge.example.org", 443, public));
        assert!(direct("2001:db8::5", 443, addr("[2001:db8::5]:443")));
        assert!(!direct("2001:db8::5", 80, addr("[2001:db8::5]:80")));
        // Everything else goes through the proxy; the loopback never does.
        assert!(!direct("hub.example.org", 443, public));
        assert!(direct("localhost", 8091, addr("127.0.0.1:8091")));
        assert!(direct("127.0.0.1", 8091, addr("127.0.0.1:8091")));
        assert!(direct("::1", 8091, addr("[::1]:8091")));
        // "*": nothing is proxied.
        let all = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "*"),
        ]))
        .unwrap();
        assert!(all.proxy_for("hub.example.org", 443, public).is_none());
        // NO_PROXY wins over no_proxy.
        let upper = ProxySettings::from_vars(vars(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "a.example"),
            ("no_proxy", "b.example"),
        ]))
        .unwrap();
        assert!(upper.proxy_for("a.example", 443, public).is_none());
        assert!(upper.proxy_for("b.example", 443, public).is_some());
    }

    /// A CONNECT proxy on loopback that records each request head and
    /// answers with `status`; on 200 it relays to the requested target.
    struct TestProxy {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn test_proxy(status: &'static str) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).await.unwrap() == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    let target = head.split_whitespace().nth(1).unwrap().to_owned();
                    recorded.lock().unwrap().push(head);
                    client
                        .write_all(format!("{status}\r\nVia: test\r\n\r\n").as_bytes())
                        .await
                        .unwrap();
                    if !status.contains(" 200 ") {
                        return;
                    }
                    let mut upstream = TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        TestProxy { addr, heads, task }
    }

    fn through(proxy: &TestProxy, userinfo: &str) -> ProxySettings {
        let url = format!("http://{userinfo}{}", proxy.addr);
        ProxySettings::new(ProxyUrl::parse("HTTPS_PROXY", &url).unwrap(), "").unwrap()
    }

    #[tokio::test]
    async fn a_connection_through_the_proxy_is_a_connect_tunnel_to_the_named_server() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let proxy = test_proxy("HTTP/1.1 200 Connection established").await;
        let settings = through(&proxy, "east:pw@");
        let dial = connect(&settings, "127.0.0.1", server_addr.port(), server_addr);
        let (tcp, accepted) = tokio::join!(dial, server.accept());
        let mut tcp = tcp.unwrap();
        let (mut at_server, _) = accepted.unwrap();
        // The bytes after the proxy's answer are the server's, both ways.
        tcp.write_all(b"client hello").await.unwrap();
        let mut buf = [0u8; 12];
        at_server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"client hello");
        at_server.write_all(b"server hello").await.unwrap();
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"server hello");
        let heads = proxy.heads.lock().unwrap().clone();
        let target = format!("127.0.0.1:{}", server_addr.port());
        assert_eq!(
            heads,
            [format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {}\r\n\r\n",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "east:pw")
            )]
        );
    }

    #[tokio::test]
    async fn a_proxy_that_refuses_the_tunnel_is_named_with_its_answer() {
        let proxy = test_proxy("HTTP/1.1 407 Proxy Authentication Required").await;
        let settings = through(&proxy, "");
        let err = connect(&settings, "hub.example.com", 443, addr("203.0.113.1:443"))
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Refused { .. }), "{err:?}");
        let message = err.to_string();
        assert_eq!(
            message,
            format!(
                "proxy {} answered CONNECT hub.example.com:443 with \"HTTP/1.1 407 Proxy Authentication Required\"",
                proxy.addr
            )
        );
        // No credentials were configured, none were sent.
        assert!(!proxy.heads.lock().unwrap()[0].contains("Proxy-Authorization"));
    }

    #[tokio::test]
    async fn a_proxy_that_closes_or_is_not_there_is_an_error_naming_it() {
        // Closes without an answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let closer = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).await.unwrap() == 1 {
                head.push(byte[0]);
            }
        });
        let settings = ProxySettings::new(
            ProxyUrl::parse("HTTPS_PROXY", &format!("http://{proxy_addr}")).unwrap(),
            "",
        )
        .unwrap();
        let err = connect(&settings, "hub.example.com", 443, addr("203.0.113.1:443"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&proxy_addr.to_string()) && err.contains("closed"),
            "{err}"
        );
        closer.await.unwrap();
        // Nothing listens there.
        let err = connect(&settings, "hub.example.com", 443, addr("203.0.113.1:443"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("connect to proxy {proxy_addr}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_no_proxy_exempts_is_dialled_directly() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let proxy = test_proxy("HTTP/1.1 200 OK").await;
        let settings = ProxySettings::new(
            ProxyUrl::parse("HTTPS_PROXY", &format!("http://{}", proxy.addr)).unwrap(),
            "hub.internal",
        )
        .unwrap();
        let dial = connect(&settings, "hub.internal", server_addr.port(), server_addr);
        let (tcp, accepted) = tokio::join!(dial, server.accept());
        tcp.unwrap();
        accepted.unwrap();
        assert!(
            proxy.heads.lock().unwrap().is_empty(),
            "the proxy was asked"
        );
    }
}
