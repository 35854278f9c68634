//! `NativeMesh` and `NativeRegion`: the native layer under the Promise API
//! of `index.js`.
//!
//! Every method returns at once. An operation that waits (a call, opening a
//! service, a publish) takes an id chosen by the JS layer and finishes later
//! with an event carrying that id (see [`crate::bridge`]); the JS layer keeps
//! one pending promise per id. Nothing here ever blocks the JS thread on the
//! mesh.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_ffi::{
    AnswerDriver, FfiCallOptions, FfiCaller, FfiError, FfiMesh, FfiPublisher, FfiRegion,
    FfiService, FfiSubscription, KEYS, KeyKind, Layer, MeshOptions, OpenPolicy, PolledRequest,
    RegionOptions, Reply, SettingValue, SubscribeParams, key_kind, run_inline, runtime, spawn_with,
};
use napi::bindgen_prelude::{BufferSlice, Function};
use napi::{Env, Result};
use napi_derive::napi;
use tokio::sync::Semaphore;

use crate::bridge::{Bridge, Event};
use crate::driven::{self, Driven, POLL_MAX, Polled};
use crate::slab::Slab;

/// How a handler's answer gets back to the mesh.
pub(crate) enum PendingReply {
    /// A request that came through the service's handler.
    Reply(Reply),
    /// A request the JS thread took out of a link itself.
    Polled(PolledRequest),
}

impl PendingReply {
    fn fail(self, error: FfiError) {
        match self {
            PendingReply::Reply(r) => {
                r.error(error);
            }
            PendingReply::Polled(p) => p.answer(Err(error.into())),
        }
    }
}

/// Slots per event in [`NativeMesh::drain`]'s array.
const STRIDE: usize = 6;

/// Event kinds as the JS layer reads them from [`NativeMesh::drain`].
const DONE: u32 = 0;
const ANSWER: u32 = 1;
const FAILED: u32 = 2;
const REQUEST: u32 = 3;
const MESSAGE: u32 = 4;
const ENDED: u32 = 5;
const CANCELLED: u32 = 6;
const CALLER: u32 = 7;
const CALLER_USE: u32 = 8;

/// Caller kinds in a `CALLER` event.
const CALLER_UNKNOWN: u32 = 0;
const CALLER_LOCAL: u32 = 1;
const CALLER_REMOTE: u32 = 2;

/// Callers the JS layer keeps by number (see [`Callers`]).
const CALLERS_MAX: usize = 64;

/// Messages a subscription may have on their way to JS before the JS side
/// asks for more (see [`NativeMesh::sub_credit`]).
const SUB_WINDOW: usize = 256;

fn failed(id: u32, e: &FfiError) -> Event {
    Event::Failed {
        id,
        code: e.code_name(),
        message: e.message().to_owned(),
    }
}

/// A synchronous error as JS sees it: the reason starts with the status
/// name (`"NOT_FOUND: ..."`), which `index.js` turns into a `CommyError`.
fn ffi_error(e: &FfiError) -> napi::Error {
    napi::Error::new(napi::Status::GenericFailure, e.to_string())
}

fn invalid(message: impl Into<String>) -> napi::Error {
    napi::Error::new(napi::Status::InvalidArg, message.into())
}

/// One instance of a service as a handle's pool sees it (see
/// `Mesh.endpoints` in api.d.ts).
#[napi(object, js_name = "NativeEndpoint")]
pub struct EndpointView {
    /// The instance's id.
    pub instance: String,
    /// Where it is reached: a socket path on this host, or `tls://...`.
    pub endpoint: String,
    /// Whether this handle has a live link to it.
    pub linked: bool,
    /// `in`, `ejected` or `half-open`.
    pub state: String,
    /// While in: its failures in a row.
    pub failures_in_a_row: u32,
    /// While ejected: for how many milliseconds still.
    pub ejected_for_ms: Option<f64>,
    /// Times it was ejected.
    pub ejections: u32,
    /// Calls in flight to it.
    pub in_flight: f64,
    /// Its failed calls that count against it.
    pub failed_calls: f64,
    /// Over TLS: the peak-EWMA estimate of its round trip, in milliseconds.
    pub round_trip_ms: Option<f64>,
}

/// One option of `NativeMesh.open`: a setting by its JS name (the key
/// in camelCase, a duration's with `Ms` and a number of milliseconds) and
/// its value, by JS type.
#[napi(object, js_name = "NativeSetting")]
pub struct Setting {
    /// The option's name (`runtimeDir`, `defaultTimeoutMs`).
    pub name: String,
    /// A string value.
    pub text: Option<String>,
    /// A number value.
    pub number: Option<f64>,
    /// A boolean value.
    pub flag: Option<bool>,
    /// An array of strings.
    pub list: Option<Vec<String>>,
}

/// The key in camelCase (`max_concurrency` -> `maxConcurrency`).
fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.push(c.to_ascii_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// The JS option name of each setting: the key in camelCase, with `Ms` for
/// a duration (given in milliseconds).
#[napi]
pub(crate) fn mesh_option_names() -> Vec<String> {
    KEYS.iter().map(|k| option_name(k)).collect()
}

fn option_name(key: &str) -> String {
    match key_kind(key) {
        Some(KeyKind::Duration) => format!("{}Ms", camel(key)),
        _ => camel(key),
    }
}

/// The settings key of the JS option `name`, if it names one.
fn setting_key(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .copied()
        .find(|k| option_name(k) == name || *k == name)
}

/// The options a JS program passed, as the layer `Node options`.
fn settings_layer(settings: Vec<Setting>) -> Result<Layer> {
    let mut layer = Layer::new("Node options");
    for s in settings {
        let key = setting_key(&s.name).ok_or_else(|| {
            invalid(format!(
                "unknown option '{}' in Mesh.open options; known: {}",
                s.name,
                mesh_option_names().join(", ")
            ))
        })?;
        let value = match (s.text, s.number, s.flag, s.list) {
            (_, Some(n), _, _) if key_kind(key) == Some(KeyKind::Duration) => {
                if !(n.is_finite() && n >= 0.0) {
                    return Err(invalid(format!(
                        "options.{} must be a finite number of milliseconds >= 0, not {n}",
                        s.name
                    )));
                }
                SettingValue::Text(format!("{n}ms"))
            }
            (_, Some(n), _, _) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                SettingValue::Int(n as i64)
            }
            (_, Some(n), _, _) => SettingValue::Float(n),
            (Some(t), ..) => SettingValue::Text(t),
            (_, _, Some(b), _) => SettingValue::Bool(b),
            (_, _, _, Some(l)) => SettingValue::List(l),
            _ => continue,
        };
        layer.set(key, value);
    }
    Ok(layer)
}

