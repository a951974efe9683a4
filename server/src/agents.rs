//! The two tunnel ports: agents dial in on one (reverse tunnels), clients on
//! the other. Both are mTLS; the identity in the peer's certificate decides
//! what it may do, so an agent cannot claim another cluster's name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tunnel_identity::spiffe::{Identity, peer_identity};
use tunnel_proto::grpc::GrpcChannel;
use tunnel_proto::h2::{H2Server, PeerInfo, client_handshake};
use tunnel_proto::net::LingeringClose;
use tunnel_proto::pb;
use tunnel_proto::pb::agent_client::AgentClient;
use tunnel_proto::pb::tunnel_server::TunnelServer;

use crate::http_connect::{ClientPortTls, ClientProtocol, client_protocol};
use crate::metrics::{ClusterLabel, RejectLabel};
use crate::pool::AgentTunnel;
use crate::tunnel::TunnelService;
use crate::{HANDSHAKE_TIMEOUT, ServerState};

/// Time an agent gets to answer the server's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts with backoff on errors (e.g. out of file descriptors) and stops
/// when `stop` is cancelled. Connection tasks end with the returned set.
async fn accept_loop<F, Fut>(listener: TcpListener, stop: CancellationToken, mut handle: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            res = listener.accept() => match res {
                Ok((tcp, peer)) => { conns.spawn(handle(tcp, peer)); }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    // Open connections keep running until the process (or test) ends them.
    while conns.join_next().await.is_some() {}
}

/// TLS handshake and identity check shared by both ports.
async fn handshake(
    state: &ServerState,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &'static str,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
    tls: Arc<rustls::ServerConfig>,
) -> Option<(TlsStream<LingeringClose>, Identity)> {
    tunnel_proto::net::tune_tunnel_socket(&tcp, &state.config.h2.liveness);
    // Closed with a linger, so that the peer reads our last frames before
    // our close could reset the connection; `closed` says when that is done.
    let tcp = match closed {
        Some(tx) => LingeringClose::with_signal(tcp, tx),
        None => LingeringClose::new(tcp),
    };
    let reject = |reason: &'static str| {
        state
            .metrics
            .rejected
            .get_or_create(&RejectLabel { listener, reason })
            .inc();
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            // Closed before a word was said: a TCP probe (load balancer, kubelet).
            tracing::debug!(%peer, listener, "connection closed before the TLS handshake");
            return None;
        }
        Ok(Err(err)) => {
            tracing::warn!(%peer, listener, %err, "TLS handshake failed; connection refused");
            reject("tls");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, listener, "TLS handshake timed out; connection refused");
            reject("tls");
            return None;
        }
    };
    let identity = tunnel_proto::tls::peer_leaf(tls.get_ref().1)
        .ok_or_else(|| "no client certificate".to_owned())
        .and_then(|leaf| {
            peer_identity(leaf.as_ref(), &state.config.trust_domain).map_err(|e| e.to_string())
        });
    match identity {
        Ok(id) => Some((tls, id)),
        Err(err) => {
            tracing::warn!(%peer, listener, %err, "certificate carries no usable identity; connection refused");
            reject("identity");
            None
        }
    }
}

/// Serves the agent port until `leave` (the server is shutting down): then
/// the port closes and every agent is asked to open a tunnel to another
/// replica; the tunnels close at `stop`, once their connections have ended.
pub async fn accept_agents(
    listener: TcpListener,
    state: Arc<ServerState>,
    leave: CancellationToken,
    stop: CancellationToken,
) {
    let leave_conn = leave.clone();
    accept_loop(listener, leave, move |tcp, peer| {
        let state = state.clone();
        let stop = stop.clone();
        let leave = leave_conn.clone();
        async move { serve_agent(state, tcp, peer, leave, stop).await }
    })
    .await;
}

