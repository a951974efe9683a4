//! Whether a TCP peer still answers, from what the kernel knows
//! (`TCP_INFO`): used instead of `TCP_USER_TIMEOUT` on sockets whose peer
//! may rightly stop reading for a long time (destinations, HTTP/1.1 CONNECT
//! clients), because Linux applies `TCP_USER_TIMEOUT` to zero-window probing
//! as well and resets a connection whose peer answers every probe but keeps
//! its window closed for longer than the timeout. RFC 1122 (4.2.2.17) asks
//! to keep such a connection open for as long as the peer answers.
//!
//! [`watch`] runs beside a connection for its whole life, and reads
//! `TCP_INFO` only while the peer owes an answer: from a write ([`Writes`])
//! until the kernel holds nothing unacknowledged or unsent for it. So a
//! request written in one go, a FIN, or data queued behind a closed window
//! is watched as much as a write that waits, and an idle connection (left
//! to TCP keepalive) costs nothing.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Zero-window probes in a row without an answer, seen on two checks in a
/// row, after which a silent peer is gone. Two, not one: the time since the
/// last answer grows with the probes' backoff (up to two minutes apart), so a
/// single probe in flight proves nothing, and a single lost probe or answer
/// must not cost a live connection.
pub const GONE_AFTER_PROBES: u8 = 2;

/// Tolerance between the kernel's ACK clock (jiffies, in milliseconds) and
/// ours when deciding whether an ACK came since a given instant.
const ACK_CLOCK_SLACK: Duration = Duration::from_millis(50);

/// What the kernel knows of how a TCP peer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAnswers {
    /// Time since the peer last acknowledged anything (data or a window
    /// probe). Not refreshed by the peer's own data while we have nothing
    /// unacknowledged, so it may be far older than the peer's last segment.
    pub since_last_ack: Duration,
    /// Segments sent and not acknowledged yet.
    pub unacked_segments: u32,
    /// Zero-window probes (or keepalive probes) sent in a row without an answer.
    pub unanswered_probes: u8,
    /// Bytes written and not sent yet (behind a closed window, or queued).
    pub unsent_bytes: u32,
}

impl PeerAnswers {
    /// The kernel holds nothing the peer has to take or acknowledge.
    pub fn owes_nothing(&self) -> bool {
        self.unacked_segments == 0 && self.unsent_bytes == 0
    }
}

/// One stretch of time in which the peer owes us an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// Something was unacknowledged or unsent from here on, and no ACK came
    /// since (as far as the checks tell).
    since: Instant,
    /// Unanswered probes at the previous check of this stall.
    probes_before: u8,
}

impl Stall {
    /// A stall that began at `at` (a write, or the first check that saw
    /// something owed).
    pub fn new(at: Instant) -> Self {
        Self {
            since: at,
            probes_before: 0,
        }
    }

    /// Judges `answers`, read at `now`: the peer is gone when it answered
    /// nothing for `timeout` while it owed an answer, and either data in
    /// flight went unacknowledged all that time (what `TCP_USER_TIMEOUT`
    /// means), or it left at least [`GONE_AFTER_PROBES`] window probes
    /// unanswered at this check and the one before. A peer that answers the
    /// probes of its closed window is alive, however long it keeps it closed.
    pub fn peer_gone(&mut self, answers: &PeerAnswers, now: Instant, timeout: Duration) -> bool {
        let silent_for = now.saturating_duration_since(self.since);
        if answers.since_last_ack + ACK_CLOCK_SLACK < silent_for {
            // It answered since: its silence, if any, starts now. (Not at its
            // last ACK: what is in flight now may have left after that ACK.)
            *self = Self {
                since: now,
                probes_before: answers.unanswered_probes,
            };
            return false;
        }
        let probes_unanswered = answers.unanswered_probes >= GONE_AFTER_PROBES
            && self.probes_before >= GONE_AFTER_PROBES;
        self.probes_before = answers.unanswered_probes;
        silent_for >= timeout && (answers.unacked_segments > 0 || probes_unanswered)
    }
}

