//! A test's own sockets: small kernel buffers, a close by reset, and how a
//! connection ended for its reader (FIN, reset, still open).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Kernel buffer sizes for a test's own end of a connection. Small buffers
/// make a stalled connection block after little data, so that what a stall
/// holds is the tunnel's own buffering, and keep the kernel's memory small.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketBuffers {
    /// `SO_SNDBUF`, if set.
    pub send: Option<u32>,
    /// `SO_RCVBUF`, if set.
    pub recv: Option<u32>,
}

impl SocketBuffers {
    /// Both buffers set to `bytes`.
    pub fn small(bytes: u32) -> Self {
        Self {
            send: Some(bytes),
            recv: Some(bytes),
        }
    }

    fn apply(&self, socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
        if let Some(b) = self.send {
            socket.set_send_buffer_size(b)?;
        }
        if let Some(b) = self.recv {
            socket.set_recv_buffer_size(b)?;
        }
        Ok(())
    }

    /// Connects to `addr` with these buffers.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        self.apply(&socket)?;
        socket.connect(addr).await
    }

    /// A loopback listener whose accepted connections have these buffers.
    pub fn listen(&self) -> std::io::Result<TcpListener> {
        self.listen_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// A listener on `addr` whose accepted connections have these buffers.
    pub fn listen_on(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        self.apply(&socket)?;
        socket.bind(addr)?;
        socket.listen(4096)
    }
}

/// Whether `err` is a reset by the peer (as opposed to a clean end).
pub fn is_reset(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// How a connection ended for a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A clean end of data (the peer's FIN), after `n` bytes.
    Fin(usize),
    /// A reset (or abort) after `n` bytes.
    Reset(usize),
    /// Another error after `n` bytes.
    Error(usize, String),
    /// Still open when the deadline passed, after `n` bytes.
    Open(usize),
}

/// Reads `r` (discarding the data) until it ends or `deadline` passes;
/// reports how it ended.
pub async fn read_ending<R: AsyncReadExt + Unpin>(r: &mut R, deadline: Duration) -> Ending {
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, r.read(&mut buf)).await {
            Err(_) => return Ending::Open(n),
            Ok(Ok(0)) => return Ending::Fin(n),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) if is_reset(&e) => return Ending::Reset(n),
            Ok(Err(e)) => return Ending::Error(n, e.to_string()),
        }
    }
}

/// Closes `tcp` with a reset (RST), not a FIN: `SO_LINGER` 0, then close.
pub fn reset(tcp: TcpStream) {
    tcp.set_zero_linger().expect("SO_LINGER 0");
    drop(tcp);
}
