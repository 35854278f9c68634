//! What one endpoint's calls did, in one struct made with the link at
//! connect time ([`EndpointStats`]): the balancer reads the calls in
//! flight, a [call policy](crate::policy::CallPolicy) reads the rest.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use commy_discovery::PeakEwma;

/// The statistics of one endpoint: a shared-memory link to one instance,
/// or the TLS connection to one peer process (shared by the instances it
/// serves).
///
/// Calls in flight are counted whenever the pool balances between
/// instances or has a call policy. Outcomes (calls, failures, latency) are
/// recorded only for services that have a call policy: without one the
/// call path reads no clock for them.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub(crate) in_flight: AtomicUsize,
    calls: AtomicU64,
    failures: AtomicU64,
    latency_ns: AtomicU64,
    last_latency_ns: AtomicU64,
    /// The peak-EWMA load of a TLS endpoint's calls (the balancer's load
    /// for remote instances); unused for shared memory.
    pub(crate) ewma: PeakEwma,
}

impl EndpointStats {
    /// Calls sent and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed) as u64
    }

    /// Calls whose outcome was recorded.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Recorded calls that failed (any status but OK).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The round trip of the last recorded call.
    pub fn last_latency(&self) -> Duration {
        Duration::from_nanos(self.last_latency_ns.load(Ordering::Relaxed))
    }

    /// The mean round trip of the recorded calls (zero before the first).
    pub fn mean_latency(&self) -> Duration {
        let n = self.calls();
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed) / n)
    }

    /// Records one call's outcome.
    pub(crate) fn record(&self, ok: bool, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_ns.fetch_add(ns, Ordering::Relaxed);
        self.last_latency_ns.store(ns, Ordering::Relaxed);
    }
}

/// When the peak-EWMA loads' clock started: the first time it was read.
fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since [`clock_start`]: the clock of the peak-EWMA loads.
pub(crate) fn now_ms() -> u64 {
    ms_at(Instant::now())
}

fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(clock_start()).as_millis() as u64
}

/// One call in this many to a TLS endpoint is timed for its peak-EWMA
/// load (per thread): timing costs two clock reads and a compare-and-swap
/// on a word every caller of the endpoint shares, which with many calls
/// in flight was a seventh of the connection's throughput; a sample in
/// four still follows a slowing endpoint within a few calls.
const TIME_ONE_IN: u32 = 4;

thread_local! {
    static CALLS_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A call to a TLS endpoint, timed for its peak-EWMA load from its start
/// to its end (one in [`TIME_ONE_IN`]); a call given up on (dropped) ends
/// then, its time so far its sample.
pub(crate) struct Measured<'a> {
    timed: Option<(&'a PeakEwma, Instant)>,
}

impl<'a> Measured<'a> {
    pub(crate) fn start(ewma: &'a PeakEwma) -> Measured<'a> {
        let n = CALLS_SEEN.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        Measured {
            timed: n
                .is_multiple_of(TIME_ONE_IN)
                .then(|| (ewma, Instant::now())),
        }
    }
}

impl Drop for Measured<'_> {
    fn drop(&mut self) {
        if let Some((ewma, started)) = self.timed {
            let now = Instant::now();
            ewma.observe(now.saturating_duration_since(started), ms_at(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_add_up_to_counts_and_a_mean() {
        let s = EndpointStats::default();
        assert_eq!(s.mean_latency(), Duration::ZERO);
        s.record(true, Duration::from_micros(10));
        s.record(false, Duration::from_micros(30));
        assert_eq!((s.calls(), s.failures()), (2, 1));
        assert_eq!(s.mean_latency(), Duration::from_micros(20));
        assert_eq!(s.last_latency(), Duration::from_micros(30));
        assert_eq!(s.in_flight(), 0);
    }
}
