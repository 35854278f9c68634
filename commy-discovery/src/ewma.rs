//! The peak-EWMA load of one endpoint (linkerd's, after Finagle): a
//! moving average of its round-trip times that jumps up to a slower
//! sample at once and decays back down with time, multiplied by the calls
//! in flight to it. The power of two choices over this cost sends calls
//! away from an endpoint as soon as it slows down, and back once it
//! recovers.
//!
//! Sans-IO: the caller says what time it is, in milliseconds from any
//! fixed start of its own, and how many calls are in flight (it counts
//! them already). Every operation is one atomic operation on one word,
//! with no allocation and no lock.
//!
//! ```
//! use std::time::Duration;
//! use commy_discovery::PeakEwma;
//!
//! let fast = PeakEwma::new(Duration::from_millis(30), Duration::from_secs(10));
//! let slow = PeakEwma::new(Duration::from_millis(30), Duration::from_secs(10));
//! fast.observe(Duration::from_millis(1), 100);
//! slow.observe(Duration::from_millis(80), 100);
//! assert!(slow.cost(100, 0) > fast.cost(100, 0));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One endpoint's peak-EWMA load: see the [module](self).
#[derive(Debug)]
pub struct PeakEwma {
    /// The decay's time constant, in milliseconds.
    tau_ms: f64,
    /// The estimate in nanoseconds (`f32` bits, high half) and when it was
    /// last updated, in milliseconds (low half, wrapping): one word, so
    /// that an update is one compare-and-swap.
    state: AtomicU64,
}

impl Default for PeakEwma {
    /// linkerd's defaults: 30 ms assumed before the first answer, a time
    /// constant of 10 s.
    fn default() -> PeakEwma {
        PeakEwma::new(Duration::from_millis(30), Duration::from_secs(10))
    }
}

impl PeakEwma {
    /// An endpoint not measured yet, assumed to answer in `default_rtt`
    /// (linkerd: 30 ms, so that a new endpoint is not flooded before its
    /// first answer); samples decay with the time constant `decay`
    /// (linkerd: 10 s).
    pub fn new(default_rtt: Duration, decay: Duration) -> PeakEwma {
        PeakEwma {
            tau_ms: (decay.as_secs_f64() * 1e3).max(1.0),
            state: AtomicU64::new(pack(default_rtt.as_nanos() as f32, 0)),
        }
    }

    /// Takes the round trip `rtt` of a call answered at `now_ms`: a sample
    /// above the estimate replaces it, one below moves it down by how long
    /// the estimate has stood.
    pub fn observe(&self, rtt: Duration, now_ms: u64) {
        let sample = rtt.as_nanos() as f32;
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (estimate, stamp) = unpack(word);
                let next = if sample > estimate {
                    sample
                } else {
                    let w = self.weight(stamp, now_ms);
                    estimate * w + sample * (1.0 - w)
                };
                Some(pack(next, now_ms))
            });
    }

    /// The endpoint's cost at `now_ms` with `in_flight` calls sent to it
    /// and not answered: the estimate, decayed by the time since the last
    /// answer, times the calls in flight plus one (in nanoseconds; for
    /// [`PowerOfTwo::pick`](crate::PowerOfTwo::pick)).
    pub fn cost(&self, now_ms: u64, in_flight: u64) -> u64 {
        let (estimate, stamp) = unpack(self.state.load(Ordering::Acquire));
        let decayed = f64::from(estimate) * f64::from(self.weight(stamp, now_ms));
        (decayed * (in_flight as f64 + 1.0)) as u64
    }

    /// The round-trip estimate at `now_ms`, decayed.
    pub fn rtt(&self, now_ms: u64) -> Duration {
        let (estimate, stamp) = unpack(self.state.load(Ordering::Acquire));
        Duration::from_nanos((estimate * self.weight(stamp, now_ms)) as u64)
    }

    /// How much of an estimate made at `stamp` still counts at `now_ms`.
    fn weight(&self, stamp: u32, now_ms: u64) -> f32 {
        // The stamp wraps every 49 days; a clock that went back counts as
        // no time at all.
        let elapsed = (now_ms as u32).wrapping_sub(stamp);
        let elapsed = if elapsed > u32::MAX / 2 { 0 } else { elapsed };
        (-f64::from(elapsed) / self.tau_ms).exp() as f32
    }
}

fn pack(estimate_ns: f32, now_ms: u64) -> u64 {
    let estimate = if estimate_ns.is_finite() && estimate_ns > 0.0 {
        estimate_ns
    } else {
        0.0
    };
    u64::from(estimate.to_bits()) << 32 | u64::from(now_ms as u32)
}

fn unpack(word: u64) -> (f32, u32) {
    (f32::from_bits((word >> 32) as u32), word as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn endpoint() -> PeakEwma {
        PeakEwma::new(30 * MS, Duration::from_secs(10))
    }

    fn answered(e: &PeakEwma, rtt: Duration, now_ms: u64) {
        e.observe(rtt, now_ms);
    }

    #[test]
    fn a_slower_sample_counts_at_once_and_a_faster_one_by_degrees() {
        let e = endpoint();
        answered(&e, MS, 0);
        // The default 30 ms estimate is above 1 ms: it decays towards it
        // only as time passes (no time passed: it stays).
        assert_eq!(e.rtt(0), 30 * MS);
        answered(&e, 100 * MS, 10);
        assert_eq!(e.rtt(10), 100 * MS, "the peak is taken at once");
        // 10 s (one time constant) later, a fast sample pulls it most of
        // the way down: e^-1 of the old estimate remains.
        answered(&e, MS, 10_010);
        let rtt = e.rtt(10_010).as_secs_f64() * 1e3;
        let expected = 100.0 * (-1f64).exp() + 1.0 * (1.0 - (-1f64).exp());
        assert!(
            (rtt - expected).abs() < 0.1,
            "{rtt} ms, expected {expected}"
        );
    }

    #[test]
    fn the_cost_grows_with_calls_in_flight_and_fades_while_idle() {
        let e = endpoint();
        answered(&e, 10 * MS, 0);
        let idle = e.cost(0, 0);
        assert_eq!(e.cost(0, 2), 3 * idle);
        assert!(
            e.cost(60_000, 0) < idle / 100,
            "an idle endpoint looks cheap again"
        );
    }

    #[test]
    fn p2c_over_peak_ewma_avoids_a_slow_endpoint() {
        let p2c = crate::PowerOfTwo::new();
        let endpoints: Vec<PeakEwma> = (0..3).map(|_| endpoint()).collect();
        // One endpoint 5 ms slower; calls one after another, the clock
        // moving on by each call's round trip.
        let rtt = |i: usize| if i == 2 { 6 * MS } else { MS };
        let mut picked = [0u32; 3];
        let mut now = 0;
        for _ in 0..10_000 {
            let i = p2c.pick(3, |i| endpoints[i].cost(now, 0)).unwrap();
            picked[i] += 1;
            now += rtt(i).as_millis() as u64;
            answered(&endpoints[i], rtt(i), now);
        }
        assert!(picked[2] < 500, "the slow endpoint took {picked:?}");
    }

    #[test]
    fn nonsense_samples_and_clocks_stay_finite() {
        let e = endpoint();
        answered(&e, Duration::MAX, 5);
        answered(&e, Duration::ZERO, u64::MAX);
        answered(&e, MS, 3);
        let _ = e.cost(0, u64::MAX);
        assert!(e.rtt(u64::MAX / 2) <= Duration::from_secs(u64::MAX));
    }
}
