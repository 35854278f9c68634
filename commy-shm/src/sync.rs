//! The one place raw atomics and `UnsafeCell` come from.
//!
//! Under `--cfg loom` these are loom's model-checked types, so the ring's
//! lock-free protocol is explored exhaustively by the loom tests; otherwise
//! they are the standard library's. Types that live in shared memory use the
//! standard types directly (loom types cannot be placed in a memfd), which is
//! why the ring keeps its control words behind [`RingCtl`](crate::ring) and
//! builds them from this module.
#![allow(clippy::disallowed_types)]

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

/// Spin-loop hint (a no-op under loom, which would otherwise see no progress).
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Atomics for memory that is really shared with another process: always the
/// standard library's (loom's types cannot live in a memfd).
pub(crate) mod shm {
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64};
}
