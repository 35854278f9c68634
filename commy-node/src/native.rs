//! `NativeMesh` and `NativeRegion`: the native layer under the Promise API
//! of `index.js`.
//!
//! Every method returns at once. An operation that waits (a call, opening a
//! service, a publish) takes an id chosen by the JS layer and finishes later
//! with an event carrying that id (see [`crate::bridge`]); the JS layer keeps
//! one pending promise per id. Nothing here ever blocks the JS thread on the
//! mesh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use commy_mesh::{CallOptions, Code, Mesh, Response, ServiceHandle, Status};
use napi::bindgen_prelude::{Array, BufferSlice, Function};
use napi::{Env, Result};
use napi_derive::napi;
use tokio::sync::{Semaphore, oneshot};

use crate::bridge::{Bridge, Event, lock};
use crate::slab::Slab;

/// How a handler's answer gets back to the mesh.
pub(crate) type PendingReply = oneshot::Sender<std::result::Result<Response, Status>>;

/// Event kinds as the JS layer reads them from [`NativeMesh::drain`].
const DONE: u32 = 0;
const ANSWER: u32 = 1;
const FAILED: u32 = 2;
const REQUEST: u32 = 3;
const MESSAGE: u32 = 4;
const ENDED: u32 = 5;

/// Messages a subscription may have on their way to JS before the JS side
/// asks for more (see [`NativeMesh::sub_credit`]).
const SUB_WINDOW: usize = 256;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("commy-node")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

fn failed(id: u32, s: &Status) -> Event {
    Event::Failed {
        id,
        code: s.code().as_str(),
        message: s.message().to_owned(),
    }
}

fn invalid(message: impl Into<String>) -> napi::Error {
    napi::Error::new(napi::Status::InvalidArg, message.into())
}

/// Options of `NativeMesh.open`.
#[napi(object)]
#[derive(Default)]
pub struct OpenOptions {
    /// The mesh to join (`default` unless set).
    pub mesh: Option<String>,
    /// Where the mesh's sockets live (the default runtime dir unless set).
    pub runtime_dir: Option<String>,
    /// Timeout of calls that set none, in milliseconds (30 000 unless set;
    /// 0 waits forever).
    pub default_timeout_ms: Option<f64>,
    /// Requests one service instance handles at once (1024 unless set).
    pub max_concurrency: Option<u32>,
}

struct Sub {
    credit: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

/// One mesh handle, as the JS layer drives it.
#[napi]
pub struct NativeMesh {
    mesh: Arc<Mutex<Option<Mesh>>>,
    bridge: Arc<Bridge>,
    /// Requests handed to JS and not answered yet (JS thread only).
    replies: Mutex<Slab<PendingReply>>,
    /// Served services by the JS layer's numbers.
    services: Arc<Mutex<HashMap<u32, ServiceHandle>>>,
    /// Subscriptions by the JS layer's numbers.
    subs: Arc<Mutex<HashMap<u32, Sub>>>,
    /// Drained events waiting to be converted (reused between drains).
    scratch: Mutex<Vec<Event>>,
}

#[napi]
impl NativeMesh {
    /// Opens a mesh handle; `on_wake` is called (on the JS thread, with no
    /// arguments) whenever events are waiting in [`NativeMesh::drain`].
    /// Operation `id` finishes when the mesh is open.
    #[napi(factory)]
    pub fn open(id: u32, options: Option<OpenOptions>, on_wake: Function<(), ()>) -> Result<Self> {
        let wake = on_wake
            .build_threadsafe_function::<()>()
            .weak::<true>()
            .callee_handled::<false>()
            .build()?;
        let bridge = Arc::new(Bridge::new(wake));
        let o = options.unwrap_or_default();
        let mut builder = Mesh::builder();
        if let Some(m) = &o.mesh {
            builder = builder.mesh(m);
        }
        if let Some(d) = &o.runtime_dir {
            builder = builder.runtime_dir(d);
        }
        if let Some(t) = o.default_timeout_ms {
            builder = builder.default_timeout(timeout(t, "defaultTimeoutMs")?);
        }
        if let Some(n) = o.max_concurrency {
            builder = builder.max_concurrency(n as usize);
        }
        let slot = Arc::new(Mutex::new(None));
        let (b, s) = (bridge.clone(), slot.clone());
        runtime().spawn(async move {
            match builder.open().await {
                Ok(m) => {
                    *lock(&s) = Some(m);
                    b.push(Event::Done { id, value: None });
                }
                Err(e) => b.push(failed(id, &Status::unavailable(e.to_string()))),
            }
        });
        Ok(NativeMesh {
            mesh: slot,
            bridge,
            replies: Mutex::default(),
            services: Arc::default(),
            subs: Arc::default(),
            scratch: Mutex::default(),
        })
    }

