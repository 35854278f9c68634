//! The mesh handle: open it, serve named services, call them.
//!
//! ```
//! use commy_mesh::{Config, Mesh, Request, Response, Status};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("commy-mesh-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! let mesh = Mesh::builder().runtime_dir(&dir).open().await?;
//! let _echo = mesh
//!     .serve("echo", |req: Request| async move { Ok::<_, Status>(Response::new(req.into_payload())) })
//!     .await?;
//! let reply = mesh.call("echo", b"hi".to_vec()).await?;
//! assert_eq!(&reply[..], b"hi");
//! let missing = mesh.call("nobody", b"hi".to_vec()).await.unwrap_err();
//! assert_eq!(missing.code(), commy_mesh::Code::NotFound);
//! mesh.close().await;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_config::{Loaded, NetConfig, Settings, Source, TransportPreference};
use commy_core::{InstanceId, MeshName, Metadata, ServiceName, Status};
use commy_discovery::{Discover, Instance, LocalRegistry, Registration};
use commy_shm::{RuntimeDir, ShmLink};
use parking_lot::Mutex;

use crate::accept::{bind_announcement, start_accepting};
use crate::call::attempt::Attempt;
use crate::call::deadline::Due;
use crate::call::options::CallOptions;
use crate::call::policy::{CallPolicies, settle};
use crate::call::pool::EndpointInfo;
use crate::call::pool::Pools;
use crate::call::resilience::Resilience;
use crate::call::shm::ClientConn;
use crate::call::table::{AnswerSink, Done};
use crate::call::tls::{PeerSource, Peers};
use crate::config::{Config, MeshBuilder};
use crate::embed::answers::Claims;
use crate::embed::driven::DrivenLink;
use crate::net::NetState;
use crate::pubsub::{PubSub, SubscribeOptions, Subscription};
use crate::response::Response;
use crate::serve::dispatch::ServeCtx;
use crate::serve::handler::{Handler, erase, erase_deferred};
use crate::serve::inherit::due_by_inherited;
use crate::serve::load::Load;
use crate::serve::request::{Request, interned};
use crate::serve::responder::Responder;
use crate::serve::service::{Served, ServiceHandle};
use crate::serve::shm::serve_link;
use crate::warn::Warnings;

mod publisher;
mod routed;
pub use publisher::Publisher;
use routed::Start;

