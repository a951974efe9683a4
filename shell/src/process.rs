//! The process around a component: its `main` ([`run`]), the tokio runtime,
//! the ports it listens on ([`listen`]), the termination signals and the
//! instance id a process names itself by.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{ExitCode, Termination};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Environment variable that sets the number of runtime worker threads
/// (default: one per CPU).
pub const WORKER_THREADS_ENV: &str = "TUNNEL_WORKER_THREADS";

/// How many worker threads a runtime has when `TUNNEL_WORKER_THREADS` does
/// not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerThreads {
    /// One per CPU (tokio's default).
    PerCpu,
    /// This many.
    Count(usize),
}

/// A binary's whole `main`: parses the command line `C` (printing help,
/// the version or a usage error and exiting as clap does), installs the TLS
/// crypto provider, builds the runtime and runs `main` on it. An error is
/// printed as `<binary name>: <error with its causes>` ([`describe`]) and
/// exits with 1; success exits as `main`'s value says (`()` is 0).
pub fn run<C, F, T>(threads: WorkerThreads, main: impl FnOnce(C) -> F) -> ExitCode
where
    C: clap::Parser,
    F: Future<Output = anyhow::Result<T>>,
    T: Termination,
{
    let cli = C::parse();
    tunnel_proto::tls::install_crypto_provider();
    let result = runtime(threads)
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(main(cli)));
    match result {
        Ok(done) => done.report(),
        Err(err) => {
            eprintln!("{}: {}", C::command().get_name(), describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// `err` and its causes as one line, `error: cause: cause`. A cause whose
/// text the message before it already holds is left out: by this project's
/// convention a typed error prints its source in its own message, and
/// printing it again would only repeat it.
pub fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    let mut previous = text.clone();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !previous.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        previous = cause;
    }
    text
}

/// The tokio runtime of a binary: multi-threaded, with `TUNNEL_WORKER_THREADS`
/// worker threads when set (a positive number), else `default`.
pub fn runtime(default: WorkerThreads) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = worker_threads(std::env::var(WORKER_THREADS_ENV).ok().as_deref(), default) {
        builder.worker_threads(n);
    }
    builder.build()
}

/// The worker threads `env` (the variable's value, if set) and `default`
/// give; `None` leaves the count to tokio (one per CPU).
fn worker_threads(env: Option<&str>, default: WorkerThreads) -> Option<usize> {
    env.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or(match default {
            WorkerThreads::PerCpu => None,
            WorkerThreads::Count(n) => Some(n),
        })
}

/// A port that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {port} address {addr}: {source}")]
pub struct ListenError {
    /// Which port (`admin`, `agent`, `webhook`, ...).
    pub port: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// The failure.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for the binary's `port` port; returns the listener and the
/// address it is bound to (the port the system chose for port 0).
pub async fn listen(
    port: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ListenError> {
    let error = |source| ListenError { port, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Drives one served connection (a hyper connection future) to its end;
/// once `stop` is cancelled, asks it to drain with `graceful_shutdown`
/// (hyper's: the request in flight finishes, no new one is read) and waits
/// for that end. Returns how the connection ended.
pub async fn serve_until_stopped<C: Future>(
    conn: C,
    stop: &CancellationToken,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = stop.cancelled() => {}
    }
    graceful_shutdown(conn.as_mut());
    conn.await
}

/// A default instance id: the host name plus a random suffix.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_threads_variable_wins_over_the_binary_default() {
        use WorkerThreads::{Count, PerCpu};
        assert_eq!(worker_threads(None, PerCpu), None);
        assert_eq!(worker_threads(None, Count(1)), Some(1));
        assert_eq!(worker_threads(Some("4"), Count(1)), Some(4));
        assert_eq!(worker_threads(Some(" 3 "), PerCpu), Some(3));
        // Nonsense or zero falls back to the binary's default.
        assert_eq!(worker_threads(Some("0"), Count(2)), Some(2));
        assert_eq!(worker_threads(Some("many"), PerCpu), None);
    }

    /// A connection that ends once drained, or on its own when `ends` is set.
    struct Conn {
        ends: bool,
        drained: bool,
    }

    impl Future for Conn {
        type Output = &'static str;
        fn poll(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<&'static str> {
            match (self.ends, self.drained) {
                (_, true) => std::task::Poll::Ready("drained"),
                (true, false) => std::task::Poll::Ready("ended"),
                (false, false) => std::task::Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_served_connection_is_drained_once_stopped_and_left_alone_before() {
        let drain = |c: Pin<&mut Conn>| c.get_mut().drained = true;
        let stop = CancellationToken::new();
        let conn = Conn {
            ends: true,
            drained: false,
        };
        assert_eq!(serve_until_stopped(conn, &stop, drain).await, "ended");
        stop.cancel();
        let conn = Conn {
            ends: false,
            drained: false,
        };
        assert_eq!(serve_until_stopped(conn, &stop, drain).await, "drained");
    }

    #[derive(Debug, thiserror::Error)]
    enum Typed {
        /// Prints its source, as this project's errors do.
        #[error("cannot listen on 127.0.0.1:1: {0}")]
        Listen(#[source] std::io::Error),
    }

    #[test]
    fn an_error_prints_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let typed = anyhow::Error::new(Typed::Listen(io())).context("admin port");
        assert_eq!(
            describe(&typed),
            "admin port: cannot listen on 127.0.0.1:1: address in use"
        );
        // A cause that its error does not print is added.
        let plain = anyhow::Error::new(io()).context("admin port 127.0.0.1:1");
        assert_eq!(describe(&plain), "admin port 127.0.0.1:1: address in use");
        assert_eq!(describe(&anyhow::anyhow!("alone")), "alone");
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_in_the_error() {
        let (_taken, addr) = listen("admin", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert_ne!(addr.port(), 0, "the bound port, not the one asked for");
        let err = listen("admin", addr).await.unwrap_err();
        assert_eq!(err.port, "admin");
        assert_eq!(err.addr, addr);
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on admin address {addr}: ")),
            "{err}"
        );
    }

    #[test]
    fn instance_ids_differ_between_processes() {
        let (a, b) = (default_instance_id(), default_instance_id());
        assert_ne!(a, b);
        assert!(a.len() > 7, "{a}");
    }
}
