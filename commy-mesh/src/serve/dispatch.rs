//! What serving a request needs whatever its transport: the service's
//! context ([`ServeCtx`]), the count of requests in progress that a drain
//! waits for, and the handler's panics caught.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use commy_core::{Deadline, Limits, Status};
use parking_lot::Mutex;

use crate::response::Response;
use crate::serve::handler::{Handler, HandlerFuture};
use crate::serve::permits::{Permit, Permits};

/// Per-service state a server connection needs.
pub(crate) struct ServeCtx {
    pub(crate) handler: Handler,
    pub(crate) limits: Limits,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) permits: Permits,
    /// Requests being handled, across all connections (for draining).
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) drained: Arc<tokio::sync::Notify>,
    /// Set once somebody waits for `drained` (before it reads `in_flight`).
    pub(crate) draining: AtomicBool,
    /// One flag per live link: set while that link's thread runs a handler
    /// inline (those are not counted in `in_flight`, which costs two locked
    /// instructions per request; see [`ServeCtx::idle`]).
    pub(crate) links: Mutex<Vec<Arc<AtomicBool>>>,
    /// The service's name ([interned](crate::serve::request::interned): requests
    /// refer to it).
    pub(crate) service: &'static commy_core::ServiceName,
}

impl ServeCtx {
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
        // SYNC: pairs with the Acquire loads in `ServeCtx::idle`.
        self.0.store(false, Ordering::Release);
    }
}

/// A handler's future with panics caught: `None` if it panicked.
pub(crate) struct CatchPanic(pub(crate) HandlerFuture);

impl Future for CatchPanic {
    type Output = Option<Result<Response, Status>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(p) => p.map(Some),
            Err(_) => Poll::Ready(None),
        }
    }
}

pub(crate) fn panicked(service: &commy_core::ServiceName) -> Status {
    tracing::error!("service {service}: the handler panicked");
    Status::internal("the service's handler panicked")
}

/// Serves a request whose handler future is `fut`, as every transport
/// does: the handler is polled once right away, holding no permit (a
/// handler that answers at once takes none); one that has to wait goes on
/// in [`finish_waiting`]. The shared-memory link thread does the first poll
/// itself (in its handler's inline slot, which saves the future's
/// allocation) and spawns the rest; a transport that awaits its handlers
/// (TLS) calls this.
pub(crate) async fn serve_request(
    ctx: &ServeCtx,
    fut: HandlerFuture,
    deadline: Option<Deadline>,
) -> Result<Response, Status> {
    let mut fut = CatchPanic(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await;
    match first {
        Poll::Ready(done) => done.unwrap_or_else(|| Err(panicked(ctx.service))),
        Poll::Pending => finish_waiting(ctx, fut, deadline, ctx.permits.try_take()).await,
    }
}

/// The rest of serving a request whose handler's first poll found it
/// waiting, the same on both transports: it holds one of the service's
/// concurrency permits while it continues (`permit`: taken already; else
/// waited for here), its deadline ends it, and a panic of the handler
/// becomes `Internal`.
pub(crate) async fn finish_waiting(
    ctx: &ServeCtx,
    fut: CatchPanic,
    deadline: Option<Deadline>,
    permit: bool,
) -> Result<Response, Status> {
    let _permit = if permit {
        Permit(&ctx.permits)
    } else {
        ctx.permits.take().await
    };
    match deadline {
        Some(d) => tokio::time::timeout_at(d.instant().into(), fut)
            .await
            .unwrap_or_else(|_| {
                Some(Err(Status::deadline_exceeded(
                    "the handler ran past the deadline",
                )))
            }),
        None => fut.await,
    }
    .unwrap_or_else(|| Err(panicked(ctx.service)))
}

/// A request continuing as a task (or with a deferred handler): counted in
/// `in_flight` for draining until dropped (also when the task is aborted by
/// a Cancel frame).
pub(crate) struct OwnedHandling(pub(crate) Arc<ServeCtx>);

impl OwnedHandling {
    pub(crate) fn enter(ctx: Arc<ServeCtx>) -> OwnedHandling {
        handling(&ctx);
        OwnedHandling(ctx)
    }
}

impl Drop for OwnedHandling {
    fn drop(&mut self) {
        handled(&self.0);
    }
}

/// Counts one request in `in_flight` (ended by [`handled`]).
pub(crate) fn handling(ctx: &ServeCtx) {
    handling_n(ctx, 1);
}

/// Counts `n` requests in `in_flight` at once.
pub(crate) fn handling_n(ctx: &ServeCtx, n: usize) {
    ctx.in_flight.fetch_add(n, Ordering::SeqCst);
}

/// Ends one request's count in `in_flight` (waking a drain that waits for
/// the last one).
pub(crate) fn handled(ctx: &ServeCtx) {
    handled_n(ctx, 1);
}

/// Ends `n` requests' counts in `in_flight` at once.
pub(crate) fn handled_n(ctx: &ServeCtx, n: usize) {
    // SYNC: SeqCst on both words, as in `Served::drain`: either the
    // drainer sees the count drop to zero, or we see it draining.
    if n > 0
        && ctx.in_flight.fetch_sub(n, Ordering::SeqCst) == n
        && ctx.draining.load(Ordering::SeqCst)
    {
        ctx.drained.notify_waiters();
    }
}
