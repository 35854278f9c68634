//! Balancer strategies as sans-IO state: given how many candidates there
//! are (and, for load-aware strategies, each one's load), pick one. Whoever
//! holds the candidates (the mesh's pool of a service, a queue group, the
//! TLS router) drives them; they allocate nothing and take no lock, so
//! they sit on the per-call path.
//!
//! ```
//! use commy_discovery::PowerOfTwo;
//!
//! let in_flight = [5_u64, 1];
//! let p2c = PowerOfTwo::new();
//! // With two candidates both are looked at: the less loaded wins.
//! assert_eq!(p2c.pick(2, |i| in_flight[i]), Some(1));
//! assert_eq!(p2c.pick(0, |i| in_flight[i]), None);
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

/// Golden-ratio step of the choice sequence: successive picks land far
/// apart.
const STEP: usize = 0x9E37_79B9;

/// Power of two choices: the less loaded of two distinct candidates drawn
/// at random (ties go to the first). Loads are whatever the caller counts:
/// calls in flight today, a latency estimate later.
#[derive(Debug)]
pub struct PowerOfTwo {
    state: AtomicUsize,
}

impl Default for PowerOfTwo {
    fn default() -> PowerOfTwo {
        PowerOfTwo::new()
    }
}

impl PowerOfTwo {
    /// A new picker.
    pub const fn new() -> PowerOfTwo {
        PowerOfTwo {
            state: AtomicUsize::new(STEP),
        }
    }

    /// Picks one of `n` candidates; `load(i)` is candidate `i`'s load and
    /// is asked at most twice. `None` when `n` is 0; with one candidate,
    /// no load is asked.
    pub fn pick(&self, n: usize, load: impl Fn(usize) -> u64) -> Option<usize> {
        match n {
            0 => None,
            1 => Some(0),
            _ => {
                let (a, b) = self.two(n);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Two distinct indices below `n` (at least 2), from a multiplicative
    /// hash of the next step of the sequence.
    fn two(&self, n: usize) -> (usize, usize) {
        let r = self.state.fetch_add(STEP, Ordering::Relaxed);
        let x = r.wrapping_mul(0x2545_F491_4F6C_DD1D_u64 as usize) >> 7;
        let a = x % n;
        let b = (a + 1 + (x / n) % (n - 1)) % n;
        (a, b)
    }
}

/// Round robin: candidates in turn, from a counter shared by every
/// caller.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A new counter, starting at the first candidate.
    pub const fn new() -> RoundRobin {
        RoundRobin {
            next: AtomicUsize::new(0),
        }
    }

    /// The next of `n` candidates; `None` when `n` is 0.
    pub fn pick(&self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.next.fetch_add(1, Ordering::Relaxed) % n)
    }

    /// Gives the last turn back, for a caller that could not use the
    /// candidate it was given and asks again (with others picking at the
    /// same time, a turn is given back, not necessarily its own).
    pub fn back(&self) {
        self.next.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn power_of_two_draws_two_distinct_candidates(n in 2usize..64, steps in 0usize..500) {
            let p = PowerOfTwo::new();
            for _ in 0..steps {
                let (a, b) = p.two(n);
                prop_assert!(a < n && b < n && a != b);
            }
        }
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_three_and_spreads_ties() {
        let p = PowerOfTwo::new();
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            let i = p.pick(3, |i| [1, 1, 9][i]).unwrap();
            seen[i] += 1;
        }
        assert_eq!(seen[2], 0, "the loaded one lost every draw it was in");
        // Equal loads: both light candidates win about half the draws.
        assert!(seen[0] > 1000 && seen[1] > 1000, "{seen:?}");
    }

    #[test]
    fn power_of_two_asks_no_load_of_a_single_candidate() {
        let p = PowerOfTwo::new();
        assert_eq!(p.pick(1, |_| unreachable!("no load is asked")), Some(0));
        assert_eq!(p.pick(0, |_| 0), None);
    }

    #[test]
    fn round_robin_cycles_through_the_candidates() {
        let rr = RoundRobin::new();
        assert_eq!(rr.pick(0), None);
        let picks: Vec<_> = (0..7).map(|_| rr.pick(3).unwrap()).collect();
        // The empty pick above took no turn.
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }
}
