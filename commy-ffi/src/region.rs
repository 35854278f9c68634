//! Shared regions as bindings hold them, mappable without copying.
//!
//! A binding that can map memory safely on its side (Python's `mmap`) gets
//! the region's file as a new descriptor ([`FfiRegion::dup_fd`]) and the
//! offset of the data in it ([`FfiRegion::data_offset`]): its mapping is the
//! same shared memory every other holder sees. Others use the copying
//! [`read_at`](FfiRegion::read_at) / [`write_at`](FfiRegion::write_at),
//! which go through the region's seqlock (consistent snapshots, one writer
//! at a time).
//!
//! ```
//! use commy_ffi::{FfiMesh, MeshOptions, RegionOptions};
//!
//! # let dir = std::env::temp_dir().join(format!("commy-ffi-region-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! # let mut options = MeshOptions::default();
//! # options.settings.set("runtime_dir", dir.to_str().unwrap());
//! let mesh = FfiMesh::open(options)?;
//! let mut create = RegionOptions::default();
//! create.size = Some(4096);
//! let a = mesh.region("prices", create)?;
//! a.write_at(0, b"EURUSD 1.0842")?;
//!
//! let b = mesh.region("prices", RegionOptions::default())?; // opens the same one
//! assert_eq!(b.len(), 4096);
//! assert_eq!(b.read_at(0, 13)?, b"EURUSD 1.0842");
//!
//! let missing = mesh.region("nope", RegionOptions::default()).unwrap_err();
//! assert_eq!(missing.code_name(), "NOT_FOUND");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use commy_mesh::Code;
use commy_mesh::region::{Region, RegionAccessError, RegionOpenError};

use crate::error::FfiError;

/// Whether to open an existing region, create a new one, or either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenPolicy {
    /// It must exist (`NOT_FOUND` otherwise).
    Open,
    /// It must not exist (`ALREADY_EXISTS` otherwise); needs a size.
    Create,
    /// Open it, or create it if it does not exist; needs a size.
    OpenOrCreate,
}

/// How [`FfiMesh::region`](crate::FfiMesh::region) opens a region.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RegionOptions {
    /// Size of the data in bytes: required to create; when opening, the
    /// region must have exactly this size.
    pub size: Option<usize>,
    /// `None`: [`OpenPolicy::OpenOrCreate`] if a size is given, else
    /// [`OpenPolicy::Open`].
    pub policy: Option<OpenPolicy>,
    /// How long the region outlives its last holder (zero if `None`).
    pub ttl: Option<Duration>,
}

/// An open region; clones share the hold. The hold (reference count, file
/// lock) lasts until the last clone is dropped.
#[derive(Debug, Clone)]
pub struct FfiRegion {
    region: Arc<Region>,
}

impl FfiRegion {
    pub(crate) fn open(
        mut shm: commy_mesh::region::RegionOptions,
        name: &str,
        options: RegionOptions,
    ) -> Result<FfiRegion, FfiError> {
        if let Some(size) = options.size {
            shm = shm.size(size);
        }
        if let Some(ttl) = options.ttl {
            shm = shm.ttl(ttl);
        }
        let policy = options.policy.unwrap_or(if options.size.is_some() {
            OpenPolicy::OpenOrCreate
        } else {
            OpenPolicy::Open
        });
        let opened = match policy {
            OpenPolicy::Open => shm.open(),
            OpenPolicy::Create => shm.create(),
            OpenPolicy::OpenOrCreate => shm.open_or_create(),
        };
        let region = opened.map_err(|e| open_error(name, e))?;
        Ok(FfiRegion {
            region: Arc::new(region),
        })
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        self.region.name()
    }

    /// Size of the data in bytes.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Whether the data is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// Where the data starts in the region's file.
    pub fn data_offset(&self) -> usize {
        self.region.data_offset()
    }

    /// A new read-write descriptor of the region's file, owned by the
    /// caller: map the file with it (`data_offset()` .. `+ len()` is the
    /// data), then close it. Writes through such a mapping are plain memory
    /// writes that bypass the region's writer lock and seqlock.
    pub fn dup_fd(&self) -> Result<OwnedFd, FfiError> {
        self.region.try_clone_fd().map_err(|e| {
            FfiError::new(
                Code::ResourceExhausted,
                format!(
                    "cannot duplicate the descriptor of region {:?}: {e}",
                    self.name()
                ),
            )
        })
    }

    /// The region file's path.
    pub fn path(&self) -> std::path::PathBuf {
        self.region.path()
    }

    /// Processes (holds) that have the region open.
    pub fn refcount(&self) -> u64 {
        self.region.refcount()
    }

    /// A consistent copy of `len` bytes at `offset`.
    pub fn read_at(&self, offset: usize, len: usize) -> Result<Vec<u8>, FfiError> {
        // Checked before allocating: a huge length is a caller's mistake,
        // not a reason to run out of memory.
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(FfiError::new(
                Code::InvalidArgument,
                format!(
                    "reading {len} bytes at offset {offset} goes past the end of the {}-byte region",
                    self.len()
                ),
            ));
        }
        let mut buf = vec![0; len];
        self.region
            .read_at(offset, &mut buf)
            .map_err(access_error)?;
        Ok(buf)
    }

    /// Writes `data` at `offset` (one writer at a time; readers see all of
    /// it or none of it).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), FfiError> {
        self.region.write_at(offset, data).map_err(access_error)
    }
}

fn open_error(name: &str, e: RegionOpenError) -> FfiError {
    let code = match &e {
        RegionOpenError::InvalidName(_)
        | RegionOpenError::SizeRequired { .. }
        | RegionOpenError::InvalidSize { .. }
        | RegionOpenError::InvalidMode { .. } => Code::InvalidArgument,
        RegionOpenError::AlreadyExists { .. } => Code::AlreadyExists,
        RegionOpenError::NotFound { .. } => Code::NotFound,
        RegionOpenError::PermissionDenied { .. } | RegionOpenError::ForeignOwner { .. } => {
            Code::PermissionDenied
        }
        RegionOpenError::SizeMismatch { .. }
        | RegionOpenError::NotARegularFile { .. }
        | RegionOpenError::Corrupt { .. } => Code::FailedPrecondition,
        RegionOpenError::Timeout { .. } => Code::DeadlineExceeded,
        RegionOpenError::Contended { .. } => Code::Aborted,
        RegionOpenError::Dir(_) | RegionOpenError::Io { .. } => Code::Unavailable,
        _ => Code::Internal,
    };
    FfiError::new(code, format!("region {name:?}: {e}"))
}

fn access_error(e: RegionAccessError) -> FfiError {
    let code = match &e {
        RegionAccessError::OutOfBounds { .. } => Code::InvalidArgument,
        RegionAccessError::Timeout { .. } => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    FfiError::new(code, e.to_string())
}
