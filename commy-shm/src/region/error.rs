//! The errors of regions: why a name, an open, a header, a read or write,
//! a removal or a sweep failed.

use super::*;

/// Why a region name was rejected. Names are 1 to [`REGION_NAME_MAX`] bytes
/// of `A-Z a-z 0-9 . _ -`, and not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionNameError {
    /// The name is empty.
    #[error("region name is empty")]
    Empty,
    /// The name is longer than [`REGION_NAME_MAX`] bytes.
    #[error("region name is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Length of the name in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name contains a character outside `A-Z a-z 0-9 . _ -`.
    #[error(
        "region name {name:?} contains {ch:?} at byte {index}; only A-Z a-z 0-9 . _ - are allowed"
    )]
    InvalidChar {
        /// The rejected name.
        name: String,
        /// The first offending character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
    /// The name is `.` or `..`.
    #[error("region name {name:?} is reserved")]
    Reserved {
        /// The rejected name.
        name: String,
    },
}

/// Errors resolving or creating the directory regions live in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionDirError {
    /// The directory could not be created or opened.
    #[error("cannot create or open region directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The default directory (in the runtime directory) could not be used.
    #[error(transparent)]
    Runtime(#[from] RuntimeDirError),
}

/// Problems found in a region file's header (see the layout under
/// [`Region`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionHeaderError {
    /// The file is too small to hold a header.
    #[error("file is {file_len} bytes, smaller than a region header ({min} bytes)")]
    TooSmall {
        /// The file's size.
        file_len: u64,
        /// The smallest valid size.
        min: u64,
    },
    /// The file is larger than any region may be.
    #[error("file is {file_len} bytes, larger than any region may be")]
    TooLarge {
        /// The file's size.
        file_len: u64,
    },
    /// The magic number is wrong: this is not a Commy region.
    #[error("bad magic {found:#018x} (expected {REGION_MAGIC:#018x})")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The layout version is one this build does not speak.
    #[error("unsupported layout version {found} (this build speaks {REGION_LAYOUT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The header length is not a power of two between 4096 and 65536.
    #[error("invalid header length {found} (must be a power of two in 4096..=65536)")]
    BadHeaderLen {
        /// The value found.
        found: u32,
    },
    /// The data size is zero or above [`REGION_MAX_SIZE`].
    #[error("invalid data size {found} (must be 1..={REGION_MAX_SIZE})")]
    BadDataLen {
        /// The value found.
        found: u64,
    },
    /// Header length plus data size disagrees with the file size.
    #[error(
        "header describes {header_len} + {data_len} bytes (padded to a multiple of 8) \
         but the file is {file_len} bytes"
    )]
    SizeMismatch {
        /// The header length found.
        header_len: u32,
        /// The data size found.
        data_len: u64,
        /// The file's size.
        file_len: u64,
    },
}

