//! How a side that finds its ring empty (or full) waits for the peer.
//!
//! The default, [`WaitStrategy::Adaptive`], spins briefly (the peer usually
//! answers within a microsecond under load), then yields the CPU for a while,
//! then sleeps on a futex word in the shared segment, so an idle waiter uses
//! no CPU at all. [`WaitStrategy::BusyPoll`] never sleeps: the lowest latency
//! at the price of a full core per waiting side.
//!
//! The sleeping protocol is an event count: the waiter reads the sequence
//! word, announces itself in a `waiting` word, re-checks its condition and
//! only then sleeps on the sequence word; the other side publishes its
//! progress, and if it sees a waiter it bumps the sequence and wakes it. A
//! `SeqCst` fence on each side makes it impossible for both to miss each
//! other. The words live in memory the peer can write, so no sleep lasts
//! longer than [`RECHECK_INTERVAL`]: a peer that clears them costs latency,
//! never liveness.
//!
//! ```
//! use commy_shm::WaitStrategy;
//! use std::time::Duration;
//!
//! let default = WaitStrategy::default();
//! assert!(matches!(default, WaitStrategy::Adaptive { .. }));
//! let low_latency = WaitStrategy::BusyPoll;
//! let frugal = WaitStrategy::Adaptive { spin: Duration::ZERO, yield_for: Duration::from_micros(10) };
//! # let _ = (low_latency, frugal);
//! ```

use std::time::{Duration, Instant};

use crate::sync::{self, AtomicU32, Ordering};

/// How to wait for the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// Spin without ever sleeping: lowest latency, burns a core while waiting.
    BusyPoll,
    /// Spin for `spin`, then yield the CPU for `yield_for`, then sleep on a
    /// futex until woken (no CPU used while asleep; the sleeper re-checks
    /// on its own every [`RECHECK_INTERVAL`]). Spinning pays only when
    /// what is waited for comes soon: a waiter whose last wait lasted
    /// longer than `spin` sleeps at once the next time, until a wait ends
    /// within `spin` again (so traffic slower than that costs a wake-up per
    /// message, not a spin and a yield).
    Adaptive {
        /// How long to spin before yielding.
        spin: Duration,
        /// How long to keep yielding before sleeping.
        yield_for: Duration,
    },
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::Adaptive {
            spin: Duration::from_micros(50),
            yield_for: Duration::from_micros(100),
        }
    }
}

/// The longest one futex sleep lasts before the sleeper re-checks its
/// condition, deadline or not. The wake-up words live in memory the peer
/// can write: a peer that clears the `waiting` word (or never bumps the
/// sequence) costs a sleeper at most this much latency, never its liveness.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(200);

/// The outcome of one wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// The condition became true (or an abort condition was found: the caller re-checks).
    Ready,
    /// The deadline passed first.
    TimedOut,
}

/// The two words of one direction of the wake protocol.
pub(crate) struct WakeWords<'a> {
    /// Futex word: bumped by the notifier when a waiter is announced.
    pub(crate) seq: &'a AtomicU32,
    /// Non-zero while a waiter is (about to be) asleep on `seq`.
    pub(crate) waiting: &'a AtomicU32,
}

impl WakeWords<'_> {
    /// Called by the notifier after publishing progress.
    #[inline]
    pub(crate) fn notify(&self) {
        // SYNC: pairs with the SeqCst fence in `wait_until`: either the
        // waiter sees our published progress, or we see its `waiting` flag.
        sync::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    /// Bumps the sequence and wakes all sleepers, unconditionally.
    pub(crate) fn wake(&self) {
        // SYNC: Release pairs with the Acquire load of `seq` in `wait_until`.
        self.seq.fetch_add(1, Ordering::Release);
        futex_wake(self.seq);
    }
}

/// What one side's recent waits showed: whether spinning before sleeping
/// pays (see [`WaitStrategy::Adaptive`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pacing {
    /// Set after a wait that lasted longer than the spin time: the next one
    /// sleeps at once.
    sleep_at_once: bool,
    /// Waits that slept at once in a row (see [`PROBE_EVERY`]).
    slept: u32,
}

/// While waits sleep at once, every this many spins first instead: a
/// sleeping wait also lasts as long as its wake-up takes, so traffic that
/// comes within the spin time can look slower than it is, and would keep
/// paying a wake-up per message. A probe that finds it within the spin
/// time brings spinning back; one that does not costs one spin (no
/// yield), a 64th of a spin per wait at low rates.
const PROBE_EVERY: u32 = 64;

