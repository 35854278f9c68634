//! Named shared-memory regions: the "shared file" of Commy.
//!
//! A [`Region`] is a fixed-size block of shared memory that any process can
//! open by name. Unlike the rings (anonymous memfds handed over a socket), a
//! region may outlive every process that uses it, so it is a *file* in the
//! runtime directory (a tmpfs in the usual setups), mode `0600` by default.
//! It carries a reference count and a time to live (TTL): after the last
//! holder lets go, the file persists for `ttl` and is then removed by the next
//! [`sweep_regions`] (or by the next open of that name). A TTL of zero removes
//! the region as soon as its last holder drops it.
//!
//! ```
//! use commy_shm::RegionOptions;
//!
//! let dir = std::env::temp_dir().join(format!("commy-region-doc-{}", std::process::id()));
//! let writer = RegionOptions::new("prices").size(4096).dir(&dir).create()?;
//! writer.write_at(0, b"EURUSD 1.0842")?;
//!
//! // Any process of the same user can open it by name (here: the same one).
//! let reader = RegionOptions::new("prices").dir(&dir).open()?;
//! let mut quote = [0u8; 13];
//! reader.read_into(&mut quote)?; // a consistent snapshot, never a torn write
//! assert_eq!(&quote, b"EURUSD 1.0842");
//! assert_eq!(reader.refcount(), 2);
//! assert_eq!(reader.generation(), writer.generation());
//!
//! // The default TTL is zero: the last holder to let go removes the file.
//! drop((writer, reader));
//! assert!(RegionOptions::new("prices").dir(&dir).open().is_err());
//! std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! How regions are created, shared, cleaned up, recovered after crashes and
//! laid out in their files is described on [`Region`].
#![cfg(not(loom))]
// The atomics below come from `crate::sync::shm`, the sanctioned source for
// memory shared with other processes; clippy's disallowed-types check sees
// through the re-export and cannot tell.
#![allow(
    clippy::disallowed_types,
    reason = "shared-memory atomics come from crate::sync::shm"
)]

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::runtime_dir::{RuntimeDir, RuntimeDirError};
use crate::sync::shm::{AtomicU32, AtomicU64};
use crate::sync::{Ordering, fence, spin_hint, yield_now};

/// The magic number at offset 0 of every region file: `b"COMMYRGN"` little-endian.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"COMMYRGN");
/// The file layout version this build writes and accepts.
pub const REGION_LAYOUT_VERSION: u32 = 1;
/// The largest data size a region may have (1 TiB): a sanity bound on sizes
/// read from untrusted headers.
pub const REGION_MAX_SIZE: u64 = 1 << 40;
/// The longest region name, in bytes.
pub const REGION_NAME_MAX: usize = 255;

/// Smallest and largest header length (the data offset) a file may declare.
const MIN_HEADER_LEN: u32 = 4096;
const MAX_HEADER_LEN: u32 = 1 << 16;
/// Prefix of creators' temporary files; `~` cannot occur in a region name.
const TEMP_PREFIX: &str = ".~tmp-";
/// Temporary files younger than this are never swept (their creator may be
/// between `open` and `flock`).
const TEMP_GRACE: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MODE: u32 = 0o600;
/// How often open/create start over after losing a race before giving up.
const OPEN_ATTEMPTS: u32 = 64;
/// Bound on the directory-lock wait when a region is dropped.
const DROP_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// The header at offset 0 of a region file. All fields are atomics because
/// the memory is shared with processes that may write to it at any time.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    header_len: AtomicU32,
    data_len: AtomicU64,
    generation: AtomicU64,
    created_ns: AtomicU64,
    creator_pid: AtomicU32,
    _reserved0: AtomicU32,
    ttl_ms: AtomicU64,
    _reserved1: AtomicU64,
    // Second cache line: holder bookkeeping.
    refcount: AtomicU64,
    last_release_ms: AtomicU64,
    recoveries: AtomicU64,
    _reserved2: [AtomicU64; 5],
    // Third cache line: the seqlock.
    seq: AtomicU64,
    writer: AtomicU64,
}

const _: () = assert!(std::mem::offset_of!(Header, ttl_ms) == 48);
const _: () = assert!(std::mem::offset_of!(Header, refcount) == 64);
const _: () = assert!(std::mem::offset_of!(Header, seq) == 128);
const _: () = assert!(std::mem::offset_of!(Header, writer) == 136);
const _: () = assert!(std::mem::size_of::<Header>() <= MIN_HEADER_LEN as usize);

mod error;
pub use error::*;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// How to create or open a [`Region`]: a builder.
///
/// `size` is required to create and, when set, must match on open. `ttl` and
/// `mode` only apply when this call creates the region; an existing region
/// keeps the values it was created with.
#[derive(Debug, Clone)]
pub struct RegionOptions {
    name: String,
    size: Option<usize>,
    ttl: Duration,
    mode: u32,
    dir: Option<PathBuf>,
    allow_foreign_owner: bool,
    timeout: Duration,
}