/// Asks the agent on `client` to leave (see `Agent.Leave`), within [`HELLO_TIMEOUT`].
async fn ask_to_leave(
    mut client: AgentClient<GrpcChannel>,
    server_id: String,
    peer: SocketAddr,
    agent: String,
) {
    let asked =
        tokio::time::timeout(HELLO_TIMEOUT, client.leave(pb::LeaveRequest { server_id })).await;
    match asked {
        Ok(Ok(_)) => tracing::debug!(%peer, %agent, "agent told to find another replica"),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            tracing::debug!(%peer, %agent, "an older agent: it finds another replica once this tunnel closes")
        }
        Ok(Err(status)) => {
            tracing::warn!(%peer, %agent, %status, "could not tell the agent to leave")
        }
        Err(_) => tracing::warn!(%peer, %agent, "the agent did not answer the request to leave"),
    }
}

/// While `tunnel`'s agent is failing, asks it for a hello (cheap, no
/// destination) after each backoff, within the acknowledgement timeout; the
/// first answer makes it usable again. Runs until aborted.
async fn check_when_failing(
    tunnel: Arc<AgentTunnel>,
    client: AgentClient<GrpcChannel>,
    hello: pb::HelloRequest,
    within: Duration,
) {
    loop {
        tunnel.failed.notified().await;
        while tunnel.is_failing() {
            tokio::time::sleep(tunnel.check_delay()).await;
            if !tunnel.is_failing() {
                // An answered open ended it meanwhile.
                break;
            }
            let answered = tokio::time::timeout(within, client.clone().hello(hello.clone())).await;
            if matches!(answered, Ok(Ok(_))) {
                tunnel.recovered();
                tracing::info!(agent = %tunnel.agent_id, cluster = %tunnel.cluster, "the failing agent answers again; it is picked again");
            } else {
                tracing::debug!(agent = %tunnel.agent_id, cluster = %tunnel.cluster, "the failing agent still does not answer");
            }
        }
    }
}

