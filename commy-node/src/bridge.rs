//! The bridge from mesh threads to the JS thread.
//!
//! Everything the mesh produces for JavaScript (a call's answer, a request for
//! a handler, a published message) becomes an [`Event`] pushed onto one queue
//! per mesh handle. The first push onto an empty queue wakes the JS thread
//! through one weak thread-safe function; the JS side then takes the whole
//! queue at once ([`Bridge::take`]), so a burst of a thousand answers costs
//! one wake-up and one crossing into native code, not a thousand.
//!
//! The thread-safe function is weak: it never keeps the Node event loop
//! alive. The JS layer holds the loop open itself while calls, handlers or
//! subscriptions are pending (a ref'd timer), so a process whose mesh is
//! closed, or idle, can exit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};

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
    /// Service `service` received a request; `reply` answers it. `cancel`
    /// names it in a later [`Event::Cancelled`] (for services whose handler
    /// takes a cancellation signal).
    Request {
        service: u32,
        reply: crate::native::PendingReply,
        payload: Bytes,
        cancel: Option<u32>,
    },
    /// The caller of request `cancel` gave up before it was answered.
    Cancelled { cancel: u32 },
    /// Subscription `sub` received a message.
    Message { sub: u32, payload: Bytes },
    /// Subscription `sub` ended (closed, or disconnected for being slow).
    Ended { sub: u32 },
}

/// One mesh handle's queue of events and its wake-up.
pub(crate) struct Bridge {
    queue: Mutex<Vec<Event>>,
    /// Set while a wake-up is pending (between a push onto an empty queue
    /// and the JS thread's next [`Bridge::take`]).
    scheduled: AtomicBool,
    wake: Mutex<Option<Wake>>,
}

impl Bridge {
    pub(crate) fn new(wake: Wake) -> Bridge {
        Bridge {
            queue: Mutex::new(Vec::with_capacity(64)),
            scheduled: AtomicBool::new(false),
            wake: Mutex::new(Some(wake)),
        }
    }

    /// Queues `event` and wakes the JS thread unless a wake-up is pending.
    pub(crate) fn push(&self, event: Event) {
        lock(&self.queue).push(event);
        // SYNC: SeqCst pairs with the store in `take`: either this swap sees
        // `false` (and wakes), or `take` runs after it and its lock
        // acquisition sees the event pushed above.
        if !self.scheduled.swap(true, Ordering::SeqCst)
            && let Some(wake) = lock(&self.wake).as_ref()
        {
            let _ = wake.call((), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    /// Takes every queued event (on the JS thread, when woken).
    pub(crate) fn take(&self, into: &mut Vec<Event>) {
        // SYNC: see `push`.
        self.scheduled.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *lock(&self.queue), into);
    }

    /// Releases the wake-up function: nothing reaches JS after this.
    pub(crate) fn shut(&self) {
        lock(&self.wake).take();
    }
}

/// Locks `m`, recovering the data if a panicking thread poisoned it (every
/// critical section here leaves the data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
