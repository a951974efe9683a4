//! The `Agent` service: answers the server's hello and dials destinations.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::net::TcpStream;
use tonic::{Request, Response, Status, Streaming};
use tunnel_proto::error::{ErrorCode, TunnelError, dial_error};
use tunnel_proto::pb::{self, Frame, agent_server::Agent as AgentRpc, frame::Kind};
use tunnel_proto::relay::relay_tcp;

use crate::allowlist::Allowlist;
use crate::metrics::{AgentMetrics, CodeLabel, DirectionLabel};

/// How long the server may take to send `Open` on a new stream.
const OPEN_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// What every tunnel's service shares.
#[derive(Debug)]
pub struct DialerShared {
    /// This agent's id.
    pub agent_id: String,
    /// The cluster this agent serves.
    pub cluster: String,
    /// Destinations that may be dialed.
    pub allowlist: Allowlist,
    /// Longest time to resolve and connect to a destination.
    pub dial_timeout: Duration,
    /// Names answered before DNS, like /etc/hosts (lower-case names).
    pub host_aliases: std::collections::HashMap<String, IpAddr>,
    /// Metrics.
    pub metrics: AgentMetrics,
}

/// The service on one tunnel.
#[derive(Clone, Debug)]
pub struct AgentService {
    shared: Arc<DialerShared>,
    /// Set when the server said hello on this tunnel: the tunnel is usable.
    pub hello: Arc<tokio::sync::Notify>,
    said_hello: Arc<AtomicBool>,
}

impl AgentService {
    /// A service for one new tunnel.
    pub fn new(shared: Arc<DialerShared>) -> Self {
        Self {
            shared,
            hello: Arc::new(tokio::sync::Notify::new()),
            said_hello: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the server said hello on this tunnel.
    pub fn is_up(&self) -> bool {
        self.said_hello.load(Ordering::Acquire)
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

fn single(frame: Frame) -> FrameStream {
    Box::pin(futures_util::stream::once(async move { Ok(frame) }))
}

impl DialerShared {
    /// Resolves and connects to `host:port`, within the allowlist and the timeout.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), TunnelError> {
        let dest = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        self.allowlist
            .check_request(host, port)
            .map_err(|d| TunnelError::new(ErrorCode::DestinationNotAllowed, d.to_string()))?;
        let attempt = async {
            let alias = self
                .host_aliases
                .get(&host.trim_end_matches('.').to_ascii_lowercase());
            let addrs: Vec<SocketAddr> = match (host.parse::<IpAddr>(), alias) {
                (Ok(ip), _) | (Err(_), Some(&ip)) => vec![SocketAddr::new(ip, port)],
                (Err(_), None) => tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| {
                        TunnelError::new(ErrorCode::DnsFailure, format!("resolve {host}: {e}"))
                    })?
                    .collect(),
            };
            if addrs.is_empty() {
                return Err(TunnelError::new(
                    ErrorCode::DnsFailure,
                    format!("resolve {host}: no addresses"),
                ));
            }
            let mut denied = None;
            let mut last = None;
            for addr in addrs {
                if let Err(d) = self.allowlist.check_resolved(host, addr) {
                    denied.get_or_insert(d);
                    continue;
                }
                match TcpStream::connect(addr).await {
                    Ok(tcp) => return Ok((tcp, addr)),
                    Err(e) => last = Some(dial_error(&format!("{dest} ({addr})"), &e)),
                }
            }
            Err(last.unwrap_or_else(|| {
                TunnelError::new(
                    ErrorCode::DestinationNotAllowed,
                    denied
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| format!("{dest} is not allowed")),
                )
            }))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(res) => res,
            Err(_) => Err(TunnelError::new(
                ErrorCode::DialTimeout,
                format!("dial {dest}: no answer within {timeout:?}"),
            )),
        }
    }
}

#[tonic::async_trait]
impl AgentRpc for AgentService {
    type DialStream = FrameStream;

    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let server_id = req.into_inner().server_id;
        if !self.said_hello.swap(true, Ordering::AcqRel) {
            tracing::info!(server = %server_id, "tunnel up");
            self.hello.notify_waiters();
        }
        Ok(Response::new(pb::HelloResponse {
            agent_id: self.shared.agent_id.clone(),
            cluster: self.shared.cluster.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn dial(&self, req: Request<Streaming<Frame>>) -> Result<Response<FrameStream>, Status> {
        let shared = &self.shared;
        let mut inbound = req.into_inner();
        let open = match tokio::time::timeout(OPEN_FRAME_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(Frame {
                kind: Some(Kind::Open(open)),
            }))) => open,
            Ok(Err(status)) => return Err(status),
            _ => {
                let err = TunnelError::new(ErrorCode::BadRequest, "the first frame must be open");
                return Ok(Response::new(single(err.to_frame())));
            }
        };
        let id = uuid::Uuid::from_slice(&open.connection_id).unwrap_or_default();
        let Some(port) = u16::try_from(open.port).ok().filter(|p| *p != 0) else {
            let err =
                TunnelError::new(ErrorCode::BadRequest, format!("invalid port {}", open.port));
            return Ok(Response::new(single(err.to_frame())));
        };
        let timeout = match open.dial_timeout_ms {
            0 => shared.dial_timeout,
            ms => Duration::from_millis(u64::from(ms)).min(shared.dial_timeout),
        };
        let started = Instant::now();
        let dialed = shared.dial(&open.host, port, timeout).await;
        shared
            .metrics
            .dial_latency
            .observe(started.elapsed().as_secs_f64());
        match dialed {
            Ok((tcp, peer)) => {
                shared
                    .metrics
                    .dials
                    .get_or_create(&CodeLabel { code: "ok" })
                    .inc();
                tunnel_proto::net::set_nodelay_or_warn(&tcp);
                let (outbound, done) = relay_tcp(tcp, bytes::Bytes::new(), inbound);
                let metrics = shared.metrics.clone();
                metrics.open_connections.inc();
                let host = open.host.clone();
                tokio::spawn(async move {
                    let outcome = done.await;
                    metrics.open_connections.dec();
                    metrics
                        .bytes
                        .get_or_create(&DirectionLabel {
                            direction: "from_destination",
                        })
                        .inc_by(outcome.sent);
                    metrics
                        .bytes
                        .get_or_create(&DirectionLabel {
                            direction: "to_destination",
                        })
                        .inc_by(outcome.received);
                    tracing::debug!(%id, destination = %host, port, %peer, ?outcome, duration_ms = started.elapsed().as_millis() as u64, "connection closed");
                });
                let opened = Frame {
                    kind: Some(Kind::Opened(pb::Opened {
                        agent_id: shared.agent_id.clone(),
                        peer: peer.to_string(),
                    })),
                };
                let out = futures_util::stream::once(async move { opened })
                    .chain(outbound)
                    .map(Ok);
                Ok(Response::new(Box::pin(out)))
            }
            Err(err) => {
                shared
                    .metrics
                    .dials
                    .get_or_create(&CodeLabel {
                        code: err.code.label(),
                    })
                    .inc();
                tracing::info!(%id, destination = %open.host, port, code = err.code.label(), %err, "dial failed");
                Ok(Response::new(single(err.to_frame())))
            }
        }
    }
}
