//! `RawMesh` and what serving hands out: `RawService`.

use std::sync::Arc;

use commy_ffi::{
    FfiCallOptions, FfiError, FfiMesh, FfiService, MeshOptions, OpenPolicy, SubscribeParams,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::aio::{self, Outcome, RawQueue, RawTask};
use crate::caller::HandlerContext;
use crate::convert::{key, payload, payloads, seconds, settings_layer, wait, with_python};
use crate::errors;
use crate::publisher::RawPublisher;
use crate::region::RawRegion;
use crate::subscription::RawSubscription;

fn exiting() -> FfiError {
    FfiError::from_code_name("UNAVAILABLE", "the service's process is exiting")
}

/// A handle on the mesh (see `commy.Mesh` for the documented API).
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawMesh {
    mesh: FfiMesh,
}

#[pymethods]
impl RawMesh {
    #[new]
    #[pyo3(signature = (settings=None))]
    fn new(py: Python<'_>, settings: Option<&Bound<'_, PyDict>>) -> PyResult<RawMesh> {
        let mut options = MeshOptions::default();
        options.settings = settings_layer(settings)?;
        options.link_thread_hook = Some(crate::convert::link_thread_hook());
        let mesh = py
            .detach(|| FfiMesh::open(options))
            .map_err(|e| errors::to_py(py, &e))?;
        Ok(RawMesh { mesh })
    }

    /// The mesh's name.
    #[getter]
    fn name(&self) -> String {
        self.mesh.name()
    }

    /// The value of setting `key` and where it came from, or None for an
    /// unknown key.
    fn explain(&self, key: &str) -> Option<(String, String)> {
        self.mesh.explain(key)
    }

    /// Calls `service`, blocking (GIL released, Ctrl-C interrupts);
    /// `idempotent`: the call may be made more than once; `hash_key`: the
    /// key a hashing service routes on.
    #[pyo3(signature = (service, data, timeout=None, idempotent=false, hash_key=None))]
    fn call(
        &self,
        py: Python<'_>,
        service: &str,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        idempotent: bool,
        hash_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyBytes>> {
        let data = payload(data, "data")?;
        let mut options = FfiCallOptions::new(seconds(py, timeout, "timeout")?, idempotent);
        options.hash_key = hash_key.map(|k| key(k, "hash_key")).transpose()?;
        let reply = wait(py, self.mesh.call_with(service, data, options))?;
        Ok(PyBytes::new(py, &reply).unbind())
    }

    /// Every instance of service `name` this handle knows, as its pool
    /// sees it: a dict each.
    fn endpoints<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let endpoints = self
            .mesh
            .endpoints(name)
            .map_err(|e| errors::to_py(py, &e))?;
        endpoints
            .into_iter()
            .map(|e| {
                let d = PyDict::new(py);
                d.set_item("instance", e.instance)?;
                d.set_item("endpoint", e.endpoint)?;
                d.set_item("linked", e.linked)?;
                d.set_item("state", e.state)?;
                d.set_item("failures_in_a_row", e.failures_in_a_row)?;
                d.set_item("ejected_for", e.ejected_for.map(|d| d.as_secs_f64()))?;
                d.set_item("ejections", e.ejections)?;
                d.set_item("in_flight", e.in_flight)?;
                d.set_item("failed_calls", e.failed_calls)?;
                d.set_item("round_trip", e.round_trip.map(|d| d.as_secs_f64()))?;
                Ok(d)
            })
            .collect()
    }

    /// Sends a one-way message, blocking.
    fn send(&self, py: Python<'_>, service: &str, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = payload(data, "data")?;
        wait(py, self.mesh.send(service, data))
    }

    /// Publishes, blocking; returns the number of deliveries.
    fn publish(&self, py: Python<'_>, topic: &str, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let data = payload(data, "data")?;
        wait(py, self.mesh.publish(topic, data))
    }

    /// Publishes each of `data` (an iterable of bytes-like objects) in
    /// order, blocking; returns the number of deliveries.
    fn publish_many(
        &self,
        py: Python<'_>,
        topic: &str,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let data = payloads(data, "data")?;
        wait(py, self.mesh.publish_many(topic, data))
    }

    /// A publisher of `topic`.
    fn publisher(&self, py: Python<'_>, topic: &str) -> PyResult<RawPublisher> {
        self.mesh
            .publisher(topic)
            .map(RawPublisher::new)
            .map_err(|e| errors::to_py(py, &e))
    }

    /// Messages published here on `topic` that subscribers on this host
    /// discarded unread (drop-oldest).
    fn dropped_by_subscribers(&self, py: Python<'_>, topic: &str) -> PyResult<u64> {
        self.mesh
            .dropped_by_subscribers(topic)
            .map_err(|e| errors::to_py(py, &e))
    }

    /// How many deliveries a publish on `topic` would make now.
    fn subscribers(&self, py: Python<'_>, topic: &str) -> PyResult<usize> {
        wait(py, self.mesh.subscribers(topic))
    }

    /// Waits until a publish on `topic` would reach `n` subscribers, at
    /// most `timeout` seconds; returns how many it would reach.
    fn wait_for_subscribers(
        &self,
        py: Python<'_>,
        topic: &str,
        n: usize,
        timeout: f64,
    ) -> PyResult<usize> {
        let timeout = seconds(py, Some(timeout), "timeout")?.unwrap_or_default();
        wait(py, self.mesh.wait_for_subscribers(topic, n, timeout))
    }

    /// `wait_for_subscribers` for an event loop (see `call_async`).
    fn wait_for_subscribers_async(
        &self,
        py: Python<'_>,
        topic: &str,
        n: usize,
        timeout: f64,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let timeout = seconds(py, Some(timeout), "timeout")?.unwrap_or_default();
        let waiting = self.mesh.wait_for_subscribers(topic, n, timeout);
        aio::start(py, queue, fut, waiting, Outcome::Count)
    }

    /// `call` for an event loop: started here, on the loop's thread, and
    /// polled there again when woken through `queue`; its outcome settles the asyncio future
    /// `fut` through `queue`.
    /// `spin`: seconds this call polls for its answer on the loop's thread
    /// before it waits (the mesh's `call_spin` if None).
    #[pyo3(signature = (service, data, timeout, queue, fut, spin=None, idempotent=false, hash_key=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "the Python method's parameters, one by one"
    )]
    fn call_async(
        &self,
        py: Python<'_>,
        service: &str,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        queue: &RawQueue,
        fut: Py<PyAny>,
        spin: Option<f64>,
        idempotent: bool,
        hash_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<RawTask> {
        let data = payload(data, "data")?;
        let mut options = FfiCallOptions::new(seconds(py, timeout, "timeout")?, idempotent);
        options.spin = seconds(py, spin, "spin")?;
        options.hash_key = hash_key.map(|k| key(k, "hash_key")).transpose()?;
        let call = self.mesh.call_with(service, data, options);
        aio::start(py, queue, fut, call, Outcome::Bytes)
    }

    /// Calls `service` once with each item of `data` (an iterable of
    /// bytes-like objects), all in flight at once, blocking (GIL released);
    /// returns a list with each call's answer (bytes) or error (a
    /// `commy.CommyError`, not raised), in order.
    #[pyo3(signature = (service, data, timeout=None))]
    fn call_many(
        &self,
        py: Python<'_>,
        service: &str,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let data = payloads(data, "data")?;
        let timeout = seconds(py, timeout, "timeout")?;
        let answers = wait(py, {
            let calls = self.mesh.call_many(service, data, timeout, None);
            async move { Ok(calls.await) }
        })?;
        aio::answers_to_py(py, answers)
    }

    /// `call_many` for an event loop (see `call_async`; `spin` as there).
    #[pyo3(signature = (service, data, timeout, queue, fut, spin=None))]
    #[allow(
        clippy::too_many_arguments,
        reason = "the Python method's parameters, one by one"
    )]
    fn call_many_async(
        &self,
        py: Python<'_>,
        service: &str,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
        queue: &RawQueue,
        fut: Py<PyAny>,
        spin: Option<f64>,
    ) -> PyResult<RawTask> {
        let data = payloads(data, "data")?;
        let timeout = seconds(py, timeout, "timeout")?;
        let spin = seconds(py, spin, "spin")?;
        let calls = self.mesh.call_many(service, data, timeout, spin);
        let calls = async move { Ok(calls.await) };
        aio::start(py, queue, fut, calls, Outcome::Answers)
    }

    /// `send` for an event loop (see `call_async`).
    fn send_async(
        &self,
        py: Python<'_>,
        service: &str,
        data: &Bound<'_, PyAny>,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let data = payload(data, "data")?;
        let send = self.mesh.send(service, data);
        aio::start(py, queue, fut, send, |()| Outcome::Unit)
    }

    /// `publish` for an event loop (see `call_async`).
    fn publish_async(
        &self,
        py: Python<'_>,
        topic: &str,
        data: &Bound<'_, PyAny>,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let data = payload(data, "data")?;
        let publish = self.mesh.publish(topic, data);
        aio::start(py, queue, fut, publish, Outcome::Count)
    }

    /// `publish_many` for an event loop (see `call_async`).
    fn publish_many_async(
        &self,
        py: Python<'_>,
        topic: &str,
        data: &Bound<'_, PyAny>,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let data = payloads(data, "data")?;
        let publish = self.mesh.publish_many(topic, data);
        aio::start(py, queue, fut, publish, Outcome::Count)
    }

    /// Serves `service` with `handler(data: bytes) -> bytes-like`, called on
    /// the link's thread; with `context`, `handler(data, HandlerContext)`.
    /// A `commy.CommyError` it raises answers with its code; any other
    /// exception answers INTERNAL (traceback printed here).
    #[pyo3(signature = (service, handler, context=false))]
    fn serve(
        &self,
        py: Python<'_>,
        service: &str,
        handler: Py<PyAny>,
        context: bool,
    ) -> PyResult<RawService> {
        let name = service.to_owned();
        let served = py.detach(|| {
            self.mesh.serve(service, move |req, reply| {
                let answered = with_python(|py| {
                    let arg = PyBytes::new(py, req.payload());
                    let called = if context {
                        Py::new(
                            py,
                            HandlerContext::new(req.caller().clone(), req.deadline()),
                        )
                        .and_then(|ctx| handler.call1(py, (arg, ctx)))
                    } else {
                        handler.call1(py, (arg,))
                    };
                    let answer =
                        called.and_then(|v| payload(v.bind(py), "the handler's return value"));
                    match answer {
                        Ok(b) => reply.ok(b),
                        Err(e) => reply.error(errors::from_py(py, &e, &name)),
                    };
                });
                if answered.is_none() {
                    reply.error(exiting());
                }
            })
        });
        served
            .map(|service| RawService { service })
            .map_err(|e| errors::to_py(py, &e))
    }

    /// Serves `service` for an event loop: each request is queued on
    /// `queue` for `handler`, which answers through the `RawReply`.
    fn serve_queued(
        &self,
        py: Python<'_>,
        service: &str,
        handler: Py<PyAny>,
        queue: &RawQueue,
    ) -> PyResult<RawService> {
        let handler = Arc::new(handler);
        let queue = queue.queue.clone();
        let served = py.detach(|| {
            self.mesh.serve(service, move |req, reply| {
                aio::request(&queue, &handler, req, reply)
            })
        });
        served
            .map(|service| RawService { service })
            .map_err(|e| errors::to_py(py, &e))
    }

    /// Subscribes to `topic` (as a member of queue `group` if given), with
    /// a queue of `queue` messages, the slow-subscriber `policy` by name,
    /// and a dense stream's `linger` in seconds.
    #[pyo3(signature = (topic, group=None, queue=None, policy=None, linger=None))]
    fn subscribe(
        &self,
        py: Python<'_>,
        topic: &str,
        group: Option<&str>,
        queue: Option<u64>,
        policy: Option<&str>,
        linger: Option<f64>,
    ) -> PyResult<RawSubscription> {
        let mut params = SubscribeParams::default();
        params.group = group.map(str::to_owned);
        params.queue = queue;
        params.policy = policy.map(str::to_owned);
        params.linger = seconds(py, linger, "linger")?;
        py.detach(|| self.mesh.subscribe_with(topic, &params))
            .map(RawSubscription::new)
            .map_err(|e| errors::to_py(py, &e))
    }

    /// Opens a region: `policy` is "open", "create" or "open_or_create"
    /// (default: "open_or_create" with a size, else "open"); `ttl` in seconds.
    #[pyo3(signature = (name, size=None, policy=None, ttl=None))]
    fn region(
        &self,
        py: Python<'_>,
        name: &str,
        size: Option<usize>,
        policy: Option<&str>,
        ttl: Option<f64>,
    ) -> PyResult<RawRegion> {
        let mut options = commy_ffi::RegionOptions::default();
        options.size = size;
        options.ttl = seconds(py, ttl, "ttl")?;
        options.policy = match policy {
            None => None,
            Some("open") => Some(OpenPolicy::Open),
            Some("create") => Some(OpenPolicy::Create),
            Some("open_or_create") => Some(OpenPolicy::OpenOrCreate),
            Some(other) => {
                return Err(errors::to_py(
                    py,
                    &FfiError::invalid_argument(format!(
                        "policy must be 'open', 'create' or 'open_or_create', not {other:?}"
                    )),
                ));
            }
        };
        py.detach(|| self.mesh.region(name, options))
            .map(RawRegion::new)
            .map_err(|e| errors::to_py(py, &e))
    }

    /// Closes the handle (stops serving, waits for handlers in progress).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let closing = self.mesh.close();
        wait(py, async move {
            closing.await;
            Ok(())
        })
    }

    /// `close` for an event loop (see `call_async`).
    fn close_async(&self, py: Python<'_>, queue: &RawQueue, fut: Py<PyAny>) -> PyResult<RawTask> {
        let closing = self.mesh.close();
        let close = async move {
            closing.await;
            Ok(())
        };
        aio::start(py, queue, fut, close, |()| Outcome::Unit)
    }
}

/// A service being served.
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawService {
    service: FfiService,
}

#[pymethods]
impl RawService {
    /// The service name.
    #[getter]
    fn name(&self) -> &str {
        self.service.name()
    }

    /// The instance id announced for it.
    #[getter]
    fn instance_id(&self) -> &str {
        self.service.instance_id()
    }

    /// Whether it still serves.
    #[getter]
    fn serving(&self) -> bool {
        self.service.is_serving()
    }

    /// Stops serving at once (handlers in progress finish on their own).
    fn stop(&self) {
        self.service.stop();
    }

    /// Stops serving and waits for handlers in progress.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let closing = self.service.close();
        wait(py, async move {
            closing.await;
            Ok(())
        })
    }
}
