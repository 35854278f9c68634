//! Status codes to exceptions and back.
//!
//! The exception classes are defined in Python (`commy/_errors.py`, one
//! per status code); this module raises them by code name and reads the
//! code of one a handler raised.

use commy_ffi::FfiError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

/// `commy._errors.BY_CODE` and `commy._errors.CommyError`.
static CLASSES: PyOnceLock<(Py<PyDict>, Py<PyType>)> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&(Py<PyDict>, Py<PyType>)> {
    CLASSES.get_or_try_init(py, || {
        let m = py.import("commy._errors")?;
        let by_code = m.getattr("BY_CODE")?.cast_into::<PyDict>()?.unbind();
        let base = m.getattr("CommyError")?.cast_into::<PyType>()?.unbind();
        Ok((by_code, base))
    })
}

/// The exception for `e`: the class of its code, carrying its message.
pub(crate) fn to_py(py: Python<'_>, e: &FfiError) -> PyErr {
    let class = classes(py).and_then(|(by_code, _)| {
        by_code
            .bind(py)
            .get_item(e.code_name())?
            .ok_or_else(|| PyRuntimeError::new_err(format!("no exception for {}", e.code_name())))?
            .cast_into::<PyType>()
            .map_err(PyErr::from)
    });
    match class {
        Ok(cls) => PyErr::from_type(cls, (e.message().to_owned(),)),
        Err(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The status to answer a caller with when a handler of `service` raised
/// `err`: a `commy.CommyError` keeps its code and message; anything else is
/// INTERNAL, and its traceback is printed here, on the service's side.
pub(crate) fn from_py(py: Python<'_>, err: &PyErr, service: &str) -> FfiError {
    if let Ok((_, base)) = classes(py)
        && err.is_instance(py, base.bind(py))
    {
        let value = err.value(py);
        let code: Option<String> = value.getattr("code").and_then(|c| c.extract()).ok();
        let message: String = value
            .getattr("message")
            .and_then(|m| m.extract())
            .or_else(|_| value.str().map(|s| s.to_string()))
            .unwrap_or_default();
        return match code {
            Some(code) => FfiError::from_code_name(&code, message),
            None => FfiError::internal(message),
        };
    }
    err.display(py);
    let ty = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an exception".into());
    let msg = err
        .value(py)
        .str()
        .map(|s| s.to_string())
        .unwrap_or_default();
    FfiError::internal(format!("the handler of {service:?} raised {ty}: {msg}"))
}