/// Errors from [`RegionOptions::create`], [`open`](RegionOptions::open) and
/// [`open_or_create`](RegionOptions::open_or_create).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionOpenError {
    /// The region name is invalid.
    #[error(transparent)]
    InvalidName(#[from] RegionNameError),
    /// The region directory could not be resolved or created.
    #[error(transparent)]
    Dir(#[from] RegionDirError),
    /// Creating a region needs a size ([`RegionOptions::size`]).
    #[error("creating region {name:?} needs a size (RegionOptions::size)")]
    SizeRequired {
        /// The region name.
        name: String,
    },
    /// The requested size is zero or above [`REGION_MAX_SIZE`].
    #[error("invalid region size {requested} bytes (must be 1..={max})")]
    InvalidSize {
        /// The size asked for.
        requested: u64,
        /// The largest size allowed.
        max: u64,
    },
    /// The requested file mode has bits outside `0o777` or lacks owner read+write.
    #[error("invalid region mode {mode:#o} (must be within 0o777 and include 0o600)")]
    InvalidMode {
        /// The mode asked for.
        mode: u32,
    },
    /// [`create`](RegionOptions::create): a region of that name exists.
    #[error("region {path} already exists")]
    AlreadyExists {
        /// The region file.
        path: PathBuf,
    },
    /// [`open`](RegionOptions::open): no region of that name exists (or it
    /// had expired and has just been removed).
    #[error("region {path} does not exist")]
    NotFound {
        /// The region file.
        path: PathBuf,
    },
    /// The operating system refused access (file mode or directory permissions).
    #[error("permission denied for region {path}: {source}")]
    PermissionDenied {
        /// The region file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The region belongs to another user; see [`RegionOptions::allow_foreign_owner`].
    #[error(
        "region {path} is owned by uid {owner_uid}, not by us (uid {our_uid}); \
         use allow_foreign_owner(true) to open it anyway"
    )]
    ForeignOwner {
        /// The region file.
        path: PathBuf,
        /// The file's owner.
        owner_uid: u32,
        /// Our effective uid.
        our_uid: u32,
    },
    /// Something other than a regular file (a directory, a symlink, a FIFO) has the region's name.
    #[error("{path} is not a regular file, so it cannot be a region")]
    NotARegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The region exists with a different size than requested.
    #[error("region {path} holds {actual} bytes, not the {requested} bytes requested")]
    SizeMismatch {
        /// The region file.
        path: PathBuf,
        /// The size asked for.
        requested: u64,
        /// The region's size.
        actual: u64,
    },
    /// The file is not a valid region (corrupt or foreign header).
    #[error("{path} is not a valid region: {source}")]
    Corrupt {
        /// The region file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: RegionHeaderError,
    },
    /// A file lock was not obtained in time ([`RegionOptions::timeout`]).
    #[error("timed out after {waited:?} waiting for the {what} of {path}")]
    Timeout {
        /// The file or directory.
        path: PathBuf,
        /// Which lock.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// The region was removed and re-created under us too many times.
    #[error("gave up opening region {path} after {attempts} attempts lost to concurrent removal")]
    Contended {
        /// The region file.
        path: PathBuf,
        /// How many attempts were made.
        attempts: u32,
    },
    /// A system call failed.
    #[error("{op} failed for region {path}: {source}")]
    Io {
        /// The region file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Errors from reading and writing a [`Region`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionAccessError {
    /// The byte range lies outside the region.
    #[error("range {offset}..{offset}+{len} is outside region {name:?} of {region_len} bytes")]
    OutOfBounds {
        /// The region name.
        name: String,
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// The region's size.
        region_len: usize,
    },
    /// A live writer kept the region busy for longer than
    /// [`RegionOptions::timeout`] (a dead one would have been recovered).
    #[error(
        "timed out after {waited:?} waiting for {what} of region {name:?} \
         (writer lock held by pid {holder_pid:?})"
    )]
    Timeout {
        /// The region name.
        name: String,
        /// `"the writer lock"` or `"a consistent read"`.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
        /// The pid in the writer lock when we gave up, if it was held.
        holder_pid: Option<u32>,
    },
}

/// Errors from [`Region::remove`] and [`RegionOptions::remove`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionRemoveError {
    /// The region name is invalid.
    #[error(transparent)]
    InvalidName(#[from] RegionNameError),
    /// The region directory could not be resolved.
    #[error(transparent)]
    Dir(#[from] RegionDirError),
    /// The directory lock was not obtained in time.
    #[error("timed out after {waited:?} waiting for the lock on region directory {path}")]
    Timeout {
        /// The directory.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// A system call failed.
    #[error("{op} failed for region {path}: {source}")]
    Io {
        /// The region file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Errors from [`sweep_regions`]. Problems with individual files do not fail
/// a sweep; they are listed in the [`SweepReport`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    /// The directory could not be opened or listed.
    #[error("cannot sweep region directory {path}: {op} failed: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What a [`sweep_regions`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Regions removed because their TTL had passed and nobody held them.
    pub removed: Vec<String>,
    /// Regions whose reference count was stale (a holder died) and was reset;
    /// their TTL now counts from this sweep.
    pub repaired: Vec<String>,
    /// Leftover temporary files of crashed creators that were removed.
    pub temp_files_removed: Vec<String>,
    /// Files with a region name that are not valid regions; left in place.
    pub invalid: Vec<String>,
    /// Files that could not be inspected (for example permission denied).
    pub skipped: Vec<String>,
}
