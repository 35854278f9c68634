//! A limit on repeated log lines, without I/O: a burst of lines per window,
//! then silence, with the number left out told in the next line that is
//! written. A peer that opens thousands of bad connections costs a handful
//! of lines, not thousands.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use commy_core::log_limit::LogLimit;
//!
//! let mut limit = LogLimit::new(2, Duration::from_secs(10));
//! let t0 = Instant::now();
//! assert_eq!(limit.admit(t0), Some(0));
//! assert_eq!(limit.admit(t0), Some(0));
//! assert_eq!(limit.admit(t0), None); // the third in the window is left out
//! // The first line of the next window says one was left out.
//! assert_eq!(limit.admit(t0 + Duration::from_secs(10)), Some(1));
//! ```

use std::time::{Duration, Instant};

/// The state of one kind of repeated log line.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    window: Duration,
    start: Option<Instant>,
    written: u32,
    left_out: u64,
}

impl LogLimit {
    /// At most `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> LogLimit {
        LogLimit {
            burst,
            window,
            start: None,
            written: 0,
            left_out: 0,
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` if so, `n` being
    /// the lines left out since the last one written (to say so in this
    /// one); `None` if it is left out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let new_window = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if new_window {
            self.start = Some(now);
            self.written = 0;
        }
        if self.written >= self.burst {
            self.left_out += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

/// `" (N more left out)"` for a line that follows `n` left out, else `""`.
pub fn left_out(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it left out)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_a_burst_per_window_and_counts_the_rest() {
        let mut l = LogLimit::new(10, Duration::from_secs(10));
        let t0 = Instant::now();
        let written = (0..10_000).filter(|_| l.admit(t0).is_some()).count();
        assert_eq!(written, 10);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(l.admit(later), Some(9_990));
        assert_eq!(l.admit(later), Some(0));
        assert_eq!(left_out(0), "");
        assert_eq!(left_out(3), " (3 more like it left out)");
    }
}
