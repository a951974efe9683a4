//! The control RPCs (hello, cluster list) over the same HTTP/2 connections
//! as the tunnel streams: tonic's generated clients and servers, carried by
//! the `h2` crate in either role instead of tonic's own transport.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio_util::sync::CancellationToken;

use crate::h2::H2Client;

/// A request body read from an h2 stream, releasing its window as it is read.
#[derive(Debug)]
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl RecvBody {
    /// The body of `recv`.
    pub fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match futures_util::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => self.data_done = true,
            }
        }
        match futures_util::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Sends `body` on `send`: data, then trailers or END_STREAM.
async fn send_body<B>(body: B, mut send: h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Send,
    B::Error: std::fmt::Display,
{
    let never = CancellationToken::new();
    tokio::pin!(body);
    loop {
        match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if crate::relay::send_all(&mut send, data, &never)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                        return;
                    }
                }
            },
            Some(Err(err)) => {
                tracing::debug!(%err, "control call body failed");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
        }
    }
}

/// A tonic client transport over an [`H2Client`] connection
/// (`AgentClient::with_origin(GrpcChannel::new(conn), ..)`).
#[derive(Clone, Debug)]
pub struct GrpcChannel {
    conn: H2Client,
}

impl GrpcChannel {
    /// Calls go over `conn`.
    pub fn new(conn: H2Client) -> Self {
        Self { conn }
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<RecvBody>, h2::Error>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for GrpcChannel {
    type Response = http::Response<RecvBody>;
    type Error = h2::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let send = self.conn.sender();
        Box::pin(async move {
            let mut send = send.ready().await?;
            let (parts, body) = req.into_parts();
            let end = body.is_end_stream();
            let (response, stream) =
                send.send_request(http::Request::from_parts(parts, ()), end)?;
            if !end {
                tokio::spawn(send_body(body, stream));
            }
            let response = response.await?;
            Ok(response.map(RecvBody::new))
        })
    }
}

/// Answers one control request with `service` (a tonic server, e.g.
/// `TunnelServer`), sending the response on `respond`.
pub async fn serve<S>(
    mut service: S,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) where
    S: tower_service::Service<
            http::Request<RecvBody>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
{
    let req = req.map(RecvBody::new);
    let Ok(response) = service.call(req).await;
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(http::Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => send_body(body, stream).await,
        Ok(_) => {}
        Err(err) => tracing::debug!(%err, "cannot answer a control call"),
    }
}