/// Waits until `ready()` returns true or `deadline` passes.
///
/// `ready` must re-check everything that may end the wait (data available,
/// peer closed, peer gone), because wake-ups carry no payload.
/// `before_sleep` runs before each futex sleep (not while spinning): the
/// place to re-assert what this side owns in shared memory, which the peer
/// may have overwritten. If it returns true the wait ends as if ready (the
/// caller re-checks).
#[cfg(not(loom))]
pub(crate) fn wait_until(
    strategy: WaitStrategy,
    words: &WakeWords<'_>,
    deadline: Option<Instant>,
    pacing: &mut Pacing,
    mut ready: impl FnMut() -> bool,
    mut before_sleep: impl FnMut() -> bool,
) -> Waited {
    if ready() {
        return Waited::Ready;
    }
    let start = Instant::now();
    let (spin, yield_for) = match strategy {
        WaitStrategy::BusyPoll => (Duration::MAX, Duration::ZERO),
        WaitStrategy::Adaptive { spin, yield_for } => (spin, yield_for),
    };
    if pacing.sleep_at_once && spin != Duration::MAX {
        pacing.slept += 1;
        if pacing.slept < PROBE_EVERY {
            let waited = sleep_until(words, deadline, &mut ready, &mut before_sleep);
            // What came within the spin would have been caught spinning.
            pacing.sleep_at_once = start.elapsed() >= spin;
            return waited;
        }
        // A probe: this wait spins first, as if spinning paid (but does
        // not yield after).
        pacing.slept = 0;
    }
    let probe = pacing.sleep_at_once;
    pacing.sleep_at_once = false;
    // Phase 1: spin. Check the clock only every 64 iterations.
    let mut i: u32 = 0;
    loop {
        sync::spin_hint();
        if ready() {
            return Waited::Ready;
        }
        i = i.wrapping_add(1);
        if i.is_multiple_of(64) {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Waited::TimedOut;
            }
            if now.duration_since(start) >= spin {
                break;
            }
        }
    }
    // Phase 2: yield. What comes later than the spin time does not pay for
    // spinning: the next wait sleeps at once.
    pacing.sleep_at_once = true;
    let yield_for = if probe { Duration::ZERO } else { yield_for };
    let yield_end = start.checked_add(spin.saturating_add(yield_for));
    loop {
        sync::yield_now();
        if ready() {
            return Waited::Ready;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Waited::TimedOut;
        }
        if yield_end.is_some_and(|end| now >= end) {
            break;
        }
    }
    // Phase 3: sleep on the futex.
    sleep_until(words, deadline, &mut ready, &mut before_sleep)
}

/// Sleeps on the futex until `ready()` or `deadline` (see [`wait_until`]).
#[cfg(not(loom))]
fn sleep_until(
    words: &WakeWords<'_>,
    deadline: Option<Instant>,
    ready: &mut impl FnMut() -> bool,
    before_sleep: &mut impl FnMut() -> bool,
) -> Waited {
    loop {
        // SYNC: Acquire pairs with the Release bump in `WakeWords::wake`.
        let seq = words.seq.load(Ordering::Acquire);
        words.waiting.store(1, Ordering::Relaxed);
        // SYNC: pairs with the SeqCst fence in `WakeWords::notify`.
        sync::fence(Ordering::SeqCst);
        if ready() || before_sleep() {
            words.waiting.store(0, Ordering::Relaxed);
            return Waited::Ready;
        }
        let timeout = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    words.waiting.store(0, Ordering::Relaxed);
                    return Waited::TimedOut;
                }
                (d - now).min(RECHECK_INTERVAL)
            }
            None => RECHECK_INTERVAL,
        };
        futex_wait(words.seq, seq, timeout);
    }
}

/// Under loom, time is not modelled: waiting is a yield loop, which lets the
/// model checker schedule the other side.
#[cfg(loom)]
pub(crate) fn wait_until(
    _strategy: WaitStrategy,
    _words: &WakeWords<'_>,
    _deadline: Option<Instant>,
    _pacing: &mut Pacing,
    mut ready: impl FnMut() -> bool,
    _before_sleep: impl FnMut() -> bool,
) -> Waited {
    loop {
        if ready() {
            return Waited::Ready;
        }
        sync::yield_now();
    }
}

