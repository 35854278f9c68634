//! `commy._commy`: the native half of the `commy` Python package.
//!
//! Thin over commy-ffi: each class wraps one commy-ffi handle, blocking
//! methods release the GIL while they wait (and check for Ctrl-C every
//! 50 ms), `*_async` methods run on commy's runtime and report to a
//! callback, which the package's asyncio layer points at its event loop.
//! The Python API users see (`commy.Mesh`, `commy.AsyncMesh`, the
//! exceptions) lives in `python/commy/__init__.py`; this module is private.
#![forbid(unsafe_code)]

mod aio;
mod caller;
mod convert;
mod errors;
mod mesh;
mod publisher;
mod region;
mod subscription;

use pyo3::prelude::*;

/// Commy's native module (private: use the `commy` package).
#[pymodule]
mod _commy {
    #[pymodule_export]
    use crate::aio::{RawQueue, RawReply, RawTask};
    #[pymodule_export]
    use crate::caller::{Caller, HandlerContext};
    #[pymodule_export]
    use crate::mesh::{RawMesh, RawService};
    #[pymodule_export]
    use crate::publisher::RawPublisher;
    #[pymodule_export]
    use crate::region::RawRegion;
    #[pymodule_export]
    use crate::subscription::RawSubscription;

    use pyo3::prelude::*;

    /// Every status code name that maps to an exception class (all but OK).
    #[pyfunction]
    fn error_code_names() -> Vec<&'static str> {
        commy_ffi::error_code_names()
    }

    /// Called at interpreter exit: from now on, requests answer UNAVAILABLE
    /// without entering the interpreter, which is going away; waits up to
    /// `patience` seconds for commy's threads running Python code to finish.
    #[pyfunction]
    #[pyo3(signature = (patience=5.0))]
    fn _at_exit(py: Python<'_>, patience: f64) {
        let patience = std::time::Duration::try_from_secs_f64(patience).unwrap_or_default();
        py.detach(|| crate::convert::close_entry(patience));
    }

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
