//! The clock of the peak-EWMA loads, ejections and the retry budget:
//! whole milliseconds since the first time it was read in this process.

use std::sync::OnceLock;
use std::time::Instant;

/// When the peak-EWMA loads' clock started: the first time it was read.
fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since [`clock_start`]: the clock of the peak-EWMA loads.
pub(crate) fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// Milliseconds since [`clock_start`] at `t`.
pub(crate) fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(clock_start()).as_millis() as u64
}