/// Data handed to a watched socket: wakes the [`watch`] that sleeps while
/// its peer owes nothing. Costs one atomic load per write while the watch is
/// awake, and starts no timer.
#[derive(Debug, Default)]
pub struct Writes {
    noted: AtomicBool,
    wake: Notify,
}

impl Writes {
    /// Notes that data (or a FIN) is being handed to the socket.
    pub fn note(&self) {
        if !self.noted.load(Ordering::Relaxed) && !self.noted.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Forgets the writes noted so far: a later one is noted afresh.
    fn clear(&self) {
        self.noted.store(false, Ordering::Release);
    }

    /// Waits for a write noted since the last [`clear`](Self::clear).
    async fn next(&self) {
        loop {
            if self.noted.swap(false, Ordering::AcqRel) {
                return;
            }
            self.wake.notified().await;
        }
    }
}

/// How often a watch reads `TCP_INFO` while the peer owes an answer: a
/// peer gone is found within about `timeout` and two of these.
pub fn check_interval(timeout: Duration) -> Duration {
    (timeout / 8).max(Duration::from_millis(100))
}

/// Completes once `sock`'s peer is gone by [`Stall::peer_gone`] with
/// `timeout`; never if the kernel cannot tell. Checks every
/// [`check_interval`] while the peer owes an answer. With `writes`, it
/// sleeps (no timer) while the peer owes nothing until the next noted write,
/// and a stall starts at that write; without, it checks all along, and a
/// stall starts at the first check that sees something owed.
pub async fn watch<S: AsFd>(sock: &S, timeout: Duration, writes: Option<&Writes>) -> PeerAnswers {
    let every = check_interval(timeout);
    let mut stall: Option<Stall> = None;
    loop {
        if stall.is_none()
            && let Some(writes) = writes
        {
            writes.next().await;
            stall = Some(Stall::new(Instant::now()));
        }
        tokio::time::sleep(every).await;
        if let Some(writes) = writes {
            // Before the read: a write after it wakes the watch again.
            writes.clear();
        }
        let answers = match peer_answers(sock) {
            Ok(answers) => answers,
            Err(err) => {
                // Once per process as a warning (the kernel lacks it for
                // every socket alike), then at debug level.
                static WARNED: AtomicBool = AtomicBool::new(false);
                if WARNED.swap(true, Ordering::Relaxed) {
                    tracing::debug!(%err, "cannot read TCP_INFO; not watching the peer");
                } else {
                    tracing::warn!(%err, "cannot read TCP_INFO: a peer that vanishes with data on its way is found only by the kernel's retransmission limits (minutes), not by --dead-peer-timeout");
                }
                return std::future::pending().await;
            }
        };
        let now = Instant::now();
        if answers.owes_nothing() {
            stall = None;
            continue;
        }
        if stall
            .get_or_insert_with(|| Stall::new(now))
            .peer_gone(&answers, now, timeout)
        {
            return answers;
        }
    }
}

/// A [`watch`] of a socket that another layer owns and writes (hyper's
/// HTTP/1.1 connection, say), through a duplicate of its descriptor: the
/// writer notes its writes with [`note_write`](Self::note_write) and polls
/// [`poll_gone`](Self::poll_gone) beside them.
pub struct PeerWatch {
    writes: std::sync::Arc<Writes>,
    gone: std::pin::Pin<Box<dyn std::future::Future<Output = PeerAnswers> + Send>>,
    found: Option<PeerAnswers>,
}

impl std::fmt::Debug for PeerWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerWatch")
            .field("found", &self.found)
            .finish_non_exhaustive()
    }
}

impl PeerWatch {
    /// Watches the socket of `fd` (a duplicate: the socket stays open for
    /// as long as the watch holds it) with `timeout`.
    pub fn new(fd: std::sync::Arc<std::os::fd::OwnedFd>, timeout: Duration) -> Self {
        let writes = std::sync::Arc::new(Writes::default());
        let noted = writes.clone();
        Self {
            writes,
            gone: Box::pin(async move { watch(&*fd, timeout, Some(&noted)).await }),
            found: None,
        }
    }

