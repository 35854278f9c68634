//! `Caller` and `HandlerContext`: who sent a request, as Python handlers
//! that take a second parameter see it (`commy.Caller`,
//! `commy.HandlerContext`).

use commy_ffi::{Deadline, FfiCaller};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// Who sent a request, as its transport vouches for it: ``kind`` is
/// ``"local"`` (a process of this host, over shared memory: ``uid``,
/// ``gid`` and ``pid`` from the kernel) or ``"remote"`` (over TLS:
/// ``identity``, the SPIFFE ID of its client certificate or ``None``
/// without one, and ``addr``, ``"IP:PORT"``). The other fields are
/// ``None``. Immutable; equal when every field is.
#[pyclass(frozen, eq, hash, get_all, module = "commy", name = "Caller")]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct Caller {
    kind: String,
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<u32>,
    identity: Option<String>,
    addr: Option<String>,
}

#[pymethods]
impl Caller {
    /// A caller made by hand (to test a handler without a mesh).
    #[new]
    #[pyo3(signature = (kind, *, uid=None, gid=None, pid=None, identity=None, addr=None))]
    fn new(
        kind: String,
        uid: Option<u32>,
        gid: Option<u32>,
        pid: Option<u32>,
        identity: Option<String>,
        addr: Option<String>,
    ) -> Caller {
        Caller {
            kind,
            uid,
            gid,
            pid,
            identity,
            addr,
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        // Python's own repr of each field (quotes and escapes as Python writes them).
        let repr = |v: Bound<'_, PyAny>| -> PyResult<String> { Ok(v.repr()?.to_string()) };
        Ok(format!(
            "commy.Caller(kind={}, uid={}, gid={}, pid={}, identity={}, addr={})",
            repr(self.kind.as_str().into_pyobject(py)?.into_any())?,
            repr(self.uid.into_pyobject(py)?)?,
            repr(self.gid.into_pyobject(py)?)?,
            repr(self.pid.into_pyobject(py)?)?,
            repr(self.identity.as_deref().into_pyobject(py)?)?,
            repr(self.addr.as_deref().into_pyobject(py)?)?,
        ))
    }
}

impl From<&FfiCaller> for Caller {
    fn from(c: &FfiCaller) -> Caller {
        Caller {
            kind: c.kind().to_owned(),
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            identity: c.identity(),
            addr: c.addr().map(|a| a.to_string()),
        }
    }
}

/// What a handler that takes a second parameter gets with each request.
#[pyclass(frozen, module = "commy", name = "HandlerContext")]
pub(crate) struct HandlerContext {
    from: FfiCaller,
    /// Made from `from` on first use.
    caller: PyOnceLock<Py<Caller>>,
    /// When the caller stops waiting, if it set a deadline.
    deadline: Option<Deadline>,
}

impl HandlerContext {
    pub(crate) fn new(caller: FfiCaller, deadline: Option<Deadline>) -> HandlerContext {
        HandlerContext {
            from: caller,
            caller: PyOnceLock::new(),
            deadline,
        }
    }
}

#[pymethods]
impl HandlerContext {
    /// Who sent the request.
    #[getter]
    fn caller(&self, py: Python<'_>) -> PyResult<Py<Caller>> {
        self.caller
            .get_or_try_init(py, || Py::new(py, Caller::from(&self.from)))
            .map(|c| c.clone_ref(py))
    }

    /// Seconds until the caller stops waiting (None: it set no deadline).
    /// The handler's own calls are due by then at the latest.
    #[getter]
    fn time_left(&self) -> Option<f64> {
        self.deadline.map(|d| d.remaining().as_secs_f64())
    }

    fn __repr__(&self) -> String {
        format!("<commy.HandlerContext caller={}>", self.from.kind())
    }
}
