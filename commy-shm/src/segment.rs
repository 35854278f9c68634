//! Memfd-backed shared-memory segments with a validated header.
//!
//! A [`Segment`] is an anonymous memory file (`memfd_create`), sealed so that
//! it can neither shrink nor grow, mapped shared into this process. Nothing is
//! ever left behind in `/dev/shm`: the memory lives exactly as long as some
//! process holds the file descriptor or a mapping. The descriptor is handed to
//! a peer over a Unix socket (see the link handshake), and the peer
//! [`attach`](Segment::attach)es to it, validating the header and the seals
//! before it touches a single byte of the data area.
//!
//! ```
//! use commy_shm::Segment;
//! use std::sync::atomic::Ordering;
//!
//! let seg = Segment::create(4096)?;
//! seg.words()[0].store(42, Ordering::Relaxed);
//!
//! // A peer would receive this descriptor over a Unix socket.
//! let fd = seg.as_fd().try_clone_to_owned()?;
//! let peer = Segment::attach(fd)?;
//! assert_eq!(peer.words()[0].load(Ordering::Relaxed), 42);
//! assert_eq!(peer.generation(), seg.generation());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, SealFlags};

use crate::sync::Ordering;
use crate::sync::shm::{AtomicU32, AtomicU64};

/// The magic number at offset 0 of every segment: `b"COMMYSEG"` little-endian.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"COMMYSEG");
/// The layout version this build writes and accepts.
pub const SEGMENT_LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the header; the data area starts here (cache-line aligned).
pub const SEGMENT_HEADER_LEN: usize = 128;
/// The largest data area a segment may have (1 TiB): a sanity bound on sizes
/// read from untrusted headers.
pub const SEGMENT_MAX_DATA_LEN: u64 = 1 << 40;

/// The seals every segment must carry before a peer trusts its size.
const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// The header at offset 0 of a segment. All fields are atomics because the
/// memory is shared with a peer that may write to it at any time.
#[repr(C)]
struct SegmentHeader {
    magic: AtomicU64,
    layout_version: AtomicU32,
    kind: AtomicU32,
    data_len: AtomicU64,
    generation: AtomicU64,
    creator_pid: AtomicU32,
    _reserved: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() <= SEGMENT_HEADER_LEN);

/// Errors from [`Segment::create`] and [`Segment::attach`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The requested data size is zero or larger than [`SEGMENT_MAX_DATA_LEN`].
    #[error("invalid segment size {requested} bytes (must be 1..={max})")]
    InvalidSize {
        /// The size that was asked for.
        requested: u64,
        /// The largest size allowed.
        max: u64,
    },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is smaller than a segment header, or its size disagrees with the header.
    #[error("segment file is {file_len} bytes but its header describes {expected} bytes")]
    SizeMismatch {
        /// The file's real size.
        file_len: u64,
        /// The size the header implies.
        expected: u64,
    },
    /// The file is not sealed against shrinking and growing, so a peer could
    /// truncate it under us.
    #[error("segment is not sealed against resizing (seals {found:#x}); refusing to map it")]
    NotSealed {
        /// The seals found on the file.
        found: u32,
    },
    /// The magic number is wrong: this is not a Commy segment.
    #[error("bad segment magic {found:#018x} (expected {SEGMENT_MAGIC:#018x})")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The layout version is one this build does not speak.
    #[error(
        "unsupported segment layout version {found} (this build speaks {SEGMENT_LAYOUT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The segment holds a different kind of content than expected.
    #[error("segment kind {found} where kind {expected} was expected")]
    WrongKind {
        /// The kind found.
        found: u32,
        /// The kind expected.
        expected: u32,
    },
}

