//! The lock-free single-producer single-consumer ring of variable-length records.
//!
//! Records are 8-byte aligned: an 8-byte header (`len: u32`, `type: u8`,
//! `tag: u8`, two zero bytes) followed by `len` payload bytes and padding to
//! the next multiple of 8. A record never wraps: when it does not fit before
//! the end of the buffer, a padding record fills the rest and the record
//! starts again at offset 0.
//!
//! The consumer discovers records by their headers, so a message crosses
//! between cores as its own cache lines and nothing else: before publishing
//! a record, the producer zeroes the header slot that follows it, then
//! stores the record's header with Release; a zero header means "nothing
//! yet". The consumer's head (a monotonic byte position on a cache line of
//! its own) tells the producer which space is free; the producer re-reads it
//! only when its cached copy says the ring is full.
//!
//! Sending is zero-copy by default: [`Producer::reserve`] lends out the bytes
//! of the next record in place ([`Loan<Uninit>`](Loan)); once written
//! ([`Loan::fill`] or [`Loan::assume_init`]) the loan becomes a
//! [`Loan<Init>`](Loan), the only state that can be [`commit`](Loan::commit)ted
//! or [`stage`](Loan::stage)d. Staged records are published together by
//! [`Producer::publish`] (batched commit). Receiving lends out a
//! [`Received`] record in place; dropping it releases the space.
//! [`Consumer::recv_batch`] hands out every available record and releases
//! them with a single store.
//!
//! The peer is untrusted: every index and length read from shared memory is
//! validated before use. A corrupt ring yields [`RingError::Corrupt`] on this
//! side, never an out-of-bounds access, a panic or an endless loop.
//!
//! ```
//! use commy_shm::ring;
//!
//! let (mut tx, mut rx) = ring::pair(4096)?;
//! tx.reserve(5)?.fill(b"hello").commit();
//! let msg = rx.try_recv()?.expect("a record");
//! assert_eq!(&*msg, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::wait::{self, WaitStrategy, Waited, WakeWords};

/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 8;
/// The most cache lines of a record [`RingMem::prefetch`] asks for ahead.
const PREFETCH_LINES: usize = 16;
/// The smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 64;
/// The largest ring capacity accepted (4 GiB: record lengths are 32-bit).
pub const MAX_CAPACITY: usize = 1 << 32;

const TYPE_MSG: u64 = 1;
const TYPE_PAD: u64 = 2;

/// Closed-flag bits in the control block.
const PRODUCER_CLOSED: u32 = 1;
const CONSUMER_CLOSED: u32 = 2;

#[inline]
const fn record_len(payload: usize) -> usize {
    (RECORD_HEADER_LEN + payload + 7) & !7
}

/// One cache-line pair (128 bytes: also keeps the adjacent-line prefetcher
/// from coupling the two sides).
#[repr(C, align(128))]
struct Line<T>(T);

/// The control block of one ring. In a real link it lives at the start of the
/// segment's data area (so it is built from std atomics there; under loom it
/// is a heap object built from loom's atomics).
#[repr(C)]
pub(crate) struct RingCtl {
    /// Written by the producer only: bytes ever published.
    tail: Line<AtomicU64>,
    /// Written by the consumer only: bytes ever released.
    head: Line<AtomicU64>,
    wake: Line<CtlWake>,
}

#[repr(C)]
struct CtlWake {
    /// Futex word the consumer sleeps on (data available).
    data_seq: AtomicU32,
    /// Non-zero while the consumer is asleep or about to sleep.
    consumer_waiting: AtomicU32,
    /// Futex word the producer sleeps on (space available).
    space_seq: AtomicU32,
    /// Non-zero while the producer is asleep or about to sleep.
    producer_waiting: AtomicU32,
    /// `PRODUCER_CLOSED` | `CONSUMER_CLOSED`.
    closed: AtomicU32,
    /// Written by the consumer only: messages it took and then
    /// discarded unread (a subscriber's drop-oldest queue), for the producer to see.
    /// Zero from peers that never discard.
    discarded: AtomicU64,
}

/// Size of a control block in shared memory.
pub(crate) const CTL_LEN: usize = std::mem::size_of::<RingCtl>();

impl RingCtl {
    #[cfg(loom)]
    fn new() -> RingCtl {
        RingCtl {
            tail: Line(AtomicU64::new(0)),
            head: Line(AtomicU64::new(0)),
            wake: Line(CtlWake {
                data_seq: AtomicU32::new(0),
                consumer_waiting: AtomicU32::new(0),
                space_seq: AtomicU32::new(0),
                producer_waiting: AtomicU32::new(0),
                closed: AtomicU32::new(0),
                discarded: AtomicU64::new(0),
            }),
        }
    }

    /// Wakes every sleeper on this ring, on both sides (used when the
    /// liveness of the peer changes; the sleepers re-check their condition).
    pub(crate) fn wake_all(&self) {
        self.data_words().wake();
        self.space_words().wake();
    }

    fn data_words(&self) -> WakeWords<'_> {
        WakeWords {
            seq: &self.wake.0.data_seq,
            waiting: &self.wake.0.consumer_waiting,
        }
    }

    fn space_words(&self) -> WakeWords<'_> {
        WakeWords {
            seq: &self.wake.0.space_seq,
            waiting: &self.wake.0.producer_waiting,
        }
    }
}

/// Process-local state shared by both ends of a link (never in shared memory).
#[derive(Debug, Default)]
pub(crate) struct LocalState {
    /// Set when the liveness channel reports the peer process gone.
    pub(crate) peer_gone: std::sync::atomic::AtomicBool,
    /// Set by a [`WaitInterrupter`]: the consumer's wait ends early.
    pub(crate) interrupted: std::sync::atomic::AtomicBool,
}