    fn mesh(&self) -> std::result::Result<Mesh, Status> {
        lock(&self.mesh)
            .clone()
            .ok_or_else(|| Status::failed_precondition("the mesh handle is closed"))
    }

    /// Runs `fut` on the mesh's runtime and reports its result as operation `id`.
    fn spawn<F>(&self, id: u32, fut: impl FnOnce(Mesh) -> F)
    where
        F: std::future::Future<Output = std::result::Result<Event, Status>> + Send + 'static,
    {
        let bridge = self.bridge.clone();
        match self.mesh() {
            Ok(m) => {
                let fut = fut(m);
                runtime().spawn(async move {
                    bridge.push(match fut.await {
                        Ok(ev) => ev,
                        Err(s) => failed(id, &s),
                    });
                });
            }
            Err(s) => bridge.push(failed(id, &s)),
        }
    }

    /// Calls service `name` with `payload`; operation `id` answers with the
    /// reply. `timeout_ms` overrides the mesh's default timeout.
    #[napi]
    pub fn call(
        &self,
        id: u32,
        name: String,
        payload: BufferSlice,
        timeout_ms: Option<f64>,
    ) -> Result<()> {
        let mut options = CallOptions::default();
        if let Some(t) = timeout_ms
            .map(|t| timeout(t, "timeoutMs"))
            .transpose()?
            .flatten()
        {
            options = options.timeout(t);
        }
        let payload = Bytes::copy_from_slice(&payload);
        self.spawn(id, move |m| async move {
            let r = m.call_with(&name, payload, options).await?;
            Ok(Event::Answer {
                id,
                payload: r.into_payload(),
            })
        });
        Ok(())
    }

    /// Sends a one-way message to one instance of `name`.
    #[napi]
    pub fn send(&self, id: u32, name: String, payload: BufferSlice) {
        let payload = Bytes::copy_from_slice(&payload);
        self.spawn(id, move |m| async move {
            m.send(&name, payload).await?;
            Ok(Event::Done { id, value: None })
        });
    }

    /// Publishes `payload` on `topic`; operation `id` finishes with the
    /// number of deliveries.
    #[napi]
    pub fn publish(&self, id: u32, topic: String, payload: BufferSlice) {
        let payload = Bytes::copy_from_slice(&payload);
        self.spawn(id, move |m| async move {
            let n = m.publish(&topic, payload).await?;
            Ok(Event::Done {
                id,
                value: Some(u32::try_from(n).unwrap_or(u32::MAX)),
            })
        });
    }

    /// Serves `name` as service number `service` (chosen by the JS layer;
    /// its requests carry it). Operation `id` finishes once it is announced.
    #[napi]
    pub fn serve(&self, id: u32, service: u32, name: String) {
        let bridge = self.bridge.clone();
        let services = self.services.clone();
        self.spawn(id, move |m| async move {
            let handle = m
                .serve(&name, move |req| {
                    let (tx, rx) = oneshot::channel();
                    bridge.push(Event::Request {
                        service,
                        reply: tx,
                        payload: req.into_payload(),
                    });
                    async move {
                        rx.await
                            .unwrap_or_else(|_| Err(Status::unavailable("the service was closed")))
                    }
                })
                .await?;
            lock(&services).insert(service, handle);
            Ok(Event::Done { id, value: None })
        });
    }

    /// Stops serving service `service`; operation `id` finishes when its
    /// in-flight requests are answered.
    #[napi]
    pub fn unserve(&self, id: u32, service: u32) {
        let handle = lock(&self.services).remove(&service);
        let bridge = self.bridge.clone();
        runtime().spawn(async move {
            if let Some(h) = handle {
                h.shutdown().await;
            }
            bridge.push(Event::Done { id, value: None });
        });
    }

    /// Answers request `token` with `payload`.
    #[napi]
    pub fn reply(&self, token: u32, payload: BufferSlice) {
        if let Some(tx) = lock(&self.replies).remove(token) {
            let _ = tx.send(Ok(Response::new(Bytes::copy_from_slice(&payload))));
        }
    }

    /// Answers request `token` with an error status (`code` is a status
    /// name such as `"INTERNAL"`; unknown names become `INTERNAL`).
    #[napi]
    pub fn reply_error(&self, token: u32, code: String, message: String) {
        if let Some(tx) = lock(&self.replies).remove(token) {
            let code = code.parse().unwrap_or(commy_mesh::Code::Internal);
            let _ = tx.send(Err(Status::new(code, message)));
        }
    }

