//! The webhook's HTTPS server: a warp filter served by hyper-util (HTTP/2
//! and HTTP/1.1) over a tokio-rustls acceptor. warp 0.4 has no TLS of its
//! own; this keeps one TLS stack and one crypto provider in the process.
//!
//! Routes: `POST /mutate` (the admission review). The API server adds
//! `?timeout=10s` to the URL; the query is ignored. Anything else gets warp's
//! 404 or 405.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::review::Reviewer;

/// Path of the webhook.
pub const WEBHOOK_PATH: &str = "mutate";
/// Largest review body accepted. The API server's own request limit is 3 MiB,
/// and a review carries the object (and for updates the old object too).
pub const MAX_REVIEW_BYTES: u64 = 8 * 1024 * 1024;
/// Time a client gets for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client gets to send request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// Time open connections get to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. too many open files).
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// The routes of the webhook.
pub fn routes(
    reviewer: Arc<Reviewer>,
) -> impl Filter<Extract = (warp::http::Response<Vec<u8>>,), Error = warp::Rejection> + Clone {
    warp::post()
        .and(warp::path(WEBHOOK_PATH))
        .and(warp::path::end())
        .and(warp::body::content_length_limit(MAX_REVIEW_BYTES))
        .and(warp::body::bytes())
        .map(move |body: Bytes| {
            let reply = reviewer.review(&body);
            warp::http::Response::builder()
                .status(reply.status)
                .header(warp::http::header::CONTENT_TYPE, reply.content_type)
                .body(reply.body)
                .expect("a valid response")
        })
}

/// Serves the webhook on `listener` until `stop` is cancelled, then lets open
/// connections finish their requests for a few seconds.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    reviewer: Arc<Reviewer>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let service = warp::service(routes(reviewer));
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    acceptor.clone(),
                    service.clone(),
                    stop.clone(),
                    permit,
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "webhook accept failed");
                tokio::time::sleep(ACCEPT_ERROR_DELAY).await;
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
}

async fn serve_connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: S,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) where
    S: tower_service::Service<
            http::Request<hyper::body::Incoming>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "webhook TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "webhook TLS handshake timed out");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
    let result =
        tunnel_shell::process::serve_until_stopped(conn, &stop, |conn| conn.graceful_shutdown())
            .await;
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "webhook connection ended with an error");
    }
}
