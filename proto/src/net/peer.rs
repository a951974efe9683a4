//! Whether a TCP peer still answers, from what the kernel knows
//! (`TCP_INFO`): used instead of `TCP_USER_TIMEOUT` on sockets whose peer
//! may rightly stop reading for a long time (destinations), because Linux
//! applies `TCP_USER_TIMEOUT` to zero-window probing as well and resets a
//! connection whose peer answers every probe but keeps its window closed
//! for longer than the timeout. RFC 1122 (4.2.2.17) asks to keep such a
//! connection open for as long as the peer answers.

use std::os::fd::AsFd;
use std::time::Duration;

/// Zero-window probes in a row without an answer after which a peer is gone.
/// Two, not one: the time since the last answer grows with the probes'
/// backoff (up to two minutes apart), so a single probe in flight proves
/// nothing, while two unanswered probes span a whole probe interval.
pub const GONE_AFTER_PROBES: u8 = 2;

/// What the kernel knows of how a TCP peer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAnswers {
    /// Time since the peer last acknowledged anything (data or a window probe).
    pub since_last_ack: Duration,
    /// Segments sent and not acknowledged yet.
    pub unacked_segments: u32,
    /// Zero-window probes sent in a row without an answer.
    pub unanswered_probes: u8,
}

impl PeerAnswers {
    /// The peer is gone: data in flight went unacknowledged for `timeout`
    /// (what `TCP_USER_TIMEOUT` means), or it stopped answering the probes
    /// of its closed window. A peer that answers the probes of a closed
    /// window is alive, however long it keeps the window closed.
    pub fn peer_gone(&self, timeout: Duration) -> bool {
        (self.unacked_segments > 0 && self.since_last_ack >= timeout)
            || self.unanswered_probes >= GONE_AFTER_PROBES
    }
}

/// Byte offsets in Linux's `struct tcp_info` (stable ABI, `linux/tcp.h`).
#[cfg(target_os = "linux")]
mod offsets {
    pub const PROBES: usize = 3;
    pub const UNACKED: usize = 24;
    pub const LAST_ACK_RECV: usize = 56;
    /// Bytes up to and including `tcpi_last_ack_recv`.
    pub const NEEDED: usize = 60;
}

/// Reads what the kernel knows of `sock`'s peer (`TCP_INFO`).
#[cfg(target_os = "linux")]
pub fn peer_answers<S: AsFd>(sock: &S) -> std::io::Result<PeerAnswers> {
    use std::os::fd::AsRawFd;
    // Larger than any kernel's struct tcp_info so far (232 bytes in 6.x).
    let mut buf = [0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: `buf` is a live, writable buffer of `len` bytes for the whole
    // call, `len` points to a live socklen_t, and TCP_INFO writes at most
    // `len` bytes into it and the length written into `len`; `fd` is open
    // for as long as `sock` is borrowed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (len as usize) < offsets::NEEDED {
        return Err(std::io::Error::other(format!(
            "TCP_INFO returned {len} bytes, fewer than the {} needed",
            offsets::NEEDED
        )));
    }
    let u32_at = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    Ok(PeerAnswers {
        since_last_ack: Duration::from_millis(u32_at(offsets::LAST_ACK_RECV).into()),
        unacked_segments: u32_at(offsets::UNACKED),
        unanswered_probes: buf[offsets::PROBES],
    })
}

/// Without `TCP_INFO`, nothing is known: the caller stops watching.
#[cfg(not(target_os = "linux"))]
pub fn peer_answers<S: AsFd>(_sock: &S) -> std::io::Result<PeerAnswers> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Completes once `tcp`'s peer is gone by [`PeerAnswers::peer_gone`]
/// with `timeout`, checked from `timeout` on and then every quarter of it;
/// never if the kernel cannot tell. Meant to run while a write to `tcp` is
/// waiting: the first check comes `timeout` after the wait began, so an
/// answer the peer owed from before cannot count against it.
pub async fn gone(tcp: &tokio::net::TcpStream, timeout: Duration) -> PeerAnswers {
    tokio::time::sleep(timeout).await;
    loop {
        match peer_answers(tcp) {
            Ok(answers) if answers.peer_gone(timeout) => return answers,
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(%err, "cannot read TCP_INFO; not watching the peer");
                return std::future::pending().await;
            }
        }
        tokio::time::sleep((timeout / 4).max(Duration::from_millis(250))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn a_peer_that_answers_the_probes_of_a_closed_window_is_alive() {
        let closed_window = PeerAnswers {
            since_last_ack: Duration::from_secs(100),
            unacked_segments: 0,
            unanswered_probes: 1,
        };
        assert!(!closed_window.peer_gone(Duration::from_secs(20)));
        let silent = PeerAnswers {
            unanswered_probes: GONE_AFTER_PROBES,
            ..closed_window
        };
        assert!(silent.peer_gone(Duration::from_secs(20)));
    }

    #[test]
    fn data_in_flight_unacknowledged_for_the_timeout_means_gone() {
        let in_flight = PeerAnswers {
            since_last_ack: Duration::from_secs(19),
            unacked_segments: 3,
            unanswered_probes: 0,
        };
        assert!(!in_flight.peer_gone(Duration::from_secs(20)));
        let late = PeerAnswers {
            since_last_ack: Duration::from_secs(20),
            ..in_flight
        };
        assert!(late.peer_gone(Duration::from_secs(20)));
    }

    /// A peer that never reads, with our send buffer full: the kernel keeps
    /// its window probes answered, and the watch does not fire.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_live_peer_that_never_reads_is_not_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut tcp, _never_reads) = (tcp.unwrap(), accepted.unwrap());
        let chunk = vec![0u8; 64 * 1024];
        // Fill every buffer on the way: a write that waits 200 ms is blocked.
        while tokio::time::timeout(Duration::from_millis(200), tcp.write_all(&chunk))
            .await
            .is_ok()
        {}
        let timeout = Duration::from_millis(500);
        let watched = tokio::time::timeout(Duration::from_secs(4), gone(&tcp, timeout)).await;
        assert!(watched.is_err(), "a live peer was called gone: {watched:?}");
        let answers = peer_answers(&tcp).unwrap();
        assert_eq!(answers.unacked_segments, 0, "{answers:?}");
        assert!(!answers.peer_gone(timeout), "{answers:?}");
    }
}