struct Sub {
    subscription: FfiSubscription,
    credit: Arc<Semaphore>,
}

/// The callers the JS layer knows, by number, and the one its next
/// request comes from (the current one): a drain tells JS who sent a
/// request only when that is another caller than the previous request's
/// (a `CALLER` event, defining a number, or `CALLER_USE`, naming a
/// number JS knows), so a run of requests of one link costs nothing more
/// than a comparison each, and JS keeps one context object per caller.
/// Numbers are reused, oldest first, past [`CALLERS_MAX`]: JS reads the
/// events in order, so a number always means what it was last defined as.
#[derive(Default)]
struct Callers {
    known: Vec<FfiCaller>,
    /// The current caller's number.
    current: Option<usize>,
    /// The number defined anew next once every one is taken.
    next_reused: usize,
}

impl Callers {
    fn is_current(&self, caller: &FfiCaller) -> bool {
        self.current.is_some_and(|i| self.known[i] == *caller)
    }

    /// Makes `caller` the current caller: the event that tells JS so (its
    /// bytes, for a remote caller, appended to `data`), unless it is
    /// already.
    fn make_current(&mut self, caller: &FfiCaller, data: &mut Vec<u8>) -> Option<[u32; STRIDE]> {
        if self.is_current(caller) {
            return None;
        }
        if let Some(i) = self.known.iter().position(|k| k == caller) {
            self.current = Some(i);
            return Some([CALLER_USE, i as u32, 0, 0, 0, 0]);
        }
        let i = if self.known.len() < CALLERS_MAX {
            self.known.push(caller.clone());
            self.known.len() - 1
        } else {
            let i = self.next_reused;
            self.next_reused = (i + 1) % CALLERS_MAX;
            self.known[i] = caller.clone();
            i
        };
        self.current = Some(i);
        Some(caller_event(i as u32, caller, data))
    }
}

/// The `CALLER` event defining caller number `n`: `[CALLER, n, uid, gid,
/// pid, LOCAL]` for a local caller; `[CALLER, n, offset, length, id,
/// REMOTE]` for a remote one, whose bytes in `data` are its identity
/// (`id - 1` bytes, none if `id` is 0: no identity) and then its address.
fn caller_event(n: u32, caller: &FfiCaller, data: &mut Vec<u8>) -> [u32; STRIDE] {
    match caller.kind() {
        "local" => [
            CALLER,
            n,
            caller.uid().unwrap_or(0),
            caller.gid().unwrap_or(0),
            caller.pid().unwrap_or(0),
            CALLER_LOCAL,
        ],
        "remote" => {
            let identity = caller.identity();
            let id = identity.as_ref().map_or(0, |i| i.len() + 1);
            let addr = caller.addr().map(|a| a.to_string()).unwrap_or_default();
            let text = identity.unwrap_or_default() + &addr;
            let (at, len) = append(data, text.as_bytes());
            [
                CALLER,
                n,
                at,
                len,
                u32::try_from(id).unwrap_or(0),
                CALLER_REMOTE,
            ]
        }
        _ => [CALLER, n, 0, 0, 0, CALLER_UNKNOWN],
    }
}

/// One mesh handle, as the JS layer drives it.
#[napi]
pub struct NativeMesh {
    mesh: Mutex<Option<FfiMesh>>,
    bridge: Arc<Bridge>,
    /// Requests handed to JS and not answered yet (JS thread only).
    replies: Mutex<Slab<PendingReply>>,
    /// Served services by the JS layer's numbers.
    services: Mutex<HashMap<u32, FfiService>>,
    /// Subscriptions by the JS layer's numbers.
    subs: Mutex<HashMap<u32, Sub>>,
    /// Drained events waiting to be converted (reused between drains).
    scratch: Mutex<Vec<Event>>,
    /// Service names by number (see [`NativeMesh::name`]).
    names: Mutex<Vec<String>>,
    /// The served links the JS thread owns (see [`crate::driven`]).
    polled: Mutex<Polled>,
    /// Every served link's state, for closing.
    driven: Arc<Mutex<Vec<Weak<Driven>>>>,
    /// The callers JS knows (JS thread only, see [`Callers`]).
    callers: Mutex<Callers>,
    /// Receives the answers to this handle's calls on the JS thread, at
    /// every drain (`None` once closed).
    answers: Mutex<Option<AnswerDriver>>,
}

#[napi]
impl NativeMesh {
    /// Opens a mesh handle; `on_wake` is called (on the JS thread, with no
    /// arguments) whenever events are waiting in [`NativeMesh::drain`].
    #[napi(factory)]
    pub fn open(settings: Vec<Setting>, on_wake: Function<(), ()>) -> Result<Self> {
        let mut options = MeshOptions::default();
        options.settings = settings_layer(settings)?;
        if options.settings.get("call_spin").is_none() {
            // Calls from JS run many at once on the shared runtime: a
            // caller polling for its answer would hold a worker other
            // calls need.
            options.settings.set("call_spin", "0s");
        }
        options.link_wait = Some(link_wait());
        let wake = on_wake
            .build_threadsafe_function::<()>()
            .weak::<true>()
            .callee_handled::<false>()
            .build()?;
        let mesh = FfiMesh::open(options).map_err(|e| ffi_error(&e))?;
        let bridge = Arc::new(Bridge::new(wake));
        // The answers that `drain` does not take in itself (those read by
        // the links' readers, failures, timeouts) come through the bridge.
        let b = bridge.clone();
        let mut answers = mesh
            .drive_answers_with(move |id, r| {
                let id = id as u32;
                b.push(match r {
                    Ok(payload) => Event::Answer { id, payload },
                    Err(e) => failed(id, &e),
                });
            })
            .map_err(|e| ffi_error(&e))?;
        let hold = poll_hold();
        answers.set_hold(hold);
        Ok(NativeMesh {
            mesh: Mutex::new(Some(mesh)),
            bridge,
            replies: Mutex::default(),
            services: Mutex::default(),
            subs: Mutex::default(),
            scratch: Mutex::default(),
            names: Mutex::default(),
            polled: Mutex::new(Polled::new(hold)),
            driven: Arc::default(),
            callers: Mutex::default(),
            answers: Mutex::new(Some(answers)),
        })
    }

