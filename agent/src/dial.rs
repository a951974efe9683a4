//! What the server asks of the agent on a tunnel: the `Agent` control
//! service (hello, leave) and each proxied connection's `CONNECT` stream
//! ([`AgentService::serve_stream`]: acknowledge, check the allowlist, dial,
//! answer, relay).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tunnel_proto::error::{ErrorCode, TunnelError, dial_error};
use tunnel_proto::h2::StreamGuard;
use tunnel_proto::pb::{self, agent_server::Agent as AgentRpc};
use tunnel_proto::relay::{TunnelStream, relay_tcp};
use tunnel_proto::stream::{Open, Opened, error_response, opened_response};

use crate::allowlist::Allowlist;
use crate::metrics::{AgentMetrics, CodeLabel, DirectionLabel};
use crate::servers::{Claim, Duplicate, ServerRegistry};

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
    /// Keepalive and user timeout for destination sockets.
    pub liveness: tunnel_proto::net::Liveness,
    /// Kernel send and receive buffer of each destination socket, in bytes;
    /// 0 leaves them to the kernel's autotuning (`--socket-buffer`).
    pub socket_buffer: usize,
}

/// What the server's hello on a tunnel said, handed to the task that opened
/// the tunnel.
#[derive(Debug)]
pub struct Hello {
    /// The server replica's id.
    pub server_id: String,
    /// The number of replicas the server said there are (0: not told).
    pub server_count: u32,
    /// The tunnel's hold on the server id, or why it was refused.
    pub admission: Result<Claim, Duplicate>,
}

/// Decides, at the server's first hello on a tunnel, whether the tunnel may
/// stay (see [`crate::servers`]) and tells the tunnel's task.
#[derive(Debug)]
pub struct HelloGate {
    registry: Arc<ServerRegistry>,
    entry: Arc<str>,
    told: Mutex<Option<oneshot::Sender<Hello>>>,
    duplicate: AtomicBool,
}

impl HelloGate {
    /// A gate for one tunnel opened through the `--server` entry `entry`;
    /// `told` receives the first hello's [`Hello`].
    pub fn new(
        registry: Arc<ServerRegistry>,
        entry: Arc<str>,
        told: oneshot::Sender<Hello>,
    ) -> Self {
        Self {
            registry,
            entry,
            told: Mutex::new(Some(told)),
            duplicate: AtomicBool::new(false),
        }
    }

    /// Admits or refuses the tunnel at a hello; a repeated hello gets the
    /// first one's answer.
    fn decide(&self, hello: &pb::HelloRequest) -> Result<(), Duplicate> {
        let duplicate = || Duplicate {
            server_id: hello.server_id.clone(),
        };
        // Held to the end, so that a concurrent hello sees the decision made.
        let mut pending = self.told.lock().unwrap_or_else(|e| e.into_inner());
        let Some(told) = pending.take() else {
            if self.duplicate.load(Ordering::Acquire) {
                return Err(duplicate());
            }
            return Ok(());
        };
        let admission = self
            .registry
            .admit(&self.entry, &hello.server_id, hello.server_count);
        let refused = admission.as_ref().err().cloned();
        self.duplicate.store(refused.is_some(), Ordering::Release);
        // Without a receiver the tunnel's task is gone: the claim is dropped with it.
        let _ = told.send(Hello {
            server_id: hello.server_id.clone(),
            server_count: hello.server_count,
            admission,
        });
        refused.map_or(Ok(()), Err)
    }
}

/// The service on one tunnel.
#[derive(Clone, Debug)]
pub struct AgentService {
    shared: Arc<DialerShared>,
    gate: Option<Arc<HelloGate>>,
    said_hello: Arc<AtomicBool>,
    /// Cancelled when the server asks the agent to leave (it is shutting down).
    leave: CancellationToken,
}

impl AgentService {
    /// A service for one new tunnel that accepts every server's hello.
    pub fn new(shared: Arc<DialerShared>) -> Self {
        Self {
            shared,
            gate: None,
            said_hello: Arc::new(AtomicBool::new(false)),
            leave: CancellationToken::new(),
        }
    }

    /// A service for one new tunnel whose hello `gate` admits or refuses.
    pub fn with_gate(shared: Arc<DialerShared>, gate: HelloGate) -> Self {
        Self {
            gate: Some(Arc::new(gate)),
            ..Self::new(shared)
        }
    }

