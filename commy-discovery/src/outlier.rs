//! Outlier ejection of one endpoint (Envoy's, and linkerd's failure
//! accrual): after a run of consecutive failures, or when too few of its
//! calls succeed over a window, the endpoint is taken out of its pool for
//! a while, longer each time it is ejected again; when the
//! time is up it is half-open, and trial calls (a health probe, then a
//! real call) are let through one at a time until enough succeed in a row
//! to re-admit it, or one fails and it is ejected again, for longer.
//!
//! How many of a pool's endpoints may be out at once, and when a pool has
//! too few healthy ones to be choosy (panic mode), are the pool's to say:
//! see [`may_eject`] and [`panics`].
//!
//! The success rate is counted over a window that a failure opens: while
//! no call failed lately, a success costs one load and counts nothing.
//! Once one fails, the calls of the next [`OutlierConfig::window`] are
//! counted, and a failure that leaves the window with at least
//! [`OutlierConfig::min_calls`] calls of which fewer than
//! [`OutlierConfig::min_success_percent`] % succeeded ejects the endpoint.
//!
//! Sans-IO: the caller says what time it is, in milliseconds from any
//! fixed start of its own. The state is two atomic words (where it stands,
//! and the window's counts): asking and recording are a load or a
//! compare-and-swap, with no allocation and no lock.
//!
//! ```
//! use commy_discovery::{Admit, Outlier, OutlierConfig};
//!
//! let e = Outlier::new(OutlierConfig::default()); // 5 failures, 30 s
//! for _ in 0..5 {
//!     e.failed(0, true);
//! }
//! assert_eq!(e.admit(1_000), Admit::No);
//! // 30 s later one trial call goes through at a time.
//! assert_eq!(e.admit(30_000), Admit::Trial);
//! assert_eq!(e.admit(30_000), Admit::No);
//! e.succeeded(30_001);
//! assert_eq!(e.admit(30_002), Admit::Trial);
//! e.succeeded(30_003);
//! assert_eq!(e.admit(30_004), Admit::Yes);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// When an endpoint is ejected, for how long, and how it comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject it (Envoy: 5; 0: no run ejects).
    pub consecutive_failures: u16,
    /// The first ejection's length; the n-th lasts n times as long (Envoy:
    /// 30 s).
    pub base_ejection: Duration,
    /// The longest an ejection lasts (Envoy: 300 s).
    pub max_ejection: Duration,
    /// Trial calls that must succeed in a row to re-admit it (a health
    /// probe and one real call: 2).
    pub trials: u16,
    /// How long a trial may go unreported before another caller is given
    /// one (a trial call that was given up on reports nothing).
    pub trial_timeout: Duration,
    /// The share of calls, in percent, that must succeed over a
    /// [`window`](OutlierConfig::window) (0: no success-rate ejection).
    pub min_success_percent: u16,
    /// Calls a window must have seen before its success rate can eject.
    pub min_calls: u16,
    /// How long a window of counted calls lasts, from the failure that
    /// opened it (Envoy's interval: 10 s).
    pub window: Duration,
}

impl Default for OutlierConfig {
    fn default() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            trials: 2,
            trial_timeout: Duration::from_secs(10),
            min_success_percent: 50,
            min_calls: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// Where an endpoint stands ([`Outlier::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// In its pool, after this many failures in a row.
    In {
        /// Consecutive failures so far.
        failures: u16,
    },
    /// Ejected for this long still.
    Ejected {
        /// Until its ejection ends.
        remaining: Duration,
    },
    /// Its ejection is over; trial calls decide whether it is re-admitted.
    HalfOpen,
}

/// Whether a call may go to an endpoint now ([`Outlier::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// It is in its pool.
    Yes,
    /// It is half-open and this call is its trial: report how it went
    /// ([`Outlier::succeeded`] or [`Outlier::failed`]).
    Trial,
    /// It is ejected, or half-open with a trial under way.
    No,
}

/// How much earlier than a window's start a time may be and still count
/// inside it (a clock read late by another thread); anything earlier is a
/// window long over.
const LATE_READ_MS: i64 = 1_000;