    /// Subscribes to `topic` (as a member of queue group `group` if given)
    /// as subscription number `sub` (chosen by the JS layer; its messages
    /// carry it). Operation `id` finishes once it is announced.
    #[napi]
    pub fn subscribe(&self, id: u32, sub: u32, topic: String, group: Option<String>) {
        let bridge = self.bridge.clone();
        let subs = self.subs.clone();
        self.spawn(id, move |m| async move {
            let mut subscription = match &group {
                Some(g) => m.subscribe_group(&topic, g).await?,
                None => m.subscribe(&topic).await?,
            };
            let credit = Arc::new(Semaphore::new(SUB_WINDOW));
            let c = credit.clone();
            let b = bridge.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok(permit) = c.acquire().await else {
                        return;
                    };
                    permit.forget();
                    match subscription.next().await {
                        Some(msg) => b.push(Event::Message {
                            sub,
                            payload: msg.into_payload(),
                        }),
                        None => break,
                    }
                }
                b.push(Event::Ended { sub });
            });
            lock(&subs).insert(sub, Sub { credit, task });
            Ok(Event::Done { id, value: None })
        });
    }

    /// Lets subscription `sub` deliver `n` more messages.
    #[napi]
    pub fn sub_credit(&self, sub: u32, n: u32) {
        if let Some(s) = lock(&self.subs).get(&sub) {
            s.credit.add_permits(n as usize);
        }
    }

    /// Ends subscription `sub`: it delivers nothing more and an `Ended`
    /// event follows.
    #[napi]
    pub fn unsubscribe(&self, sub: u32) {
        if let Some(s) = lock(&self.subs).remove(&sub) {
            s.task.abort();
            s.credit.close();
        }
    }

    /// Opens the shared region `name` of this mesh: `mode` is `"open"`,
    /// `"create"` or `"openOrCreate"`; `size` is required to create.
    #[napi]
    pub fn region(&self, name: String, size: Option<f64>, mode: String) -> Result<NativeRegion> {
        let mesh = self.mesh().map_err(|s| status_error(&s))?;
        let mut options = mesh.region(&name);
        if let Some(size) = size {
            if !(size.is_finite() && size >= 1.0 && size.fract() == 0.0) {
                return Err(invalid(format!(
                    "region size must be a positive integer, got {size}"
                )));
            }
            // A size too large for usize is refused by the region's own check.
            options = options.size(size.min(usize::MAX as f64) as usize);
        }
        let opened = match mode.as_str() {
            "open" => options.open(),
            "create" => options.create(),
            "openOrCreate" => options.open_or_create(),
            other => {
                return Err(invalid(format!(
                    "region mode must be open, create or openOrCreate, got {other:?}"
                )));
            }
        };
        let region = opened.map_err(|e| {
            use commy_shm::RegionOpenError as E;
            let code = match &e {
                E::NotFound { .. } => Code::NotFound,
                E::AlreadyExists { .. } => Code::AlreadyExists,
                E::PermissionDenied { .. } | E::ForeignOwner { .. } => Code::PermissionDenied,
                E::InvalidName(_) | E::SizeRequired { .. } | E::InvalidSize { .. } => {
                    Code::InvalidArgument
                }
                _ => Code::FailedPrecondition,
            };
            status_error(&Status::new(code, e.to_string()))
        })?;
        Ok(NativeRegion {
            region: Mutex::new(Some(region)),
            name,
        })
    }

    /// Closes the handle: stops serving (waiting for in-flight requests),
    /// ends subscriptions, drops links. Operation `id` finishes when done;
    /// no event follows it.
    #[napi]
    pub fn close(&self, id: u32) {
        let mesh = lock(&self.mesh).take();
        let services: Vec<_> = lock(&self.services).drain().map(|(_, h)| h).collect();
        for (_, s) in lock(&self.subs).drain() {
            s.task.abort();
        }
        // Requests JS has not answered get UNAVAILABLE when their sender drops.
        let replies = lock(&self.replies).drain();
        let bridge = self.bridge.clone();
        runtime().spawn(async move {
            drop(replies);
            for s in services {
                s.shutdown().await;
            }
            if let Some(m) = mesh {
                m.close().await;
            }
            bridge.push(Event::Done { id, value: None });
            bridge.shut();
        });
    }

    /// Every event waiting for JS, flattened four slots per event:
    /// `[kind, id, a, b, ...]` (see `index.js` for the kinds).
    #[napi]
    pub fn drain<'e>(&self, env: &'e Env) -> Result<Array<'e>> {
        let mut events = std::mem::take(&mut *lock(&self.scratch));
        self.bridge.take(&mut events);
        let mut out = env.create_array(u32::try_from(events.len() * 4).unwrap_or(u32::MAX))?;
        let mut replies = lock(&self.replies);
        for (i, ev) in events.drain(..).enumerate() {
            let at = u32::try_from(i * 4).unwrap_or(u32::MAX);
            match ev {
                Event::Done { id, value } => {
                    out.set(at, DONE)?;
                    out.set(at + 1, id)?;
                    if let Some(v) = value {
                        out.set(at + 2, v)?;
                    }
                }
                Event::Answer { id, payload } => {
                    out.set(at, ANSWER)?;
                    out.set(at + 1, id)?;
                    out.set(at + 2, &BufferSlice::copy_from(env, &payload)?)?;
                }
                Event::Failed { id, code, message } => {
                    out.set(at, FAILED)?;
                    out.set(at + 1, id)?;
                    out.set(at + 2, code)?;
                    out.set(at + 3, message)?;
                }
                Event::Request {
                    service,
                    reply,
                    payload,
                } => {
                    out.set(at, REQUEST)?;
                    out.set(at + 1, replies.insert(reply))?;
                    out.set(at + 2, &BufferSlice::copy_from(env, &payload)?)?;
                    out.set(at + 3, service)?;
                }
                Event::Message { sub, payload } => {
                    out.set(at, MESSAGE)?;
                    out.set(at + 1, sub)?;
                    out.set(at + 2, &BufferSlice::copy_from(env, &payload)?)?;
                }
                Event::Ended { sub } => {
                    out.set(at, ENDED)?;
                    out.set(at + 1, sub)?;
                }
            }
        }
        drop(replies);
        *lock(&self.scratch) = events;
        Ok(out)
    }
}

