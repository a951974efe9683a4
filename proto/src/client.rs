//! The client library: opens tunnelled connections through a proxy server.
//! The sidecar, tools and the benchmark use it.
//!
//! One long-lived HTTP/2 connection to a server carries every tunnelled
//! connection as its own stream; it is re-established on demand after it
//! breaks, starting with the next configured server address.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::error::{ErrorCode, TunnelError};
use crate::grpc::GrpcChannel;
use crate::h2::{H2Client, H2Settings, client_handshake};
use crate::pb::{self, tunnel_client::TunnelClient as GrpcClient};
use crate::relay::{RelayOutcome, TunnelStream, relay_tcp};
use crate::stream::{Open, OpenFailure, Opened, open_on};

mod io;
pub use io::TunnelIo;

/// Default time allowed to connect to a server (TCP + TLS + HTTP/2).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed attempt to reach the servers answers for later callers.
const FAILED_DIAL_REUSE: Duration = Duration::from_secs(1);

/// Default time allowed from `Open` to the tunnel's answer.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a tunnelled connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The managed cluster.
    pub cluster: String,
    /// Host name or IP address inside that cluster's network.
    pub host: String,
    /// Destination port.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}/[{}]:{}", self.cluster, self.host, self.port)
        } else {
            write!(f, "{}/{}:{}", self.cluster, self.host, self.port)
        }
    }
}

impl Target {
    /// A target in `cluster`.
    pub fn new(cluster: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Self {
            cluster: cluster.into(),
            host: host.into(),
            port,
        }
    }

    /// The open for this target, with a fresh 128-bit connection id.
    pub fn open(&self, dial_timeout: Option<Duration>) -> Open {
        Open {
            dial_timeout,
            ..Open::new(self.cluster.clone(), self.host.clone(), self.port)
        }
    }
}

/// How to reach the proxy servers.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server addresses (`host:port`), tried in order after a failure.
    pub servers: Vec<String>,
    /// The name the servers' certificates must carry; by default each
    /// address's host part.
    pub server_name: Option<String>,
    /// Our TLS client configuration (see [`crate::tls::TlsSource`]).
    pub tls: crate::tls::ClientTls,
    /// HTTP/2 settings of the connection.
    pub h2: H2Settings,
    /// Time allowed to connect to a server.
    pub connect_timeout: Duration,
    /// Time allowed from `Open` to the tunnel's answer.
    pub open_timeout: Duration,
    /// A service-account token file (the pod's projected token) sent as
    /// `authorization: Bearer` on every connection; re-read when it changes.
    pub token_file: Option<std::path::PathBuf>,
}

/// A token file re-read when its modification time or size changes (the
/// kubelet rotates projected tokens by replacing the file).
#[derive(Debug)]
pub struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(std::time::SystemTime, u64, Arc<str>)>>,
}

impl TokenFile {
    /// A token file at `path`, read on first use.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The current token: one `stat` per call, a read only when the file changed.
    pub fn current(&self) -> Result<Arc<str>, TunnelError> {
        let fail = |e: std::io::Error| {
            TunnelError::new(
                ErrorCode::Unauthenticated,
                format!("cannot read the token file {}: {e}", self.path.display()),
            )
        };
        let meta = std::fs::metadata(&self.path).map_err(fail)?;
        let stamp = (meta.modified().map_err(fail)?, meta.len());
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, l, token)) = &*cached
            && (*m, *l) == stamp
        {
            return Ok(token.clone());
        }
        let text = std::fs::read_to_string(&self.path).map_err(fail)?;
        let token: Arc<str> = Arc::from(text.trim());
        if token.is_empty() {
            return Err(TunnelError::new(
                ErrorCode::Unauthenticated,
                format!("the token file {} is empty", self.path.display()),
            ));
        }
        tracing::debug!(path = %self.path.display(), "token (re)read");
        *cached = Some((stamp.0, stamp.1, token.clone()));
        Ok(token)
    }
}