/// The longest window: a quarter of the wrapping millisecond range.
const MAX_WINDOW_MS: i64 = (i32::MAX / 2) as i64;

/// One endpoint's outlier state: see the [module](self).
#[derive(Debug)]
pub struct Outlier {
    config: OutlierConfig,
    /// See [`State`].
    word: AtomicU64,
    /// The success-rate window: see [`Window`] (0: none open).
    window: AtomicU64,
}

/// The unpacked window word: when the failure that opened it came
/// (wrapping milliseconds, 32 bits), and the calls that succeeded and
/// failed since (16 bits each). The word is 0 while no window is open (a
/// window holds at least its opening failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: u32,
    ok: u16,
    failed: u16,
}

impl Window {
    fn pack(self) -> u64 {
        u64::from(self.start) << 32 | u64::from(self.ok) << 16 | u64::from(self.failed)
    }

    fn unpack(word: u64) -> Window {
        Window {
            start: (word >> 32) as u32,
            ok: (word >> 16) as u16,
            failed: word as u16,
        }
    }
}

/// The unpacked state word: the phase (2 bits), times ejected (14 bits),
/// a count (16 bits: consecutive failures while in, trial successes while
/// half-open) and a time in wrapping milliseconds (32 bits): while
/// ejected, the end of the ejection; while a trial is under way, when
/// another may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    phase: Phase,
    ejections: u16,
    count: u16,
    until: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    In,
    Ejected,
    /// Half-open, no trial under way.
    Open,
    /// Half-open, a trial under way.
    Trying,
}

impl State {
    fn pack(self) -> u64 {
        let phase = match self.phase {
            Phase::In => 0,
            Phase::Ejected => 1,
            Phase::Open => 2,
            Phase::Trying => 3,
        };
        phase << 62
            | u64::from(self.ejections & 0x3fff) << 48
            | u64::from(self.count) << 32
            | u64::from(self.until)
    }

    fn unpack(word: u64) -> State {
        State {
            phase: match word >> 62 {
                0 => Phase::In,
                1 => Phase::Ejected,
                2 => Phase::Open,
                _ => Phase::Trying,
            },
            ejections: ((word >> 48) & 0x3fff) as u16,
            count: (word >> 32) as u16,
            until: word as u32,
        }
    }
}

impl Outlier {
    /// An endpoint in its pool, with no failure counted.
    pub fn new(config: OutlierConfig) -> Outlier {
        let state = State {
            phase: Phase::In,
            ejections: 0,
            count: 0,
            until: 0,
        };
        Outlier {
            config,
            word: AtomicU64::new(state.pack()),
            window: AtomicU64::new(0),
        }
    }

    /// Whether a call may go to the endpoint at `now_ms`. An ejection that
    /// is over makes it half-open, and then one caller at a time is
    /// given the trial.
    pub fn admit(&self, now_ms: u64) -> Admit {
        let mut admit = Admit::No;
        let _ = self.update(|s| {
            admit = Admit::No;
            match s.phase {
                Phase::In => {
                    admit = Admit::Yes;
                    None
                }
                Phase::Ejected | Phase::Trying if !reached(now_ms, s.until) => None,
                // A trial whose time is up was given up on: another
                // caller gets one.
                Phase::Ejected | Phase::Open | Phase::Trying => {
                    admit = Admit::Trial;
                    Some(State {
                        phase: Phase::Trying,
                        until: self.trial_until(now_ms),
                        ..s
                    })
                }
            }
        });
        admit
    }

    /// Whether [`admit`](Outlier::admit) at `now_ms` would let a call
    /// through, without taking a trial: for a balancer weighing
    /// candidates it may not choose.
    pub fn admits(&self, now_ms: u64) -> bool {
        let s = State::unpack(self.word.load(Ordering::Acquire));
        match s.phase {
            Phase::In | Phase::Open => true,
            Phase::Ejected | Phase::Trying => reached(now_ms, s.until),
        }
    }

