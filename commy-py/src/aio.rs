//! The bridge to an asyncio event loop: a queue of events that commy's
//! threads fill without entering the interpreter, and one file descriptor
//! that becomes readable when the queue gets work.
//!
//! The loop watches the descriptor (`loop.add_reader`) and drains the queue
//! in one go on its own thread. Operations (`call_async`, ...) are
//! commy-ffi [`LocalTask`]s: polled first right where they are started,
//! on the loop's thread, then again on that thread whenever they are woken
//! (their wake-up is an event in the queue), and they settle their asyncio
//! futures when done. Requests go to their handlers the same way. No commy
//! thread ever waits for the GIL (which, with the loop busy running Python
//! code, can take a whole switch interval per hand-off), no runtime worker
//! stands between a response and the loop, and a burst of events costs one
//! wake-up.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use commy_ffi::{Deadline, FfiCaller, FfiError, FfiRequest, LocalTask, Reply};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::caller::HandlerContext;
use crate::convert::{payload, with_python};
use crate::errors;

/// The result of an operation, converted to Python on the loop's thread.
pub(crate) enum Outcome {
    Bytes(Bytes),
    MaybeBytes(Option<Bytes>),
    /// Several messages' data (a batch; empty once the subscription ended).
    Batch(Vec<Bytes>),
    /// Each call's answer, or its error (as an exception object).
    Answers(Vec<Result<Bytes, FfiError>>),
    Count(usize),
    Unit,
}

/// What an operation's task yields.
pub(crate) type OpResult = Result<Outcome, FfiError>;

enum Event {
    /// An operation was woken: poll it, and settle `fut` once it is done.
    Poll {
        task: LocalTask<OpResult>,
        fut: Arc<Py<PyAny>>,
    },
    /// A request for `handler`.
    Request {
        handler: Arc<Py<PyAny>>,
        payload: Bytes,
        reply: Reply,
        caller: FfiCaller,
        service: Arc<str>,
        deadline: Option<Deadline>,
    },
    /// Call `callback()` (a handler's caller gave up).
    Call { callback: Arc<Py<PyAny>> },
}

struct State {
    events: Vec<Event>,
    /// A wake-up byte is on its way (no need to send another).
    woken: bool,
    /// The loop stopped listening: requests are refused, tasks dropped.
    closed: bool,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn push(&self, event: Event) {
        let wake = {
            let mut st = self.lock();
            if st.closed {
                drop(st);
                if let Event::Request { reply, .. } = event {
                    reply.error(FfiError::from_code_name(
                        "UNAVAILABLE",
                        "the service's event loop has stopped listening (its mesh is closed)",
                    ));
                }
                return;
            }
            st.events.push(event);
            !std::mem::replace(&mut st.woken, true)
        };
        if wake {
            // Non-blocking: if the socket is full, a wake-up is pending anyway.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    fn take(&self) -> Vec<Event> {
        let mut sink = [0u8; 256];
        loop {
            match (&self.wake_rx).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let mut st = self.lock();
        st.woken = false;
        std::mem::take(&mut st.events)
    }
}

/// The event queue of one `AsyncMesh` (see the module docs).
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawQueue {
    pub(crate) queue: Arc<Queue>,
}

#[pymethods]
impl RawQueue {
    #[new]
    fn new() -> PyResult<RawQueue> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(RawQueue {
            queue: Arc::new(Queue {
                state: Mutex::new(State {
                    events: Vec::new(),
                    woken: false,
                    closed: false,
                }),
                wake_tx,
                wake_rx,
            }),
        })
    }

    /// Stops taking events: requests from now on answer UNAVAILABLE, and
    /// those waiting are answered so too.
    fn close(&self) {
        let waiting = {
            let mut st = self.queue.lock();
            st.closed = true;
            std::mem::take(&mut st.events)
        };
        for event in waiting {
            if let Event::Request { reply, .. } = event {
                reply.error(FfiError::from_code_name(
                    "UNAVAILABLE",
                    "the service's event loop has stopped listening (its mesh is closed)",
                ));
            }
        }
    }

    /// The descriptor that becomes readable when events wait.
    fn fileno(&self) -> i32 {
        self.queue.wake_rx.as_raw_fd()
    }

    /// Takes every waiting event: polls woken operations (settling the
    /// futures of those that finished) and returns the rest as tuples:
    /// `(1, handler, data, reply)` for a request, `(2, callback)` for a
    /// callback to call.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let events = self.queue.take();
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let tuple = match event {
                Event::Poll { task, fut } => {
                    if let Some(result) = task.poll()
                        && let Err(e) = settle(py, fut.bind(py), result)
                    {
                        // Not the future asyncio made: report, go on.
                        e.display(py);
                    }
                    continue;
                }
                Event::Request {
                    handler,
                    payload,
                    reply,
                    caller,
                    service,
                    deadline,
                } => {
                    let raw = RawReply::new(reply, service.to_string(), caller, deadline);
                    let raw = Py::new(py, raw)?;
                    PyTuple::new(
                        py,
                        [
                            1i32.into_pyobject(py)?.into_any(),
                            handler.clone_ref(py).into_bound(py),
                            PyBytes::new(py, &payload).into_any(),
                            raw.into_bound(py).into_any(),
                        ],
                    )?
                }
                Event::Call { callback } => PyTuple::new(
                    py,
                    [
                        2i32.into_pyobject(py)?.into_any(),
                        callback.clone_ref(py).into_bound(py),
                    ],
                )?,
            };
            out.push(tuple);
        }
        Ok(out)
    }
}

