//! The HTTP CONNECT entry on the client port: HTTP/1.1 over the same mTLS
//! port (ALPN `http/1.1` beside `h2`), for programs and tools that can use a
//! TLS proxy but cannot run a sidecar (`curl --proxy https://…`), as
//! apiserver-network-proxy's `--mode=http-connect` serves them.
//!
//! - `CONNECT <address> HTTP/1.1`: the connection goes the one way every
//!   connection goes ([`crate::connection`]), its address read by
//!   [`crate::addresses`] (`<cluster>:443`, `<host>.<cluster>.<suffix>:<port>`);
//!   `200 Connection established`, then the connection's bytes both ways, a
//!   FIN carried each way (TLS `close_notify` and a TCP FIN towards the
//!   client), an abort as a TLS connection closed without `close_notify`.
//! - `GET http://<address>/…` (absolute-form; the methods of
//!   [`tunnel_proto::http_forward::PROXIED_METHODS`]): the request is
//!   forwarded over a connection of its own, as `curl --proxy https://…
//!   http://…` sends it without `-p`.
//! - Refusals: the status of the error's code (400 `bad_request`, 403
//!   `forbidden`, 404 `unknown_cluster`, 407 `unauthenticated`, 502, 503,
//!   504), the code in `X-Tunnel-Error` and the body `<code>: <message>`.
//! - The caller is the client certificate's identity, or, with
//!   `--token-review`, the service account of `Proxy-Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::h2::PeerInfo;
use tunnel_proto::http_forward::{
    ForwardError, error_text, host_header, send_request, to_origin_form, unforwardable,
};
use tunnel_proto::net::peer::PeerWatch;
use tunnel_proto::relay::{LegAborted, MIN_READ, SpliceSink, SpliceSource};
use tunnel_proto::stream::Open;

use crate::ServerState;
use crate::connection::{Caller, Established, check_caller, establish, refuse_early};
use crate::metrics::RejectLabel;

/// The ALPN protocol of this entry.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Largest request head read.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 100;
/// Room between a forwarded request's HTTP/1 client and its connection.
const FORWARD_BUFFER: usize = 64 * 1024;

type Body = BoxBody<Bytes, hyper::Error>;

/// The client port's TLS configuration: the server's (it follows its
/// files), offering `http/1.1` after `h2`, so that our own clients, which
/// offer only `h2`, are unaffected.
#[derive(Debug, Default)]
pub(crate) struct ClientPortTls {
    /// The server's configuration and the one derived from it.
    derived: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
}

impl ClientPortTls {
    /// The configuration for a handshake, given the server's `current` one.
    pub(crate) fn config(&self, current: Arc<ServerConfig>) -> Arc<ServerConfig> {
        let mut derived = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((base, config)) = derived.as_ref()
            && Arc::ptr_eq(base, &current)
        {
            return config.clone();
        }
        let mut config = (*current).clone();
        config.alpn_protocols.push(ALPN_HTTP11.to_vec());
        let config = Arc::new(config);
        *derived = Some((current, config.clone()));
        config
    }
}

/// The first bytes of an HTTP/2 connection (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientProtocol {
    /// HTTP/2: our own protocol, konnectivity, the control service.
    Http2,
    /// HTTP/1.1: this entry.
    Http11,
}

/// What `io` speaks: its ALPN protocol, or, when the client offered none
/// (curl offers none to an HTTPS proxy), its first bytes, which are then
/// read again from the returned stream. `None`: the client closed first.
pub(crate) async fn client_protocol<IO>(
    alpn: Option<&[u8]>,
    mut io: IO,
) -> std::io::Result<Option<(ClientProtocol, Rewind<IO>)>>
where
    IO: AsyncRead + Unpin,
{
    match alpn {
        Some(ALPN_HTTP11) => return Ok(Some((ClientProtocol::Http11, Rewind::new(io)))),
        Some(_) => return Ok(Some((ClientProtocol::Http2, Rewind::new(io)))),
        None => {}
    }
    let mut seen = BytesMut::with_capacity(H2_PREFACE.len());
    while seen.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&seen) {
        let mut byte = [0u8; 1];
        if io.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        seen.extend_from_slice(&byte);
    }
    let protocol = if seen[..] == *H2_PREFACE {
        ClientProtocol::Http2
    } else {
        ClientProtocol::Http11
    };
    Ok(Some((
        protocol,
        Rewind {
            prefix: seen.freeze(),
            io,
        },
    )))
}