async fn serve_agent(
    state: Arc<ServerState>,
    tcp: TcpStream,
    peer: SocketAddr,
    leave: CancellationToken,
    stop: CancellationToken,
) {
    // The socket is closed (after lingering) when HTTP/2 is done with it,
    // which tells a draining server its last frames went out.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let config = state.config.tls.current();
    let Some((tls, identity)) =
        handshake(&state, tcp, peer, "agent", Some(closed_tx), config).await
    else {
        return;
    };
    let Identity::Agent { cluster } = identity else {
        tracing::warn!(%peer, %identity, "only agent certificates may connect to the agent port; connection refused");
        state
            .metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: "agent",
                reason: "identity",
            })
            .inc();
        return;
    };
    // With --clusters-from-ocm: only accepted ManagedClusters with the addon.
    let mut admitted = state.ocm_admitted.clone();
    if let Some(rx) = admitted.as_mut()
        && let Some(why) = crate::ocm_clusters::refusal(rx, &cluster, HELLO_TIMEOUT).await
    {
        tracing::warn!(%peer, %cluster, why, "agent refused");
        state
            .metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: "agent",
                reason: "cluster",
            })
            .inc();
        return;
    }
    let (channel, driver) = match client_handshake(tls, &state.config.h2).await {
        Ok(x) => x,
        Err(err) => {
            tracing::warn!(%peer, %cluster, %err, "HTTP/2 handshake with agent failed");
            state
                .metrics
                .rejected
                .get_or_create(&RejectLabel {
                    listener: "agent",
                    reason: "http2",
                })
                .inc();
            return;
        }
    };
    let driver = tokio::spawn(driver);
    let mut client = AgentClient::with_origin(
        GrpcChannel::new(channel.clone()),
        http::Uri::from_static("https://cluster-tunnel.agent"),
    );
    let hello_request = pb::HelloRequest {
        server_id: state.config.server_id.clone(),
        server_count: state.config.server_count,
    };
    let hello = tokio::time::timeout(HELLO_TIMEOUT, client.hello(hello_request.clone())).await;
    let hello = match hello {
        Ok(Ok(resp)) => resp.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
            // The agent reached this replica through a load balancer although
            // it holds a tunnel to it already; it retries for another replica.
            tracing::debug!(%peer, %cluster, message = %status.message(), "agent already holds a tunnel to this server; duplicate connection closed");
            driver.abort();
            return;
        }
        Ok(Err(status)) => {
            tracing::warn!(%peer, %cluster, %status, "agent hello failed; connection refused");
            state
                .metrics
                .rejected
                .get_or_create(&RejectLabel {
                    listener: "agent",
                    reason: "hello",
                })
                .inc();
            driver.abort();
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %cluster, "agent did not answer hello; connection refused");
            state
                .metrics
                .rejected
                .get_or_create(&RejectLabel {
                    listener: "agent",
                    reason: "hello",
                })
                .inc();
            driver.abort();
            return;
        }
    };
    if !hello.cluster.is_empty() && hello.cluster != cluster {
        tracing::warn!(%peer, certificate_cluster = %cluster, claimed_cluster = %hello.cluster, "agent claims another cluster than its certificate; using the certificate's");
    }
    let agent_id = if hello.agent_id.is_empty() {
        peer.to_string()
    } else {
        hello.agent_id
    };
    let tunnel = Arc::new(AgentTunnel::new(
        agent_id.clone(),
        cluster.clone(),
        peer,
        channel,
        hello.acknowledges_opens,
    ));
    let n = state.pool.add(tunnel.clone());
    let gauge = state
        .metrics
        .agents
        .get_or_create(&ClusterLabel {
            cluster: cluster.clone(),
        })
        .clone();
    gauge.inc();
    tracing::info!(%peer, %cluster, agent = %agent_id, version = %hello.version, acknowledges_opens = hello.acknowledges_opens, agents_of_cluster = n, "agent connected");
    let checks = tokio::spawn(check_when_failing(
        tunnel.clone(),
        client.clone(),
        hello_request,
        state.config.ha.ack_timeout,
    ));
    let mut driver = driver;
    let mut revoked = false;
    let mut asked_to_leave = false;
    let res = loop {
        tokio::select! {
            res = &mut driver => break Some(res),
            () = stop.cancelled() => break None,
            () = crate::ocm_clusters::revoked(&mut admitted, &cluster) => { revoked = true; break None }
            () = leave.cancelled(), if !asked_to_leave => {
                // Shutting down: the agent opens a tunnel to another replica
                // while this one still serves (until `stop`).
                asked_to_leave = true;
                tokio::spawn(ask_to_leave(client.clone(), state.config.server_id.clone(), peer, agent_id.clone()));
            }
        }
    };
    checks.abort();
    let left = state.pool.remove(&tunnel);
    gauge.dec();
    if revoked {
        driver.abort();
        tracing::warn!(%peer, %cluster, agent = %agent_id, "the cluster is no longer an accepted ManagedCluster with the addon; agent tunnel closed");
        return;
    }
    let Some(res) = res else {
        // Shutting down: nothing new is routed here. The open connections hold
        // the last senders; once they end, HTTP/2 flushes and closes the connection.
        drop(client);
        drop(tunnel);
        let _ = closed_rx.await;
        tracing::info!(%peer, %cluster, agent = %agent_id, "agent tunnel closed for shutdown");
        return;
    };
    match res {
        Ok(Ok(())) => {
            tracing::info!(%peer, %cluster, agent = %agent_id, agents_of_cluster = left, "agent disconnected")
        }
        Ok(Err(err)) => {
            tracing::warn!(%peer, %cluster, agent = %agent_id, %err, agents_of_cluster = left, "agent tunnel failed")
        }
        Err(err) => tracing::debug!(%err, "agent tunnel task ended"),
    }
}

