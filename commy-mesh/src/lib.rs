//! Commy's facade crate: a mesh of named services.
//!
//! On one host, with no configuration file and no daemon, processes open a
//! [`Mesh`] handle, serve named services and call them; bytes move
//! through commy-shm's lock-free rings. Instances on other hosts are reached
//! over TLS (commy-net) with the same API: set `listen` and `peers` (see
//! [`NetConfig`]) and the mesh picks the transport by itself.
//!
//! The common types are at the crate root; the themed modules hold the rest:
//!
//! - [`call`]: calling services ([`CallOptions`], [`Response`]);
//! - [`service`]: serving them ([`Request`], its [`Caller`], [`Responder`],
//!   [`ServiceHandle`]);
//! - [`pubsub`]: topics, subscriptions and queue groups;
//! - [`region`]: named shared-memory regions;
//! - [`discovery`]: discovery sources and balancer strategies;
//! - [`policy`]: the call and serve policy slots (balancing, retry,
//!   authorization plug in there).
//!
//! docs/ARCHITECTURE.md in the repository follows one call through the
//! modules, file by file.
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
pub mod call;
mod config;
pub mod discovery;
#[doc(hidden)]
pub mod embed;
mod mesh;
mod net;
pub mod policy;
pub mod pubsub;
pub mod region;
mod response;
mod serve;
pub mod service;
mod sync;
mod warn;
mod wire;

pub use call::CallOptions;
pub use commy_config::{CONFIG_ENV, NetConfig, TransportPreference};
/// The settings by key, layered from the defaults, the config file, the
/// environment and the code, each knowing where it came from (the crate
/// behind it is commy-config).
pub mod settings {
    pub use commy_config::{
        Explained, KEYS, KeyKind, Layer, Loaded, SettingValue, Settings, Source, env_var,
        format_duration, key_kind, parse_duration,
    };
}
pub use commy_core::{Code, Deadline, MeshName, Metadata, NameError, Status};
pub use commy_shm::{LinkConfig, WaitStrategy};
pub use config::{Config, MeshBuilder};
pub use mesh::{Mesh, OpenError, Publisher};
pub use net::NetError;
pub use pubsub::{
    Message, MessageRef, SlowSubscriber, SubscribeOptions, Subscription, SubscriptionHealth,
};
pub use response::Response;
pub use service::{Caller, RemoteCaller, Request, Responder, ServiceHandle};

/// The README's Rust quickstarts, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeQuickstart;
