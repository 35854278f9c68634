//! Warnings that cannot flood the log: a peer that breaks links or sends
//! garbage in a loop costs a handful of lines, not one per attempt.

use std::time::{Duration, Instant};

use commy_core::log_limit::{LogLimit, left_out};
use parking_lot::Mutex;

/// Lines written per [`WINDOW`] at most, per [`Warnings`].
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

/// One rate-limited stream of warnings (a listener's refusals, a service's
/// broken links, ...): at most [`BURST`] lines per [`WINDOW`]; the first
/// line after a pause says how many were left out.
pub(crate) struct Warnings(Mutex<LogLimit>);

impl Warnings {
    /// A stream that has written nothing yet.
    pub(crate) const fn new() -> Warnings {
        Warnings(parking_lot::const_mutex(LogLimit::new(BURST, WINDOW)))
    }

    /// Writes `line()` as a warning, unless too many were written lately
    /// (then `line` is not even called).
    pub(crate) fn warn(&self, line: impl FnOnce() -> String) {
        if let Some(n) = self.0.lock().admit(Instant::now()) {
            tracing::warn!("{}{}", line(), left_out(n));
        }
    }
}
