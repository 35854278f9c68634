//! What a service handler sees and returns.
//!
//! ```
//! use commy_mesh::{Request, Response, Status};
//!
//! async fn greet(req: Request) -> Result<Response, Status> {
//!     if req.payload().is_empty() {
//!         return Err(Status::invalid_argument("say something"));
//!     }
//!     let mut reply = b"hello, ".to_vec();
//!     reply.extend_from_slice(req.payload());
//!     Ok(reply.into())
//! }
//! # let _ = greet;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{Deadline, Metadata, NO_DEADLINE, ServiceName, Status};
use tokio::sync::oneshot;

/// A request as the handler receives it.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) service: &'static ServiceName,
    pub(crate) payload: Bytes,
    pub(crate) metadata: SomeMetadata,
    pub(crate) deadline: ArrivedDeadline,
    pub(crate) caller: Caller,
}

/// Who sent a request, as its transport vouches for it: the kernel on
/// shared memory, the TLS handshake across hosts. Bearer tokens a caller
/// adds travel in the [metadata](Request::metadata) and are not checked
/// here.
///
/// ```
/// use commy_mesh::{Caller, Request, Response, Status};
///
/// async fn whoami(req: Request) -> Result<Response, Status> {
///     Ok(match req.caller() {
///         Caller::Local { uid, .. } => format!("uid {uid} on this host"),
///         Caller::Remote(remote) => match remote.identity() {
///             Some(id) => id.to_string(),
///             None => format!("{} (no client certificate)", remote.addr()),
///         },
///         _ => "someone".to_owned(),
///     }
///     .into_bytes()
///     .into())
/// }
/// # let _ = whoami;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Caller {
    /// A process of this host, over shared memory: the credentials the
    /// kernel recorded when it connected (`SO_PEERCRED`). `pid` is 0 when
    /// the caller lives in another pid namespace.
    Local {
        /// Effective user id.
        uid: u32,
        /// Effective group id.
        gid: u32,
        /// Process id, as seen in this process's pid namespace.
        pid: u32,
    },
    /// A process on another host, over TLS.
    Remote(RemoteCaller),
}

impl Caller {
    /// The caller of requests that arrive on a shared-memory link with the
    /// peer `cred`.
    pub(crate) fn local(cred: commy_shm::PeerCred) -> Caller {
        Caller::Local {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
        }
    }
}

/// A caller on another host: its TLS connection's peer, shared by every
/// request of the connection (a request costs no copy of it).
#[derive(Debug, Clone)]
pub struct RemoteCaller(pub(crate) Arc<commy_net::Peer>);

impl RemoteCaller {
    /// The SPIFFE ID (`spiffe://<mesh>/<service>`) of the client's
    /// certificate; `None` when it presented none (the server did not
    /// require one).
    pub fn identity(&self) -> Option<&commy_net::Identity> {
        self.0.identity.as_ref()
    }

    /// The connection's remote address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.0.addr
    }
}

/// The one copy of a served service's name that its requests refer to, so
/// that a request costs no reference count. A copy is kept for each
/// distinct name the process serves (never freed: a handful of names).
pub(crate) fn interned(name: &ServiceName) -> &'static ServiceName {
    static NAMES: Mutex<Vec<&'static ServiceName>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static ServiceName = Box::leak(Box::new(name.clone()));
    names.push(leaked);
    leaked
}

/// Metadata kept out of line: most requests and responses carry none, and
/// then this is one word (the struct is 96 bytes, moved with every request
/// and response otherwise).
#[derive(Clone, Default, PartialEq)]
pub(crate) struct SomeMetadata(Option<Box<Metadata>>);

/// What an absent [`SomeMetadata`] reads as.
static NO_METADATA: Metadata = Metadata {
    auth_token: None,
    traceparent: None,
    content_type: None,
    headers: Vec::new(),
};

impl From<Metadata> for SomeMetadata {
    fn from(m: Metadata) -> SomeMetadata {
        SomeMetadata((!m.is_empty()).then(|| Box::new(m)))
    }
}

impl std::ops::Deref for SomeMetadata {
    type Target = Metadata;

    fn deref(&self) -> &Metadata {
        self.0.as_deref().unwrap_or(&NO_METADATA)
    }
}

impl std::fmt::Debug for SomeMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// A request's deadline as it came off the wire: the time the caller had
/// left when it sent the request. It is anchored to the clock the first
/// time somebody needs it (the handler asks, or the handler has to wait),
/// so a handler that answers at once costs no clock read.
#[derive(Debug, Clone)]
pub(crate) enum ArrivedDeadline {
    /// The caller set none.
    None,
    /// Remaining microseconds, counted from the anchor once it is taken.
    Wire {
        micros: u64,
        anchor: OnceLock<Instant>,
    },
    /// Already anchored by the transport.
    At(Deadline),
}

impl ArrivedDeadline {
    /// The frame header's deadline field ([`NO_DEADLINE`]: none).
    pub(crate) fn from_wire(micros: u64) -> ArrivedDeadline {
        if micros == NO_DEADLINE {
            ArrivedDeadline::None
        } else {
            ArrivedDeadline::Wire {
                micros,
                anchor: OnceLock::new(),
            }
        }
    }

    /// A deadline the transport anchored already.
    pub(crate) fn at(deadline: Option<Deadline>) -> ArrivedDeadline {
        deadline.map_or(ArrivedDeadline::None, ArrivedDeadline::At)
    }

