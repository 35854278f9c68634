//! The process's runtime and the two bridges bindings use to drive it.
//!
//! - [`block_on`] runs a future to completion on the calling thread, from
//!   any thread: a plain one, a thread that has entered the runtime (a
//!   service handler's link thread), or a runtime worker. While it waits, it
//!   runs the binding's interrupt check every [`CHECK_INTERVAL`] (Python's
//!   `PyErr_CheckSignals`, so Ctrl-C interrupts a blocking call); an `Err`
//!   from the check abandons (drops) the future and is returned.
//! - [`spawn_with`] runs a future on the runtime and hands its output to a
//!   callback on a runtime thread: for event-loop bindings (asyncio, Node),
//!   whose callback queues the result onto their own loop.
//!
//! ```
//! use std::time::Duration;
//!
//! // Blocking, with an interrupt check that never fires.
//! let v = commy_ffi::block_on(
//!     async {
//!         tokio::time::sleep(Duration::from_millis(5)).await;
//!         7
//!     },
//!     || Ok::<(), ()>(()),
//! );
//! assert_eq!(v, Ok(7));
//!
//! // An interrupt check that fails ends the wait with its error.
//! let interrupted = commy_ffi::block_on(std::future::pending::<()>(), || Err("interrupted"));
//! assert_eq!(interrupted, Err("interrupted"));
//!
//! // Completion through a callback.
//! let (tx, rx) = std::sync::mpsc::channel();
//! commy_ffi::spawn_with(async { 6 * 7 }, move |v| tx.send(v).unwrap());
//! assert_eq!(rx.recv().unwrap(), 42);
//! ```

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

/// How often [`block_on`] runs its interrupt check while it waits.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The runtime of this process and the process it was started in.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The process's tokio runtime (multi-threaded, started on first use, never
/// shut down).
///
/// A child created by `fork` has none of its parent's threads, so a runtime
/// inherited that way cannot run anything: the first use in the child
/// starts a fresh one (handles opened in the parent stay unusable in the
/// child; open new ones there).
///
/// # Panics
///
/// If the operating system refuses to start the runtime's threads.
pub fn runtime() -> &'static Runtime {
    let pid = std::process::id();
    let mut slot = match RUNTIME.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some((owner, rt)) = *slot
        && owner == pid
    {
        return rt;
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get().clamp(2, 4))
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("commy-ffi")
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start the commy runtime: {e}"));
    // Leaked on purpose: it lives as long as the process, and one inherited
    // through fork must never be dropped (its threads do not exist).
    let rt: &'static Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    rt
}

/// Wakes the thread blocked in [`block_on`].
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on this thread, inside the runtime's context,
/// calling `check` every [`CHECK_INTERVAL`] while it waits; if `check`
/// fails, `fut` is dropped (cancelled) and its error returned.
///
/// Works on any thread. On a worker of a multi-threaded runtime it first
/// hands the worker's other tasks to another thread
/// (`tokio::task::block_in_place`), so nothing else waits behind it.
pub fn block_on<F, E>(fut: F, check: impl FnMut() -> Result<(), E>) -> Result<F::Output, E>
where
    F: Future,
{
    let on_worker = Handle::try_current()
        .map(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
        .unwrap_or(false);
    if on_worker {
        tokio::task::block_in_place(|| park_on(fut, check))
    } else {
        park_on(fut, check)
    }
}

fn park_on<F, E>(fut: F, mut check: impl FnMut() -> Result<(), E>) -> Result<F::Output, E>
where
    F: Future,
{
    let _context = runtime().enter();
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    // The clock is only read once the future has to wait.
    let mut last_check = None::<Instant>;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Ok(v);
        }
        let since = *last_check.get_or_insert_with(Instant::now);
        std::thread::park_timeout(CHECK_INTERVAL);
        let now = Instant::now();
        if now.duration_since(since) >= CHECK_INTERVAL {
            check()?;
            last_check = Some(now);
        }
    }
}

/// A future running on the runtime through [`spawn_with`].
#[derive(Debug)]
pub struct FfiTask {
    abort: tokio::task::AbortHandle,
}

