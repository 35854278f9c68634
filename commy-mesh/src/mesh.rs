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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{Deadline, InstanceId, Limits, MeshName, Metadata, ServiceName, Status};
use commy_discovery::{Discover, Instance, LocalRegistry, PowerOfTwo};
use commy_shm::{LinkConfig, RuntimeDir, ShmLink, UdsListener};
use rustc_hash::FxHashMap;

use crate::call::deadline::Due;
use crate::call::shm::{ClientConn, Started};
use crate::call::table::{AnswerSink, Done};
use crate::embed::answers::Claims;
use crate::embed::driven::DrivenLink;
use crate::net::{CallKind, NetState};
use crate::netconfig::{NetConfig, TransportPreference};
use crate::response::Response;
use crate::serve::dispatch::ServeCtx;
use crate::serve::handler::{Handler, erase, erase_deferred};
use crate::serve::permits::Permits;
use crate::serve::request::{Request, interned};
use crate::serve::responder::Responder;
use crate::serve::shm::serve_link;
use crate::sync::lock;

/// Settings of a mesh handle. `Config::default()` is the embedded default:
/// mesh `default`, local discovery in the runtime dir, nothing to write first.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The mesh's name: processes only see services of the same mesh.
    pub mesh: MeshName,
    /// Where sockets live; `None` = `$COMMY_RUNTIME_DIR`, else
    /// `$XDG_RUNTIME_DIR/commy`, else `/tmp/commy-<uid>`.
    pub runtime_dir: Option<PathBuf>,
    /// Shared-memory link settings.
    pub link: LinkConfig,
    /// Frame limits enforced on everything received.
    pub limits: Limits,
    /// Handlers of one service instance that may be waiting at once (a
    /// handler that answers without waiting runs on its link's thread and
    /// takes no slot); more wait in line.
    pub max_concurrency: usize,
    /// Timeout of calls that set none.
    pub default_timeout: Option<Duration>,
    /// How long a caller polls the link for its response before it yields
    /// its thread and waits to be woken (zero: never poll). Polling saves
    /// the thread hand-off, which costs more than a whole quick call.
    pub call_spin: Duration,
    /// Network settings: TLS listener, peers, certificates, transport
    /// preference (unset ones come from the environment and config file).
    pub net: NetConfig,
    /// Runs each service link thread's work (see [`ThreadHook`]).
    pub link_thread_hook: Option<ThreadHook>,
}

/// Wraps the work of every thread that serves a link of this mesh's
/// services: the hook is called on that thread with the thread's whole
/// work, which it must run exactly once. A binding uses it to set the
/// thread up once instead of per request (Python: attach the thread to the
/// interpreter once, so each handler call only takes the GIL).
#[derive(Clone)]
pub struct ThreadHook(Arc<HookFn>);

/// A link thread's whole work, as a [`ThreadHook`] receives it.
pub type ThreadWork<'a> = &'a mut (dyn FnMut() + Send);

type HookFn = dyn Fn(ThreadWork<'_>) + Send + Sync;

impl ThreadHook {
    /// A hook that runs `f` around each link thread's work.
    pub fn new(f: impl Fn(ThreadWork<'_>) + Send + Sync + 'static) -> ThreadHook {
        ThreadHook(Arc::new(f))
    }

    fn run(&self, work: ThreadWork<'_>) {
        (self.0)(work)
    }
}

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mesh: MeshName::default(),
            runtime_dir: None,
            link: LinkConfig::default(),
            limits: Limits::DEFAULT,
            max_concurrency: 1024,
            default_timeout: Some(Duration::from_secs(30)),
            call_spin: Duration::from_micros(50),
            net: NetConfig::default(),
            link_thread_hook: None,
        }
    }
}

/// Builds a [`Mesh`] with options.
#[derive(Debug, Clone, Default)]
pub struct MeshBuilder {
    config: Config,
    error: Option<String>,
}

impl MeshBuilder {
    /// Joins the mesh named `name` instead of `default`.
    pub fn mesh(mut self, name: &str) -> MeshBuilder {
        match MeshName::new(name) {
            Ok(n) => self.config.mesh = n,
            Err(e) => self.error = Some(format!("invalid mesh name {name:?}: {e}")),
        }
        self
    }

