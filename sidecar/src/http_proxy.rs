//! The HTTP proxy on loopback: `CONNECT host[:port]` (a byte tunnel, so TLS
//! from the app passes through untouched) and absolute-form `http://` requests
//! (forwarded as origin-form over a fresh connection each), with keep-alive
//! towards the app.
//!
//! Each request is routed on its own ([`crate::names`]): a destination in a
//! cluster goes through the tunnel; anything else is dialed directly from
//! the pod ([`crate::direct`]), with the same limits, error answers, metrics
//! (`kind="direct"`) and logs, so that hub traffic works as before the
//! sidecar was injected.
//!
//! Errors carry the tunnel's typed code in an `X-Tunnel-Error` header and as
//! the first word of a text body, with a status an HTTP client can act on
//! (see [`error_response`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tunnel_api::sidecar::DirectPolicy;
use tunnel_proto::client::{Target, TunnelClient};
use tunnel_proto::error::{ErrorCode, TunnelError};
pub use tunnel_proto::http_forward::ERROR_HEADER;
use tunnel_proto::http_forward::{
    ForwardError, error_text, host_header, origin_host_header, send_request, to_origin_form,
    unforwardable,
};

use crate::clusters::ClusterCache;
use crate::direct::DirectDialer;
use crate::metrics::{RequestLabel, SidecarMetrics};
use crate::names::{Naming, Route, is_single_label};

type Body = BoxBody<Bytes, hyper::Error>;

/// Limits on what proxy clients may send.
#[derive(Debug, Clone, Copy)]
pub struct ProxyLimits {
    /// Time to send a request head.
    pub header_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most headers in a request.
    pub max_headers: usize,
}

/// What the proxy's handlers share.
#[derive(Debug)]
pub struct ProxyState {
    /// Opens tunnels.
    pub client: Arc<TunnelClient>,
    /// How names map to clusters.
    pub naming: Naming,
    /// Clusters the server knows.
    pub clusters: Arc<ClusterCache>,
    /// Dials destinations outside the clusters.
    pub direct: DirectDialer,
    /// Longest a request for a single label waits for the server's first
    /// cluster list (the open timeout).
    pub list_timeout: Duration,
    /// Metrics.
    pub metrics: SidecarMetrics,
}

fn text(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    error_text(status, code, message).map(|b| Full::new(b).map_err(|never| match never {}).boxed())
}

/// The response for a tunnel error: 400 bad request, 403 forbidden or not
/// allowed, 404 unknown cluster, 502 refused / unreachable / DNS failure /
/// tunnel broken, 503 no agent or server draining, 504 dial timeout.
pub fn error_response(err: &TunnelError) -> Response<Body> {
    let status = match err.code {
        // Our own identity was refused: nothing the app can fix by authenticating.
        ErrorCode::Unauthenticated => StatusCode::FORBIDDEN,
        code => {
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    text(status, err.code.label(), &err.message)
}

fn bad_request(message: &str) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadRequest.label(),
        message,
    )
}

/// The cluster named by `Proxy-Authorization: Basic base64(cluster:)`.
fn proxy_user(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get(header::PROXY_AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "Proxy-Authorization is not ASCII".to_owned())?;
    let Some(b64) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Err(
            "Proxy-Authorization must use the Basic scheme (the user names the cluster)".into(),
        );
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "Proxy-Authorization is not valid base64".to_owned())?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| "Proxy-Authorization is not UTF-8".to_owned())?;
    let user = decoded.split(':').next().unwrap_or_default();
    Ok((!user.is_empty()).then(|| user.to_owned()))
}

/// What a proxy request names: the host (without brackets), the port, and
/// the cluster of its proxy user.
struct Asked {
    host: String,
    port: u16,
    user: Option<String>,
}

impl ProxyState {
    /// What `req` asks for; why it is a bad request otherwise.
    fn asked(req: &Request<Incoming>, default_port: u16) -> Result<Asked, String> {
        let authority = req
            .uri()
            .authority()
            .ok_or("the request names no destination host")?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(default_port);
        if port == 0 {
            return Err("port 0 is not a destination".into());
        }
        let user = proxy_user(req.headers())?;
        Ok(Asked {
            host: host.to_owned(),
            port,
            user,
        })
    }

