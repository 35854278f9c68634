//! Served links polled by the JS thread.
//!
//! A service's shared-memory links are not received from by threads of the
//! mesh that hand each request over to the JS thread: the JS thread takes
//! the requests out of the rings itself ([`NativeMesh::drain`] polls them),
//! so a request costs no hand-off between threads and no cross-thread
//! queueing.
//!
//! Each link still has a thread of its own, its watcher, for the time the
//! JS thread does not look at it. Who watches goes back and forth:
//!
//! - the watcher waits on the ring until something arrives, then hands the
//!   link to the JS thread ([`Bridge::push_link`], which wakes it);
//! - the JS thread polls the link at every drain while it has it. A link
//!   that came up empty is kept, and looked at at every drain, for a while
//!   longer (the hold: 1 ms, see `poll_hold` in `native.rs`, or 50 µs
//!   for a link that brought one batch of requests only): so a busy link
//!   is polled without any wake-up, and a reply is written before the
//!   watcher is woken;
//! - a link empty for the whole hold goes back to its watcher, which is
//!   unparked.
//!
//! While the JS thread has the link, the watcher first yields for
//! [`STAND_BY_YIELD`] (a lone request's link comes back within it, and a
//! yielding watcher needs no wake-up), then checks every [`STUCK_AFTER`]
//! whether it still polls. If it does not (a handler runs
//! long, or the JS thread waits for ring space to send a call to a peer
//! whose own JS thread is just as stuck, or to a service of its own), the
//! watcher receives on the JS thread's behalf until it polls again: what it
//! receives reaches JS through the bridge, as from any other thread, so
//! nothing waits on a busy event loop.
//!
//! Under load the watchers sleep and the JS thread does all the receiving.
//!
//! [`NativeMesh::drain`]: crate::native::NativeMesh::drain
//! [`Bridge::push_link`]: crate::bridge::Bridge::push_link

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use commy_ffi::{Drive, DrivenLink, FfiCaller, PolledRequest, WaitInterrupter};

use crate::bridge::Bridge;

/// Frames one drain handles per link at most: a busy link does not hold
/// the JS thread from its other work.
pub(crate) const POLL_MAX: usize = 256;

/// How long the JS thread may leave a link it has unpolled before its
/// watcher receives for it.
const STUCK_AFTER: Duration = Duration::from_millis(2);

/// How long the JS thread keeps polling a link that came up empty after
/// bringing one batch of requests only (see [`Polled::new`]).
const LONE_HOLD: Duration = Duration::from_micros(50);

/// How long a watcher that handed its link to the JS thread yields before
/// it naps.
const STAND_BY_YIELD: Duration = Duration::from_micros(50);

/// One served link and who owns it.
pub(crate) struct Driven {
    link: Mutex<DrivenLink>,
    /// Set while the JS thread owns the link (its watcher stands by).
    js: AtomicBool,
    /// Set once the link is done with: closed, or its mesh handle closed.
    done: AtomicBool,
    /// Set by every poll of the JS thread, cleared by the watcher each time
    /// it looks: still clear, the JS thread is stuck.
    polled: AtomicBool,
    watcher: std::thread::Thread,
    interrupt: WaitInterrupter,
    /// The JS layer's number of the service served.
    service: u32,
    /// Who is at the other end (the caller of every request of the link).
    caller: FfiCaller,
    /// Whether the JS thread takes the link's requests itself (see
    /// [`Polled::poll`]) rather than through the service's handler: for a
    /// service whose handlers take no cancellation signal.
    takes_requests: bool,
}

impl Driven {
    /// Ends the watcher's wait and lets it go: the link is done with.
    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.interrupt.interrupt();
        self.watcher.unpark();
    }

    /// Gives the link back to its watcher.
    fn hand_back(&self) {
        self.js.store(false, Ordering::Release);
        self.watcher.unpark();
    }
}

/// Watches `link`, of the JS layer's service number `service`, on the
/// current thread (its own) until it is done. `takes_requests`: see
/// [`Driven::takes_requests`].
pub(crate) fn watch(
    link: DrivenLink,
    bridge: &Arc<Bridge>,
    all: &Mutex<Vec<Weak<Driven>>>,
    service: u32,
    takes_requests: bool,
) {
    let driven = Arc::new(Driven {
        service,
        caller: FfiCaller::from(link.caller()),
        takes_requests,
        interrupt: link.interrupter(),
        link: Mutex::new(link),
        js: AtomicBool::new(false),
        done: AtomicBool::new(false),
        polled: AtomicBool::new(false),
        watcher: std::thread::current(),
    });
    {
        let mut all = all.lock();
        all.retain(|d| d.strong_count() > 0);
        all.push(Arc::downgrade(&driven));
    }
    loop {
        if driven.done.load(Ordering::Acquire) {
            return;
        }
        // The JS thread does not poll the link now: only this thread locks it.
        if !driven.link.lock().wait(None) {
            continue;
        }
        driven.js.store(true, Ordering::Release);
        if !bridge.push_link(driven.clone()) {
            // The handle is closed: nobody polls any more.
            return;
        }
        stand_by(&driven);
    }
}