    /// Uses `dir` as the runtime dir (must be private: mode 0700, ours).
    pub fn runtime_dir(mut self, dir: impl AsRef<Path>) -> MeshBuilder {
        self.config.runtime_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Sets the shared-memory link settings.
    pub fn link(mut self, link: LinkConfig) -> MeshBuilder {
        self.config.link = link;
        self
    }

    /// Sets how many requests one instance handles at once.
    pub fn max_concurrency(mut self, n: usize) -> MeshBuilder {
        self.config.max_concurrency = n.max(1);
        self
    }

    /// Sets the timeout of calls that set none (`None`: wait forever).
    pub fn default_timeout(mut self, t: Option<Duration>) -> MeshBuilder {
        self.config.default_timeout = t;
        self
    }

    /// Sets how long a caller polls for its response before sleeping
    /// (see [`Config::call_spin`]).
    pub fn call_spin(mut self, spin: Duration) -> MeshBuilder {
        self.config.call_spin = spin;
        self
    }

    /// Serves this handle's services over TLS at `endpoint`
    /// (`tls://ADDR:PORT`; port 0 picks a free one, which
    /// [`Mesh::tls_endpoint`] then names).
    pub fn listen(mut self, endpoint: &str) -> MeshBuilder {
        match crate::netconfig::parse_listen(endpoint) {
            Ok(a) => self.config.net.listen = Some(a),
            Err(e) => self.error = Some(format!("invalid listen endpoint: {e}")),
        }
        self
    }

    /// Adds a static peer (`tls://HOST:PORT`) whose instances may be called.
    pub fn peer(mut self, endpoint: &str) -> MeshBuilder {
        match crate::netconfig::parse_tls(endpoint) {
            Ok(a) => self.config.net.peers.push(a),
            Err(e) => self.error = Some(format!("invalid peer endpoint: {e}")),
        }
        self
    }

    /// Sets which transport calls use (see [`TransportPreference`]).
    pub fn transport(mut self, t: TransportPreference) -> MeshBuilder {
        self.config.net.transport = Some(t);
        self
    }

    /// Sets all network settings at once.
    pub fn net(mut self, net: NetConfig) -> MeshBuilder {
        self.config.net = net;
        self
    }

    /// Wraps the work of every service link thread (see [`ThreadHook`]).
    pub fn link_thread_hook(mut self, hook: ThreadHook) -> MeshBuilder {
        self.config.link_thread_hook = Some(hook);
        self
    }

    /// Opens the mesh.
    pub async fn open(self) -> Result<Mesh, OpenError> {
        if let Some(e) = self.error {
            return Err(OpenError::Config(e));
        }
        Mesh::open(self.config).await
    }
}

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

/// Options of one call.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// Give up after this long (overrides the mesh's default timeout).
    pub timeout: Option<Duration>,
    /// An absolute deadline (the earlier of this and `timeout` applies).
    pub deadline: Option<Deadline>,
    /// Metadata sent with the request.
    pub metadata: Metadata,
    /// The transport this call may use (default: the mesh's).
    pub transport: Option<TransportPreference>,
    /// How long this caller polls for its answer before it sleeps, instead
    /// of [`Config::call_spin`].
    pub spin: Option<Duration>,
    /// When the call's timeout starts counting on the calling side
    /// (default: when it is made, read from the clock once needed): a
    /// caller making many calls at once may read the clock once for all of
    /// them. The service is told the timeout itself, counted from the
    /// request's arrival.
    pub started: Option<Instant>,
}

impl CallOptions {
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> CallOptions {
        self.timeout = Some(t);
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, m: Metadata) -> CallOptions {
        self.metadata = m;
        self
    }

    /// Forces a transport for this call.
    pub fn transport(mut self, t: TransportPreference) -> CallOptions {
        self.transport = Some(t);
        self
    }

    /// Sets this call's polling budget (see [`Config::call_spin`]).
    pub fn spin(mut self, spin: Duration) -> CallOptions {
        self.spin = Some(spin);
        self
    }

    /// Sets when the call's timeout starts counting (see
    /// [`started`](CallOptions::started)).
    pub fn started_at(mut self, at: Instant) -> CallOptions {
        self.started = Some(at);
        self
    }
}