impl RegionOptions {
    /// Options for the region called `name` (validated when used: 1 to
    /// [`REGION_NAME_MAX`] bytes of `A-Z a-z 0-9 . _ -`, not `.` or `..`).
    pub fn new(name: impl Into<String>) -> RegionOptions {
        RegionOptions {
            name: name.into(),
            size: None,
            ttl: Duration::ZERO,
            mode: DEFAULT_MODE,
            dir: None,
            allow_foreign_owner: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Size of the data area in bytes (1..=[`REGION_MAX_SIZE`]). Required to
    /// create; when opening, the existing region must have exactly this size.
    pub fn size(mut self, bytes: usize) -> RegionOptions {
        self.size = Some(bytes);
        self
    }

    /// How long the region outlives its last holder (default zero: it is
    /// removed when the last holder drops it). Millisecond resolution,
    /// rounded up. Only used when creating.
    pub fn ttl(mut self, ttl: Duration) -> RegionOptions {
        self.ttl = ttl;
        self
    }

    /// File permission bits (default `0o600`; must include `0o600`, nothing
    /// beyond `0o777`). Applied exactly, regardless of the umask. Only used
    /// when creating.
    pub fn mode(mut self, mode: u32) -> RegionOptions {
        self.mode = mode;
        self
    }

    /// The directory holding the region files (created with mode `0700` if
    /// missing) instead of [`default_region_dir`].
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> RegionOptions {
        self.dir = Some(dir.into());
        self
    }

    /// Whether [`open`](Self::open) accepts a region owned by another uid
    /// whose mode grants us access (default `false`). Such a region's owner
    /// can rewrite, truncate (`SIGBUS` for us) or remove it at any time.
    pub fn allow_foreign_owner(mut self, allow: bool) -> RegionOptions {
        self.allow_foreign_owner = allow;
        self
    }

    /// Upper bound on every wait: for file locks while opening, and for the
    /// writer lock and consistent reads of the resulting [`Region`]
    /// (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> RegionOptions {
        self.timeout = timeout;
        self
    }

    /// Creates the region; fails with [`RegionOpenError::AlreadyExists`] if
    /// a region of that name exists. Of any number of racing creators, in
    /// threads or processes, exactly one succeeds. The data is zero-filled.
    pub fn create(&self) -> Result<Region, RegionOpenError> {
        let size = self.checked_create_args()?;
        let dir = RegionDir::resolve(self.dir.as_deref())?;
        self.create_in(&dir, size)
    }

    /// Opens an existing region; fails with [`RegionOpenError::NotFound`] if
    /// there is none (a region whose TTL has passed with no holder counts as
    /// none and is removed on the way).
    pub fn open(&self) -> Result<Region, RegionOpenError> {
        validate_region_name(&self.name)?;
        let dir = RegionDir::resolve(self.dir.as_deref())?;
        match self.open_in(&dir)? {
            Some(region) => Ok(region),
            None => Err(RegionOpenError::NotFound {
                path: dir.path.join(&self.name),
            }),
        }
    }

    /// Opens the region, creating it if it does not exist. Racing callers
    /// all end up with the same region.
    pub fn open_or_create(&self) -> Result<Region, RegionOpenError> {
        let size = self.checked_create_args()?;
        let dir = RegionDir::resolve(self.dir.as_deref())?;
        for _ in 0..OPEN_ATTEMPTS {
            if let Some(region) = self.open_in(&dir)? {
                return Ok(region);
            }
            match self.create_in(&dir, size) {
                Err(RegionOpenError::AlreadyExists { .. }) => continue,
                other => return other,
            }
        }
        Err(RegionOpenError::Contended {
            path: dir.path.join(&self.name),
            attempts: OPEN_ATTEMPTS,
        })
    }

    /// Removes the region's name, like [`Region::remove`] but in the
    /// directory of these options. Returns whether a region was removed.
    pub fn remove(&self) -> Result<bool, RegionRemoveError> {
        validate_region_name(&self.name)?;
        let dir = RegionDir::resolve(self.dir.as_deref())?;
        let path = dir.path.join(&self.name);
        let _lock = dir.lock(self.timeout).map_err(|e| match e {
            LockFail::Timeout(waited) => RegionRemoveError::Timeout {
                path: dir.path.clone(),
                waited,
            },
            LockFail::Io(op, e) => RegionRemoveError::Io {
                path: dir.path.clone(),
                op,
                source: e.into(),
            },
        })?;
        match rustix::fs::unlinkat(&dir.fd, self.name.as_str(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(RegionRemoveError::Io {
                path,
                op: "unlink",
                source: e.into(),
            }),
        }
    }

    fn checked_create_args(&self) -> Result<usize, RegionOpenError> {
        validate_region_name(&self.name)?;
        let size = self.size.ok_or_else(|| RegionOpenError::SizeRequired {
            name: self.name.clone(),
        })?;
        if size == 0 || size as u64 > REGION_MAX_SIZE {
            return Err(RegionOpenError::InvalidSize {
                requested: size as u64,
                max: REGION_MAX_SIZE,
            });
        }
        if self.mode & !0o777 != 0 || self.mode & 0o600 != 0o600 {
            return Err(RegionOpenError::InvalidMode { mode: self.mode });
        }
        Ok(size)
    }

    /// Opens the region in `dir`; `None` if it does not exist (or had expired).
    fn open_in(&self, dir: &RegionDir) -> Result<Option<Region>, RegionOpenError> {
        let path = dir.path.join(&self.name);
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |e: Errno| RegionOpenError::Io {
                path,
                op,
                source: e.into(),
            }
        };
        for _ in 0..OPEN_ATTEMPTS {
            let file = match rustix::fs::openat(
                &dir.fd,
                self.name.as_str(),
                OFlags::RDWR
                    | OFlags::CLOEXEC
                    | OFlags::NOFOLLOW
                    | OFlags::NOCTTY
                    | OFlags::NONBLOCK,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                    return Err(RegionOpenError::PermissionDenied {
                        path,
                        source: e.into(),
                    });
                }
                Err(Errno::LOOP | Errno::ISDIR | Errno::NXIO) => {
                    return Err(RegionOpenError::NotARegularFile { path });
                }
                Err(e) => return Err(io_err("open")(e)),
            };
            let st = rustix::fs::fstat(&file).map_err(io_err("fstat"))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(RegionOpenError::NotARegularFile { path });
            }
            let our_uid = rustix::process::geteuid().as_raw();
            if st.st_uid != our_uid && !self.allow_foreign_owner {
                return Err(RegionOpenError::ForeignOwner {
                    path,
                    owner_uid: st.st_uid,
                    our_uid,
                });
            }
            // Nobody else holding it is the one moment the reference count
            // can be repaired; otherwise join the holders.
            let exclusive = match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            {
                Ok(()) => true,
                Err(Errno::WOULDBLOCK) => {
                    flock_wait(&file, FlockOperation::NonBlockingLockShared, self.timeout)
                        .map_err(|e| e.into_open_error(&path, "shared lock"))?;
                    false
                }
                Err(e) => return Err(io_err("flock")(e)),
            };
            // Swept or removed between our open and our lock: start over.
            if !same_file(dir, &self.name, &st).map_err(io_err("stat"))? {
                continue;
            }
            let mapped = Mapped::map(&file).map_err(|e| e.into_open_error(&path))?;
            let h = mapped.header();
            if exclusive {
                let now = now_ms();
                if h.refcount.load(Ordering::Relaxed) != 0
                    || h.last_release_ms.load(Ordering::Relaxed) > now
                {
                    // Holders died without releasing (or the clock went
                    // back): date the release to now.
                    h.last_release_ms.store(now, Ordering::Relaxed);
                }
                h.refcount.store(0, Ordering::Relaxed);
                if expired(h, now) {
                    let removed = unlink_if_same(dir, &self.name, &st, self.timeout)
                        .map_err(|e| e.into_open_error(&dir.path, "directory lock"))?;
                    if removed {
                        return Ok(None);
                    }
                    // The name was replaced meanwhile: look at the new file.
                    continue;
                }
                // Converting to a shared lock drops the exclusive one first,
                // so a sweeper may slip in: re-check the name afterwards.
                flock_wait(&file, FlockOperation::NonBlockingLockShared, self.timeout)
                    .map_err(|e| e.into_open_error(&path, "shared lock"))?;
                if !same_file(dir, &self.name, &st).map_err(io_err("stat"))? {
                    continue;
                }
            }
            if let Some(requested) = self.size
                && requested != mapped.data_len
            {
                return Err(RegionOpenError::SizeMismatch {
                    path,
                    requested: requested as u64,
                    actual: mapped.data_len as u64,
                });
            }
            saturating_increment(&h.refcount);
            let dir = dir.try_clone().map_err(io_err("dup"))?;
            return Ok(Some(Region::new(
                mapped,
                file,
                dir,
                &self.name,
                self.timeout,
            )));
        }
        Err(RegionOpenError::Contended {
            path,
            attempts: OPEN_ATTEMPTS,
        })
    }

    /// Creates and publishes the region in `dir`.
    fn create_in(&self, dir: &RegionDir, size: usize) -> Result<Region, RegionOpenError> {
        let path = dir.path.join(&self.name);
        let header_len =
            rustix::param::page_size().clamp(MIN_HEADER_LEN as usize, MAX_HEADER_LEN as usize);
        let file_len = header_len + size.next_multiple_of(8);
        let temp = TempFile {
            dir,
            name: format!("{TEMP_PREFIX}{}-{:016x}", own_pid(), fresh_generation()),
        };
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |e: Errno| RegionOpenError::Io {
                path,
                op,
                source: e.into(),
            }
        };
        let file = match rustix::fs::openat(
            &dir.fd,
            temp.name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(self.mode),
        ) {
            Ok(fd) => fd,
            Err(e @ (Errno::ACCESS | Errno::PERM | Errno::ROFS)) => {
                return Err(RegionOpenError::PermissionDenied {
                    path,
                    source: e.into(),
                });
            }
            Err(e) => return Err(io_err("create temporary file")(e)),
        };
        // Held from before publication to the end: a sweep never mistakes
        // our temporary file for a crashed creator's, and openers of the
        // published file always see a holder.
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared).map_err(io_err("flock"))?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(self.mode)).map_err(io_err("fchmod"))?;
        rustix::fs::ftruncate(&file, file_len as u64).map_err(io_err("ftruncate"))?;
        let map = MmapOptions::new()
            .len(file_len)
            .map_raw(&file)
            .map_err(|source| RegionOpenError::Io {
                path: path.clone(),
                op: "mmap",
                source,
            })?;
        // SAFETY: the mapping is `file_len` >= MIN_HEADER_LEN bytes, page
        // aligned, and lives until the end of this scope; the header is all
        // atomics, valid for any bits and for concurrent access.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        h.version.store(REGION_LAYOUT_VERSION, Ordering::Relaxed);
        h.header_len.store(header_len as u32, Ordering::Relaxed);
        h.data_len.store(size as u64, Ordering::Relaxed);
        h.generation.store(fresh_generation(), Ordering::Relaxed);
        h.created_ns.store(
            u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        h.creator_pid.store(own_pid(), Ordering::Relaxed);
        h.ttl_ms
            .store(duration_ms_ceil(self.ttl), Ordering::Relaxed);
        h.last_release_ms.store(
            u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        h.refcount.store(1, Ordering::Relaxed);
        // SYNC: pairs with the Acquire load of `magic` in `Mapped::map`: an
        // opener that sees the magic sees the rest of the header (link(2)
        // and open(2) order it anyway).
        h.magic.store(REGION_MAGIC, Ordering::Release);
        drop(map);
        // Validate what we wrote through the same code an opener uses.
        let mapped = Mapped::map(&file).map_err(|e| e.into_open_error(&path))?;
        let st = rustix::fs::fstat(&file).map_err(io_err("fstat"))?;
        match rustix::fs::linkat(
            &dir.fd,
            temp.name.as_str(),
            &dir.fd,
            self.name.as_str(),
            AtFlags::empty(),
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Err(RegionOpenError::AlreadyExists { path }),
            Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                return Err(RegionOpenError::PermissionDenied {
                    path,
                    source: e.into(),
                });
            }
            Err(e) => return Err(io_err("link")(e)),
        }
        drop(temp);
        debug_assert!(same_file(dir, &self.name, &st).unwrap_or(false));
        let dir = dir.try_clone().map_err(io_err("dup"))?;
        Ok(Region::new(mapped, file, dir, &self.name, self.timeout))
    }
}