/// A stream whose first bytes, already read, are read again.
#[derive(Debug)]
pub(crate) struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    fn new(io: IO) -> Self {
        Self {
            prefix: Bytes::new(),
            io,
        }
    }

    /// The connection under the replayed bytes.
    pub(crate) fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The socket of an HTTP/1.1 client connection, watched while a connection
/// it carries owes the client data ([`tunnel_proto::net::peer`]): the
/// connection does not carry `TCP_USER_TIMEOUT` (its client may stop
/// reading for long), so a client that vanished with data on its way is
/// found this way. A duplicate descriptor, as hyper owns the connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientSocket {
    fd: Arc<OwnedFd>,
    dead_peer: Duration,
}

impl ClientSocket {
    /// The socket under `tcp`, watched with `dead_peer`; `None` (and a
    /// warning: such a client is then found by TCP keepalive alone, only
    /// while idle) if the descriptor cannot be duplicated.
    pub(crate) fn of(tcp: &tokio::net::TcpStream, dead_peer: Duration) -> Option<Self> {
        match tcp.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(Self {
                fd: Arc::new(fd),
                dead_peer,
            }),
            Err(err) => {
                tracing::warn!(%err, "cannot duplicate the client's socket; a client that vanishes with data on its way is not found");
                None
            }
        }
    }

    fn watch(&self) -> PeerWatch {
        PeerWatch::new(self.fd.clone(), self.dead_peer)
    }
}

/// Serves HTTP/1.1 on a client connection until the client closes it, or,
/// once `stop` is cancelled, until its request in flight is answered.
/// `client` is the connection's socket, for the connections it carries.
pub(crate) async fn serve_connection<IO>(
    state: Arc<ServerState>,
    peer: Arc<PeerInfo>,
    io: IO,
    client: Option<ClientSocket>,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(crate::HANDSHAKE_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .max_headers(MAX_HEADERS);
    let service = {
        let (state, peer) = (state.clone(), peer.clone());
        hyper::service::service_fn(move |req| {
            handle(state.clone(), peer.clone(), client.clone(), req)
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let result =
        tunnel_shell::process::serve_until_stopped(conn, &stop, |c| c.graceful_shutdown()).await;
    if let Err(err) = result {
        // Malformed requests, oversized heads and slow clients end here.
        tracing::info!(peer = %peer.remote_addr, client = %peer.identity, %err, "HTTP/1.1 client connection ended with an error");
        state
            .metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: "client",
                reason: "http1",
            })
            .inc();
    }
}

async fn handle(
    state: Arc<ServerState>,
    peer: Arc<PeerInfo>,
    client: Option<ClientSocket>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(if req.method() == Method::CONNECT {
        connect(&state, &peer, req, client).await
    } else {
        forward(&state, &peer, req, client).await
    })
}

fn text(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    error_text(status, code, message).map(|b| Full::new(b).map_err(|never| match never {}).boxed())
}

/// The answer to a refused or failed request.
fn error_response(err: &TunnelError) -> Response<Body> {
    let status =
        StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = text(status, err.code.label(), &err.message);
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        resp.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// A request refused before it has a record: counted, logged, answered.
fn refuse(state: &ServerState, peer: &PeerInfo, err: &TunnelError) -> Response<Body> {
    refuse_early(state, peer, err);
    error_response(err)
}

/// The connection `open` asks for, on behalf of the caller of `req`.
async fn establish_for(
    state: &Arc<ServerState>,
    peer: &PeerInfo,
    open: Result<Open, TunnelError>,
    req: &Request<Incoming>,
) -> Result<Established, Response<Body>> {
    if let Err(err) = check_caller(peer) {
        // The certificate may not use this port: no proxy credential fixes that.
        refuse_early(state, peer, &err);
        return Err(text(StatusCode::FORBIDDEN, err.code.label(), &err.message));
    }
    let open = open.map_err(|err| refuse(state, peer, &err))?;
    let caller = Caller {
        peer,
        token: crate::authn::proxy_bearer_token(req.headers()),
        entry: "http-connect",
    };
    // The dial timeout bounds the wait; a client that leaves meanwhile finds
    // its connection gone when it is answered.
    establish(state, caller, open, std::future::pending())
        .await
        .map_err(|err| error_response(&err))
}

/// `CONNECT host:port`: a tunnel to the destination once it answered.
async fn connect(
    state: &Arc<ServerState>,
    peer: &PeerInfo,
    mut req: Request<Incoming>,
    client: Option<ClientSocket>,
) -> Response<Body> {
    let open = match req.uri().authority() {
        Some(authority) => {
            let host = authority.host();
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            state
                .config
                .addressing
                .open_host(host, authority.port_u16().unwrap_or(443))
        }
        None => Err(TunnelError::new(
            ErrorCode::BadRequest,
            "CONNECT names no destination (host:port)",
        )),
    };
    let established = match establish_for(state, peer, open, &req).await {
        Ok(established) => established,
        Err(resp) => return resp,
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                let to_client = ToClient::new(write, client.as_ref());
                // hyper wrote the 200 itself: the client owes its ACK, and
                // may have vanished before it, in front of a destination
                // that waits for the client to speak first.
                to_client.note_write();
                established.splice(FromClient { read }, to_client).await;
            }
            Err(err) => {
                tracing::debug!(id = %established.id(), %err, "the CONNECT client left before its tunnel started");
            }
        }
    });
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    resp
}