impl FfiTask {
    /// Cancels the future (drops it at its next wait). Its callback is then
    /// not called, unless the future had already finished.
    pub fn cancel(&self) {
        self.abort.abort();
    }

    /// Whether the future has finished (completed or cancelled).
    pub fn is_finished(&self) -> bool {
        self.abort.is_finished()
    }
}

/// Runs `fut` on the runtime and calls `done` with its output, on a runtime
/// thread. `done` must not block for long (queue the result onto the
/// binding's own loop).
pub fn spawn_with<F, D>(fut: F, done: D) -> FfiTask
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
    D: FnOnce(F::Output) + Send + 'static,
{
    let task = runtime().spawn(async move { done(fut.await) });
    FfiTask {
        abort: task.abort_handle(),
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct LocalInner<T> {
    /// `None` once finished or cancelled.
    fut: Mutex<Option<BoxFuture<T>>>,
    /// Hands the task back to its binding's thread when it is woken.
    schedule: Box<dyn Fn(LocalTask<T>) + Send + Sync>,
    /// Scheduled and not polled since (one hand-back per wake-up burst).
    queued: AtomicBool,
}

/// A future driven on the binding's own thread (an event loop) instead of
/// a runtime worker: [`LocalTask::start`] polls it once on the calling
/// thread; afterwards, each time it is woken (from any thread), `schedule`
/// is called with the task, and the binding calls [`poll`](LocalTask::poll)
/// on its thread. A quick operation so completes with no thread hand-off
/// but the one that wakes the loop.
///
/// Polls run inside the runtime's context, so the future may use tokio's
/// timers and I/O.
///
/// ```
/// use std::sync::mpsc;
/// use commy_ffi::LocalTask;
///
/// // The "event loop": a channel of tasks to poll.
/// let (tx, rx) = mpsc::channel::<LocalTask<u32>>();
/// let tx = std::sync::Mutex::new(tx);
/// let (task, first) = LocalTask::start(
///     async {
///         tokio::time::sleep(std::time::Duration::from_millis(5)).await;
///         7
///     },
///     move |t| { let _ = tx.lock().unwrap().send(t); },
/// );
/// assert!(first.is_none()); // it has to wait
/// let woken = rx.recv().unwrap();
/// assert_eq!(woken.poll(), Some(7));
/// assert!(task.is_finished());
/// ```
pub struct LocalTask<T> {
    inner: Arc<LocalInner<T>>,
}

impl<T> Clone for LocalTask<T> {
    fn clone(&self) -> Self {
        LocalTask {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for LocalTask<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTask")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl<T: Send + 'static> Wake for LocalInner<T> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            (self.schedule)(LocalTask {
                inner: self.clone(),
            });
        }
    }
}

impl<T: Send + 'static> LocalTask<T> {
    /// Polls `fut` once on this thread; returns the task and, if it is
    /// already done, its output (`schedule` is then never called).
    pub fn start<F, S>(fut: F, schedule: S) -> (LocalTask<T>, Option<T>)
    where
        F: Future<Output = T> + Send + 'static,
        S: Fn(LocalTask<T>) + Send + Sync + 'static,
    {
        let task = LocalTask {
            inner: Arc::new(LocalInner {
                fut: Mutex::new(Some(Box::pin(fut))),
                schedule: Box::new(schedule),
                queued: AtomicBool::new(false),
            }),
        };
        let first = task.poll();
        (task, first)
    }

    /// Polls the future (on the binding's thread, after `schedule`):
    /// `Some(output)` once it is done; `None` while it waits, and after it
    /// finished or was cancelled.
    pub fn poll(&self) -> Option<T> {
        self.inner.queued.store(false, Ordering::Release);
        let mut slot = match self.inner.fut.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let fut = slot.as_mut()?;
        let _context = runtime().enter();
        let waker = Waker::from(self.inner.clone());
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => {
                *slot = None;
                Some(v)
            }
            Poll::Pending => None,
        }
    }

    /// Drops the future (cancelling what it was doing); later polls return
    /// `None`.
    pub fn cancel(&self) {
        let fut = match self.inner.fut.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        drop(fut);
    }

    /// Whether it finished or was cancelled.
    pub fn is_finished(&self) -> bool {
        match self.inner.fut.lock() {
            Ok(g) => g.is_none(),
            Err(p) => p.into_inner().is_none(),
        }
    }
}