    /// Notes that data (or a FIN) is being handed to the socket.
    pub fn note_write(&self) {
        self.writes.note();
    }

    /// Ready once the peer is gone, and from then on.
    pub fn poll_gone(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<PeerAnswers> {
        if let Some(found) = self.found {
            return std::task::Poll::Ready(found);
        }
        let found = std::task::ready!(self.gone.as_mut().poll(cx));
        self.found = Some(found);
        std::task::Poll::Ready(found)
    }
}

/// Byte offsets in Linux's `struct tcp_info` (stable ABI, `linux/tcp.h`).
#[cfg(target_os = "linux")]
mod offsets {
    /// `tcpi_probes` (`__u8`).
    pub const PROBES: usize = 3;
    /// `tcpi_unacked` (`__u32`).
    pub const UNACKED: usize = 24;
    /// `tcpi_last_ack_recv` (`__u32`, milliseconds).
    pub const LAST_ACK_RECV: usize = 56;
    /// `tcpi_notsent_bytes` (`__u32`, Linux 4.6 and later).
    pub const NOTSENT_BYTES: usize = 144;
    /// Bytes up to and including `tcpi_notsent_bytes`.
    pub const NEEDED: usize = 148;
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
        unsent_bytes: u32_at(offsets::NOTSENT_BYTES),
    })
}