/// A handle on the mesh. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("mesh", &self.inner.config.mesh)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    /// Unique among this process's mesh handles.
    id: u64,
    pub(crate) config: Config,
    registry: LocalRegistry,
    /// Subscribers announce themselves here (mesh `<mesh>.t`).
    pub(crate) topics: LocalRegistry,
    /// Pools of topic subscriber sets, keyed by their registry name.
    topic_pools: Mutex<FxHashMap<ServiceName, Arc<Pool>>>,
    /// Queue groups per topic.
    pub(crate) group_index: Arc<crate::pubsub::GroupIndex>,
    runtime: tokio::runtime::Handle,
    pools: Mutex<FxHashMap<ServiceName, Arc<Pool>>>,
    closed: AtomicBool,
    /// Services served through this handle, to drain on close.
    served: Mutex<Vec<Arc<Served>>>,
    /// The TLS side, when configured.
    net: Option<Arc<NetState>>,
    /// Set once [`Mesh::drive_answers`] made this handle's driver.
    answers: OnceLock<Arc<Claims>>,
}

/// A pool's instances and our links to them, under one lock.
#[derive(Default)]
struct PoolState {
    instances: Vec<Instance>,
    conns: FxHashMap<InstanceId, Arc<ClientConn>>,
}

impl PoolState {
    /// Replaces the known instances. No link stays marked as its service's
    /// only one ([`ClientConn::sole`]) until a call finds it so again.
    fn set_instances(&mut self, instances: Vec<Instance>) {
        for c in self.conns.values() {
            c.sole.store(false, Ordering::Relaxed);
        }
        self.instances = instances;
    }
}

/// Ids of mesh handles, so a thread's [`LastCalled`] never mixes them up.
static NEXT_MESH_ID: AtomicU64 = AtomicU64::new(1);

/// The service a thread called last, if it has a single instance: repeated
/// calls to it find their link without taking the pool's locks. The entry
/// holds the link weakly (it never keeps a link open) and is used only
/// while the link lives and is still marked as the service's only instance
/// ([`ClientConn::sole`]; any change of the pool's instances clears it).
struct LastCalled {
    mesh: u64,
    service: Box<str>,
    conn: std::sync::Weak<ClientConn>,
}

thread_local! {
    static LAST_CALLED: std::cell::RefCell<Option<LastCalled>> =
        const { std::cell::RefCell::new(None) };
}

impl LastCalled {
    fn get(mesh: u64, service: &str) -> Option<Arc<ClientConn>> {
        LAST_CALLED.with_borrow(|last| {
            let last = last.as_ref()?;
            if last.mesh != mesh || &*last.service != service {
                return None;
            }
            let conn = last.conn.upgrade()?;
            (conn.is_alive() && conn.sole.load(Ordering::Relaxed)).then_some(conn)
        })
    }

    fn set(mesh: u64, service: &str, conn: &Arc<ClientConn>) {
        LAST_CALLED.with_borrow_mut(|last| match last {
            Some(l) if l.mesh == mesh && &*l.service == service => {
                l.conn = Arc::downgrade(conn);
            }
            _ => {
                *last = Some(LastCalled {
                    mesh,
                    service: service.into(),
                    conn: Arc::downgrade(conn),
                });
            }
        });
    }
}

/// The client side of one service: its instances and our links to them.
pub(crate) struct Pool {
    /// Where its instances are found (services or topics).
    source: Arc<dyn Discover>,
    pub(crate) service: ServiceName,
    state: Mutex<PoolState>,
    /// Serialises connection attempts per instance.
    connecting: tokio::sync::Mutex<()>,
    balancer: PowerOfTwo,
}