/// Waits while the JS thread has the link, receiving for it while it is
/// stuck (see the module's documentation).
fn stand_by(driven: &Driven) {
    driven.polled.store(false, Ordering::Release);
    // A lone request is answered and its link handed back within tens of
    // microseconds: a watcher still yielding then needs no wake-up.
    let yield_until = Instant::now() + STAND_BY_YIELD;
    while Instant::now() < yield_until {
        if !driven.js.load(Ordering::Acquire) || driven.done.load(Ordering::Acquire) {
            return;
        }
        std::thread::yield_now();
    }
    loop {
        std::thread::park_timeout(STUCK_AFTER);
        if !driven.js.load(Ordering::Acquire) || driven.done.load(Ordering::Acquire) {
            return;
        }
        if driven.polled.swap(false, Ordering::AcqRel) {
            continue;
        }
        // Not polled for a while: receive until the JS thread polls again.
        let Some(mut link) = driven.link.try_lock() else {
            continue;
        };
        while !driven.polled.load(Ordering::Acquire)
            && driven.js.load(Ordering::Acquire)
            && !driven.done.load(Ordering::Acquire)
        {
            if link.wait(Some(Instant::now() + STUCK_AFTER)) && link.poll(POLL_MAX) == Drive::Closed
            {
                drop(link);
                driven.finish();
                return;
            }
        }
    }
}

/// What receives each request [`Polled::poll`] takes out of a link: its
/// service's number, its link's caller, the request and its payload.
pub(crate) type Take<'a> = dyn FnMut(u32, &FfiCaller, PolledRequest, &[u8]) + 'a;

/// The links the JS thread owns (kept by [`crate::native::NativeMesh`],
/// used on the JS thread only).
pub(crate) struct Polled {
    /// Polled at every drain, each with the number of its polls that found
    /// requests since the JS thread took it.
    busy: Vec<(Arc<Driven>, u32)>,
    /// Came up empty (at the instant kept with each): looked at again at
    /// every drain, and handed back once empty for long enough (see
    /// [`Polled::new`]).
    resting: Vec<(Arc<Driven>, Instant, u32)>,
    /// Links just handed over (reused between drains).
    arriving: Vec<Arc<Driven>>,
    /// See [`Polled::new`].
    hold: Duration,
    /// Set once the handle closed: links handed over are let go at once.
    closed: bool,
}

impl Polled {
    /// No links yet. A link that comes up empty is polled for `hold` more
    /// before it goes back to its watcher (see the module's documentation)
    /// if it brought requests at more than one poll since the JS thread
    /// took it; for [`LONE_HOLD`] if it brought one batch only (a lone
    /// request: the next one of a caller calling one at a time is caught
    /// within it, while a service called now and then spins little).
    pub(crate) fn new(hold: Duration) -> Polled {
        Polled {
            busy: Vec::new(),
            resting: Vec::new(),
            arriving: Vec::new(),
            hold,
            closed: false,
        }
    }

    /// Polls every link the JS thread owns (taking over those `bridge` has
    /// for it), in a drain of `bridge` (see
    /// [`Bridge::draining`](crate::bridge::Bridge::draining)): the requests
    /// they hold go to `take` (with their service's number, their link's
    /// caller and their payload) for a link that [takes
    /// requests](Driven::takes_requests), `room` of them at most, else
    /// through the service's handler to `bridge`. Returns
    /// whether the JS thread still owns links afterwards (the JS layer then
    /// drains again soon).
    pub(crate) fn poll(&mut self, bridge: &Bridge, mut room: usize, take: &mut Take<'_>) -> bool {
        if !self.resting.is_empty() {
            let now = Instant::now();
            let (busy, hold) = (&mut self.busy, self.hold);
            let hold = |found: u32| {
                if found > 1 { hold } else { hold.min(LONE_HOLD) }
            };
            self.resting.retain(|(d, since, found)| {
                // Busy: the watcher receives for us; we poll again next time.
                let has_data = d.link.try_lock().is_none_or(|l| l.has_data());
                if has_data {
                    busy.push((d.clone(), *found));
                    false
                } else if d.done.load(Ordering::Acquire)
                    || now.duration_since(*since) >= hold(*found)
                {
                    d.hand_back();
                    false
                } else {
                    d.polled.store(true, Ordering::Release);
                    true
                }
            });
        }
        bridge.take_links(&mut self.arriving);
        self.busy.extend(self.arriving.drain(..).map(|d| (d, 0)));
        if self.closed {
            for (d, _) in self.busy.drain(..) {
                d.finish();
            }
            return false;
        }
        let resting = &mut self.resting;
        let mut now = None;
        self.busy.retain_mut(|(d, found)| {
            if d.done.load(Ordering::Acquire) {
                return false;
            }
            d.polled.store(true, Ordering::Release);
            let Some(mut link) = d.link.try_lock() else {
                // The watcher receives for us (we were away too long).
                return true;
            };
            // What the watcher received for us before go first.
            bridge.pull_queued();
            if link.has_data() {
                *found += 1;
            }
            let drive = if !d.takes_requests {
                link.poll(POLL_MAX)
            } else if room == 0 {
                // No room left in this drain: polled at the next.
                Drive::More
            } else {
                let (service, caller) = (d.service, &d.caller);
                link.poll_requests(POLL_MAX.min(room), |request, payload| {
                    room -= 1;
                    take(service, caller, request, payload);
                })
            };
            match drive {
                Drive::More => true,
                Drive::Empty => {
                    resting.push((d.clone(), *now.get_or_insert_with(Instant::now), *found));
                    false
                }
                Drive::Closed => {
                    d.finish();
                    false
                }
            }
        });
        !self.busy.is_empty() || !self.resting.is_empty()
    }

    /// Lets every link go (the handle closes): their watchers end, and the
    /// links close when the last reference goes.
    pub(crate) fn close(&mut self, all: &Mutex<Vec<Weak<Driven>>>) {
        self.closed = true;
        let resting = self.resting.drain(..).map(|(d, _, _)| d);
        for d in self.busy.drain(..).map(|(d, _)| d).chain(resting) {
            d.finish();
        }
        for d in all.lock().drain(..) {
            if let Some(d) = d.upgrade() {
                d.finish();
            }
        }
    }
}
