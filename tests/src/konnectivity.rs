//! A konnectivity client written from the upstream protocol: the tonic
//! client generated from `proto/konnectivity/client.proto`, over an HTTP/2
//! stack of its own (hyper's, not the tunnel's), over mTLS, sending HTTP/2
//! keepalive PINGs as the Go client's gRPC keepalive does. It uses the
//! protocol as the Go client's single-use tunnel does: one stream, one
//! DIAL_REQ, DATA both ways, CLOSE_REQ. [`raw_call`] sends bytes that are no
//! packets at all, for the hostile tests.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tunnel_proto::konnectivity::pb::proxy_service_client::ProxyServiceClient;
use tunnel_proto::konnectivity::pb::{self, Packet, PacketType, packet::Payload};

use crate::Pki;

/// An HTTP/2 connection to a server's client port, as a tonic transport.
#[derive(Clone, Debug)]
pub struct Http2Channel {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    /// The connection's socket, to shut it down.
    socket: Arc<std::net::TcpStream>,
}

impl Http2Channel {
    /// Drops the connection at once, its streams with it: what the Go
    /// client's single-use tunnel does when its context is cancelled
    /// (`grpcConn.Close()`).
    pub fn close(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Http2Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// Connects to the client port `server` with the certificate `cert` of
/// `pki` (e.g. `client-app`), pinging every `keepalive` (and expecting the
/// answer within a second) even while no call is open.
pub async fn connect(
    pki: &Pki,
    cert: &str,
    server: SocketAddr,
    keepalive: Duration,
) -> Http2Channel {
    let tls = tunnel_proto::tls::client_config(&pki.files(cert)).expect("client TLS");
    let tcp = tokio::net::TcpStream::connect(server)
        .await
        .expect("the client port accepts")
        .into_std()
        .expect("a socket");
    let socket = Arc::new(tcp.try_clone().expect("a second handle of the socket"));
    let tcp = tokio::net::TcpStream::from_std(tcp).expect("a tokio socket");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("the TLS handshake");
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive)
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .expect("the HTTP/2 handshake");
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%err, "konnectivity test connection ended");
        }
    });
    Http2Channel { send, socket }
}

/// One konnectivity stream: the Go client's single-use tunnel.
pub struct Tunnel {
    tx: Option<mpsc::Sender<Packet>>,
    rx: tonic::Streaming<Packet>,
}

/// What the server said to a DIAL_REQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialed {
    /// The connection's id.
    Opened(i64),
    /// The DIAL_RSP's error.
    Failed(String),
}

impl Tunnel {
    /// Opens a `Proxy` call on `channel`.
    pub async fn open(channel: &Http2Channel) -> Self {
        let (tx, mut outgoing) = mpsc::channel::<Packet>(1);
        let requests = futures_util::stream::poll_fn(move |cx| outgoing.poll_recv(cx));
        let mut client = ProxyServiceClient::with_origin(
            channel.clone(),
            http::Uri::from_static("https://localhost"),
        );
        let rx = client
            .proxy(requests)
            .await
            .expect("the server answers the Proxy call")
            .into_inner();
        Self { tx: Some(tx), rx }
    }

    /// Sends `packet`.
    pub async fn send(&self, packet: Packet) {
        self.sender().send(packet).await.expect("the call is open");
    }

    /// A sender of packets on this stream.
    pub fn sender(&self) -> mpsc::Sender<Packet> {
        self.tx.clone().expect("the request stream is open")
    }