    /// The value of the setting `name` (its key, or its JS option name)
    /// and where it came from, as `[value, source]`; null for an unknown
    /// one.
    #[napi]
    pub fn explain(&self, name: String) -> Result<Option<Vec<String>>> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        Ok(setting_key(&name)
            .and_then(|k| mesh.explain(k))
            .map(|(value, source)| vec![value, source]))
    }

    fn mesh(&self) -> std::result::Result<FfiMesh, FfiError> {
        self.mesh.lock().clone().ok_or_else(|| {
            FfiError::from_code_name("FAILED_PRECONDITION", "the mesh handle is closed")
        })
    }

    /// Runs the future made by `op` and reports its result (as `to_event`
    /// makes it) for operation `id`: it starts on this (the JS) thread,
    /// which writes the message at once, and finishes on the thread that
    /// completes it, so no runtime worker has to wake up at either end.
    fn start<F, T>(
        &self,
        id: u32,
        op: impl FnOnce(FfiMesh) -> F,
        to_event: impl FnOnce(T) -> Event + Send + 'static,
    ) where
        F: std::future::Future<Output = std::result::Result<T, FfiError>> + Send + 'static,
        T: Send + 'static,
    {
        match self.mesh() {
            Ok(m) => finish_on(self.bridge.clone(), id, op(m), to_event),
            Err(e) => self.bridge.push(failed(id, &e)),
        }
    }

    /// Calls service `name` with `payload`; operation `id` answers with the
    /// reply. `timeout_ms` overrides the mesh's default timeout (0: none).
    ///
    /// The request is written from this (the JS) thread, with no runtime
    /// task in between (see `FfiMesh::call_token`). The answer is taken in
    /// by this thread at its next drain while calls are in flight here,
    /// straight from the link into the drained buffer; otherwise the
    /// link's reader queues it for JS. Returns
    /// whether this thread now receives answers itself (drain again soon).
    /// [`call_many`](NativeMesh::call_many) starts many calls in one
    /// crossing.
    #[napi]
    pub fn call(
        &self,
        id: u32,
        service: u32,
        payload: BufferSlice,
        timeout_ms: Option<f64>,
    ) -> Result<bool> {
        let names = self.names.lock();
        let name = names
            .get(service as usize)
            .ok_or_else(|| invalid(format!("no service name number {service}")))?;
        let timeout = match timeout_ms {
            Some(t) => Some(timeout_or_none(t, "timeoutMs")?),
            None => None,
        };
        let mesh = self.mesh();
        self.start_call(&mesh, id, name, &payload, timeout);
        Ok(self.answers_polled_here())
    }

    /// Starts `n` calls at once, in order: `table` is a byte view of a
    /// float64 array of `[id, service, length, timeout_ms]` quadruples
    /// (`timeout_ms` below 0: the mesh's default; 0: none) and `data` the
    /// calls' payloads, one after another. A malformed table (too short,
    /// ids or lengths that are no integers, lengths beyond `data`) is
    /// refused whole, before any call starts; a call whose entry is wrong
    /// otherwise (an unknown service number, a timeout out of range) fails
    /// on its own, with `INVALID_ARGUMENT`. Returns what
    /// [`call`](NativeMesh::call) returns.
    #[napi]
    pub fn call_many(&self, table: BufferSlice, n: u32, data: BufferSlice) -> Result<bool> {
        let slot = |i: usize| -> Option<f64> {
            let b = table.get(i * 8..i * 8 + 8)?;
            Some(f64::from_ne_bytes(b.try_into().ok()?))
        };
        // Entry `i`: its id, service number, payload and timeout.
        let entry = |i: usize, at: usize| -> Result<(u32, f64, std::ops::Range<usize>, f64)> {
            let (Some(id), Some(service), Some(len), Some(timeout_ms)) = (
                slot(4 * i),
                slot(4 * i + 1),
                slot(4 * i + 2),
                slot(4 * i + 3),
            ) else {
                return Err(invalid(format!(
                    "the call table holds fewer than {n} calls"
                )));
            };
            let id = whole(id, "a call id")?;
            let end = at
                .checked_add(index(len, "a payload length")?)
                .filter(|end| *end <= data.len())
                .ok_or_else(|| invalid("the calls' lengths exceed their data"))?;
            Ok((id, service, at..end, timeout_ms))
        };
        let mut at = 0usize;
        for i in 0..n as usize {
            at = entry(i, at)?.2.end;
        }
        let names = self.names.lock();
        let mesh = self.mesh();
        // One clock read for the batch: its calls' timeouts count from it.
        let now = Instant::now();
        // Consecutive calls of one service with one timeout start together.
        let mut group: Vec<(&[u8], u64)> = Vec::new();
        let mut key: Option<(&str, Option<Duration>)> = None;
        let mut at = 0usize;
        for i in 0..n as usize {
            let (id, service, payload, timeout_ms) = entry(i, at)?;
            at = payload.end;
            let name = whole(service, "a service number")
                .ok()
                .and_then(|s| names.get(s as usize))
                .ok_or_else(|| format!("no service name number {service}"));
            let timeout = if timeout_ms < 0.0 {
                Ok(None)
            } else {
                timeout_or_none(timeout_ms, "timeoutMs")
                    .map(Some)
                    .map_err(|e| e.reason.clone())
            };
            match (name, timeout) {
                (Ok(name), Ok(timeout)) => {
                    let this = Some((name.as_str(), timeout));
                    if key != this {
                        if let Some((name, timeout)) = key {
                            self.start_calls(&mesh, name, timeout, now, &group);
                        }
                        group.clear();
                        key = this;
                    }
                    group.push((&data[payload], u64::from(id)));
                }
                (Err(why), _) | (_, Err(why)) => self.bridge.push(failed(
                    id,
                    &FfiError::from_code_name("INVALID_ARGUMENT", why),
                )),
            }
        }
        if let Some((name, timeout)) = key {
            self.start_calls(&mesh, name, timeout, now, &group);
        }
        Ok(self.answers_polled_here())
    }

    /// Starts `calls` (payloads and call ids) of `name` at once on `mesh`,
    /// their timeouts counted from `now`, or fails them if the handle is
    /// closed.
    fn start_calls(
        &self,
        mesh: &std::result::Result<FfiMesh, FfiError>,
        name: &str,
        timeout: Option<Duration>,
        now: Instant,
        calls: &[(&[u8], u64)],
    ) {
        let started = mesh
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|m| m.call_tokens(name, timeout, Some(now), calls.iter().copied()));
        if let Err(e) = started {
            for &(_, id) in calls {
                self.bridge
                    .push(failed(u32::try_from(id).unwrap_or(u32::MAX), &e));
            }
        }
    }

    /// Starts one call (see [`call`](NativeMesh::call)) on `mesh`, or fails
    /// it if the handle is closed.
    fn start_call(
        &self,
        mesh: &std::result::Result<FfiMesh, FfiError>,
        id: u32,
        name: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) {
        let started = mesh
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|m| m.call_token(name, payload, timeout, None, u64::from(id)));
        if let Err(e) = started {
            self.bridge.push(failed(id, &e));
        }
    }

    /// Whether the JS thread receives answers itself now (it drains again
    /// soon, see [`drain`](NativeMesh::drain)).
    fn answers_polled_here(&self) -> bool {
        self.answers.lock().as_ref().is_some_and(|a| !a.is_idle())
    }

    /// The number [`call`](NativeMesh::call) takes for service `name`
    /// (the JS layer asks once per name).
    #[napi]
    pub fn name(&self, name: String) -> u32 {
        let mut names = self.names.lock();
        match names.iter().position(|n| *n == name) {
            Some(i) => u32::try_from(i).unwrap_or(u32::MAX),
            None => {
                names.push(name);
                u32::try_from(names.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }

    /// Sends a one-way message to one instance of `name`.
    #[napi]
    pub fn send(&self, id: u32, name: String, payload: BufferSlice) {
        let payload = Bytes::copy_from_slice(&payload);
        self.start(
            id,
            |m| async move { m.send(&name, payload).await },
            move |()| Event::Done { id, value: None },
        );
    }

    /// Publishes `payload` on `topic`; operation `id` finishes with the
    /// number of deliveries.
    #[napi]
    pub fn publish(&self, id: u32, topic: String, payload: BufferSlice) {
        let payload = Bytes::copy_from_slice(&payload);
        self.start(
            id,
            |m| async move { m.publish(&topic, payload).await },
            deliveries(id),
        );
    }

    /// Publishes messages on `topic` in order, as one burst: `lengths` is
    /// a byte view of a uint32 array of their lengths and `data` the
    /// messages one after another. Lengths that do not add up to `data`
    /// are refused before anything is published. Operation `id` finishes
    /// with the number of deliveries.
    #[napi]
    pub fn publish_many(
        &self,
        id: u32,
        topic: String,
        lengths: BufferSlice,
        data: BufferSlice,
    ) -> Result<()> {
        let payloads = split_payloads(&lengths, &data)?;
        self.start(
            id,
            |m| async move { m.publish_many(&topic, payloads).await },
            deliveries(id),
        );
        Ok(())
    }

    /// Counts the subscribers a publish on `topic` would reach now;
    /// operation `id` finishes with the count.
    #[napi]
    pub fn subscribers(&self, id: u32, topic: String) {
        self.start(
            id,
            |m| async move { m.subscribers(&topic).await },
            move |n| Event::Done {
                id,
                value: Some(u32::try_from(n).unwrap_or(u32::MAX)),
            },
        );
    }

    /// Waits until a publish on `topic` would reach `n` subscribers, at
    /// most `timeout_ms`; operation `id` finishes with the count.
    #[napi]
    pub fn wait_for_subscribers(&self, id: u32, topic: String, n: u32, timeout_ms: f64) {
        let timeout = std::time::Duration::from_secs_f64(timeout_ms.max(0.0) / 1000.0);
        self.start(
            id,
            move |m| async move { m.wait_for_subscribers(&topic, n as usize, timeout).await },
            move |n| Event::Done {
                id,
                value: Some(u32::try_from(n).unwrap_or(u32::MAX)),
            },
        );
    }

    /// Calls service `name` with `payload` as a task of the mesh, for a
    /// call that may be made more than once (`idempotent`: after a
    /// failure of the instance that took it too) or that routes on
    /// `hash_key`; operation `id` answers with the reply. `timeout_ms`
    /// overrides the mesh's default timeout (0: none).
    #[napi]
    pub fn call_task(
        &self,
        id: u32,
        name: String,
        payload: BufferSlice,
        timeout_ms: Option<f64>,
        idempotent: bool,
        hash_key: Option<BufferSlice>,
    ) -> Result<()> {
        let timeout = match timeout_ms {
            Some(t) => Some(timeout_or_none(t, "timeoutMs")?),
            None => None,
        };
        let mut options = FfiCallOptions::new(timeout, idempotent);
        options.hash_key = hash_key.map(|k| Bytes::copy_from_slice(&k));
        let payload = Bytes::copy_from_slice(&payload);
        self.start(
            id,
            move |m| async move { m.call_with(&name, payload, options).await },
            move |payload| Event::Answer { id, payload },
        );
        Ok(())
    }

    /// Every instance of service `name` this handle knows, as its pool
    /// sees it.
    #[napi]
    pub fn endpoints(&self, name: String) -> Result<Vec<EndpointView>> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        let endpoints = mesh.endpoints(&name).map_err(|e| ffi_error(&e))?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok(endpoints
            .into_iter()
            .map(|e| EndpointView {
                instance: e.instance,
                endpoint: e.endpoint,
                linked: e.linked,
                state: e.state.to_owned(),
                failures_in_a_row: u32::from(e.failures_in_a_row),
                ejected_for_ms: e.ejected_for.map(ms),
                ejections: u32::from(e.ejections),
                in_flight: e.in_flight as f64,
                failed_calls: e.failed_calls as f64,
                round_trip_ms: e.round_trip.map(ms),
            })
            .collect())
    }

    /// Serves `name` as service number `service` (chosen by the JS layer;
    /// its requests carry it). With `cancellable`, each request also gets a
    /// number that a `Cancelled` event names if its caller gives up first.
    /// Returns once the service is announced.
    #[napi]
    pub fn serve(&self, service: u32, name: String, cancellable: Option<bool>) -> Result<()> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        let bridge = self.bridge.clone();
        let cancellable = cancellable.unwrap_or(false);
        let next_cancel = Mutex::new(0u32);
        let (b, all) = (self.bridge.clone(), self.driven.clone());
        let served = mesh
            .serve_driven(
                &name,
                move |payload, caller, reply| {
                    let cancel = cancellable.then(|| {
                        let mut n = next_cancel.lock();
                        // Never 0: the drained event says 0 for "none".
                        *n = n.wrapping_add(1).max(1);
                        let cancel = *n;
                        let b = bridge.clone();
                        reply.on_cancel(move || b.push(Event::Cancelled { cancel }));
                        cancel
                    });
                    bridge.push(Event::Request {
                        service,
                        reply: PendingReply::Reply(reply),
                        payload,
                        cancel,
                        caller,
                    });
                },
                // Each link's own thread watches it while the JS thread
                // does not poll it.
                // A service whose handlers take no cancellation signal has
                // its requests taken out of the links by the JS thread.
                move |link| driven::watch(link, &b, &all, service, !cancellable),
            )
            .map_err(|e| ffi_error(&e))?;
        self.services.lock().insert(service, served);
        Ok(())
    }

    /// Stops serving service `service`; operation `id` finishes when its
    /// requests in progress are answered.
    #[napi]
    pub fn unserve(&self, id: u32, service: u32) {
        let served = self.services.lock().remove(&service);
        let bridge = self.bridge.clone();
        spawn_with(
            async move {
                if let Some(s) = served {
                    s.close().await;
                }
            },
            move |()| bridge.push(Event::Done { id, value: None }),
        );
    }

    /// Answers `n` requests at once: `meta` is a byte view of `[token,
    /// length]` pairs and `data` their answers' bytes, one after another.
    #[napi]
    pub fn reply_many(&self, meta: BufferSlice, n: u32, data: BufferSlice) -> Result<()> {
        let word = |i: usize| -> Option<u32> {
            let b = meta.get(i * 4..i * 4 + 4)?;
            Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        // Checked whole first, and the replies taken under one lock.
        let mut answers = Vec::with_capacity(n as usize);
        let mut at = 0usize;
        for i in 0..n as usize {
            let (Some(token), Some(len)) = (word(2 * i), word(2 * i + 1)) else {
                return Err(invalid(format!(
                    "the answer table holds fewer than {n} answers"
                )));
            };
            let end = at + len as usize;
            if end > data.len() {
                return Err(invalid("the answers' lengths exceed their data"));
            }
            answers.push((token, at..end));
            at = end;
        }
        let answers: Vec<_> = {
            let mut replies = self.replies.lock();
            answers
                .into_iter()
                .map(|(token, range)| (replies.remove(token), range))
                .collect()
        };
        let mut polled = Vec::with_capacity(answers.len());
        for (reply, range) in answers {
            match reply {
                Some(PendingReply::Reply(reply)) => {
                    reply.ok_copied(&data[range]);
                }
                Some(PendingReply::Polled(request)) => polled.push((request, Ok(&data[range]))),
                None => {}
            }
        }
        PolledRequest::answer_all(polled);
        Ok(())
    }

    /// Answers request `token` with an error status (`code` is a status
    /// name such as `"INTERNAL"`; unknown names become `INTERNAL`).
    #[napi]
    pub fn reply_error(&self, token: u32, code: String, message: String) {
        let reply = self.replies.lock().remove(token);
        if let Some(reply) = reply {
            reply.fail(FfiError::from_code_name(&code, message));
        }
    }

    /// Subscribes to `topic` (as a member of queue group `group` if given,
    /// with a queue of `queue` messages, the slow-subscriber `policy` by
    /// name and a dense stream's linger in microseconds) as subscription
    /// number `sub` (chosen by the JS layer; its messages carry it).
    /// Returns once the subscription is announced.
    #[napi]
    pub fn subscribe(
        &self,
        sub: u32,
        topic: String,
        group: Option<String>,
        queue: Option<f64>,
        policy: Option<String>,
        linger_us: Option<f64>,
    ) -> Result<()> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        let mut params = SubscribeParams::default();
        params.group = group;
        params.queue = queue
            .map(|q| index(q, "options.queue"))
            .transpose()?
            .map(|q| q as u64);
        params.policy = policy;
        params.linger = linger_us
            .map(|us| {
                Duration::try_from_secs_f64(us / 1e6).map_err(|_| {
                    invalid(format!(
                        "options.lingerUs must be a finite number >= 0, not {us}"
                    ))
                })
            })
            .transpose()?;
        let subscription = mesh
            .subscribe_with(&topic, &params)
            .map_err(|e| ffi_error(&e))?;
        let credit = Arc::new(Semaphore::new(SUB_WINDOW));
        let (c, s, b) = (credit.clone(), subscription.clone(), self.bridge.clone());
        // Forwards messages while JS has room for them (see `sub_credit`).
        runtime().spawn(async move {
            while let Ok(permit) = c.acquire().await {
                permit.forget();
                match s.next().await {
                    Some(msg) => b.push(Event::Message {
                        sub,
                        payload: msg.into_payload(),
                    }),
                    None => break,
                }
            }
            b.push(Event::Ended { sub });
        });
        self.subs.lock().insert(
            sub,
            Sub {
                subscription,
                credit,
            },
        );
        Ok(())
    }

    /// Messages subscription `sub` dropped because it fell behind; null
    /// once it was closed.
    #[napi]
    pub fn sub_dropped(&self, sub: u32) -> Option<f64> {
        self.subs
            .lock()
            .get(&sub)
            .map(|s| s.subscription.dropped() as f64)
    }

    /// Why the mesh ended subscription `sub` (`"CODE: message"`), or null.
    #[napi]
    pub fn sub_end_reason(&self, sub: u32) -> Option<String> {
        let reason = self.subs.lock().get(&sub)?.subscription.end_reason()?;
        Some(reason.to_string())
    }

    /// A publisher of `topic`: its operations finish through this mesh
    /// handle's events.
    #[napi]
    pub fn publisher(&self, topic: String) -> Result<NativePublisher> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        let publisher = mesh.publisher(&topic).map_err(|e| ffi_error(&e))?;
        Ok(NativePublisher {
            publisher,
            bridge: self.bridge.clone(),
        })
    }

    /// Messages published here on `topic` that subscribers on this host
    /// discarded unread (drop-oldest).
    #[napi]
    pub fn dropped_by_subscribers(&self, topic: String) -> Result<f64> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        mesh.dropped_by_subscribers(&topic)
            .map(|n| n as f64)
            .map_err(|e| ffi_error(&e))
    }

    /// Lets subscription `sub` deliver `n` more messages.
    #[napi]
    pub fn sub_credit(&self, sub: u32, n: u32) {
        if let Some(s) = self.subs.lock().get(&sub) {
            s.credit.add_permits(n as usize);
        }
    }

    /// Ends subscription `sub`; an `Ended` event follows.
    #[napi]
    pub fn unsubscribe(&self, sub: u32) {
        if let Some(s) = self.subs.lock().remove(&sub) {
            s.subscription.close();
            s.credit.close();
        }
    }

    /// Opens the shared region `name` of this mesh: `mode` is `"open"`,
    /// `"create"` or `"openOrCreate"`; `size` is required to create.
    #[napi]
    pub fn region(&self, name: String, size: Option<f64>, mode: String) -> Result<NativeRegion> {
        let mesh = self.mesh().map_err(|e| ffi_error(&e))?;
        let mut options = RegionOptions::default();
        if let Some(size) = size {
            options.size = Some(index(size, "size")?);
        }
        options.policy = Some(match mode.as_str() {
            "open" => OpenPolicy::Open,
            "create" => OpenPolicy::Create,
            "openOrCreate" => OpenPolicy::OpenOrCreate,
            other => {
                return Err(invalid(format!(
                    "region mode must be open, create or openOrCreate, got {other:?}"
                )));
            }
        });
        let region = mesh.region(&name, options).map_err(|e| ffi_error(&e))?;
        Ok(NativeRegion {
            region: Mutex::new(Some(region)),
            name,
        })
    }

    /// Closes the handle: stops serving (waiting for requests in progress),
    /// ends subscriptions, drops links. Operation `id` finishes when done;
    /// nothing reaches JS after it.
    #[napi]
    pub fn close(&self, id: u32) {
        let Some(mesh) = self.mesh.lock().take() else {
            self.bridge.push(Event::Done { id, value: None });
            return;
        };
        let served: Vec<_> = self.services.lock().drain().map(|(_, s)| s).collect();
        for (_, s) in self.subs.lock().drain() {
            s.subscription.close();
            s.credit.close();
        }
        // Requests JS has not answered get INTERNAL when their replies drop.
        drop(self.replies.lock().drain());
        self.polled.lock().close(&self.driven);
        // The links' readers deliver what is still to come.
        drop(self.answers.lock().take());
        let bridge = self.bridge.clone();
        spawn_with(
            async move {
                for s in served {
                    s.close().await;
                }
                mesh.close().await;
            },
            move |()| {
                bridge.push(Event::Done { id, value: None });
                bridge.shut();
            },
        );
    }

    /// Receives the requests waiting in the served links this thread owns
    /// (see [`crate::driven`]), then moves waiting events into `meta`, a
    /// byte view of the JS layer's `Uint32Array`: slot 0 gets the number of
    /// events written; slot 1 has bit 0 set if more are waiting (call
    /// again now) and bit 1 set if this thread still owns served links or
    /// links it receives answers from (call again soon, once the handlers
    /// and callbacks of this batch ran); each event takes [`STRIDE`] slots
    /// from slot 2 on: `[kind, id, offset, length, x, y]`. Payloads
    /// (and failure texts, `"CODE: message"`) are concatenated in the
    /// returned buffer, at each event's offset and length: one buffer per
    /// drain, however many events (see `index.js` for the kinds).
    #[napi]
    pub fn drain<'e>(
        &self,
        env: &'e Env,
        mut meta: BufferSlice,
    ) -> Result<Option<BufferSlice<'e>>> {
        let meta: &mut [u8] = &mut meta;
        let room = (meta.len() / 4).saturating_sub(2) / STRIDE;
        if room == 0 {
            return Err(invalid("the event buffer is too small"));
        }
        let mut events = std::mem::take(&mut *self.scratch.lock());
        let mut data = Vec::new();
        // The requests waiting in the links the JS thread owns join the
        // events, after those queued before (their payloads go straight
        // into `data`): received on this thread, they need no queue and no
        // wake-up.
        self.bridge.hold();
        let owns_links = self.bridge.draining(&mut events, || {
            self.polled.lock().poll(
                &self.bridge,
                room,
                &mut |service, caller, request, payload| {
                    let (at, len) = append(&mut data, payload);
                    self.bridge.push(Event::Polled {
                        service,
                        request,
                        at,
                        len,
                        caller: caller.clone(),
                    });
                },
            )
        });
        // The answers waiting in the links this thread calls on go
        // straight into `meta` and `data`.
        let mut n = 0usize;
        let owns_calls = self.answers.lock().as_mut().is_some_and(|a| {
            a.poll_with(room.min(POLL_MAX), |id, answer| {
                let id = id as u32;
                let ev = match answer {
                    Ok(payload) => bytes_event(ANSWER, id, &mut data, payload, 0, 0),
                    Err(status) => {
                        let e = FfiError::from(status);
                        let text = failure_text(e.code_name(), e.message());
                        bytes_event(FAILED, id, &mut data, text.as_bytes(), 0, 0)
                    }
                };
                put_event(meta, n, ev);
                n += 1;
            })
        });
        let handed_over = self.bridge.take(&mut events);
        let mut replies = self.replies.lock();
        let mut callers = self.callers.lock();
        // Those with no room in this drain, kept for the next.
        let mut left = Vec::new();
        for ev in events.drain(..) {
            if n == room || !left.is_empty() {
                left.push(ev);
                continue;
            }
            let d = &mut data;
            // A request from another caller than the previous one's first
            // says whose it is (see `Callers`).
            if let Event::Request { caller, .. } | Event::Polled { caller, .. } = &ev
                && !callers.is_current(caller)
            {
                if n + 2 > room {
                    left.push(ev);
                    continue;
                }
                if let Some(tell) = callers.make_current(caller, d) {
                    put_event(meta, n, tell);
                    n += 1;
                }
            }
            let ev = match ev {
                Event::Done { id, value } => [DONE, id, 0, 0, value.unwrap_or(0), 0],
                Event::Answer { id, payload } => bytes_event(ANSWER, id, d, &payload, 0, 0),
                Event::Failed { id, code, message } => {
                    let text = failure_text(code, &message);
                    bytes_event(FAILED, id, d, text.as_bytes(), 0, 0)
                }
                Event::Request {
                    service,
                    reply,
                    payload,
                    cancel,
                    caller: _,
                } => {
                    let token = replies.insert(reply);
                    // 0: no cancellation number.
                    bytes_event(REQUEST, token, d, &payload, service, cancel.unwrap_or(0))
                }
                Event::Polled {
                    service,
                    request,
                    at,
                    len,
                    caller: _,
                } => {
                    let token = replies.insert(PendingReply::Polled(request));
                    [REQUEST, token, at, len, service, 0]
                }
                Event::Cancelled { cancel } => [CANCELLED, cancel, 0, 0, 0, 0],
                Event::Message { sub, payload } => bytes_event(MESSAGE, sub, d, &payload, 0, 0),
                Event::Ended { sub } => [ENDED, sub, 0, 0, 0, 0],
            };
            put_event(meta, n, ev);
            n += 1;
        }
        drop(replies);
        drop(callers);
        events.append(&mut left);
        // Requests polled now that wait for the next drain take their
        // payloads along (this drain's buffer goes to JS now).
        if events.iter().any(|ev| matches!(ev, Event::Polled { .. })) {
            events = events.into_iter().map(|ev| ev.owning(&data)).collect();
        }
        put(meta, 0, u32::try_from(n).unwrap_or(u32::MAX));
        put(
            meta,
            1,
            u32::from(!events.is_empty() || handed_over || n == room)
                | (u32::from(owns_links || owns_calls) << 1),
        );
        *self.scratch.lock() = events;
        if data.is_empty() {
            Ok(None)
        } else {
            BufferSlice::from_data(env, data).map(Some)
        }
    }
}