/// Ends a [`Consumer`]'s current (or next) wait early, from another thread
/// of the same process: the wait returns as if its deadline had passed.
/// For a thread that sleeps on a ring with a deadline that others may want
/// to move earlier.
pub struct WaitInterrupter {
    ctl: *const RingCtl,
    local: Arc<LocalState>,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `ctl` points into memory kept alive by `_owner` (as in `RingMem`),
// and only its atomic wake words are used, so the handle may move to and be
// shared between threads.
unsafe impl Send for WaitInterrupter {}
// SAFETY: as for `Send`: every access through the handle is atomic.
unsafe impl Sync for WaitInterrupter {}

impl std::fmt::Debug for WaitInterrupter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitInterrupter").finish_non_exhaustive()
    }
}

impl WaitInterrupter {
    /// Ends the consumer's wait now (or its next one, if it is not waiting).
    pub fn interrupt(&self) {
        self.local.interrupted.store(true, Ordering::Release);
        // SAFETY: valid and aligned while `_owner` lives (the contract of
        // `RingMem::new`, from which this handle was made); the control
        // block is all atomics.
        let ctl = unsafe { &*self.ctl };
        // Wakes the consumer if it sleeps (it re-checks, and sees the flag).
        ctl.data_words().notify();
    }
}

/// Counts, in a ring's control block, messages its consumer took and then
/// discarded unread, so that the producer sees them
/// ([`Producer::peer_discarded`]). Usable from any thread of the
/// consumer's process.
pub struct DiscardCounter {
    ctl: *const RingCtl,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `ctl` points into memory kept alive by `_owner` (as in `RingMem`),
// and only its atomic `discarded` word is used, so the handle may move to
// and be shared between threads.
unsafe impl Send for DiscardCounter {}
// SAFETY: as for `Send`: every access through the handle is atomic.
unsafe impl Sync for DiscardCounter {}

impl std::fmt::Debug for DiscardCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscardCounter").finish_non_exhaustive()
    }
}

impl DiscardCounter {
    /// Counts `n` more messages discarded.
    pub fn add(&self, n: u64) {
        // SAFETY: valid and aligned while `_owner` lives (the contract of
        // `RingMem::new`, from which this handle was made); the control
        // block is all atomics.
        let ctl = unsafe { &*self.ctl };
        ctl.wake.0.discarded.fetch_add(n, Ordering::Relaxed);
    }
}

/// Where a ring's memory lives, and what keeps it alive.
pub(crate) struct RingMem {
    ctl: *const RingCtl,
    data: *mut u8,
    cap: usize,
    local: Arc<LocalState>,
    /// Under loom: causality tracking of payload words.
    #[cfg(loom)]
    cells: Arc<Vec<loom::cell::UnsafeCell<()>>>,
    /// Under loom: the header words, as model-checked atomics.
    #[cfg(loom)]
    shadow: Arc<Vec<AtomicU64>>,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: the pointers refer to memory kept alive by `_owner` (a mapping or a
// heap allocation that is Send + Sync); the ring protocol gives each byte of
// the data area a single writer at a time and control words are atomics, so
// moving a `RingMem` to another thread is sound.
unsafe impl Send for RingMem {}

impl RingMem {
    /// Builds a ring view over memory owned by `owner`.
    ///
    /// # Safety
    /// `ctl` must point to a `RingCtl`-sized, 128-aligned block and `data` to
    /// `cap` bytes (8-aligned), both valid for reads and writes for as long as
    /// `owner` lives, and only ever accessed through atomics or raw pointers.
    /// Exactly one `Producer` and one `Consumer` (in any processes) may use a
    /// given ring. `cap` must be a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    #[cfg(not(loom))]
    pub(crate) unsafe fn new(
        ctl: *const RingCtl,
        data: *mut u8,
        cap: usize,
        local: Arc<LocalState>,
        owner: Arc<dyn Send + Sync>,
    ) -> RingMem {
        debug_assert!(cap.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&cap));
        RingMem {
            ctl,
            data,
            cap,
            local,
            _owner: owner,
        }
    }

    fn ctl(&self) -> &RingCtl {
        // SAFETY: guaranteed valid and aligned for the owner's lifetime by
        // the contract of `RingMem::new`; all fields are atomics, so shared
        // access from several processes is defined.
        unsafe { &*self.ctl }
    }

    #[inline]
    fn mask(&self) -> u64 {
        self.cap as u64 - 1
    }

    /// Reads the 8-byte header word at `off` (8-aligned, `off + 8 <= cap`).
    #[inline]
    fn read_header(&self, off: usize, order: Ordering) -> u64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.cap);
        #[cfg(not(loom))]
        {
            // SAFETY: `off` is 8-aligned and in bounds (callers mask it), the
            // data area is 8-aligned, and the word is accessed atomically, so
            // a concurrent write by the peer (legitimate or not) is a race on
            // an atomic, not undefined behaviour.
            unsafe {
                std::sync::atomic::AtomicU64::from_ptr(self.data.add(off) as *mut u64).load(order)
            }
        }
        #[cfg(loom)]
        {
            self.shadow[off / 8].load(order)
        }
    }

    /// Writes the 8-byte header word at `off`.
    #[inline]
    fn write_header(&self, off: usize, word: u64, order: Ordering) {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.cap);
        #[cfg(not(loom))]
        {
            // SAFETY: as in `read_header`.
            unsafe {
                std::sync::atomic::AtomicU64::from_ptr(self.data.add(off) as *mut u64)
                    .store(word, order)
            }
        }
        #[cfg(loom)]
        {
            self.shadow[off / 8].store(word, order)
        }
    }

    /// Starts fetching the cache lines of `[off, off + len)` after the
    /// first (which the header was just read from), at most
    /// [`PREFETCH_LINES`] of them: the record's other lines then cross from
    /// the producer's core while the caller looks at its header (on
    /// x86_64; elsewhere the hardware's own prefetching has to do).
    #[inline(always)]
    fn prefetch(&self, _off: usize, _len: usize) {
        #[cfg(all(not(loom), target_arch = "x86_64"))]
        {
            let first = (_off | 63) + 1;
            let end = (_off + _len).min(first + PREFETCH_LINES * 64);
            let mut line = first;
            while line < end {
                // SAFETY: `line < off + len <= cap` (the caller validated
                // the record's bounds), so the address is inside the data
                // area; a prefetch reads nothing into the program and cannot
                // fault anyway.
                unsafe {
                    core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                        self.data.add(line) as *const i8,
                    )
                };
                line += 64;
            }
        }
    }

    /// Records (under loom) a read of `[off, off + len)` for causality checking.
    #[inline(always)]
    fn track_read(&self, _off: usize, _len: usize) {
        #[cfg(loom)]
        for w in _off / 8..(_off + _len).div_ceil(8) {
            self.cells[w].with(|_| ());
        }
    }

    /// Records (under loom) a write of `[off, off + len)` for causality checking.
    #[inline(always)]
    fn track_write(&self, _off: usize, _len: usize) {
        #[cfg(loom)]
        for w in _off / 8..(_off + _len).div_ceil(8) {
            self.cells[w].with_mut(|_| ());
        }
    }
}

