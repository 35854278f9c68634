//! `RawRegion`: a shared region and what Python needs to map it.

use std::os::fd::IntoRawFd;

use commy_ffi::FfiRegion;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::payload;
use crate::errors;

/// An open region (see `commy.Region`, which maps it with `mmap`).
#[pyclass(frozen, module = "commy._commy")]
pub(crate) struct RawRegion {
    region: FfiRegion,
}

impl RawRegion {
    pub(crate) fn new(region: FfiRegion) -> RawRegion {
        RawRegion { region }
    }
}

#[pymethods]
impl RawRegion {
    /// The region's name.
    #[getter]
    fn name(&self) -> &str {
        self.region.name()
    }

    /// Size of the data in bytes.
    #[getter]
    fn size(&self) -> usize {
        self.region.len()
    }

    /// Where the data starts in the region's file.
    #[getter]
    fn data_offset(&self) -> usize {
        self.region.data_offset()
    }

    /// How many holders have it open.
    #[getter]
    fn refcount(&self) -> u64 {
        self.region.refcount()
    }

    /// The region file's path.
    #[getter]
    fn path(&self) -> String {
        self.region.path().display().to_string()
    }

    /// A new read-write descriptor of the region's file; the caller closes it.
    fn dup_fd(&self, py: Python<'_>) -> PyResult<i32> {
        self.region
            .dup_fd()
            .map(IntoRawFd::into_raw_fd)
            .map_err(|e| errors::to_py(py, &e))
    }

    /// A consistent copy of `length` bytes at `offset`.
    fn read(&self, py: Python<'_>, offset: usize, length: usize) -> PyResult<Py<PyBytes>> {
        let data = py
            .detach(|| self.region.read_at(offset, length))
            .map_err(|e| errors::to_py(py, &e))?;
        Ok(PyBytes::new(py, &data).unbind())
    }

    /// Writes `data` at `offset` under the region's writer lock.
    fn write(&self, py: Python<'_>, offset: usize, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = payload(data, "data")?;
        py.detach(|| self.region.write_at(offset, &data))
            .map_err(|e| errors::to_py(py, &e))
    }
}