/// Errors from [`Mesh::open`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The configuration is unusable.
    #[error("invalid mesh configuration: {0}")]
    Config(String),
    /// The runtime dir cannot be used.
    #[error(transparent)]
    RuntimeDir(#[from] commy_shm::RuntimeDirError),
    /// Local discovery cannot start.
    #[error(transparent)]
    Discovery(#[from] commy_discovery::DiscoveryError),
    /// Not called from inside a tokio runtime.
    #[error("Mesh::open must be called from within a tokio runtime")]
    NoRuntime,
    /// The TLS side cannot start (certificates, listen address).
    #[error("cannot start the network transport: {0}")]
    Net(#[from] crate::net::NetError),
}

/// How often [`Mesh::wait_for_subscribers`] counts again.
const SUBSCRIBERS_POLL: Duration = Duration::from_millis(5);

/// A handle on the mesh. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("mesh", &self.inner.mesh)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: Config,
    /// The settings as loaded, with where each value came from.
    settings: Loaded,
    /// The mesh's name (from the settings).
    mesh: MeshName,
    /// Timeout of calls that set none (from the settings).
    default_timeout: Option<Duration>,
    /// Handlers of one instance waiting at once (from the settings).
    max_concurrency: usize,
    registry: LocalRegistry,
    /// The pools of the services this handle calls.
    services: Pools,
    /// Subscriptions and publishing on this host.
    pubsub: PubSub,
    runtime: tokio::runtime::Handle,
    closed: AtomicBool,
    /// Services served through this handle, to drain on close.
    served: Mutex<Vec<Arc<Served>>>,
    /// The TLS side, when configured.
    net: Option<Arc<NetState>>,
    /// Set once [`Mesh::drive_answers`] made this handle's driver.
    answers: OnceLock<Arc<Claims>>,
}

impl Drop for Inner {
    /// The last handle gone, closed or not: the mesh's directories this
    /// process left empty go too (as [`Mesh::close`] does).
    fn drop(&mut self) {
        self.registry.tidy();
        self.pubsub.tidy();
    }
}

impl Mesh {
    /// Opens the mesh with `config` (use `Config::default()` for the
    /// embedded default). Must run inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Mesh, OpenError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let settings = Settings::load(&config.settings).map_err(OpenError::Config)?;
        let s = settings.settings();
        let mesh = MeshName::new(&s.mesh)
            .map_err(|e| OpenError::Config(format!("invalid mesh name {:?}: {e}", s.mesh)))?;
        let dir = match &s.runtime_dir {
            Some(d) => RuntimeDir::at(d)?,
            None => RuntimeDir::resolve()?,
        };
        let registry = LocalRegistry::new(dir.clone(), &mesh)?;
        let topics_mesh = MeshName::new(&format!("{mesh}.t"))
            .map_err(|e| OpenError::Config(format!("mesh name too long for topics: {e}")))?;
        let topics = LocalRegistry::new(dir, &topics_mesh)?;
        let mut net_config = NetConfig::from_settings(s).map_err(OpenError::Config)?;
        let listen_in_code = settings
            .explain("listen")
            .is_some_and(|e| matches!(e.source, Source::Layer(_)));
        if config.no_listen && !listen_in_code {
            net_config.listen = None;
        }
        let net = if net_config.in_use() {
            Some(NetState::start(&net_config, &mesh, registry.host().clone(), config.limits).await?)
        } else {
            None
        };
        let (call_spin, default_timeout) = (s.call_spin, s.default_timeout);
        let max_concurrency = s.max_concurrency.max(1);
        let resilience = Arc::new(Resilience::from_settings(s));
        let mesh = Mesh {
            inner: Arc::new(Inner {
                services: pools(
                    &config,
                    &mesh,
                    call_spin,
                    &registry,
                    net.as_ref().map(|n| &n.peers),
                    config.call_policy.clone(),
                    &resilience,
                    &runtime,
                ),
                pubsub: PubSub::new(
                    topics.clone(),
                    pools(
                        &config,
                        &mesh,
                        call_spin,
                        &topics,
                        None,
                        None,
                        &resilience,
                        &runtime,
                    ),
                    config.link.clone(),
                    config.limits.unfragmented(),
                    s.subscriber_stall,
                ),
                config,
                settings,
                mesh,
                default_timeout,
                max_concurrency,
                registry,
                runtime,
                closed: AtomicBool::new(false),
                served: Mutex::new(Vec::new()),
                net,
                answers: OnceLock::new(),
            }),
        };
        if let Some(net) = &mesh.inner.net {
            // Clients that only connect subscribe through this handle.
            let handle = Arc::downgrade(&mesh.inner);
            net.take_subscriptions(Box::new(move |topic, group, options, id| {
                let inner = handle
                    .upgrade()
                    .ok_or_else(|| Status::unavailable("the mesh handle is closed"))?;
                let mesh = Mesh { inner };
                mesh.check_open()?;
                mesh.subscribe_as(topic, group, options, id)
            }));
        }
        Ok(mesh)
    }

    /// Options for [`Mesh::open`].
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    /// The mesh's name.
    pub fn name(&self) -> &MeshName {
        &self.inner.mesh
    }

    /// The settings this handle opened with, and where each value came
    /// from (the default, the config file and its line, an environment
    /// variable, the code):
    ///
    /// ```
    /// # async fn demo(mesh: commy_mesh::Mesh) {
    /// for setting in mesh.settings().explain_all() {
    ///     println!("{setting}"); // e.g. `max_concurrency = 64 (builder)`
    /// }
    /// # }
    /// ```
    pub fn settings(&self) -> &Loaded {
        &self.inner.settings
    }

    /// Serves `name` with `handler` until the returned handle is dropped.
    pub async fn serve<F, Fut>(&self, name: &str, handler: F) -> Result<ServiceHandle, Status>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, Status>> + Send + 'static,
    {
        self.serve_handler(name, erase(handler), None)
    }

    /// Serves `name` with a handler that answers through a [`Responder`],
    /// now or later, from any thread, until the returned handle is dropped.
    ///
    /// This is for code that answers outside an async task, such as an event
    /// loop of another language: on shared memory the responding thread
    /// writes the answer straight into the link. The handler itself is
    /// called on the link's thread (or, when the service's concurrency
    /// limit is reached, on a runtime thread once a request may start) and
    /// must not block.
    ///
    /// The request's deadline is not enforced on this side: a caller whose
    /// deadline passes gives up and cancels, which runs the responder's
    /// [`on_cancel`](Responder::on_cancel) hooks.
    pub async fn serve_deferred<F>(&self, name: &str, handler: F) -> Result<ServiceHandle, Status>
    where
        F: Fn(Request, Responder) + Send + Sync + 'static,
    {
        self.serve_handler(name, erase_deferred(handler), None)
    }

    /// [`serve_deferred`](Mesh::serve_deferred), with each shared-memory
    /// link handed to `on_link` instead of being received from by a thread
    /// of the mesh: the embedder polls its [`DrivenLink`]s from its own
    /// thread (an event loop that polls while it is busy pays no hand-off
    /// per request), and the handler is called on the polling thread.
    ///
    /// `on_link` runs on a thread of its own per link, which it may keep
    /// (for example to [`wait`](DrivenLink::wait) for requests while the
    /// event loop sleeps). Calls over TLS reach the handler as with
    /// `serve_deferred`.
    pub async fn serve_driven<F, L>(
        &self,
        name: &str,
        handler: F,
        on_link: L,
    ) -> Result<ServiceHandle, Status>
    where
        F: Fn(Request, Responder) + Send + Sync + 'static,
        L: Fn(DrivenLink) + Send + Sync + 'static,
    {
        self.serve_handler(name, erase_deferred(handler), Some(Arc::new(on_link)))
    }

    fn serve_handler(
        &self,
        name: &str,
        handler: Handler,
        driver: Option<Arc<dyn Fn(DrivenLink) + Send + Sync>>,
    ) -> Result<ServiceHandle, Status> {
        self.check_open()?;
        let service = service_name(name)?;
        let id = InstanceId::random();
        let (path, listener) =
            bind_announcement(&self.inner.registry, &service, id, service.as_str())?;
        let ctx = Arc::new(ServeCtx {
            handler,
            limits: self.inner.config.limits.unfragmented(),
            runtime: self.inner.runtime.clone(),
            service: interned(&service),
            load: Arc::new(Load::new(self.inner.max_concurrency)),
            policy: self
                .inner
                .config
                .serve_policy
                .as_ref()
                .and_then(|p| p.get(&service)),
            link_warnings: Warnings::new(),
            links: parking_lot::Mutex::new(Vec::new()),
        });
        if let Some(net) = &self.inner.net {
            net.add(&service, id, ctx.clone());
        }
        let routed = self.inner.net.clone().map(|net| {
            let service = service.clone();
            Registration::new(move || net.remove(&service, id))
        });
        let relist = self
            .inner
            .net
            .clone()
            .map(|net| Box::new(move || net.relist()) as Box<dyn Fn() + Send + Sync>);
        let served = Arc::new(Served {
            service,
            id,
            path,
            stop: Arc::new(AtomicBool::new(false)),
            ctx: ctx.clone(),
            registrations: Mutex::new(Vec::new()),
            routed: Mutex::new(routed),
            relist,
        });
        start_accepting(
            listener,
            self.inner.config.link.clone(),
            served.service.to_string(),
            served.stop.clone(),
            {
                let hook = self.inner.config.link_thread_hook.clone();
                let serve = move |link: ShmLink, ctx: Arc<ServeCtx>| match &driver {
                    None => serve_link(link, ctx),
                    Some(driver) => driver(DrivenLink::new(link, ctx)),
                };
                move |link| match &hook {
                    None => serve(link, ctx.clone()),
                    Some(hook) => {
                        let (mut link, ctx) = (Some(link), ctx.clone());
                        hook.run(&mut || {
                            if let Some(link) = link.take() {
                                serve(link, ctx.clone());
                            }
                        });
                    }
                }
            },
            None,
        )?;
        if let Err(status) = self.register(&served) {
            served.deregister();
            return Err(status);
        }
        self.inner.served.lock().push(served.clone());
        Ok(ServiceHandle { served })
    }

    /// Announces a service that now accepts to the handle's registrars,
    /// when it listens over TLS (the other hosts reach it there).
    fn register(&self, served: &Served) -> Result<(), Status> {
        let registrars = &self.inner.config.registrars;
        let Some(addr) = self.tls_endpoint().filter(|_| !registrars.is_empty()) else {
            return Ok(());
        };
        let instance = Instance::new(
            served.service.clone(),
            served.id,
            std::process::id(),
            commy_core::Endpoint::Tls(addr),
            self.inner.registry.host().clone(),
        );
        for registrar in registrars {
            let registration = registrar.register(&instance).map_err(|e| {
                Status::unavailable(format!(
                    "cannot register {} with {}: {e}",
                    served.service,
                    registrar.name()
                ))
            })?;
            served.registrations.lock().push(registration);
        }
        Ok(())
    }

    /// Calls `name` with `payload` and the mesh's default timeout.
    pub async fn call(&self, name: &str, payload: impl Into<Bytes>) -> Result<Bytes, Status> {
        Ok(self
            .call_with(name, payload, CallOptions::default())
            .await?
            .into_payload())
    }

    /// Calls `name` with options; returns the whole response (payload and metadata).
    pub async fn call_with(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
        mut options: CallOptions,
    ) -> Result<Response, Status> {
        self.check_open()?;
        let payload = payload.into();
        let preference = self.preference(&options);
        if preference != TransportPreference::Tls {
            // The fast path: a link already open. It stays small and does
            // not allocate; a call answered within the spin completes in
            // the first poll.
            if let Some((conn, balanced)) = self
                .inner
                .services
                .connected(name, options.hash_key.as_deref())
            {
                let health = conn.stats.health();
                let retries = &health.retries;
                let _pending = health.enter_pending(name)?;
                let idempotent = options.idempotent || retries.idempotent;
                if idempotent && let Some(delay) = health.hedge {
                    let start = Start {
                        counted: true,
                        ..Start::default()
                    };
                    return Box::pin(
                        self.call_hedged(name, payload, options, preference, delay, start),
                    )
                    .await;
                }
                let Some(policy) = &conn.policy else {
                    // Kept only when the call may be retried after it was
                    // sent: cloning may allocate.
                    let kept = (retries.attempts > 1 && idempotent).then(|| payload.clone());
                    if kept.is_some() {
                        // Every attempt is due by the first one's deadline.
                        options.started.get_or_insert_with(Instant::now);
                    }
                    let due = self.due(&options);
                    let md = &options.metadata;
                    let failure = match conn.attempt(payload, md, due, balanced, options.spin).await
                    {
                        Ok(answer) => return Ok(answer),
                        Err(failure) => failure,
                    };
                    let start = Start::after(failure, conn.instance, false);
                    return Box::pin(self.call_routed(name, kept, options, preference, start))
                        .await;
                };
                // The same with the service's call policy: the outcome is
                // recorded, and a retry goes the routed way.
                let now = Instant::now();
                options.started.get_or_insert(now);
                let due = self.due(&options);
                let keep = policy.max_attempts() > 1
                    || retries.attempts > 1 && (options.idempotent || retries.idempotent);
                let kept = keep.then(|| payload.clone());
                let md = &options.metadata;
                let result = conn.attempt(payload, md, due, true, options.spin).await;
                let failure = result.as_ref().err().map(Attempt::status);
                let again = settle(&**policy, conn.instance, &conn.stats, now, 1, failure);
                return match result {
                    Ok(answer) => Ok(answer),
                    Err(failure) => {
                        let start = Start::after(failure, conn.instance, again);
                        Box::pin(self.call_routed(name, kept, options, preference, start)).await
                    }
                };
            }
        }
        // Boxed: finding and connecting an instance, or TLS, would make
        // every call's future large.
        Box::pin(self.call_first_routed(name, payload, options, preference)).await
    }

    /// Starts a call whose result goes to `done` instead of a future: on
    /// shared memory, with a link already open, the request is written from
    /// this thread and `done` runs on the thread that reads the answer (the
    /// link's reader, or the thread polling this handle's
    /// [`AnswerDriver`](crate::embed::AnswerDriver)), with no task and no further
    /// hand-off. Otherwise the
    /// call runs as a task on the mesh's runtime and `done` runs there.
    /// `done` must not block; a call that fails at once calls it right here.
    /// The payload is only borrowed: it is written into the link as it is
    /// (and copied only for a call that runs as a task).
    ///
    /// This is for code that waits outside async Rust (an event loop of
    /// another language keeping many calls in flight).
    ///
    /// ```
    /// # async fn demo(mesh: commy_mesh::Mesh) {
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// mesh.call_then("echo", "hi", Default::default(), move |result| {
    ///     let _ = tx.send(result);
    /// });
    /// let _answer = rx.await;
    /// # }
    /// ```
    pub fn call_then(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        options: CallOptions,
        done: impl FnOnce(Result<Response, Status>) + Send + 'static,
    ) {
        if let Err(status) = self.check_open() {
            return done(Err(status));
        }
        let payload = payload.as_ref();
        if let Some((conn, balanced, due)) = self.callback_route(name, &options) {
            if let Some(claims) = self.inner.answers.get() {
                claims.claim(&conn);
            }
            let done = Done::Call(Box::new(done));
            match conn.call_then(payload, &options.metadata, due, balanced, done) {
                Err(Done::Call(done)) => return self.call_as_task(name, payload, options, done),
                _ => return,
            }
        }
        self.call_as_task(name, payload, options, done);
    }

    /// A callback or token call made as a task of the mesh (over TLS,
    /// before a link is open, with a policy, or when its link took no new
    /// call): it inherits the calling handler's deadline here, where the
    /// handler runs.
    fn call_as_task(
        &self,
        name: &str,
        payload: &[u8],
        mut options: CallOptions,
        done: impl FnOnce(Result<Response, Status>) + Send + 'static,
    ) {
        options.deadline = due_by_inherited(options.deadline);
        let mesh = self.clone();
        let name = name.to_owned();
        let payload = Bytes::copy_from_slice(payload);
        self.inner.runtime.spawn(async move {
            done(mesh.call_with(&name, payload, options).await);
        });
    }

    /// Calls `name` once with each of `payloads`, all in flight at once:
    /// one caller's pipelined calls. Over an open shared-memory link (to
    /// one instance, picked as [`Mesh::call_with`] picks one) the requests
    /// are written back to back and made visible together, and the answers
    /// are taken as they come, many per look, so a batch costs far less
    /// than as many calls one after another. Otherwise (no link open yet,
    /// a call policy, TLS) each call goes its own way, concurrently.
    /// Returns each call's result in the order of `payloads`; `options`
    /// (deadline, metadata) apply to each.
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # async fn f(mesh: &commy_mesh::Mesh) {
    /// let requests: Vec<Bytes> = (0..100u32).map(|i| Bytes::from(i.to_le_bytes().to_vec())).collect();
    /// for answer in mesh.call_many("echo", &requests, Default::default()).await {
    ///     match answer {
    ///         Ok(response) => { let _ = response.payload(); }
    ///         Err(status) => eprintln!("a call failed: {status}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn call_many(
        &self,
        name: &str,
        payloads: &[Bytes],
        options: CallOptions,
    ) -> Vec<Result<Response, Status>> {
        if let Err(status) = self.check_open() {
            return payloads.iter().map(|_| Err(status.clone())).collect();
        }
        if self.preference(&options) != TransportPreference::Tls
            && let Some((conn, balanced)) = self
                .inner
                .services
                .connected(name, options.hash_key.as_deref())
            && conn.policy.is_none()
            && conn.stats.health().max_pending == 0
        {
            let due = self.due(&options);
            let md = &options.metadata;
            return conn
                .call_batch(payloads, md, due, balanced, options.spin)
                .await;
        }
        let calls: Vec<_> = payloads
            .iter()
            .map(|payload| {
                let (mesh, name) = (self.clone(), name.to_owned());
                let (payload, options) = (payload.clone(), options.clone());
                self.inner
                    .runtime
                    .spawn(async move { mesh.call_with(&name, payload, options).await })
            })
            .collect();
        let mut results = Vec::with_capacity(calls.len());
        for call in calls {
            results.push(call.await.unwrap_or_else(|e| {
                Err(Status::internal(format!("a call of the batch failed: {e}")))
            }));
        }
        results
    }

    /// Starts a call whose result goes to this handle's
    /// [`AnswerSink`](crate::embed::AnswerSink) under `token`, a number of the
    /// caller's: [`call_then`](Mesh::call_then) without a function to
    /// allocate per call. While the thread that polls the handle's
    /// [`AnswerDriver`](crate::embed::AnswerDriver) takes the answer in with
    /// [`poll_with`](crate::embed::AnswerDriver::poll_with), the answer goes to
    /// that poll's callback instead, its payload read in place.
    ///
    /// `FailedPrecondition` (and nothing sent) unless the handle's driver
    /// was made with a sink ([`drive_answers_with`](Mesh::drive_answers_with));
    /// every other outcome, a failure at once included, reaches the sink
    /// or the callback.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// struct Printed;
    /// impl commy_mesh::embed::AnswerSink for Printed {
    ///     fn answer(&self, token: u64, result: Result<commy_mesh::Response, commy_mesh::Status>) {
    ///         println!("call {token}: {:?}", result.map(|r| r.into_payload()));
    ///     }
    /// }
    /// # async fn demo(mesh: commy_mesh::Mesh) -> Result<(), commy_mesh::Status> {
    /// let mut answers = mesh.drive_answers_with(Arc::new(Printed))?;
    /// mesh.call_token("echo", "hi", Default::default(), 7)?;
    /// // At every turn of the embedder's loop:
    /// answers.poll_with(256, |token, payload| {
    ///     println!("call {token}: {payload:?}");
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_token(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        options: CallOptions,
        token: u64,
    ) -> Result<(), Status> {
        let (claims, sink) = self.token_sink()?;
        if let Err(status) = self.check_open() {
            sink.answer(token, Err(status));
            return Ok(());
        }
        let payload = payload.as_ref();
        if let Some((conn, balanced, due)) = self.callback_route(name, &options) {
            conn.set_sink(sink);
            claims.claim(&conn);
            let done = Done::Token(token);
            if conn
                .call_then(payload, &options.metadata, due, balanced, done)
                .is_ok()
            {
                return Ok(());
            }
        }
        let sink = sink.clone();
        self.call_as_task(name, payload, options, move |r| sink.answer(token, r));
        Ok(())
    }

    /// [`call_token`](Mesh::call_token) for many calls of `name` at once,
    /// all with the same `options`: `calls` holds each call's payload and
    /// token. On an open shared-memory link they are sent together (one
    /// lookup of the link, one lock of its tables for them all); each
    /// result reaches the sink (or the driver's callback) under its token,
    /// as with `call_token`.
    pub fn call_tokens<'a>(
        &self,
        name: &str,
        options: CallOptions,
        calls: impl IntoIterator<Item = (&'a [u8], u64)>,
    ) -> Result<(), Status> {
        let calls: Vec<_> = calls.into_iter().collect();
        let (claims, sink) = self.token_sink()?;
        if self.check_open().is_ok()
            && let Some((conn, balanced, due)) = self.callback_route(name, &options)
        {
            conn.set_sink(sink);
            claims.claim_for(&conn, calls.len());
            // Those the link took no more (its instance drains) go
            // elsewhere, each on its own.
            let elsewhere = conn.call_tokens_then(calls, &options.metadata, due, balanced);
            for (payload, token) in elsewhere {
                let sink = sink.clone();
                self.call_as_task(name, payload, options.clone(), move |r| {
                    sink.answer(token, r)
                });
            }
            return Ok(());
        }
        for (payload, token) in calls {
            self.call_token(name, payload, options.clone(), token)?;
        }
        Ok(())
    }

    /// The claims of the answer driver and its sink, which token calls
    /// need.
    fn token_sink(&self) -> Result<(&Claims, &Arc<dyn AnswerSink>), Status> {
        self.inner
            .answers
            .get()
            .and_then(|c| Some((&**c, c.sink.as_ref()?)))
            .ok_or_else(|| {
                Status::failed_precondition(
                    "token calls need an answer sink: make the driver with drive_answers_with",
                )
            })
    }

    /// The link a callback or token call is sent on from the calling
    /// thread, whether the call is counted for balancing, and when it is
    /// due; `None` if the call runs as a task instead (over TLS, or before
    /// a link to the service is open).
    fn callback_route(
        &self,
        name: &str,
        options: &CallOptions,
    ) -> Option<(Arc<ClientConn>, bool, Due)> {
        if self.preference(options) == TransportPreference::Tls {
            return None;
        }
        let (conn, balanced) = self
            .inner
            .services
            .connected(name, options.hash_key.as_deref())?;
        let health = conn.stats.health();
        let retries = &health.retries;
        let idempotent = options.idempotent || retries.idempotent;
        let retried = idempotent && (retries.attempts > 1 || health.hedge.is_some());
        let limited = health.max_pending > 0;
        if conn.policy.is_some() || retried || limited {
            // The task records the outcome, retries or hedges as the
            // policy (or an idempotent call's retries and hedge) say, and
            // counts the call against the service's limit of pending
            // calls.
            return None;
        }
        let due = self.due(options);
        Some((conn, balanced, due))
    }

    /// Makes the [`AnswerDriver`](crate::embed::AnswerDriver) of this handle (and
    /// its clones): from now on, the answers to
    /// [`call_then`](Mesh::call_then) calls over shared memory are received
    /// by the thread that polls it, while it polls, instead of by the links'
    /// reader threads. One per handle: `FailedPrecondition` if it was made
    /// already.
    ///
    /// ```
    /// # async fn demo(mesh: commy_mesh::Mesh) -> Result<(), commy_mesh::Status> {
    /// let mut answers = mesh.drive_answers()?;
    /// mesh.call_then("echo", "hi", Default::default(), |_result| {});
    /// // At every turn of the embedder's loop:
    /// let poll_again_soon = answers.poll(256);
    /// # let _ = poll_again_soon;
    /// # Ok(())
    /// # }
    /// ```
    pub fn drive_answers(&self) -> Result<crate::embed::AnswerDriver, Status> {
        self.make_driver(None)
    }

    /// [`drive_answers`](Mesh::drive_answers), with `sink` receiving the
    /// answers of [`call_token`](Mesh::call_token) calls that the
    /// driver's [`poll_with`](crate::embed::AnswerDriver::poll_with) does not
    /// take itself (see [`AnswerSink`](crate::embed::AnswerSink)).
    pub fn drive_answers_with(
        &self,
        sink: Arc<dyn crate::embed::AnswerSink>,
    ) -> Result<crate::embed::AnswerDriver, Status> {
        self.make_driver(Some(sink))
    }

    fn make_driver(
        &self,
        sink: Option<Arc<dyn crate::embed::AnswerSink>>,
    ) -> Result<crate::embed::AnswerDriver, Status> {
        let claims = Arc::new(Claims::new(sink));
        self.inner
            .answers
            .set(claims.clone())
            .map_err(|_| Status::failed_precondition("this mesh handle has an answer driver"))?;
        Ok(crate::embed::AnswerDriver::new(claims))
    }

    /// Calls `name` with a serde value encoded by postcard, decoding the reply.
    pub async fn call_typed<Req, Resp>(&self, name: &str, request: &Req) -> Result<Resp, Status>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let body = postcard::to_allocvec(request)
            .map_err(|e| Status::invalid_argument(format!("cannot encode the request: {e}")))?;
        let reply = self.call(name, body).await?;
        postcard::from_bytes(&reply)
            .map_err(|e| Status::internal(format!("cannot decode the response: {e}")))
    }

    /// Sends a one-way message to one instance of `name` (no response).
    pub async fn send(&self, name: &str, payload: impl Into<Bytes>) -> Result<(), Status> {
        self.check_open()?;
        let service = service_name(name)?;
        let options = CallOptions::default();
        let mut due = self.due(&options);
        let pool = self.inner.services.get(&service);
        let payload = payload.into();
        let mut avoid = None;
        loop {
            let (endpoint, instance) = self
                .inner
                .services
                .pick(
                    &pool,
                    self.preference(&options),
                    due.absolute(),
                    avoid,
                    None,
                )
                .await?;
            let sent = endpoint
                .send(&service, payload.clone(), &Metadata::default(), due)
                .await;
            match sent {
                // Its instance drains (or its link broke) and it was not
                // sent: once more, elsewhere.
                Err(_) if avoid.is_none() && !endpoint.is_alive() => avoid = Some(instance),
                other => return other,
            }
        }
    }

    /// The transport a call may use.
    fn preference(&self, options: &CallOptions) -> TransportPreference {
        options.transport.unwrap_or_else(|| {
            self.inner
                .net
                .as_ref()
                .map_or(TransportPreference::Auto, |n| n.preference)
        })
    }

    /// When a call with `options` is due: the one place a call's timeout,
    /// deadline and start are put together, whatever its transport.
    /// When a call with `options` is due: by its timeout (the mesh's
    /// default if it sets none) and its deadline, and at the latest by the
    /// deadline of the request whose handler makes it (see
    /// [`inherited_deadline`](crate::service::inherited_deadline)).
    fn due(&self, options: &CallOptions) -> Due {
        Due::new(
            options.timeout.or(self.inner.default_timeout),
            due_by_inherited(options.deadline),
            options.started,
        )
    }

    /// Subscribes to `topic` with the default options (queue of 1024,
    /// `SlowSubscriber::Block`).
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, Status> {
        self.subscribe_with(topic, None, SubscribeOptions::default())
            .await
    }

    /// Joins queue group `group` of `topic`: each message goes to exactly
    /// one member of the group.
    pub async fn subscribe_group(&self, topic: &str, group: &str) -> Result<Subscription, Status> {
        self.subscribe_with(topic, Some(group), SubscribeOptions::default())
            .await
    }

    /// Subscribes with options, optionally as a member of a queue group.
    ///
    /// Subscribers on this host and publishers on it always meet over
    /// shared memory. Across hosts, a handle that listens over TLS
    /// announces the subscription to its peers, whose publishers send to
    /// it; one that does not listen subscribes at one peer of each other
    /// host on its own connection, and that peer pushes the messages its
    /// host publishes (docs/PROTOCOL.md 10.2).
    pub async fn subscribe_with(
        &self,
        topic: &str,
        group: Option<&str>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Status> {
        self.check_open()?;
        self.subscribe_as(topic, group, options, None)
    }

    /// [`Mesh::subscribe_with`] under the subscription id `id` (a new one
    /// if `None`).
    fn subscribe_as(
        &self,
        topic: &str,
        group: Option<&str>,
        options: SubscribeOptions,
        id: Option<commy_core::InstanceId>,
    ) -> Result<Subscription, Status> {
        let new = self
            .inner
            .pubsub
            .subscribe(topic, group, options.clone(), id)?;
        let mut subscription = new.subscription;
        let Some(net) = self.inner.net.as_ref() else {
            return Ok(subscription);
        };
        if net.endpoint().is_some() {
            net.add_subscription(&new.key, new.id, new.queue);
            let (net, key, id) = (net.clone(), new.key, new.id);
            subscription.on_drop(Box::new(move || net.remove_subscription(&key, id)));
        } else if net.peers.any() {
            let wanted = crate::pubsub::remote::Wanted {
                topic: subscription.topic().clone(),
                group: group.map(str::to_owned),
                options,
                id: new.id,
            };
            let following = crate::pubsub::remote::follow(
                net.peers.clone(),
                self.inner.registry.host().clone(),
                wanted,
                new.queue,
                self.inner.config.limits,
            );
            subscription.on_drop(Box::new(move || drop(following)));
        }
        Ok(subscription)
    }

    /// Publishes `payload` on `topic`: every subscriber gets it, and one
    /// member of each queue group. Returns how many deliveries were made
    /// (0 when nobody listens; a message nobody hears is dropped).
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<usize, Status> {
        self.publish_many(topic, &[payload.into()]).await
    }

    /// A publisher of `topic`: publishing through it goes where
    /// [`Mesh::publish`] goes, with the topic checked and its subscribers'
    /// links found once rather than for every message (see
    /// [`Publisher`]). Fails with `INVALID_ARGUMENT` for a bad topic name.
    pub fn publisher(&self, topic: &str) -> Result<Publisher, Status> {
        self.check_open()?;
        let route = self.inner.pubsub.route(topic)?;
        Ok(Publisher::new(self.clone(), route))
    }

    /// Publishes one message on `topic` written in place, as
    /// [`Mesh::publish`] publishes one: `write` gets a zeroed buffer of
    /// `max_len` bytes, fills the payload from its start and returns its
    /// length (at most `max_len`). On this host the buffer is the first
    /// subscriber's ring itself, so the message is built in shared memory
    /// and never copied for that subscriber (other subscribers get a copy
    /// from there, queue groups and TLS peers one more). When no
    /// subscriber is linked yet, or the message does not fit one ring
    /// record, the buffer is an ordinary one. `write` runs while the first
    /// subscriber's ring is held: keep it short, and do not publish from
    /// it. Returns how many deliveries were made.
    ///
    /// ```
    /// # use commy_mesh::Mesh;
    /// # async fn f(mesh: &Mesh) -> Result<(), commy_mesh::Status> {
    /// let reading = 21.5f64;
    /// mesh.publish_in_place("sensors/temp", 8, |buf| {
    ///     buf.copy_from_slice(&reading.to_le_bytes());
    ///     8
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_in_place(
        &self,
        topic: &str,
        max_len: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, Status> {
        self.check_open()?;
        let pubsub = &self.inner.pubsub;
        let (groups, copy) = self.beyond_this_host();
        let (local, payload) = pubsub.publish_in_place(topic, max_len, write, copy).await?;
        let mut delivered = local.delivered;
        if let Some(payload) = payload {
            delivered += Box::pin(self.publish_beyond(&local, groups, &[payload])).await?;
        }
        Ok(delivered)
    }

    /// Publishes each of `payloads` on `topic`, in order, as
    /// [`Mesh::publish`] does one: each subscriber gets them all in this
    /// order, and each message goes to one member of each queue group.
    /// To a subscriber on this host they are written back to back and made
    /// visible at once (one wake-up, not one per message), which is what
    /// makes a burst cheap. Returns how many deliveries were made, summed
    /// over the messages.
    pub async fn publish_many(&self, topic: &str, payloads: &[Bytes]) -> Result<usize, Status> {
        self.check_open()?;
        let pubsub = &self.inner.pubsub;
        let local = pubsub.publish(topic, payloads).await?;
        let mut delivered = local.delivered;
        let (groups, beyond) = self.beyond_this_host();
        if !beyond {
            return Ok(delivered);
        }
        delivered += self.publish_beyond(&local, groups, payloads).await?;
        Ok(delivered)
    }

    /// Whether a message published now may have queue groups to go to,
    /// and whether it may go anywhere beyond this host's plain subscribers
    /// at all (queue groups, or subscribers at TLS peers).
    fn beyond_this_host(&self) -> (bool, bool) {
        let groups = self.inner.pubsub.has_groups();
        (groups, groups || self.inner.net.is_some())
    }

    /// Publishes `payloads` (published to this host's plain subscribers as
    /// `local` says) to the queue groups (`groups`: if there may be any)
    /// and the subscribers at TLS peers, message by message; returns the
    /// deliveries made.
    async fn publish_beyond(
        &self,
        local: &crate::pubsub::Published,
        groups: bool,
        payloads: &[Bytes],
    ) -> Result<usize, Status> {
        let pubsub = &self.inner.pubsub;
        let mut delivered = 0;
        for payload in payloads {
            let mut groups_done = Vec::new();
            if groups {
                let (n, done) = Box::pin(pubsub.publish_groups(&local.route, payload)).await?;
                delivered += n;
                groups_done = done;
            }
            if let Some(net) = &self.inner.net {
                delivered += net
                    .peers
                    .publish(
                        &local.route.topic,
                        &local.route.key,
                        &local.reached,
                        &groups_done,
                        payload.clone(),
                    )
                    .await;
            }
        }
        Ok(delivered)
    }

    /// Every instance of service `name` this handle knows, as its pool
    /// sees it: where it is, whether it is in, ejected or half-open, its
    /// calls in flight, failures and round-trip estimate. Instances at TLS
    /// peers appear once the peers have listed them.
    pub fn endpoints(&self, name: &str) -> Result<Vec<EndpointInfo>, Status> {
        self.check_open()?;
        Ok(self.inner.services.endpoints(&service_name(name)?))
    }

    /// Messages this handle published on `topic` that subscribers on this
    /// host discarded unread because they fell behind under
    /// [`SlowSubscriber::DropOldest`](crate::SlowSubscriber::DropOldest):
    /// the publisher's side of what their [`Subscription::dropped`]
    /// counts. Each discarded copy counts once (a message two subscribers
    /// dropped counts twice). Subscribers write their counts into the
    /// shared memory of each publisher's link, so the answer is current
    /// for the subscribers still linked; subscribers at TLS peers are not
    /// counted.
    ///
    /// [`Subscription::dropped`]: crate::Subscription::dropped
    pub fn dropped_by_subscribers(&self, topic: &str) -> Result<u64, Status> {
        self.check_open()?;
        self.inner.pubsub.dropped_by_subscribers(topic)
    }

    /// How many deliveries a publish on `topic` would make now: this
    /// host's plain subscribers, one per queue group with a member, and
    /// those the TLS peers list that are not reached here.
    pub async fn subscribers(&self, topic: &str) -> Result<usize, Status> {
        self.check_open()?;
        let local = self.inner.pubsub.subscribers(topic).await?;
        let mut n = local.plain.len() + local.groups.len();
        if let Some(net) = &self.inner.net {
            n += net
                .peers
                .count_subscribers(&local.key, &local.plain, &local.groups);
        }
        Ok(n)
    }

    /// Waits until a publish on `topic` would reach at least `n`
    /// subscribers ([`Mesh::subscribers`]), at most `timeout`; returns how
    /// many it would reach, or `DEADLINE_EXCEEDED` naming how many it
    /// would at the end. Subscribers appear asynchronously (a new one is
    /// seen within milliseconds on this host, after the peer's next
    /// listing across hosts): wait for them before publishing what they
    /// must not miss.
    pub async fn wait_for_subscribers(
        &self,
        topic: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<usize, Status> {
        let started = std::time::Instant::now();
        loop {
            let have = self.subscribers(topic).await?;
            if have >= n {
                return Ok(have);
            }
            if started.elapsed() >= timeout {
                return Err(Status::deadline_exceeded(format!(
                    "{have} of {n} subscribers of {topic} after {timeout:?}"
                )));
            }
            tokio::time::sleep(SUBSCRIBERS_POLL).await;
        }
    }

    /// Calls that went over TLS because shared memory failed at connect.
    pub fn transport_fallbacks(&self) -> u64 {
        self.inner.net.as_ref().map_or(0, |n| n.peers.fallbacks())
    }

    /// The TLS endpoint this handle serves on, if it listens.
    pub fn tls_endpoint(&self) -> Option<commy_core::TlsAddr> {
        self.inner.net.as_ref().and_then(|n| n.endpoint().cloned())
    }

    /// The instances the peers serve (their last listings), after waiting
    /// up to `wait` for every peer's first listing.
    pub async fn remote_instances(&self, wait: Duration) -> Vec<Instance> {
        match &self.inner.net {
            Some(n) => {
                n.peers.wait_listed(wait).await;
                n.peers.remote_instances()
            }
            None => Vec::new(),
        }
    }

    /// A named shared-memory region of this mesh: finish with `.size(n)`,
    /// `.ttl(..)`, then `.create()`, `.open()` or `.open_or_create()`.
    /// Regions live in `<runtime dir>/regions/<mesh>` (under the host id's
    /// subdirectory for a host id of its own, see
    /// [`LocalRegistry`](crate::discovery::LocalRegistry)); see
    /// [`commy_shm::RegionOptions`] for consistency, TTL and permissions.
    pub fn region(&self, name: &str) -> commy_shm::RegionOptions {
        let dir = self
            .inner
            .registry
            .dir()
            .parent()
            .map(|rt| rt.join("regions").join(self.inner.mesh.as_str()))
            .unwrap_or_else(|| self.inner.registry.dir().join("regions"));
        commy_shm::RegionOptions::new(name).dir(dir)
    }

    /// Closes the handle: stops serving (deregisters every service, then
    /// waits for in-flight requests to finish) and drops client links.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let served: Vec<_> = self.inner.served.lock().drain(..).collect();
        for s in served {
            s.deregister();
            s.drain().await;
        }
        self.inner.services.clear();
        self.inner.pubsub.clear();
        self.inner.registry.tidy();
        if let Some(net) = &self.inner.net {
            net.close().await;
        }
    }

    fn check_open(&self) -> Result<(), Status> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Status::failed_precondition("the mesh handle is closed"))
        } else {
            Ok(())
        }
    }
}

