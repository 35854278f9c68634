//! Small synchronisation helpers shared by the call and serve paths.
//!
//! Locks are parking_lot's: they are not poisoned by a panicking holder
//! (the state they guard stays consistent: every critical section is a
//! single map or ring step), so taking one needs no helper.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts one in `count` until dropped (a call in flight, a task waiting
/// for a permit). SeqCst: a waiter's count pairs with
/// [`Permits::give`](crate::serve::permits::Permits::give).
pub(crate) struct Counted<'a>(pub(crate) &'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(crate) fn enter(count: &'a AtomicUsize) -> Counted<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
