//! The state a request's responder shares with its link's cancellation:
//! whoever settles the request first (the answer, or the caller giving
//! up) moves it out of pending and releases what the request holds (its
//! permit and its count in the service's load), exactly once, without a
//! lock; a caller giving up runs the responder's cancel hooks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;

use crate::serve::load::{Load, handled};

/// Not answered yet.
pub(crate) const PENDING: u8 = 0;
/// Answered (or being answered).
pub(crate) const ANSWERED: u8 = 1;
/// The caller gave up first.
pub(crate) const CANCELLED: u8 = 2;
/// The bits of [`Shared::state`] that hold one of the three above.
pub(crate) const OUTCOME: u8 = 3;
/// Set in [`Shared::state`] while the request holds a concurrency permit
/// of its service.
pub(crate) const PERMIT: u8 = 4;

type CancelHook = Box<dyn FnOnce() + Send>;

/// What a responder and the link's cancellation share.
pub(crate) struct Shared {
    /// The outcome ([`PENDING`], [`ANSWERED`] or [`CANCELLED`]) and the
    /// [`PERMIT`] bit, in one word: whoever moves it from `PENDING`
    /// releases what the request holds, exactly once, without a lock.
    pub(crate) state: AtomicU8,
    pub(crate) hooks: Mutex<Vec<CancelHook>>,
    /// The service the request is counted in (for draining), whose permit
    /// it may hold; both are released once the request is answered or
    /// cancelled, whoever still holds the responder. `None`: nothing is
    /// counted here (the transport counts the request itself).
    pub(crate) counted: Option<Arc<Load>>,
}

impl Shared {
    /// Moves the state from `PENDING` to `outcome`. Returns the state it
    /// left (with its permit bit) if this call moved it, `None` if the
    /// request was answered or cancelled already.
    pub(crate) fn settle(&self, outcome: u8) -> Option<u8> {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & OUTCOME != PENDING {
                return None;
            }
            // The permit bit goes with the release below.
            match self.state.compare_exchange_weak(
                state,
                outcome,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(state),
                Err(now) => state = now,
            }
        }
    }

    /// Releases what the request held when [`settle`](Shared::settle)
    /// left `state`: its permit, and its count for draining.
    pub(crate) fn release(&self, state: u8) {
        if let Some(ctx) = &self.counted {
            if state & PERMIT != 0 {
                ctx.permits.give();
            }
            handled(ctx);
        }
    }

    /// Marks the request given up by its caller and runs the cancel hooks,
    /// unless it was answered already.
    pub(crate) fn cancel(&self) {
        if let Some(state) = self.settle(CANCELLED) {
            let hooks = std::mem::take(&mut *self.hooks.lock());
            self.release(state);
            for hook in hooks {
                hook();
            }
        }
    }
}
