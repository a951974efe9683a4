//! Flow control of one connection: the state its streams, its driver and
//! its pinger share ([`ConnShared`]), the budget a new stream must fit in
//! ([`StreamGuard`], [`BudgetExhausted`]), and the stream window the driver
//! advertises as the estimate and the open streams allow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::ledger::Ledger;
use super::{ConnError, H2Settings, WindowBounds};

/// What one connection's streams, its driver and its pinger share.
#[derive(Debug)]
pub struct ConnShared {
    pub(super) settings: H2Settings,
    /// DATA bytes received on tunnel streams (for the window estimate).
    pub(super) received: AtomicU64,
    /// Set while the connection is idle; the first data wakes the pinger.
    pub(super) idle: AtomicBool,
    /// Counts window-estimate samples; a stream that receives data in a new
    /// one resets its byte count for the busiest-stream figure.
    pub(super) epoch: AtomicU64,
    /// Bytes the busiest stream received during the current sample.
    pub(super) busiest: AtomicU64,
    pub(super) data_started: Notify,
    /// Open streams and what they may hold.
    pub(super) ledger: std::sync::Mutex<Ledger>,
    /// The window the estimate asks for.
    pub(super) bdp_window: AtomicU32,
    /// The window last sent as SETTINGS_INITIAL_WINDOW_SIZE.
    pub(super) current_window: AtomicU32,
    /// A keepalive PING went unanswered.
    pub(super) dead: AtomicBool,
    pub(super) driver: AtomicWaker,
}

impl ConnShared {
    pub(super) fn new(settings: H2Settings) -> Arc<Self> {
        let initial = settings.initial_stream_window();
        Arc::new(Self {
            settings,
            received: AtomicU64::new(0),
            idle: AtomicBool::new(true),
            epoch: AtomicU64::new(0),
            busiest: AtomicU64::new(0),
            data_started: Notify::new(),
            ledger: std::sync::Mutex::new(Ledger::default()),
            bdp_window: AtomicU32::new(initial),
            current_window: AtomicU32::new(initial),
            dead: AtomicBool::new(false),
            driver: AtomicWaker::new(),
        })
    }

    /// Counts `n` bytes received on a stream of this connection.
    pub fn note_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.data_started.notify_one();
        }
    }

    /// DATA bytes received on this connection's tunnel streams so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Tunnel streams open on this connection.
    pub fn active_streams(&self) -> usize {
        self.ledger().active() as usize
    }

    /// The stream window in force (last advertised).
    pub fn stream_window(&self) -> u32 {
        self.current_window.load(Ordering::Relaxed)
    }

    /// The settings of this connection.
    pub fn settings(&self) -> &H2Settings {
        &self.settings
    }

    /// What the open streams may hold together, at most, now.
    pub fn committed_bytes(&self) -> u64 {
        self.ledger().committed()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a tunnel stream as open until the guard drops; refuses it when
    /// its window would take the connection past its budget, or when
    /// `max_streams` are open already.
    pub fn try_stream_opened(
        self: &Arc<Self>,
        max_streams: u64,
    ) -> Result<StreamGuard, BudgetExhausted> {
        let guard = {
            let mut ledger = self.ledger();
            // A shrink not yet applied by the peer lets a new stream receive
            // up to the window before it: it is charged that.
            let window = u64::from(ledger.charge(self.stream_window()));
            if ledger.active() >= max_streams {
                return Err(BudgetExhausted {
                    streams: ledger.active(),
                    committed: ledger.committed(),
                });
            }
            let committed = ledger.committed();
            if committed + window > self.settings.budget() {
                return Err(BudgetExhausted {
                    streams: ledger.active(),
                    committed,
                });
            }
            let id = ledger.open(window as u32);
            StreamGuard {
                conn: self.clone(),
                id,
                epoch: AtomicU64::new(u64::MAX),
                epoch_bytes: AtomicU64::new(0),
            }
        };
        self.wake_if_window_changes();
        Ok(guard)
    }

    fn desired_window(&self) -> u32 {
        let WindowBounds { min, max } = self.settings.stream_window_bounds();
        let active = self.ledger().active().max(1);
        // Half the budget shared by the open streams; streams opened at a
        // larger window keep it, so with the defaults about 4,000 streams fit
        // the budget as they open one after another.
        let share = u32::try_from(self.settings.budget() / 2 / active).unwrap_or(u32::MAX);
        self.bdp_window
            .load(Ordering::Relaxed)
            .min(share)
            .clamp(min, max)
    }

    pub(super) fn wake_if_window_changes(&self) {
        if differs(self.desired_window(), self.stream_window()) {
            self.driver.wake();
        }
    }

    /// Called by the driver on every poll: sends a new window when it should.
    /// A larger window is granted to every open stream, so it is cut to what
    /// the budget still allows.
    pub(super) fn adjust(&self, set: impl FnOnce(u32) -> Result<(), ::h2::Error>) -> bool {
        let mut want = self.desired_window();
        let current = self.stream_window();
        let mut ledger = self.ledger();
        if want > current && ledger.active() > 0 {
            let room = self.settings.budget().saturating_sub(ledger.committed()) / ledger.active();
            let most = u64::from(current) + room;
            want = u32::try_from(most.min(u64::from(want))).unwrap_or(want);
        }
        if !differs(want, current) {
            return false;
        }
        // A refusal means the previous SETTINGS awaits its ACK; the driver
        // tries again at its next poll.
        if set(want).is_err() {
            return false;
        }
        ledger.window_changed(current, want);
        drop(ledger);
        tracing::debug!(
            from = current,
            to = want,
            streams = self.active_streams(),
            "stream window changed"
        );
        self.current_window.store(want, Ordering::Relaxed);
        true
    }

    pub(super) fn check_dead(&self) -> Result<(), ConnError> {
        if self.dead.load(Ordering::Acquire) {
            return Err(ConnError::PingTimeout(
                self.settings.liveness.ping_timeout(),
            ));
        }
        Ok(())
    }
}

