//! What serving a request needs whatever its transport: the service's
//! context ([`ServeCtx`]), one dispatch ([`serve_request`],
//! [`finish_waiting`]) and the handler's panics caught.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use parking_lot::Mutex;

use commy_core::{Deadline, Limits, Metadata, Status};

use crate::response::Response;
use crate::serve::handler::{Handler, HandlerFuture};
use crate::serve::link::LinkShared;
use crate::serve::load::Load;
use crate::serve::permits::Permit;
use crate::serve::policy::{RequestHead, ServePolicy};
use crate::serve::request::Caller;
use crate::warn::Warnings;

/// Per-service state a server connection needs.
pub(crate) struct ServeCtx {
    pub(crate) handler: Handler,
    pub(crate) limits: Limits,
    pub(crate) runtime: tokio::runtime::Handle,
    /// The service's name ([interned](crate::serve::request::interned): requests
    /// refer to it).
    pub(crate) service: &'static commy_core::ServiceName,
    /// Its permits and the requests in progress (what a request releases).
    pub(crate) load: Arc<Load>,
    /// Its serve policy, if it has one.
    pub(crate) policy: Option<Arc<dyn ServePolicy>>,
    /// Warnings about its clients' broken links and frames, limited: a
    /// client that breaks links in a loop costs a handful of lines.
    pub(crate) link_warnings: Warnings,
    /// Its shared-memory links, for a drain to tell each client to go away.
    pub(crate) links: Mutex<Vec<Weak<LinkShared>>>,
}

impl ServeCtx {
    /// Logs a warning about one of the service's links (`line`), unless
    /// too many were logged lately; the next line written says how many
    /// were left out.
    pub(crate) fn warn_link(&self, line: impl FnOnce() -> String) {
        self.link_warnings.warn(line);
    }

    /// Whether a request from `caller` with `metadata` may reach the
    /// handler, by the service's serve policy (`Ok` without one): the one
    /// admission of every transport and every way of taking requests.
    #[inline]
    pub(crate) fn admit(
        &self,
        caller: &Caller,
        metadata: &Metadata,
        one_way: bool,
    ) -> Result<(), Status> {
        match &self.policy {
            None => Ok(()),
            Some(policy) => {
                let head = RequestHead {
                    service: self.service,
                    metadata,
                    one_way,
                };
                policy.admit(caller, &head).inspect_err(|status| {
                    tracing::debug!("service {}: refused a request: {status}", self.service);
                })
            }
        }
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
        Poll::Pending => finish_waiting(ctx, fut, deadline, ctx.load.permits.try_take()).await,
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
        Permit(&ctx.load.permits)
    } else {
        ctx.load.permits.take().await
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
