//! The bridge from mesh threads to the JS thread.
//!
//! Everything the mesh produces for JavaScript (a call's answer, a request for
//! a handler, a published message) becomes an [`Event`] pushed onto one queue
//! per mesh handle. The first push onto an empty queue wakes the JS thread
//! through one weak thread-safe function; the JS side then takes the whole
//! queue at once ([`Bridge::take`]), so a burst of a thousand answers costs
//! one wake-up and one crossing into native code, not a thousand. Served
//! links that have requests waiting come the same way
//! ([`Bridge::push_link`]): the JS thread then receives from them itself
//! (see [`crate::driven`]).
//!
//! The thread-safe function is weak: it never keeps the Node event loop
//! alive. The JS layer holds the loop open itself while calls, handlers or
//! subscriptions are pending (a ref'd timer), so a process whose mesh is
//! closed, or idle, can exit.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use bytes::Bytes;
use commy_ffi::FfiCaller;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};

use crate::driven::Driven;

/// The wake-up callback: called with no arguments on the JS thread.
pub(crate) type Wake = ThreadsafeFunction<(), (), (), napi::Status, false, true>;

/// Something the JS thread must act on.
pub(crate) enum Event {
    /// Operation `id` finished; `value` is its numeric result (a handle
    /// number, a delivery count) if it has one.
    Done { id: u32, value: Option<u32> },
    /// Call `id` answered `payload`.
    Answer { id: u32, payload: Bytes },
    /// Operation `id` failed with a status.
    Failed {
        id: u32,
        code: &'static str,
        message: String,
    },
    /// Service `service` received a request from `caller`; `reply`
    /// answers it. `cancel` names it in a later [`Event::Cancelled`] (for
    /// services whose handler takes a cancellation signal).
    Request {
        service: u32,
        reply: crate::native::PendingReply,
        payload: Bytes,
        cancel: Option<u32>,
        caller: FfiCaller,
    },
    /// Service `service` received `request` from `caller`, taken out of
    /// its link by the JS thread in the drain under way: its payload is at
    /// `at..at + len` of that drain's buffer.
    Polled {
        service: u32,
        request: commy_ffi::PolledRequest,
        at: u32,
        len: u32,
        caller: FfiCaller,
    },
    /// The caller of request `cancel` gave up before it was answered.
    Cancelled { cancel: u32 },
    /// Subscription `sub` received a message.
    Message { sub: u32, payload: Bytes },
    /// Subscription `sub` ended (closed, or disconnected for being slow).
    Ended { sub: u32 },
}

impl Event {
    /// The event with its payload owned: a [`Polled`](Event::Polled)
    /// request becomes a [`Request`](Event::Request) with a copy of its
    /// payload out of `data`, its drain's buffer.
    pub(crate) fn owning(self, data: &[u8]) -> Event {
        match self {
            Event::Polled {
                service,
                request,
                at,
                len,
                caller,
            } => Event::Request {
                service,
                reply: crate::native::PendingReply::Polled(request),
                payload: data
                    .get(at as usize..at as usize + len as usize)
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_default(),
                cancel: None,
                caller,
            },
            other => other,
        }
    }
}

thread_local! {
    /// While the JS thread drains a handle (see [`Bridge::draining`]): the
    /// handle's bridge (by address) and the events it pushes meanwhile,
    /// which need neither the queue's lock nor a wake-up.
    static DRAINING: RefCell<Option<(usize, Vec<Event>)>> = const { RefCell::new(None) };
}

/// One mesh handle's queue of events and its wake-up.
pub(crate) struct Bridge {
    queue: Mutex<Vec<Event>>,
    /// Served links whose watchers handed them to the JS thread (see
    /// [`crate::driven`]).
    links: Mutex<Vec<Arc<Driven>>>,
    /// Set while a wake-up is pending (between a push onto an empty queue
    /// and the JS thread's next [`Bridge::take`]).
    scheduled: AtomicBool,
    wake: Mutex<Option<Wake>>,
}

impl Bridge {
    pub(crate) fn new(wake: Wake) -> Bridge {
        Bridge {
            queue: Mutex::new(Vec::with_capacity(64)),
            links: Mutex::new(Vec::new()),
            scheduled: AtomicBool::new(false),
            wake: Mutex::new(Some(wake)),
        }
    }