/// A client of the proxy servers' client port.
///
/// It keeps at most one connection per configured server address and sends
/// every open on the one it prefers: the last one that worked. An answer from
/// a server is an answer, never a reason to drop the connection it came on:
/// `no_agent` is tried on the next server (the connection stays up for other
/// clusters), `server_draining` on the next one too (the draining server gets
/// no new opens). Opens are re-sent only when the first server certainly did
/// not act on them (it answered one of those codes, refused the stream, or
/// never got it), so no destination is reached twice. After a failure the
/// preferred server moves on to the next address, and a reconnection holds
/// up only the opens that need that very server.
pub struct TunnelClient {
    opts: ClientOptions,
    token: Option<TokenFile>,
    servers: Vec<ServerSlot>,
    /// The index of the server new opens try first.
    preferred: AtomicUsize,
}

/// One configured server address and its connection.
struct ServerSlot {
    addr: String,
    /// The connection, while it is up (taken without waiting).
    conn: std::sync::Mutex<Option<H2Client>>,
    /// Held while dialing, so that one dial serves every caller that needs
    /// this server meanwhile; callers of other servers never wait for it.
    dialing: tokio::sync::Mutex<()>,
    /// The last failed dial: it answers for this server's callers for
    /// [`FAILED_DIAL_REUSE`] instead of another dial.
    last_failure: std::sync::Mutex<Option<(std::time::Instant, TunnelError)>>,
}

impl ServerSlot {
    fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            conn: std::sync::Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            last_failure: std::sync::Mutex::new(None),
        }
    }

    /// The connection if it is up and takes new streams.
    fn live(&self) -> Option<H2Client> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match &*conn {
            Some(ch) if !ch.is_closed() => Some(ch.clone()),
            Some(_) => {
                *conn = None;
                None
            }
            None => None,
        }
    }

    fn recent_failure(&self) -> Option<TunnelError> {
        let failure = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
        match &*failure {
            Some((at, err)) if at.elapsed() < FAILED_DIAL_REUSE => Some(err.clone()),
            _ => None,
        }
    }
}

/// Why one attempt of an open failed, and whether another server may get it.
struct AttemptFailed {
    err: TunnelError,
    /// The server did not act on the open: it may go to another server.
    elsewhere: bool,
}

impl AttemptFailed {
    fn fatal(err: TunnelError) -> Self {
        Self {
            err,
            elsewhere: false,
        }
    }
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("servers", &self.opts.servers)
            .finish()
    }
}

/// A tunnel the far end accepted: the agent has connected to the destination.
pub struct OpenedTunnel {
    /// The connection id chosen for this connection.
    pub id: uuid::Uuid,
    /// The agent's answer.
    pub opened: Opened,
    stream: TunnelStream,
}

impl std::fmt::Debug for OpenedTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedTunnel")
            .field("id", &self.id)
            .field("opened", &self.opened)
            .finish()
    }
}

impl OpenedTunnel {
    /// Relays `tcp` through the tunnel until both directions have ended.
    pub async fn relay(self, tcp: TcpStream) -> RelayOutcome {
        self.relay_with_prefix(tcp, Bytes::new()).await
    }

    /// Like [`relay`](Self::relay), sending `prefix` (bytes already read from
    /// `tcp`, e.g. by an HTTP parser) first.
    pub async fn relay_with_prefix(self, tcp: TcpStream, prefix: Bytes) -> RelayOutcome {
        crate::net::set_nodelay_or_warn(&tcp);
        // The app is this host's (or the embedding program's own socket):
        // nothing to watch beyond what its kernel tells the writes.
        relay_tcp(tcp, prefix, self.stream, None).await
    }

    /// The tunnel as an in-process byte stream.
    pub fn into_io(self) -> TunnelIo {
        TunnelIo::new(self.stream)
    }
}

impl TunnelClient {
    /// A client for `opts`; connects lazily.
    pub fn new(opts: ClientOptions) -> Self {
        Self {
            token: opts.token_file.clone().map(TokenFile::new),
            servers: opts.servers.iter().map(|a| ServerSlot::new(a)).collect(),
            opts,
            preferred: AtomicUsize::new(0),
        }
    }

