//! Commy's shared-memory transport.
//!
//! This is the only crate of Commy that contains `unsafe` code; every block
//! carries a `// SAFETY:` comment. Everything read from shared memory is
//! treated as untrusted input: a peer that scribbles over a segment turns the
//! link into an error, never into undefined behaviour, a panic or a hang.
// This crate owns the `sync` module that the workspace's clippy policy points
// everyone else to; inside it, atomics are reached through `crate::sync`
// (loom-switchable) or `crate::sync::shm` (really shared memory). Clippy sees
// through re-exports, so the type ban cannot apply here.
#![allow(clippy::disallowed_types)]
// Under loom only the ring and its wait protocol are modelled; the
// cross-process parts are compiled out, leaving some helpers unused.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

#[cfg(not(loom))]
pub mod link;
#[cfg(not(loom))]
mod monitor;
mod region;
pub mod ring;
mod runtime_dir;
mod segment;
mod sync;
#[cfg(all(feature = "testing", not(loom)))]
pub mod testing;
pub mod uds;
mod wait;

#[cfg(not(loom))]
pub use link::{LinkAborter, LinkConfig, LinkReceiver, LinkSender, Message, ShmLink, ShmListener};
#[cfg(not(loom))]
pub use region::{
    REGION_LAYOUT_VERSION, REGION_MAGIC, REGION_MAX_SIZE, REGION_NAME_MAX, Region,
    RegionAccessError, RegionDirError, RegionHeaderError, RegionNameError, RegionOpenError,
    RegionOptions, RegionRemoveError, SweepError, SweepReport, default_region_dir, sweep_regions,
    validate_region_name,
};
pub use ring::{Consumer, DiscardCounter, Producer, RingError, WaitInterrupter};
pub use segment::{
    SEGMENT_HEADER_LEN, SEGMENT_LAYOUT_VERSION, SEGMENT_MAGIC, SEGMENT_MAX_DATA_LEN, Segment,
    SegmentError,
};
pub use wait::{RECHECK_INTERVAL, WaitStrategy};
// The socket layer's error types stay under `uds::` (the link has its own).
pub use runtime_dir::{RUNTIME_DIR_ENV, RuntimeDir, RuntimeDirError};
pub use uds::{
    MAX_FDS_PER_MESSAGE, MAX_SOCKET_PATH_LEN, PeerCred, PeerPolicy, PeerRejected, RemoveStaleError,
    UdsListener, UdsStream, remove_stale_socket,
};
