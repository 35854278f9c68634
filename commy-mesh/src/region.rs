//! Named shared-memory regions of a mesh ([`Mesh::region`](crate::Mesh::region)):
//! a sized block of shared memory with an open policy, a time to live and
//! a reference count, read consistently with a seqlock. See
//! [`RegionOptions`] for the details.

pub use commy_shm::{
    Region, RegionAccessError, RegionNameError, RegionOpenError, RegionOptions, RegionRemoveError,
};
