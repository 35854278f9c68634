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
    /// (then `line` is not even called); says whether it was written.
    pub(crate) fn warn(&self, line: impl FnOnce() -> String) -> bool {
        let Some(n) = self.0.lock().admit(Instant::now()) else {
            return false;
        };
        tracing::warn!("{}{}", line(), left_out(n));
        true
    }
}

/// Warnings about links the other side broke, on the client side: links
/// to services, and publishers' links into this process's subscriptions.
pub(crate) static CLIENT_LINKS: Warnings = Warnings::new();

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of warnings writes BURST lines.
    #[test]
    fn a_burst_writes_a_handful_of_lines() {
        let warnings = Warnings::new();
        let written = (0..30)
            .filter(|i| warnings.warn(|| format!("warning {i}")))
            .count();
        assert_eq!(written, BURST as usize);
    }
}
