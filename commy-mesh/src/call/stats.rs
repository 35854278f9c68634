//! What one endpoint's calls did, in one struct made with the link at
//! connect time ([`EndpointStats`]): the balancer reads the calls in
//! flight and whether the endpoint is ejected, a
//! [call policy](crate::policy::CallPolicy) reads the rest. What a pool's
//! endpoints share (the count of those ejected, the retry budget) is its
//! [`PoolHealth`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use commy_core::{Code, Status};
use commy_discovery::{Admit, Outlier, PeakEwma, Standing};

use crate::call::clock::{ms_at, now_ms};
use crate::call::resilience::PoolHealth;

/// The statistics of one endpoint: a shared-memory link to one instance,
/// or the TLS connection to one peer process (shared by the instances it
/// serves).
///
/// Calls in flight are counted whenever the pool balances between
/// instances or has a call policy. Outcomes (calls, failures, latency) are
/// recorded only for services that have a call policy: without one the
/// call path reads no clock for them.
#[derive(Debug)]
pub struct EndpointStats {
    pub(crate) in_flight: AtomicUsize,
    calls: AtomicU64,
    failures: AtomicU64,
    latency_ns: AtomicU64,
    last_latency_ns: AtomicU64,
    /// The peak-EWMA load of a TLS endpoint's calls (the balancer's load
    /// for remote instances); unused for shared memory.
    pub(crate) ewma: PeakEwma,
    /// Whether the endpoint is ejected from its pool for failing.
    pub(crate) outlier: Outlier,
    /// Answers that count against the endpoint ([`counts_against`]), and
    /// local failures of the link or the deadline: every call's, with or
    /// without a call policy.
    failed: AtomicU64,
    /// What its pool's endpoints share.
    health: Arc<PoolHealth>,
    /// Requests sent over TLS, deposited in the pool's retry budget in
    /// lots (a shared-memory link counts its stream ids instead).
    sent: AtomicU64,
}

impl EndpointStats {
    /// The statistics of a new endpoint of the pool whose endpoints share
    /// `health`.
    pub(crate) fn new(health: Arc<PoolHealth>) -> EndpointStats {
        EndpointStats {
            in_flight: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_ns: AtomicU64::new(0),
            last_latency_ns: AtomicU64::new(0),
            ewma: PeakEwma::default(),
            outlier: Outlier::new(health.outlier),
            failed: AtomicU64::new(0),
            health,
            sent: AtomicU64::new(0),
        }
    }

    /// What the endpoint's pool shares.
    pub(crate) fn health(&self) -> &PoolHealth {
        &self.health
    }

    /// The same, to keep.
    pub(crate) fn health_arc(&self) -> Arc<PoolHealth> {
        self.health.clone()
    }

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

    /// Where the endpoint stands in its pool: in (with its failures in a
    /// row), ejected (for how long still) or half-open.
    pub fn standing(&self) -> Standing {
        self.outlier.standing(now_ms())
    }

    /// Times the endpoint was ejected.
    pub fn ejections(&self) -> u16 {
        self.outlier.ejections()
    }

    /// Calls that failed in a way that counts against the endpoint (see
    /// [`counts_against`]), whether or not the service has a call policy.
    pub fn failed_calls(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Counts a request sent over TLS in the pool's retry budget: one
    /// deposit (with its clock read) per [`DEPOSIT_LOT`] requests.
    pub(crate) fn sent(&self) {
        if self
            .sent
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(DEPOSIT_LOT)
        {
            self.health.requested(DEPOSIT_LOT);
        }
    }

    /// Records how an answered (or failed) call went for outlier ejection:
    /// `failure` is its status unless it succeeded. One load when the
    /// endpoint is in and had no failure, the common case.
    #[inline]
    pub(crate) fn answered(&self, failure: Option<&Status>) {
        match failure {
            Some(status) if counts_against(status.code()) => self.failed_once(),
            _ => {
                if self.outlier.succeeded_with(now_ms) {
                    self.health.readmitted();
                }
            }
        }
    }

    #[cold]
    fn failed_once(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let was_in = !self.outlier.is_out();
        let ejected = self.outlier.failed_if(now_ms(), || self.health.may_eject());
        if ejected && was_in {
            self.health.ejected();
        }
    }

    /// Whether the balancer may send a call here: the endpoint is in, its
    /// ejection is over (a trial may be taken), or its pool has too few
    /// endpoints in to be choosy (panic mode). A load when it is in.
    #[inline]
    pub(crate) fn may_take_call(&self) -> bool {
        !self.outlier.is_out() || self.health.panicking() || self.outlier.admits(now_ms())
    }

    /// [`may_take_call`](EndpointStats::may_take_call) for the endpoint
    /// the balancer chose: a half-open one gives this call its trial (or
    /// refuses it, when another caller took the trial first).
    #[inline]
    pub(crate) fn take_call(&self) -> bool {
        if !self.outlier.is_out() {
            return true;
        }
        let admit = self.outlier.admit(now_ms());
        if admit == Admit::No && self.health.panicking() {
            // Too few in to be choosy: it takes the call all the same (a
            // trial, when its time is up, still decides its return).
            self.health.panics.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        admit != Admit::No
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

/// Whether a failure with `code` counts against the endpoint that gave it
/// for outlier ejection: the endpoint (or the link to it) failed or did
/// not answer in time. Answers an application gives (not found, invalid
/// argument, permission denied, ...) show a working endpoint.
pub fn counts_against(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Internal | Code::DeadlineExceeded
    )
}

/// Requests counted before one deposit in the retry budget, for all
/// of them at once.
pub(crate) const DEPOSIT_LOT: u64 = 64;

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
        let s = EndpointStats::new(Arc::new(crate::call::resilience::test_health()));
        assert_eq!(s.mean_latency(), Duration::ZERO);
        s.record(true, Duration::from_micros(10));
        s.record(false, Duration::from_micros(30));
        assert_eq!((s.calls(), s.failures()), (2, 1));
        assert_eq!(s.mean_latency(), Duration::from_micros(20));
        assert_eq!(s.last_latency(), Duration::from_micros(30));
        assert_eq!(s.in_flight(), 0);
    }
}
