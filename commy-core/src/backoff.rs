//! How an accept loop waits after a failed `accept` (no descriptors left:
//! `EMFILE`, `ENFILE`; no memory: `ENOBUFS`, `ENOMEM`), without I/O: the
//! loop asks [`AcceptBackoff::failed`] how long to wait and whether to
//! log, and tells [`AcceptBackoff::succeeded`] when accepting works again.
//! A listener out of descriptors thus costs a few wake-ups a second, not a
//! core, and a handful of log lines, not thousands; it recovers at the
//! first accept that succeeds.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use commy_core::backoff::AcceptBackoff;
//!
//! let mut backoff = AcceptBackoff::new();
//! let now = Instant::now();
//! let first = backoff.failed(now);
//! assert_eq!(first.wait, AcceptBackoff::FIRST);
//! assert_eq!(first.report, Some(1)); // the first failure of a spell is logged
//! let second = backoff.failed(now);
//! assert_eq!(second.wait, AcceptBackoff::FIRST * 2);
//! assert_eq!(second.report, None); // then at most once per REPORT_EVERY
//! assert_eq!(backoff.succeeded(), Some(2)); // the spell ends: 2 failures
//! assert_eq!(backoff.succeeded(), None);
//! ```

use std::time::{Duration, Instant};

/// The state of one accept loop's backoff.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    /// Failures since the last successful accept.
    failures: u64,
    /// The failures already reported.
    reported: u64,
    /// When the spell was last reported.
    last_report: Option<Instant>,
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long to wait before accepting again.
    pub wait: Duration,
    /// `Some(n)`: log now; `n` failures happened since the last line.
    pub report: Option<u64>,
}

impl AcceptBackoff {
    /// The wait after the first failure; each further failure doubles it.
    pub const FIRST: Duration = Duration::from_millis(5);
    /// The longest wait: how late, at most, accepting resumes once
    /// descriptors are free again.
    pub const MAX: Duration = Duration::from_millis(250);
    /// How often, at most, a spell of failures is logged.
    pub const REPORT_EVERY: Duration = Duration::from_secs(10);

    /// A loop that has not failed.
    pub const fn new() -> AcceptBackoff {
        AcceptBackoff {
            failures: 0,
            reported: 0,
            last_report: None,
        }
    }

    /// Records a failed accept at `now`.
    pub fn failed(&mut self, now: Instant) -> AfterFailure {
        self.failures += 1;
        let doublings = (self.failures - 1).min(16) as u32;
        let wait = Self::FIRST.saturating_mul(1 << doublings).min(Self::MAX);
        let due = self
            .last_report
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::REPORT_EVERY);
        let report = due.then(|| {
            self.last_report = Some(now);
            let n = self.failures - self.reported;
            self.reported = self.failures;
            n
        });
        AfterFailure { wait, report }
    }

    /// Records a successful accept: `Some(n)` if it ends a spell of `n`
    /// failures (worth a log line), `None` if there was none.
    pub fn succeeded(&mut self) -> Option<u64> {
        let spell = std::mem::take(&mut self.failures);
        self.reported = 0;
        self.last_report = None;
        (spell > 0).then_some(spell)
    }

    /// Failures since the last successful accept.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_reports_are_rate_limited() {
        let mut b = AcceptBackoff::new();
        let t0 = Instant::now();
        let waits: Vec<_> = (0..10).map(|_| b.failed(t0).wait.as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 250, 250, 250, 250]);
        // Thousands of failures within REPORT_EVERY: no line beyond the first.
        for _ in 0..10_000 {
            assert_eq!(b.failed(t0).report, None);
        }
        assert_eq!(b.failed(t0).wait, AcceptBackoff::MAX);
        // The next line counts every failure since the first.
        let later = b.failed(t0 + AcceptBackoff::REPORT_EVERY);
        assert_eq!(later.report, Some(10_011));
        assert_eq!(b.failures(), 10_012);
        assert_eq!(b.succeeded(), Some(10_012));
        // A new spell starts over.
        let again = b.failed(t0 + AcceptBackoff::REPORT_EVERY);
        assert_eq!(
            again,
            AfterFailure {
                wait: AcceptBackoff::FIRST,
                report: Some(1)
            }
        );
    }
}