    /// Ends the request stream (what `CloseSend` does in Go).
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// The next packet; `Ok(None)` when the stream ended with `grpc-status: 0`.
    pub async fn next(&mut self) -> Result<Option<Packet>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("the server sends the next packet or ends the stream within 20 s")
    }

    /// Sends DIAL_REQ for `address` and reads the DIAL_RSP.
    pub async fn dial(&mut self, address: &str) -> Dialed {
        let random = rand::random::<i64>() & i64::MAX;
        self.send(dial_request(address, random)).await;
        let packet = self
            .next()
            .await
            .expect("the stream carries the answer")
            .expect("a DIAL_RSP before the stream ends");
        match packet.payload {
            Some(Payload::DialResponse(r)) if packet.r#type == PacketType::DialRsp as i32 => {
                assert_eq!(r.random, random, "the DIAL_RSP carries the dial's random");
                if r.error.is_empty() {
                    assert_ne!(r.connect_id, 0, "a dial that succeeded has a connectID");
                    Dialed::Opened(r.connect_id)
                } else {
                    Dialed::Failed(r.error)
                }
            }
            other => panic!("expected DIAL_RSP, got {other:?}"),
        }
    }

    /// Reads DATA of connection `connect_id` until `len` bytes came;
    /// returns them.
    pub async fn read_data(&mut self, connect_id: i64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match self.next().await {
                Ok(Some(p)) => match p.payload {
                    Some(Payload::Data(d)) => {
                        assert_eq!(d.connect_id, connect_id, "DATA of our connection");
                        out.extend_from_slice(&d.data);
                    }
                    other => panic!("expected DATA, got {other:?} after {} bytes", out.len()),
                },
                other => panic!("expected DATA, got {other:?} after {} bytes", out.len()),
            }
        }
        out
    }

    /// The next packet must be CLOSE_RSP of `connect_id`, then the stream ends
    /// with `grpc-status: 0`; then the client stops sending, as the Go
    /// client does once it has the CLOSE_RSP.
    pub async fn expect_closed(&mut self, connect_id: i64) {
        let packet = self.next().await.expect("no error status");
        match packet {
            Some(Packet {
                payload: Some(Payload::CloseResponse(c)),
                r#type,
            }) if r#type == PacketType::CloseRsp as i32 => {
                assert_eq!(c.connect_id, connect_id);
                assert!(c.error.is_empty(), "a clean close: {}", c.error);
            }
            other => panic!("expected CLOSE_RSP, got {other:?}"),
        }
        let end = self.next().await;
        assert!(matches!(end, Ok(None)), "the stream ends cleanly: {end:?}");
        self.close_send();
    }

    /// The status the stream ends with, skipping packets before it.
    pub async fn final_status(&mut self) -> tonic::Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => {}
                Ok(None) => return tonic::Status::ok(""),
                Err(status) => return status,
            }
        }
    }
}

/// Sends `len` pseudo-random bytes from `seed` as DATA of `connect_id`, in
/// 16 KiB packets (what a TLS writer hands the Go client); returns their SHA-256.
pub async fn send_random(
    tx: &mpsc::Sender<Packet>,
    connect_id: i64,
    len: usize,
    seed: u64,
) -> [u8; 32] {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut hash = sha2::Sha256::new();
    let mut left = len;
    while left > 0 {
        let mut buf = vec![0u8; left.min(16 * 1024)];
        rng.fill_bytes(&mut buf);
        hash.update(&buf);
        left -= buf.len();
        tx.send(data(connect_id, buf.into()))
            .await
            .expect("the call is open");
    }
    hash.finalize().into()
}

/// DIAL_REQ for `address` (TCP).
pub fn dial_request(address: &str, random: i64) -> Packet {
    Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(pb::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        })),
    }
}

/// DATA of `connect_id`.
pub fn data(connect_id: i64, data: Bytes) -> Packet {
    Packet {
        r#type: PacketType::Data as i32,
        payload: Some(Payload::Data(pb::Data {
            connect_id,
            error: String::new(),
            data,
        })),
    }
}

/// CLOSE_REQ of `connect_id`.
pub fn close_request(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseReq as i32,
        payload: Some(Payload::CloseRequest(pb::CloseRequest { connect_id })),
    }
}

/// What came back from a [`raw_call`].
#[derive(Debug)]
pub struct RawAnswer {
    /// The response's bytes (gRPC messages).
    pub body: Bytes,
    /// `grpc-status`.
    pub status: String,
    /// `grpc-message`, percent-decoded.
    pub message: String,
}

/// A `Proxy` call whose whole request body is `body`, bytes as they are
/// (gRPC framing included or not): for packets no client would send.
pub async fn raw_call(channel: &Http2Channel, body: Bytes) -> RawAnswer {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "https://localhost{}",
            tunnel_proto::konnectivity::PROXY_PATH
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(body)))
        .expect("a request");
    let mut channel = channel.clone();
    let resp = tower_service::Service::call(&mut channel, req)
        .await
        .expect("the server answers");
    let collected = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the server ends the call within 20 s")
        .expect("the response body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    RawAnswer {
        status: field("grpc-status"),
        message: percent_decoded(&field("grpc-message")),
        body: collected.to_bytes(),
    }
}

/// `%XX` escapes (gRPC's message encoding) decoded.
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