    /// Where `asked` goes with the clusters known now.
    fn route(&self, asked: &Asked) -> Result<Route, String> {
        let clusters = self.clusters.clone();
        self.naming
            .route(&asked.host, asked.port, asked.user.as_deref(), |c| {
                clusters.contains(c)
            })
            .map_err(|e| e.to_string())
    }

    /// Where `req` goes. A single label that is no known cluster is decided
    /// only once the server's cluster list was fetched: before that (the
    /// pod's first moments, or a start during a hub outage) it waits for
    /// the list, up to the open timeout, and fails with `tunnel_broken`
    /// without it, rather than be dialed directly (a hub Service named like
    /// a cluster would take that cluster's kube-API traffic) or sent to a
    /// default cluster as a host.
    async fn route_of(
        &self,
        req: &Request<Incoming>,
        default_port: u16,
    ) -> Result<Route, (Response<Body>, &'static str)> {
        let bad = |m: String| (bad_request(&m), "bad_request");
        let asked = Self::asked(req, default_port).map_err(bad)?;
        let route = self.route(&asked).map_err(bad)?;
        let lower = asked.host.trim_end_matches('.').to_ascii_lowercase();
        if !is_single_label(&lower) || self.clusters.contains(&lower) || self.clusters.was_fetched()
        {
            return Ok(route);
        }
        if self
            .clusters
            .wait_first_list(&self.client, self.list_timeout)
            .await
        {
            return self.route(&asked).map_err(bad);
        }
        let err = TunnelError::new(
            ErrorCode::TunnelBroken,
            format!(
                "no tunnel server reachable to tell whether {lower:?} is a cluster (the cluster list \
                 was never fetched), so it is neither tunnelled nor dialed directly; retry once the \
                 server is reachable, or name a hub Service as {lower}.<namespace>"
            ),
        );
        tracing::info!(host = %lower, "single label before any cluster list: refused");
        Err((error_response(&err), ErrorCode::TunnelBroken.label()))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        if req.method() == Method::CONNECT {
            return Ok(self.connect(req).await);
        }
        if let Some(resp) = unforwardable(&req) {
            if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
                self.count("http", "method_not_allowed");
            }
            return Ok(resp.map(|b| Full::new(b).map_err(|never| match never {}).boxed()));
        }
        self.forward(req).await
    }

    fn count(&self, kind: &'static str, code: &'static str) {
        self.metrics
            .requests
            .get_or_create(&RequestLabel { kind, code })
            .inc();
    }

    /// Where a request goes: its cluster, or a direct connection opened
    /// now. Failures are counted under `kind` (`bad_request`) or `direct`,
    /// and logged.
    async fn upstream_of(
        &self,
        req: &Request<Incoming>,
        default_port: u16,
        kind: &'static str,
    ) -> Result<Upstream, Response<Body>> {
        let (host, port) = match self.route_of(req, default_port).await {
            Ok(Route::Tunnel(target)) => return Ok(Upstream::Tunnel(target)),
            Ok(Route::Direct { host, port }) => (host, port),
            Err((resp, code)) => {
                self.count(kind, code);
                return Err(resp);
            }
        };
        let mut err = match self.direct.dial(&host, port).await {
            Ok(tcp) => return Ok(Upstream::Direct { tcp, host, port }),
            Err(err) => err,
        };
        // A single label no resolver knows (or any, under --direct deny)
        // may be a cluster that joined since the last refresh of the list.
        // Asking only then spares the server a question per hub request.
        let maybe_cluster = matches!(
            err.code,
            ErrorCode::DnsFailure | ErrorCode::DestinationNotAllowed
        );
        if maybe_cluster && is_single_label(&host.to_ascii_lowercase()) {
            self.clusters.refresh_soon(&self.client).await;
            let clusters = self.clusters.clone();
            if let Ok(Route::Tunnel(target)) = self
                .naming
                .route(&host, port, None, |c| clusters.contains(c))
            {
                return Ok(Upstream::Tunnel(target));
            }
        }
        self.count("direct", err.code.label());
        tracing::info!(%host, port, code = err.code.label(), %err, "direct connection failed");
        if err.code == ErrorCode::DestinationNotAllowed && self.direct.policy == DirectPolicy::Deny
        {
            err.message = format!("{}; {}", err.message, self.naming.how_to_name_a_cluster());
        }
        Err(error_response(&err))
    }

    async fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let target = match self.upstream_of(&req, 443, "connect").await {
            Ok(Upstream::Tunnel(t)) => t,
            Ok(Upstream::Direct { tcp, host, port }) => {
                return self.connect_direct(req, tcp, host, port);
            }
            Err(resp) => return resp,
        };
        let tunnel = match self.client.open(&target).await {
            Ok(t) => t,
            Err(err) => {
                self.count("connect", err.code.label());
                tracing::info!(%target, code = err.code.label(), %err, "CONNECT failed");
                return error_response(&err);
            }
        };
        self.count("connect", "ok");
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let Some((tcp, prefix)) = upgraded_tcp(req, &target.to_string()).await else {
                return;
            };
            metrics.open_connections.inc();
            let outcome = tunnel.relay_with_prefix(tcp, prefix).await;
            metrics.open_connections.dec();
            tracing::debug!(%target, ?outcome, "CONNECT tunnel closed");
        });
        empty_ok()
    }

    fn connect_direct(
        &self,
        req: Request<Incoming>,
        mut upstream: TcpStream,
        host: String,
        port: u16,
    ) -> Response<Body> {
        self.count("direct", "ok");
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let dest = format!("{host}:{port}");
            let Some((mut tcp, prefix)) = upgraded_tcp(req, &dest).await else {
                return;
            };
            metrics.open_direct_connections.inc();
            let outcome = async {
                if !prefix.is_empty() {
                    upstream.write_all(&prefix).await?;
                }
                tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await
            }
            .await;
            metrics.open_direct_connections.dec();
            tracing::debug!(%dest, ?outcome, "direct CONNECT closed");
        });
        empty_ok()
    }

    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        let upstream = match self.upstream_of(&req, 80, "http").await {
            Ok(u) => u,
            Err(resp) => return Ok(resp),
        };
        // The absolute URI names the destination; any Host the client sent
        // is replaced by it (RFC 9112 3.2.2), never with its userinfo.
        let uri_host = origin_host_header(req.uri());
        to_origin_form(&mut req);
        match upstream {
            Upstream::Tunnel(target) => {
                let io = match self.client.open_io(&target).await {
                    Ok(io) => io,
                    Err(err) => {
                        self.count("http", err.code.label());
                        tracing::info!(%target, code = err.code.label(), %err, "proxy request failed");
                        return Ok(error_response(&err));
                    }
                };
                // Host names the real in-cluster host.
                if let Ok(v) = HeaderValue::from_str(&host_header(&target.host, target.port)) {
                    req.headers_mut().insert(header::HOST, v);
                }
                Ok(self.send(io, req, "http", &target.to_string()).await)
            }
            Upstream::Direct { tcp, host, port } => {
                // The destination is the one the client named: its Host is
                // the URI's authority as written, without userinfo.
                req.headers_mut().remove(header::HOST);
                if let Some(v) = uri_host {
                    req.headers_mut().insert(header::HOST, v);
                }
                Ok(self
                    .send(tcp, req, "direct", &format!("{host}:{port}"))
                    .await)
            }
        }
    }

    /// Sends `req` over a fresh HTTP/1 connection on `io` and returns the
    /// answer, counting it under `kind`.
    async fn send<I>(
        &self,
        io: I,
        req: Request<Incoming>,
        kind: &'static str,
        dest: &str,
    ) -> Response<Body>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match send_request(io, req).await {
            Ok(resp) => {
                self.count(kind, "ok");
                resp.map(|b| b.boxed())
            }
            Err(ForwardError::Handshake(err)) => {
                let err = TunnelError::new(
                    handshake_failure_code(kind),
                    format!("HTTP/1 to {dest}: {err}"),
                );
                self.count(kind, err.code.label());
                error_response(&err)
            }
            Err(ForwardError::Request(err)) => {
                self.count(kind, "upstream_error");
                tracing::info!(dest, kind, %err, "the destination did not answer the request");
                let err =
                    TunnelError::new(ErrorCode::DestinationUnreachable, format!("{dest}: {err}"));
                error_response(&err)
            }
        }
    }
}