/// A change of at least a quarter is worth a SETTINGS frame.
fn differs(want: u32, current: u32) -> bool {
    let (a, b) = (u64::from(want), u64::from(current));
    a * 4 < b * 3 || a * 4 > b * 5
}

/// A stream refused because the connection's budget or stream count is spent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the tunnel connection is full: {streams} open streams may hold {committed} bytes (--window-budget, --max-streams-per-connection)"
)]
pub struct BudgetExhausted {
    /// Streams open on the connection.
    pub streams: u64,
    /// What they may hold together.
    pub committed: u64,
}

/// Counts one open tunnel stream of a connection.
#[derive(Debug)]
pub struct StreamGuard {
    conn: Arc<ConnShared>,
    /// This stream's entry in the connection's ledger.
    id: u64,
    /// The sample this stream last received data in, and how much.
    epoch: AtomicU64,
    epoch_bytes: AtomicU64,
}

impl StreamGuard {
    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<ConnShared> {
        &self.conn
    }

    /// Counts `n` bytes received on this stream.
    pub fn note_received(&self, n: usize) {
        self.conn.note_received(n);
        let now = self.conn.epoch.load(Ordering::Relaxed);
        let n = n as u64;
        let bytes = if self.epoch.swap(now, Ordering::Relaxed) != now {
            self.epoch_bytes.store(n, Ordering::Relaxed);
            n
        } else {
            self.epoch_bytes.fetch_add(n, Ordering::Relaxed) + n
        };
        self.conn.busiest.fetch_max(bytes, Ordering::Relaxed);
    }
}