fn io(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> SegmentError {
    move |e| SegmentError::Io {
        op,
        source: e.into(),
    }
}

/// What a segment's data area holds (recorded in the header, checked on attach).
pub(crate) mod kind {
    /// Free-form data, addressed by the user.
    pub(crate) const RAW: u32 = 1;
    /// A bidirectional link: two ring control blocks and two ring data areas.
    pub(crate) const LINK: u32 = 2;
}

/// A shared-memory segment: a sealed memfd mapped into this process.
#[derive(Debug)]
pub struct Segment {
    file: File,
    map: MmapRaw,
    data_len: usize,
    generation: u64,
    creator_pid: u32,
}

impl Segment {
    /// Creates a segment whose data area holds at least `data_len` bytes
    /// (rounded up to whole pages), zero-filled.
    pub fn create(data_len: usize) -> Result<Segment, SegmentError> {
        Self::create_kind(data_len, kind::RAW)
    }

    pub(crate) fn create_kind(data_len: usize, kind: u32) -> Result<Segment, SegmentError> {
        let requested = data_len as u64;
        if data_len == 0 || requested > SEGMENT_MAX_DATA_LEN {
            return Err(SegmentError::InvalidSize {
                requested,
                max: SEGMENT_MAX_DATA_LEN,
            });
        }
        let page = rustix::param::page_size();
        let total = (SEGMENT_HEADER_LEN + data_len).next_multiple_of(page);
        let data_len = total - SEGMENT_HEADER_LEN;

        let fd = rustix::fs::memfd_create(
            "commy-segment",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io("memfd_create"))?;
        rustix::fs::ftruncate(&fd, total as u64).map_err(io("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL)
            .map_err(io("fcntl(F_ADD_SEALS)"))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(total)
            .map_raw(&file)
            .map_err(|source| SegmentError::Io { op: "mmap", source })?;

        let generation = fresh_generation();
        let creator_pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let seg = Segment {
            file,
            map,
            data_len,
            generation,
            creator_pid,
        };
        let h = seg.header();
        h.layout_version
            .store(SEGMENT_LAYOUT_VERSION, Ordering::Relaxed);
        h.kind.store(kind, Ordering::Relaxed);
        h.data_len.store(data_len as u64, Ordering::Relaxed);
        h.generation.store(generation, Ordering::Relaxed);
        h.creator_pid.store(creator_pid, Ordering::Relaxed);
        // SYNC: pairs with the Acquire load of `magic` in `attach`: a peer
        // that sees the magic sees the rest of the header. (The fd is passed
        // over a socket afterwards, which orders it anyway.)
        h.magic.store(SEGMENT_MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Attaches to a segment received from a peer, validating everything
    /// before use: the seals (so the file cannot shrink under us), the size,
    /// the magic number and the layout version.
    pub fn attach(fd: OwnedFd) -> Result<Segment, SegmentError> {
        Self::attach_kind(fd, kind::RAW)
    }

    pub(crate) fn attach_kind(fd: OwnedFd, expected_kind: u32) -> Result<Segment, SegmentError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(io("fcntl(F_GET_SEALS)"))?;
        if !seals.contains(REQUIRED_SEALS) {
            return Err(SegmentError::NotSealed {
                found: seals.bits(),
            });
        }
        let stat = rustix::fs::fstat(&fd).map_err(io("fstat"))?;
        let file_len = stat.st_size as u64;
        if file_len < SEGMENT_HEADER_LEN as u64 + 8 || file_len > SEGMENT_MAX_DATA_LEN {
            return Err(SegmentError::SizeMismatch {
                file_len,
                expected: SEGMENT_HEADER_LEN as u64 + 8,
            });
        }
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(file_len as usize)
            .map_raw(&file)
            .map_err(|source| SegmentError::Io { op: "mmap", source })?;
        let mut seg = Segment {
            file,
            map,
            data_len: file_len as usize - SEGMENT_HEADER_LEN,
            generation: 0,
            creator_pid: 0,
        };
        let h = seg.header();
        // SYNC: pairs with the Release store of `magic` in `create_kind`.
        let magic = h.magic.load(Ordering::Acquire);
        if magic != SEGMENT_MAGIC {
            return Err(SegmentError::BadMagic { found: magic });
        }
        let version = h.layout_version.load(Ordering::Relaxed);
        if version != SEGMENT_LAYOUT_VERSION {
            return Err(SegmentError::UnsupportedVersion { found: version });
        }
        let found_kind = h.kind.load(Ordering::Relaxed);
        if found_kind != expected_kind {
            return Err(SegmentError::WrongKind {
                found: found_kind,
                expected: expected_kind,
            });
        }
        let data_len = h.data_len.load(Ordering::Relaxed);
        if data_len.checked_add(SEGMENT_HEADER_LEN as u64) != Some(file_len) {
            return Err(SegmentError::SizeMismatch {
                file_len,
                expected: data_len.saturating_add(SEGMENT_HEADER_LEN as u64),
            });
        }
        let generation = h.generation.load(Ordering::Relaxed);
        let creator_pid = h.creator_pid.load(Ordering::Relaxed);
        seg.generation = generation;
        seg.creator_pid = creator_pid;
        Ok(seg)
    }

    fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least SEGMENT_HEADER_LEN bytes (checked in
        // create/attach), page-aligned (so aligned for the header), lives as
        // long as `self`, and the header consists only of atomics, for which
        // any bit pattern is valid and concurrent access from another process
        // is defined.
        unsafe { &*(self.map.as_ptr() as *const SegmentHeader) }
    }

    /// The descriptor, to pass to a peer.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Length of the data area in bytes (a whole number of pages minus the header).
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// A number unique to this segment's creation (random), recorded in the header.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The pid of the process that created the segment, as recorded in its
    /// header (a peer may lie; compare with the socket's peer credentials).
    pub fn creator_pid(&self) -> u32 {
        self.creator_pid
    }

    /// The data area viewed as 64-bit atomics, for cross-process counters and
    /// flags. Any bit pattern is a valid value, so this view is always sound.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the data area starts SEGMENT_HEADER_LEN (128, a multiple of
        // 8) bytes into a page-aligned mapping, spans `data_len` bytes (a
        // multiple of 8 since it is a page multiple minus 128), lives as long
        // as `self`, and is only ever accessed through atomics or raw
        // pointers, never through `&mut`, so shared references are sound.
        unsafe {
            std::slice::from_raw_parts(
                self.data_ptr() as *const AtomicU64,
                self.data_len / std::mem::size_of::<AtomicU64>(),
            )
        }
    }

    /// Start of the data area. Valid for `data_len()` bytes while `self` lives.
    pub(crate) fn data_ptr(&self) -> *mut u8 {
        // SAFETY: the mapping is SEGMENT_HEADER_LEN + data_len bytes long, so
        // the offset stays in bounds.
        unsafe { self.map.as_mut_ptr().add(SEGMENT_HEADER_LEN) }
    }
}

/// A generation number that differs between segments: time, pid and a
/// process-local counter mixed together.
fn fresh_generation() -> u64 {
    use std::sync::atomic::AtomicU64 as LocalCounter;
    #[allow(clippy::disallowed_types)] // a process-local counter, not shared memory
    static COUNTER: LocalCounter = LocalCounter::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u64;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    splitmix(t ^ pid.rotate_left(32) ^ splitmix(n))
}

/// The splitmix64 finaliser: a cheap, well-mixing 64-bit hash.
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_attach_roundtrip() {
        let seg = Segment::create(100).unwrap();
        assert_eq!(seg.data_len() % 8, 0);
        assert!(seg.data_len() >= 100);
        seg.words()[1].store(7, Ordering::Relaxed);
        let peer = Segment::attach(seg.as_fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(peer.words()[1].load(Ordering::Relaxed), 7);
        assert_eq!(peer.data_len(), seg.data_len());
        assert_eq!(peer.creator_pid(), std::process::id());
    }

    #[test]
    fn zero_size_is_rejected() {
        assert!(matches!(
            Segment::create(0),
            Err(SegmentError::InvalidSize { requested: 0, .. })
        ));
    }

    #[test]
    fn unsealed_memfd_is_rejected() {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        assert!(matches!(
            Segment::attach(fd),
            Err(SegmentError::NotSealed { .. })
        ));
    }

    #[test]
    fn garbage_header_is_rejected() {
        let seg = Segment::create(4096).unwrap();
        seg.header().magic.store(0xdead, Ordering::Relaxed);
        let err = Segment::attach(seg.as_fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(
            matches!(err, SegmentError::BadMagic { found: 0xdead }),
            "{err}"
        );
        seg.header().magic.store(SEGMENT_MAGIC, Ordering::Relaxed);
        seg.header().data_len.store(u64::MAX, Ordering::Relaxed);
        let err = Segment::attach(seg.as_fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(matches!(err, SegmentError::SizeMismatch { .. }), "{err}");
        seg.header().data_len.store(4096 - 128, Ordering::Relaxed);
        seg.header().layout_version.store(99, Ordering::Relaxed);
        let err = Segment::attach(seg.as_fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(
            matches!(err, SegmentError::UnsupportedVersion { found: 99 }),
            "{err}"
        );
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let seg = Segment::create_kind(4096, kind::LINK).unwrap();
        let err = Segment::attach(seg.as_fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(matches!(
            err,
            SegmentError::WrongKind {
                found: 2,
                expected: 1
            }
        ));
    }

    #[test]
    fn sealed_segment_cannot_shrink() {
        let seg = Segment::create(4096).unwrap();
        assert!(rustix::fs::ftruncate(seg.as_fd(), 0).is_err());
    }
}
