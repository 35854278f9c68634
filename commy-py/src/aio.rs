//! The bridge to an asyncio event loop: a queue of events that commy's
//! threads fill without entering the interpreter, and one file descriptor
//! that becomes readable when the queue gets work.
//!
//! The loop watches the descriptor (`loop.add_reader`) and drains the queue
//! in one go on its own thread: finished operations settle their futures,
//! requests go to their handlers. No commy thread ever waits for the GIL
//! (which, with the loop busy running Python code, can take a whole switch
//! interval per hand-off), and a burst of completions costs one wake-up.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use commy_ffi::{FfiError, FfiTask, Reply};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors;
use crate::mesh::RawReply;

/// The result of an operation, converted to Python on the loop's thread.
pub(crate) enum Outcome {
    Bytes(Bytes),
    MaybeBytes(Option<Bytes>),
    Count(usize),
    Unit,
}

enum Event {
    /// An operation finished: settle `fut` with it.
    Done {
        fut: Py<PyAny>,
        result: Result<Outcome, FfiError>,
    },
    /// A request for `handler`.
    Request {
        handler: Arc<Py<PyAny>>,
        payload: Bytes,
        reply: Reply,
        service: Arc<str>,
    },
    /// Call `callback()` (a handler's caller gave up).
    Call { callback: Arc<Py<PyAny>> },
}

struct State {
    events: Vec<Event>,
    /// A wake-up byte is on its way (no need to send another).
    woken: bool,
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
                }),
                wake_tx,
                wake_rx,
            }),
        })
    }

    /// The descriptor that becomes readable when events wait.
    fn fileno(&self) -> i32 {
        self.queue.wake_rx.as_raw_fd()
    }

    /// Takes every waiting event, as tuples: `(0, future, value, exception)`
    /// for a finished operation, `(1, handler, data, reply)` for a request,
    /// `(2, callback)` for a callback to call.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let events = self.queue.take();
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let tuple = match event {
                Event::Done { fut, result } => {
                    let (value, exc) = match result {
                        Ok(outcome) => (outcome_to_py(py, outcome)?, py.None()),
                        Err(e) => (py.None(), errors::to_py(py, &e).into_value(py).into_any()),
                    };
                    PyTuple::new(
                        py,
                        [
                            0i32.into_pyobject(py)?.into_any(),
                            fut.into_bound(py),
                            value.into_bound(py),
                            exc.into_bound(py),
                        ],
                    )?
                }
                Event::Request {
                    handler,
                    payload,
                    reply,
                    service,
                } => {
                    let raw = Py::new(py, RawReply::new(reply, service.to_string()))?;
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
        Outcome::Count(n) => n.into_pyobject(py)?.into_any().unbind(),
    })
}

/// Runs `fut` on commy's runtime and queues its outcome for `fut_py`.
pub(crate) fn spawn<T, F>(
    queue: &RawQueue,
    fut_py: Py<PyAny>,
    fut: F,
    outcome: fn(T) -> Outcome,
) -> FfiTask
where
    F: Future<Output = Result<T, FfiError>> + Send + 'static,
    T: Send + 'static,
{
    let queue = queue.queue.clone();
    commy_ffi::spawn_with(fut, move |result| {
        queue.push(Event::Done {
            fut: fut_py,
            result: result.map(outcome),
        });
    })
}

/// Queues a request for `handler` (from a link thread).
pub(crate) fn request(
    queue: &Queue,
    handler: &Arc<Py<PyAny>>,
    payload: Bytes,
    reply: Reply,
    service: &Arc<str>,
) {
    queue.push(Event::Request {
        handler: handler.clone(),
        payload,
        reply,
        service: service.clone(),
    });
}

/// Queues a call of `callback` (from any thread).
pub(crate) fn call_later(queue: &Arc<Queue>, callback: Arc<Py<PyAny>>) {
    queue.push(Event::Call { callback });
}
