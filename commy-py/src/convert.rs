//! Arguments in, results out: payloads, timeouts, blocking waits.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use commy_ffi::{FfiError, Layer, SettingValue};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyMemoryView, PyString};

use crate::errors;

/// Threads commy started that are inside the interpreter right now, and
/// whether the interpreter is exiting (then no more may enter).
struct Entry {
    inside: usize,
    closed: bool,
}

static ENTRY: Mutex<Entry> = Mutex::new(Entry {
    inside: 0,
    closed: false,
});
static LEFT: Condvar = Condvar::new();

fn entry() -> MutexGuard<'static, Entry> {
    match ENTRY.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Runs `f` in the interpreter from one of commy's threads (a link thread,
/// a runtime worker), unless the interpreter is exiting: then `None`.
pub(crate) fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    {
        let mut e = entry();
        if e.closed {
            return None;
        }
        e.inside += 1;
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let mut e = entry();
            e.inside -= 1;
            if e.inside == 0 {
                LEFT.notify_all();
            }
        }
    }
    let _leave = Leave;
    Some(Python::attach(f))
}

/// Whether the interpreter is exiting (see [`close_entry`]).
fn entry_closed() -> bool {
    entry().closed
}

/// The link-thread hook of Python meshes: the thread is attached to the
/// interpreter once, for its whole life, and detached (GIL released) while
/// it works, so that each handler call only takes the GIL instead of making
/// and tearing down a thread state.
pub(crate) fn link_thread_hook() -> commy_ffi::ThreadHook {
    commy_ffi::ThreadHook::new(|work| {
        if entry_closed() {
            // The interpreter is going away: serve without it (handlers
            // answer UNAVAILABLE without entering it).
            work();
            return;
        }
        Python::attach(|py| {
            py.detach(|| {
                work();
                if entry_closed() {
                    // Leaving `detach` would take the GIL of an interpreter
                    // that is finalizing; the process is exiting anyway.
                    loop {
                        std::thread::park();
                    }
                }
            })
        });
    })
}

/// Called at interpreter exit, before it starts finalizing: keeps commy's
/// threads out from now on and waits (up to `patience`) for those inside
/// to leave, since a thread still running Python code when finalizing
/// starts is torn down mid-way.
pub(crate) fn close_entry(patience: Duration) {
    let mut e = entry();
    e.closed = true;
    let deadline = std::time::Instant::now() + patience;
    while e.inside > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        e = match LEFT.wait_timeout(e, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
}

/// A payload from any bytes-like object (bytes, bytearray, memoryview, ...).
pub(crate) fn payload(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Bytes> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be bytes-like, not str (encode it first, e.g. s.encode())"
        )));
    }
    let view = PyMemoryView::from(obj).map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{what} must be bytes-like (bytes, bytearray, memoryview), not {ty}"
        ))
    })?;
    let bytes = obj.py().get_type::<PyBytes>().call1((view,))?;
    let bytes = bytes.cast::<PyBytes>()?;
    Ok(Bytes::copy_from_slice(bytes.as_bytes()))
}

/// A hash key: a str (as UTF-8) or a bytes-like object.
pub(crate) fn key(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Bytes> {
    if let Ok(s) = obj.cast::<PyString>() {
        let text: String = s.extract()?;
        return Ok(Bytes::from(text));
    }
    payload(obj, what)
}

/// The bytes of each item of an iterable of bytes-like objects (`what`
/// and the item's index name a bad one).
pub(crate) fn payloads(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Bytes>> {
    if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an iterable of bytes-like objects, not a single one"
        )));
    }
    let items = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!("{what} must be an iterable of bytes-like objects"))
    })?;
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    for (i, item) in items.enumerate() {
        out.push(payload(&item?, &format!("{what}[{i}]"))?);
    }
    Ok(out)
}

/// A duration in seconds from Python (`None` passes through).
pub(crate) fn seconds(py: Python<'_>, t: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s).map(Some).map_err(|_| {
            errors::to_py(
                py,
                &FfiError::invalid_argument(format!(
                    "{what} must be a finite number of seconds >= 0, not {s}"
                )),
            )
        }),
    }
}

/// The settings a Python program passed as keyword arguments, by key, as
/// the layer named `Python options`: `None` leaves a key unset; strings,
/// paths, numbers (durations in seconds), booleans and lists of strings are
/// taken as they are, and the settings check keys and values when the mesh
/// opens.
pub(crate) fn settings_layer(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Layer> {
    let mut layer = Layer::new("Python options");
    let Some(settings) = settings else {
        return Ok(layer);
    };
    for (key, value) in settings.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        let value = if let Ok(b) = value.cast::<PyBool>() {
            SettingValue::Bool(b.is_true())
        } else if let Ok(n) = value.extract::<i64>() {
            SettingValue::Int(n)
        } else if let Ok(f) = value.extract::<f64>() {
            SettingValue::Float(f)
        } else if let Ok(p) = value.extract::<PathBuf>() {
            SettingValue::Text(p.to_string_lossy().into_owned())
        } else if let Ok(list) = value.extract::<Vec<String>>() {
            SettingValue::List(list)
        } else {
            return Err(PyTypeError::new_err(format!(
                "setting {key}: a {} is not a setting value (str, path, number, bool or list of str)",
                value.get_type().name()?
            )));
        };
        layer.set(&key, value);
    }
    Ok(layer)
}

/// Ctrl-C and other signal handlers, run while a blocking call waits.
fn check_signals() -> PyResult<()> {
    Python::attach(|py| py.check_signals())
}

/// Waits for `fut` with the GIL released, interruptible by signals.
pub(crate) fn wait<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = Result<T, FfiError>> + Send,
    T: Send,
{
    let outcome = py.detach(|| commy_ffi::block_on(fut, check_signals));
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(errors::to_py(py, &e)),
        Err(interrupted) => Err(interrupted),
    }
}