    /// Where the endpoint stands at `now_ms`.
    pub fn standing(&self, now_ms: u64) -> Standing {
        let s = State::unpack(self.word.load(Ordering::Acquire));
        match s.phase {
            Phase::In => Standing::In { failures: s.count },
            Phase::Ejected if !reached(now_ms, s.until) => Standing::Ejected {
                remaining: Duration::from_millis(u64::from(s.until.wrapping_sub(now_ms as u32))),
            },
            Phase::Ejected | Phase::Open | Phase::Trying => Standing::HalfOpen,
        }
    }

    /// When a trial given at `now_ms` may be replaced by another.
    fn trial_until(&self, now_ms: u64) -> u32 {
        let ms = u32::try_from(self.config.trial_timeout.as_millis()).unwrap_or(u32::MAX);
        (now_ms as u32).wrapping_add(ms.min(u32::MAX / 2))
    }

    /// Whether the endpoint is ejected or half-open (for a pool counting
    /// its ejected endpoints): an ejection that is over counts as out
    /// until its trials re-admit it.
    pub fn is_out(&self) -> bool {
        State::unpack(self.word.load(Ordering::Acquire)).phase != Phase::In
    }

    /// Times it was ejected.
    pub fn ejections(&self) -> u16 {
        State::unpack(self.word.load(Ordering::Acquire)).ejections
    }

    /// Records a call that succeeded: the failure run ends; a trial that
    /// succeeded counts towards re-admission. Returns whether this success
    /// re-admitted the endpoint. One load of each word when the endpoint
    /// is in and no call failed lately, the common case.
    pub fn succeeded(&self, now_ms: u64) -> bool {
        self.succeeded_with(|| now_ms)
    }

    /// [`succeeded`](Outlier::succeeded), asking the time only when a
    /// success-rate window is open (most successes need no clock).
    pub fn succeeded_with(&self, now_ms: impl FnOnce() -> u64) -> bool {
        if self.window.load(Ordering::Relaxed) != 0 && !self.is_out() {
            let now = now_ms();
            let _ = self.count_in_window(now, true);
        }
        let trials = self.config.trials.max(1);
        let mut admitted = false;
        let _ = self.update(|s| {
            admitted = false;
            match s.phase {
                Phase::In if s.count == 0 => None,
                Phase::In => Some(State { count: 0, ..s }),
                Phase::Trying if s.count + 1 >= trials => {
                    admitted = true;
                    Some(State {
                        phase: Phase::In,
                        count: 0,
                        until: 0,
                        ..s
                    })
                }
                Phase::Trying => Some(State {
                    phase: Phase::Open,
                    count: s.count + 1,
                    ..s
                }),
                // An answer to a call let through before the ejection.
                Phase::Ejected | Phase::Open => None,
            }
        });
        if admitted {
            // Back in its pool with a clean slate (a call counted as it
            // went out would otherwise stay).
            self.window.store(0, Ordering::Release);
        }
        admitted
    }