/// A creator's temporary file, unlinked when dropped (after publication the
/// final name keeps the inode alive).
struct TempFile<'a> {
    dir: &'a RegionDir,
    name: String,
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        // Best effort: a leftover is removed by a later sweep.
        let _ = rustix::fs::unlinkat(&self.dir.fd, self.name.as_str(), AtFlags::empty());
    }
}

// ---------------------------------------------------------------------------
// Region
// ---------------------------------------------------------------------------

/// An open named shared-memory region.
///
/// Created or opened with [`RegionOptions`]:
///
/// ```
/// use commy_shm::{RegionOptions, sweep_regions};
/// use std::time::Duration;
///
/// let dir = std::env::temp_dir().join(format!("commy-region-ex-{}", std::process::id()));
/// let opts = RegionOptions::new("config").size(64).ttl(Duration::from_secs(30)).dir(&dir);
/// let region = opts.open_or_create()?; // every process may race this call
/// region.write(|data| data[..5].copy_from_slice(b"v=42;"))?;
/// assert_eq!(region.read(|data| data[..5].to_vec())?, b"v=42;");
/// drop(region);
///
/// // Unheld, the region lives on for its TTL; a sweep removes it afterwards.
/// assert_eq!(opts.open()?.read(|data| data[0])?, b'v');
/// assert!(sweep_regions(&dir)?.removed.is_empty());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Where regions live
///
/// [`RegionOptions::dir`] names the directory explicitly (created `0700` if
/// missing, used as it is otherwise: sharing regions between users needs a
/// directory they can all enter). Otherwise [`default_region_dir`] is used:
/// the `regions/` subdirectory of the private runtime directory
/// ([`RuntimeDir`]: `$COMMY_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/commy`, else
/// `/tmp/commy-<euid>`), both checked to be ours and mode `0700`.
///
/// # Creation, opening and permissions
///
/// [`create`](RegionOptions::create) builds the file under a unique temporary
/// name (`O_CREAT|O_EXCL`, the requested mode applied with `fchmod` so the
/// umask does not interfere), sizes it, writes and re-validates the header,
/// and only then publishes it with `link(2)` under its final name. `link`
/// fails if the name exists, so of any number of racing creators exactly one
/// wins and the others get [`RegionOpenError::AlreadyExists`]; an opener can
/// never see a half-initialised region. A creator that crashes leaves at most
/// a temporary file (`.~tmp-…`, a name no region can have), which
/// [`sweep_regions`] removes once it is a few seconds old.
///
/// [`open`](RegionOptions::open) checks, before it maps a byte: that the path
/// is a regular file (symlinks are not followed), that it is owned by our
/// effective uid, and then the header: magic, layout version, header length,
/// and that header plus data size equals the file size. The kernel enforces
/// the file mode, so a `0600` region of another user fails with
/// [`RegionOpenError::PermissionDenied`]. A region whose mode grants us access
/// but which belongs to another uid is refused as well
/// ([`RegionOpenError::ForeignOwner`]) unless
/// [`allow_foreign_owner`](RegionOptions::allow_foreign_owner) is set: its
/// owner can rewrite, truncate or remove it at any time, so sharing across
/// users must be a deliberate choice.
///
/// # Holders, reference count and TTL
///
/// Every open [`Region`] holds a shared `flock` on its file. The kernel drops
/// it when the process dies, so "does anybody hold this region" is always
/// answered correctly by trying a non-blocking exclusive lock, crash or not.
/// [`Region::refcount`] reports the header's counter, incremented on open and
/// decremented on drop; a process that dies with a region open leaves it too
/// high, so whoever next obtains the exclusive lock (an opener finding no other
/// holder, a dropping last holder, a sweep) resets it to zero and dates the
/// last release to that moment: the TTL of a region whose holders crashed
/// counts from when the crash was noticed.
///
/// Files are only ever removed by a process that holds the exclusive lock
/// (so nobody holds the region) and that, under a lock on the directory,
/// checks that the name still refers to the inode it locked; explicit
/// [`Region::remove`] takes the directory lock too. An opener that locked an
/// inode re-checks the name afterwards and starts over if the file was swept
/// in between.
///
/// # Consistent reads and the writer lock
///
/// Writers serialise on a lock word in the header and bump a sequence number
/// to odd before and to even after they modify the data (a seqlock). Readers
/// copy the data out and retry until they saw the same even sequence before
/// and after, so a read never returns a torn write. All copies to and from
/// the shared data use 64-bit atomic loads and stores, so concurrent access is
/// defined behaviour in Rust's memory model.
///
/// The lock word holds the owner's pid (high 32 bits) and the low 32 bits of
/// its start time from `/proc/<pid>/stat`, set with one compare-and-swap. A
/// waiter that finds the lock held checks the owner: a pid that no longer
/// exists, is a zombie, or now belongs to a process with a different start
/// time (pid reuse) is dead, and the waiter takes the lock over with another
/// compare-and-swap. A reader that keeps seeing an odd sequence does the same
/// and closes the interrupted write. Each takeover is counted in
/// [`Region::recoveries`]: the data may then contain a partial write. Waits
/// are bounded by [`RegionOptions::timeout`], so a writer that is alive but
/// stuck yields [`RegionAccessError::Timeout`], never a hang. The lock is not
/// fair (waiters back off to short sleeps), so under heavy contention with
/// long updates raise the timeout. Liveness is
/// judged by pid, so all users of a region must share a pid namespace.
///
/// # Residual risk: truncation
///
/// A process with write access to the file can `ftruncate` it, after which
/// our accesses to the vanished pages raise `SIGBUS`. Seals, which make memfd
/// segments immune, cannot be added to ordinary tmpfs files; checking the size
/// with `fstat` before each access would still leave a window between the
/// check and the access, and Rust offers no sound way to recover from the
/// signal. We check the size when opening and never truncate a published
/// region ourselves; with the default mode `0600` only processes of the same
/// user (which could equally kill or ptrace us) can do it.
///
/// # File layout (version 1)
///
/// All integers native-endian; the header is followed by the data at offset
/// `header length` (the creator's page size, at least 4096), and the file is
/// `header length + data size` rounded up to a multiple of 8 bytes.
///
/// | offset | size | field |
/// |-------:|-----:|-------|
/// | 0 | 8 | magic [`REGION_MAGIC`] (`b"COMMYRGN"` little-endian) |
/// | 8 | 4 | layout version [`REGION_LAYOUT_VERSION`] |
/// | 12 | 4 | header length (offset of the data) |
/// | 16 | 8 | data size in bytes |
/// | 24 | 8 | generation (random, unique per creation) |
/// | 32 | 8 | creation time, ns since the Unix epoch |
/// | 40 | 4 | creator pid |
/// | 48 | 8 | TTL in ms |
/// | 64 | 8 | reference count |
/// | 72 | 8 | last release, ms since the Unix epoch |
/// | 80 | 8 | dead-writer recoveries |
/// | 128 | 8 | seqlock sequence (odd while a write is in progress) |
/// | 136 | 8 | writer lock (0 = free, else `pid << 32 \| start-time low bits`) |
///
/// # Dropping
///
/// Dropping it releases our hold: the reference count goes down, and if we
/// were the last holder of a region with TTL zero, the file is removed. A
/// copy inherited by a child through `fork` is not a hold of its own:
/// dropping it in the child only unmaps it.
/// `Region` is `Send + Sync`; share it between threads with an `Arc`.
pub struct Region {
    map: MmapRaw,
    /// Holds our shared `flock` for as long as we hold the region.
    file: OwnedFd,
    dir: RegionDir,
    name: String,
    stat: Stat,
    header_len: usize,
    len: usize,
    generation: u64,
    creator_pid: u32,
    created: SystemTime,
    ttl: Duration,
    timeout: Duration,
    /// The process that opened it: a copy inherited through `fork` shares
    /// our open file description (and flock), so it must not release them.
    opener_pid: u32,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("name", &self.name)
            .field("dir", &self.dir.path)
            .field("len", &self.len)
            .field("generation", &format_args!("{:#018x}", self.generation))
            .field("creator_pid", &self.creator_pid)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Region {
    fn new(mapped: Mapped, file: OwnedFd, dir: RegionDir, name: &str, timeout: Duration) -> Region {
        let h = mapped.header();
        let generation = h.generation.load(Ordering::Relaxed);
        let creator_pid = h.creator_pid.load(Ordering::Relaxed);
        let created = UNIX_EPOCH
            .checked_add(Duration::from_nanos(h.created_ns.load(Ordering::Relaxed)))
            .unwrap_or(UNIX_EPOCH);
        let ttl = Duration::from_millis(h.ttl_ms.load(Ordering::Relaxed));
        Region {
            map: mapped.map,
            file,
            dir,
            name: name.to_owned(),
            stat: mapped.stat,
            header_len: mapped.header_len,
            len: mapped.data_len,
            generation,
            creator_pid,
            created,
            ttl,
            timeout,
            opener_pid: own_pid(),
        }
    }

    /// Removes the region called `name` from [`default_region_dir`]. Current
    /// holders keep their mappings (the memory lives until the last one
    /// drops it); the name is free for a new region at once. Returns whether
    /// a region was removed. Use [`RegionOptions::remove`] for another directory.
    pub fn remove(name: &str) -> Result<bool, RegionRemoveError> {
        RegionOptions::new(name).remove()
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The region's file.
    pub fn path(&self) -> PathBuf {
        self.dir.path.join(&self.name)
    }

    /// Size of the data area in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the data area is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A random number unique to this region's creation: two handles with the
    /// same generation refer to the same region, not to a re-created namesake.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The pid of the process that created the region (as its header says).
    pub fn creator_pid(&self) -> u32 {
        self.creator_pid
    }

    /// When the region was created (as its header says).
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// How long the region outlives its last holder.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The number of open handles according to the header: incremented on
    /// open, decremented on drop, reset when a process finds itself the only
    /// holder. Too high while holders that crashed have not been noticed yet.
    pub fn refcount(&self) -> u64 {
        self.header().refcount.load(Ordering::Relaxed)
    }

    /// How many times a process took over the writer lock from a writer that
    /// had died holding it (or closed a write left open in a corrupt header).
    /// Each such event may have left a partial write in the data.
    pub fn recoveries(&self) -> u64 {
        self.header().recoveries.load(Ordering::Relaxed)
    }

    /// Copies a consistent snapshot of the whole data area and passes it to
    /// `f`. Retries while writers are active, up to the timeout.
    pub fn read<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, RegionAccessError> {
        let mut buf = vec![0u8; self.len];
        self.read_at(0, &mut buf)?;
        Ok(f(&buf))
    }

    /// Fills `buf` with a consistent snapshot of the first `buf.len()` bytes.
    pub fn read_into(&self, buf: &mut [u8]) -> Result<(), RegionAccessError> {
        self.read_at(0, buf)
    }

    /// Fills `buf` with a consistent snapshot of the bytes at `offset..`:
    /// never a mix of two writes. Waits (spin, yield, then sleep) while a
    /// write is in progress; a writer that died mid-write is detected and its
    /// write closed (see [`recoveries`](Self::recoveries)); a live writer that
    /// keeps the region busy beyond the timeout yields
    /// [`RegionAccessError::Timeout`].
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegionAccessError> {
        self.check_range(offset, buf.len())?;
        let h = self.header();
        let words = self.words();
        let mut backoff = Backoff::new(self.timeout);
        loop {
            // SYNC: pairs with the Release store that ends a write in
            // `WriteGuard::end`: seeing its even value makes its data visible.
            let before = h.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                copy_out(words, offset, buf);
                // SYNC: pairs with the Release fence in `WriteGuard::begin`:
                // if a load above saw data of a write that started after
                // `before`, the load below sees that write's odd sequence.
                fence(Ordering::Acquire);
                if h.seq.load(Ordering::Relaxed) == before {
                    return Ok(());
                }
            } else if backoff.is_sleeping() {
                self.close_abandoned_write();
            }
            if !backoff.snooze() {
                return Err(self.timeout_error("a consistent read", backoff.waited()));
            }
        }
    }

    /// Runs `f` on a copy of the data area under the writer lock and stores
    /// the result back, so readers see the whole update or none of it. If
    /// `f` panics, nothing is written and the lock is released.
    ///
    /// This copies the whole region twice; for large regions prefer
    /// [`write_at`](Self::write_at) or [`write_in_place`](Self::write_in_place).
    /// Not reentrant: `f` must not write to this region (that would wait for
    /// the lock it holds, until the timeout).
    pub fn write<T>(&self, f: impl FnOnce(&mut [u8]) -> T) -> Result<T, RegionAccessError> {
        let mut guard = self.lock_writer()?;
        let words = self.words();
        let mut buf = vec![0u8; self.len];
        copy_out(words, 0, &mut buf);
        let out = f(&mut buf);
        guard.begin();
        copy_in(words, 0, &buf);
        guard.end();
        Ok(out)
    }

    /// Writes `data` at `offset` under the writer lock; readers see all of it
    /// or none of it.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), RegionAccessError> {
        self.check_range(offset, data.len())?;
        let mut guard = self.lock_writer()?;
        guard.begin();
        copy_in(self.words(), offset, data);
        guard.end();
        Ok(())
    }