impl Mesh {
    /// Opens the mesh with `config` (use `Config::default()` for the
    /// embedded default). Must run inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Mesh, OpenError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let dir = match &config.runtime_dir {
            Some(d) => RuntimeDir::at(d)?,
            None => RuntimeDir::resolve()?,
        };
        let registry = LocalRegistry::new(dir.clone(), &config.mesh)?;
        let topics_mesh = MeshName::new(&format!("{}.t", config.mesh))
            .map_err(|e| OpenError::Config(format!("mesh name too long for topics: {e}")))?;
        let topics = LocalRegistry::new(dir, &topics_mesh)?;
        let mut config = config;
        config.net = std::mem::take(&mut config.net)
            .resolve()
            .map_err(OpenError::Config)?;
        let net = if config.net.in_use() {
            Some(
                NetState::start(
                    &config.net,
                    &config.mesh,
                    registry.host().clone(),
                    config.limits,
                )
                .await?,
            )
        } else {
            None
        };
        Ok(Mesh {
            inner: Arc::new(Inner {
                id: NEXT_MESH_ID.fetch_add(1, Ordering::Relaxed),
                config,
                registry,
                topics,
                topic_pools: Mutex::new(FxHashMap::default()),
                group_index: Arc::default(),
                runtime,
                pools: Mutex::new(FxHashMap::default()),
                closed: AtomicBool::new(false),
                served: Mutex::new(Vec::new()),
                net,
                answers: OnceLock::new(),
            }),
        })
    }

    /// Options for [`Mesh::open`].
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    /// The mesh's name.
    pub fn name(&self) -> &MeshName {
        &self.inner.config.mesh
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
        let path = self
            .inner
            .registry
            .socket_path(&service, id)
            .map_err(|e| Status::unavailable(format!("cannot announce {service}: {e}")))?;
        let listener = UdsListener::bind(&path)
            .map_err(|e| Status::unavailable(format!("cannot listen for {service}: {e}")))?;
        let ctx = Arc::new(ServeCtx {
            handler,
            limits: self.inner.config.limits,
            runtime: self.inner.runtime.clone(),
            permits: Permits::new(self.inner.config.max_concurrency),
            in_flight: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(tokio::sync::Notify::new()),
            draining: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            service: interned(&service),
        });
        if let Some(net) = &self.inner.net {
            net.add(&service, id, ctx.clone());
        }
        let served = Arc::new(Served {
            service,
            id,
            path,
            stop: Arc::new(AtomicBool::new(false)),
            ctx: ctx.clone(),
            net: self.inner.net.clone(),
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
        )?;
        if let Ok(mut s) = self.inner.served.lock() {
            s.push(served.clone());
        }
        Ok(ServiceHandle { served })
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
        options: CallOptions,
    ) -> Result<Response, Status> {
        self.check_open()?;
        let payload = payload.into();
        let preference = self.preference(&options);
        if preference != TransportPreference::Tls {
            // The fast path: a link already open. It stays small and does
            // not allocate; a call answered within the spin completes in
            // the first poll.
            if let Some((conn, balanced)) = self.connected(name) {
                let due = Due::new(
                    options.timeout.or(self.inner.config.default_timeout),
                    options.deadline,
                    options.started,
                );
                return match conn.start_call(
                    payload,
                    &options.metadata,
                    due,
                    balanced,
                    options.spin,
                ) {
                    Started::Done(result) => result,
                    Started::Waiting(waiting) => conn.finish_call(waiting).await,
                };
            }
        }
        // Boxed: finding and connecting an instance, or TLS, would make
        // every call's future large.
        Box::pin(self.call_routed(name, payload, options, preference)).await
    }

    /// A call that has to find (or connect to) an instance first, or goes
    /// over TLS.
    async fn call_routed(
        &self,
        name: &str,
        payload: Bytes,
        options: CallOptions,
        preference: TransportPreference,
    ) -> Result<Response, Status> {
        if preference == TransportPreference::Tls {
            let service = service_name(name)?;
            return self
                .net_call(&service, payload, &options, CallKind::default())
                .await;
        }
        let due = Due::new(
            options.timeout.or(self.inner.config.default_timeout),
            options.deadline,
            options.started,
        );
        let pool = self.pool(&service_name(name)?);
        let conn = match self.route(&pool, preference).await? {
            Route::Shm(c) => c,
            Route::Tls(kind) => {
                return self.net_call(&pool.service, payload, &options, kind).await;
            }
        };
        conn.call(payload, &options.metadata, due, true, options.spin)
            .await
    }

    /// Starts a call whose result goes to `done` instead of a future: on
    /// shared memory, with a link already open, the request is written from
    /// this thread and `done` runs on the thread that reads the answer (the
    /// link's reader, or the thread polling this handle's
    /// [`AnswerDriver`](crate::AnswerDriver)), with no task and no further
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
            return conn.call_then(payload, &options.metadata, due, balanced, done);
        }
        let mesh = self.clone();
        let name = name.to_owned();
        let payload = Bytes::copy_from_slice(payload);
        self.inner.runtime.spawn(async move {
            done(mesh.call_with(&name, payload, options).await);
        });
    }

    /// Starts a call whose result goes to this handle's
    /// [`AnswerSink`](crate::AnswerSink) under `token`, a number of the
    /// caller's: [`call_then`](Mesh::call_then) without a function to
    /// allocate per call. While the thread that polls the handle's
    /// [`AnswerDriver`](crate::AnswerDriver) takes the answer in with
    /// [`poll_with`](crate::AnswerDriver::poll_with), the answer goes to
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
    /// impl commy_mesh::AnswerSink for Printed {
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
            conn.call_then(payload, &options.metadata, due, balanced, done);
            return Ok(());
        }
        let (mesh, sink) = (self.clone(), sink.clone());
        let name = name.to_owned();
        let payload = Bytes::copy_from_slice(payload);
        self.inner.runtime.spawn(async move {
            sink.answer(token, mesh.call_with(&name, payload, options).await);
        });
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
        if self.check_open().is_ok() {
            if let Some((conn, balanced, due)) = self.callback_route(name, &options) {
                conn.set_sink(sink);
                claims.claim_for(&conn, calls.len());
                conn.call_tokens_then(calls, &options.metadata, due, balanced);
                return Ok(());
            }
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
        let (conn, balanced) = self.connected(name)?;
        let due = Due::new(
            options.timeout.or(self.inner.config.default_timeout),
            options.deadline,
            options.started,
        );
        Some((conn, balanced, due))
    }

    /// Makes the [`AnswerDriver`](crate::AnswerDriver) of this handle (and
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
    pub fn drive_answers(&self) -> Result<crate::AnswerDriver, Status> {
        self.make_driver(None)
    }

    /// [`drive_answers`](Mesh::drive_answers), with `sink` receiving the
    /// answers of [`call_token`](Mesh::call_token) calls that the
    /// driver's [`poll_with`](crate::AnswerDriver::poll_with) does not
    /// take itself (see [`AnswerSink`](crate::AnswerSink)).
    pub fn drive_answers_with(
        &self,
        sink: Arc<dyn crate::AnswerSink>,
    ) -> Result<crate::AnswerDriver, Status> {
        self.make_driver(Some(sink))
    }

    fn make_driver(
        &self,
        sink: Option<Arc<dyn crate::AnswerSink>>,
    ) -> Result<crate::AnswerDriver, Status> {
        let claims = Arc::new(Claims::new(sink));
        self.inner
            .answers
            .set(claims.clone())
            .map_err(|_| Status::failed_precondition("this mesh handle has an answer driver"))?;
        Ok(crate::AnswerDriver::new(claims))
    }

    /// The fast path of picking: a live link to an instance of a service
    /// already known, chosen like [`pick`](Mesh::pick), without allocating.
    /// Also says whether the call must be counted for balancing (only if
    /// there are several instances).
    ///
    /// A service with one instance is remembered per thread (see
    /// [`LastCalled`]): calling it again skips the pool's two locks.
    fn connected(&self, name: &str) -> Option<(Arc<ClientConn>, bool)> {
        if let Some(conn) = LastCalled::get(self.inner.id, name) {
            return Some((conn, false));
        }
        let pools = lock(&self.inner.pools);
        let pool = pools.get(name)?;
        let state = lock(&pool.state);
        if state.instances.is_empty() {
            return None;
        }
        let idx = choose(pool, &state.instances, &state.conns);
        let conn = state.conns.get(&state.instances[idx].id)?;
        if !conn.is_alive() {
            return None;
        }
        let several = state.instances.len() > 1;
        if !several {
            // Under the pool's lock, like every change of its instances,
            // which clears the mark again.
            conn.sole.store(true, Ordering::Relaxed);
            LastCalled::set(self.inner.id, name, conn);
        }
        Some((conn.clone(), several))
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
        let preference = self.preference(&options);
        let oneway = CallKind {
            oneway: true,
            fallback: None,
        };
        if preference == TransportPreference::Tls {
            return self
                .net_call(&service, payload.into(), &options, oneway)
                .await
                .map(drop);
        }
        let pool = self.pool(&service);
        let conn = match self.route(&pool, preference).await? {
            Route::Shm(c) => c,
            Route::Tls(kind) => {
                let kind = CallKind {
                    oneway: true,
                    ..kind
                };
                return self
                    .net_call(&service, payload.into(), &options, kind)
                    .await
                    .map(drop);
            }
        };
        conn.send_oneway(&payload.into(), &Metadata::default())
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

    /// Where a call goes: a shared-memory link, or a peer over TLS (in
    /// `auto`, when the service has no local instance, or when shared memory
    /// failed at connect: then the failure travels along, for when no peer
    /// can take the call either).
    async fn route(
        &self,
        pool: &Arc<Pool>,
        preference: TransportPreference,
    ) -> Result<Route, Status> {
        let net = match (&self.inner.net, preference) {
            (Some(n), TransportPreference::Auto) => n,
            _ => return self.pick(pool).await.map(Route::Shm),
        };
        let local_empty = lock(&pool.state).instances.is_empty();
        if net.go_remote(&pool.service, local_empty) {
            return Ok(Route::Tls(CallKind::default()));
        }
        match self.pick(pool).await {
            Ok(c) => Ok(Route::Shm(c)),
            Err(e) if e.code() == commy_core::Code::NotFound => Ok(Route::Tls(CallKind::default())),
            Err(e) => {
                tracing::debug!("no shared-memory link to '{}': {e}", pool.service);
                Ok(Route::Tls(CallKind {
                    oneway: false,
                    fallback: Some(e),
                }))
            }
        }
    }

    /// A call (or one-way message) through a peer over TLS.
    async fn net_call(
        &self,
        service: &ServiceName,
        payload: Bytes,
        options: &CallOptions,
        kind: CallKind,
    ) -> Result<Response, Status> {
        let Some(net) = &self.inner.net else {
            return Err(Status::failed_precondition(
                "the TLS transport is not configured (no listen address or peers)",
            ));
        };
        let timeout = options.timeout.or(self.inner.config.default_timeout);
        let now = options.started.unwrap_or_else(Instant::now);
        let deadline = match (
            timeout.map(|t| Deadline::after_at(t, now)),
            options.deadline,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        net.call(service, payload, &options.metadata, deadline, &[], kind)
            .await
    }

    /// Calls that went over TLS because shared memory failed at connect.
    pub fn transport_fallbacks(&self) -> u64 {
        self.inner.net.as_ref().map_or(0, |n| n.fallbacks())
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
                n.wait_listed(wait).await;
                n.remote_instances()
            }
            None => Vec::new(),
        }
    }

    /// A named shared-memory region of this mesh: finish with `.size(n)`,
    /// `.ttl(..)`, then `.create()`, `.open()` or `.open_or_create()`.
    /// Regions live in `<runtime dir>/regions/<mesh>`; see
    /// [`commy_shm::RegionOptions`] for consistency, TTL and permissions.
    pub fn region(&self, name: &str) -> commy_shm::RegionOptions {
        let dir = self
            .inner
            .registry
            .dir()
            .parent()
            .map(|rt| rt.join("regions").join(self.inner.config.mesh.as_str()))
            .unwrap_or_else(|| self.inner.registry.dir().join("regions"));
        commy_shm::RegionOptions::new(name).dir(dir)
    }

    /// Closes the handle: stops serving (deregisters every service, then
    /// waits for in-flight requests to finish) and drops client links.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let served: Vec<_> = self
            .inner
            .served
            .lock()
            .map(|mut s| s.drain(..).collect())
            .unwrap_or_default();
        for s in served {
            s.deregister();
            s.drain().await;
        }
        lock(&self.inner.pools).clear();
        lock(&self.inner.topic_pools).clear();
        if let Some(net) = &self.inner.net {
            net.close().await;
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The TLS side, when configured.
    pub(crate) fn net(&self) -> Option<&Arc<NetState>> {
        self.inner.net.as_ref()
    }

    pub(crate) fn check_open_pub(&self) -> Result<(), Status> {
        self.check_open()
    }

    fn check_open(&self) -> Result<(), Status> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Status::failed_precondition("the mesh handle is closed"))
        } else {
            Ok(())
        }
    }

    fn pool(&self, service: &ServiceName) -> Arc<Pool> {
        self.pool_in(&self.inner.pools, &self.inner.registry, service)
    }

    /// The pool of a topic's subscriber set (see `pubsub`).
    pub(crate) fn topic_pool(&self, name: &ServiceName) -> Arc<Pool> {
        self.pool_in(&self.inner.topic_pools, &self.inner.topics, name)
    }

    fn pool_in(
        &self,
        pools: &Mutex<FxHashMap<ServiceName, Arc<Pool>>>,
        registry: &LocalRegistry,
        service: &ServiceName,
    ) -> Arc<Pool> {
        let source: Arc<dyn Discover> = Arc::new(registry.clone());
        let mut pools = lock(pools);
        pools
            .entry(service.clone())
            .or_insert_with(|| {
                let pool = Arc::new(Pool {
                    source,
                    service: service.clone(),
                    state: Mutex::new(PoolState::default()),
                    connecting: tokio::sync::Mutex::new(()),
                    balancer: PowerOfTwo::new(),
                });
                spawn_watch(&self.inner, &pool);
                pool
            })
            .clone()
    }

    /// The known instances of a pool (scanning once if none are known yet).
    pub(crate) fn instances_of(&self, pool: &Arc<Pool>) -> Vec<Instance> {
        let known = lock(&pool.state).instances.clone();
        if !known.is_empty() {
            return known;
        }
        let scanned = pool.source.instances(&pool.service).unwrap_or_default();
        lock(&pool.state).set_instances(scanned.clone());
        scanned
    }

    /// Picks an instance (least loaded of two random choices) and returns a
    /// live link to it, connecting if needed.
    pub(crate) async fn pick(&self, pool: &Arc<Pool>) -> Result<Arc<ClientConn>, Status> {
        let mut instances = lock(&pool.state).instances.clone();
        if instances.is_empty() {
            // The watch may not have delivered its first snapshot yet.
            instances = pool.source.instances(&pool.service).map_err(|e| {
                Status::unavailable(format!("cannot list instances of {}: {e}", pool.service))
            })?;
            lock(&pool.state).set_instances(instances.clone());
        }
        let mut tried = 0;
        while !instances.is_empty() {
            let idx = choose(pool, &instances, &lock(&pool.state).conns);
            let inst = instances.swap_remove(idx);
            tried += 1;
            match self.connect(pool, &inst).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!("instance {} of {} unusable: {e}", inst.id, pool.service);
                    let mut state = lock(&pool.state);
                    let mut left = std::mem::take(&mut state.instances);
                    left.retain(|i| i.id != inst.id);
                    state.set_instances(left);
                }
            }
        }
        if tried == 0 {
            Err(Status::not_found(format!(
                "no instance of service '{}' in mesh '{}'",
                pool.service, self.inner.config.mesh
            )))
        } else {
            Err(Status::unavailable(format!(
                "no reachable instance of service '{}' ({tried} tried)",
                pool.service
            )))
        }
    }

    pub(crate) async fn connect(
        &self,
        pool: &Arc<Pool>,
        inst: &Instance,
    ) -> Result<Arc<ClientConn>, Status> {
        if let Some(c) = lock(&pool.state).conns.get(&inst.id) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let _one_at_a_time = pool.connecting.lock().await;
        if let Some(c) = lock(&pool.state).conns.get(&inst.id) {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let commy_core::Endpoint::Shm(addr) = &inst.endpoint else {
            return Err(Status::unavailable(
                "only shared-memory endpoints are supported",
            ));
        };
        let path = addr.to_path_buf();
        let link_config = self.inner.config.link.clone();
        let link = tokio::task::spawn_blocking(move || ShmLink::connect(path, link_config))
            .await
            .map_err(|e| Status::internal(format!("connect task failed: {e}")))?
            .map_err(|e| Status::unavailable(format!("cannot connect to {}: {e}", inst.id)))?;
        let conn = ClientConn::start(
            inst.id,
            link,
            self.inner.config.limits,
            self.inner.config.call_spin,
        );
        lock(&pool.state).conns.insert(inst.id, conn.clone());
        Ok(conn)
    }
}

