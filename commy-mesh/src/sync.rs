//! Small synchronisation helpers shared by the call and serve paths: a
//! lock that survives a panic of its holder, and a counted scope.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts one in `count` until dropped (a call in flight, a task waiting
/// for a permit). SeqCst: a waiter's count pairs with [`Permits::give`].
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

/// Locks `m` unless another thread holds it (a poisoned lock is taken, as
/// by [`lock`]).
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Locks `m`, also after a panic while it was held (the state guarded here
/// stays consistent: every critical section is a single map or ring step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