/// What `drain`'s buffer is made with room for (it grows past it).
const DATA_START: usize = 8 * 1024;

/// Writes `v` into slot `slot` of `meta`.
fn put(meta: &mut [u8], slot: usize, v: u32) {
    meta[slot * 4..slot * 4 + 4].copy_from_slice(&v.to_ne_bytes());
}

/// A failure's bytes in a drained event: `"CODE: message"` (see `index.js`).
fn failure_text(code: &str, message: &str) -> String {
    format!("{code}: {message}")
}

/// Writes drained event `i` (its [`STRIDE`] slots) into `meta`.
fn put_event(meta: &mut [u8], i: usize, ev: [u32; STRIDE]) {
    let at = (2 + i * STRIDE) * 4;
    for (slot, v) in meta[at..at + STRIDE * 4].chunks_exact_mut(4).zip(ev) {
        slot.copy_from_slice(&v.to_ne_bytes());
    }
}

/// A drained event whose bytes `b` are appended to `data`: `[kind, id,
/// offset, length, x, y]`.
fn bytes_event(kind: u32, id: u32, data: &mut Vec<u8>, b: &[u8], x: u32, y: u32) -> [u32; STRIDE] {
    let (at, len) = append(data, b);
    [kind, id, at, len, x, y]
}

/// Appends `b` to a drain's buffer `data`: its offset and length there.
fn append(data: &mut Vec<u8>, b: &[u8]) -> (u32, u32) {
    if data.capacity() == 0 {
        // Made only for a drain with bytes to hand over.
        data.reserve(DATA_START.max(b.len()));
    }
    let at = u32::try_from(data.len()).unwrap_or(u32::MAX);
    data.extend_from_slice(b);
    (at, u32::try_from(b.len()).unwrap_or(u32::MAX))
}

