//! Where the instances of a service are: the discovery sources a mesh's
//! pools are fed from ([`Discover`]; this host's runtime directory is
//! [`LocalRegistry`]) and the balancer strategies that pick one
//! ([`PowerOfTwo`], [`RoundRobin`]). The crate behind it is
//! commy-discovery.

pub use commy_core::{HostId, InstanceId};
pub use commy_discovery::{
    Discover, DiscoveryError, HOST_ID_ENV, Instance, InstanceStream, InstanceWatch, LocalRegistry,
    PowerOfTwo, Register, Registration, RoundRobin, host_id,
};