    /// Whether the server said hello on this tunnel and the tunnel was admitted.
    pub fn is_up(&self) -> bool {
        self.said_hello.load(Ordering::Acquire)
    }

    /// Cancelled when the server asks the agent to leave this tunnel.
    pub fn leave_signal(&self) -> CancellationToken {
        self.leave.clone()
    }
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
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let hello = req.into_inner();
        if let Some(gate) = &self.gate
            && let Err(duplicate) = gate.decide(&hello)
        {
            tracing::debug!(server = %hello.server_id, "hello from a server this agent already holds a tunnel to; refusing the duplicate");
            return Err(Status::already_exists(duplicate.to_string()));
        }
        if !self.said_hello.swap(true, Ordering::AcqRel) {
            tracing::debug!(server = %hello.server_id, server_count = hello.server_count, "server said hello");
        }
        Ok(Response::new(pb::HelloResponse {
            agent_id: self.shared.agent_id.clone(),
            cluster: self.shared.cluster.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            acknowledges_opens: true,
        }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let server = req.into_inner().server_id;
        tracing::info!(%server, "the server is shutting down; looking for another replica, this tunnel stays until the server closes it");
        self.leave.cancel();
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

impl AgentService {
    /// Serves one stream the server opened: dials its destination, answers,
    /// and relays until both directions ended.
    pub async fn serve_stream(
        &self,
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        guard: StreamGuard,
    ) {
        let shared = &self.shared;
        let open = match Open::from_request(&req) {
            Ok(open) => open,
            Err(err) => {
                tracing::warn!(code = err.code.label(), %err, "the server opened a bad stream");
                let _ = respond.send_response(error_response(&err), true);
                return;
            }
        };
        let id = open.id;
        // Read: say so before dialing, so that the server can tell a slow
        // destination from an agent that does not answer.
        if let Err(err) = respond.send_informational(tunnel_proto::stream::ack_response()) {
            tracing::debug!(%id, %err, "the server went away before the acknowledgement");
            return;
        }
        let timeout = open
            .dial_timeout
            .map_or(shared.dial_timeout, |t| t.min(shared.dial_timeout));
        let started = Instant::now();
        let dialed = tokio::select! {
            // First: a stream reset before we got to it (the server gave up
            // waiting for us, or the client went away) is never dialed.
            biased;
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
            d = shared.dial(&open.host, open.port, timeout) => d,
        };
        shared
            .metrics
            .dial_latency
            .observe(started.elapsed().as_secs_f64());
        let (tcp, peer) = match dialed {
            Ok(x) => x,
            Err(err) => {
                shared
                    .metrics
                    .dials
                    .get_or_create(&CodeLabel {
                        code: err.code.label(),
                    })
                    .inc();
                tracing::info!(%id, destination = %open.host, port = open.port, code = err.code.label(), %err, "dial failed");
                let _ = respond.send_response(error_response(&err), true);
                return;
            }
        };
        shared
            .metrics
            .dials
            .get_or_create(&CodeLabel { code: "ok" })
            .inc();
        // No Nagle delay, and a vanished destination is found in bounded
        // time: by TCP keepalive when idle, by the relay's peer watch while
        // it owes an answer for what was written to it (not
        // TCP_USER_TIMEOUT, which would also reset a live destination that
        // merely stops reading).
        tunnel_proto::net::tune_destination_socket(&tcp, &shared.liveness);
        if shared.socket_buffer > 0
            && let Err(err) = tunnel_proto::net::cap_socket_buffers(&tcp, shared.socket_buffer)
        {
            tracing::warn!(%id, %err, "cannot cap the destination socket's buffers");
        }
        let opened = Opened {
            agent_id: shared.agent_id.clone(),
            peer: peer.to_string(),
        };
        let send = match respond.send_response(opened_response(&opened), false) {
            Ok(send) => send,
            Err(err) => {
                tracing::debug!(%id, %err, "the server went away before the answer");
                return;
            }
        };
        let stream = TunnelStream::new(send, req.into_body(), guard);
        let metrics = shared.metrics.clone();
        metrics.open_connections.inc();
        let outcome = relay_tcp(
            tcp,
            Bytes::new(),
            stream,
            Some(shared.liveness.dead_peer_timeout),
        )
        .await;
        metrics.open_connections.dec();
        if outcome.peer_gone {
            metrics.destinations_gone.inc();
        }
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
        tracing::debug!(%id, destination = %open.host, port = open.port, %peer, ?outcome, duration_ms = started.elapsed().as_millis() as u64, "connection closed");
    }
}
