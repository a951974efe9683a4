//! The konnectivity protocol of kubernetes-sigs/apiserver-network-proxy on
//! the wire, as its Go client (`konnectivity-client`) speaks it to a proxy
//! server: the gRPC bidirectional stream `/ProxyService/Proxy` of
//! [`pb::Packet`]s (`proto/konnectivity/client.proto`, written from the
//! upstream definition).
//!
//! The server reads and writes these packets on its own HTTP/2 streams
//! instead of going through a gRPC framework, so that one konnectivity
//! stream is a connection like any other: its window is the connection's
//! flow control, a DATA packet's payload goes to the agent's stream as the
//! buffer it was decoded into, and the agent's bytes go back behind a small
//! packet prefix, uncopied ([`data_prefix`]). This module has the framing
//! (gRPC's 5-byte message prefix), the reader of one request stream
//! ([`MessageReader`]) and the packets the server sends.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::h2::StreamGuard;

/// Generated konnectivity types and the gRPC client (`proto/konnectivity/client.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!("gen/konnectivity.rs");
}

use pb::{Packet, PacketType, packet::Payload};

/// The gRPC method of the konnectivity stream (no protobuf package).
pub const PROXY_PATH: &str = "/ProxyService/Proxy";

/// Largest message accepted from a client: gRPC's default limit, so that a
/// konnectivity stream holds at most this much beyond its window.
pub const MAX_MESSAGE_BYTES: usize = crate::MAX_MESSAGE_BYTES;

/// Length of gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX_LEN: usize = 5;

