//! The process shell around every cluster-tunnel binary: what a component
//! needs to be a program, and nothing of what it does.
//!
//! Each component crate is a library with a thin `main.rs`:
//!
//! ```no_run
//! use clap::Parser;
//! use tunnel_shell::flags::LogArgs;
//!
//! /// The command line of a component.
//! #[derive(Parser)]
//! #[command(name = "tunnel-example")]
//! struct Cli {
//!     #[command(flatten)]
//!     log: LogArgs,
//! }
//!
//! /// What the component does (its `cli::main`).
//! async fn serve(cli: Cli) -> anyhow::Result<()> {
//!     cli.log.init();
//!     tunnel_shell::process::termination_signal().await;
//!     Ok(())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     tunnel_shell::run(tunnel_shell::WorkerThreads::PerCpu, serve)
//! }
//! ```
//!
//! [`run`] parses the component's command line, builds the runtime and
//! turns the outcome into the exit code; the component's `cli::main` does
//! the rest with the pieces below.
//!
//! # Modules
//!
//! - [`process`]: [`run`], the tokio runtime (`TUNNEL_WORKER_THREADS`), the
//!   ports a binary listens on, the termination signals (SIGTERM, Ctrl-C)
//!   and a process's instance id;
//! - [`flags`]: the flag groups every command line flattens (`--server`,
//!   the TLS files, logging, the admin address, flow control), so that a
//!   shared flag is defined, and interpreted, once;
//! - [`units`]: values with units (`10s`, `256KiB`) as flags and
//!   configuration files write them;
//! - [`logging`]: the tracing subscriber (JSON or text);
//! - [`admin`]: the admin HTTP server every binary runs: `/healthz`,
//!   `/readyz`, `/metrics` (and a sidecar's `POST /shutdown`);
//! - [`metrics`]: the metric vocabulary the components share (result-code
//!   labels, latency buckets).
//!
//! Linking this crate also makes mimalloc the program's allocator (feature
//! `global-allocator`, on by default; see `ALLOCATOR` for why).
//!
//! Shutdown everywhere is a [`tokio_util::sync::CancellationToken`]: a
//! component cancels its token on SIGTERM, and each part that can also stop
//! on its own holds a child token.
//!
//! The protocol and the client library are `tunnel_proto`'s; this crate
//! builds on them (the flow flags make its HTTP/2 settings, the TLS flags its
//! certificate files) and never the other way round.

/// The allocator of every cluster-tunnel program (it is process set-up, so
/// it lives here and not in the client library an app may embed). The data
/// path allocates and frees a buffer per HTTP/2 frame and per socket read (up
/// to 256 KiB); glibc's malloc serves sizes like that with fresh `mmap`s or
/// trims them back to the kernel, so that each buffer cost page faults and
/// zeroing (measured: a fifth of the tunnel's CPU per GB). mimalloc keeps
/// such buffers in thread-local pages and reuses them. Feature
/// `global-allocator` (on by default).
#[cfg(feature = "global-allocator")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod flags;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod units;

pub use process::{WorkerThreads, run};