/// The pools of the instances `registry` finds (and `peers` list, if
/// given), linked with `config`'s settings.
#[allow(clippy::too_many_arguments)]
fn pools(
    config: &Config,
    mesh: &MeshName,
    call_spin: Duration,
    registry: &LocalRegistry,
    peers: Option<&Arc<Peers>>,
    policies: Option<CallPolicies>,
    resilience: &Arc<Resilience>,
    runtime: &tokio::runtime::Handle,
) -> Pools {
    let mut sources: Vec<Arc<dyn Discover>> = vec![Arc::new(registry.clone())];
    if let Some(peers) = peers {
        sources.push(Arc::new(PeerSource(peers.clone())));
    }
    Pools::new(
        mesh.clone(),
        sources,
        peers.cloned(),
        config.link.clone(),
        config.limits.unfragmented(),
        call_spin,
        policies,
        resilience.clone(),
        runtime.clone(),
    )
}

fn service_name(name: &str) -> Result<ServiceName, Status> {
    ServiceName::new(name)
        .map_err(|e| Status::invalid_argument(format!("invalid service name {name:?}: {e}")))
}

impl MeshBuilder {
    /// Opens the mesh.
    pub async fn open(self) -> Result<Mesh, OpenError> {
        if let Some(e) = self.error {
            return Err(OpenError::Config(e));
        }
        Mesh::open(self.config).await
    }
}
