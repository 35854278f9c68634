//! The mesh handle bindings hold, and how their handlers answer.
//!
//! [`FfiMesh`] wraps a [`commy_mesh::Mesh`] with an API shaped for
//! bindings: owned arguments, futures that are `Send + 'static` (to hand to
//! [`block_on`](crate::block_on) or [`spawn_with`](crate::spawn_with)),
//! errors as [`FfiError`]. Handlers are plain callbacks that get the request
//! and a [`Reply`], which they answer at once or later, from any thread.
//!
//! ```
//! use bytes::Bytes;
//! use commy_ffi::{FfiMesh, MeshOptions, block_on};
//! use std::time::Duration;
//!
//! # let dir = std::env::temp_dir().join(format!("commy-ffi-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! let mut options = MeshOptions::default();
//! options.settings.set("runtime_dir", dir.to_str().unwrap());
//! let mesh = FfiMesh::open(options)?;
//!
//! // A handler answering at once ...
//! let _echo = mesh.serve("echo", |req, reply| {
//!     reply.ok(req.payload().clone());
//! })?;
//! // ... and one answering later, from another thread.
//! let _slow = mesh.serve("slow", |req, reply| {
//!     std::thread::spawn(move || {
//!         std::thread::sleep(Duration::from_millis(5));
//!         reply.ok(Bytes::from(format!("late {}", req.payload().len())));
//!     });
//! })?;
//!
//! let no_interrupt = || Ok::<(), ()>(());
//! let hi = block_on(mesh.call("echo", Bytes::from_static(b"hi"), None), no_interrupt).unwrap()?;
//! assert_eq!(&hi[..], b"hi");
//! let late = block_on(mesh.call("slow", Bytes::from_static(b"abc"), None), no_interrupt).unwrap()?;
//! assert_eq!(&late[..], b"late 3");
//!
//! let missing = block_on(mesh.call("nobody", Bytes::new(), None), no_interrupt).unwrap().unwrap_err();
//! assert_eq!(missing.code_name(), "NOT_FOUND");
//! block_on(mesh.close(), no_interrupt).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_mesh::embed::{AnswerDriver, AnswerSink, DrivenLink, ThreadHook};
use commy_mesh::service::ServiceName;
use commy_mesh::settings::Layer;
use commy_mesh::{
    CallOptions, Deadline, LinkConfig, Mesh, Publisher, Request, Responder, Response,
    ServiceHandle, Status, WaitStrategy, call::EndpointInfo, policy::Standing,
};

use crate::caller::FfiCaller;
use crate::error::FfiError;
use crate::region::{FfiRegion, RegionOptions};
use crate::runtime::block_on;
use crate::subscription::FfiSubscription;

/// An answer sink made of a function (see [`FfiMesh::drive_answers_with`]).
struct Sink<F>(F);

impl<F> AnswerSink for Sink<F>
where
    F: Fn(u64, Result<Bytes, FfiError>) + Send + Sync + 'static,
{
    fn answer(&self, token: u64, result: Result<Response, Status>) {
        (self.0)(
            token,
            result.map(Response::into_payload).map_err(FfiError::from),
        );
    }
}

/// Settings of [`FfiMesh::open`]; `MeshOptions::default()` is the embedded
/// default (mesh `default`, the usual runtime dir, 30 s call timeout).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MeshOptions {
    /// The settings the binding's program passed, by key (see
    /// [`commy_mesh::settings::Settings`]): a binding copies its options
    /// into it key by key, so a new setting needs no change there. Name
    /// the layer after the binding (`Python options`) so that
    /// [`FfiMesh::explain`] says where a value came from.
    pub settings: Layer,
    /// Runs each service link thread's work, on that thread (see
    /// [`commy_mesh::ThreadHook`]): a binding sets the thread up once there
    /// instead of once per request.
    pub link_thread_hook: Option<ThreadHook>,
    /// How this process's side of each link waits for the peer (the
    /// commy-shm default if `None`: spin 50 µs, yield 100 µs, then sleep).
    /// A binding whose own thread is busy beside the link threads (an event
    /// loop) wants a short spin, so waiting threads leave it the CPU.
    pub link_wait: Option<WaitStrategy>,
}