/// Errors that end a ring (or the link carrying it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The other side closed the ring in an orderly way; everything it
    /// committed before has been delivered.
    #[error("the peer closed the ring")]
    Closed,
    /// The peer process died (its liveness channel closed); everything it
    /// committed before has been delivered.
    #[error("the peer process is gone")]
    PeerGone,
    /// The shared memory holds values that a correct peer cannot have
    /// written. The ring is unusable from now on.
    #[error("ring corrupted by the peer: {what} = {value:#x}")]
    Corrupt {
        /// Which field was found invalid.
        what: &'static str,
        /// The invalid value.
        value: u64,
    },
}

/// Errors from [`Producer::reserve`] and friends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// The record cannot fit in this ring, ever.
    #[error("a {len}-byte record does not fit in this ring (at most {max} bytes)")]
    TooLarge {
        /// The payload length asked for.
        len: usize,
        /// The largest payload this ring can carry.
        max: usize,
    },
    /// There is not enough free space right now (staged records have been
    /// published so the consumer can make room).
    #[error("ring full: {needed} bytes needed, {free} free")]
    Full {
        /// Bytes needed (including header and padding).
        needed: usize,
        /// Bytes free now.
        free: usize,
    },
    /// No space became free before the deadline.
    #[error("timed out waiting for ring space")]
    TimedOut,
    /// The ring is closed, gone or corrupt.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Errors from receiving with a deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// No record arrived before the deadline.
    #[error("timed out waiting for a record")]
    TimedOut,
    /// The ring is closed, gone or corrupt.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Typestate of a [`Loan`] whose bytes are not yet initialised.
#[derive(Debug)]
pub enum Uninit {}
/// Typestate of a [`Loan`] whose bytes are initialised and may be sent.
#[derive(Debug)]
pub enum Init {}

/// The writing end of a ring.
pub struct Producer {
    mem: RingMem,
    /// Local write position, including staged (unpublished) records.
    tail: u64,
    /// Last value stored to the shared tail.
    published: u64,
    /// Last observed consumer head.
    head_cache: u64,
    /// The header of the first staged record, written (with Release) only
    /// when the batch is published: it is what makes the batch visible.
    deferred: Option<(usize, u64)>,
    strategy: WaitStrategy,
    /// Whether waiting for space spins first (see [`WaitStrategy`]).
    pacing: wait::Pacing,
    error: Option<RingError>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.mem.cap)
            .field("tail", &self.tail)
            .field("published", &self.published)
            .finish_non_exhaustive()
    }
}

/// A record reserved in place in the ring; `S` is [`Uninit`] until written.
#[must_use = "a loan does nothing until committed"]
pub struct Loan<'a, S> {
    producer: &'a mut Producer,
    off: usize,
    len: usize,
    tag: u8,
    _state: PhantomData<S>,
}

impl Producer {
    pub(crate) fn new(mem: RingMem, strategy: WaitStrategy) -> Producer {
        Producer {
            mem,
            tail: 0,
            published: 0,
            head_cache: 0,
            deferred: None,
            strategy,
            pacing: wait::Pacing::default(),
            error: None,
        }
    }

