//! The seam between the mesh and its sources of instances.
//!
//! A source answers two questions about a service: which instances it
//! knows now ([`Discover::instances`]) and, as a stream, every change of
//! that set ([`Discover::watch`]): the current set first, then the whole new
//! set after each change. The mesh keeps one pool per service and feeds it
//! from every source; the per-call path never touches a source.
//!
//! ```
//! use commy_core::{MeshName, ServiceName};
//! use commy_discovery::{Discover, LocalRegistry};
//! use commy_shm::RuntimeDir;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("commy-discover-doc-{}", std::process::id()));
//! let source: Box<dyn Discover> =
//!     Box::new(LocalRegistry::new(RuntimeDir::at(&dir)?, &MeshName::default())?);
//! assert_eq!(source.name(), "local");
//! assert!(source.instances(&ServiceName::new("billing")?)?.is_empty());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;

use commy_core::ServiceName;
use futures_core::Stream;

use crate::local::{DiscoveryError, Instance, LocalRegistry};

/// A stream of a service's instance sets: the current set first, then the
/// whole set again after every change. It ends when the source fails for
/// good (the last set it gave stays the best known).
pub type InstanceStream = Pin<Box<dyn Stream<Item = Vec<Instance>> + Send>>;

/// A source of service instances (this host's runtime dir; DNS and etcd
/// later).
pub trait Discover: Send + Sync + 'static {
    /// A short name for logs and listings (`local`, `dns`, `etcd`).
    fn name(&self) -> &'static str;

    /// The instances of `service` known now.
    fn instances(&self, service: &ServiceName) -> Result<Vec<Instance>, DiscoveryError>;

    /// Watches the instances of `service`. Needs a tokio runtime with I/O
    /// enabled when the source does I/O.
    fn watch(&self, service: &ServiceName) -> Result<InstanceStream, DiscoveryError>;
}

impl Discover for LocalRegistry {
    fn name(&self) -> &'static str {
        "local"
    }

    fn instances(&self, service: &ServiceName) -> Result<Vec<Instance>, DiscoveryError> {
        LocalRegistry::instances(self, service)
    }

    fn watch(&self, service: &ServiceName) -> Result<InstanceStream, DiscoveryError> {
        Ok(Box::pin(LocalRegistry::watch(self, service)?))
    }
}