    /// Zero-copy write: takes the writer lock, marks a write in progress
    /// (readers wait), and passes `f` the raw data area (`len()` bytes,
    /// aligned to 8). Dereferencing the pointer is up to `f` and `unsafe`:
    /// the memory is shared with other processes, readers of this process
    /// access it with atomics, so writes through the pointer should be atomic
    /// or volatile, and `f` must not keep the pointer. If `f` panics, the
    /// write is ended with whatever `f` had written. `f` must not read or
    /// write this region through its methods: they would wait for this very
    /// write and fail with [`RegionAccessError::Timeout`].
    pub fn write_in_place<T>(
        &self,
        f: impl FnOnce(*mut [u8]) -> T,
    ) -> Result<T, RegionAccessError> {
        let mut guard = self.lock_writer()?;
        guard.begin();
        let out = f(self.as_raw_slice());
        guard.end();
        Ok(out)
    }

    /// Where the data area starts in the region's file, in bytes (the
    /// header length: the creator's page size, at least 4096). With
    /// [`try_clone_fd`](Self::try_clone_fd), a binding maps the file itself
    /// (e.g. Python's `mmap`) and uses the bytes from this offset on, for
    /// `len()` bytes.
    pub fn data_offset(&self) -> usize {
        self.header_len
    }

