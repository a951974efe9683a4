//! The cluster-tunnel sidecar: runs beside an application in a hub pod and
//! gives it every managed cluster without a change to its code.
//!
//! - per-cluster loopback ports: plain TCP to `127.0.0.1:<port>` reaches a
//!   fixed destination in one cluster (see [`tunnel_api::sidecar::PortMapping`]);
//! - [`http_proxy`]: one loopback HTTP proxy for `HTTP_PROXY`/`HTTPS_PROXY`
//!   that decides per request: names in a cluster (as [`names`] describes)
//!   go through the tunnel, everything else is dialed from the pod
//!   ([`direct`]), so hub traffic works as before the injection;
//! - [`clusters`]: the server's cluster list, refreshed in the background;
//! - [`config`]: flags, environment variables and an optional TOML file;
//! - [`metrics`]: the Prometheus metrics;
//! - an admin port with `/healthz`, `/readyz` (ready once every listener is
//!   bound, whether or not a server is reachable, so that pods start during
//!   a hub outage; its body, `ready; server: connected` or `ready; server:
//!   not connected`, and `tunnel_sidecar_server_connected` say whether one
//!   is), `/metrics` and `POST /shutdown` (loopback to loopback only);
//! - [`cli`]: the binary's `main`, and `tunnel-sidecar probe readyz|healthz`
//!   and `wait-ready`: the exec probe and the legacy `postStart` hook, which
//!   ask the admin port on loopback.

pub mod cli;
pub mod clusters;
pub mod config;
pub mod direct;
pub mod http_proxy;
pub mod metrics;
pub mod names;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_proto::client::{ClientOptions, TunnelClient};
use tunnel_proto::h2::H2Settings;
use tunnel_proto::net::Liveness;