    /// Connects now (or confirms a connection is up).
    pub async fn ensure_connected(&self) -> Result<(), TunnelError> {
        self.any_connection().await.map(|_| ())
    }

    /// Whether a connection to a server is currently up.
    pub async fn is_connected(&self) -> bool {
        self.servers.iter().any(|s| s.live().is_some())
    }

    /// The server to try next, skipping `exclude`: a connection that is up
    /// (from the preferred server on), else a server whose last dial did
    /// not just fail, else any.
    fn pick(&self, exclude: &[usize]) -> Option<usize> {
        let n = self.servers.len();
        let start = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let order = || {
            (0..n)
                .map(move |k| (start + k) % n)
                .filter(|i| !exclude.contains(i))
        };
        order()
            .find(|&i| self.servers[i].live().is_some())
            .or_else(|| order().find(|&i| self.servers[i].recent_failure().is_none()))
            .or_else(|| order().next())
    }

    /// New opens start with the server after `i`, if they started with `i`.
    fn move_past(&self, i: usize) {
        let n = self.servers.len();
        let _ =
            self.preferred
                .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The connection to server `i`, dialed if it is not up.
    async fn connection(&self, i: usize) -> Result<H2Client, TunnelError> {
        let slot = &self.servers[i];
        if let Some(ch) = slot.live() {
            return Ok(ch);
        }
        // Waits only for a dial of this same server.
        let _dialing = slot.dialing.lock().await;
        if let Some(ch) = slot.live() {
            return Ok(ch);
        }
        // A dial that just failed (perhaps while we waited) answers for us.
        if let Some(err) = slot.recent_failure() {
            return Err(err);
        }
        let addr = &slot.addr;
        let failed = match tokio::time::timeout(self.opts.connect_timeout, self.dial(addr)).await {
            Ok(Ok(ch)) => {
                *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(ch.clone());
                return Ok(ch);
            }
            Ok(Err(err)) => {
                tracing::warn!(server = %addr, %err, "cannot connect to tunnel server");
                err.to_string()
            }
            Err(_) => {
                tracing::warn!(server = %addr, "connecting to tunnel server timed out");
                format!("connect to {addr} timed out")
            }
        };
        let err = TunnelError::new(
            ErrorCode::TunnelBroken,
            format!("tunnel server not reachable: {failed}"),
        );
        *slot.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), err.clone()));
        Err(err)
    }

    /// A connection to any server: the preferred one, else the next.
    async fn any_connection(&self) -> Result<(usize, H2Client), TunnelError> {
        if self.servers.is_empty() {
            return Err(no_servers());
        }
        let mut tried = Vec::new();
        let mut last = None;
        while let Some(i) = self.pick(&tried) {
            match self.connection(i).await {
                Ok(ch) => return Ok((i, ch)),
                Err(err) => {
                    self.move_past(i);
                    tried.push(i);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(no_servers))
    }

    async fn dial(&self, addr: &str) -> Result<H2Client, DialError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| DialError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        crate::net::tune_tunnel_socket(&tcp, &self.opts.h2.liveness);
        let host = match &self.opts.server_name {
            Some(name) => name.clone(),
            None => host_of(addr).to_owned(),
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|source| DialError::ServerName { host, source })?;
        let tls = tokio_rustls::TlsConnector::from(self.opts.tls.current())
            .connect(name, crate::net::LingeringClose::new(tcp))
            .await
            .map_err(|source| DialError::Tls {
                addr: addr.to_owned(),
                source,
            })?;
        let (channel, driver) = client_handshake(tls, &self.opts.h2)
            .await
            .map_err(|source| DialError::Http2 {
                addr: addr.to_owned(),
                source,
            })?;
        let addr = addr.to_owned();
        tokio::spawn(async move {
            if let Err(err) = driver.await {
                tracing::warn!(server = %addr, %err, "connection to tunnel server ended");
            }
        });
        Ok(channel)
    }

    fn grpc(&self, ch: H2Client) -> GrpcClient<GrpcChannel> {
        GrpcClient::with_origin(
            GrpcChannel::new(ch),
            http::Uri::from_static("https://cluster-tunnel.server"),
        )
    }

    /// Opens a tunnelled connection to `target` and waits for the far end's
    /// answer, within the open timeout.
    pub async fn open(&self, target: &Target) -> Result<OpenedTunnel, TunnelError> {
        match tokio::time::timeout(self.opts.open_timeout, self.open_anywhere(target)).await {
            Ok(res) => res,
            Err(_) => Err(TunnelError::new(
                ErrorCode::DialTimeout,
                format!("no answer for {target} within {:?}", self.opts.open_timeout),
            )),
        }
    }

    /// Opens a tunnelled connection to `target` as an in-process byte stream
    /// (for protocols the caller speaks itself, such as HTTP/1 to the destination).
    pub async fn open_io(&self, target: &Target) -> Result<TunnelIo, TunnelError> {
        Ok(self.open(target).await?.into_io())
    }

    /// Tries the servers in turn while each failure leaves the open undone.
    /// Each server is tried at most once; with a single address (a load
    /// balancer, where a new connection may reach another replica) a
    /// refused open is sent once more on a new connection.
    async fn open_anywhere(&self, target: &Target) -> Result<OpenedTunnel, TunnelError> {
        if self.servers.is_empty() {
            return Err(no_servers());
        }
        let single = self.servers.len() == 1;
        let mut exclude = Vec::new();
        let mut last: Option<TunnelError> = None;
        let mut attempts = 0;
        while let Some(i) = self.pick(&exclude) {
            attempts += 1;
            let ch = match self.connection(i).await {
                Ok(ch) => ch,
                Err(err) => {
                    self.move_past(i);
                    exclude.push(i);
                    last = Some(err);
                    continue;
                }
            };
            let failed = match self.try_open(&ch, target).await {
                Ok(t) => return Ok(t),
                Err(failed) => failed,
            };
            if !failed.elsewhere {
                return Err(failed.err);
            }
            tracing::debug!(%target, server = %self.servers[i].addr, err = %failed.err, "open not served; trying another server");
            // No agent of the cluster there (a replica without agents of a
            // cluster cannot tell an unknown cluster from one whose agents
            // have not connected yet): the connection itself is fine.
            let no_agent_there = matches!(
                failed.err.code,
                ErrorCode::NoAgent | ErrorCode::UnknownCluster
            );
            if !no_agent_there {
                // Draining, or refused at the connection: no new opens there.
                ch.mark_broken();
                self.move_past(i);
            }
            let again = single && attempts < 2 && !no_agent_there;
            if !again {
                exclude.push(i);
            }
            // Another replica's `no_agent` (or any other failure) says more
            // than `unknown_cluster`: the cluster is known somewhere.
            if failed.err.code != ErrorCode::UnknownCluster || last.is_none() {
                last = Some(failed.err);
            }
        }
        Err(last.unwrap_or_else(no_servers))
    }

    async fn try_open(
        &self,
        ch: &H2Client,
        target: &Target,
    ) -> Result<OpenedTunnel, AttemptFailed> {
        let open = target.open(None);
        let token = match &self.token {
            Some(t) => Some(t.current().map_err(AttemptFailed::fatal)?),
            None => None,
        };
        let request = open
            .to_request(token.as_deref())
            .map_err(AttemptFailed::fatal)?;
        let (opened, stream) = open_on(ch, request).await.map_err(|f| {
            let elsewhere = f.was_not_processed();
            let err = match f {
                OpenFailure::Full(e) => {
                    TunnelError::new(ErrorCode::ResourceExhausted, e.to_string())
                }
                // Not acted on: the connection refused the stream, or could
                // not send it (marked broken; the next open reconnects).
                OpenFailure::Connection(e) => broken(&e),
                OpenFailure::Answer(e) if elsewhere => broken(&e),
                // The server reset this one stream; the connection is fine.
                OpenFailure::Answer(e) if e.is_reset() && !e.is_go_away() => TunnelError::new(
                    ErrorCode::TunnelBroken,
                    format!("the server reset the stream: {e}"),
                ),
                // The connection failed under the open: the server may have acted on it.
                OpenFailure::Answer(e) => {
                    ch.mark_broken();
                    broken(&e)
                }
                OpenFailure::Refused(err) => {
                    return AttemptFailed {
                        elsewhere: matches!(
                            err.code,
                            ErrorCode::NoAgent
                                | ErrorCode::ServerDraining
                                | ErrorCode::UnknownCluster
                        ),
                        err,
                    };
                }
                OpenFailure::NotAcknowledged(_) => TunnelError::new(
                    ErrorCode::TunnelBroken,
                    "the server did not acknowledge the open",
                ),
            };
            // A full connection budget is this connection's, not the open's.
            let elsewhere = elsewhere && err.code != ErrorCode::ResourceExhausted;
            AttemptFailed { err, elsewhere }
        })?;
        Ok(OpenedTunnel {
            id: open.id,
            opened,
            stream,
        })
    }

    /// Opens a tunnel to `target` and relays `tcp` through it.
    pub async fn proxy(
        &self,
        tcp: TcpStream,
        target: &Target,
    ) -> Result<RelayOutcome, TunnelError> {
        let tunnel = self.open(target).await?;
        Ok(tunnel.relay(tcp).await)
    }

    /// The clusters the server knows, with their agents.
    pub async fn list_clusters(&self) -> Result<Vec<pb::ClusterInfo>, TunnelError> {
        let (_, ch) = self.any_connection().await?;
        let resp = self
            .grpc(ch)
            .list_clusters(pb::ListClustersRequest {})
            .await
            .map_err(|s| TunnelError::from_status(&s))?;
        Ok(resp.into_inner().clusters)
    }
}

