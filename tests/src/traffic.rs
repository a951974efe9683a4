//! Destinations and traffic: echo and greeting services, random payloads
//! checked by SHA-256 both ways at once, a writer that counts, a steady
//! load of new connections, and the open-files limit a large load needs.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// An echo service: writes back what it reads; after the client's FIN it
/// finishes writing and sends its own FIN.
pub async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn_echo(listener);
    addr
}

/// Serves the echo of [`start_echo`] on every connection `listener` accepts.
pub fn spawn_echo(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
}

/// A service that greets first ("hello from <name>\n"), then echoes.
pub async fn start_greeter(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let greeting = format!("hello from {name}\n");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if tcp.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Writes `len` pseudo-random bytes from `seed` and returns their SHA-256.
pub async fn write_random<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    len: usize,
    seed: u64,
) -> std::io::Result<[u8; 32]> {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// Reads to EOF and returns the byte count and SHA-256.
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(usize, [u8; 32])> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// Starts a loopback TCP service that runs `handler` on every accepted
/// connection, each in its own task.
pub async fn start_service<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

/// What one side of an [`exchange`] sent and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchanged {
    /// Bytes written.
    pub sent: usize,
    /// SHA-256 of the bytes written.
    pub sent_hash: [u8; 32],
    /// Bytes read before EOF.
    pub received: usize,
    /// SHA-256 of the bytes read.
    pub received_hash: [u8; 32],
}

/// Writes `len` random bytes from `seed` (then a FIN) while reading the
/// peer's bytes to EOF, both at once.
pub async fn exchange(tcp: TcpStream, len: usize, seed: u64) -> std::io::Result<Exchanged> {
    let (r, w) = tcp.into_split();
    exchange_halves(r, w, len, seed).await
}

/// A destination that, on each connection, reads everything while writing
/// its own `len` random bytes from `seed` (a different stream from the
/// client's), then half-closes. Reports what it saw per connection.
pub async fn start_exchange(
    len: usize,
    seed: u64,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Exchanged>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = start_service(move |tcp| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(exchange(tcp, len, seed).await);
        }
    })
    .await;
    (addr, rx)
}

/// Megabytes per second of `bytes` moved in `elapsed`.
pub fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

/// An [`AsyncWrite`](tokio::io::AsyncWrite) that counts the bytes written
/// through it, so a test can watch a writer block.
#[derive(Debug)]
pub struct Counted<W> {
    inner: W,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<W> Counted<W> {
    /// Counts what is written to `inner` into `count`.
    pub fn new(inner: W, count: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.count
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's soft open-files limit to at least `want` (up to the
/// hard limit, with `prlimit`); panics if the limit stays below `want`.
pub fn ensure_fd_limit(want: u64) {
    fn soft_and_hard() -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("");
        let mut nums = line.split_whitespace().filter_map(|w| {
            w.parse::<u64>()
                .ok()
                .or((w == "unlimited").then_some(u64::MAX))
        });
        (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
    }
    let (soft, hard) = soft_and_hard();
    if soft >= want {
        return;
    }
    // Root may raise the hard limit too.
    let hard_text = if hard == u64::MAX {
        "unlimited".to_string()
    } else {
        hard.max(want).to_string()
    };
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={want}:{hard_text}"))
        .status();
    let (soft, hard) = soft_and_hard();
    assert!(
        soft >= want,
        "this test needs {want} open files; the limit is {soft} (hard {hard}); raise it with `ulimit -n`"
    );
}

/// Like [`exchange`], on any byte stream (a [`TunnelIo`](tunnel_proto::client::TunnelIo), a TLS stream, ...).
pub async fn exchange_io<IO>(io: IO, len: usize, seed: u64) -> std::io::Result<Exchanged>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    let (r, w) = tokio::io::split(io);
    exchange_halves(r, w, len, seed).await
}

/// [`exchange`] over the two halves of a connection.
async fn exchange_halves<R, W>(
    mut r: R,
    mut w: W,
    len: usize,
    seed: u64,
) -> std::io::Result<Exchanged>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let write = async move {
        let hash = write_random(&mut w, len, seed).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(hash)
    };
    let (sent_hash, (received, received_hash)) = tokio::try_join!(write, read_hash(&mut r))?;
    Ok(Exchanged {
        sent: len,
        sent_hash,
        received,
        received_hash,
    })
}

/// Opens a connection to `port` (a forwarded port), sends `len` random
/// bytes while reading the echo, and checks that the echo is identical.
pub async fn check_echo(port: SocketAddr, len: usize) {
    let seed = rand::random();
    let run = async {
        let tcp = TcpStream::connect(port).await?;
        exchange(tcp, len, seed).await
    };
    let got = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("echo of {len} bytes through {port} timed out"))
        .unwrap_or_else(|e| panic!("echo through {port}: {e}"));
    assert_eq!(got.received, len, "echo through {port}: length");
    assert_eq!(
        got.received_hash, got.sent_hash,
        "echo through {port}: data"
    );
}

/// Starts `connect(seq)` (`seq` counting from 1) `per_second` times a
/// second, each in a task of its own, until `stop` completes; then waits for
/// the ones under way. Returns every result, in the order they finished.
pub async fn steady_load<F, Fut>(
    per_second: u32,
    stop: impl Future<Output = ()>,
    mut connect: F,
) -> Vec<Fut::Output>
where
    F: FnMut(u64) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(stop);
    let mut seq = 0u64;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {
                seq += 1;
                tasks.spawn(connect(seq));
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => out.push(done.expect("connection task")),
        }
    }
    while let Some(done) = tasks.join_next().await {
        out.push(done.expect("connection task"));
    }
    out
}