    /// The ring's capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.mem.cap
    }

    /// The largest payload one record can carry: the capacity less the
    /// record's header and the zeroed header slot that must follow it.
    pub fn max_payload(&self) -> usize {
        self.mem.cap - 2 * RECORD_HEADER_LEN
    }

    /// Messages the consumer says it took and then discarded unread (see
    /// [`DiscardCounter`]): a count the untrusted peer writes, never
    /// decreasing from an honest one.
    pub fn peer_discarded(&self) -> u64 {
        self.mem.ctl().wake.0.discarded.load(Ordering::Relaxed)
    }

    /// Writes a record header, deferring it if it is the first record of
    /// an unpublished batch (see `deferred`). Before that, zeroes the header
    /// slot right after the record, so that the consumer, which discovers
    /// records by their headers, finds "nothing yet" there instead of stale
    /// bytes of an earlier lap.
    #[inline]
    fn stage_header(&mut self, off: usize, rec: usize, word: u64) {
        let next = (off + rec) & self.mem.mask() as usize;
        self.mem.write_header(next, 0, Ordering::Relaxed);
        if self.tail == self.published && self.deferred.is_none() {
            self.deferred = Some((off, word));
        } else {
            // Ordered before the consumer's view by the Release store of the
            // deferred header in `publish`.
            self.mem.write_header(off, word, Ordering::Relaxed);
        }
        self.tail = self.tail.wrapping_add(rec as u64);
    }

    /// Changes how [`send`](Producer::send) waits for space.
    pub fn set_wait_strategy(&mut self, strategy: WaitStrategy) {
        self.strategy = strategy;
    }

    fn check(&self) -> Result<(), RingError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let closed = self.mem.ctl().wake.0.closed.load(Ordering::Acquire);
        if closed & CONSUMER_CLOSED != 0 {
            return Err(RingError::Closed);
        }
        if self.mem.local.peer_gone.load(Ordering::Acquire) {
            return Err(RingError::PeerGone);
        }
        Ok(())
    }

    /// Bytes free for the producer, refreshing the consumer's head if needed.
    fn free(&mut self, want: usize) -> Result<usize, RingError> {
        let used = self.tail.wrapping_sub(self.head_cache);
        let free = self.mem.cap - used as usize;
        if free >= want {
            return Ok(free);
        }
        // SYNC: Acquire pairs with the Release store of `head` in
        // `Consumer::release_published`: the consumer is done reading the
        // bytes before `head`, so we may overwrite them.
        let head = self.mem.ctl().head.0.load(Ordering::Acquire);
        // The head may only move forward, and never past what we published.
        let moved = head.wrapping_sub(self.head_cache);
        if moved > self.published.wrapping_sub(self.head_cache) || !head.is_multiple_of(8) {
            let e = RingError::Corrupt {
                what: "consumer head",
                value: head,
            };
            self.error = Some(e.clone());
            return Err(e);
        }
        self.head_cache = head;
        let used = self.tail.wrapping_sub(head);
        Ok(self.mem.cap - used as usize)
    }

    /// Reserves a record of `len` payload bytes without waiting.
    pub fn reserve(&mut self, len: usize) -> Result<Loan<'_, Uninit>, ReserveError> {
        self.reserve_tagged(len, 0)
    }

    /// Like [`reserve`](Producer::reserve), with an 8-bit tag carried in the
    /// record header (the link uses it to mark fragments).
    pub fn reserve_tagged(
        &mut self,
        len: usize,
        tag: u8,
    ) -> Result<Loan<'_, Uninit>, ReserveError> {
        match self.prepare(len)? {
            Ok(off) => Ok(self.loan(off, len, tag)),
            Err((needed, free)) => Err(ReserveError::Full { needed, free }),
        }
    }

    fn loan(&mut self, off: usize, len: usize, tag: u8) -> Loan<'_, Uninit> {
        self.mem.track_write(off + RECORD_HEADER_LEN, len);
        Loan {
            producer: self,
            off,
            len,
            tag,
            _state: PhantomData,
        }
    }

    /// Makes room for a record of `len` payload bytes: writes a padding
    /// record first if it would cross the end. Returns the record's offset,
    /// or `(needed, free)` when the ring is full (after publishing what is
    /// staged, so the consumer can make room).
    fn prepare(&mut self, len: usize) -> Result<Result<usize, (usize, usize)>, ReserveError> {
        self.check()?;
        let cap = self.mem.cap;
        if len > self.max_payload() {
            return Err(ReserveError::TooLarge {
                len,
                max: self.max_payload(),
            });
        }
        // Every record needs room for itself and for the zeroed header slot
        // after it.
        let rec = record_len(len);
        let mut off = (self.tail & self.mem.mask()) as usize;
        let contiguous = cap - off;
        if rec > contiguous {
            // Fill the rest of the buffer with a padding record first.
            let need = contiguous + RECORD_HEADER_LEN;
            let free = self.free(need)?;
            if free < need {
                self.publish();
                return Ok(Err((contiguous + rec + RECORD_HEADER_LEN, free)));
            }
            let pad_len = (contiguous - RECORD_HEADER_LEN) as u64;
            self.stage_header(off, contiguous, pad_len | TYPE_PAD << 32);
            off = 0;
        }
        let need = rec + RECORD_HEADER_LEN;
        let free = self.free(need)?;
        if free < need {
            self.publish();
            return Ok(Err((need, free)));
        }
        Ok(Ok(off))
    }

    /// Reserves a record, waiting for space per the wait strategy until
    /// `deadline` (forever if `None`).
    pub fn reserve_wait(
        &mut self,
        len: usize,
        tag: u8,
        deadline: Option<Instant>,
    ) -> Result<Loan<'_, Uninit>, ReserveError> {
        self.reserve_wait_lazy(len, tag, || deadline)
    }

    /// Like [`reserve_wait`](Producer::reserve_wait), waiting at most
    /// `patience` from the moment the ring is found full (the clock is only
    /// read then).
    pub fn reserve_wait_for(
        &mut self,
        len: usize,
        tag: u8,
        patience: Duration,
    ) -> Result<Loan<'_, Uninit>, ReserveError> {
        self.reserve_wait_lazy(len, tag, || Instant::now().checked_add(patience))
    }

    fn reserve_wait_lazy(
        &mut self,
        len: usize,
        tag: u8,
        deadline: impl FnOnce() -> Option<Instant>,
    ) -> Result<Loan<'_, Uninit>, ReserveError> {
        let mut pending_deadline = Some(deadline);
        let mut deadline = None;
        loop {
            let need = match self.prepare(len)? {
                Ok(off) => return Ok(self.loan(off, len, tag)),
                Err((needed, _)) => needed.min(self.mem.cap),
            };
            if let Some(f) = pending_deadline.take() {
                deadline = f();
            }
            let strategy = self.strategy;
            let mem = &self.mem;
            let ctl = mem.ctl();
            let tail = self.tail;
            let waited = wait::wait_until(
                strategy,
                &ctl.space_words(),
                deadline,
                &mut self.pacing,
                || {
                    // SYNC: Acquire pairs with the consumer's Release of `head`.
                    let head = ctl.head.0.load(Ordering::Acquire);
                    let used = tail.wrapping_sub(head) as usize;
                    used > mem.cap // corrupt: let `prepare` report it
                    || mem.cap - used >= need
                    || ctl.wake.0.closed.load(Ordering::Acquire) & CONSUMER_CLOSED != 0
                    || mem.local.peer_gone.load(Ordering::Acquire)
                },
                || false,
            );
            if waited == Waited::TimedOut {
                return Err(ReserveError::TimedOut);
            }
        }
    }

    /// Copies `data` into one record and publishes it, waiting for space per
    /// the wait strategy.
    pub fn send(&mut self, data: &[u8]) -> Result<(), ReserveError> {
        self.reserve_wait(data.len(), 0, None)?.fill(data).commit();
        Ok(())
    }

    /// Copies `data` into one record and publishes it, without waiting.
    pub fn try_send(&mut self, data: &[u8]) -> Result<(), ReserveError> {
        self.reserve(data.len())?.fill(data).commit();
        Ok(())
    }

    /// Publishes every staged record to the consumer (one store, one wake-up
    /// check), waking it if it sleeps.
    #[inline]
    pub fn publish(&mut self) {
        if self.tail != self.published {
            if let Some((off, word)) = self.deferred.take() {
                // SYNC: Release pairs with the Acquire load of the header in
                // `Consumer::next_record`: every record of the batch, and the
                // zeroed slot after the last, happen-before.
                self.mem.write_header(off, word, Ordering::Release);
            }
            // The tail is for the producer's own bookkeeping and for
            // diagnostics; the consumer discovers records by their headers.
            self.mem.ctl().tail.0.store(self.tail, Ordering::Release);
            self.published = self.tail;
            self.mem.ctl().data_words().notify();
        }
    }

    /// Bytes staged but not yet published.
    pub fn staged(&self) -> usize {
        self.tail.wrapping_sub(self.published) as usize
    }

    /// Closes the ring: publishes what is staged and tells the consumer that
    /// nothing more will come. Also done on drop.
    pub fn close(&mut self) {
        self.publish();
        let ctl = self.mem.ctl();
        // SYNC: Release pairs with the Acquire load of `closed` in
        // `Consumer::available`: the final tail happens-before the flag.
        ctl.wake
            .0
            .closed
            .fetch_or(PRODUCER_CLOSED, Ordering::Release);
        ctl.data_words().wake();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.close();
    }
}