/// Without `TCP_INFO`, nothing is known: the caller stops watching.
#[cfg(not(target_os = "linux"))]
pub fn peer_answers<S: AsFd>(_sock: &S) -> std::io::Result<PeerAnswers> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    const TIMEOUT: Duration = Duration::from_secs(20);
    const EVERY: Duration = Duration::from_millis(2500);

    fn answers(since_last_ack: Duration, unacked: u32, probes: u8) -> PeerAnswers {
        PeerAnswers {
            since_last_ack,
            unacked_segments: unacked,
            unanswered_probes: probes,
            unsent_bytes: if unacked == 0 { 4096 } else { 0 },
        }
    }

    /// Feeds `checks` (what each check reads, one every [`EVERY`] from a
    /// stall begun at a write) and returns the first check found gone.
    fn first_gone(checks: impl IntoIterator<Item = PeerAnswers>) -> Option<usize> {
        let start = Instant::now();
        let mut stall = Stall::new(start);
        checks.into_iter().enumerate().find_map(|(i, a)| {
            let now = start + EVERY * (i as u32 + 1);
            stall.peer_gone(&a, now, TIMEOUT).then_some(i)
        })
    }

    #[test]
    fn a_peer_that_answers_the_probes_of_a_closed_window_is_alive_for_hours() {
        // Probes back off to two minutes apart; each is answered within an
        // RTT, so a check sees at most the one in flight.
        let checks = (0..5000u32).map(|i| {
            let t = EVERY * (i + 1);
            let since_answer = Duration::from_millis(u64::from(t.as_millis() as u32 % 120_000));
            answers(since_answer, 0, u8::from(since_answer < EVERY))
        });
        assert_eq!(first_gone(checks), None);
    }

    #[test]
    fn one_lost_probe_answer_does_not_cost_a_live_connection() {
        // Long into a pause (probes two minutes apart, the last answered
        // long ago), the answer to one probe is lost: the next probe makes
        // two unanswered for one RTT, and a check lands in that RTT.
        let silent = |i: u32| EVERY * (i + 1) + Duration::from_secs(90);
        let mut checks: Vec<_> = (0..10).map(|i| answers(silent(i), 0, 0)).collect();
        checks.extend([
            answers(silent(10), 0, 1),
            answers(silent(11), 0, 1),
            answers(silent(12), 0, 2),
            answers(Duration::from_millis(900), 0, 0),
            answers(Duration::from_millis(900) + EVERY, 0, 0),
        ]);
        assert_eq!(first_gone(checks), None);
    }

    #[test]
    fn a_peer_that_vanished_behind_its_closed_window_is_gone_once_two_probes_stay_unanswered() {
        // Its last answer was long ago; one probe is unanswered for a while
        // (the next one is due only after the backoff), then two.
        let silent = |i: u32| EVERY * (i + 1) + Duration::from_secs(90);
        let checks = (0..20).map(|i| answers(silent(i), 0, if i < 10 { 1 } else { 2 }));
        assert_eq!(
            first_gone(checks),
            Some(11),
            "the second check that sees two"
        );
    }

    #[test]
    fn a_short_outage_with_the_window_closed_is_ridden_out() {
        // Early in a pause the probes are 0.2 s, 0.4 s, ... apart: a 5 s
        // outage leaves several unanswered, but the peer was silent for
        // less than the timeout and answers the next one.
        let mut checks: Vec<_> = (0..2)
            .map(|i| answers(EVERY * (i + 1), 0, 3 + i as u8))
            .collect();
        checks.push(answers(Duration::from_millis(100), 0, 0));
        assert_eq!(first_gone(checks), None);
    }

    #[test]
    fn data_in_flight_unacknowledged_for_the_timeout_means_gone() {
        let checks = (0..20).map(|i| answers(EVERY * (i + 1), 3, 0));
        // Checks at 2.5 s, 5 s, ... 20 s: the eighth sees 20 s of silence.
        assert_eq!(first_gone(checks), Some(7));
    }

    #[test]
    fn a_stale_ack_clock_from_before_the_write_does_not_count() {
        // The peer sent for minutes while we sent nothing (its data does
        // not refresh the ACK clock); then we write and the peer is slow.
        let stale = Duration::from_secs(600);
        let checks = (0..7).map(|i| answers(stale + EVERY * (i + 1), 1, 0));
        assert_eq!(
            first_gone(checks),
            None,
            "less than the timeout since the write"
        );
    }

    #[test]
    fn an_ack_restarts_the_silence() {
        let mut checks: Vec<_> = (0..6).map(|i| answers(EVERY * (i + 1), 2, 0)).collect();
        checks.push(answers(Duration::from_millis(10), 2, 0));
        checks.extend((0..7).map(|i| answers(EVERY * (i + 1), 2, 0)));
        assert_eq!(first_gone(checks), None);
    }

    #[test]
    fn writes_wake_the_watch_once_until_cleared() {
        let writes = Writes::default();
        writes.note();
        writes.note();
        futures_util::FutureExt::now_or_never(writes.next()).expect("noted");
        assert!(futures_util::FutureExt::now_or_never(writes.next()).is_none());
        writes.note();
        writes.clear();
        assert!(futures_util::FutureExt::now_or_never(writes.next()).is_none());
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
        let timeout = Duration::from_millis(500);
        let writes = Writes::default();
        let chunk = vec![0u8; 64 * 1024];
        // Fill every buffer on the way: a write that waits 200 ms is blocked.
        writes.note();
        while tokio::time::timeout(Duration::from_millis(200), tcp.write_all(&chunk))
            .await
            .is_ok()
        {}
        let watched =
            tokio::time::timeout(Duration::from_secs(4), watch(&tcp, timeout, Some(&writes))).await;
        assert!(watched.is_err(), "a live peer was called gone: {watched:?}");
        let answers = peer_answers(&tcp).unwrap();
        assert_eq!(answers.unacked_segments, 0, "{answers:?}");
        assert!(answers.unsent_bytes > 0, "{answers:?}");
    }

    /// What the kernel says of a connection whose peer took everything.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_peer_that_took_everything_owes_nothing() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut tcp, (mut peer, _)) = (tcp.unwrap(), accepted.unwrap());
        tcp.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).await.unwrap();
        // The ACK may trail the read by a moment.
        let answers = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let answers = peer_answers(&tcp).unwrap();
                if answers.owes_nothing() {
                    break answers;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the peer acknowledges what it read");
        assert_eq!(answers.unanswered_probes, 0);
        assert!(
            answers.since_last_ack < Duration::from_secs(1),
            "{answers:?}"
        );
    }
}
