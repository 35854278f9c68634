//! Commy's facade crate: a mesh of named services.
//!
//! On one host, with no configuration file and no daemon, processes open a
//! [`Mesh`](crate) handle, serve named services and call them; bytes move
//! through commy-shm's lock-free rings.
#![forbid(unsafe_code)]
// The workspace routes atomics through commy-shm's loom-switchable `sync`
// module because that crate's lock-free algorithms are model-checked. This
// crate has no lock-free algorithm: its atomics are independent counters and
// flags (stream ids, calls in flight, liveness), nothing loom would check.
#![allow(clippy::disallowed_types)]

mod conn;
mod discovery;
mod mesh;
mod pubsub;
mod service;

pub use commy_core::{Code, Deadline, Metadata, Status};
pub use discovery::{DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id};
pub use mesh::{
    CallOptions, Config, Mesh, MeshBuilder, OpenError, ServiceHandle, ThreadHook, ThreadWork,
};
pub use pubsub::{Message, SlowSubscriber, SubscribeOptions, Subscription};
pub use service::{Request, Response};

/// The README's Rust quickstarts, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeQuickstart;