impl<'a> Loan<'a, Uninit> {
    /// The reserved bytes, uninitialised.
    pub fn as_uninit(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: `off + 8 + len <= cap` was ensured by `reserve_tagged`; the
        // space is free (the consumer released it), so this side is its only
        // writer until publication; the loan borrows the producer mutably, so
        // no other reference to these bytes exists in this process.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.mem.data.add(self.off + RECORD_HEADER_LEN) as *mut MaybeUninit<u8>,
                self.len,
            )
        }
    }

    /// Copies `src` into the reserved bytes.
    ///
    /// # Panics
    /// If `src.len()` differs from the reserved length (a programming error).
    pub fn fill(mut self, src: &[u8]) -> Loan<'a, Init> {
        assert_eq!(
            src.len(),
            self.len,
            "Loan::fill: source length differs from the reservation"
        );
        let dst = self.as_uninit();
        // SAFETY: `dst` and `src` have the same length, and `src` (a shared
        // borrow held by the caller) cannot overlap the loaned ring bytes,
        // which are reachable only through this exclusive loan.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr() as *mut u8, src.len())
        };
        // SAFETY: every byte was just written.
        unsafe { self.assume_init() }
    }

    /// Copies `parts` one after another into the reserved bytes (a header
    /// and a body, say), without zeroing them first.
    ///
    /// # Panics
    /// If the parts' lengths do not add up to the reserved length (a
    /// programming error).
    pub fn fill_parts(mut self, parts: &[&[u8]]) -> Loan<'a, Init> {
        let total = parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
        assert_eq!(
            total, self.len,
            "Loan::fill_parts: the parts' length differs from the reservation"
        );
        let dst = self.as_uninit();
        let mut at = 0;
        for part in parts {
            let end = at + part.len();
            // SAFETY: `at..end` lies within `dst` (the lengths add up to
            // `dst.len()`, checked above), and `part` (a shared borrow held
            // by the caller) cannot overlap the loaned ring bytes, which are
            // reachable only through this exclusive loan.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    dst[at..end].as_mut_ptr() as *mut u8,
                    part.len(),
                )
            };
            at = end;
        }
        // SAFETY: the parts cover every byte from 0 to `self.len`.
        unsafe { self.assume_init() }
    }

    /// Zeroes the reserved bytes.
    pub fn zeroed(mut self) -> Loan<'a, Init> {
        self.as_uninit().fill(MaybeUninit::new(0));
        // SAFETY: every byte was just written.
        unsafe { self.assume_init() }
    }

    /// Declares the reserved bytes written.
    ///
    /// # Safety
    /// Every byte of [`as_uninit`](Loan::as_uninit) must have been initialised.
    pub unsafe fn assume_init(self) -> Loan<'a, Init> {
        Loan {
            producer: self.producer,
            off: self.off,
            len: self.len,
            tag: self.tag,
            _state: PhantomData,
        }
    }
}

impl<'a> Loan<'a, Init> {
    /// The written bytes, for further changes before sending.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_uninit`, and the bytes are initialised (typestate).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.producer.mem.data.add(self.off + RECORD_HEADER_LEN),
                self.len,
            )
        }
    }

    /// Shortens the record to its first `len` bytes (no-op if longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends the record to the staged batch without publishing it; see
    /// [`Producer::publish`].
    pub fn stage(self) {
        self.finish();
    }

    /// Stages the record and publishes everything staged.
    pub fn commit(self) {
        self.finish().publish();
    }

    /// Writes the header and advances the local tail past the record.
    #[inline]
    fn finish(self) -> &'a mut Producer {
        let p = self.producer;
        let word = self.len as u64 | TYPE_MSG << 32 | (self.tag as u64) << 40;
        // The local tail points at this record (padding, if any, is behind it).
        debug_assert_eq!(p.tail & p.mem.mask(), self.off as u64);
        p.stage_header(self.off, record_len(self.len), word);
        p
    }
}

/// The reading end of a ring.
pub struct Consumer {
    mem: RingMem,
    /// Local read position: everything before it has been handed out and released.
    head: u64,
    /// Last value stored to the shared head.
    published: u64,
    strategy: WaitStrategy,
    /// Whether waiting for records spins first (see [`WaitStrategy`]).
    pacing: wait::Pacing,
    error: Option<RingError>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.mem.cap)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// A record lent out in place by the consumer; its space is released on drop.