/// Runs `op` (from this thread, see `run_inline`) and pushes what it
/// comes to onto `bridge` as operation `id`'s outcome.
fn finish_on<F, T>(
    bridge: Arc<Bridge>,
    id: u32,
    op: F,
    to_event: impl FnOnce(T) -> Event + Send + 'static,
) where
    F: std::future::Future<Output = std::result::Result<T, FfiError>> + Send + 'static,
    T: Send + 'static,
{
    let done = move |r: std::result::Result<T, FfiError>| {
        bridge.push(match r {
            Ok(v) => to_event(v),
            Err(e) => failed(id, &e),
        });
    };
    run_inline(op, done);
}

/// The outcome of publishing operation `id`: its number of deliveries.
fn deliveries(id: u32) -> impl FnOnce(usize) -> Event + Send + 'static {
    move |n| Event::Done {
        id,
        value: Some(u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

/// The messages of a burst as JS packs them: `lengths` is a byte view of
/// a uint32 array of their lengths and `data` the messages one after
/// another. Lengths that do not add up to `data` are refused.
fn split_payloads(lengths: &[u8], data: &[u8]) -> Result<Vec<Bytes>> {
    let mut payloads = Vec::with_capacity(lengths.len() / 4);
    let mut at = 0usize;
    for len in lengths.chunks(4) {
        let len = <[u8; 4]>::try_from(len)
            .map_err(|_| invalid("the message lengths are not a uint32 array"))?;
        let end = at
            .checked_add(u32::from_ne_bytes(len) as usize)
            .filter(|end| *end <= data.len())
            .ok_or_else(|| invalid("the message lengths exceed their data"))?;
        payloads.push(Bytes::copy_from_slice(&data[at..end]));
        at = end;
    }
    if at != data.len() {
        return Err(invalid("the message lengths do not cover their data"));
    }
    Ok(payloads)
}

/// A publisher of one topic, made by [`NativeMesh::publisher`].
#[napi]
pub struct NativePublisher {
    publisher: FfiPublisher,
    bridge: Arc<Bridge>,
}

#[napi]
impl NativePublisher {
    /// The topic it publishes on.
    #[napi(getter)]
    pub fn topic(&self) -> String {
        self.publisher.topic().to_owned()
    }

    /// Publishes `payload`; operation `id` (of the mesh handle that made
    /// this publisher) finishes with the number of deliveries.
    #[napi]
    pub fn publish(&self, id: u32, payload: BufferSlice) {
        let payload = Bytes::copy_from_slice(&payload);
        let publish = self.publisher.publish(payload);
        finish_on(self.bridge.clone(), id, publish, deliveries(id));
    }

    /// Publishes a burst packed as [`NativeMesh::publish_many`] takes it;
    /// operation `id` finishes with the number of deliveries.
    #[napi]
    pub fn publish_many(&self, id: u32, lengths: BufferSlice, data: BufferSlice) -> Result<()> {
        let payloads = split_payloads(&lengths, &data)?;
        let publish = self.publisher.publish_many(payloads);
        finish_on(self.bridge.clone(), id, publish, deliveries(id));
        Ok(())
    }
}

/// A shared region opened through [`NativeMesh::region`].
#[napi]
pub struct NativeRegion {
    region: Mutex<Option<FfiRegion>>,
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
        self.region.lock().as_ref().map_or(0.0, |r| r.len() as f64)
    }

    /// A consistent copy of `len` bytes at `offset`.
    #[napi]
    pub fn read<'e>(&self, env: &'e Env, offset: f64, len: f64) -> Result<BufferSlice<'e>> {
        let guard = self.region.lock();
        let region = guard.as_ref().ok_or_else(closed_region)?;
        let data = region
            .read_at(index(offset, "offset")?, index(len, "length")?)
            .map_err(|e| ffi_error(&e))?;
        BufferSlice::from_data(env, data)
    }

    /// Writes `data` at `offset` (readers never see half of it).
    #[napi]
    pub fn write(&self, data: BufferSlice, offset: f64) -> Result<()> {
        let guard = self.region.lock();
        let region = guard.as_ref().ok_or_else(closed_region)?;
        region
            .write_at(index(offset, "offset")?, &data)
            .map_err(|e| ffi_error(&e))
    }

    /// Lets go of the region.
    #[napi]
    pub fn close(&self) {
        self.region.lock().take();
    }
}

