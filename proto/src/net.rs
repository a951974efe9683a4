//! Socket options, set in one place. An option the platform lacks is a
//! warning, never a failed connection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub mod peer;

/// Default time after which an unanswered peer is declared dead.
pub const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Liveness settings for tunnel sockets and their HTTP/2 connections.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Idle time before the first TCP keepalive probe, and the HTTP/2 ping interval.
    pub keepalive_interval: Duration,
    /// How long an HTTP/2 ping or unacknowledged data may go unanswered
    /// (also TCP_USER_TIMEOUT).
    pub dead_peer_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::from_timeout(DEFAULT_DEAD_PEER_TIMEOUT)
    }
}

impl Liveness {
    /// Liveness that detects a dead peer within about `timeout`: pings every
    /// half of it, each must be answered within the other half.
    pub fn from_timeout(timeout: Duration) -> Self {
        let half = (timeout / 2).max(Duration::from_millis(500));
        Self {
            keepalive_interval: half,
            dead_peer_timeout: timeout.max(Duration::from_secs(1)),
        }
    }

    /// The HTTP/2 ping timeout: what is left of the budget after the interval.
    pub fn ping_timeout(&self) -> Duration {
        self.dead_peer_timeout
            .saturating_sub(self.keepalive_interval)
            .max(Duration::from_millis(500))
    }
}

/// Options for long-lived tunnel sockets: no Nagle delay, TCP keepalive and
/// TCP_USER_TIMEOUT, so a dead peer is found in bounded time even with data in flight.
pub fn tune_tunnel_socket(stream: &TcpStream, liveness: &Liveness) {
    tune_destination_socket(stream, liveness);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = SockRef::from(stream).set_tcp_user_timeout(Some(liveness.dead_peer_timeout)) {
        tracing::warn!(%err, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Options for a socket to a destination: no Nagle delay and TCP keepalive
/// (a vanished destination of an idle connection is found), but no
/// TCP_USER_TIMEOUT: Linux applies it to a closed window too and would reset
/// a destination that is alive but stops reading for longer than the
/// timeout. A destination that vanishes while it owes an answer is found by
/// a watch beside the relay instead ([`peer::watch`]).
pub fn tune_destination_socket(stream: &TcpStream, liveness: &Liveness) {
    set_nodelay_or_warn(stream);
    let sock = SockRef::from(stream);
    let probes = 3u32;
    let keepalive = TcpKeepalive::new()
        .with_time(liveness.keepalive_interval)
        .with_interval((liveness.keepalive_interval / probes).max(Duration::from_secs(1)));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let keepalive = keepalive.with_retries(probes);
    if let Err(err) = sock.set_tcp_keepalive(&keepalive) {
        tracing::warn!(%err, "cannot set TCP keepalive");
    }
}

/// Takes TCP_USER_TIMEOUT off a tunnel socket that turned out to carry one
/// app connection (an HTTP/1.1 CONNECT client): its reader may pause for
/// as long as it likes, and Linux would reset the connection once a closed
/// window outlasted the timeout. TCP keepalive stays; the caller watches
/// the peer ([`peer::PeerWatch`]).
pub fn allow_read_pauses(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = SockRef::from(stream).set_tcp_user_timeout(None) {
        tracing::warn!(%err, "cannot clear TCP_USER_TIMEOUT");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// Caps the kernel's send and receive buffers of a socket that faces an
/// app or a destination at `bytes` each (Linux doubles the figure for its
/// bookkeeping and stops autotuning that socket). Without a cap a peer that
/// stops reading lets the kernel grow them to `net.ipv4.tcp_wmem` /
/// `tcp_rmem` maxima (4 MiB and 6 to 32 MiB on common kernels), held for as
/// long as the peer stalls. On a listener, the accepted sockets inherit it.
pub fn cap_socket_buffers<S: std::os::fd::AsFd>(sock: &S, bytes: usize) -> std::io::Result<()> {
    let sock = SockRef::from(sock);
    sock.set_send_buffer_size(bytes)?;
    sock.set_recv_buffer_size(bytes)
}

/// Disables Nagle's algorithm: tunnels carry interactive traffic.
pub fn set_nodelay_or_warn(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::warn!(%err, "cannot set TCP_NODELAY");
    }
}

/// Longest time a dropped [`LingeringClose`] socket waits for its peer to close.
pub const LINGER: Duration = Duration::from_secs(5);

/// A TCP stream that is not closed at once when dropped: it is shut down for
/// writing and read (and discarded) until the peer closes too, for at most
/// [`LINGER`]. Closing a socket while the peer still sends (an HTTP/2
/// WINDOW_UPDATE or GOAWAY is enough) makes the kernel answer with RST, and
/// the RST makes the peer's kernel discard data it has received but not yet
/// handed to its application: the tail of a connection both ends consider
/// finished would be lost.
#[derive(Debug)]
pub struct LingeringClose {
    tcp: Option<TcpStream>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LingeringClose {
    /// Wraps `tcp`.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp: Some(tcp),
            closed: None,
        }
    }

    /// Wraps `tcp`; `closed` is dropped once the socket is closed, after the
    /// lingering (so that a process that waits for it exits only then).
    pub fn with_signal(tcp: TcpStream, closed: tokio::sync::oneshot::Sender<()>) -> Self {
        Self {
            tcp: Some(tcp),
            closed: Some(closed),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &TcpStream {
        self.tcp.as_ref().expect("present until drop")
    }

    fn tcp(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.tcp.as_mut().expect("present until drop"))
    }
}

impl Drop for LingeringClose {
    fn drop(&mut self) {
        let Some(mut tcp) = self.tcp.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let closed = self.closed.take();
        runtime.spawn(async move {
            let _closed = closed;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tcp.shutdown().await;
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl AsyncRead for LingeringClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.tcp().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.tcp().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.tcp().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_detects_a_dead_peer_within_thirty_seconds() {
        let l = Liveness::default();
        assert!(l.keepalive_interval + l.ping_timeout() <= Duration::from_secs(30));
        assert!(l.dead_peer_timeout <= Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_capped_listener_hands_its_buffers_to_every_accepted_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cap_socket_buffers(&listener, 64 * 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (accepted, _)) = (client.unwrap(), accepted.unwrap());
        let sock = SockRef::from(&accepted);
        // Linux doubles the figure for its bookkeeping and stops autotuning.
        assert_eq!(sock.send_buffer_size().unwrap(), 128 * 1024);
        assert_eq!(sock.recv_buffer_size().unwrap(), 128 * 1024);
    }

    #[tokio::test]
    async fn destination_sockets_get_keepalive_but_no_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune_destination_socket(&stream, &Liveness::from_timeout(Duration::from_secs(10)));
        let sock = SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
    }

    #[tokio::test]
    async fn tunnel_sockets_get_user_timeout_and_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let liveness = Liveness::from_timeout(Duration::from_secs(10));
        tune_tunnel_socket(&stream, &liveness);
        let sock = SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(10))
        );
    }
}
