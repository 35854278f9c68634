//! A service's concurrency permits, taken and given back without a lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::Counted;

/// A service's concurrency permits: a count taken and given back without
/// a lock (a request's permit is one compare-and-swap in and one add out),
/// and the tasks that wait for one.
pub(crate) struct Permits {
    pub(crate) free: AtomicUsize,
    /// Tasks waiting in [`take`](Permits::take).
    pub(crate) waiting: AtomicUsize,
    pub(crate) notify: tokio::sync::Notify,
}

impl Permits {
    /// `n` permits.
    pub(crate) fn new(n: usize) -> Permits {
        Permits {
            free: AtomicUsize::new(n),
            waiting: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Takes a permit if one is free; the caller gives it back with
    /// [`give`](Permits::give).
    pub(crate) fn try_take(&self) -> bool {
        // SYNC: SeqCst, for the re-check in `take` (see there).
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Waits for a permit (given back when the guard drops).
    pub(crate) async fn take(&self) -> Permit<'_> {
        loop {
            if self.try_take() {
                return Permit(self);
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before we count ourselves in: a `give` that sees
            // us waiting wakes a registered waiter.
            notified.as_mut().enable();
            // Counted until this task stops waiting (or is dropped).
            let _waiting = Counted::enter(&self.waiting);
            // SYNC: SeqCst with `give`: either it sees us counted (and
            // wakes a waiter), or this re-check sees its permit.
            if self.try_take() {
                return Permit(self);
            }
            notified.await;
        }
    }

    /// Takes up to `n` free permits at once (one compare-and-swap);
    /// returns how many were taken (0 when none is free). The caller gives
    /// them back with [`give_n`](Permits::give_n).
    pub(crate) fn try_take_up_to(&self, n: usize) -> usize {
        // SYNC: SeqCst, as in `try_take`.
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            let k = free.min(n);
            match self.free.compare_exchange_weak(
                free,
                free - k,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return k,
                Err(now) => free = now,
            }
        }
        0
    }

    /// Whether tasks wait for a permit.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Gives a permit back, waking a task that waits for one.
    pub(crate) fn give(&self) {
        self.give_n(1);
    }

    /// Gives `n` permits back at once, waking as many waiting tasks.
    pub(crate) fn give_n(&self, n: usize) {
        if n == 0 {
            return;
        }
        // SYNC: see `take`.
        self.free.fetch_add(n, Ordering::SeqCst);
        let waiting = self.waiting.load(Ordering::SeqCst);
        for _ in 0..waiting.min(n) {
            self.notify.notify_one();
        }
    }
}

/// A permit taken from [`Permits`], given back when dropped.
pub(crate) struct Permit<'a>(pub(crate) &'a Permits);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.give();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// However many tasks take and give permits at once, no more than the
    /// permits' number hold one at a time, and none is left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permits_bound_their_holders_and_wake_every_waiter() {
        let permits = Arc::new(Permits::new(3));
        let holding = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (permits, holding, peak) = (permits.clone(), holding.clone(), peak.clone());
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let _permit = permits.take().await;
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        holding.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("a task was left waiting for a permit");
        assert!(
            peak.load(Ordering::SeqCst) <= 3,
            "more holders than permits"
        );
        // Every permit came back.
        assert!((0..3).all(|_| permits.try_take()));
        assert!(!permits.try_take());
    }

    /// A task dropped while it waits for a permit takes none with it, and
    /// the wake-up meant for it goes to the next waiter.
    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_dropped_while_waiting_loses_no_permit() {
        let permits = Arc::new(Permits::new(1));
        assert!(permits.try_take());
        let dropped = {
            let permits = permits.clone();
            tokio::spawn(async move { drop(permits.take().await) })
        };
        let next = {
            let permits = permits.clone();
            tokio::spawn(async move { drop(permits.take().await) })
        };
        tokio::task::yield_now().await;
        dropped.abort();
        let _ = dropped.await;
        permits.give();
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the remaining waiter was not woken")
            .unwrap();
        assert!(permits.try_take());
        assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
    }
}
