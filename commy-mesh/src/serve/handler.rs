//! A service's handler, type-erased once when the service starts: an async
//! function of the request, or a callback answering through a
//! [`Responder`](crate::Responder); and the slot a link's thread runs an
//! async handler in without allocating a future per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use commy_core::Status;
use tokio::sync::oneshot;

use crate::response::Response;
use crate::serve::inherit::{Inherit, Inherited, scope};
use crate::serve::request::Request;
use crate::serve::responder::{CancelOnDrop, Responder, Sink, unanswered};

/// The future a handler returns, boxed.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response, Status>> + Send>>;

/// A type-erased handler.
#[derive(Clone)]
pub(crate) enum Handler {
    /// An async function of the request.
    Async(Arc<dyn AsyncHandler>),
    /// A callback that answers through its [`Responder`], now or later.
    Deferred(Arc<dyn Fn(Request, Responder) + Send + Sync>),
}

impl Handler {
    /// The handler as a future of its answer, for transports that await
    /// handlers (TLS). Dropping the future cancels a deferred request.
    pub(crate) fn future(&self, request: Request) -> HandlerFuture {
        match self {
            Handler::Async(f) => f.future(request),
            Handler::Deferred(f) => {
                let (tx, rx) = oneshot::channel();
                let responder = Responder::new(Sink::Channel(tx), None, false);
                let cancel = CancelOnDrop(responder.shared.clone());
                let mut inherited = Inherited::of(&request.deadline);
                scope(&mut inherited, || f(request, responder));
                Box::pin(async move {
                    let result = rx.await.unwrap_or_else(|_| Err(unanswered()));
                    // Answered: cancelling now does nothing.
                    drop(cancel);
                    result
                })
            }
        }
    }
}

/// An async handler function, type-erased.
pub(crate) trait AsyncHandler: Send + Sync {
    /// The handler's future for `request`.
    fn future(&self, request: Request) -> HandlerFuture;

    /// A place for one link's thread to run the handler in (see
    /// [`InlineSlot`]).
    fn inline_slot(self: Arc<Self>) -> Box<dyn InlineSlot>;
}

/// Runs one service's handler on one link's thread, polling each future
/// once right there. The allocation of a future that finishes at once is
/// kept for the next request's future, so a handler that answers without
/// waiting costs no future allocation per request.
pub(crate) trait InlineSlot: Send {
    /// Calls the handler with `request` and polls its future once: the
    /// answer (`Ok`), or the future still to be awaited (`Err`). A panic
    /// of the handler propagates (the slot stays usable).
    fn run(
        &mut self,
        request: Request,
        cx: &mut Context<'_>,
    ) -> Result<HandlerResult, HandlerFuture>;
}

/// What a handler's future gives.
type HandlerResult = Result<Response, Status>;

/// [`AsyncHandler`] of a function returning futures of type `Fut`.
struct AsyncFn<F>(pub(crate) F);

impl<F, Fut> AsyncHandler for AsyncFn<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn future(&self, request: Request) -> HandlerFuture {
        let mut inherited = Inherited::of(&request.deadline);
        let fut = scope(&mut inherited, || (self.0)(request));
        Box::pin(Inherit::new(inherited, fut))
    }

    fn inline_slot(self: Arc<Self>) -> Box<dyn InlineSlot> {
        Box::new(AsyncFnSlot {
            handler: self,
            spare: None,
        })
    }
}

/// [`InlineSlot`] of an [`AsyncFn`].
struct AsyncFnSlot<F, Fut> {
    pub(crate) handler: Arc<AsyncFn<F>>,
    /// The allocation of the last future that finished at once (holding
    /// that finished future, which owns nothing any more).
    spare: Option<Pin<Box<Inherit<Fut>>>>,
}

impl<F, Fut> InlineSlot for AsyncFnSlot<F, Fut>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn run(
        &mut self,
        request: Request,
        cx: &mut Context<'_>,
    ) -> Result<HandlerResult, HandlerFuture> {
        let mut inherited = Inherited::of(&request.deadline);
        let fut = scope(&mut inherited, || (self.handler.0)(request));
        let fut = Inherit::new(inherited, fut);
        let mut boxed = match self.spare.take() {
            Some(mut spare) => {
                spare.set(fut);
                spare
            }
            None => Box::pin(fut),
        };
        match boxed.as_mut().poll(cx) {
            Poll::Ready(result) => {
                self.spare = Some(boxed);
                Ok(result)
            }
            Poll::Pending => Err(boxed),
        }
    }
}

/// Erases an async handler function.
pub(crate) fn erase<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, Status>> + Send + 'static,
{
    Handler::Async(Arc::new(AsyncFn(f)))
}

/// Erases a deferred handler function.
pub(crate) fn erase_deferred<F>(f: F) -> Handler
where
    F: Fn(Request, Responder) + Send + Sync + 'static,
{
    Handler::Deferred(Arc::new(f))
}
