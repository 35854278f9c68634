//! Commy's facade crate: a mesh of named services.
//!
//! On one host, with no configuration file and no daemon, processes open a
//! [`Mesh`](crate) handle, serve named services and call them; bytes move
//! through commy-shm's lock-free rings. Instances on other hosts are reached
//! over TLS (commy-net) with the same API: set `listen` and `peers` (see
//! [`NetConfig`]) and the mesh picks the transport by itself.
#![forbid(unsafe_code)]
// The workspace routes atomics through commy-shm's loom-switchable `sync`
// module because that crate's lock-free algorithms are model-checked. This
// crate's atomics are counters and flags (stream ids, calls in flight,
// liveness, concurrency permits); where two of them pair up to hand a
// wake-up over (draining, permit waiters, a sleeping reader), both sides use
// SeqCst and the sleeper waits on a tokio `Notify` or a parked thread,
// which loom cannot model: stress tests with real threads cover them.
#![allow(clippy::disallowed_types)]

mod accept;
mod call;
mod config;
mod embed;
mod mesh;
mod net;
mod netconfig;
mod pubsub;
mod response;
mod serve;
mod sync;
mod wire;

pub use call::options::CallOptions;
pub use commy_core::{Code, Deadline, Metadata, Status};
pub use commy_discovery::{
    DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id,
};
pub use commy_shm::WaitInterrupter;
pub use config::{Config, MeshBuilder, ThreadHook, ThreadWork};
pub use embed::answers::{AnswerDriver, AnswerSink};
pub use embed::driven::{Drive, DrivenLink};
pub use mesh::{Mesh, OpenError};
pub use net::NetError;
pub use netconfig::{CONFIG_ENV, NetConfig, TransportPreference};
pub use pubsub::{Message, SlowSubscriber, SubscribeOptions, Subscription};
pub use response::Response;
pub use serve::polled::PolledRequest;
pub use serve::request::{Caller, RemoteCaller, Request};
pub use serve::responder::Responder;
pub use serve::service::ServiceHandle;
pub use wire::{INSTANCES_SERVICE, PUBLISH_SERVICE, SERVICE_HEADER};

/// The README's Rust quickstarts, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeQuickstart;