fn no_servers() -> TunnelError {
    TunnelError::new(ErrorCode::Internal, "no server address configured")
}

fn broken(e: &h2::Error) -> TunnelError {
    TunnelError::new(
        ErrorCode::TunnelBroken,
        format!("the connection to the server failed: {e}"),
    )
}

/// What happened to one connection of a forwarded port.
pub type PortEvent<'a> = Result<&'a RelayOutcome, &'a TunnelError>;

/// Forwards every connection accepted on `listener` to `target` (a
/// per-cluster port). A connection whose tunnel cannot be opened is closed
/// and logged. `observe` sees how each connection ended (for metrics). Runs
/// until `shutdown` completes.
pub async fn serve_port<O>(
    listener: TcpListener,
    client: Arc<TunnelClient>,
    target: Target,
    observe: O,
    shutdown: impl std::future::Future<Output = ()>,
) where
    O: Fn(PortEvent<'_>) + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    let target = Arc::new(target);
    let observe = Arc::new(observe);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return,
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let client = client.clone();
        let target = target.clone();
        let observe = observe.clone();
        tokio::spawn(async move {
            match client.proxy(tcp, &target).await {
                Ok(outcome) => {
                    tracing::debug!(%peer, %target, ?outcome, "connection done");
                    observe(Ok(&outcome));
                }
                Err(err) => {
                    tracing::warn!(%peer, %target, code = err.code.label(), %err, "cannot open tunnel; connection closed");
                    observe(Err(&err));
                }
            }
        });
    }
}

/// The host part of `host:port` or `[v6]:port`.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, _)) => host,
        None => addr,
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn token_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let t = TokenFile::new(path.clone());
        assert_eq!(t.current().unwrap_err().code, ErrorCode::Unauthenticated);
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(&*t.current().unwrap(), "first");
        // The kubelet swaps in a new file (different size here; mtime too).
        std::fs::write(&path, "second-token").unwrap();
        assert_eq!(&*t.current().unwrap(), "second-token");
        std::fs::write(&path, "").unwrap();
        assert!(t.current().unwrap_err().message.contains("empty"));
    }
}

/// Why a connection to one tunnel server could not be made.
#[derive(Debug, thiserror::Error)]
enum DialError {
    /// The TCP connection failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The name the server's certificate must have is not a DNS name or address.
    #[error("server name {host:?}: {source}")]
    ServerName {
        host: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake failed.
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 with {addr}: {source}")]
    Http2 {
        addr: String,
        #[source]
        source: ::h2::Error,
    },
}