/// A shared region opened through [`NativeMesh::region`].
#[napi]
pub struct NativeRegion {
    region: Mutex<Option<commy_shm::Region>>,
    name: String,
}

#[napi]
impl NativeRegion {
    /// The region's name.
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The size of the data area in bytes (0 once closed).
    #[napi(getter)]
    pub fn size(&self) -> f64 {
        lock(&self.region).as_ref().map_or(0.0, |r| r.len() as f64)
    }

    /// A consistent copy of `len` bytes at `offset`.
    #[napi]
    pub fn read<'e>(&self, env: &'e Env, offset: f64, len: f64) -> Result<BufferSlice<'e>> {
        let guard = lock(&self.region);
        let region = guard.as_ref().ok_or_else(closed_region)?;
        let (offset, len) = (index(offset, "offset")?, index(len, "length")?);
        let mut buf = vec![0; len];
        region
            .read_at(offset, &mut buf)
            .map_err(|e| access_error(&e))?;
        BufferSlice::from_data(env, buf)
    }

    /// Writes `data` at `offset` (readers never see half of it).
    #[napi]
    pub fn write(&self, data: BufferSlice, offset: f64) -> Result<()> {
        let guard = lock(&self.region);
        let region = guard.as_ref().ok_or_else(closed_region)?;
        region
            .write_at(index(offset, "offset")?, &data)
            .map_err(|e| access_error(&e))
    }

    /// Lets go of the region.
    #[napi]
    pub fn close(&self) {
        lock(&self.region).take();
    }
}

fn closed_region() -> napi::Error {
    status_error(&Status::failed_precondition("the region is closed"))
}

fn access_error(e: &commy_shm::RegionAccessError) -> napi::Error {
    let code = match e {
        commy_shm::RegionAccessError::OutOfBounds { .. } => Code::InvalidArgument,
        _ => Code::DeadlineExceeded,
    };
    status_error(&Status::new(code, e.to_string()))
}

/// A JS number used as a byte offset or length.
fn index(n: f64, what: &str) -> Result<usize> {
    if n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= (1u64 << 53) as f64 {
        Ok(n as usize)
    } else {
        Err(invalid(format!("{what} must be an integer >= 0, got {n}")))
    }
}

/// A synchronous error as JS sees it: the reason starts with the status
/// name (`"NOT_FOUND: ..."`), which `index.js` turns into a `CommyError`.
fn status_error(s: &Status) -> napi::Error {
    napi::Error::new(
        napi::Status::GenericFailure,
        format!("{}: {}", s.code().as_str(), s.message()),
    )
}

/// A JS millisecond count as a timeout: 0 means none (wait forever).
fn timeout(ms: f64, what: &str) -> Result<Option<Duration>> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(invalid(format!(
            "{what} must be a finite number of milliseconds >= 0, got {ms}"
        )));
    }
    Ok((ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0)))
}