use crate::clusters::ClusterCache;
use crate::config::SidecarConfig;
use crate::http_proxy::{ProxyLimits, ProxyState};
use crate::metrics::{RequestLabel, SidecarMetrics};

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    /// The HTTP proxy's address, if enabled.
    pub proxy_addr: Option<SocketAddr>,
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    /// Each per-cluster port's address, in configuration order.
    pub port_addrs: Vec<SocketAddr>,
    /// Cancelled by `POST /shutdown`.
    pub shutdown_requested: CancellationToken,
    clusters: Arc<ClusterCache>,
    /// Stops every listener; cancelled too when the sidecar is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The certificate files do not load.
    #[error(transparent)]
    Tls(#[from] tunnel_proto::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        /// Which listener.
        what: String,
        /// Its address.
        addr: SocketAddr,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the socket buffer size of a listener.
    #[error("cannot set the socket buffers of {what} {addr} to {bytes} bytes: {source}")]
    SocketBuffer {
        /// Which listener.
        what: String,
        /// Its address.
        addr: SocketAddr,
        /// The size asked for.
        bytes: usize,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A bound listener's address could not be read.
    #[error("cannot read the address of a listener: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// The address `listener` is bound to.
fn bound(listener: &TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(StartError::LocalAddr)
}

/// Accept queue of the sidecar's listeners. tokio's `TcpListener::bind` uses
/// 128, too short for an app that opens hundreds of connections at once: the
/// kernel drops SYNs (1 s retransmits) or falls back to SYN cookies, which
/// can reset connections. Linux caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for app connections; `socket_buffer` (bytes, 0 = the
/// kernel's autotuning) caps the kernel buffers of every connection it
/// accepts (they inherit the listener's).
async fn bind(
    addr: SocketAddr,
    what: &str,
    socket_buffer: usize,
) -> Result<TcpListener, StartError> {
    let l = bind_listener(addr, what, !addr.ip().is_loopback()).await?;
    if socket_buffer > 0 {
        tunnel_proto::net::cap_socket_buffers(&l, socket_buffer).map_err(|source| {
            StartError::SocketBuffer {
                what: what.to_owned(),
                addr,
                bytes: socket_buffer,
                source,
            }
        })?;
    }
    Ok(l)
}

async fn bind_listener(
    addr: SocketAddr,
    what: &str,
    warn_exposed: bool,
) -> Result<TcpListener, StartError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let l = listen().map_err(|source| StartError::Listen {
        what: what.to_owned(),
        addr,
        source,
    })?;
    if warn_exposed {
        tracing::warn!(%addr, what, "listening beyond loopback: anyone who can reach this address can reach the clusters");
    }
    Ok(l)
}

impl Sidecar {
    /// Binds every listener, then serves.
    pub async fn start(config: SidecarConfig) -> Result<Self, StartError> {
        let tls = tunnel_proto::tls::ClientTls::client(config.tls.clone())?;
        let client = Arc::new(TunnelClient::new(ClientOptions {
            servers: config.servers.clone(),
            server_name: config.server_name.clone(),
            tls,
            h2: H2Settings {
                liveness: Liveness::from_timeout(config.dead_peer_timeout),
                ..H2Settings::default()
            },
            connect_timeout: tunnel_proto::client::DEFAULT_CONNECT_TIMEOUT,
            open_timeout: config.open_timeout,
            token_file: config.token_file.clone(),
        }));
        let mut registry = Registry::default();
        let metrics = SidecarMetrics::register(&mut registry);
        let clusters = Arc::new(ClusterCache::new(
            metrics.server_connected.clone(),
            &config.known_clusters,
        ));
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        // Bind everything first so that a clash fails start-up, not later.
        // Health and metrics only: no warning beyond loopback.
        let admin_l = bind_listener(config.admin_listen, "admin address", false).await?;
        let proxy_l = match config.proxy_listen {
            Some(a) => Some(bind(a, "proxy address", config.socket_buffer).await?),
            None => None,
        };
        let mut port_ls = Vec::new();
        for m in &config.ports {
            let addr = SocketAddr::new(config.bind_address, m.port);
            let target = config::target_of(m);
            port_ls.push((
                bind(addr, &format!("port for {target}"), config.socket_buffer).await?,
                target,
            ));
        }

        let admin_addr = bound(&admin_l)?;
        let proxy_addr = proxy_l.as_ref().map(bound).transpose()?;
        let port_addrs = port_ls
            .iter()
            .map(|(l, _)| bound(l))
            .collect::<Result<Vec<_>, _>>()?;

        let shutdown_requested = CancellationToken::new();
        // Ready once bound (every listener is, by now): connections made
        // while no server is reachable get a typed error, and direct ones
        // work, so an outage of the hub never holds a pod's start.
        // The body says whether a server is reachable now (`tunnel-sidecar
        // probe readyz` prints it); the status does not wait for one.
        let cl = clusters.clone();
        let admin = tunnel_shell::admin::AdminServer::new(Arc::new(registry), Arc::new(|| true))
            .with_ready_detail(Arc::new(move || {
                if cl.is_connected() {
                    "server: connected".to_owned()
                } else {
                    "server: not connected".to_owned()
                }
            }))
            .with_shutdown_endpoint(shutdown_requested.clone());
        let admin_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = admin.serve(admin_l, admin_stop).await {
                tracing::error!(%err, "admin server failed");
            }
        }));

        let (c, cl, stopped, every) = (
            client.clone(),
            clusters.clone(),
            stop.clone().cancelled_owned(),
            config.cluster_refresh,
        );
        tasks.push(tokio::spawn(
            async move { cl.run(&c, every, stopped).await },
        ));

        for (listener, target) in port_ls {
            let m = metrics.clone();
            let observe = move |ev: tunnel_proto::client::PortEvent<'_>| {
                let code = match ev {
                    Ok(_) => "ok",
                    Err(e) => e.code.label(),
                };
                m.requests
                    .get_or_create(&RequestLabel { kind: "port", code })
                    .inc();
            };
            tracing::info!(addr = %bound(&listener)?, %target, "per-cluster port");
            tasks.push(tokio::spawn(tunnel_proto::client::serve_port(
                listener,
                client.clone(),
                target,
                observe,
                stop.clone().cancelled_owned(),
            )));
        }

        if let Some(listener) = proxy_l {
            let state = Arc::new(ProxyState {
                client: client.clone(),
                naming: config.naming.clone(),
                clusters: clusters.clone(),
                direct: config.direct.clone(),
                list_timeout: config.open_timeout,
                metrics: metrics.clone(),
            });
            let limits = ProxyLimits {
                header_timeout: config.header_timeout,
                max_header_bytes: config.max_header_bytes,
                max_headers: config.max_headers,
            };
            tracing::info!(addr = %bound(&listener)?, "HTTP proxy");
            tasks.push(tokio::spawn(http_proxy::serve(
                listener,
                state,
                limits,
                stop.clone().cancelled_owned(),
            )));
        }
        tracing::info!(%admin_addr, servers = ?config.servers, direct = config.direct.policy.as_str(), "tunnel sidecar started");
        Ok(Self {
            proxy_addr,
            admin_addr,
            port_addrs,
            shutdown_requested,
            clusters,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            tasks,
        })
    }

    /// Whether the sidecar reaches a tunnel server now (its readiness does
    /// not wait for this).
    pub fn is_connected(&self) -> bool {
        self.clusters.is_connected()
    }

    /// Stops every listener; open tunnelled connections end with the process.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        tracing::info!("tunnel sidecar stopped");
    }
}
