//! Test harness for cluster-tunnel: certificates, the server and agents as
//! library calls or as real processes, destination services, and waits with
//! deadlines. The end-to-end tests and the benchmark use it.
//!
//! Everything is re-exported at the crate's root (`use tunnel_tests::*`).
//!
//! # Modules
//!
//! - [`pki`]: an installation's certificates in a temporary directory;
//! - [`in_process`]: server, agents, clients and sidecars as library calls;
//! - [`process`]: the binaries as child processes, killed on drop, and free
//!   ports for them;
//! - [`waits`]: waits with deadlines (a condition, a port, `/readyz`, the
//!   server's list of agents);
//! - [`admin`]: `GET` on an admin port, `/metrics` and its series;
//! - [`traffic`]: echo and greeting destinations, checked random payloads,
//!   a steady load of new connections;
//! - [`sockets`]: small kernel buffers, resets, how a connection ended;
//! - [`sidecar_http`]: HTTP destinations and `CONNECT` through a sidecar's
//!   proxy;
//! - [`hostile`]: peers a port must refuse;
//! - [`konnectivity`]: a konnectivity client written from the upstream
//!   protocol, and raw calls for packets no client should send;
//! - [`netns`]: network namespaces joined by a veth link (needs root);
//! - [`wan`]: a user-space WAN emulator (delay and rate).

pub mod admin;
pub mod hostile;
pub mod images;
pub mod in_process;
pub mod konnectivity;
pub mod netns;
pub mod pki;
pub mod process;
pub mod sidecar_http;
pub mod sockets;
pub mod traffic;
pub mod waits;
pub mod wan;

pub use admin::*;
pub use hostile::*;
pub use in_process::*;
pub use netns::{NetNs, is_root};
pub use pki::*;
pub use process::*;
pub use sidecar_http::*;
pub use sockets::*;
pub use traffic::*;
pub use waits::*;

/// Installs the crypto provider and a test log subscriber (RUST_LOG decides).
pub fn init() {
    tunnel_proto::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The repository's root (the workspace holding this crate).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}