    /// Counts a call that `ok` or failed at `now_ms` in the success-rate
    /// window (a failure opens one; a success with none open counts
    /// nothing). Returns the window as it stands after it, if one is open.
    fn count_in_window(&self, now_ms: u64, ok: bool) -> Option<Window> {
        if self.config.min_success_percent == 0 {
            return None;
        }
        // At most half the wrapping range, so that an age tells.
        let window_ms = i64::try_from(self.config.window.as_millis())
            .map_or(MAX_WINDOW_MS, |w| w.min(MAX_WINDOW_MS));
        let now = now_ms as u32;
        let mut after = None;
        let _ = self
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                // A time read just before the window opened (another
                // thread's clock read, late) counts as inside it.
                let age = i64::from(now.wrapping_sub(Window::unpack(w).start) as i32);
                let open = w != 0 && age > -LATE_READ_MS && age < window_ms;
                let next = match (open, ok) {
                    // Nothing failed lately: nothing to count.
                    (false, true) if w == 0 => return None,
                    // The window is over: a success closes it.
                    (false, true) => None,
                    // Never 0: it holds a failure.
                    (false, false) => Some(Window {
                        start: now,
                        ok: 0,
                        failed: 1,
                    }),
                    (true, _) => {
                        let mut win = Window::unpack(w);
                        if win.ok == u16::MAX || win.failed == u16::MAX {
                            // Full: halved, the rate stays (a count that
                            // stopped would bend it); failures stay above 0.
                            win.ok /= 2;
                            win.failed = win.failed.div_ceil(2);
                        }
                        if ok {
                            win.ok += 1;
                        } else {
                            win.failed += 1;
                        }
                        Some(win)
                    }
                };
                after = next;
                Some(next.map_or(0, Window::pack))
            });
        after
    }

    /// Whether `w` has seen enough calls, too few of them successes.
    fn rate_too_low(&self, w: Window) -> bool {
        let calls = u32::from(w.ok) + u32::from(w.failed);
        calls >= u32::from(self.config.min_calls.max(1))
            && u32::from(w.ok) * 100 < u32::from(self.config.min_success_percent) * calls
    }

    /// Records a call that failed at `now_ms`. `may_eject`: whether the
    /// pool lets one more endpoint out ([`may_eject`]); a failed trial
    /// ejects again whatever it says (the endpoint is out already).
    /// Returns whether this failure ejected it.
    pub fn failed(&self, now_ms: u64, may_eject: bool) -> bool {
        self.failed_if(now_ms, || may_eject)
    }

    /// [`failed`](Outlier::failed), asking `may_eject` only when this
    /// failure would eject the endpoint (the pool's count of ejected
    /// endpoints costs more to find than a failure to record).
    pub fn failed_if(&self, now_ms: u64, may_eject: impl FnOnce() -> bool) -> bool {
        // Counted while it is in its pool only: calls to it while it is
        // out (trials, panic mode, late answers) judge nothing.
        let rate_low = !self.is_out()
            && self
                .count_in_window(now_ms, false)
                .is_some_and(|w| self.rate_too_low(w));
        let mut may_eject = Some(may_eject);
        let mut allowed: Option<bool> = None;
        let mut ejected = false;
        let _ = self.update(|s| {
            ejected = false;
            match s.phase {
                Phase::In => {
                    let count = s.count.saturating_add(1);
                    let run = self.config.consecutive_failures;
                    let reached = rate_low || (run > 0 && count >= run);
                    if reached
                        && *allowed.get_or_insert_with(|| may_eject.take().is_some_and(|f| f()))
                    {
                        ejected = true;
                        Some(self.eject(s, now_ms))
                    } else {
                        Some(State { count, ..s })
                    }
                }
                Phase::Trying => {
                    ejected = true;
                    Some(self.eject(s, now_ms))
                }
                Phase::Ejected | Phase::Open => None,
            }
        });
        if ejected {
            // Back in its pool, it starts with a clean slate.
            self.window.store(0, Ordering::Release);
        }
        ejected
    }

    /// `s` ejected at `now_ms`, for the length its count of ejections
    /// earns.
    fn eject(&self, s: State, now_ms: u64) -> State {
        let ejections = (s.ejections + 1).min(0x3fff);
        let length = self
            .config
            .base_ejection
            .saturating_mul(u32::from(ejections))
            .min(self.config.max_ejection);
        let length_ms = u32::try_from(length.as_millis()).unwrap_or(u32::MAX / 2);
        State {
            phase: Phase::Ejected,
            ejections,
            count: 0,
            until: (now_ms as u32).wrapping_add(length_ms.min(u32::MAX / 2)),
        }
    }

    /// Applies `f` to the state until it sticks (`None`: no change).
    fn update(&self, mut f: impl FnMut(State) -> Option<State>) -> Result<u64, u64> {
        self.word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                f(State::unpack(w)).map(State::pack)
            })
    }
}

/// Whether wrapping millisecond `now` has reached `until` (within half the
/// wrapping range).
fn reached(now_ms: u64, until: u32) -> bool {
    (now_ms as u32).wrapping_sub(until) < u32::MAX / 2
}

