//! The pinger: keepalive PINGs with a timeout, and the bandwidth-delay
//! product estimate that shares the one outstanding PING and asks for a
//! larger (or, when the link no longer fills it, a smaller) stream window.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{ConnShared, H2Settings};

/// How often the window estimate pings while data flows, at first.
const BDP_PING_DELAY: Duration = Duration::from_millis(10);
/// Longest delay between estimate pings while data flows.
const BDP_PING_DELAY_MAX: Duration = Duration::from_secs(1);

/// Keepalive and window estimate: one PING outstanding at a time.
pub(super) async fn pinger(mut pings: ::h2::PingPong, shared: Arc<ConnShared>) {
    let liveness = shared.settings.liveness;
    let mut bdp = Bdp::new(shared.bdp_window.load(Ordering::Relaxed));
    let mut last_received = shared.received.load(Ordering::Relaxed);
    loop {
        let flowing = shared.received.load(Ordering::Relaxed) != last_received;
        if flowing {
            tokio::time::sleep(bdp.delay).await;
        } else {
            shared.idle.store(true, Ordering::Release);
            // The first sample after an idle spell may catch a transfer in
            // TCP slow start: it never gives the window back alone.
            bdp.low_samples = 0;
            // Data that arrived between the check and now must not be missed.
            if shared.received.load(Ordering::Relaxed) == last_received {
                let started = tokio::time::timeout(
                    liveness.keepalive_interval,
                    shared.data_started.notified(),
                )
                .await
                .is_ok();
                if started {
                    // Sample once the data has flowed for a while: pinging at
                    // its first byte would cost every request/response
                    // exchange on an idle connection a PING and its ACK on
                    // each leg (a fifth more frames, syscalls and wake-ups
                    // per round trip, measured).
                    tokio::time::sleep(bdp.delay).await;
                }
            }
            shared.idle.store(false, Ordering::Release);
        }
        shared.busiest.store(0, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::Relaxed);
        let before = shared.received.load(Ordering::Relaxed);
        let sent = Instant::now();
        match tokio::time::timeout(liveness.ping_timeout(), pings.ping(::h2::Ping::opaque())).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::trace!(%err, "ping failed; the connection is closing");
                return;
            }
            Err(_) => {
                shared.dead.store(true, Ordering::Release);
                shared.driver.wake();
                return;
            }
        }
        let after = shared.received.load(Ordering::Relaxed);
        last_received = after;
        // The window is per stream: what the busiest stream moved is what
        // counts, not many streams' sum nor their mean (one bulk transfer
        // beside trickling streams must keep its window).
        let busiest = shared.busiest.load(Ordering::Relaxed);
        tracing::trace!(bytes = after - before, busiest, rtt = ?sent.elapsed(), window = bdp.window, "window estimate sample");
        if let Some(window) = bdp.sample(busiest, sent.elapsed(), &shared.settings) {
            shared.bdp_window.store(window, Ordering::Relaxed);
            shared.wake_if_window_changes();
        }
    }
}

/// Bandwidth-delay product estimate. A PING's round trip is sampled with
/// the bytes that arrived meanwhile: when they reach 2/3 of the window, the
/// window may be the limit (as in hyper's algorithm). The link's product is
/// then the delivery rate times the *smallest* round trip seen, and the
/// window is set to twice that. Using the smallest round trip keeps queueing
/// out of it: when the window only fills buffers (a fast link, a busy
/// machine), the PING waits behind the data, its round trip grows with the
/// window, and an estimate from that round trip would grow without end.
#[derive(Debug)]
struct Bdp {
    window: u32,
    min_rtt: f64,
    delay: Duration,
    /// Consecutive samples in which the link filled little of the window.
    low_samples: u32,
}

impl Bdp {
    fn new(window: u32) -> Self {
        Self {
            window,
            min_rtt: f64::INFINITY,
            delay: BDP_PING_DELAY,
            low_samples: 0,
        }
    }