/// An absolute-form request (`GET http://host/path`): forwarded to the
/// destination over a connection of its own.
async fn forward(
    state: &Arc<ServerState>,
    peer: &PeerInfo,
    mut req: Request<Incoming>,
    client: Option<ClientSocket>,
) -> Response<Body> {
    if let Some(resp) = unforwardable(&req) {
        return resp.map(|b| Full::new(b).map_err(|never| match never {}).boxed());
    }
    let open = match req.uri().authority() {
        Some(authority) => state
            .config
            .addressing
            .open_host(authority.host(), authority.port_u16().unwrap_or(80)),
        None => Err(TunnelError::new(
            ErrorCode::BadRequest,
            "the request names no destination host",
        )),
    };
    // The destination's own name (the host in its cluster), not ours for it.
    let host = open.as_ref().ok().map(|o| host_header(&o.host, o.port));
    let established = match establish_for(state, peer, open, &req).await {
        Ok(established) => established,
        Err(resp) => return resp,
    };
    let id = established.id();
    to_origin_form(&mut req);
    if let Some(Ok(host)) = host.map(|h| HeaderValue::from_str(&h)) {
        req.headers_mut().insert(header::HOST, host);
    }
    let (near, far) = tokio::io::duplex(FORWARD_BUFFER);
    let (read, write) = tokio::io::split(far);
    // Written on by hyper: the client's socket owes what is written here.
    let to_client = ToClient::new(write, client.as_ref());
    tokio::spawn(established.splice(FromClient { read }, to_client));
    match send_request(near, req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(ForwardError::Handshake(err)) => error_response(&TunnelError::new(
            ErrorCode::TunnelBroken,
            format!("HTTP/1 over the tunnel: {err}"),
        )),
        Err(ForwardError::Request(err)) => {
            tracing::info!(%id, %err, "the destination did not answer the request");
            error_response(&TunnelError::new(
                ErrorCode::DestinationUnreachable,
                format!("the destination did not answer the request: {err}"),
            ))
        }
    }
}

/// What the client sends on its connection, as the bytes of the connection.
struct FromClient<R> {
    read: R,
}

impl<R: AsyncRead + Unpin + Send> SpliceSource for FromClient<R> {
    async fn next_data(&mut self, stop: &CancellationToken) -> Result<Option<Bytes>, LegAborted> {
        let mut buf = BytesMut::with_capacity(MIN_READ);
        tokio::select! {
            biased;
            () = stop.cancelled() => Err(LegAborted),
            read = self.read.read_buf(&mut buf) => match read {
                Ok(0) => Ok(None),
                Ok(_) => Ok(Some(buf.freeze())),
                Err(err) => {
                    tracing::debug!(%err, "reading the CONNECT client failed");
                    Err(LegAborted)
                }
            },
        }
    }

    fn handed_on(&mut self, _n: usize) {
        // Nothing is read before the previous buffer was handed on.
    }
}

/// The connection's bytes towards the client, and the watch of the
/// client's socket that finds a client gone while it owes us answers.
struct ToClient<W> {
    write: W,
    watch: Option<PeerWatch>,
}

impl<W> ToClient<W> {
    fn new(write: W, client: Option<&ClientSocket>) -> Self {
        Self {
            write,
            watch: client.map(ClientSocket::watch),
        }
    }

    fn note_write(&self) {
        if let Some(watch) = &self.watch {
            watch.note_write();
        }
    }
}

/// Ready once the client is gone (see [`ClientSocket`]); never without a watch.
fn poll_client_gone(
    watch: &mut Option<PeerWatch>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    let Some(watch) = watch else {
        return std::task::Poll::Pending;
    };
    watch.poll_gone(cx).map(|answers| {
        tracing::info!(
            ?answers,
            "the HTTP/1.1 client acknowledges nothing: gone; connection reset"
        );
    })
}