    /// The absolute deadline, anchoring it now if nobody did yet.
    pub(crate) fn get(&self) -> Option<Deadline> {
        match self {
            ArrivedDeadline::None => None,
            ArrivedDeadline::Wire { micros, anchor } => {
                let now = *anchor.get_or_init(Instant::now);
                Some(Deadline::after_at(Duration::from_micros(*micros), now))
            }
            ArrivedDeadline::At(d) => Some(*d),
        }
    }
}

impl Request {
    /// The request body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the request body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The caller's metadata (auth token, trace context, headers).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// When the caller stops waiting, if it set a deadline. The handler is
    /// cancelled (its future dropped) when the deadline passes or the caller
    /// cancels.
    ///
    /// The wire carries the time the caller had left; it is counted from the
    /// first call of this method or, if the handler does not ask, from the
    /// moment the handler first has to wait. Both come right after the
    /// request arrives for a handler that does not block its thread.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline.get()
    }

    /// The service this request was addressed to.
    pub fn service(&self) -> &ServiceName {
        self.service
    }

    /// Who sent the request (see [`Caller`]).
    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}

/// A handler's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    pub(crate) payload: Bytes,
    pub(crate) metadata: SomeMetadata,
}

impl Response {
    /// A response carrying `payload`.
    pub fn new(payload: impl Into<Bytes>) -> Response {
        Response {
            payload: payload.into(),
            metadata: SomeMetadata::default(),
        }
    }

    /// Attaches metadata (headers) to the response.
    pub fn with_metadata(mut self, metadata: Metadata) -> Response {
        self.metadata = metadata.into();
        self
    }

    /// The response body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The response metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Takes the response body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

impl From<Bytes> for Response {
    fn from(b: Bytes) -> Response {
        Response::new(b)
    }
}

impl From<Vec<u8>> for Response {
    fn from(v: Vec<u8>) -> Response {
        Response::new(v)
    }
}

impl From<&'static [u8]> for Response {
    fn from(s: &'static [u8]) -> Response {
        Response::new(Bytes::from_static(s))
    }
}

impl From<&'static str> for Response {
    fn from(s: &'static str) -> Response {
        Response::new(Bytes::from_static(s.as_bytes()))
    }
}

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
                f(request, responder);
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
pub(crate) type HandlerResult = Result<Response, Status>;

/// [`AsyncHandler`] of a function returning futures of type `Fut`.
struct AsyncFn<F>(F);

impl<F, Fut> AsyncHandler for AsyncFn<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn future(&self, request: Request) -> HandlerFuture {
        Box::pin((self.0)(request))
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
    handler: Arc<AsyncFn<F>>,
    /// The allocation of the last future that finished at once (holding
    /// that finished future, which owns nothing any more).
    spare: Option<Pin<Box<Fut>>>,
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
        let fut = (self.handler.0)(request);
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

fn unanswered() -> Status {
    Status::internal("the service's handler finished without answering")
}

/// Not answered yet.
const PENDING: u8 = 0;
/// Answered (or being answered).
const ANSWERED: u8 = 1;
/// The caller gave up first.
const CANCELLED: u8 = 2;
/// The bits of [`Shared::state`] that hold one of the three above.
const OUTCOME: u8 = 3;
/// Set in [`Shared::state`] while the request holds a concurrency permit
/// of its service.
const PERMIT: u8 = 4;

type CancelHook = Box<dyn FnOnce() + Send>;

/// What a responder and the link's cancellation share.
pub(crate) struct Shared {
    /// The outcome ([`PENDING`], [`ANSWERED`] or [`CANCELLED`]) and the
    /// [`PERMIT`] bit, in one word: whoever moves it from `PENDING`
    /// releases what the request holds, exactly once, without a lock.
    state: AtomicU8,
    hooks: Mutex<Vec<CancelHook>>,
    /// The service the request is counted in (for draining), whose permit
    /// it may hold; both are released once the request is answered or
    /// cancelled, whoever still holds the responder. `None`: nothing is
    /// counted here (the transport counts the request itself).
    counted: Option<Arc<crate::conn::ServeCtx>>,
}

impl Shared {
    /// Moves the state from `PENDING` to `outcome`. Returns the state it
    /// left (with its permit bit) if this call moved it, `None` if the
    /// request was answered or cancelled already.
    fn settle(&self, outcome: u8) -> Option<u8> {
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
    fn release(&self, state: u8) {
        if let Some(ctx) = &self.counted {
            if state & PERMIT != 0 {
                ctx.permits.give();
            }
            crate::conn::handled(ctx);
        }
    }

    /// Marks the request given up by its caller and runs the cancel hooks,
    /// unless it was answered already.
    pub(crate) fn cancel(&self) {
        if let Some(state) = self.settle(CANCELLED) {
            let hooks = std::mem::take(&mut *crate::conn::lock(&self.hooks));
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
    Link(crate::conn::LinkAnswer),
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
    sink: Option<Sink>,
    shared: Arc<Shared>,
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
        counted: Option<Arc<crate::conn::ServeCtx>>,
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

    fn send(&mut self, result: Result<Response, Status>) -> bool {
        self.deliver(|sink| match sink {
            Sink::Link(link) => link.answer(result),
            Sink::Channel(tx) => tx.send(result).is_ok(),
            Sink::OneWay => true,
        })
    }

    /// Settles the request as answered and hands the sink to `answer`
    /// (which returns whether the answer was taken); false without calling
    /// it if the request was answered or cancelled already.
    fn deliver(&mut self, answer: impl FnOnce(Sink) -> bool) -> bool {
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
        let mut hooks = crate::conn::lock(&self.shared.hooks);
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
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
