//! The ledger of one connection's streams: what each open stream may come
//! to hold (its peak, and what it holds beyond its window), their sum, and
//! the window a new stream is charged while the peer may not have applied
//! the last change yet.

use std::time::{Duration, Instant};

/// How long a stream opened after a window change is charged the window
/// before it (the peer applies a change one trip after we send it).
const PREVIOUS_WINDOW_GRACE: Duration = Duration::from_secs(1);

/// The streams of one connection and what they may hold: each stream may
/// come to hold the largest window in force while it is open (a shrink
/// takes back only future credit), its *peak*. Every peak is at least the
/// window in force, so a raise by `d` adds at most `d` per open stream.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Sum of the open streams' peaks and of what they hold beyond them.
    committed: u64,
    /// Peak of each open stream, by id.
    peaks: std::collections::HashMap<u64, u32>,
    /// Bytes a stream holds beyond its window (the start of a message it
    /// gave back to receive the rest), by id; absent when none.
    beyond: std::collections::HashMap<u64, u64>,
    next_id: u64,
    /// The window before the last change, and until when it may still
    /// bind: a lowered window binds only once the peer applied it.
    previous_window: u32,
    pub(super) previous_until: Option<Instant>,
}

impl Ledger {
    pub(super) fn committed(&self) -> u64 {
        self.committed
    }

    /// Open streams.
    pub(super) fn active(&self) -> u64 {
        self.peaks.len() as u64
    }

    /// The window a stream opened now must be charged: the one in force, or
    /// the one before it while the peer may not have applied the change.
    pub(super) fn charge(&mut self, current: u32) -> u32 {
        match self.previous_until {
            Some(until) if Instant::now() < until => current.max(self.previous_window),
            _ => {
                self.previous_until = None;
                current
            }
        }
    }

    pub(super) fn open(&mut self, peak: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.peaks.insert(id, peak);
        self.committed += u64::from(peak);
        id
    }

    pub(super) fn close(&mut self, id: u64) {
        if let Some(peak) = self.peaks.remove(&id) {
            self.committed -= u64::from(peak);
        }
        if let Some(bytes) = self.beyond.remove(&id) {
            self.committed -= bytes;
        }
    }

    /// Stream `id` now holds `bytes` beyond its window: charged if the sum
    /// stays within `budget` (or does not grow); if not, nothing is charged
    /// and the error is the sum it would have come to.
    pub(super) fn hold_beyond(&mut self, id: u64, bytes: u64, budget: u64) -> Result<(), u64> {
        let before = self.beyond.get(&id).copied().unwrap_or(0);
        if bytes > before && self.committed + (bytes - before) > budget {
            return Err(self.committed + (bytes - before));
        }
        self.committed = self.committed - before + bytes;
        if bytes == 0 {
            self.beyond.remove(&id);
        } else {
            self.beyond.insert(id, bytes);
        }
        Ok(())
    }

    /// The window went from `from` to `to`: a raise lifts every open
    /// stream's peak to it.
    pub(super) fn window_changed(&mut self, from: u32, to: u32) {
        self.previous_window = from;
        self.previous_until = Some(Instant::now() + PREVIOUS_WINDOW_GRACE);
        if to > from {
            for peak in self.peaks.values_mut() {
                if *peak < to {
                    self.committed += u64::from(to - *peak);
                    *peak = to;
                }
            }
        }
    }
}