    /// A new descriptor of the region's file (read-write, close-on-exec),
    /// for mapping the same memory elsewhere without copying. It shares our
    /// open file description, so it keeps our hold's file lock; the hold
    /// itself (reference count, TTL) stays with `self`. Accesses through
    /// such a mapping bypass the writer lock and the seqlock, exactly like
    /// [`as_raw_slice`](Self::as_raw_slice).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.file.try_clone()
    }

    /// The raw data area (`len()` bytes, aligned to 8), valid while `self`
    /// lives, for zero-copy users such as a Python `memoryview`.
    ///
    /// Obtaining the pointer is safe; using it is `unsafe` and bypasses the
    /// writer lock and the seqlock. The caller must make sure that: accesses
    /// stay within `len()` bytes and end before `self` is dropped; no
    /// reference (`&[u8]`/`&mut [u8]`) is formed over bytes another thread or
    /// process may write meanwhile (use atomic or volatile accesses); and
    /// any process writing this way coordinates with the others itself,
    /// since readers using [`read`](Self::read) are not protected from it.
    pub fn as_raw_slice(&self) -> *mut [u8] {
        std::ptr::slice_from_raw_parts_mut(self.data_ptr(), self.len)
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least MIN_HEADER_LEN bytes (checked in
        // `Mapped::map`), page-aligned, and lives as long as `self`; the header
        // is all atomics, valid for any bit pattern and for concurrent access
        // by other processes.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: `Mapped::map` checked that the file (and so the mapping) is
        // `header_len` plus the padded data size long, so the data area
        // starts inside the mapping.
        unsafe { self.map.as_mut_ptr().add(self.header_len) }
    }

    /// The data area (padded to whole words) as 64-bit atomics.
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the data area starts `header_len` (a power of two >= 4096)
        // bytes into a page-aligned mapping, so it is 8-aligned; it spans
        // `len` rounded up to 8 bytes, inside the mapping (`Mapped::map`
        // checked the file size); it lives as long as `self`; and this crate
        // only accesses it through atomics, so shared references are sound.
        unsafe {
            std::slice::from_raw_parts(self.data_ptr() as *const AtomicU64, self.len.div_ceil(8))
        }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), RegionAccessError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RegionAccessError::OutOfBounds {
                name: self.name.clone(),
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    fn timeout_error(&self, what: &'static str, waited: Duration) -> RegionAccessError {
        let holder = self.header().writer.load(Ordering::Relaxed);
        RegionAccessError::Timeout {
            name: self.name.clone(),
            what,
            waited,
            holder_pid: (holder != 0).then_some((holder >> 32) as u32),
        }
    }

    /// Takes the cross-process writer lock, taking it over from a dead owner.
    fn lock_writer(&self) -> Result<WriteGuard<'_>, RegionAccessError> {
        let h = self.header();
        let me = own_token();
        let mut backoff = Backoff::new(self.timeout);
        loop {
            let current = h.writer.load(Ordering::Relaxed);
            if current == 0 || (backoff.is_sleeping() && holder_dead(current)) {
                // SYNC: Acquire pairs with the Release in `WriteGuard::drop`
                // of the previous owner: its data and sequence stores are
                // visible to us.
                if h.writer
                    .compare_exchange(current, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    if current != 0 {
                        h.recoveries.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(WriteGuard {
                        header: h,
                        token: me,
                        odd: None,
                    });
                }
                continue;
            }
            if !backoff.snooze() {
                return Err(self.timeout_error("the writer lock", backoff.waited()));
            }
        }
    }

    /// A reader saw an odd sequence for a while: if the writer lock is free
    /// (a corrupt header) or its owner is dead, take the lock and close the
    /// abandoned write so readers can proceed.
    fn close_abandoned_write(&self) {
        let h = self.header();
        let current = h.writer.load(Ordering::Relaxed);
        if current != 0 && !holder_dead(current) {
            return;
        }
        let me = own_token();
        // SYNC: Acquire pairs with the Release in `WriteGuard::drop`.
        if h.writer
            .compare_exchange(current, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let guard = WriteGuard {
            header: h,
            token: me,
            odd: None,
        };
        let seq = h.seq.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            // SYNC: pairs with the Acquire load in `read_at`.
            h.seq.store(seq.wrapping_add(1), Ordering::Release);
        }
        if current != 0 || seq & 1 == 1 {
            h.recoveries.fetch_add(1, Ordering::Relaxed);
        }
        drop(guard);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if own_pid() != self.opener_pid {
            // A child's copy after fork: the hold is the parent's.
            return;
        }
        let h = self.header();
        h.refcount
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            })
            .ok();
        let now = now_ms();
        h.last_release_ms.store(now, Ordering::Relaxed);
        // Converting our shared lock to an exclusive one succeeds only if
        // nobody else holds the region (if it fails we hold no lock at all,
        // which is fine: we are leaving).
        if rustix::fs::flock(&self.file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            h.refcount.store(0, Ordering::Relaxed);
            if expired(h, now) {
                // Best effort: if this fails, a later sweep removes it.
                let _ = unlink_if_same(&self.dir, &self.name, &self.stat, DROP_LOCK_TIMEOUT);
            }
        }
    }
}