/// Why a request stream could not be read as konnectivity packets.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream was reset, or its connection failed.
    #[error("the stream ended abruptly: {0}")]
    Reset(#[source] h2::Error),
    /// The stream ended in the middle of a message.
    #[error("the stream ended inside a message")]
    Truncated,
    /// A message is longer than [`MAX_MESSAGE_BYTES`].
    #[error("a message of {len} bytes is larger than the most accepted, {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The start of a message held while its rest comes would take the
    /// connection past its budget (with the windows of its open streams).
    #[error("a message being received does not fit the connection's budget: {0}")]
    ConnectionFull(#[source] crate::h2::BudgetExhausted),
    /// A message is compressed (or its prefix is not gRPC's).
    #[error("a message is compressed (flag {0}); compression is not accepted")]
    Compressed(u8),
    /// A message is not a `Packet`.
    #[error("a message is not a konnectivity Packet: {0}")]
    Malformed(#[source] prost::DecodeError),
}

impl ReadError {
    /// The gRPC status a client gets for this error.
    pub fn status(&self) -> tonic::Status {
        match self {
            ReadError::TooLarge { .. } | ReadError::ConnectionFull(_) => {
                tonic::Status::resource_exhausted(self.to_string())
            }
            ReadError::Compressed(_) => tonic::Status::unimplemented(self.to_string()),
            _ => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

/// The packets of one konnectivity request stream, in order.
///
/// Flow control: bytes received are given back to the peer (its window)
/// only when the reader needs more, that is once every packet it returned
/// was dealt with; so a reader that is not called holds the peer back. A
/// message longer than the window is received by giving back its first
/// part while waiting for the rest, within [`MAX_MESSAGE_BYTES`]; that part
/// is charged to the connection's budget as the stream's windows are
/// ([`StreamGuard::hold_beyond_window`]), so that many streams each
/// assembling a large message cannot hold more than the budget.
#[derive(Debug)]
pub struct MessageReader {
    recv: h2::RecvStream,
    guard: StreamGuard,
    buf: BytesMut,
    /// Bytes received and not yet given back.
    held: usize,
}

impl MessageReader {
    /// Reads `recv`, a stream counted by `guard` on its connection.
    pub fn new(recv: h2::RecvStream, guard: StreamGuard) -> Self {
        Self {
            recv,
            guard,
            buf: BytesMut::new(),
            held: 0,
        }
    }

    /// The next packet; `Ok(None)` when the stream ended cleanly between packets.
    pub async fn next_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        match self.next_message().await? {
            Some(message) => Packet::decode(message)
                .map(Some)
                .map_err(ReadError::Malformed),
            None => Ok(None),
        }
    }

    /// The next message; cancel-safe (what was received stays buffered).
    async fn next_message(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(message) = self.split_message()? {
                return Ok(Some(message));
            }
            // Everything returned before was dealt with: give it back, and
            // the start of an incomplete message too, so that the rest can
            // come. Given back, that start is held beyond the stream's
            // window: charged to the connection's budget meanwhile.
            if self.held > 0 {
                self.guard
                    .hold_beyond_window(self.buf.len())
                    .map_err(ReadError::ConnectionFull)?;
                let _ = self.recv.flow_control().release_capacity(self.held);
                self.held = 0;
            }
            match self.recv.data().await {
                Some(Ok(chunk)) => {
                    self.guard.note_received(chunk.len());
                    self.held += chunk.len();
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(err)) => return Err(ReadError::Reset(err)),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(ReadError::Truncated),
            }
        }
    }

    /// A whole message from the buffer, if one is there.
    fn split_message(&mut self) -> Result<Option<Bytes>, ReadError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let flag = self.buf[0];
        if flag != 0 {
            return Err(ReadError::Compressed(flag));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(ReadError::TooLarge {
                len,
                max: MAX_MESSAGE_BYTES,
            });
        }
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// `packet` as one gRPC message (prefix and protobuf).
pub fn encode(packet: &Packet) -> Bytes {
    let len = packet.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX_LEN + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    packet
        .encode(&mut out)
        .expect("the buffer was sized for the packet");
    out.freeze()
}

/// The gRPC message of a DATA packet of `len` payload bytes on connection
/// `connect_id`, up to the payload: sent before the payload, it makes the
/// payload the tail of the message without copying it.
pub fn data_prefix(connect_id: i64, len: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    // Data { connectID = 1, data = 3 }, the fields proto3 leaves out when
    // they are zero or empty left out too.
    let id = connect_id as u64;
    let id_len = if id == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(id)
    };
    let payload_len = if len == 0 {
        0
    } else {
        key_len(3) + encoded_len_varint(len as u64) + len
    };
    let data_len = id_len + payload_len;
    // Packet { type = 1 (DATA), data = 4 }.
    let packet_len = key_len(1)
        + encoded_len_varint(PacketType::Data as u64)
        + key_len(4)
        + encoded_len_varint(data_len as u64)
        + data_len;
    let mut out = BytesMut::with_capacity(PREFIX_LEN + packet_len - len);
    out.put_u8(0);
    out.put_u32(u32::try_from(packet_len).unwrap_or(u32::MAX));
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(PacketType::Data as u64, &mut out);
    encode_key(4, WireType::LengthDelimited, &mut out);
    encode_varint(data_len as u64, &mut out);
    if id != 0 {
        encode_key(1, WireType::Varint, &mut out);
        encode_varint(id, &mut out);
    }
    if len != 0 {
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint(len as u64, &mut out);
    }
    out.freeze()
}

/// DIAL_RSP: the dial `random` reached its destination as connection `connect_id`.
pub fn dial_opened(random: i64, connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::DialRsp as i32,
        payload: Some(Payload::DialResponse(pb::DialResponse {
            error: String::new(),
            connect_id,
            random,
        })),
    }
}

/// DIAL_RSP: the dial `random` failed, with `error` (what the Go client's
/// `DialContext` returns as its error).
pub fn dial_failed(random: i64, error: String) -> Packet {
    Packet {
        r#type: PacketType::DialRsp as i32,
        payload: Some(Payload::DialResponse(pb::DialResponse {
            error,
            connect_id: 0,
            random,
        })),
    }
}

/// CLOSE_RSP: connection `connect_id` is closed.
pub fn closed(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseRsp as i32,
        payload: Some(Payload::CloseResponse(pb::CloseResponse {
            error: String::new(),
            connect_id,
        })),
    }
}

/// The response headers of a konnectivity stream.
pub fn response_headers() -> http::Response<()> {
    let mut resp = http::Response::new(());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The trailers that end a konnectivity stream with `status`.
pub fn trailers(status: &tonic::Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header fails; the code alone then.
        let _ = tonic::Status::new(status.code(), "").add_header(&mut map);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_prefix_and_its_payload_are_the_packet_prost_would_write() {
        for (connect_id, len) in [
            (1_i64, 1_usize),
            (7, 300),
            (i64::MAX, 70_000),
            (5, 0),
            (0, 9),
        ] {
            let payload = Bytes::from(vec![0xab; len]);
            let packet = Packet {
                r#type: PacketType::Data as i32,
                payload: Some(Payload::Data(pb::Data {
                    connect_id,
                    error: String::new(),
                    data: payload.clone(),
                })),
            };
            let mut ours = data_prefix(connect_id, len).to_vec();
            ours.extend_from_slice(&payload);
            assert_eq!(
                ours,
                encode(&packet).to_vec(),
                "connectID {connect_id}, {len} bytes"
            );
        }
    }

    #[test]
    fn read_errors_map_to_the_grpc_codes_clients_know() {
        let big = ReadError::TooLarge {
            len: 5 << 20,
            max: MAX_MESSAGE_BYTES,
        };
        assert_eq!(big.status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            ReadError::Compressed(1).status().code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            ReadError::Truncated.status().code(),
            tonic::Code::InvalidArgument
        );
        let map = trailers(&tonic::Status::invalid_argument(
            "DATA before the dial's answer\nnext",
        ));
        assert_eq!(map["grpc-status"], "3");
        assert!(map.contains_key("grpc-message"));
    }
}