fn outcome_to_py(py: Python<'_>, outcome: Outcome) -> PyResult<Py<PyAny>> {
    Ok(match outcome {
        Outcome::Bytes(b) | Outcome::MaybeBytes(Some(b)) => {
            PyBytes::new(py, &b).into_any().unbind()
        }
        Outcome::MaybeBytes(None) | Outcome::Unit => py.None(),
        Outcome::Answers(answers) => answers_to_py(py, answers)?,
        Outcome::Batch(batch) => {
            let items = batch.iter().map(|b| PyBytes::new(py, b));
            pyo3::types::PyList::new(py, items)?.into_any().unbind()
        }
        Outcome::Count(n) => n.into_pyobject(py)?.into_any().unbind(),
    })
}

/// A list of each call's answer (bytes) or error (an exception object).
pub(crate) fn answers_to_py(
    py: Python<'_>,
    answers: Vec<Result<Bytes, FfiError>>,
) -> PyResult<Py<PyAny>> {
    let items = answers.into_iter().map(|a| match a {
        Ok(b) => PyBytes::new(py, &b).into_any().unbind(),
        Err(e) => errors::to_py(py, &e).into_value(py).into_any(),
    });
    Ok(pyo3::types::PyList::new(py, items)?.into_any().unbind())
}

/// Settles the asyncio future `fut` with `result` (unless it is done
/// already: cancelled by its awaiter).
fn settle(py: Python<'_>, fut: &Bound<'_, PyAny>, result: OpResult) -> PyResult<()> {
    if fut.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    match result {
        Ok(outcome) => fut.call_method1("set_result", (outcome_to_py(py, outcome)?,))?,
        Err(e) => fut.call_method1("set_exception", (errors::to_py(py, &e).into_value(py),))?,
    };
    Ok(())
}

/// Starts `op` for the asyncio future `fut_py` on the loop's thread: polled
/// here at once (settling the future if it is already done), then whenever
/// it is woken, through `queue`. Returns it as the `RawTask` Python holds.
pub(crate) fn start<T, F>(
    py: Python<'_>,
    queue: &RawQueue,
    fut_py: Py<PyAny>,
    op: F,
    outcome: fn(T) -> Outcome,
) -> PyResult<RawTask>
where
    F: Future<Output = Result<T, FfiError>> + Send + 'static,
    T: Send + 'static,
{
    let fut_py = Arc::new(fut_py);
    let (q, f) = (queue.queue.clone(), fut_py.clone());
    let (task, first) = LocalTask::start(async move { op.await.map(outcome) }, move |task| {
        q.push(Event::Poll {
            task,
            fut: f.clone(),
        });
    });
    if let Some(result) = first {
        settle(py, fut_py.bind(py), result)?;
    }
    Ok(RawTask::new(task))
}

