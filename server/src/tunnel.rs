//! The client port's own protocol: tunnel streams (one HTTP/2 `CONNECT`
//! stream per connection, [`tunnel_proto::stream`]) and the control service
//! (`Tunnel.ListClusters`). Each stream is read into an [`Open`], goes the
//! one way every connection goes ([`crate::connection`]), and is spliced to
//! a stream on the agent's tunnel.
//!
//! The server never touches a TCP socket for a proxied connection: it hands
//! each DATA buffer received on one leg to the other leg, so HTTP/2 flow
//! control runs end to end, hop by hop, and no payload is copied here.

use std::sync::Arc;

use bytes::Bytes;
use tonic::{Request, Response, Status};
use tunnel_proto::error::{ErrorCode, TunnelError};
use tunnel_proto::h2::{PeerInfo, StreamGuard};
use tunnel_proto::pb::{self, tunnel_server::Tunnel};
use tunnel_proto::relay::TunnelStream;
use tunnel_proto::stream::{Open, error_response, opened_response};

use crate::ServerState;
use crate::connection::{Caller, check_caller, establish, refuse_early};

/// The client port's control service.
#[derive(Clone)]
pub struct TunnelService {
    state: Arc<ServerState>,
}

impl TunnelService {
    /// The service over the server's shared state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

/// Answers a stream refused before it has a record.
fn refuse_stream(
    state: &ServerState,
    respond: &mut h2::server::SendResponse<Bytes>,
    peer: &PeerInfo,
    err: &TunnelError,
) {
    refuse_early(state, peer, err);
    let _ = respond.send_response(error_response(err), true);
}

/// Refuses a stream that the client connection's budget cannot take.
pub(crate) fn refuse_full(
    state: &ServerState,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: &PeerInfo,
    full: &tunnel_proto::h2::BudgetExhausted,
) {
    let err = TunnelError::new(ErrorCode::ResourceExhausted, full.to_string());
    refuse_stream(state, &mut respond, peer, &err);
}

/// Serves one tunnel stream a client opened, until both directions ended.
pub(crate) async fn serve_stream(
    state: Arc<ServerState>,
    peer: Arc<PeerInfo>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    guard: StreamGuard,
) {
    if let Err(err) = check_caller(&peer) {
        return refuse_stream(&state, &mut respond, &peer, &err);
    }
    let open = match Open::from_request(&req) {
        Ok(o) => o,
        Err(err) => return refuse_stream(&state, &mut respond, &peer, &err),
    };
    let caller = Caller {
        peer: &peer,
        token: crate::authn::bearer_token(req.headers()),
        entry: "tunnel",
    };
    let client_reset = std::future::poll_fn(|cx| respond.poll_reset(cx).map(|_| ()));
    let established = match establish(&state, caller, open, client_reset).await {
        Ok(e) => e,
        Err(err) => {
            let _ = respond.send_response(error_response(&err), true);
            return;
        }
    };
    let send = match respond.send_response(opened_response(&established.opened), false) {
        Ok(send) => send,
        Err(err) => {
            tracing::debug!(id = %established.id(), %err, "client went away before the answer");
            return;
        }
    };
    let (from_client, to_client) = TunnelStream::new(send, req.into_body(), guard).into_legs();
    established.splice(from_client, to_client).await;
}

#[tonic::async_trait]
impl Tunnel for TunnelService {
    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        if let Some(peer) = req.extensions().get::<Arc<PeerInfo>>()
            && !peer.identity.is_caller()
        {
            return Err(Status::unauthenticated(format!(
                "{} may not list clusters",
                peer.identity
            )));
        }
        Ok(Response::new(pb::ListClustersResponse {
            clusters: self.state.pool.snapshot(),
        }))
    }
}
