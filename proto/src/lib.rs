pub mod admin;
pub mod backoff;
pub mod certs;
pub mod codec;
pub mod error;
pub mod h2;
pub mod identity;
pub mod net;
pub mod relay;
pub mod tls;

/// Generated protocol types and gRPC stubs (`proto/tunnel.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!("gen/clustertunnel.v1.rs");
}

pub mod cli;
pub mod client;

/// Largest gRPC message we accept: a data frame holds at most
/// [`relay::MAX_READ`] bytes; the margin leaves room for framing.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
