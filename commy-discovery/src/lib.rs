//! Mesh discovery and balancing: where the instances of a service are, and
//! which of them a call goes to.
//!
//! - [`Discover`]: a source of instance sets per service (a snapshot, and a
//!   stream of changes boxed once per watch, never per call). The local
//!   source, [`LocalRegistry`], finds the instances of this host in the
//!   runtime directory with no daemon and no configuration.
//! - [`Register`]: where a process announces the instances it serves over
//!   TLS for other hosts (etcd, a catalog of the user's own); the
//!   [`Registration`] it returns withdraws the instance when dropped.
//! - The balancer strategies are sans-IO state, driven by whoever holds the
//!   candidates and their loads: [`PowerOfTwo`] (the less loaded of two
//!   random choices), [`RoundRobin`] and [`Maglev`] (consistent hashing on
//!   a key), with [`PeakEwma`] as a load (round-trip time times calls in
//!   flight), [`RetryBudget`], which bounds retries, and [`Outlier`],
//!   which ejects an endpoint that keeps failing. A pick allocates nothing
//!   and takes no lock.
//!
//! ```
//! use commy_discovery::{PowerOfTwo, RoundRobin};
//!
//! let loads = [3_u64, 0, 7];
//! let p2c = PowerOfTwo::new();
//! let i = p2c.pick(loads.len(), |i| loads[i]).unwrap();
//! assert_ne!(i, 2, "never the most loaded of three");
//!
//! let rr = RoundRobin::new();
//! let order: Vec<_> = (0..4).map(|_| rr.pick(3).unwrap()).collect();
//! assert_eq!(order, [0, 1, 2, 0]);
//! ```
#![forbid(unsafe_code)]
// The balancers' counters are atomics from std: they only spread choices
// (no memory is published through them), so loom has nothing to model.
#![allow(clippy::disallowed_types)]

mod balance;
mod budget;
mod discover;
mod ewma;
mod local;
mod maglev;
mod outlier;
mod register;

pub use balance::{PowerOfTwo, RoundRobin};
pub use budget::RetryBudget;
pub use discover::{Discover, InstanceStream};
pub use ewma::PeakEwma;
pub use local::{DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id};
pub use maglev::{MAGLEV_TABLE_SIZE, Maglev};
pub use outlier::{Admit, Outlier, OutlierConfig, Standing, may_eject, panics};
pub use register::{Register, Registration};