fn closed_region() -> napi::Error {
    ffi_error(&FfiError::from_code_name(
        "FAILED_PRECONDITION",
        "the region is closed",
    ))
}

/// How this process's link threads wait for the peer: they do not spin but
/// yield the CPU for up to a millisecond before sleeping, so the JS thread
/// gets the core whenever it has work, while a link thread stays awake
/// across the gap between one call's answer and the next call (a sleeping
/// thread's wake-up would add a hop per message on top of the event
/// loop's). A link that stays quiet longer sleeps on the ring's futex and
/// costs nothing. Measured (64 B, Node to Node, medians of 7 interleaved
/// runs): spinning 20 µs then yielding 20 µs made the sequential round
/// trip 1.36x the `net` echo's, yielding 1 ms 0.85x, with no loss of
/// throughput. `COMMY_NODE_SPIN_US`/`COMMY_NODE_YIELD_US` override (for
/// measuring).
fn link_wait() -> commy_ffi::WaitStrategy {
    commy_ffi::WaitStrategy::Adaptive {
        spin: micros_from_env("COMMY_NODE_SPIN_US", 0),
        yield_for: micros_from_env("COMMY_NODE_YIELD_US", 1000),
    }
}

/// How long the JS thread keeps polling a link that came up empty (a
/// served link, or one it takes answers from) before handing it back to
/// the link's own thread: 1 ms. Within it, what arrives is taken at the
/// next turn of the event loop, with no thread waking another; a link
/// handed back costs a wake-up of the JS thread when its next message
/// comes (tens of microseconds on a VM) and its thread yields meanwhile,
/// beside the JS thread. Measured with 1000 calls in flight (64 B, Node
/// to Node, both pinned to a core each, medians): handing a link back at
/// the second empty poll (about 5 µs) made 1.3 M calls/s, 100 µs 1.43 M,
/// 1 ms 2.0 M; one call at a time, the round trip went from 10.4 to
/// 7.8 µs. The price: an event loop that owns a busy link spins (yielding
/// to its other work at every turn) for up to 1 ms after its last message;
/// a link that brought a lone request is held for 50 µs only (see
/// `driven::Polled::new`), so a service called now and then spins little
/// (at a call every 5 ms, the serving process used 0.50 s of CPU over
/// 2.2 s, against 0.89 s holding every link for 1 ms and 0.48 s handing
/// links back at once). `COMMY_NODE_HOLD_US` overrides (for measuring).
fn poll_hold() -> Duration {
    micros_from_env("COMMY_NODE_HOLD_US", 1000)
}