/// A handle on the mesh. Cheap to clone; clones share links.
#[derive(Debug, Clone)]
pub struct FfiMesh {
    mesh: Mesh,
}

fn no_check() -> Result<(), std::convert::Infallible> {
    Ok(())
}

/// Runs a future that does not wait on anything remote (opening, binding a
/// socket) to completion on this thread.
fn quick<T>(fut: impl Future<Output = T>) -> T {
    match block_on(fut, no_check) {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// The options of [`FfiMesh::subscribe_with`], as bindings get them.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SubscribeParams {
    /// Join this queue group.
    pub group: Option<String>,
    /// Messages queued before the policy applies (1 to 1,048,576; 1024
    /// unless set).
    pub queue: Option<u64>,
    /// The slow-subscriber policy: `"block"` (the default),
    /// `"drop-oldest"` or `"disconnect"`.
    pub policy: Option<String>,
    /// How long a subscriber of a dense stream waits to take more at once
    /// (see `commy_mesh::SubscribeOptions::linger`; 1 µs unless set, at
    /// most 100 µs, zero: never).
    pub linger: Option<Duration>,
}

/// The longest queue a subscription may ask for (as on the wire,
/// docs/PROTOCOL.md 10.2).
const MAX_QUEUE: u64 = 1 << 20;

impl SubscribeParams {
    fn options(&self) -> Result<commy_mesh::SubscribeOptions, FfiError> {
        let mut options = commy_mesh::SubscribeOptions::default();
        if let Some(queue) = self.queue {
            if !(1..=MAX_QUEUE).contains(&queue) {
                return Err(FfiError::invalid_argument(format!(
                    "the queue must hold 1 to {MAX_QUEUE} messages, not {queue}"
                )));
            }
            options = options.queue(queue as usize);
        }
        if let Some(name) = &self.policy {
            let policy = commy_mesh::SlowSubscriber::from_name(name).ok_or_else(|| {
                FfiError::invalid_argument(format!(
                    "unknown slow-subscriber policy {name:?} (expected \"block\", \
                     \"drop-oldest\" or \"disconnect\")"
                ))
            })?;
            options = options.policy(policy);
        }
        if let Some(linger) = self.linger {
            let max = commy_mesh::SubscribeOptions::MAX_LINGER;
            if linger > max {
                return Err(FfiError::invalid_argument(format!(
                    "the linger must be at most {max:?}, not {linger:?}"
                )));
            }
            options = options.linger(linger);
        }
        Ok(options)
    }
}

impl FfiMesh {
    /// Opens the mesh (from any thread; the runtime starts on first use).
    pub fn open(options: MeshOptions) -> Result<FfiMesh, FfiError> {
        let mut builder = Mesh::builder().settings(&options.settings);
        if let Some(wait) = options.link_wait {
            let mut link = LinkConfig::default();
            link.wait = wait;
            builder = builder.link(link);
        }
        if let Some(hook) = &options.link_thread_hook {
            builder = builder.link_thread_hook(hook.clone());
        }
        let mesh = quick(builder.open()).map_err(|e| match e {
            commy_mesh::OpenError::Config(m) => FfiError::invalid_argument(m),
            other => FfiError::new(commy_mesh::Code::Unavailable, other.to_string()),
        })?;
        Ok(FfiMesh { mesh })
    }

    /// The mesh's name.
    pub fn name(&self) -> String {
        self.mesh.name().to_string()
    }

    /// The value of setting `key` this mesh opened with and where it came
    /// from (`default`, `<file>:<line>`, `$COMMY_<KEY>`, or the name of the
    /// layer set in code); `None` for an unknown key.
    pub fn explain(&self, key: &str) -> Option<(String, String)> {
        let e = self.mesh.settings().explain(key)?;
        Some((e.value, e.source.to_string()))
    }

    /// The wrapped mesh, for Rust code living beside a binding.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Calls `service` with `payload`; `timeout` overrides the mesh's default.
    pub fn call(
        &self,
        service: &str,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Bytes, FfiError>> + Send + 'static {
        let options = FfiCallOptions {
            timeout,
            ..FfiCallOptions::default()
        };
        self.call_with(service, payload, options)
    }

    /// Calls `service` with `payload` and `options`; made from a handler,
    /// the call is due by the handler's request's deadline at the latest.
    pub fn call_with(
        &self,
        service: &str,
        payload: Bytes,
        options: FfiCallOptions,
    ) -> impl Future<Output = Result<Bytes, FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let service = service.to_owned();
        // Called from a handler (a Python one runs on its link's thread),
        // the call inherits the request's deadline here: the future may be
        // polled elsewhere.
        let inherited = commy_mesh::service::inherited_deadline();
        async move {
            let mut call = CallOptions::default().idempotent(options.idempotent);
            call.deadline = inherited;
            call.timeout = options.timeout;
            call.spin = options.spin;
            call.hash_key = options.hash_key;
            mesh.call_with(&service, payload, call)
                .await
                .map(Response::into_payload)
                .map_err(FfiError::from)
        }
    }

    /// Every instance of service `name` this handle knows, as its pool
    /// sees it (see [`Mesh::endpoints`]).
    pub fn endpoints(&self, name: &str) -> Result<Vec<FfiEndpoint>, FfiError> {
        let endpoints = self.mesh.endpoints(name).map_err(FfiError::from)?;
        Ok(endpoints.into_iter().map(FfiEndpoint::from).collect())
    }

    /// Calls `service` once with each of `payloads`, all in flight at once
    /// (see [`Mesh::call_many`]); each call's result in the order of
    /// `payloads`. `timeout` holds for the batch; `spin`: how long the
    /// first poll waits for answers on the calling thread (the mesh's
    /// `call_spin` if `None`).
    pub fn call_many(
        &self,
        service: &str,
        payloads: Vec<Bytes>,
        timeout: Option<Duration>,
        spin: Option<Duration>,
    ) -> impl Future<Output = Vec<Result<Bytes, FfiError>>> + Send + 'static {
        let mesh = self.mesh.clone();
        let service = service.to_owned();
        async move {
            let mut options = CallOptions::default();
            options.timeout = timeout;
            options.spin = spin;
            mesh.call_many(&service, &payloads, options)
                .await
                .into_iter()
                .map(|r| r.map(Response::into_payload).map_err(FfiError::from))
                .collect()
        }
    }

    /// Starts a call whose result goes to `done`, which must not block: on
    /// shared memory with a link already open, the request is written from
    /// this thread and `done` runs on the thread that reads the answer, with
    /// no task in between (see [`Mesh::call_then`]). For event loops that
    /// keep many calls in flight.
    pub fn call_then(
        &self,
        service: &str,
        payload: &[u8],
        timeout: Option<Duration>,
        done: impl FnOnce(Result<Bytes, FfiError>) + Send + 'static,
    ) {
        let mut options = CallOptions::default();
        options.timeout = timeout;
        self.mesh.call_then(service, payload, options, move |r| {
            done(r.map(Response::into_payload).map_err(FfiError::from));
        });
    }

    /// Starts a call whose result goes to this mesh's answer sink under
    /// `token` (see [`drive_answers_with`](FfiMesh::drive_answers_with)),
    /// or to the callback of the driver's
    /// [`poll_with`](commy_mesh::AnswerDriver::poll_with) when that takes
    /// it in: [`call_then`](FfiMesh::call_then) with no function allocated
    /// per call (see [`Mesh::call_token`]). `FAILED_PRECONDITION` (and
    /// nothing sent) if the driver was made without a sink. `started`:
    /// when the timeout starts counting (see
    /// [`CallOptions::started`](commy_mesh::CallOptions::started)).
    pub fn call_token(
        &self,
        service: &str,
        payload: &[u8],
        timeout: Option<Duration>,
        started: Option<Instant>,
        token: u64,
    ) -> Result<(), FfiError> {
        self.mesh
            .call_token(service, payload, token_options(timeout, started), token)
            .map_err(FfiError::from)
    }

    /// [`call_token`](FfiMesh::call_token) for many calls of `service`
    /// at once, with the same timeout (see
    /// [`Mesh::call_tokens`](commy_mesh::Mesh::call_tokens)): `calls` holds
    /// each call's payload and token.
    pub fn call_tokens<'a>(
        &self,
        service: &str,
        timeout: Option<Duration>,
        started: Option<Instant>,
        calls: impl IntoIterator<Item = (&'a [u8], u64)>,
    ) -> Result<(), FfiError> {
        self.mesh
            .call_tokens(service, token_options(timeout, started), calls)
            .map_err(FfiError::from)
    }

    /// [`drive_answers`](FfiMesh::drive_answers), with `sink` receiving
    /// the results of [`call_token`](FfiMesh::call_token) calls that the
    /// driver's `poll_with` does not hand out itself: answers read by the
    /// links' reader threads, failures, timeouts. `sink` runs on whichever
    /// thread finds the result and must not block.
    pub fn drive_answers_with(
        &self,
        sink: impl Fn(u64, Result<Bytes, FfiError>) + Send + Sync + 'static,
    ) -> Result<AnswerDriver, FfiError> {
        self.mesh
            .drive_answers_with(Arc::new(Sink(sink)))
            .map_err(FfiError::from)
    }

    /// The [`AnswerDriver`](commy_mesh::AnswerDriver) of this mesh: the
    /// answers to [`call_then`](FfiMesh::call_then) calls are then received
    /// (and their callbacks run) on the thread that polls it, while it
    /// polls. See [`Mesh::drive_answers`](commy_mesh::Mesh::drive_answers).
    pub fn drive_answers(&self) -> Result<AnswerDriver, FfiError> {
        self.mesh.drive_answers().map_err(FfiError::from)
    }

    /// [`call`](FfiMesh::call) with its own polling budget `spin` instead of
    /// [`MeshOptions::call_spin`]: e.g. an event-loop binding that spins
    /// only while a call is the one thing it waits for.
    pub fn call_with_spin(
        &self,
        service: &str,
        payload: Bytes,
        timeout: Option<Duration>,
        spin: Duration,
    ) -> impl Future<Output = Result<Bytes, FfiError>> + Send + 'static {
        let options = FfiCallOptions {
            timeout,
            spin: Some(spin),
            ..FfiCallOptions::default()
        };
        self.call_with(service, payload, options)
    }

    /// Sends a one-way message to one instance of `service`.
    pub fn send(
        &self,
        service: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let service = service.to_owned();
        async move { mesh.send(&service, payload).await.map_err(FfiError::from) }
    }

    /// Publishes `payload` on `topic`; resolves to the number of deliveries.
    pub fn publish(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let topic = topic.to_owned();
        async move { mesh.publish(&topic, payload).await.map_err(FfiError::from) }
    }

    /// Publishes each of `payloads` on `topic`, in order, written back to
    /// back; resolves to the number of deliveries, summed over them.
    pub fn publish_many(
        &self,
        topic: &str,
        payloads: Vec<Bytes>,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let topic = topic.to_owned();
        async move {
            mesh.publish_many(&topic, &payloads)
                .await
                .map_err(FfiError::from)
        }
    }

    /// A publisher of `topic` (see [`Mesh::publisher`]): its subscribers'
    /// links are found once, not on every publish.
    pub fn publisher(&self, topic: &str) -> Result<FfiPublisher, FfiError> {
        let publisher = self.mesh.publisher(topic).map_err(FfiError::from)?;
        Ok(FfiPublisher {
            topic: publisher.topic().as_str().to_owned(),
            publisher: Arc::new(tokio::sync::Mutex::new(publisher)),
        })
    }

    /// Messages this handle published on `topic` that subscribers on this
    /// host discarded unread under the drop-oldest policy (see
    /// [`Mesh::dropped_by_subscribers`]).
    pub fn dropped_by_subscribers(&self, topic: &str) -> Result<u64, FfiError> {
        self.mesh
            .dropped_by_subscribers(topic)
            .map_err(FfiError::from)
    }

    /// How many deliveries a publish on `topic` would make now.
    pub fn subscribers(
        &self,
        topic: &str,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let topic = topic.to_owned();
        async move { mesh.subscribers(&topic).await.map_err(FfiError::from) }
    }

    /// Waits until a publish on `topic` would reach `n` subscribers, at most
    /// `timeout`; resolves to how many it would reach.
    pub fn wait_for_subscribers(
        &self,
        topic: &str,
        n: usize,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let mesh = self.mesh.clone();
        let topic = topic.to_owned();
        async move {
            mesh.wait_for_subscribers(&topic, n, timeout)
                .await
                .map_err(FfiError::from)
        }
    }

    /// Serves `service`: `handler` is called for each request (on the link's
    /// thread, with the runtime's context entered) and answers through the
    /// [`Reply`], at once or later from any thread. A handler that answers
    /// before returning is answered from that thread with no hand-off.
    /// Serving lasts until the returned [`FfiService`] is dropped or closed,
    /// or the mesh is closed.
    pub fn serve<H>(&self, service: &str, handler: H) -> Result<FfiService, FfiError>
    where
        H: Fn(FfiRequest, Reply) + Send + Sync + 'static,
    {
        let serving = self
            .mesh
            .serve_deferred(service, move |req: Request, responder| {
                handler(FfiRequest::new(req), Reply::new(responder));
            });
        let handle = quick(serving)?;
        Ok(FfiService {
            name: handle.service().to_string(),
            instance: handle.instance_id().to_string(),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// [`serve`](FfiMesh::serve), with each shared-memory link handed to
    /// `on_link` (on a thread of its own per link, which it may keep) for
    /// the binding's own thread to poll: `handler` is then called on the
    /// thread that [polls](DrivenLink::poll) the link. See
    /// [`Mesh::serve_driven`](commy_mesh::Mesh::serve_driven).
    ///
    /// The handler gets the request's payload and caller only, for
    /// bindings whose handlers see no deadline: the deadline then costs no
    /// clock read. (The requests the binding polls itself come with their
    /// link's caller: [`DrivenLink::caller`].)
    pub fn serve_driven<H, L>(
        &self,
        service: &str,
        handler: H,
        on_link: L,
    ) -> Result<FfiService, FfiError>
    where
        H: Fn(Bytes, FfiCaller, Reply) + Send + Sync + 'static,
        L: Fn(DrivenLink) + Send + Sync + 'static,
    {
        let serving = self.mesh.serve_driven(
            service,
            move |req: Request, responder| {
                let caller = FfiCaller::from(req.caller());
                handler(req.into_payload(), caller, Reply::new(responder));
            },
            on_link,
        );
        let handle = quick(serving)?;
        Ok(FfiService {
            name: handle.service().to_string(),
            instance: handle.instance_id().to_string(),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Subscribes to `topic`, as a member of queue `group` if given (each
    /// message then goes to one member of the group).
    pub fn subscribe(&self, topic: &str, group: Option<&str>) -> Result<FfiSubscription, FfiError> {
        self.subscribe_with(
            topic,
            &SubscribeParams {
                group: group.map(str::to_owned),
                ..SubscribeParams::default()
            },
        )
    }

    /// Subscribes to `topic` with `params` (queue group, queue length,
    /// slow-subscriber policy by name); a queue length or policy out of
    /// range is refused with `INVALID_ARGUMENT` naming it.
    pub fn subscribe_with(
        &self,
        topic: &str,
        params: &SubscribeParams,
    ) -> Result<FfiSubscription, FfiError> {
        let options = params.options()?;
        let sub = quick(
            self.mesh
                .subscribe_with(topic, params.group.as_deref(), options),
        )?;
        Ok(FfiSubscription::new(sub))
    }

    /// Opens (or creates, per `options`) the mesh's region `name`.
    pub fn region(&self, name: &str, options: RegionOptions) -> Result<FfiRegion, FfiError> {
        FfiRegion::open(self.mesh.region(name), name, options)
    }

    /// Closes the handle: stops serving (waiting for handlers in progress)
    /// and drops links. Later operations fail with `FAILED_PRECONDITION`.
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        let mesh = self.mesh.clone();
        async move { mesh.close().await }
    }
}

/// The options of one call from a binding.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FfiCallOptions {
    /// Overrides the mesh's default timeout.
    pub timeout: Option<Duration>,
    /// How long the caller polls for its answer before it sleeps, instead
    /// of the mesh's `call_spin`.
    pub spin: Option<Duration>,
    /// The call may be made more than once (see
    /// [`CallOptions::idempotent`]).
    pub idempotent: bool,
    /// The key a service balanced by consistent hashing routes on (see
    /// [`CallOptions::hash_key`]).
    pub hash_key: Option<Bytes>,
}

impl FfiCallOptions {
    /// Options with `timeout` (overriding the mesh's default) and the
    /// idempotent mark.
    pub fn new(timeout: Option<Duration>, idempotent: bool) -> FfiCallOptions {
        FfiCallOptions {
            timeout,
            spin: None,
            idempotent,
            hash_key: None,
        }
    }
}

/// One instance of a service as a handle's pool sees it, in plain values
/// (see [`EndpointInfo`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FfiEndpoint {
    /// The instance's id.
    pub instance: String,
    /// Where it is reached: a socket path on this host, or `tls://...`.
    pub endpoint: String,
    /// Whether this handle has a live link to it.
    pub linked: bool,
    /// `in`, `ejected` or `half-open`.
    pub state: &'static str,
    /// While in: its failures in a row.
    pub failures_in_a_row: u16,
    /// While ejected: for how long still.
    pub ejected_for: Option<Duration>,
    /// Times it was ejected.
    pub ejections: u16,
    /// Calls in flight to it.
    pub in_flight: u64,
    /// Its failed calls that count against it.
    pub failed_calls: u64,
    /// Over TLS: the peak-EWMA estimate of its round trip.
    pub round_trip: Option<Duration>,
}

impl From<EndpointInfo> for FfiEndpoint {
    fn from(e: EndpointInfo) -> FfiEndpoint {
        let (state, failures_in_a_row, ejected_for) = match e.standing {
            Standing::In { failures } => ("in", failures, None),
            Standing::Ejected { remaining } => ("ejected", 0, Some(remaining)),
            Standing::HalfOpen => ("half-open", 0, None),
        };
        FfiEndpoint {
            instance: e.instance.to_string(),
            endpoint: e.endpoint.to_string(),
            linked: e.linked,
            state,
            failures_in_a_row,
            ejected_for,
            ejections: e.ejections,
            in_flight: e.in_flight,
            failed_calls: e.failed_calls,
            round_trip: e.round_trip,
        }
    }
}

/// The options of a token call: its timeout, counted from `started` if
/// given.
fn token_options(timeout: Option<Duration>, started: Option<Instant>) -> CallOptions {
    let mut options = CallOptions::default();
    options.timeout = timeout;
    options.started = started;
    options
}

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct FfiRequest {
    service: ServiceName,
    payload: Bytes,
    deadline: Option<Deadline>,
    caller: FfiCaller,
}

impl FfiRequest {
    fn new(req: Request) -> FfiRequest {
        FfiRequest {
            service: req.service().clone(),
            deadline: req.deadline(),
            caller: FfiCaller::from(req.caller()),
            payload: req.into_payload(),
        }
    }

    /// Who sent the request.
    pub fn caller(&self) -> &FfiCaller {
        &self.caller
    }

    /// The service the request was addressed to.
    pub fn service(&self) -> &str {
        self.service.as_str()
    }

    /// The request body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// When the caller stops waiting, if it set a deadline.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// How long the caller still waits, if it set a deadline.
    pub fn time_remaining(&self) -> Option<Duration> {
        self.deadline.map(Deadline::remaining)
    }
}

/// How a handler answers its request: once, now or later, from any thread.
/// Clones answer the same request (the first answer wins). If every clone
/// is dropped unanswered, the caller gets `INTERNAL`.
///
/// On shared memory the answering thread writes the answer straight into
/// the link.
#[derive(Clone)]
pub struct Reply {
    slot: Arc<Mutex<ReplySlot>>,
}

struct ReplySlot {
    /// `None` once answered (or found cancelled when answering).
    responder: Option<Responder>,
    /// An answer came too late: the caller had given up.
    too_late: bool,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("answered", &self.is_answered())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Reply {
    fn new(responder: Responder) -> Reply {
        Reply {
            slot: Arc::new(Mutex::new(ReplySlot {
                responder: Some(responder),
                too_late: false,
            })),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, ReplySlot> {
        match self.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn answer(&self, result: Result<Bytes, Status>) -> bool {
        self.answer_with(|r| r.respond(result.map(Response::new)))
    }

    /// Takes the responder out and answers through it with `answer`.
    fn answer_with(&self, answer: impl FnOnce(Responder) -> bool) -> bool {
        let responder = self.slot().responder.take();
        let Some(r) = responder else { return false };
        // Only a caller that gave up refuses an answer.
        let taken = answer(r);
        if !taken {
            self.slot().too_late = true;
        }
        taken
    }

    /// Answers with a copy of `payload`, written straight into the link on
    /// shared memory (see [`ok`](Reply::ok) for the result).
    pub fn ok_copied(&self, payload: &[u8]) -> bool {
        self.answer_with(|r| r.ok_copied(payload))
    }

    /// Answers with `payload`. Returns whether the answer was taken: false
    /// if the request was answered already or the caller gave up.
    pub fn ok(&self, payload: Bytes) -> bool {
        self.answer(Ok(payload))
    }

    /// Answers with an error status (see [`ok`](Reply::ok) for the result).
    pub fn error(&self, error: FfiError) -> bool {
        self.answer(Err(error.into()))
    }

    /// Whether an answer was given (or the request was cancelled).
    pub fn is_answered(&self) -> bool {
        let slot = self.slot();
        slot.responder.as_ref().is_none_or(Responder::is_cancelled)
    }

    /// Whether the caller gave up (deadline passed, cancelled, link gone)
    /// before an answer.
    pub fn is_cancelled(&self) -> bool {
        let slot = self.slot();
        slot.too_late || slot.responder.as_ref().is_some_and(Responder::is_cancelled)
    }

    /// Calls `hook` once if the caller gives up before an answer (on a
    /// runtime or link thread); at once if it already has. Not called once
    /// the request is answered.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) {
        let slot = self.slot();
        match &slot.responder {
            // Run outside this lock if it runs at once (it may use the reply).
            Some(r) if r.is_cancelled() => {
                drop(slot);
                hook();
            }
            Some(r) => r.on_cancel(hook),
            None if slot.too_late => {
                drop(slot);
                hook();
            }
            None => {}
        }
    }
}

/// A service being served. Dropping it stops serving (new calls go to other
/// instances; handlers in progress finish).
#[derive(Debug)]
pub struct FfiService {
    name: String,
    instance: String,
    handle: Mutex<Option<ServiceHandle>>,
}

impl FfiService {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance id announced for it.
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Whether it still serves (not stopped or closed).
    pub fn is_serving(&self) -> bool {
        self.take_lock().is_some()
    }

    fn take_lock(&self) -> std::sync::MutexGuard<'_, Option<ServiceHandle>> {
        match self.handle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Stops serving at once; handlers in progress finish on their own.
    pub fn stop(&self) {
        self.take_lock().take();
    }

    /// Stops serving and resolves once handlers in progress have finished.
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        let handle = self.take_lock().take();
        async move {
            if let Some(h) = handle {
                h.shutdown().await;
            }
        }
    }
}

/// A publisher of one topic ([`FfiMesh::publisher`]), shareable between
/// the binding's threads and tasks: their publishes take turns, each in
/// order.
#[derive(Clone)]
pub struct FfiPublisher {
    topic: String,
    publisher: Arc<tokio::sync::Mutex<Publisher>>,
}

impl FfiPublisher {
    /// The topic it publishes on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes `payload`; resolves to the number of deliveries.
    pub fn publish(
        &self,
        payload: Bytes,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let publisher = self.publisher.clone();
        async move {
            publisher
                .lock()
                .await
                .publish(&payload)
                .await
                .map_err(FfiError::from)
        }
    }

    /// Publishes each of `payloads` in order, written back to back;
    /// resolves to the number of deliveries, summed over them.
    pub fn publish_many(
        &self,
        payloads: Vec<Bytes>,
    ) -> impl Future<Output = Result<usize, FfiError>> + Send + 'static {
        let publisher = self.publisher.clone();
        async move {
            publisher
                .lock()
                .await
                .publish_many(&payloads)
                .await
                .map_err(FfiError::from)
        }
    }
}
