//! `RawPublisher`: a publisher of one topic (see `commy.Publisher`).

use commy_ffi::FfiPublisher;
use pyo3::prelude::*;

use crate::aio::{self, Outcome, RawQueue, RawTask};
use crate::convert::{payload, payloads, wait};

/// A publisher of one topic (see `commy.Publisher` for the documented API).
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawPublisher {
    publisher: FfiPublisher,
}

impl RawPublisher {
    pub(crate) fn new(publisher: FfiPublisher) -> RawPublisher {
        RawPublisher { publisher }
    }
}

#[pymethods]
impl RawPublisher {
    /// The topic it publishes on.
    #[getter]
    fn topic(&self) -> &str {
        self.publisher.topic()
    }

    /// Publishes, blocking; returns the number of deliveries.
    fn publish(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let data = payload(data, "data")?;
        wait(py, self.publisher.publish(data))
    }

    /// Publishes each of `data` (an iterable of bytes-like objects) in
    /// order, blocking; returns the number of deliveries.
    fn publish_many(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let data = payloads(data, "data")?;
        wait(py, self.publisher.publish_many(data))
    }

    /// `publish` for an event loop: settles `fut` with the deliveries.
    fn publish_async(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let data = payload(data, "data")?;
        let publish = self.publisher.publish(data);
        aio::start(py, queue, fut, publish, Outcome::Count)
    }

    /// `publish_many` for an event loop: settles `fut` with the
    /// deliveries.
    fn publish_many_async(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        queue: &RawQueue,
        fut: Py<PyAny>,
    ) -> PyResult<RawTask> {
        let data = payloads(data, "data")?;
        let publish = self.publisher.publish_many(data);
        aio::start(py, queue, fut, publish, Outcome::Count)
    }
}
