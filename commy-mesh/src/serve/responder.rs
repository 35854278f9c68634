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

pub(crate) fn unanswered() -> Status {
    Status::internal("the service's handler finished without answering")
}

/// Not answered yet.
pub(crate) const PENDING: u8 = 0;
/// Answered (or being answered).
pub(crate) const ANSWERED: u8 = 1;
/// The caller gave up first.
pub(crate) const CANCELLED: u8 = 2;
/// The bits of [`Shared::state`] that hold one of the three above.
pub(crate) const OUTCOME: u8 = 3;
/// Set in [`Shared::state`] while the request holds a concurrency permit
/// of its service.
pub(crate) const PERMIT: u8 = 4;

pub(crate) type CancelHook = Box<dyn FnOnce() + Send>;

/// What a responder and the link's cancellation share.
pub(crate) struct Shared {
    /// The outcome ([`PENDING`], [`ANSWERED`] or [`CANCELLED`]) and the
    /// [`PERMIT`] bit, in one word: whoever moves it from `PENDING`
    /// releases what the request holds, exactly once, without a lock.
    pub(crate) state: AtomicU8,
    pub(crate) hooks: Mutex<Vec<CancelHook>>,
    /// The service the request is counted in (for draining), whose permit
    /// it may hold; both are released once the request is answered or
    /// cancelled, whoever still holds the responder. `None`: nothing is
    /// counted here (the transport counts the request itself).
    pub(crate) counted: Option<Arc<crate::serve::dispatch::ServeCtx>>,
}

impl Shared {
    /// Moves the state from `PENDING` to `outcome`. Returns the state it
    /// left (with its permit bit) if this call moved it, `None` if the
    /// request was answered or cancelled already.
    pub(crate) fn settle(&self, outcome: u8) -> Option<u8> {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & OUTCOME != PENDING {
                return None;
            }
            // The permit bit goes with the release below.
            match self.state.compare_exchange_weak(
                state,
                outcome,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(state),
                Err(now) => state = now,
            }
        }
    }

    /// Releases what the request held when [`settle`](Shared::settle)
    /// left `state`: its permit, and its count for draining.
    pub(crate) fn release(&self, state: u8) {
        if let Some(ctx) = &self.counted {
            if state & PERMIT != 0 {
                ctx.permits.give();
            }
            crate::serve::dispatch::handled(ctx);
        }
    }

    /// Marks the request given up by its caller and runs the cancel hooks,
    /// unless it was answered already.
    pub(crate) fn cancel(&self) {
        if let Some(state) = self.settle(CANCELLED) {
            let hooks = std::mem::take(&mut *self.hooks.lock());
            self.release(state);
            for hook in hooks {
                hook();
            }
        }
    }
}

/// Where a responder's answer goes.
pub(crate) enum Sink {
    /// Written straight into a shared-memory link.
    Link(crate::serve::link::LinkAnswer),
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
    pub(crate) fn new(
        sink: Sink,
        counted: Option<Arc<crate::serve::dispatch::ServeCtx>>,
        permit: bool,
    ) -> Responder {
        Responder {
            sink: Some(sink),
            shared: Arc::new(Shared {
                state: AtomicU8::new(if permit { PERMIT } else { PENDING }),
                hooks: Mutex::new(Vec::new()),
                counted,
            }),
        }
    }

    /// Notes that the request now holds a concurrency permit of its service
    /// (one it waited for); given back at once if the caller gave up
    /// meanwhile.
    pub(crate) fn hold(&mut self) {
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