/// Whether a pool of `total` endpoints with `out` of them ejected may
/// eject one more: at most `max_percent` % of the pool is out, and one
/// endpoint always may be (as in Envoy).
pub fn may_eject(out: usize, total: usize, max_percent: u32) -> bool {
    let cap = (total * max_percent as usize / 100).max(1);
    out < cap
}

/// Whether a pool with `healthy` of `total` endpoints in is in panic mode
/// (fewer than half in): it then routes to all of them, ejected or not.
pub fn panics(healthy: usize, total: usize) -> bool {
    healthy * 2 < total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(e: &Outlier, n: u32, now: u64) {
        for _ in 0..n {
            e.failed(now, true);
        }
    }

    #[test]
    fn five_failures_in_a_row_eject_and_a_success_breaks_the_run() {
        let e = Outlier::new(OutlierConfig::default());
        fail(&e, 4, 0);
        e.succeeded(0);
        fail(&e, 4, 0);
        assert_eq!(e.admit(0), Admit::Yes, "no run of five yet");
        assert!(e.failed(0, true), "the fifth ejects");
        assert!(e.is_out());
        assert_eq!(e.admit(29_999), Admit::No);
    }

    #[test]
    fn ejections_grow_longer_up_to_the_maximum() {
        let e = Outlier::new(OutlierConfig::default());
        let length = |k: u64| (30_000 * k).min(300_000);
        let (mut now, mut k) = (0, 0);
        for _ in 0..6 {
            fail(&e, 5, now);
            k += 1;
            assert_eq!(e.ejections() as u64, k);
            assert_eq!(e.admit(now + length(k) - 1), Admit::No, "ejection {k}");
            now += length(k);
            assert_eq!(e.admit(now), Admit::Trial, "ejection {k}");
            // The trial fails: out again, for longer.
            assert!(e.failed(now, false));
            k += 1;
            assert_eq!(e.ejections() as u64, k);
            assert_eq!(e.admit(now + length(k) - 1), Admit::No, "ejection {k}");
            now += length(k);
            assert_eq!(e.admit(now), Admit::Trial);
            e.succeeded(now);
            assert_eq!(e.admit(now), Admit::Trial);
            e.succeeded(now);
            assert_eq!(e.admit(now), Admit::Yes, "two trials re-admit it");
        }
    }

    #[test]
    fn one_trial_at_a_time_and_late_answers_change_nothing() {
        let e = Outlier::new(OutlierConfig::default());
        fail(&e, 5, 0);
        // Answers to calls sent before the ejection.
        e.succeeded(1);
        e.failed(1, true);
        assert_eq!(e.admit(29_000), Admit::No);
        assert_eq!(e.admit(30_000), Admit::Trial);
        assert_eq!(e.admit(30_000), Admit::No, "a trial is under way");
        assert!(e.is_out());
    }

    #[test]
    fn a_trial_never_reported_is_given_again_after_its_timeout() {
        let e = Outlier::new(OutlierConfig::default());
        fail(&e, 5, 0);
        assert_eq!(
            e.standing(10_000),
            Standing::Ejected {
                remaining: Duration::from_secs(20)
            }
        );
        assert!(!e.admits(29_999));
        assert!(e.admits(30_000), "a look takes no trial");
        assert_eq!(e.admit(30_000), Admit::Trial);
        assert_eq!(e.standing(30_000), Standing::HalfOpen);
        assert!(!e.admits(39_999));
        assert_eq!(e.admit(39_999), Admit::No, "the trial may still report");
        assert_eq!(e.admit(40_000), Admit::Trial, "it was given up on");
        assert!(!e.succeeded(40_001), "one trial of two");
        assert_eq!(e.admit(40_002), Admit::Trial);
        assert!(e.succeeded(40_003), "the second re-admits it");
        assert_eq!(e.standing(40_004), Standing::In { failures: 0 });
    }

    #[test]
    fn the_pool_is_asked_only_by_the_failure_that_would_eject() {
        let e = Outlier::new(OutlierConfig::default());
        let asked = std::cell::Cell::new(0);
        for _ in 0..4 {
            assert!(!e.failed_if(0, || {
                asked.set(asked.get() + 1);
                true
            }));
        }
        assert_eq!(asked.get(), 0);
        assert_eq!(e.standing(0), Standing::In { failures: 4 });
        assert!(e.failed_if(0, || {
            asked.set(asked.get() + 1);
            true
        }));
        assert_eq!(asked.get(), 1);
    }

    #[test]
    fn the_pool_caps_ejections_and_panics_below_half() {
        // 10 % of 30 is 3; of 5, still one.
        assert!(may_eject(2, 30, 10));
        assert!(!may_eject(3, 30, 10));
        assert!(may_eject(0, 5, 10));
        assert!(!may_eject(1, 5, 10));
        let e = Outlier::new(OutlierConfig::default());
        for _ in 0..20 {
            assert!(!e.failed(0, false));
        }
        assert_eq!(e.admit(0), Admit::Yes, "the pool said no: it stays in");
        assert!(e.failed(0, true), "the run goes on and ejects once allowed");
        assert!(panics(1, 3));
        assert!(!panics(2, 3));
        assert!(!panics(0, 0));
    }

    #[test]
    fn too_few_successes_over_a_window_eject() {
        let e = Outlier::new(OutlierConfig::default());
        // Two failures in every three calls, never five in a row: 20
        // calls into the window, 7 succeeded (35 %, under 50 %).
        let mut now = 0;
        let mut ejected_at = None;
        for call in 0..30u32 {
            now += 10;
            if call % 3 == 2 {
                assert!(!e.succeeded(now));
            } else if e.failed(now, true) {
                ejected_at = Some(call);
                break;
            }
        }
        // Calls 0..=19 are 20 calls; the first failure at or after the
        // 20th ejects (call 19 is a failure: 19 % 3 == 1).
        assert_eq!(ejected_at, Some(19));
        assert!(e.is_out());
        assert_eq!(e.ejections(), 1);
    }

    #[test]
    fn a_success_rate_above_the_threshold_or_too_few_calls_do_not_eject() {
        let e = Outlier::new(OutlierConfig::default());
        // Two failures in every five calls (60 % succeed: not under 50 %
        // even right after a failure), over 500 calls.
        for i in 0..500u64 {
            if i % 5 == 0 || i % 5 == 3 {
                assert!(!e.failed(i, true), "call {i}");
            } else {
                e.succeeded(i);
            }
        }
        assert!(!e.is_out());
        // Four failures in a row then one success, in windows of their
        // own: each window has too few calls.
        let few = Outlier::new(OutlierConfig::default());
        let mut now = 0;
        for _ in 0..10 {
            for _ in 0..4 {
                assert!(!few.failed(now, true));
            }
            few.succeeded(now);
            now += 10_000;
        }
        assert!(!few.is_out());
    }

    #[test]
    fn a_window_ends_and_successes_alone_open_none() {
        let e = Outlier::new(OutlierConfig::default());
        let asked = std::cell::Cell::new(0);
        // No window open: a success does not read the clock.
        e.succeeded_with(|| {
            asked.set(asked.get() + 1);
            0
        });
        assert_eq!(asked.get(), 0);
        e.failed(1_000, true);
        e.succeeded_with(|| {
            asked.set(asked.get() + 1);
            1_001
        });
        assert_eq!(asked.get(), 1, "a window is open");
        // A window of 14 calls, 4 of them successes (runs of two
        // failures), then 10 s on, 7 calls with 3 successes: counted
        // together they would eject (7 of 21 succeeded); the first window
        // is over, and the second has too few calls.
        let e = Outlier::new(OutlierConfig::default());
        for i in 0..14u64 {
            if i % 3 == 2 {
                e.succeeded(i);
            } else {
                assert!(!e.failed(i, true));
            }
        }
        for i in 0..7u64 {
            if i % 2 == 1 {
                e.succeeded(10_010 + i);
            } else {
                assert!(!e.failed(10_010 + i, true), "call {i}");
            }
        }
        assert!(!e.is_out());
        // Off: no rate ejection whatever the rate.
        let off = Outlier::new(OutlierConfig {
            min_success_percent: 0,
            consecutive_failures: u16::MAX,
            ..OutlierConfig::default()
        });
        for i in 0..1_000 {
            assert!(!off.failed(i, true));
        }
        assert_eq!(off.window.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_window_keeps_its_rate() {
        let e = Outlier::new(OutlierConfig {
            min_success_percent: 90,
            ..OutlierConfig::default()
        });
        // 95 % succeed, over far more calls than the counts hold (counts
        // that stopped at their top would sink under 90 %).
        for i in 0..300_000u32 {
            if i % 20 == 0 {
                assert!(!e.failed(1, true), "call {i}");
            } else {
                e.succeeded(1);
            }
        }
        assert!(!e.is_out());
        let w = Window::unpack(e.window.load(Ordering::Relaxed));
        let rate = f64::from(w.ok) / (f64::from(w.ok) + f64::from(w.failed));
        assert!(rate > 0.94, "{w:?}");
    }

    #[test]
    fn a_late_clock_read_counts_inside_the_window() {
        let e = Outlier::new(OutlierConfig::default());
        e.failed(5_000, true);
        // A success whose time was read a little before the failure's.
        e.succeeded(4_990);
        let w = Window::unpack(e.window.load(Ordering::Relaxed));
        assert_eq!((w.ok, w.failed), (1, 1));
        // A window left for a long time is over, not open again when the
        // clock wraps past its start.
        let old = Outlier::new(OutlierConfig::default());
        old.failed(5_000, true);
        let far = 5_000 + (1u64 << 31) + 10;
        old.succeeded(far);
        assert_eq!(old.window.load(Ordering::Relaxed), 0, "closed by a success");
        // A window opened at millisecond 0 is a window.
        let zero = Outlier::new(OutlierConfig::default());
        zero.failed(0, true);
        zero.succeeded(1);
        assert_eq!(Window::unpack(zero.window.load(Ordering::Relaxed)).ok, 1);
    }

    #[test]
    fn no_run_ejects_when_consecutive_failures_is_zero() {
        let e = Outlier::new(OutlierConfig {
            consecutive_failures: 0,
            min_success_percent: 0,
            ..OutlierConfig::default()
        });
        for i in 0..100_000 {
            assert!(!e.failed(i, true));
        }
        assert!(!e.is_out());
    }

    #[test]
    fn calls_while_out_do_not_count_and_readmission_starts_afresh() {
        let e = Outlier::new(OutlierConfig {
            consecutive_failures: 0,
            ..OutlierConfig::default()
        });
        for i in 0..20 {
            e.failed(i, true);
        }
        assert!(e.is_out(), "20 calls, none succeeded");
        assert_eq!(e.window.load(Ordering::Relaxed), 0);
        // Late failures while it is out open no window.
        e.failed(100, true);
        assert_eq!(e.window.load(Ordering::Relaxed), 0);
        assert_eq!(e.admit(31_000), Admit::Trial);
        e.succeeded(31_001);
        assert_eq!(e.admit(31_002), Admit::Trial);
        assert!(e.succeeded(31_003));
        // Back in: one failure does not eject it.
        assert!(!e.failed(31_004, true));
        assert!(!e.is_out());
    }

    #[test]
    fn the_clock_wrapping_or_going_back_does_not_strand_an_endpoint() {
        let e = Outlier::new(OutlierConfig::default());
        let near_wrap = u64::from(u32::MAX) - 1_000;
        fail(&e, 5, near_wrap);
        assert_eq!(e.admit(near_wrap + 29_999), Admit::No);
        assert_eq!(e.admit(near_wrap + 30_000), Admit::Trial);
        let back = Outlier::new(OutlierConfig::default());
        fail(&back, 5, 1_000_000);
        assert_eq!(back.admit(0), Admit::No, "earlier than the ejection");
        assert_eq!(back.admit(1_030_000), Admit::Trial);
    }
}
