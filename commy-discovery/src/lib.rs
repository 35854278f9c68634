//! Mesh discovery and balancing: where the instances of a service are, and
//! which of them a call goes to.
//!
//! Today: local discovery, [`LocalRegistry`], which finds the instances of
//! this host in the runtime directory with no daemon and no configuration.
#![forbid(unsafe_code)]

mod local;

pub use local::{DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id};
