//! The link's protocol state machines, with no I/O: the server's credit
//! window, client stream numbering and the reconnect backoff.
//!
//! ```
//! use commy_net::mux::{CreditWindow, CreditError};
//!
//! // The server grants 4 streams up front and returns credit in batches of 2.
//! let mut window = CreditWindow::new(4, 2);
//! assert_eq!(window.initial_grant(), 4);
//! for _ in 0..4 {
//!     window.open()?;
//! }
//! assert_eq!(window.open(), Err(CreditError { granted: 4 }));
//! assert_eq!(window.complete(), None); // 1 returned: below the batch, 3 still in flight
//! assert_eq!(window.complete(), Some(2)); // a batch of 2 goes back
//! window.open()?;
//! # Ok::<(), CreditError>(())
//! ```

use std::time::Duration;

/// A peer opened a stream beyond the credit it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer opened more streams than the {granted} it was granted (credit exceeded)")]
pub struct CreditError {
    /// Streams granted in total so far.
    pub granted: u64,
}

/// The receiving side's view of stream credit: how many streams (requests
/// and one-way messages) the peer may have open, and when to give credit
/// back.
///
/// The receiver grants `initial` streams when the link starts (a Credit
/// frame on stream 0). Each stream the peer opens uses one; each stream the
/// receiver finishes returns one, sent back in batches of `batch` (or at
/// once when nothing is in flight any more, so an idle link never holds back
/// credit). A peer that opens a stream with no credit left breaks the
/// protocol and the link is closed.
#[derive(Debug, Clone)]
pub struct CreditWindow {
    initial: u32,
    batch: u32,
    granted: u64,
    opened: u64,
    finished_unreturned: u32,
    in_flight: u64,
}

impl CreditWindow {
    /// A window granting `initial` streams, returning credit in batches of
    /// `batch` (both at least 1).
    pub fn new(initial: u32, batch: u32) -> CreditWindow {
        let initial = initial.max(1);
        CreditWindow {
            initial,
            batch: batch.clamp(1, initial),
            granted: u64::from(initial),
            opened: 0,
            finished_unreturned: 0,
            in_flight: 0,
        }
    }

    /// The first grant to send.
    pub fn initial_grant(&self) -> u32 {
        self.initial
    }

    /// The peer opened a stream.
    pub fn open(&mut self) -> Result<(), CreditError> {
        if self.opened >= self.granted {
            return Err(CreditError {
                granted: self.granted,
            });
        }
        self.opened += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// A stream finished; returns the credit increment to send now, if any.
    pub fn complete(&mut self) -> Option<u32> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.finished_unreturned += 1;
        if self.finished_unreturned >= self.batch || self.in_flight == 0 {
            let n = std::mem::take(&mut self.finished_unreturned);
            self.granted += u64::from(n);
            Some(n)
        } else {
            None
        }
    }

    /// Streams opened and not finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// Client stream ids: odd, increasing, never reused on one link.
#[derive(Debug, Clone)]
pub struct StreamIds {
    next: u64,
}

impl Default for StreamIds {
    fn default() -> StreamIds {
        StreamIds { next: 1 }
    }
}

impl StreamIds {
    /// The next stream id.
    pub fn take(&mut self) -> u64 {
        let id = self.next;
        self.next += 2;
        id
    }
}

/// Exponential backoff with full jitter: attempt `n` waits a uniformly
/// random time in `[0, min(cap, base * 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, with `unit` a uniform random number in `[0, 1)`.
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The next delay, randomly jittered.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// Failed attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_enforced_and_returned_in_batches() {
        let mut w = CreditWindow::new(8, 4);
        for _ in 0..8 {
            w.open().unwrap();
        }
        assert_eq!(w.open(), Err(CreditError { granted: 8 }));
        assert_eq!(w.complete(), None);
        assert_eq!(w.complete(), None);
        assert_eq!(w.complete(), None);
        assert_eq!(w.complete(), Some(4));
        for _ in 0..4 {
            w.open().unwrap();
        }
        assert!(w.open().is_err());
        assert_eq!(w.in_flight(), 8);
    }

    #[test]
    fn an_idle_window_returns_everything() {
        let mut w = CreditWindow::new(100, 50);
        w.open().unwrap();
        w.open().unwrap();
        assert_eq!(w.complete(), None);
        assert_eq!(w.complete(), Some(2));
        assert_eq!(w.in_flight(), 0);
        // Exactly 100 more may be opened: the two came back.
        for _ in 0..100 {
            w.open().unwrap();
        }
        assert!(w.open().is_err());
    }

    #[test]
    fn degenerate_settings_are_clamped() {
        let mut w = CreditWindow::new(0, 0);
        assert_eq!(w.initial_grant(), 1);
        w.open().unwrap();
        assert!(w.open().is_err());
        assert_eq!(w.complete(), Some(1));
    }

    #[test]
    fn stream_ids_are_odd_and_increasing() {
        let mut ids = StreamIds::default();
        let v: Vec<u64> = (0..4).map(|_| ids.take()).collect();
        assert_eq!(v, [1, 3, 5, 7]);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(b.next_delay_with(0.999_999).as_millis(), 9);
        assert_eq!(b.ceiling(), Duration::from_millis(20));
        assert_eq!(b.next_delay_with(0.5), Duration::from_millis(10));
        assert_eq!(b.next_delay_with(1.0), Duration::from_millis(40));
        assert_eq!(b.next_delay_with(1.0), Duration::from_millis(80));
        assert_eq!(b.next_delay_with(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay_with(0.0), Duration::ZERO);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
        assert_eq!(b.attempts(), 106);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(10));
    }
}