/// Holds the writer lock; ends an open write and releases the lock on drop.
struct WriteGuard<'a> {
    header: &'a Header,
    token: u64,
    /// The odd sequence value of the write in progress, if one is.
    odd: Option<u64>,
}

impl WriteGuard<'_> {
    /// Marks a write in progress: the sequence becomes odd (it may already be
    /// odd if we took the lock over from a writer that died mid-write).
    fn begin(&mut self) {
        let seq = self.header.seq.load(Ordering::Relaxed);
        let odd = seq | 1;
        if odd != seq {
            self.header.seq.store(odd, Ordering::Relaxed);
        }
        // SYNC: pairs with the Acquire fence in `Region::read_at`: the odd
        // sequence is ordered before every data store that follows.
        fence(Ordering::Release);
        self.odd = Some(odd);
    }

    /// Ends the write in progress: the sequence becomes even again.
    fn end(&mut self) {
        if let Some(odd) = self.odd.take() {
            // SYNC: pairs with the Acquire load at the start of
            // `Region::read_at`: the data stores are visible with it.
            self.header
                .seq
                .store(odd.wrapping_add(1), Ordering::Release);
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.end();
        // SYNC: pairs with the Acquire compare-exchange of the next owner in
        // `lock_writer` / `close_abandoned_write`. A failure means a peer
        // judged us dead and took over; the lock is not ours to release then.
        let _ = self.header.writer.compare_exchange(
            self.token,
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }
}

/// Copies `dst.len()` bytes starting at byte `offset` of `words` out with
/// relaxed atomic loads. The caller checked the range.
fn copy_out(words: &[AtomicU64], offset: usize, dst: &mut [u8]) {
    let mut pos = offset;
    let mut done = 0;
    while done < dst.len() {
        let (word, skip) = (pos / 8, pos % 8);
        let n = (8 - skip).min(dst.len() - done);
        let bytes = words[word].load(Ordering::Relaxed).to_ne_bytes();
        dst[done..done + n].copy_from_slice(&bytes[skip..skip + n]);
        pos += n;
        done += n;
    }
}

/// Copies `src` into `words` at byte `offset` with relaxed atomic stores;
/// partial words are merged (the caller holds the writer lock, so nobody else
/// stores to them). The caller checked the range.
fn copy_in(words: &[AtomicU64], offset: usize, src: &[u8]) {
    let mut pos = offset;
    let mut done = 0;
    while done < src.len() {
        let (word, skip) = (pos / 8, pos % 8);
        let n = (8 - skip).min(src.len() - done);
        let value = if n == 8 {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&src[done..done + 8]);
            u64::from_ne_bytes(bytes)
        } else {
            let mut bytes = words[word].load(Ordering::Relaxed).to_ne_bytes();
            bytes[skip..skip + n].copy_from_slice(&src[done..done + n]);
            u64::from_ne_bytes(bytes)
        };
        words[word].store(value, Ordering::Relaxed);
        pos += n;
        done += n;
    }
}