/// Serves the client port until `stop`; open client connections are then
/// drained (GOAWAY: no new streams, open ones run to their end).
pub async fn accept_clients(
    listener: TcpListener,
    state: Arc<ServerState>,
    stop: CancellationToken,
) {
    let stop_conn = stop.clone();
    let tls = Arc::new(ClientPortTls::default());
    accept_loop(listener, stop, move |tcp, peer| {
        let state = state.clone();
        let stop = stop_conn.clone();
        let tls = tls.config(state.config.tls.current());
        async move { serve_client(state, tcp, peer, stop, tls).await }
    })
    .await;
}

async fn serve_client(
    state: Arc<ServerState>,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
    config: Arc<rustls::ServerConfig>,
) {
    let Some((tls, identity)) = handshake(&state, tcp, peer, "client", None, config).await else {
        return;
    };
    if !matches!(identity, Identity::Client { .. }) {
        // Served, so that each call gets a typed `unauthenticated` answer
        // rather than a bare connection error.
        tracing::warn!(%peer, %identity, "only client certificates may use the client port; its calls will be refused");
        state
            .metrics
            .rejected
            .get_or_create(&RejectLabel {
                listener: "client",
                reason: "identity",
            })
            .inc();
    }
    let info = Arc::new(PeerInfo {
        identity: identity.clone(),
        remote_addr: peer,
    });
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let sniffed =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, client_protocol(alpn.as_deref(), tls)).await;
    let (protocol, tls) = match sniffed {
        Ok(Ok(Some(sniffed))) => sniffed,
        Ok(Ok(None)) => {
            tracing::debug!(%peer, %identity, "client closed before its first request");
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(%peer, %identity, %err, "client connection failed before its first request");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %identity, "client sent nothing after the TLS handshake; connection closed");
            return;
        }
    };
    if protocol == ClientProtocol::Http11 {
        tracing::debug!(%peer, %identity, "HTTP/1.1 client connected");
        // One proxied connection whose client may stop reading for long: no
        // TCP_USER_TIMEOUT, a watch of the socket instead.
        let socket = tls.get_ref().get_ref().0.socket();
        tunnel_proto::net::allow_read_pauses(socket);
        let client = crate::http_connect::ClientSocket::of(
            socket,
            state.config.h2.liveness.dead_peer_timeout,
        );
        return crate::http_connect::serve_connection(state, info, tls, client, stop).await;
    }
    let mut conn = match H2Server::handshake(tls, &state.config.h2).await {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!(%peer, %identity, %err, "HTTP/2 handshake with client failed");
            state
                .metrics
                .rejected
                .get_or_create(&RejectLabel {
                    listener: "client",
                    reason: "http2",
                })
                .inc();
            return;
        }
    };
    tracing::debug!(%peer, %identity, "client connected");
    let control = TunnelServer::new(TunnelService::new(state.clone()))
        .max_decoding_message_size(tunnel_proto::MAX_MESSAGE_BYTES);
    loop {
        match conn.accept_until(&stop).await {
            Some(Ok((mut req, respond))) => {
                let konnectivity = req.uri().path() == tunnel_proto::konnectivity::PROXY_PATH;
                if req.method() != http::Method::CONNECT && !konnectivity {
                    req.extensions_mut().insert(info.clone());
                    tokio::spawn(tunnel_proto::grpc::serve(control.clone(), req, respond));
                    continue;
                }
                // A stream that carries a connection (ours or konnectivity's)
                // takes its place in the connection's budget.
                let guard = match conn.conn().try_stream_opened(u64::MAX) {
                    Ok(guard) => guard,
                    Err(full) => {
                        crate::tunnel::refuse_full(&state, respond, &info, &full);
                        continue;
                    }
                };
                let (state, info) = (state.clone(), info.clone());
                if konnectivity {
                    tokio::spawn(crate::konnectivity::serve_stream(
                        state, info, req, respond, guard,
                    ));
                } else {
                    tokio::spawn(crate::tunnel::serve_stream(
                        state, info, req, respond, guard,
                    ));
                }
            }
            Some(Err(err)) => {
                tracing::warn!(%peer, %identity, %err, "client connection failed");
                return;
            }
            None => break,
        }
    }
    tracing::debug!(%peer, %identity, "client disconnected");
}