/// A `*_async` operation in progress.
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawTask {
    task: LocalTask<OpResult>,
}

impl RawTask {
    pub(crate) fn new(task: LocalTask<OpResult>) -> RawTask {
        RawTask { task }
    }
}

#[pymethods]
impl RawTask {
    /// Cancels it; its callback is then not called (unless already done).
    fn cancel(&self) {
        self.task.cancel();
    }

    /// Whether it has finished.
    #[getter]
    fn done(&self) -> bool {
        self.task.is_finished()
    }
}

/// Queues request `req` for `handler` (from a link thread).
pub(crate) fn request(queue: &Queue, handler: &Arc<Py<PyAny>>, req: FfiRequest, reply: Reply) {
    let (caller, service, deadline) = (req.caller().clone(), req.service().into(), req.deadline());
    queue.push(Event::Request {
        handler: handler.clone(),
        payload: req.into_payload(),
        reply,
        caller,
        service,
        deadline,
    });
}

/// Queues a call of `callback` (from any thread).
pub(crate) fn call_later(queue: &Arc<Queue>, callback: Arc<Py<PyAny>>) {
    queue.push(Event::Call { callback });
}

/// How a `serve_queued` handler answers: once, now or later, any thread.
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawReply {
    reply: Reply,
    service: String,
    caller: FfiCaller,
    deadline: Option<Deadline>,
}

impl RawReply {
    pub(crate) fn new(
        reply: Reply,
        service: String,
        caller: FfiCaller,
        deadline: Option<Deadline>,
    ) -> RawReply {
        RawReply {
            reply,
            service,
            caller,
            deadline,
        }
    }
}

#[pymethods]
impl RawReply {
    /// Seconds until the caller's deadline (None: it set none): what the
    /// handler's own calls inherit.
    #[getter]
    fn time_left(&self) -> Option<f64> {
        self.deadline.map(|d| d.remaining().as_secs_f64())
    }

    /// The request's `HandlerContext` (a new one each time).
    #[getter]
    fn context(&self) -> HandlerContext {
        HandlerContext::new(self.caller.clone(), self.deadline)
    }

    /// Answers with `data`; False if already answered or the caller gave up.
    fn ok(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        match payload(data, "the handler's return value") {
            Ok(b) => Ok(self.reply.ok(b)),
            Err(e) => Ok(self
                .reply
                .error(errors::from_py(data.py(), &e, &self.service))),
        }
    }

    /// Answers with the status code named `code` and `message`.
    fn error(&self, code: &str, message: &str) -> bool {
        self.reply.error(FfiError::from_code_name(code, message))
    }

    /// Answers with the status of exception `exc` (a `commy.CommyError`
    /// keeps its code; anything else is INTERNAL, traceback printed).
    fn fail(&self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> bool {
        let err = PyErr::from_value(exc.clone());
        self.reply.error(errors::from_py(py, &err, &self.service))
    }

    /// Whether it was answered (or cancelled).
    #[getter]
    fn answered(&self) -> bool {
        self.reply.is_answered()
    }

    /// Whether the caller gave up before an answer.
    #[getter]
    fn cancelled(&self) -> bool {
        self.reply.is_cancelled()
    }

    /// Calls `callback()` if the caller gives up first: queued on `queue`
    /// (run by its event loop) if given, else on a commy thread.
    #[pyo3(signature = (callback, queue=None))]
    fn on_cancel(&self, callback: Py<PyAny>, queue: Option<&RawQueue>) {
        match queue {
            Some(q) => {
                let (q, callback) = (q.queue.clone(), Arc::new(callback));
                self.reply.on_cancel(move || call_later(&q, callback));
            }
            None => self.reply.on_cancel(move || {
                with_python(|py| {
                    if let Err(e) = callback.call1(py, ()) {
                        e.display(py);
                    }
                });
            }),
        }
    }
}
