//! A user-space WAN emulator: a TCP relay that delays and paces every byte
//! as a long, narrow link would. This kernel has no `netem` qdisc, so tests
//! and the benchmark put this relay on a path instead (for example between
//! an agent and the server's agent port).
//!
//! Each direction of each relayed connection is a link of its own: a chunk
//! read from the input enters the link's queue, is serialised at `rate`
//! (bits per second) after the chunks before it, then arrives `delay` later
//! at the output. The link holds at most `buffer` bytes (queued and in
//! flight); the relay reads its input only while there is room, so a sender
//! that outruns the link is pushed back by TCP flow control, never buffered
//! without bound. The relay's own sockets have small fixed kernel buffers so
//! that they add little hidden buffering to the emulated link.
//!
//! A FIN is carried as a FIN (after the data before it, with the same
//! delay); a reset or error on either side resets the other side at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// Largest chunk the relay reads at once.
const CHUNK: usize = 64 * 1024;
/// Kernel send and receive buffer of the relay's own sockets.
const SOCKET_BUFFER: u32 = 256 * 1024;

/// The link's properties, the same in both directions.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// One-way delay added to every chunk.
    pub delay: Duration,
    /// Link rate in bits per second.
    pub rate_bps: u64,
    /// Bytes the link holds per direction (queued and in flight).
    pub buffer: usize,
}

impl Link {
    /// 25 ms each way, 1 Gbit/s, a buffer of twice the bandwidth-delay
    /// product (50 ms round trip: 6.25 MB; the buffer is 16 MiB >= 12.5 MB).
    pub fn wan_1g_25ms() -> Self {
        Self {
            delay: Duration::from_millis(25),
            rate_bps: 1_000_000_000,
            buffer: 16 * 1024 * 1024,
        }
    }

    /// Time to serialise `bytes` at the link rate.
    fn serialisation(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps as f64)
    }
}

/// A running relay; stops accepting when dropped (open connections end
/// when their peers close them).
#[derive(Debug)]
pub struct WanRelay {
    /// Where to connect instead of the upstream address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WanRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WanRelay {
    /// Listens on a loopback port and relays every connection to `upstream`
    /// over an emulated `link`.
    pub async fn start(upstream: SocketAddr, link: Link) -> std::io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        // Accepted sockets inherit the listener's receive buffer.
        socket.set_recv_buffer_size(SOCKET_BUFFER)?;
        socket.set_send_buffer_size(SOCKET_BUFFER)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, upstream, link));
        Ok(Self { addr, task })
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, link: Link) {
    loop {
        let (down, _) = match listener.accept().await {
            Ok(x) => x,
            Err(err) => {
                tracing::warn!(%err, "WAN relay: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let up = match connect_small(upstream).await {
                Ok(up) => up,
                Err(err) => {
                    tracing::debug!(%err, %upstream, "WAN relay: upstream refused");
                    let _ = down.set_zero_linger();
                    return;
                }
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            relay(down, up, link).await;
        });
    }
}

async fn connect_small(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    socket.connect(addr).await
}

/// What the link delivers: data, or the sender's FIN.
enum Delivery {
    Data(Vec<u8>),
    Fin,
}

/// Relays both directions of one connection until both have ended.
async fn relay(a: TcpStream, b: TcpStream, link: Link) {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    // Set when either direction fails: the other one resets its output.
    let failed = Arc::new(tokio::sync::Notify::new());
    let one = direction(ar, bw, link, failed.clone());
    let two = direction(br, aw, link, failed);
    let (ok1, ok2) = tokio::join!(one, two);
    tracing::trace!(ok1, ok2, "WAN relay: connection done");
}

/// One direction: reads `input` while the link has room, delivers each
/// chunk to `output` when the link would. Returns whether it ended cleanly
/// (a FIN delivered); on failure, resets `output` and tells the other
/// direction through `failed` to do the same.
async fn direction(
    input: OwnedReadHalf,
    mut output: OwnedWriteHalf,
    link: Link,
    failed: Arc<tokio::sync::Notify>,
) -> bool {
    let room = Arc::new(Semaphore::new(link.buffer));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Delivery)>();
    let clean = {
        let reader = read_side(input, link, room.clone(), tx);
        let writer = async {
            while let Some((at, delivery)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                match delivery {
                    Delivery::Data(bytes) => {
                        if output.write_all(&bytes).await.is_err() {
                            return false;
                        }
                        room.add_permits(bytes.len());
                    }
                    Delivery::Fin => return output.shutdown().await.is_ok(),
                }
            }
            false
        };
        tokio::pin!(reader, writer);
        let mut reader_done = false;
        loop {
            tokio::select! {
                ok = &mut reader, if !reader_done => {
                    if !ok {
                        break false;
                    }
                    reader_done = true;
                }
                ok = &mut writer => break ok,
                () = failed.notified() => break false,
            }
        }
    };
    if !clean {
        // Wakes the other direction now, or at its next wait.
        failed.notify_one();
        let stream: &TcpStream = output.as_ref();
        let _ = stream.set_zero_linger();
        // Dropping a write half would send a FIN first; the socket closes
        // (with a reset) when the other direction drops the read half.
        output.forget();
    }
    clean
}

/// Reads `input` into the link while it has room; ends with a FIN delivery
/// (true) or on a read error (false).
async fn read_side(
    mut input: OwnedReadHalf,
    link: Link,
    room: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<(Instant, Delivery)>,
) -> bool {
    // When the link is free again (the last chunk fully serialised).
    let mut link_free = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Room for a whole chunk before reading: backpressure to the sender.
        let Ok(permits) = room.acquire_many(CHUNK as u32).await else {
            return false;
        };
        let n = match input.read(&mut buf).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        let now = Instant::now();
        if n == 0 {
            let _ = tx.send((link_free.max(now) + link.delay, Delivery::Fin));
            return true;
        }
        // Hold room for the bytes read; the writer gives it back.
        permits.forget();
        room.add_permits(CHUNK - n);
        link_free = link_free.max(now) + link.serialisation(n);
        if tx
            .send((link_free + link.delay, Delivery::Data(buf[..n].to_vec())))
            .is_err()
        {
            return false;
        }
    }
}
