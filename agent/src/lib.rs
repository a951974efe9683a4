//! The cluster-tunnel agent: runs in a managed cluster, keeps a reverse
//! tunnel to every proxy server replica, and dials destinations on request.
//!
//! - [`tunnels`]: dials out to each server address (re-resolving DNS names so
//!   that every replica gets a tunnel), reconnects with backoff, forever.
//! - [`servers`]: which server replicas (by id) the agent holds tunnels to, so
//!   that one load-balanced address yields a tunnel to every replica.
//! - [`dial`]: what the server asks on each tunnel: its control calls
//!   (`Agent.Hello`, `Agent.Leave`) and one `CONNECT` stream per proxied
//!   connection, acknowledged, checked against the allowlist, dialed and
//!   relayed.
//! - [`allowlist`]: which destinations may be dialed.
//! - [`proxy`]: the connection to a server through an HTTP proxy (`CONNECT`,
//!   `HTTPS_PROXY` and `NO_PROXY`), before the TLS handshake.
//! - [`metrics`]: Prometheus metrics on the admin port.
//! - [`addon_lease`]: the open-cluster-management addon's health Lease,
//!   renewed while the agent holds a tunnel.
//! - [`join`]: joining a hub without open-cluster-management: the key made
//!   here, a certificate request to the hub, renewed at a fifth of its life.
//! - [`cli`]: the binary's command line.

pub mod addon_lease;
pub mod allowlist;
pub mod cli;
pub mod dial;
pub mod join;
pub mod metrics;
pub mod proxy;
pub mod servers;
pub mod tunnels;

pub use tunnels::{Agent, AgentConfig, StartError};
