//! The cluster-tunnel wire protocol and the client library.
//!
//! This crate is what a program needs to speak the tunnel's protocol: the
//! server, the agent, the sidecar, and any app or tool that embeds the
//! client. What makes a component a program (flags, logging, signals, the
//! admin server) is `tunnel_shell`'s; identities and certificates are
//! `tunnel_identity`'s.
//!
//! # The protocol
//!
//! HTTP/2 over TLS 1.3 (mutual). Every proxied TCP connection is **one raw
//! HTTP/2 stream on each leg**: client -> server and server -> agent, opened
//! by a `CONNECT` request whose headers carry the open and answered by
//! response headers ([`stream`] has the exact headers). Payload travels as
//! HTTP/2 DATA frames, untouched: no message framing, no per-message
//! decode/encode, no copy at the server, which hands each received buffer to
//! the other leg. END_STREAM is a half-close (FIN) of one direction, and
//! RST_STREAM an abort (RST) of both. HTTP/2 flow control is per stream, so a
//! stalled reader holds back only its own connection; nothing multiplexes
//! connections inside one stream (the head-of-line blocking of
//! apiserver-network-proxy, its issues #180 and #881), and the connection
//! window is never the limit ([`h2`] explains the windows). The few calls
//! that are not connections (the agent's hello, the cluster list) are gRPC
//! (`proto/tunnel.proto`) on the same connections ([`grpc`]).
//!
//! **Reversed roles on the agent leg.** The agent dials the server (the hub
//! can never dial into a managed cluster), yet the server must open a stream
//! per connection towards the agent. We chose to reverse HTTP/2 roles on that
//! TLS connection: the agent, TLS client, is the HTTP/2 *server*; the
//! server, TLS server, is the HTTP/2 *client* and sends one `CONNECT` per
//! connection. The alternative — a control stream on which the server asks
//! and the agent opens a stream back — costs an extra round trip per
//! connection, a second correlation mechanism and a failure mode where the
//! request and the data stream race. With reversed roles, opening a
//! connection is one HEADERS frame, and the stream *is* the connection: its
//! id, its flow control, its reset.
//!
//! **Errors.** A refused open carries an [`error::ErrorCode`] (as its label)
//! and a message: callers branch on the code, never on text.
//!
//! **Liveness.** HTTP/2 PING keepalive with a timeout on every tunnel
//! connection, plus TCP keepalive and `TCP_USER_TIMEOUT` on the socket
//! ([`net::Liveness`]): a dead peer is found within the configured time
//! (20 s by default), not after the kernel's retransmissions give up.
//!
//! # Modules
//!
//! - [`pb`]: generated types and gRPC stubs (checked in; a test regenerates
//!   them with pure-Rust tools, so builds need no `protoc`);
//! - [`h2`]: HTTP/2 connections in either role, their settings and windows;
//! - [`stream`]: how a tunnel stream is opened and answered;
//! - [`relay`]: the one relay loop between a TCP socket and a tunnel stream,
//!   and the splice between two streams;
//! - [`grpc`]: the control RPCs over the same connections;
//! - [`http_forward`]: an HTTP proxy's part in one request (the sidecar's
//!   HTTP proxy, the server's HTTP CONNECT entry);
//! - [`konnectivity`]: apiserver-network-proxy's konnectivity protocol on the
//!   wire, which the server also accepts from clients;
//! - [`client`]: the client library (sidecars, tools, the benchmark);
//! - [`error`]: typed errors;
//! - [`tls`]: TLS 1.3 with the ring provider; the identities in certificates
//!   are `tunnel_identity::spiffe`'s;
//! - [`net`]: socket options; [`backoff`]: reconnection delays;
//! - [`version`]: what `--version` prints (crate version and git revision).

pub mod backoff;
pub mod client;
pub mod error;
pub mod grpc;
pub mod h2;
pub mod http_forward;
pub mod konnectivity;
pub mod net;
pub mod relay;
pub mod stream;
pub mod tls;
pub mod version;

/// Generated protocol types and gRPC stubs (`proto/tunnel.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!("gen/clustertunnel.v1.rs");
}

/// Largest `--server-count`: the most server replicas behind one address an
/// agent keeps tunnels to. The server refuses a larger count at start; an
/// agent told a larger one by an older server keeps this many.
pub const MAX_SERVER_COUNT: u32 = 64;

/// Largest control (gRPC) message we accept.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