    /// Queues `event` and wakes the JS thread unless a wake-up is pending
    /// (or, pushed by the JS thread while it drains this handle, adds it to
    /// the drain's events).
    pub(crate) fn push(&self, event: Event) {
        let me = std::ptr::from_ref(self) as usize;
        let queued = DRAINING.with(|d| match d.try_borrow_mut().as_deref_mut() {
            Ok(Some((who, events))) if *who == me => {
                events.push(event);
                None
            }
            _ => Some(event),
        });
        if let Some(event) = queued {
            self.queue.lock().push(event);
            self.wake();
        }
    }

    /// Runs `poll` (on the JS thread, in a drain) with the events this
    /// thread pushes meanwhile appended to `into`, in order, after the
    /// events queued so far, which are taken first (so an event pushed here
    /// never overtakes one another thread queued before it, such as a
    /// request received for the JS thread before its cancellation is
    /// received here).
    pub(crate) fn draining<R>(&self, into: &mut Vec<Event>, poll: impl FnOnce() -> R) -> R {
        /// Puts back what was drained into before, and hands the events
        /// over, even if `poll` unwinds.
        struct Restore<'a> {
            outer: Option<(usize, Vec<Event>)>,
            into: &'a mut Vec<Event>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let ours = DRAINING.with(|d| d.replace(self.outer.take()));
                *self.into = ours.map(|(_, events)| events).unwrap_or_default();
            }
        }
        into.append(&mut self.queue.lock());
        let me = std::ptr::from_ref(self) as usize;
        let outer = DRAINING.with(|d| d.replace(Some((me, std::mem::take(into)))));
        let _restore = Restore { outer, into };
        poll()
    }

    /// Moves the events queued so far behind those of the drain under way
    /// on this thread (see [`draining`](Bridge::draining)), if any: called
    /// before polling a link whose watcher may have queued its earlier
    /// requests meanwhile, so that none is overtaken.
    pub(crate) fn pull_queued(&self) {
        let me = std::ptr::from_ref(self) as usize;
        DRAINING.with(|d| {
            if let Ok(Some((who, events))) = d.try_borrow_mut().as_deref_mut()
                && *who == me
            {
                events.append(&mut self.queue.lock());
            }
        });
    }

    /// Hands served link `link` to the JS thread and wakes it unless a
    /// wake-up is pending. `false` once the handle is shut (nobody will
    /// poll the link).
    pub(crate) fn push_link(&self, link: Arc<Driven>) -> bool {
        if self.wake.lock().is_none() {
            return false;
        }
        self.links.lock().push(link);
        self.wake();
        true
    }

    fn wake(&self) {
        // SYNC: SeqCst pairs with the store in `take`: either this swap sees
        // `false` (and wakes), or `take` runs after it and its lock
        // acquisitions see what was pushed above.
        if !self.scheduled.swap(true, Ordering::SeqCst)
            && let Some(wake) = self.wake.lock().as_ref()
        {
            let _ = wake.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    /// Holds wake-ups back until the next [`take`](Bridge::take): what the
    /// JS thread pushes itself while it drains needs none.
    pub(crate) fn hold(&self) {
        self.scheduled.store(true, Ordering::SeqCst);
    }

    /// Moves the links handed to the JS thread into `into`.
    pub(crate) fn take_links(&self, into: &mut Vec<Arc<Driven>>) {
        into.append(&mut self.links.lock());
    }

    /// Appends every queued event to `into` (on the JS thread, when woken).
    /// Returns whether links were handed over meanwhile (the caller drains
    /// again: their wake-up may have been held back).
    pub(crate) fn take(&self, into: &mut Vec<Event>) -> bool {
        // SYNC: see `wake`.
        self.scheduled.store(false, Ordering::SeqCst);
        let mut queue = self.queue.lock();
        if into.is_empty() {
            std::mem::swap(&mut *queue, into);
        } else {
            into.append(&mut queue);
        }
        drop(queue);
        !self.links.lock().is_empty()
    }

    /// Releases the wake-up function: nothing reaches JS after this.
    pub(crate) fn shut(&self) {
        self.wake.lock().take();
        for link in self.links.lock().drain(..) {
            link.finish();
        }
    }
}