pub struct Received<'a> {
    consumer: &'a mut Consumer,
    off: usize,
    len: usize,
    tag: u8,
    /// Set by [`Received::release_later`].
    later: bool,
}

/// A parsed record position (internal).
#[derive(Clone, Copy)]
struct Rec {
    off: usize,
    len: usize,
    tag: u8,
}

impl Consumer {
    pub(crate) fn new(mem: RingMem, strategy: WaitStrategy) -> Consumer {
        Consumer {
            mem,
            head: 0,
            published: 0,
            strategy,
            pacing: wait::Pacing::default(),
            error: None,
        }
    }

    /// The ring's capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.mem.cap
    }

    /// Changes how [`recv`](Consumer::recv) waits for data.
    pub fn set_wait_strategy(&mut self, strategy: WaitStrategy) {
        self.strategy = strategy;
    }

    fn fail(&mut self, what: &'static str, value: u64) -> RingError {
        let e = RingError::Corrupt { what, value };
        self.error = Some(e.clone());
        e
    }

    /// Parses the next record without consuming it; skips padding.
    ///
    /// Records are discovered by their headers: the producer zeroes the
    /// header slot after every record before publishing it, so a zero word
    /// at `head` means "nothing yet", and a non-zero one (read with Acquire)
    /// is a complete record. Nothing here trusts the producer beyond bounds:
    /// every record must lie inside the ring, and the consumer never gets
    /// more than a ring's worth ahead of what it has released, so a
    /// malicious producer can make it read garbage but never out of bounds
    /// or forever.
    fn next_record(&mut self) -> Result<Option<Rec>, RingError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let cap = self.mem.cap;
        loop {
            let off = (self.head & self.mem.mask()) as usize;
            // SYNC: Acquire pairs with the Release store of the header in
            // `Producer::publish`: the record's bytes (and everything staged
            // with it) are visible.
            let mut word = self.mem.read_header(off, Ordering::Acquire);
            if word == 0 {
                // SYNC: Acquire pairs with the Release `fetch_or` in
                // `Producer::close` (which publishes first); re-read the
                // header after it, so records committed before the close are
                // never lost.
                let closed = self.mem.ctl().wake.0.closed.load(Ordering::Acquire);
                let gone = self.mem.local.peer_gone.load(Ordering::Acquire);
                if closed & PRODUCER_CLOSED == 0 && !gone {
                    return Ok(None);
                }
                word = self.mem.read_header(off, Ordering::Acquire);
                if word == 0 {
                    return Err(if closed & PRODUCER_CLOSED != 0 {
                        RingError::Closed
                    } else {
                        RingError::PeerGone
                    });
                }
            }
            let len = (word & 0xffff_ffff) as usize;
            let typ = (word >> 32) & 0xff;
            let tag = ((word >> 40) & 0xff) as u8;
            if word >> 48 != 0 {
                return Err(self.fail("record header", word));
            }
            let room = cap - off;
            if len > room - RECORD_HEADER_LEN {
                return Err(self.fail("record length", len as u64));
            }
            let rec = record_len(len);
            let ahead = self.head.wrapping_sub(self.published) as usize;
            if ahead + rec > cap {
                return Err(self.fail("record beyond the producer's reach", self.head));
            }
            match typ {
                TYPE_MSG => {
                    self.mem.track_read(off + RECORD_HEADER_LEN, len);
                    self.mem.prefetch(off, RECORD_HEADER_LEN + len);
                    return Ok(Some(Rec { off, len, tag }));
                }
                // Padding runs exactly to the end, and never from offset 0
                // (any record fits there).
                TYPE_PAD if rec == room && off != 0 => {
                    self.head = self.head.wrapping_add(rec as u64);
                }
                TYPE_PAD => return Err(self.fail("padding length", len as u64)),
                _ => return Err(self.fail("record type", typ)),
            }
        }
    }

    /// Lends out the next record without waiting, or `None` if the ring is
    /// empty. Errors once the ring is drained and closed, or corrupt.
    pub fn try_recv(&mut self) -> Result<Option<Received<'_>>, RingError> {
        match self.next_record()? {
            Some(r) => Ok(Some(Received {
                consumer: self,
                off: r.off,
                len: r.len,
                tag: r.tag,
                later: false,
            })),
            None => {
                // Padding may have been skipped: hand its space back.
                self.release_published();
                Ok(None)
            }
        }
    }

    /// A handle that ends this consumer's waits early from another thread
    /// (see [`WaitInterrupter`]).
    pub fn interrupter(&self) -> WaitInterrupter {
        WaitInterrupter {
            ctl: self.mem.ctl,
            local: self.mem.local.clone(),
            _owner: self.mem._owner.clone(),
        }
    }

    /// A handle that counts messages this consumer discarded unread, for
    /// the producer to see ([`Producer::peer_discarded`]).
    pub fn discard_counter(&self) -> DiscardCounter {
        DiscardCounter {
            ctl: self.mem.ctl,
            _owner: self.mem._owner.clone(),
        }
    }

    /// Whether a record (or padding) is published at the head: one load,
    /// for a cheap spin. It does not see a closed ring or a dead peer; the
    /// receiving calls report those.
    #[inline]
    pub fn has_record(&self) -> bool {
        let off = (self.head & self.mem.mask()) as usize;
        // SYNC: Relaxed: only a hint; the receive that follows reads the
        // header again with Acquire.
        self.mem.read_header(off, Ordering::Relaxed) != 0
    }

    /// The tag of the next record without consuming it or waiting, or
    /// `None` if the ring is empty.
    pub fn try_peek_tag(&mut self) -> Result<Option<u8>, RingError> {
        match self.next_record()? {
            Some(r) => Ok(Some(r.tag)),
            None => {
                self.release_published();
                Ok(None)
            }
        }
    }

    /// Waits (per the wait strategy) until a record arrives or `deadline`
    /// passes, and returns its tag without consuming it.
    pub fn peek_tag(&mut self, deadline: Option<Instant>) -> Result<u8, RecvError> {
        if let Some(r) = self.next_record()? {
            return Ok(r.tag);
        }
        self.release_published();
        self.wait_readable(deadline)?;
        match self.next_record()? {
            Some(r) => Ok(r.tag),
            None => Err(RecvError::TimedOut),
        }
    }

    /// Waits (per the wait strategy) until a record arrives or `deadline`
    /// passes, then lends it out.
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Received<'_>, RecvError> {
        if self.next_record()?.is_none() {
            self.release_published();
            self.wait_readable(deadline)?;
        }
        match self.next_record()? {
            Some(r) => Ok(Received {
                consumer: self,
                off: r.off,
                len: r.len,
                tag: r.tag,
                later: false,
            }),
            // `wait_readable` only returns Ok when a record (or an error) is there.
            None => Err(RecvError::TimedOut),
        }
    }

    /// Waits until a record or an ending condition is visible.
    fn wait_readable(&mut self, deadline: Option<Instant>) -> Result<(), RecvError> {
        let strategy = self.strategy;
        let off = (self.head & self.mem.mask()) as usize;
        let mem = &self.mem;
        let ctl = mem.ctl();
        let released = self.published;
        let ready = || {
            // SYNC: Acquire pairs with the producer's Release of the header
            // in `Producer::publish`.
            mem.read_header(off, Ordering::Acquire) != 0
                || ctl.wake.0.closed.load(Ordering::Acquire) & PRODUCER_CLOSED != 0
                || mem.local.peer_gone.load(Ordering::Acquire)
                || mem.local.interrupted.load(Ordering::Relaxed)
        };
        // Before sleeping, the head is stored again: a peer that wrote an
        // older value over it would otherwise wait for space that this side
        // freed long ago, while this side waits for its records. Storing
        // the value last published changes nothing for a correct producer.
        let reassert = || {
            // SYNC: as in `release_published`.
            ctl.head.0.store(released, Ordering::Release);
            false
        };
        let waited = wait::wait_until(
            strategy,
            &ctl.data_words(),
            deadline,
            &mut self.pacing,
            ready,
            reassert,
        );
        // An interrupt ends this wait only: a record that is there is still
        // handed out (the caller re-checks whatever it was woken for).
        if mem.local.interrupted.load(Ordering::Relaxed) {
            mem.local.interrupted.store(false, Ordering::Relaxed);
        }
        match waited {
            Waited::Ready => Ok(()),
            Waited::TimedOut => Err(RecvError::TimedOut),
        }
    }

    /// Hands every available record (at most `max`) to `f`, then releases
    /// them all with one store. Returns how many were handed out (0 if the
    /// ring is empty).
    pub fn recv_batch(
        &mut self,
        max: usize,
        mut f: impl FnMut(u8, &[u8]),
    ) -> Result<usize, RingError> {
        let mut n = 0;
        while n < max {
            let r = match self.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                // Report the end (or corruption, which is sticky) on the
                // next call, after the records already handed out.
                Err(_) if n > 0 => break,
                Err(e) => {
                    self.release_published();
                    return Err(e);
                }
            };
            f(r.tag, self.payload(r.off, r.len));
            self.head = self.head.wrapping_add(record_len(r.len) as u64);
            n += 1;
        }
        self.release_published();
        Ok(n)
    }

    /// Like [`recv_batch`](Consumer::recv_batch), but first waits (per the
    /// wait strategy) until at least one record is there.
    pub fn recv_batch_wait(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        f: impl FnMut(u8, &[u8]),
    ) -> Result<usize, RecvError> {
        if self.next_record()?.is_none() {
            self.release_published();
            self.wait_readable(deadline)?;
        }
        Ok(self.recv_batch(max, f)?)
    }

    fn payload(&self, off: usize, len: usize) -> &[u8] {
        // SAFETY: `next_record` validated `off + 8 + len <= cap`, and the
        // bytes were published by the producer (Acquire on `tail`), which
        // will not write them again until we release them. A misbehaving
        // peer could still write them; that can only change the bytes we
        // return, never their bounds.
        unsafe { std::slice::from_raw_parts(self.mem.data.add(off + RECORD_HEADER_LEN), len) }
    }

    /// Publishes the consumed position so the producer can reuse the space.
    #[inline]
    fn release_published(&mut self) {
        if self.head != self.published {
            // SYNC: Release pairs with the Acquire load of `head` in
            // `Producer::free`: our reads of the records happen-before the
            // producer overwrites them.
            self.mem.ctl().head.0.store(self.head, Ordering::Release);
            self.published = self.head;
            self.mem.ctl().space_words().notify();
        }
    }

    /// Hands the space of records consumed with
    /// [`Received::release_later`] back to the producer.
    pub fn release(&mut self) {
        self.release_published();
    }

    /// Closes the ring from the consumer's side: the producer's next send
    /// fails with [`RingError::Closed`]. Also done on drop.
    pub fn close(&mut self) {
        let ctl = self.mem.ctl();
        ctl.wake
            .0
            .closed
            .fetch_or(CONSUMER_CLOSED, Ordering::Release);
        ctl.space_words().wake();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.close();
    }
}