/// Where a call goes (see [`Mesh::route`]).
enum Route {
    Shm(Arc<ClientConn>),
    Tls(CallKind),
}

/// The instance a call goes to: the less loaded of two random choices (by
/// calls in flight on our links). `instances` is not empty.
fn choose(
    pool: &Pool,
    instances: &[Instance],
    conns: &FxHashMap<InstanceId, Arc<ClientConn>>,
) -> usize {
    let load = |i: usize| {
        conns
            .get(&instances[i].id)
            .map_or(0, |c| c.in_flight.load(Ordering::Relaxed) as u64)
    };
    pool.balancer.pick(instances.len(), load).unwrap_or(0)
}

fn service_name(name: &str) -> Result<ServiceName, Status> {
    ServiceName::new(name)
        .map_err(|e| Status::invalid_argument(format!("invalid service name {name:?}: {e}")))
}

/// Keeps `pool.instances` up to date from the local registry's watch, and
/// drops links to instances that vanished.
fn spawn_watch(inner: &Arc<Inner>, pool: &Arc<Pool>) {
    let weak = Arc::downgrade(pool);
    let watch = pool.source.watch(&pool.service);
    let service = pool.service.clone();
    inner.runtime.spawn(async move {
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch instances of {service}: {e}");
                return;
            }
        };
        while let Some(set) = std::future::poll_fn(|cx| watch.as_mut().poll_next(cx)).await {
            let Some(pool) = weak.upgrade() else { return };
            let mut state = lock(&pool.state);
            state.set_instances(set);
            let PoolState { instances, conns } = &mut *state;
            conns.retain(|id, c| c.is_alive() && instances.iter().any(|i| i.id == *id));
        }
    });
}