// ---------------------------------------------------------------------------
// Mapping and header validation
// ---------------------------------------------------------------------------

/// A validated mapping of a whole region file.
struct Mapped {
    map: MmapRaw,
    stat: Stat,
    header_len: usize,
    data_len: usize,
}

enum MapError {
    Io(&'static str, io::Error),
    Header(RegionHeaderError),
}

impl MapError {
    fn into_open_error(self, path: &Path) -> RegionOpenError {
        match self {
            MapError::Io(op, source) => RegionOpenError::Io {
                path: path.to_owned(),
                op,
                source,
            },
            MapError::Header(source) => RegionOpenError::Corrupt {
                path: path.to_owned(),
                source,
            },
        }
    }
}

impl Mapped {
    /// Maps `file` and validates its header against its size. Nothing beyond
    /// the first `size_of::<Header>()` bytes is touched before the size is
    /// known to cover it.
    fn map(file: &OwnedFd) -> Result<Mapped, MapError> {
        let stat = rustix::fs::fstat(file).map_err(|e| MapError::Io("fstat", e.into()))?;
        let file_len = u64::try_from(stat.st_size).unwrap_or(0);
        let min = std::mem::size_of::<Header>() as u64;
        if file_len < min {
            return Err(MapError::Header(RegionHeaderError::TooSmall {
                file_len,
                min,
            }));
        }
        let max = u64::from(MAX_HEADER_LEN) + REGION_MAX_SIZE;
        let map_len = match usize::try_from(file_len) {
            Ok(len) if file_len <= max => len,
            _ => return Err(MapError::Header(RegionHeaderError::TooLarge { file_len })),
        };
        let map = MmapOptions::new()
            .len(map_len)
            .map_raw(file)
            .map_err(|e| MapError::Io("mmap", e))?;
        // SAFETY: the mapping is at least size_of::<Header>() bytes (checked
        // above), page-aligned, and outlives `h` (dropped before `map` moves);
        // the header is all atomics, valid for any bits.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        // SYNC: pairs with the Release store of `magic` in `create_in`.
        let magic = h.magic.load(Ordering::Acquire);
        if magic != REGION_MAGIC {
            return Err(MapError::Header(RegionHeaderError::BadMagic {
                found: magic,
            }));
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != REGION_LAYOUT_VERSION {
            return Err(MapError::Header(RegionHeaderError::UnsupportedVersion {
                found: version,
            }));
        }
        let header_len = h.header_len.load(Ordering::Relaxed);
        if !header_len.is_power_of_two() || !(MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len)
        {
            return Err(MapError::Header(RegionHeaderError::BadHeaderLen {
                found: header_len,
            }));
        }
        let data_len = h.data_len.load(Ordering::Relaxed);
        if data_len == 0 || data_len > REGION_MAX_SIZE {
            return Err(MapError::Header(RegionHeaderError::BadDataLen {
                found: data_len,
            }));
        }
        // No overflow: both terms are bounded above.
        if u64::from(header_len) + data_len.next_multiple_of(8) != file_len {
            return Err(MapError::Header(RegionHeaderError::SizeMismatch {
                header_len,
                data_len,
                file_len,
            }));
        }
        // Both fit in usize: their sum is `map_len`.
        Ok(Mapped {
            header_len: header_len as usize,
            data_len: data_len as usize,
            map,
            stat,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: as in `map`: validated size, page-aligned, lives as long as
        // `self`, all-atomic header.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }
}

fn expired(h: &Header, now_ms: u64) -> bool {
    let last = h.last_release_ms.load(Ordering::Relaxed);
    now_ms >= last.saturating_add(h.ttl_ms.load(Ordering::Relaxed))
}

fn saturating_increment(counter: &AtomicU64) {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_add(1))
        })
        .ok();
}

mod dir;
use dir::{LockFail, RegionDir, flock_wait, same_file, unlink_if_same};
pub use dir::{default_region_dir, validate_region_name};

mod sweep;
pub use sweep::sweep_regions;

// ---------------------------------------------------------------------------
// Time, identity, liveness
// ---------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn duration_ms_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn own_pid() -> u32 {
    rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs()
}

/// Our writer-lock token: pid in the high half, low bits of our start time
/// in the low half. Recomputed after `fork` (the pid changes).
fn own_token() -> u64 {
    thread_local! {
        static CACHE: std::cell::Cell<(u32, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    let pid = own_pid();
    CACHE.with(|cache| {
        let (cached_pid, token) = cache.get();
        if cached_pid == pid {
            return token;
        }
        let start = proc_stat(pid).map_or(0, |(_, start)| start as u32);
        let token = (u64::from(pid) << 32) | u64::from(start);
        cache.set((pid, token));
        token
    })
}

/// State character and start time (clock ticks since boot) of `pid`, from
/// `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(u8, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) is parenthesised and may contain anything; fields 3..
    // follow the last ')'. Field 22 is the start time.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether the owner named by a writer-lock token is gone: no such process,
/// a zombie, or a different process that reuses the pid.
fn holder_dead(token: u64) -> bool {
    let pid = (token >> 32) as u32;
    let start = token as u32;
    let Some(raw) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return true;
    };
    let me = own_token();
    if pid == (me >> 32) as u32 {
        // Our pid: alive only if it is really us (another of our threads).
        return token != me;
    }
    if rustix::process::test_kill_process(raw) == Err(Errno::SRCH) {
        return true;
    }
    match proc_stat(pid) {
        Some((state, started)) => {
            matches!(state, b'Z' | b'X') || (start != 0 && started as u32 != start)
        }
        // It vanished between the two checks (or there is no /proc).
        None => Path::new("/proc/self/stat").exists(),
    }
}

/// A number unique to one region creation: OS-seeded randomness from the
/// standard library's hasher keys, mixed with time, pid and a counter.
fn fresh_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static COUNTER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let n = COUNTER.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n);
    hasher.write_u32(own_pid());
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish().max(1)
}

