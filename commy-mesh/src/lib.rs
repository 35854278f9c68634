//! Commy's facade crate: a mesh of named services.
//!
//! On one host, with no configuration file and no daemon, processes open a
//! [`Mesh`](crate) handle, serve named services and call them; bytes move
//! through commy-shm's lock-free rings.
#![forbid(unsafe_code)]

mod discovery;

pub use discovery::{
    DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id,
};