#[cfg(not(loom))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    use rustix::thread::futex;
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // Shared (not PRIVATE) futex: the word lives in memory mapped by two
    // processes. EAGAIN (value changed), EINTR and ETIMEDOUT all just mean
    // "re-check"; the caller loops.
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

#[cfg(not(loom))]
fn futex_wake(word: &AtomicU32) {
    use rustix::thread::futex;
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

#[cfg(loom)]
fn futex_wait(_word: &AtomicU32, _expected: u32, _timeout: Duration) {
    sync::yield_now();
}

#[cfg(loom)]
fn futex_wake(_word: &AtomicU32) {}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Two words and a flag another thread sets (waking the sleeper).
    struct Waitable {
        seq: AtomicU32,
        waiting: AtomicU32,
        ready: AtomicBool,
    }

    impl Waitable {
        fn words(&self) -> WakeWords<'_> {
            WakeWords {
                seq: &self.seq,
                waiting: &self.waiting,
            }
        }

        /// Sets the flag after `after`, from another thread.
        fn set_later(self: &Arc<Self>, after: Duration) -> std::thread::JoinHandle<()> {
            let w = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                w.ready.store(true, Ordering::SeqCst);
                w.words().notify();
            })
        }

        fn wait(&self, strategy: WaitStrategy, pacing: &mut Pacing) -> Waited {
            let deadline = Some(Instant::now() + Duration::from_secs(10));
            let ready = || self.ready.load(Ordering::SeqCst);
            wait_until(strategy, &self.words(), deadline, pacing, ready, || false)
        }
    }

    /// A wait that lasted longer than the spin time makes the next one
    /// sleep at once; a wait that ends within the spin time makes the next
    /// one spin again.
    #[test]
    fn spinning_is_skipped_while_it_does_not_pay() {
        let w = Arc::new(Waitable {
            seq: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            ready: AtomicBool::new(false),
        });
        let mut pacing = Pacing::default();
        // Slow: the flag comes long after a 20 µs spin and yield.
        let short = WaitStrategy::Adaptive {
            spin: Duration::from_micros(10),
            yield_for: Duration::from_micros(10),
        };
        let setter = w.set_later(Duration::from_millis(20));
        assert_eq!(w.wait(short, &mut pacing), Waited::Ready);
        setter.join().unwrap();
        assert!(pacing.sleep_at_once, "a wait that slept did not say so");
        // Fast, against a long spin time: the flag comes within it, so the
        // sleep at once was a mistake and the next wait spins.
        w.ready.store(false, Ordering::SeqCst);
        let long = WaitStrategy::Adaptive {
            spin: Duration::from_secs(5),
            yield_for: Duration::ZERO,
        };
        let setter = w.set_later(Duration::from_millis(1));
        assert_eq!(w.wait(long, &mut pacing), Waited::Ready);
        setter.join().unwrap();
        assert!(
            !pacing.sleep_at_once,
            "traffic within the spin time still sleeps"
        );
        // Sleeping at once, every PROBE_EVERY-th wait spins first: one
        // whose flag comes within the spin never sleeps, and spinning is
        // back.
        pacing.sleep_at_once = true;
        pacing.slept = PROBE_EVERY - 1;
        w.ready.store(false, Ordering::SeqCst);
        let setter = w.set_later(Duration::from_millis(1));
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let ready = || w.ready.load(Ordering::SeqCst);
        let mut slept = false;
        let before_sleep = || {
            slept = true;
            false
        };
        let waited = wait_until(long, &w.words(), deadline, &mut pacing, ready, before_sleep);
        assert_eq!(waited, Waited::Ready);
        setter.join().unwrap();
        assert!(!slept, "the probe slept");
        assert!(
            !pacing.sleep_at_once,
            "a probe that caught it did not bring spinning back"
        );
        assert_eq!(pacing.slept, 0, "the probes start counting again");
        // Busy polling never sleeps, whatever came before.
        w.ready.store(false, Ordering::SeqCst);
        pacing.sleep_at_once = true;
        let setter = w.set_later(Duration::from_millis(1));
        assert_eq!(w.wait(WaitStrategy::BusyPoll, &mut pacing), Waited::Ready);
        setter.join().unwrap();
        assert_eq!(w.waiting.load(Ordering::SeqCst), 0);
    }
}