/// A service served by this process.
struct Served {
    service: ServiceName,
    id: InstanceId,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    ctx: Arc<ServeCtx>,
    net: Option<Arc<NetState>>,
}

impl Served {
    /// Stops accepting: the socket is unlinked now (so discovery sees the
    /// instance vanish at once) and the accept thread ends.
    fn deregister(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(net) = &self.net {
                net.remove(&self.service, self.id);
            }
        }
    }

    /// Waits until no request is being handled.
    async fn drain(&self) {
        // SYNC: SeqCst pairs with `handled` (see there).
        self.ctx.draining.store(true, Ordering::SeqCst);
        loop {
            let notified = self.ctx.drained.notified();
            if self.ctx.idle() {
                return;
            }
            // Tasks finishing notify; handlers running inline on link
            // threads do not (that would cost every request), so look again
            // shortly.
            let _ = tokio::time::timeout(Duration::from_millis(1), notified).await;
        }
    }
}

/// A running service. Dropping it deregisters the instance (new calls go
/// elsewhere) and lets in-flight calls finish; [`shutdown`](ServiceHandle::shutdown)
/// also waits for them.
#[derive(Clone)]
pub struct ServiceHandle {
    served: Arc<Served>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("service", &self.served.service)
            .field("instance", &self.served.id)
            .finish()
    }
}