/// Where one request goes, once decided.
enum Upstream {
    /// Through the tunnel.
    Tunnel(Target),
    /// A direct connection, already open.
    Direct {
        /// The connection.
        tcp: TcpStream,
        /// The host the client named.
        host: String,
        /// The port.
        port: u16,
    },
}

/// The code of a failed HTTP/1 handshake on a fresh upstream connection:
/// the tunnel's for a tunnelled one, the destination's for a direct one
/// (no tunnel is involved).
fn handshake_failure_code(kind: &str) -> ErrorCode {
    if kind == "direct" {
        ErrorCode::DestinationUnreachable
    } else {
        ErrorCode::TunnelBroken
    }
}

/// A 200 with no body: the answer to a CONNECT that reached its destination.
fn empty_ok() -> Response<Body> {
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// The client's TCP connection once hyper has answered its CONNECT, and the
/// bytes it already read past the request.
async fn upgraded_tcp(req: Request<Incoming>, dest: &str) -> Option<(TcpStream, Bytes)> {
    let upgraded = match hyper::upgrade::on(req).await {
        Ok(u) => u,
        Err(err) => {
            tracing::debug!(dest, %err, "CONNECT client left before the tunnel started");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some((parts.io.into_inner(), parts.read_buf)),
        Err(_) => {
            tracing::error!("CONNECT upgrade is not a TCP stream");
            None
        }
    }
}

/// Serves the proxy on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    limits: ProxyLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
            () = &mut shutdown => return,
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!(%err, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tunnel_proto::net::set_nodelay_or_warn(&tcp);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| state.clone().handle(req));
            let conn = builder
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(err) = conn.await {
                // Malformed requests, oversized heads and slow clients end here.
                tracing::info!(%peer, %err, "proxy client connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_user_names_the_cluster() {
        let mut h = HeaderMap::new();
        assert_eq!(proxy_user(&h).unwrap(), None);
        // curl -x http://east@127.0.0.1:17080 sends base64("east:").
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic ZWFzdDo="),
        );
        assert_eq!(proxy_user(&h).unwrap().as_deref(), Some("east"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer x"),
        );
        assert!(proxy_user(&h).unwrap_err().contains("Basic"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic !!!"),
        );
        assert!(proxy_user(&h).is_err());
    }

    #[test]
    fn a_direct_handshake_failure_is_no_broken_tunnel() {
        assert_eq!(
            handshake_failure_code("direct"),
            ErrorCode::DestinationUnreachable
        );
        assert_eq!(handshake_failure_code("http"), ErrorCode::TunnelBroken);
    }

    #[test]
    fn errors_map_to_actionable_statuses() {
        let cases = [
            (ErrorCode::UnknownCluster, 404),
            (ErrorCode::NoAgent, 503),
            (ErrorCode::DestinationRefused, 502),
            (ErrorCode::DestinationUnreachable, 502),
            (ErrorCode::DnsFailure, 502),
            (ErrorCode::DialTimeout, 504),
            (ErrorCode::DestinationNotAllowed, 403),
            (ErrorCode::Forbidden, 403),
            (ErrorCode::Unauthenticated, 403),
            (ErrorCode::BadRequest, 400),
        ];
        for (code, status) in cases {
            let resp = error_response(&TunnelError::new(code, "why"));
            assert_eq!(resp.status().as_u16(), status, "{code:?}");
            assert_eq!(resp.headers()[ERROR_HEADER], code.label());
        }
    }
}
