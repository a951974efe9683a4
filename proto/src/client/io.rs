//! [`TunnelIo`]: a tunnelled connection as an in-process byte stream, for
//! callers that want `AsyncRead` + `AsyncWrite` rather than a TCP socket.

use bytes::Bytes;

use crate::relay::TunnelStream;

/// A tunnelled connection as an in-process byte stream (`AsyncRead` +
/// `AsyncWrite`); shutting down the write side sends END_STREAM (a FIN),
/// dropping it before both directions ended resets the stream.
pub struct TunnelIo {
    stream: TunnelStream,
    pending: Bytes,
    read_done: bool,
    write_done: bool,
}

impl TunnelIo {
    pub(super) fn new(stream: TunnelStream) -> Self {
        Self {
            stream,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
        }
    }
}

impl std::fmt::Debug for TunnelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelIo")
            .field("read_done", &self.read_done)
            .field("write_done", &self.write_done)
            .finish()
    }
}

fn reset_error(err: &h2::Error) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        format!("tunnel stream aborted: {err}"),
    )
}

impl tokio::io::AsyncRead for TunnelIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match futures_util::ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    this.stream.guard().note_received(data.len());
                    let _ = this.stream.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(err)) => return Poll::Ready(Err(reset_error(&err))),
                None => this.read_done = true,
            }
        }
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "tunnel stream closed")
}

impl tokio::io::AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        // As the relays do before reserving (`quiet_reset_watch`); it also
        // finds a stream the peer reset, and a write to it then fails as a
        // reset, as a read does.
        if crate::relay::quiet_reset_watch(send).is_err() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "tunnel stream aborted",
            )));
        }
        send.reserve_capacity(buf.len().min(crate::relay::MAX_READ));
        loop {
            let cap = send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(|_| closed())?;
                return Poll::Ready(Ok(n));
            }
            match futures_util::ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(reset_error(&err))),
                None => return Poll::Ready(Err(closed())),
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.write_done {
            self.write_done = true;
            self.stream.send.reserve_capacity(0);
            self.stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(|_| closed())?;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::test_stream::{OpenStream, open_stream};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Once the peer reset the stream, a write fails as a reset, as a read
    /// does: the application sees one kind of error for one event.
    #[tokio::test]
    async fn a_write_after_the_peer_reset_the_stream_fails_as_a_reset() {
        let OpenStream {
            send,
            response,
            guard,
            mut respond,
            drivers: _drivers,
        } = open_stream().await;
        let mut answer = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let recv = response.await.unwrap().into_body();
        let mut io = TunnelIo::new(TunnelStream::new(send, recv, guard));
        io.write_all(b"before").await.unwrap();

        answer.send_reset(h2::Reason::CANCEL);
        let read = tokio::time::timeout(Duration::from_secs(10), io.read(&mut [0; 16]))
            .await
            .expect("the reset reaches the stream");
        assert_eq!(
            read.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
        let write = io.write(b"after").await;
        assert_eq!(
            write.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }
}
