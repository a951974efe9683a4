//! The cluster-tunnel wire protocol and everything the components share.
//!
//! # The protocol
//!
//! gRPC over HTTP/2 over TLS 1.3 (mutual), defined in `proto/tunnel.proto`.
//! Every proxied TCP connection is **one HTTP/2 stream on each leg**:
//! client -> server (`Tunnel.Connect`) and server -> agent (`Agent.Dial`).
//! HTTP/2 flow control is per stream, so a stalled reader holds back only its
//! own connection; nothing multiplexes connections inside one stream (the
//! head-of-line blocking of apiserver-network-proxy, its issues #180 and #881).
//!
//! **Reversed roles on the agent leg.** The agent dials the server (the hub
//! can never dial into a managed cluster), yet the server must open a stream
//! per connection towards the agent. We chose to reverse HTTP/2 roles on that
//! TLS connection: the agent, TLS client, is the HTTP/2 *server* and serves
//! the `Agent` service; the server, TLS server, is the HTTP/2 *client* and
//! calls `Agent.Dial` for each connection. The alternative — a control
//! stream on which the server asks and the agent opens a stream back — costs
//! an extra round trip per connection, a second correlation mechanism (ids on
//! the control stream) and a failure mode where the request and the data
//! stream race. With reversed roles, opening a connection is one HEADERS
//! frame, and the stream *is* the connection: its id, its flow control, its
//! reset. [`h2`] drives hyper's HTTP/2 directly in either role.
//!
//! **Frames.** The opener's first message is `Open` (cluster, host, port, a
//! 128-bit connection id chosen by the opener — unique without coordination,
//! no per-stream counters to race on). The answer's first message is `Opened`
//! or `Error`. `Error` carries an [`error::ErrorCode`] and a message: callers
//! branch on the code, never on text. Then `data` frames flow both ways, and
//! `eof` half-closes one direction (a TCP FIN) while the other keeps flowing.
//! A stream that ends without `eof`, or is reset, is an abort: the far side
//! resets its TCP connection.
//!
//! **Liveness.** HTTP/2 PING keepalive with a timeout on every tunnel
//! connection, plus TCP keepalive and `TCP_USER_TIMEOUT` on the socket
//! ([`net::Liveness`]): a dead peer is found within the configured time
//! (20 s by default), not after the kernel's retransmissions give up.
//!
//! **Throughput.** 8 MiB stream windows and a 128 MiB connection window,
//! 256 KiB HTTP/2 frames and data messages of up to 256 KiB; the relay reads
//! into a buffer only when the socket is readable and writes received bytes
//! without copying ([`relay`]); the server passes frames between the two legs
//! without a task or a buffer of its own.
//!
//! # Modules
//!
//! - [`pb`]: generated types and gRPC stubs (checked in; a test regenerates
//!   them with pure-Rust tools, so builds need no `protoc`);
//! - [`codec`]: the gRPC codec, with small initial buffers per stream;
//! - [`h2`]: HTTP/2 connections in either role, and their settings;
//! - [`relay`]: the one relay loop between a TCP socket and a tunnel stream;
//! - [`client`]: the client library (sidecars, tools, the benchmark);
//! - [`error`]: typed errors;
//! - [`tls`], [`identity`], [`certs`]: TLS 1.3 with the ring provider, the
//!   identities in certificates, and the certificate command;
//! - [`net`]: socket options; [`backoff`]: reconnection delays;
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`; [`cli`]: shared command-line pieces.

pub mod admin;
pub mod backoff;
pub mod certs;
pub mod cli;
pub mod client;
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

/// Largest gRPC message we accept: a data frame holds at most
/// [`relay::MAX_READ`] bytes; the margin leaves room for framing.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
