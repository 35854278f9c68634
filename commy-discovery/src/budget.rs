//! A retry budget (Finagle's, as linkerd uses it): retries may add at most
//! a share of the requests made in a recent window, plus a small floor per
//! second, so that retrying never multiplies the load on a service that
//! is already failing.
//!
//! Sans-IO: the caller says what time it is, in whole milliseconds from
//! any fixed start of its own. Requests deposit, retries withdraw; both
//! are a few atomic operations with no allocation and no lock, so every
//! call can deposit. Concurrent withdrawals may overspend by as many
//! retries as race for the last token, never more.
//!
//! ```
//! use commy_discovery::RetryBudget;
//!
//! let budget = RetryBudget::default(); // 20 %, 10 a second, over 10 s
//! let now = 0;
//! for _ in 0..100 {
//!     budget.deposit(now);
//! }
//! // The floor (10/s over the 10 s window) and 20 % of 100 requests.
//! let retries = (0..1000).filter(|_| budget.try_withdraw(now)).count();
//! assert_eq!(retries, 100 + 20);
//! ```

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Slots the window is kept in: deposits and withdrawals older than the
/// window fall out a slot at a time.
const SLOTS: usize = 10;

/// A token is this many units: a deposit adds `percent * 10` units, a
/// retry takes `UNIT` (whole percents stay exact).
const UNIT: i64 = 1000;

/// A retry budget: see the [module](self).
#[derive(Debug)]
pub struct RetryBudget {
    /// Units a request deposits.
    per_request: i64,
    /// Units the floor gives over one window.
    floor: i64,
    /// Milliseconds each slot covers (the window is `SLOTS` of them).
    slot_ms: u64,
    /// Per slot: the number of its period (ms / slot_ms) plus one (0: never
    /// used), and the units deposited minus withdrawn in it.
    slots: [(AtomicU64, AtomicI64); SLOTS],
}

impl Default for RetryBudget {
    /// Finagle's and linkerd's defaults: 20 % of requests, 10 retries a
    /// second, deposits kept 10 s.
    fn default() -> RetryBudget {
        RetryBudget::new(20, 10, 10_000)
    }
}

impl RetryBudget {
    /// A budget that lets retries add `percent` % of the requests
    /// deposited in the last `window_ms` milliseconds, plus
    /// `floor_per_sec` retries a second. `window_ms` is rounded up to a
    /// multiple of 10 ms (at least 10).
    pub fn new(percent: u32, floor_per_sec: u32, window_ms: u64) -> RetryBudget {
        let slot_ms = window_ms.div_ceil(SLOTS as u64).max(1);
        let window_ms = slot_ms * SLOTS as u64;
        let floor = i64::from(floor_per_sec) * UNIT * window_ms as i64 / 1000;
        RetryBudget {
            per_request: i64::from(percent) * UNIT / 100,
            floor,
            slot_ms,
            slots: std::array::from_fn(|_| (AtomicU64::new(0), AtomicI64::new(0))),
        }
    }

    /// Counts a request made at `now_ms`.
    pub fn deposit(&self, now_ms: u64) {
        self.add(now_ms, self.per_request);
    }

    /// Counts `n` requests made at about `now_ms` at once: for a caller
    /// that counts its requests itself and deposits them now and then.
    pub fn deposit_many(&self, now_ms: u64, n: u32) {
        self.add(now_ms, self.per_request * i64::from(n));
    }

    /// Takes back the deposits of `n` requests made at about `now_ms`: a
    /// caller that counts every request it sends, retries included, takes
    /// back a retry's, so that retries never earn retries.
    pub fn take_back(&self, now_ms: u64, n: u32) {
        self.add(now_ms, -self.per_request * i64::from(n));
    }

    /// Takes one retry from the budget at `now_ms`: false when the budget
    /// is spent (the retry must not be made).
    pub fn try_withdraw(&self, now_ms: u64) -> bool {
        if self.balance(now_ms) < UNIT {
            return false;
        }
        self.add(now_ms, -UNIT);
        true
    }

    /// Whole retries the budget allows at `now_ms`.
    pub fn available(&self, now_ms: u64) -> u64 {
        (self.balance(now_ms).max(0) / UNIT) as u64
    }

    /// Units in the window ending at `now_ms`, floor included.
    fn balance(&self, now_ms: u64) -> i64 {
        let period = now_ms / self.slot_ms;
        let oldest = period.saturating_sub(SLOTS as u64 - 1);
        let mut units = self.floor;
        for (stamp, slot_units) in &self.slots {
            let p = stamp.load(Ordering::Acquire);
            if p > oldest && p <= period + 1 {
                units += slot_units.load(Ordering::Relaxed);
            }
        }
        units
    }

    /// Adds `units` to the slot of `now_ms`, clearing it first if it last
    /// held an older period.
    fn add(&self, now_ms: u64, units: i64) {
        let period = now_ms / self.slot_ms;
        let (stamp, slot_units) = &self.slots[(period % SLOTS as u64) as usize];
        let current = stamp.load(Ordering::Acquire);
        if current != period + 1 {
            if current > period + 1 {
                // A slot of the future (a clock that went back): this
                // moment is not counted.
                return;
            }
            // The first to see the new period clears the slot; the others
            // add to it after.
            if stamp
                .compare_exchange(current, period + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot_units.store(0, Ordering::Release);
            }
        }
        slot_units.fetch_add(units, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backend_gets_at_most_a_fifth_more_plus_the_floor() {
        // 1000 requests a second for a minute, each failing and retried
        // while the budget allows.
        let budget = RetryBudget::default();
        let (mut requests, mut retries) = (0u64, 0u64);
        for ms in 0..60_000u64 {
            budget.deposit(ms);
            requests += 1;
            if budget.try_withdraw(ms) {
                retries += 1;
            }
        }
        let allowed = requests / 5 + 10 * 60 + 100;
        assert!(
            retries <= allowed,
            "{retries} retries for {requests} requests"
        );
        // And the budget is used: retries are not refused needlessly.
        assert!(
            retries >= requests / 5,
            "{retries} retries for {requests} requests"
        );
    }

    #[test]
    fn deposits_expire_with_the_window() {
        let budget = RetryBudget::new(20, 0, 10_000);
        for _ in 0..50 {
            budget.deposit(0);
        }
        assert_eq!(budget.available(0), 10);
        assert_eq!(budget.available(9_999), 10);
        // The slot of time 0 falls out after 10 s.
        assert_eq!(budget.available(10_000), 0);
        assert!(!budget.try_withdraw(10_000));
    }

    #[test]
    fn the_floor_alone_allows_its_rate_and_withdrawals_count() {
        let budget = RetryBudget::new(20, 10, 1_000);
        assert_eq!(budget.available(0), 10);
        let taken = (0..100).filter(|_| budget.try_withdraw(0)).count();
        assert_eq!(taken, 10);
        // A second later the spent slot has left the window.
        assert_eq!(budget.available(1_000), 10);
    }

    #[test]
    fn a_clock_that_goes_back_neither_panics_nor_mints_tokens() {
        let budget = RetryBudget::new(100, 0, 10_000);
        budget.deposit(50_000);
        assert_eq!(budget.available(50_000), 1);
        // Earlier than the deposit: it is not counted there.
        assert_eq!(budget.available(1_000), 0);
        budget.deposit(1_000);
        assert_eq!(budget.available(1_000), 1);
        assert_eq!(budget.available(u64::MAX), 0);
        budget.deposit(u64::MAX);
        assert_eq!(budget.available(u64::MAX), 1);
    }
}