/// Runs `fut` without a runtime task: it is polled at once on the calling
/// thread (with the runtime's context entered), and after that on whichever
/// thread wakes it; `done` gets its output on the thread where it finishes.
///
/// For futures that do little between waits, such as a mesh call: the
/// request is written from the calling thread and the answer completed on
/// the thread that delivers it, with no hand-off to a runtime worker at
/// either end ([`spawn_with`] pays one at each). Whatever the future does
/// when woken runs on the waking thread, so it must be short; `done` too.
///
/// ```
/// use std::sync::mpsc;
/// use std::time::Duration;
///
/// let (tx, rx) = mpsc::channel();
/// commy_ffi::run_inline(
///     async {
///         tokio::time::sleep(Duration::from_millis(2)).await;
///         5
///     },
///     move |v| tx.send(v).unwrap(),
/// );
/// assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(5));
/// ```
pub fn run_inline<F, D>(fut: F, done: D)
where
    F: Future + Send + 'static,
    D: FnOnce(F::Output) + Send + 'static,
{
    let task = Arc::new(Inline {
        slot: Mutex::new(Slot::Idle(Box::pin(fut), done)),
        runtime: runtime().handle().clone(),
    });
    task.run();
}

/// How deeply [`run_inline`] futures may poll each other on one thread (a
/// future's poll waking another, which is then polled inside it: a tokio
/// mutex handing itself down a line of waiters does that). Deeper wake-ups
/// are polled on a runtime worker instead, with a fresh stack.
const MAX_INLINE_DEPTH: u32 = 8;

thread_local! {
    /// [`run_inline`] polls in progress on this thread.
    static INLINE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A future run by [`run_inline`]: taken out of its slot while it is
/// polled, so a wake-up during the poll (on this or another thread) only
/// marks it for one more poll and never waits for the poller.
struct Inline<F: Future, D> {
    slot: Mutex<Slot<F, D>>,
    /// Entered while polling (timers and I/O need it), and where deeper
    /// wake-ups go.
    runtime: Handle,
}

enum Slot<F: Future, D> {
    /// Waiting for a wake-up.
    Idle(Pin<Box<F>>, D),
    /// Being polled; `woken`: a wake-up came meanwhile.
    Polling { woken: bool },
    /// Finished (late wake-ups are ignored).
    Done,
}

impl<F, D> Inline<F, D>
where
    F: Future + Send + 'static,
    D: FnOnce(F::Output) + Send + 'static,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot<F, D>> {
        match self.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn run(self: &Arc<Self>) {
        let (mut fut, done) = {
            let mut slot = self.lock();
            match std::mem::replace(&mut *slot, Slot::Polling { woken: false }) {
                Slot::Idle(fut, done) => (fut, done),
                Slot::Polling { .. } => {
                    *slot = Slot::Polling { woken: true };
                    return;
                }
                Slot::Done => {
                    *slot = Slot::Done;
                    return;
                }
            }
        };
        let _context = self.runtime.enter();
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            INLINE_DEPTH.with(|d| d.set(d.get() + 1));
            let polled = fut.as_mut().poll(&mut cx);
            INLINE_DEPTH.with(|d| d.set(d.get() - 1));
            if let Poll::Ready(v) = polled {
                *self.lock() = Slot::Done;
                drop(fut);
                done(v);
                return;
            }
            let mut slot = self.lock();
            if let Slot::Polling { woken: true } = *slot {
                *slot = Slot::Polling { woken: false };
                continue;
            }
            *slot = Slot::Idle(fut, done);
            return;
        }
    }
}