    fn sample(&mut self, bytes: u64, rtt: Duration, settings: &H2Settings) -> Option<u32> {
        let max = settings.stream_window_bounds().max;
        let rtt = rtt.as_secs_f64().max(1e-6);
        self.min_rtt = self.min_rtt.min(rtt);
        let product = bytes as f64 * (self.min_rtt / rtt);
        if bytes < u64::from(self.window) * 2 / 3 {
            // Not limited by the window.
            self.delay = (self.delay * 2).min(BDP_PING_DELAY_MAX);
            // A window far above what the link now moves is given back, by
            // halves, down to the initial window: a raise left over from a
            // past bulk transfer would otherwise be granted to every new
            // stream and spend the connection's budget (stalled streams
            // hold their whole window).
            let floor = settings.initial_stream_window();
            if self.window > floor && 2.0 * product < f64::from(self.window) / 4.0 {
                // Two low samples in a row: one may be a pause.
                self.low_samples += 1;
                if self.low_samples >= 2 {
                    self.low_samples = 0;
                    self.window = (self.window / 2).max(floor);
                    return Some(self.window);
                }
            } else {
                self.low_samples = 0;
            }
            return None;
        }
        self.low_samples = 0;
        let target = (2.0 * product).min(f64::from(max));
        if target < f64::from(self.window) * 1.25 {
            self.delay = (self.delay * 2).min(BDP_PING_DELAY_MAX);
            return None;
        }
        self.window = target as u32;
        self.delay = (self.delay / 2).max(BDP_PING_DELAY);
        Some(self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::{DEFAULT_MAX_STREAM_WINDOW, DEFAULT_STREAM_WINDOW};

    #[test]
    fn the_estimate_doubles_the_window_only_while_the_link_fills_it() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(DEFAULT_STREAM_WINDOW);
        // A full window arrived within one (unqueued) round trip: the window is the limit.
        let w = bdp
            .sample(
                u64::from(DEFAULT_STREAM_WINDOW),
                Duration::from_millis(50),
                &settings,
            )
            .expect("grows");
        assert_eq!(w, 2 * DEFAULT_STREAM_WINDOW);
        // Far less than the window arrived twice in a row: the link, not
        // the window, limits, and the raise is given back.
        assert_eq!(
            bdp.sample(10_000, Duration::from_millis(50), &settings),
            None
        );
        assert_eq!(
            bdp.sample(10_000, Duration::from_millis(50), &settings),
            Some(DEFAULT_STREAM_WINDOW)
        );
        // Never beyond the ceiling.
        let mut bdp = Bdp::new(DEFAULT_MAX_STREAM_WINDOW / 2);
        let w = bdp
            .sample(1 << 30, Duration::from_millis(50), &settings)
            .unwrap();
        assert_eq!(w, DEFAULT_MAX_STREAM_WINDOW);
    }

    #[test]
    fn a_window_the_link_no_longer_fills_shrinks_back_by_halves_to_the_initial_one() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(4 * DEFAULT_STREAM_WINDOW);
        bdp.min_rtt = 0.05;
        // Idle, then a trickle: halved every second low sample, never
        // below the start.
        let low = |bdp: &mut Bdp, bytes| bdp.sample(bytes, Duration::from_millis(50), &settings);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, 0), Some(2 * DEFAULT_STREAM_WINDOW));
        assert_eq!(low(&mut bdp, 1000), None);
        assert_eq!(low(&mut bdp, 1000), Some(DEFAULT_STREAM_WINDOW));
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, 0), None);
        // A stream that still uses a good part of its window keeps it, and
        // one busy sample between low ones restarts the count.
        let mut bdp = Bdp::new(4 * DEFAULT_STREAM_WINDOW);
        bdp.min_rtt = 0.05;
        let half = u64::from(DEFAULT_STREAM_WINDOW);
        assert_eq!(low(&mut bdp, half), None);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(low(&mut bdp, half), None);
        assert_eq!(low(&mut bdp, 0), None);
        assert_eq!(bdp.window, 4 * DEFAULT_STREAM_WINDOW);
    }

    #[test]
    fn a_round_trip_inflated_by_queued_data_does_not_grow_the_window() {
        let settings = H2Settings::default();
        let mut bdp = Bdp::new(DEFAULT_STREAM_WINDOW);
        // An idle round trip of 200 µs: the link's own delay.
        assert_eq!(bdp.sample(0, Duration::from_micros(200), &settings), None);
        // A full window arrives, but the PING waited 5 ms behind it: the
        // window only filled a queue; the product is 10 KiB, not 256 KiB.
        assert_eq!(
            bdp.sample(
                u64::from(DEFAULT_STREAM_WINDOW),
                Duration::from_millis(5),
                &settings
            ),
            None
        );
    }
}