impl ServiceHandle {
    /// The instance id announced for this service.
    pub fn instance_id(&self) -> InstanceId {
        self.served.id
    }

    /// The service name.
    pub fn service(&self) -> &ServiceName {
        &self.served.service
    }

    /// The socket path announcing this instance.
    pub fn socket_path(&self) -> &Path {
        &self.served.path
    }

    /// Deregisters, then waits for in-flight requests to finish.
    pub async fn shutdown(self) {
        self.served.deregister();
        self.served.drain().await;
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        // The last clone of the handle deregisters (the mesh keeps its own
        // reference for `close`).
        if Arc::strong_count(&self.served) <= 2 {
            self.served.deregister();
        }
    }
}

/// Starts a thread accepting links on `listener` until `stop` is set; each
/// link is handed to `on_link` on a thread of its own, the handshake
/// included, so a silent client cannot hold up others.
pub(crate) fn start_accepting(
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: impl Fn(ShmLink) + Send + Sync + 'static,
) -> Result<(), Status> {
    let on_link = Arc::new(on_link);
    std::thread::Builder::new()
        .name(format!("commy-accept-{name}"))
        .spawn(move || {
            // The tick only bounds how long a stopped listener keeps its
            // thread; its socket is unlinked at once on deregistration.
            let tick = Duration::from_millis(100);
            while !stop.load(Ordering::Acquire) {
                match listener.accept_timeout(tick) {
                    Ok(Some((sock, _peer))) => {
                        let (on_link, link, name2) = (on_link.clone(), link.clone(), name.clone());
                        let spawned = std::thread::Builder::new()
                            .name(format!("commy-link-{name}"))
                            .spawn(move || match ShmLink::accept_stream(sock, &link) {
                                Ok(l) => on_link(l),
                                Err(e) => tracing::warn!("{name2}: refused a connection: {e}"),
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a link thread: {e}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{name}: accept failed: {e}"),
                }
            }
            drop(listener);
        })
        .map(|_| ())
        .map_err(|e| Status::internal(format!("cannot start the accept thread: {e}")))
}
