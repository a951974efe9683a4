//! An HTTP proxy's part in one request, shared by the sidecar's HTTP proxy
//! and the server's HTTP CONNECT entry: which methods are forwarded, what an
//! absolute-form `http://` request becomes on its way to the destination
//! (origin-form, hop-by-hop headers dropped), sending it over a connection
//! of its own, and the text answer of a request that failed: its status, the
//! typed code in [`ERROR_HEADER`] and a body `<code>: <message>`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Header carrying the typed error code of a failed proxy request.
pub const ERROR_HEADER: &str = "x-tunnel-error";

/// Methods forwarded for `http://` requests. Others (TRACE, extension
/// methods) get 405: TRACE would echo credentials back across origins.
pub const PROXIED_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The `Allow` header of a 405 answer: CONNECT and [`PROXIED_METHODS`].
const ALLOWED_METHODS: &str = "CONNECT, GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Headers that belong to one hop and are not forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The answer of a proxy request that failed: `status`, `code` in
/// [`ERROR_HEADER`], and the text body `<code>: <message>`.
pub fn error_text(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(format!("{code}: {message}\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert(ERROR_HEADER, v);
    }
    resp
}

/// The answer to a request (not a CONNECT) a proxy does not forward: one
/// that is not absolute-form `http://` (400 `bad_request`), or whose method
/// is not among [`PROXIED_METHODS`] (405 `method_not_allowed`, with `Allow`).
pub fn unforwardable<B>(req: &Request<B>) -> Option<Response<Bytes>> {
    let bad = |message: &str| error_text(StatusCode::BAD_REQUEST, "bad_request", message);
    match req.uri().scheme_str() {
        None => {
            return Some(bad(
                "this is an HTTP proxy: send absolute-form requests (GET http://host/path) or CONNECT",
            ));
        }
        Some("http") => {}
        Some(_) => {
            return Some(bad(
                "only http:// is forwarded as requests; use CONNECT for https and other protocols",
            ));
        }
    }
    if PROXIED_METHODS.contains(req.method()) {
        return None;
    }
    let mut resp = error_text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{} is not proxied", req.method()),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    Some(resp)
}

/// Drops the hop-by-hop headers, and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for h in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(h.as_str());
    }
}

/// The `Host` header of an absolute-form request, from its URI: host and
/// port as the client wrote them, never the userinfo.
pub fn origin_host_header(uri: &http::Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    let host = authority.host();
    let value = match authority.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

/// The `Host` header naming `host` (a name or an IP address) and `port`
/// (left out when it is 80).
pub fn host_header(host: &str, port: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// Rewrites an absolute-form request for the destination: origin-form
/// (path and query), hop-by-hop headers dropped.
pub fn to_origin_form<B>(req: &mut Request<B>) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    strip_hop_by_hop(req.headers_mut());
}

/// Why a forwarded request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// HTTP/1 could not start on the connection.
    #[error("HTTP/1 handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// The destination did not answer the request.
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

/// Sends `req` over a fresh HTTP/1 connection on `io` and returns the
/// answer, its hop-by-hop headers dropped.
pub async fn send_request<I>(
    io: I,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, ForwardError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(ForwardError::Handshake)?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%err, "upstream HTTP/1 connection ended with an error");
        }
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(ForwardError::Request)?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic ZWFzdDo="),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn a_request_s_host_comes_from_its_uri_without_userinfo() {
        for (uri, host) in [
            ("http://backend:8080/x", "backend:8080"),
            ("http://user:secret@backend:8080/x", "backend:8080"),
            ("http://user@backend.team/", "backend.team"),
            ("http://[fd00::1]:81/", "[fd00::1]:81"),
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            assert_eq!(origin_host_header(&uri).unwrap(), host, "{uri}");
        }
        assert_eq!(host_header("hello.default.svc", 80), "hello.default.svc");
        assert_eq!(host_header("fd00::1", 8080), "[fd00::1]:8080");
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let mut req = Request::builder()
            .uri("http://hello.default.svc.east.tunnel.internal:8080/a/b?c=d")
            .header(header::PROXY_AUTHORIZATION, "Bearer x")
            .body(())
            .unwrap();
        to_origin_form(&mut req);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert!(!req.headers().contains_key(header::PROXY_AUTHORIZATION));
    }

    #[test]
    fn requests_a_proxy_does_not_forward_are_answered() {
        let req = |method: Method, uri: &str| {
            Request::builder().method(method).uri(uri).body(()).unwrap()
        };
        assert!(unforwardable(&req(Method::GET, "http://a.b/c")).is_none());
        for (r, status, words) in [
            (req(Method::GET, "/c"), 400, "absolute-form"),
            (req(Method::GET, "https://a.b/c"), 400, "CONNECT"),
            (
                req(Method::TRACE, "http://a.b/c"),
                405,
                "TRACE is not proxied",
            ),
        ] {
            let resp = unforwardable(&r).expect("refused");
            assert_eq!(resp.status(), status);
            assert!(
                String::from_utf8_lossy(resp.body()).contains(words),
                "{r:?}"
            );
        }
        let resp = unforwardable(&req(Method::TRACE, "http://a.b/")).unwrap();
        assert_eq!(resp.headers()[header::ALLOW], ALLOWED_METHODS);
    }

    #[test]
    fn an_error_answer_carries_its_code_twice() {
        let resp = error_text(StatusCode::NOT_FOUND, "unknown_cluster", "no such cluster");
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[ERROR_HEADER], "unknown_cluster");
        assert_eq!(resp.body().as_ref(), b"unknown_cluster: no such cluster\n");
    }
}