/// Spin, then yield, then sleep (16 µs doubling to 1 ms), up to a time limit.
struct Backoff {
    start: Instant,
    limit: Duration,
    step: u32,
}

impl Backoff {
    const SPIN_STEPS: u32 = 6;
    const YIELD_STEPS: u32 = 12;

    fn new(limit: Duration) -> Backoff {
        Backoff {
            start: Instant::now(),
            limit,
            step: 0,
        }
    }

    /// Whether we are past spinning and yielding (time to check for dead owners).
    fn is_sleeping(&self) -> bool {
        self.step >= Self::YIELD_STEPS
    }

    fn waited(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits a little; false once the time limit has passed.
    fn snooze(&mut self) -> bool {
        if self.step < Self::SPIN_STEPS {
            for _ in 0..(1u32 << self.step) {
                spin_hint();
            }
        } else if self.step < Self::YIELD_STEPS {
            yield_now();
        } else {
            let doublings = (self.step - Self::YIELD_STEPS).min(6);
            std::thread::sleep(Duration::from_micros(16 << doublings));
        }
        self.step = self.step.saturating_add(1);
        self.start.elapsed() < self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn copies_roundtrip_at_every_alignment() {
        let w = words(4);
        for offset in 0..16 {
            for len in 0..=(32 - offset) {
                let src: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(7).wrapping_add(offset as u8))
                    .collect();
                for x in &w {
                    x.store(u64::MAX, Ordering::Relaxed);
                }
                copy_in(&w, offset, &src);
                let mut all = [0u8; 32];
                copy_out(&w, 0, &mut all);
                assert!(all[..offset].iter().all(|&b| b == 0xff));
                assert_eq!(&all[offset..offset + len], &src[..]);
                assert!(all[offset + len..].iter().all(|&b| b == 0xff));
                let mut back = vec![0u8; len];
                copy_out(&w, offset, &mut back);
                assert_eq!(back, src);
            }
        }
    }

    #[test]
    fn own_process_is_alive_and_garbage_tokens_are_dead() {
        let me = own_token();
        assert!(!holder_dead(me));
        assert!(
            holder_dead(me ^ 1),
            "same pid, different start time is a dead predecessor"
        );
        assert!(holder_dead(0x7fff_fff0_u64 << 32));
        assert!(holder_dead(u64::MAX));
    }

    #[test]
    fn ttl_rounds_up_to_milliseconds() {
        assert_eq!(duration_ms_ceil(Duration::ZERO), 0);
        assert_eq!(duration_ms_ceil(Duration::from_micros(1)), 1);
        assert_eq!(duration_ms_ceil(Duration::from_millis(1500)), 1500);
        assert_eq!(duration_ms_ceil(Duration::MAX), u64::MAX);
    }
}
