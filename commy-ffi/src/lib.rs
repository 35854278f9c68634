//! Commy's binding-neutral layer: what the Python (pyo3) and Node (napi-rs)
//! SDKs are thin over. No `extern "C"` and `forbid(unsafe_code)`: bindings call it as
//! a Rust library and only translate types.
//!
//! - [`runtime`]: one tokio runtime per process, started on first use.
//! - [`block_on`]: run a future to completion from any thread, with an
//!   interrupt check every [`CHECK_INTERVAL`] (Ctrl-C in Python);
//!   [`spawn_with`]: run one on the runtime and get a callback when it is
//!   done (event loops: asyncio, Node); [`run_inline`]: the same without a
//!   runtime task, polled on the calling and then the waking thread;
//!   [`LocalTask`]: drive one on the binding's own thread, woken through a
//!   callback.
//! - [`FfiMesh`]: open / call / send / publish / serve / subscribe /
//!   region / close. Handlers are callbacks `(FfiRequest, Reply)`; the
//!   [`Reply`] is answered now or later, from any thread, and tells the
//!   handler when the caller gives up ([`Reply::on_cancel`]).
//!   [`FfiRequest::caller`] says who sent the request ([`FfiCaller`]).
//! - [`FfiPublisher`]: `publish` / `publish_many` on one topic.
//! - [`FfiSubscription`]: `next` / `close` (which ends a waiting `next`).
//! - [`FfiRegion`]: a shared region, with a descriptor and data offset for
//!   zero-copy mappings on the binding's side.
//! - [`FfiError`]: every failure as a stable status code name
//!   (`"NOT_FOUND"`, `"UNAVAILABLE"`, ...) and a message.
//!
//! ```
//! use bytes::Bytes;
//! use commy_ffi::{FfiMesh, MeshOptions, spawn_with};
//!
//! # let dir = std::env::temp_dir().join(format!("commy-ffi-lib-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! # let mut options = MeshOptions::default();
//! # options.settings.set("runtime_dir", dir.clone().to_str().unwrap());
//! let mesh = FfiMesh::open(options)?;
//! let _svc = mesh.serve("upper", |req, reply| {
//!     reply.ok(req.payload().to_ascii_uppercase().into());
//! })?;
//!
//! // How an event-loop binding calls: the callback runs on a runtime thread.
//! let (tx, rx) = std::sync::mpsc::channel();
//! spawn_with(mesh.call("upper", Bytes::from_static(b"hi"), None), move |r| {
//!     let _ = tx.send(r);
//! });
//! assert_eq!(&rx.recv()??[..], b"HI");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod caller;
mod error;
mod mesh;
mod region;
mod runtime;
mod subscription;

pub use caller::FfiCaller;
pub use error::{FfiError, error_code_names};
pub use mesh::{
    FfiCallOptions, FfiEndpoint, FfiMesh, FfiPublisher, FfiRequest, FfiService, MeshOptions, Reply,
    SubscribeParams,
};
pub use region::{FfiRegion, OpenPolicy, RegionOptions};
pub use runtime::{CHECK_INTERVAL, FfiTask, LocalTask, block_on, run_inline, runtime, spawn_with};
pub use subscription::{FfiMessage, FfiSubscription};

pub use commy_mesh::embed::{
    AnswerDriver, Drive, DrivenLink, PolledRequest, ThreadHook, WaitInterrupter,
};
pub use commy_mesh::settings::{KEYS, KeyKind, Layer, SettingValue, key_kind};
pub use commy_mesh::{Caller, Deadline, WaitStrategy};