/// The microseconds in environment variable `var`, or `default`.
fn micros_from_env(var: &str, default: u64) -> Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_micros(default), Duration::from_micros)
}

/// A JS millisecond count as a timeout the mesh is always given: 0 (wait
/// forever) becomes a very long one, since giving none means "the
/// default".
fn timeout_or_none(ms: f64, what: &str) -> Result<Duration> {
    Ok(timeout(ms, what)?.unwrap_or(Duration::from_secs(1 << 40)))
}

/// A JS number that must be a `u32`.
fn whole(n: f64, what: &str) -> Result<u32> {
    // A cast saturates (NaN becomes 0): only a whole number in range
    // comes back the same.
    let w = n as u32;
    if f64::from(w) == n {
        Ok(w)
    } else {
        Err(invalid(format!(
            "{what} must be an integer from 0 to 2^32-1, got {n}"
        )))
    }
}

/// A JS number used as a byte offset or length.
fn index(n: f64, what: &str) -> Result<usize> {
    // As in `whole`.
    let w = n as u64;
    if w as f64 == n && w <= 1 << 53 {
        Ok(w as usize)
    } else {
        Err(invalid(format!("{what} must be an integer >= 0, got {n}")))
    }
}

/// A JS millisecond count as a timeout: 0 means none (wait forever).
fn timeout(ms: f64, what: &str) -> Result<Option<Duration>> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(invalid(format!(
            "{what} must be a finite number of milliseconds >= 0, got {ms}"
        )));
    }
    if ms == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(ms / 1000.0)
        .map(Some)
        .map_err(|_| invalid(format!("{what} of {ms} milliseconds is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(pid: u32) -> FfiCaller {
        FfiCaller::from(commy_ffi::Caller::Local {
            uid: 1000,
            gid: 100,
            pid,
        })
    }

    #[test]
    fn js_is_told_of_a_caller_when_it_changes_and_numbers_are_reused_oldest_first() {
        let mut callers = Callers::default();
        let mut data = Vec::new();
        let mut tell = |callers: &mut Callers, pid| callers.make_current(&local(pid), &mut data);
        assert_eq!(
            tell(&mut callers, 7),
            Some([CALLER, 0, 1000, 100, 7, CALLER_LOCAL])
        );
        assert_eq!(tell(&mut callers, 7), None);
        assert_eq!(
            tell(&mut callers, 8),
            Some([CALLER, 1, 1000, 100, 8, CALLER_LOCAL])
        );
        assert_eq!(tell(&mut callers, 7), Some([CALLER_USE, 0, 0, 0, 0, 0]));
        assert_eq!(tell(&mut callers, 7), None);
        for pid in 2..CALLERS_MAX as u32 {
            assert_eq!(tell(&mut callers, 100 + pid).map(|e| e[1]), Some(pid));
        }
        // Every number is taken: the oldest definitions go first.
        assert_eq!(
            tell(&mut callers, 9),
            Some([CALLER, 0, 1000, 100, 9, CALLER_LOCAL])
        );
        assert_eq!(tell(&mut callers, 8), Some([CALLER_USE, 1, 0, 0, 0, 0]));
        assert_eq!(
            tell(&mut callers, 7).map(|e| e[..2].to_vec()),
            Some(vec![CALLER, 1])
        );
        assert!(data.is_empty(), "local callers need no bytes");
    }
}