impl StreamGuard {
    /// This stream now holds `bytes` beyond its window (the start of a
    /// message longer than the window, given back so that the rest can
    /// come): charged to the connection's budget until changed or the
    /// stream closes; refused, and nothing charged, when the budget cannot
    /// take it.
    pub fn hold_beyond_window(&self, bytes: usize) -> Result<(), BudgetExhausted> {
        let bytes = bytes as u64;
        let budget = self.conn.settings.budget();
        let mut ledger = self.conn.ledger();
        ledger
            .hold_beyond(self.id, bytes, budget)
            .map_err(|committed| BudgetExhausted {
                streams: ledger.active(),
                committed,
            })
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.ledger().close(self.id);
        self.conn.wake_if_window_changes();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::h2::{DEFAULT_MAX_STREAM_WINDOW, DEFAULT_STREAM_WINDOW, DEFAULT_WINDOW_BUDGET};

    #[test]
    fn what_a_stream_holds_beyond_its_window_is_charged_to_the_budget() {
        let shared = ConnShared::new(H2Settings {
            window_budget: 1 << 20,
            ..H2Settings::default()
        });
        let window = u64::from(DEFAULT_STREAM_WINDOW);
        let a = shared.try_stream_opened(u64::MAX).unwrap();
        let b = shared.try_stream_opened(u64::MAX).unwrap();
        a.hold_beyond_window(300 * 1024).unwrap();
        assert_eq!(shared.committed_bytes(), 2 * window + 300 * 1024);
        // More than the budget leaves: refused, nothing charged.
        let full = b.hold_beyond_window(300 * 1024).unwrap_err();
        assert_eq!(full.committed, 2 * window + 600 * 1024);
        assert_eq!(shared.committed_bytes(), 2 * window + 300 * 1024);
        // A new stream cannot take the room it holds either.
        assert!(shared.try_stream_opened(u64::MAX).is_err());
        // Holding less always succeeds; closing gives it all back.
        a.hold_beyond_window(10).unwrap();
        assert_eq!(shared.committed_bytes(), 2 * window + 10);
        drop(a);
        assert_eq!(shared.committed_bytes(), window);
    }

    #[test]
    fn raises_and_give_backs_charge_a_long_lived_stream_its_peak_not_their_sum() {
        let shared = ConnShared::new(H2Settings::default());
        let long_lived = shared.try_stream_opened(u64::MAX).unwrap();
        // A hundred bulk transfers, each raising the window to 16 MiB and
        // giving it back: the stream that stayed open may hold 16 MiB.
        for _ in 0..100 {
            shared
                .bdp_window
                .store(DEFAULT_MAX_STREAM_WINDOW, Ordering::Relaxed);
            assert!(shared.adjust(|_| Ok(())));
            shared
                .bdp_window
                .store(DEFAULT_STREAM_WINDOW, Ordering::Relaxed);
            assert!(shared.adjust(|_| Ok(())));
        }
        assert_eq!(
            shared.committed_bytes(),
            u64::from(DEFAULT_MAX_STREAM_WINDOW)
        );
        // Just after a give-back a new stream is charged the old window
        // (the peer may not have applied the lower one yet).
        let fresh = shared.try_stream_opened(u64::MAX).unwrap();
        assert_eq!(
            shared.committed_bytes(),
            2 * u64::from(DEFAULT_MAX_STREAM_WINDOW)
        );
        drop((long_lived, fresh));
        assert_eq!(shared.committed_bytes(), 0);
        // A second later the peer has long applied the lower window.
        shared.ledger().previous_until = Some(Instant::now() - Duration::from_millis(1));
        // New streams open freely: the budget was never spent by the cycles.
        let guards: Vec<_> = (0..1000)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        assert_eq!(guards.len(), 1000);
    }

    #[test]
    fn many_open_streams_share_the_budget_down_to_the_floor() {
        let shared = ConnShared::new(H2Settings::default());
        assert_eq!(shared.desired_window(), DEFAULT_STREAM_WINDOW);
        let guards: Vec<_> = (0..4096)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        // Half of 1 GiB over 4,096 streams is 128 KiB each.
        assert_eq!(shared.desired_window(), 128 * 1024);
        drop(guards);
        assert_eq!(shared.active_streams(), 0);
        assert_eq!(shared.committed_bytes(), 0);
        assert_eq!(shared.desired_window(), DEFAULT_STREAM_WINDOW);
    }

    #[test]
    fn streams_beyond_the_budget_are_refused_and_raises_are_cut_to_it() {
        let settings = H2Settings {
            window_budget: 8 << 20,
            ..H2Settings::default()
        };
        let shared = ConnShared::new(settings);
        // 8 MiB of budget holds 32 streams of 256 KiB.
        let mut guards: Vec<_> = (0..32)
            .map(|_| shared.try_stream_opened(u64::MAX).unwrap())
            .collect();
        assert_eq!(shared.committed_bytes(), 8 << 20);
        let err = shared.try_stream_opened(u64::MAX).unwrap_err();
        assert_eq!(err.streams, 32);
        // Closing streams makes room again.
        guards.truncate(2);
        assert_eq!(shared.committed_bytes(), 512 * 1024);
        // The estimate asks for 16 MiB windows; half the budget over 2
        // streams allows 2 MiB each, and every open stream gets the raise.
        shared
            .bdp_window
            .store(DEFAULT_MAX_STREAM_WINDOW, Ordering::Relaxed);
        let mut sent = None;
        assert!(shared.adjust(|w| {
            sent = Some(w);
            Ok(())
        }));
        assert_eq!(sent, Some(2 << 20));
        assert_eq!(shared.committed_bytes(), 4 << 20);
        // Two more streams at 2 MiB fill the budget.
        guards.extend((0..2).map(|_| shared.try_stream_opened(u64::MAX).unwrap()));
        assert_eq!(shared.committed_bytes(), 8 << 20);
        assert!(shared.try_stream_opened(u64::MAX).is_err());
        // The window shrinks for 4 streams, but that takes back no credit:
        // the open streams may still hold what they were given.
        assert!(shared.adjust(|w| {
            sent = Some(w);
            Ok(())
        }));
        assert_eq!(sent, Some(1 << 20));
        assert_eq!(shared.committed_bytes(), 8 << 20);
        assert!(shared.try_stream_opened(u64::MAX).is_err());
        drop(guards);
        assert_eq!(shared.committed_bytes(), 0);
        assert!(shared.try_stream_opened(u64::MAX).is_ok());
    }

    #[test]
    fn four_thousand_streams_fit_the_default_budget_even_opened_at_once() {
        // Opened within a second, each charged the window before the last
        // shrink (the peer may not have applied it yet).
        let shared = ConnShared::new(H2Settings::default());
        let mut guards = Vec::new();
        for i in 0..4_000 {
            // The driver follows the stream count as it polls.
            shared.adjust(|_| Ok(()));
            guards.push(
                shared
                    .try_stream_opened(u64::MAX)
                    .unwrap_or_else(|e| panic!("stream {i}: {e}")),
            );
        }
        assert!(shared.committed_bytes() <= DEFAULT_WINDOW_BUDGET);
    }

    #[test]
    fn small_changes_send_no_settings() {
        assert!(!differs(100, 110));
        assert!(differs(100, 200));
        assert!(differs(200, 100));
    }
}
