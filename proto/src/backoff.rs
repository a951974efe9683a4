//! Capped exponential backoff with jitter, the one retry delay policy of every component.

use std::time::Duration;

use rand::Rng;

/// First delay cap of [`Backoff::default`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Largest delay of [`Backoff::default`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Retry delays that double per attempt up to a cap, randomised so that many peers
/// retrying at once spread out.
///
/// Attempt `n` (from 0) waits a random duration in `[cap/2, cap]`, where
/// `cap = min(max, base * 2^n)`. Keeping half the cap as a floor means a retry loop
/// never spins, while the random half still spreads a thundering herd.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    /// A backoff whose first cap is `base` and whose delays never exceed `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: 0,
        }
    }

    /// The delay before the next attempt; counts one attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempts = self.attempts.saturating_add(1);
        rand::rng().random_range(cap / 2..=cap)
    }

    /// Starts over from `base`, e.g. after a connection stayed up.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// How many delays were handed out since creation or the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// `min(max, base * 2^attempts)` without overflow.
    fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempts).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    /// [`DEFAULT_BACKOFF_BASE`] up to [`DEFAULT_BACKOFF_MAX`].
    fn default() -> Self {
        Self::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_stay_within_half_cap_and_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let caps = [100, 200, 400, 800, 1000, 1000, 1000];
        for cap in caps {
            let cap = cap * MS;
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert_eq!(b.attempts(), caps.len() as u32);
    }

    #[test]
    fn no_overflow_after_many_attempts() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..10_000 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(30));
        }
        assert!(b.next_delay() >= Duration::from_secs(15));

        // Even a huge base and max saturate instead of panicking.
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..100 {
            b.next_delay();
        }
        b.attempts = u32::MAX;
        assert!(b.next_delay() >= Duration::MAX / 2);
        assert_eq!(b.attempts(), u32::MAX);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(30));
        for _ in 0..8 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn delays_are_jittered() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay());
        }
        assert!(seen.len() > 1, "20 delays were all equal: {seen:?}");
    }

    #[test]
    fn default_uses_named_constants() {
        let mut b = Backoff::default();
        let d = b.next_delay();
        assert!(d >= DEFAULT_BACKOFF_BASE / 2 && d <= DEFAULT_BACKOFF_BASE);
        for _ in 0..50 {
            assert!(b.next_delay() <= DEFAULT_BACKOFF_MAX);
        }
    }

    #[test]
    fn max_below_base_caps_at_max() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn zero_base_gives_zero_delays() {
        let mut b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
