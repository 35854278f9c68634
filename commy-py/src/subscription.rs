//! `RawSubscription`: blocking and callback `next`, `close` from anywhere.

use commy_ffi::{FfiError, FfiSubscription};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::aio::{self, Outcome, RawQueue, RawTask};
use crate::convert::{seconds, wait};

/// `receive`, failing with `DEADLINE_EXCEEDED` if nothing came within
/// `timeout` (if any).
async fn within<T>(
    timeout: Option<std::time::Duration>,
    receive: impl std::future::Future<Output = T>,
) -> Result<T, FfiError> {
    match timeout {
        None => Ok(receive.await),
        Some(t) => tokio::time::timeout(t, receive).await.map_err(|_| {
            FfiError::from_code_name("DEADLINE_EXCEEDED", format!("no message within {t:?}"))
        }),
    }
}

/// A subscription (see `commy.Subscription`).
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawSubscription {
    sub: FfiSubscription,
}

impl RawSubscription {
    pub(crate) fn new(sub: FfiSubscription) -> RawSubscription {
        RawSubscription { sub }
    }
}

#[pymethods]
impl RawSubscription {
    /// The topic.
    #[getter]
    fn topic(&self) -> &str {
        self.sub.topic()
    }

    /// The queue group, if any.
    #[getter]
    fn group(&self) -> Option<&str> {
        self.sub.group()
    }

    /// Whether it was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.sub.is_closed()
    }

    /// Messages dropped because this subscriber fell behind.
    #[getter]
    fn dropped(&self) -> u64 {
        self.sub.dropped()
    }

    /// Why the mesh ended the subscription (a `commy.CommyError`), or None.
    #[getter]
    fn end_reason(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let reason = self.sub.end_reason()?;
        Some(crate::errors::to_py(py, &reason).into_value(py).into_any())
    }

    /// The next message's data, blocking (GIL released, Ctrl-C
    /// interrupts); None once closed. Raises `commy.DeadlineExceeded` if
    /// `timeout` seconds pass first.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyBytes>>> {
        let timeout = seconds(py, timeout, "timeout")?;
        let got = wait(py, within(timeout, self.sub.next()))?;
        Ok(got.map(|m| PyBytes::new(py, m.payload()).unbind()))
    }

    /// The data of the next message and of up to `max - 1` more that have
    /// come, blocking for the first (GIL released, Ctrl-C interrupts); an
    /// empty list once closed. Raises `commy.DeadlineExceeded` if
    /// `timeout` seconds pass first.
    #[pyo3(signature = (max, timeout=None))]
    fn next_batch(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Py<PyBytes>>> {
        let timeout = seconds(py, timeout, "timeout")?;
        let got = wait(py, within(timeout, self.sub.next_batch(max)))?;
        Ok(got
            .iter()
            .map(|m| PyBytes::new(py, m.payload()).unbind())
            .collect())
    }

    /// `next_batch` for an event loop: settles `fut` with a list of data
    /// (empty once closed).
    fn next_batch_async(
        &self,
        py: Python<'_>,
        max: usize,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let next = self.sub.next_batch(max);
        let next = async move { Ok(next.await.into_iter().map(|m| m.into_payload()).collect()) };
        aio::start(py, queue, fut, next, Outcome::Batch)
    }

    /// A queued message's data, without waiting; None when none is queued
    /// (or the subscription is closed).
    fn try_next(&self, py: Python<'_>) -> Option<Py<PyBytes>> {
        self.sub
            .try_next()
            .map(|m| PyBytes::new(py, m.payload()).unbind())
    }

    /// `next` for an event loop (see `RawMesh.call_async`): settles `fut`
    /// with the data, or None once closed.
    fn next_async(&self, py: Python<'_>, queue: &RawQueue, fut: Py<PyAny>) -> PyResult<RawTask> {
        let next = self.sub.next();
        let next = async move { Ok(next.await.map(|m| m.into_payload())) };
        aio::start(py, queue, fut, next, Outcome::MaybeBytes)
    }

    /// Ends the subscription; a waiting `next` returns None.
    fn close(&self) {
        self.sub.close();
    }
}