impl Received<'_> {
    /// The record's tag (0 unless sent with [`Producer::reserve_tagged`]).
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// Consumes the record without handing its space back yet: that waits
    /// for the next receive that finds the ring empty, the next record
    /// dropped, or [`Consumer::release`]. Publishing the space ends with a
    /// fence; this lets a caller with something more urgent to do (send
    /// its next message, say) pay for it afterwards.
    pub fn release_later(mut self) {
        self.later = true;
    }
}

impl std::ops::Deref for Received<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.consumer.payload(self.off, self.len)
    }
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.len)
            .field("tag", &self.tag)
            .finish()
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        let c = &mut *self.consumer;
        c.head = c.head.wrapping_add(record_len(self.len) as u64);
        if !self.later {
            c.release_published();
        }
    }
}

/// Bytes of shared memory a link with rings of `cap` bytes needs.
pub(crate) const fn link_data_len(cap: usize) -> usize {
    2 * CTL_LEN + 2 * cap
}

/// The two rings of a link segment: index 0 carries client-to-server
/// records, index 1 server-to-client. `seg` must be a LINK segment whose
/// data area is at least `link_data_len(cap)` bytes and `cap` a valid
/// capacity (both checked here).
#[cfg(not(loom))]
pub(crate) fn link_rings(
    seg: &Arc<crate::Segment>,
    cap: usize,
    local: &Arc<LocalState>,
) -> Option<[RingMem; 2]> {
    if validate_capacity(cap).is_err() || seg.data_len() < link_data_len(cap) {
        return None;
    }
    let base = seg.data_ptr();
    let owner: Arc<dyn Send + Sync> = seg.clone();
    // SAFETY: the data area is 128-aligned and at least
    // 2 * CTL_LEN + 2 * cap bytes (checked above), so both control blocks
    // (at 0 and CTL_LEN, multiples of 128) and both data areas (at
    // 2 * CTL_LEN and 2 * CTL_LEN + cap, multiples of 8) are in bounds and
    // aligned; the segment is kept alive by `owner`. Each process makes one
    // producer and one consumer per ring (the link builds exactly that).
    unsafe {
        let ctl0 = base as *const RingCtl;
        let ctl1 = base.add(CTL_LEN) as *const RingCtl;
        let data0 = base.add(2 * CTL_LEN);
        let data1 = data0.add(cap);
        Some([
            RingMem::new(ctl0, data0, cap, local.clone(), owner.clone()),
            RingMem::new(ctl1, data1, cap, local.clone(), owner),
        ])
    }
}