impl<W: AsyncWrite + Unpin + Send> SpliceSink for ToClient<W> {
    async fn send(&mut self, data: Bytes, stop: &CancellationToken) -> Result<(), LegAborted> {
        self.note_write();
        let Self { write, watch } = self;
        let written = async {
            write.write_all(&data).await?;
            write.flush().await
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => Err(LegAborted),
            () = std::future::poll_fn(|cx| poll_client_gone(watch, cx)) => Err(LegAborted),
            w = written => w.map_err(|err| {
                tracing::debug!(%err, "writing to the CONNECT client failed");
                LegAborted
            }),
        }
    }

    async fn finish(&mut self) -> Result<(), LegAborted> {
        // TLS close_notify, then a FIN: the client reads the end, and may go
        // on sending. The close_notify waits for room like any write.
        self.note_write();
        let Self { write, watch } = self;
        tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| poll_client_gone(watch, cx)) => Err(LegAborted),
            shut = write.shutdown() => shut.map_err(|_| LegAborted),
        }
    }

    fn poll_aborted(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // A client's abort shows as a failed read or write; a client that
        // vanished, through the watch.
        poll_client_gone(&mut self.watch, cx)
    }

    fn abort(&mut self) {
        // The connection is dropped with the splice, without close_notify:
        // the client reads a truncated TLS stream, an error, not an end.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `client_protocol` makes of a client that offered no ALPN and
    /// sent `first`, and what the stream then reads.
    async fn sniffed(first: &[u8]) -> Option<(ClientProtocol, Vec<u8>)> {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(first).await.unwrap();
        drop(client);
        let (protocol, mut stream) = client_protocol(None, server).await.unwrap()?;
        let mut read = Vec::new();
        stream.read_to_end(&mut read).await.unwrap();
        Some((protocol, read))
    }

    #[tokio::test]
    async fn without_alpn_the_first_bytes_tell_http2_from_http11_and_are_read_again() {
        let h2 = [H2_PREFACE, b"\x00\x00\x00\x04"].concat();
        assert_eq!(sniffed(&h2).await, Some((ClientProtocol::Http2, h2)));
        let connect = b"CONNECT east:443 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(
            sniffed(&connect).await,
            Some((ClientProtocol::Http11, connect))
        );
        // "PRI" alone and then something else is no HTTP/2.
        let pri = b"PRI / HTTP/1.1\r\n".to_vec();
        assert_eq!(sniffed(&pri).await, Some((ClientProtocol::Http11, pri)));
        assert_eq!(sniffed(b"").await, None);
        assert_eq!(
            sniffed(b"PRI * HT").await,
            None,
            "closed inside the preface"
        );
    }

    #[tokio::test]
    async fn alpn_decides_without_reading() {
        let (_client, server) = tokio::io::duplex(64);
        let (protocol, _) = client_protocol(Some(ALPN_HTTP11), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(protocol, ClientProtocol::Http11);
        let (_client, server) = tokio::io::duplex(64);
        let (protocol, _) = client_protocol(Some(b"h2"), server).await.unwrap().unwrap();
        assert_eq!(protocol, ClientProtocol::Http2);
    }

    #[test]
    fn the_client_port_offers_http11_after_h2_and_follows_the_server_s_configuration() {
        tunnel_proto::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let opts = tunnel_identity::cert_dir::CertOptions {
            trust_domain: tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            server_names: vec!["localhost".into()],
            clusters: vec![],
            clients: vec![],
            workloads: vec![],
            validity_days: 1,
        };
        tunnel_identity::cert_dir::generate(dir.path(), &opts).unwrap();
        let files = tunnel_proto::tls::TlsFiles::in_dir(dir.path(), "server");
        let first = tunnel_proto::tls::server_config(&files).unwrap();
        let tls = ClientPortTls::default();
        let derived = tls.config(first.clone());
        assert_eq!(
            derived.alpn_protocols,
            [b"h2".to_vec(), ALPN_HTTP11.to_vec()]
        );
        assert_eq!(
            first.alpn_protocols,
            [b"h2".to_vec()],
            "the agent port keeps h2 alone"
        );
        assert!(Arc::ptr_eq(&derived, &tls.config(first)), "built once");
        let reloaded = tunnel_proto::tls::server_config(&files).unwrap();
        assert!(
            !Arc::ptr_eq(&derived, &tls.config(reloaded)),
            "rebuilt on a reload"
        );
    }
}
