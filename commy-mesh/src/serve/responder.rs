//! Answering a request later, from any thread: the [`Responder`], and the
//! state it shares with the link's cancellation (whoever settles the
//! request first, the answer or the caller giving up, releases what it
//! holds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use commy_core::Status;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::response::Response;
use crate::serve::cancel::{ANSWERED, CANCELLED, OUTCOME, PENDING, PERMIT, Shared};
use crate::serve::link::LinkAnswer;
use crate::serve::load::Load;
use crate::serve::permits::Permit;

pub(crate) fn unanswered() -> Status {
    Status::internal("the service's handler finished without answering")
}

/// Where a responder's answer goes.
pub(crate) enum Sink {
    /// Written straight into a shared-memory link.
    Link(LinkAnswer),
    /// Handed to a future awaiting it (TLS).
    Channel(oneshot::Sender<Result<Response, Status>>),
    /// Nowhere: a one-way message.
    OneWay,
}

/// Answers one request of a service served with
/// [`Mesh::serve_deferred`](crate::Mesh::serve_deferred): once, now or
/// later, from any thread. On shared memory the answer is written straight
/// into the link by the thread that responds, so an answer given from an
/// event loop costs no further hand-off.
///
/// Dropping it unanswered answers `Internal`. If the caller gives up first
/// (deadline passed, call cancelled, caller gone), the answer is discarded
/// and the [`on_cancel`](Responder::on_cancel) hooks run.
///
/// ```
/// # async fn demo(mesh: commy_mesh::Mesh) -> Result<(), commy_mesh::Status> {
/// use commy_mesh::Response;
/// let _service = mesh
///     .serve_deferred("later", |req, responder| {
///         std::thread::spawn(move || {
///             responder.respond(Ok(Response::new(req.into_payload())));
///         });
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Responder {
    pub(crate) sink: Option<Sink>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Responder {
    /// A responder answering into `sink`. `counted`: the service the
    /// request was counted in (see [`Shared::counted`]), holding one of its
    /// permits if `permit`.
    pub(crate) fn new(sink: Sink, counted: Option<Arc<Load>>, permit: bool) -> Responder {
        Responder {
            sink: Some(sink),
            shared: Arc::new(Shared {
                state: AtomicU8::new(if permit { PERMIT } else { PENDING }),
                hooks: Mutex::new(Vec::new()),
                counted,
            }),
        }
    }

    /// Hands `permit` (one the request waited for) to the request, which
    /// gives it back once answered or cancelled; at once if the caller gave
    /// up meanwhile.
    pub(crate) fn hold_permit(&mut self, permit: Permit<'_>) {
        std::mem::forget(permit);
        self.hold();
    }

    /// Notes that the request now holds a concurrency permit of its service
    /// (one it waited for); given back at once if the caller gave up
    /// meanwhile.
    fn hold(&mut self) {
        let before = self.shared.state.fetch_or(PERMIT, Ordering::AcqRel);
        if before & OUTCOME != PENDING {
            // Released already, without this permit.
            if let Some(ctx) = &self.shared.counted {
                ctx.permits.give();
            }
        }
    }

    /// The state the link's cancellation needs.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Answers the request. Returns whether the answer was taken: false if
    /// the caller gave up first (nobody waits for it any more).
    pub fn respond(mut self, result: Result<Response, Status>) -> bool {
        self.send(result)
    }

    /// Answers with `payload` (see [`respond`](Responder::respond)).
    pub fn ok(self, payload: impl Into<Bytes>) -> bool {
        self.respond(Ok(Response::new(payload)))
    }

    /// Answers with a copy of `payload` (no metadata): on shared memory it
    /// is written straight into the link, with no [`Bytes`] built first,
    /// for an embedder whose answer sits in a buffer of its own. Returns
    /// what [`respond`](Responder::respond) returns.
    pub fn ok_copied(mut self, payload: &[u8]) -> bool {
        self.deliver(|sink| match sink {
            Sink::Link(link) => link.answer_payload(payload),
            Sink::Channel(tx) => tx
                .send(Ok(Response::new(Bytes::copy_from_slice(payload))))
                .is_ok(),
            Sink::OneWay => true,
        })
    }

    pub(crate) fn send(&mut self, result: Result<Response, Status>) -> bool {
        self.deliver(|sink| match sink {
            Sink::Link(link) => link.answer(result),
            Sink::Channel(tx) => tx.send(result).is_ok(),
            Sink::OneWay => true,
        })
    }

    /// Settles the request as answered and hands the sink to `answer`
    /// (which returns whether the answer was taken); false without calling
    /// it if the request was answered or cancelled already.
    pub(crate) fn deliver(&mut self, answer: impl FnOnce(Sink) -> bool) -> bool {
        let Some(sink) = self.sink.take() else {
            return false;
        };
        let Some(state) = self.shared.settle(ANSWERED) else {
            return false;
        };
        let taken = answer(sink);
        // After the answer is out: a drain waiting for the count sees it
        // written.
        self.shared.release(state);
        taken
    }

    /// Whether the caller gave up (deadline passed, cancelled, link gone)
    /// before an answer.
    pub fn is_cancelled(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) & OUTCOME == CANCELLED
    }

    /// Calls `hook` once if the caller gives up before an answer (on the
    /// link's thread, or a runtime thread); at once if it already has. Never
    /// called once the request is answered.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self.shared.hooks.lock();
        // Read under the lock `Shared::cancel` takes to run the hooks: a
        // hook added after that ran is run here instead.
        match self.shared.state.load(Ordering::Acquire) & OUTCOME {
            PENDING => hooks.push(Box::new(hook)),
            CANCELLED => {
                drop(hooks);
                hook();
            }
            _ => {}
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.sink.is_some() {
            self.send(Err(unanswered()));
        }
    }
}

/// Lives in a deferred handler's future (see [`Handler::future`]): dropping
/// the future before the answer cancels the request.
pub(crate) struct CancelOnDrop(pub(crate) Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
