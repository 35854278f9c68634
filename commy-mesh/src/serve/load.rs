//! A service's load: its concurrency permits, and the requests in progress
//! that a drain waits for. A request releases what it holds here when it
//! is answered or given up, whoever settles it; that needs the load only,
//! not the service's handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::serve::permits::Permits;

/// A service's permits and requests in progress, across its links.
pub(crate) struct Load {
    pub(crate) permits: Permits,
    /// Requests being handled, across all connections (for draining).
    pub(crate) in_flight: AtomicUsize,
    pub(crate) drained: tokio::sync::Notify,
    /// Set once somebody waits for `drained` (before it reads `in_flight`).
    pub(crate) draining: AtomicBool,
    /// One flag per live link: set while that link's thread runs a handler
    /// inline (those are not counted in `in_flight`, which costs two locked
    /// instructions per request; see [`Load::idle`]).
    pub(crate) links: Mutex<Vec<Arc<AtomicBool>>>,
    /// Requests that came from TLS peers (a draining instance watches it go
    /// quiet).
    pub(crate) remote_requests: AtomicU64,
}

impl Load {
    /// The load of a service whose handlers may wait `max_concurrency` at
    /// once.
    pub(crate) fn new(max_concurrency: usize) -> Load {
        Load {
            permits: Permits::new(max_concurrency),
            in_flight: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            remote_requests: AtomicU64::new(0),
        }
    }

    /// Whether no request is being handled: no handler runs inline on a
    /// link thread and none continues as a task.
    pub(crate) fn idle(&self) -> bool {
        // SYNC: the Acquire loads pair with the Release store that clears a
        // link's flag in `InlineBusy::drop`, made after a waiting handler
        // was counted in `in_flight`: a cleared flag means its handler is
        // done or counted, so `in_flight` is read after the flags.
        let inline = self
            .links
            .lock()
            .iter()
            .any(|busy| busy.load(Ordering::Acquire));
        !inline && self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// A link thread running a handler inline: its flag is set until dropped.
/// Only that thread writes the flag, so plain stores do (no locked
/// instruction on the request path).
pub(crate) struct InlineBusy<'a>(pub(crate) &'a AtomicBool);

impl<'a> InlineBusy<'a> {
    pub(crate) fn enter(flag: &'a AtomicBool) -> InlineBusy<'a> {
        flag.store(true, Ordering::Relaxed);
        InlineBusy(flag)
    }
}

impl Drop for InlineBusy<'_> {
    fn drop(&mut self) {
        // SYNC: pairs with the Acquire loads in `Load::idle`.
        self.0.store(false, Ordering::Release);
    }
}

/// A request continuing as a task (or with a deferred handler): counted in
/// `in_flight` for draining until dropped (also when the task is aborted by
/// a Cancel frame).
pub(crate) struct OwnedHandling(pub(crate) Arc<Load>);

impl OwnedHandling {
    pub(crate) fn enter(load: Arc<Load>) -> OwnedHandling {
        handling(&load);
        OwnedHandling(load)
    }
}

impl Drop for OwnedHandling {
    fn drop(&mut self) {
        handled(&self.0);
    }
}

/// Counts one request in `in_flight` (ended by [`handled`]).
pub(crate) fn handling(load: &Load) {
    handling_n(load, 1);
}

/// Counts `n` requests in `in_flight` at once.
pub(crate) fn handling_n(load: &Load, n: usize) {
    load.in_flight.fetch_add(n, Ordering::SeqCst);
}

/// Ends one request's count in `in_flight` (waking a drain that waits for
/// the last one).
pub(crate) fn handled(load: &Load) {
    handled_n(load, 1);
}

/// Ends `n` requests' counts in `in_flight` at once.
pub(crate) fn handled_n(load: &Load, n: usize) {
    // SYNC: SeqCst on both words, as in `Served::drain`: either the
    // drainer sees the count drop to zero, or we see it draining.
    if n > 0
        && load.in_flight.fetch_sub(n, Ordering::SeqCst) == n
        && load.draining.load(Ordering::SeqCst)
    {
        load.drained.notify_waiters();
    }
}