/// Wakes every sleeper of both rings of a link segment (see [`link_rings`]).
#[cfg(not(loom))]
pub(crate) fn wake_link(seg: &crate::Segment) {
    if seg.data_len() < 2 * CTL_LEN {
        return;
    }
    let base = seg.data_ptr();
    for i in 0..2 {
        // SAFETY: both control blocks lie within the data area (checked
        // above), 128-aligned, made only of atomics, alive while `seg` is.
        let ctl = unsafe { &*(base.add(i * CTL_LEN) as *const RingCtl) };
        ctl.wake_all();
    }
}

/// Checks a ring capacity received from a peer or a user.
pub fn validate_capacity(cap: usize) -> Result<(), InvalidCapacity> {
    if cap.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&cap) {
        Ok(())
    } else {
        Err(InvalidCapacity { capacity: cap })
    }
}

/// A ring capacity that is not a power of two in range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid ring capacity {capacity}: must be a power of two from {MIN_CAPACITY} to {MAX_CAPACITY}"
)]
pub struct InvalidCapacity {
    /// The capacity given.
    pub capacity: usize,
}

/// Errors from [`pair`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// The capacity is not acceptable.
    #[error(transparent)]
    Capacity(#[from] InvalidCapacity),
    /// The shared memory could not be created.
    #[cfg(not(loom))]
    #[error(transparent)]
    Segment(#[from] crate::SegmentError),
}

/// Creates a producer and consumer over one ring of `capacity` bytes in a
/// fresh memfd segment, in this process (both ends may move to other threads).
#[cfg(not(loom))]
pub fn pair(capacity: usize) -> Result<(Producer, Consumer), PairError> {
    validate_capacity(capacity)?;
    let seg = Arc::new(crate::Segment::create(CTL_LEN + capacity)?);
    let base = seg.data_ptr();
    let local = Arc::new(LocalState::default());
    // SAFETY: the segment's data area is 128-aligned (header is 128 bytes
    // into a page), zero-filled (a valid empty control block), at least
    // CTL_LEN + capacity bytes long, and kept alive by the Arc passed as
    // owner; one producer and one consumer are created.
    let (a, b) = unsafe {
        let ctl = base as *const RingCtl;
        let data = base.add(CTL_LEN);
        (
            RingMem::new(ctl, data, capacity, local.clone(), seg.clone()),
            RingMem::new(ctl, data, capacity, local, seg),
        )
    };
    Ok((
        Producer::new(a, WaitStrategy::default()),
        Consumer::new(b, WaitStrategy::default()),
    ))
}

/// Under loom: a heap-backed ring with causality tracking of every data word.
#[cfg(loom)]
pub fn pair(capacity: usize) -> Result<(Producer, Consumer), PairError> {
    validate_capacity(capacity)?;
    struct Heap {
        ctl: Box<RingCtl>,
        data: Box<[std::cell::Cell<u64>]>,
    }
    // SAFETY: under loom all threads are loom-managed and every access to
    // `data` goes through the ring protocol with causality tracking.
    unsafe impl Send for Heap {}
    // SAFETY: as above.
    unsafe impl Sync for Heap {}
    let heap = Arc::new(Heap {
        ctl: Box::new(RingCtl::new()),
        data: (0..capacity / 8).map(|_| std::cell::Cell::new(0)).collect(),
    });
    let ctl = &*heap.ctl as *const RingCtl;
    let data = heap.data.as_ptr() as *mut u8;
    let cells: Arc<Vec<loom::cell::UnsafeCell<()>>> = Arc::new(
        (0..capacity / 8)
            .map(|_| loom::cell::UnsafeCell::new(()))
            .collect(),
    );
    let shadow: Arc<Vec<AtomicU64>> =
        Arc::new((0..capacity / 8).map(|_| AtomicU64::new(0)).collect());
    let local = Arc::new(LocalState::default());
    let mk = |owner: Arc<Heap>| RingMem {
        ctl,
        data,
        cap: capacity,
        local: local.clone(),
        cells: cells.clone(),
        shadow: shadow.clone(),
        _owner: owner,
    };
    Ok((
        Producer::new(mk(heap.clone()), WaitStrategy::default()),
        Consumer::new(mk(heap), WaitStrategy::default()),
    ))
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