impl<F, D> Wake for Inline<F, D>
where
    F: Future + Send + 'static,
    D: FnOnce(F::Output) + Send + 'static,
{
    fn wake(self: Arc<Self>) {
        if INLINE_DEPTH.with(|d| d.get()) >= MAX_INLINE_DEPTH {
            let runtime = self.runtime.clone();
            runtime.spawn(async move { self.run() });
        } else {
            self.run();
        }
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.clone().wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_works_inside_the_runtime_context_and_on_workers() {
        // A thread that entered the runtime (like a handler's link thread).
        let entered = std::thread::spawn(|| {
            let _g = runtime().enter();
            block_on(
                async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    1
                },
                || Ok::<(), ()>(()),
            )
        });
        assert_eq!(entered.join().unwrap(), Ok(1));

        // A runtime worker.
        let (tx, rx) = std::sync::mpsc::channel();
        runtime().spawn(async move {
            let r = block_on(
                async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    2
                },
                || Ok::<(), ()>(()),
            );
            tx.send(r).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Ok(2));
    }

    #[test]
    fn the_check_runs_while_waiting_and_its_error_cancels() {
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel();
        let guard = Dropped(dropped_tx);
        let mut checks = 0;
        let started = Instant::now();
        let r = block_on(
            async move {
                let _g = guard;
                std::future::pending::<()>().await
            },
            || {
                checks += 1;
                if checks == 3 { Err("stop") } else { Ok(()) }
            },
        );
        assert_eq!(r, Err("stop"));
        assert_eq!(checks, 3);
        assert_eq!(dropped_rx.try_recv(), Ok(()), "the future was dropped");
        assert!(started.elapsed() >= CHECK_INTERVAL * 3);
    }

    #[test]
    fn run_inline_finishes_on_the_waking_thread_and_once() {
        // Ready at once: done runs on the calling thread.
        let here = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        run_inline(async { 1 }, move |v| {
            tx.send((v, std::thread::current().id())).unwrap()
        });
        assert_eq!(rx.try_recv(), Ok((1, here)));

        // Woken from another thread: it finishes there.
        let (wake_tx, wake_rx) = tokio::sync::oneshot::channel::<u32>();
        let (tx, rx) = std::sync::mpsc::channel();
        run_inline(async move { wake_rx.await.unwrap() + 1 }, move |v| {
            tx.send((v, std::thread::current().id())).unwrap()
        });
        assert!(rx.try_recv().is_err(), "still waiting");
        let waker = std::thread::spawn(move || {
            wake_tx.send(41).unwrap();
            std::thread::current().id()
        })
        .join()
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok((42, waker)));

        // Many concurrent wake-ups: polled to the end exactly once.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..64 {
            let (s, r) = tokio::sync::oneshot::channel::<()>();
            senders.push(s);
            receivers.push(r);
        }
        run_inline(
            async move {
                for r in receivers {
                    r.await.unwrap();
                }
                "all"
            },
            move |v| tx.send(v).unwrap(),
        );
        let threads: Vec<_> = senders
            .into_iter()
            .map(|s| std::thread::spawn(move || s.send(()).unwrap()))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("all"));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn run_inline_futures_waking_each_other_in_a_long_line_do_not_overflow() {
        // Each future waits for a tokio mutex held by the one before: every
        // release wakes (and so would poll, inside it) the next.
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let first = block_on(lock.clone().lock_owned(), || Ok::<(), ()>(())).unwrap();
        let n = 20_000;
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let (lock, tx) = (lock.clone(), tx.clone());
            run_inline(
                async move {
                    let _g = lock.lock().await;
                    i
                },
                move |i| tx.send(i).unwrap(),
            );
        }
        drop(first);
        let mut got: Vec<u32> = (0..n)
            .map(|_| rx.recv_timeout(Duration::from_secs(60)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn a_cancelled_task_does_not_call_back() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let task = spawn_with(std::future::pending::<()>(), move |()| {
            let _ = tx.send(());
        });
        task.cancel();
        // The sender is dropped with the future: recv fails without a value.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
