//! The directory regions live in: opening it, file locks with a timeout,
//! and removing a region file only while it is still the same file.

use super::*;

/// An open region directory.
pub(super) struct RegionDir {
    pub(super) fd: OwnedFd,
    pub(super) path: PathBuf,
}

impl RegionDir {
    /// Opens the explicit directory (creating it `0700` if missing) or the default one.
    pub(super) fn resolve(explicit: Option<&Path>) -> Result<RegionDir, RegionDirError> {
        let path = match explicit {
            Some(path) => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|source| RegionDirError::Io {
                        path: path.to_owned(),
                        source,
                    })?;
                path.to_owned()
            }
            None => default_region_dir()?,
        };
        RegionDir::open(&path).map_err(|e| RegionDirError::Io {
            path,
            source: e.into(),
        })
    }

    pub(super) fn open(path: &Path) -> Result<RegionDir, Errno> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RegionDir {
            fd,
            path: path.to_owned(),
        })
    }

    pub(super) fn try_clone(&self) -> Result<RegionDir, Errno> {
        Ok(RegionDir {
            fd: rustix::io::dup(&self.fd)?,
            path: self.path.clone(),
        })
    }

    /// Takes the directory lock that serialises removals. A fresh open file
    /// description each time, so it excludes other handles of this process too.
    pub(super) fn lock(&self, timeout: Duration) -> Result<OwnedFd, LockFail> {
        let fd = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LockFail::Io("open", e))?;
        flock_wait(&fd, FlockOperation::NonBlockingLockExclusive, timeout)?;
        Ok(fd)
    }
}

pub(super) enum LockFail {
    Timeout(Duration),
    Io(&'static str, Errno),
}

impl LockFail {
    pub(super) fn into_open_error(self, path: &Path, what: &'static str) -> RegionOpenError {
        match self {
            LockFail::Timeout(waited) => RegionOpenError::Timeout {
                path: path.to_owned(),
                what,
                waited,
            },
            LockFail::Io(op, e) => RegionOpenError::Io {
                path: path.to_owned(),
                op,
                source: e.into(),
            },
        }
    }
}

/// Retries a non-blocking `flock` operation until it succeeds or `timeout` passes.
pub(super) fn flock_wait(
    fd: impl AsFd,
    op: FlockOperation,
    timeout: Duration,
) -> Result<(), LockFail> {
    let mut backoff = Backoff::new(timeout);
    loop {
        match rustix::fs::flock(&fd, op) {
            Ok(()) => return Ok(()),
            Err(Errno::WOULDBLOCK | Errno::INTR) => {}
            Err(e) => return Err(LockFail::Io("flock", e)),
        }
        if !backoff.snooze() {
            return Err(LockFail::Timeout(backoff.waited()));
        }
    }
}

/// Whether `name` in `dir` is the file described by `st` (not followed if a symlink).
pub(super) fn same_file(dir: &RegionDir, name: &str, st: &Stat) -> Result<bool, Errno> {
    match rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(now) => Ok(now.st_dev == st.st_dev && now.st_ino == st.st_ino),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unlinks `name` if it still refers to the file `st`, under the directory
/// lock so that no other remover can swap the name in between. The caller
/// holds the file's exclusive lock (nobody holds the region).
pub(super) fn unlink_if_same(
    dir: &RegionDir,
    name: &str,
    st: &Stat,
    timeout: Duration,
) -> Result<bool, LockFail> {
    let _lock = dir.lock(timeout)?;
    if !same_file(dir, name, st).map_err(|e| LockFail::Io("stat", e))? {
        return Ok(false);
    }
    match rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(LockFail::Io("unlink", e)),
    }
}

/// The directory regions live in by default: `regions/` in the runtime
/// directory ([`RuntimeDir::resolve`]: `$COMMY_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/commy`, else `/tmp/commy-<euid>`), created with mode
/// `0700` if missing and, like the runtime directory, required to be a real
/// directory owned by our effective uid with no group or other access.
pub fn default_region_dir() -> Result<PathBuf, RegionDirError> {
    Ok(RuntimeDir::resolve()?.subdir("regions")?.path().to_owned())
}

/// Checks a region name: 1 to [`REGION_NAME_MAX`] bytes of `A-Z a-z 0-9 . _ -`,
/// not `.` or `..`.
pub fn validate_region_name(name: &str) -> Result<(), RegionNameError> {
    if name.is_empty() {
        return Err(RegionNameError::Empty);
    }
    if name.len() > REGION_NAME_MAX {
        return Err(RegionNameError::TooLong {
            len: name.len(),
            max: REGION_NAME_MAX,
        });
    }
    if let Some((index, ch)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(RegionNameError::InvalidChar {
            name: name.to_owned(),
            ch,
            index,
        });
    }
    if name == "." || name == ".." {
        return Err(RegionNameError::Reserved {
            name: name.to_owned(),
        });
    }
    Ok(())
}
