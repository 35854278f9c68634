//! The runtime directory: the private (0700) directory where a user's
//! instance sockets and regions live, resolved from `$COMMY_RUNTIME_DIR`,
//! `$XDG_RUNTIME_DIR` or `/tmp/commy-<uid>` and checked before use.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::uds::describe_file_type;

/// Environment variable that overrides the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "COMMY_RUNTIME_DIR";

/// The private per-user directory that holds Commy's sockets and regions.
///
/// Resolved as `$COMMY_RUNTIME_DIR` if set, else `$XDG_RUNTIME_DIR/commy`,
/// else `/tmp/commy-<euid>` (literally `/tmp`, not `$TMPDIR`, so that every
/// process of the user agrees on it). It is created with mode 0700 (missing
/// parents too), and whether created or found it must be a real directory
/// (not a symlink), owned by our effective uid, with no group/other
/// permission bits. Otherwise another user could have pre-created it (say
/// `/tmp/commy-1000`) to watch or hijack our sockets, and we refuse it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// Why a runtime directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeDirError {
    /// `$COMMY_RUNTIME_DIR` is set but empty (a mistake more often than a
    /// way to unset it).
    #[error("${RUNTIME_DIR_ENV} is set but empty (unset it, or set it to an absolute path)")]
    EmptyOverride,
    /// The path is relative (from `$COMMY_RUNTIME_DIR` or [`RuntimeDir::at`]).
    #[error(
        "runtime dir {} is not an absolute path (set ${RUNTIME_DIR_ENV} to an absolute path)",
        .path.display()
    )]
    NotAbsolute {
        /// The offending path.
        path: PathBuf,
    },
    /// A subdirectory name was absolute or contained `..`.
    #[error("invalid runtime subdirectory {}: only plain relative names are allowed", .name.display())]
    InvalidSubdir {
        /// The offending name.
        name: PathBuf,
    },
    /// Creating the directory (or a parent) failed.
    #[error("cannot create runtime dir {}: {source}", .path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the directory's metadata or fixing its mode failed.
    #[error("cannot inspect runtime dir {}: {source}", .path.display())]
    Inspect {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is a symbolic link.
    #[error(
        "runtime dir {} is a symbolic link; refusing it because whoever made the link decides \
         where our sockets go (remove it or set ${RUNTIME_DIR_ENV})",
        .path.display()
    )]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// The path exists but is not a directory.
    #[error("runtime dir {} exists but is a {kind}, not a directory", .path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The directory belongs to another user.
    #[error(
        "runtime dir {} is owned by uid {owner}, not by us (uid {expected}); refusing it because \
         its owner could read or replace our sockets",
        .path.display()
    )]
    WrongOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        expected: u32,
    },
    /// The directory grants access to group or others.
    #[error(
        "runtime dir {} has mode {mode:04o}, which lets group or others in; it must be 0700 \
         (fix with `chmod 700 {}`)",
        .path.display(), .path.display()
    )]
    TooPermissive {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory above the runtime dir lets anyone rename what is in it
    /// (world-writable without the sticky bit): another user could move
    /// the runtime dir away and put their own in its place.
    #[error(
        "{} (above the runtime dir) has mode {mode:04o}: anyone may rename what is in it;          use a runtime dir under a directory that is not world-writable, or has the sticky          bit (like /tmp)",
        .path.display()
    )]
    UnsafeAncestor {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Checks the directories above `path`: none may be world-writable without
/// the sticky bit. Those that do not exist yet are skipped (they will be
/// created private).
fn check_ancestors(path: &Path) -> Result<(), RuntimeDirError> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(RuntimeDirError::UnsafeAncestor {
                path: dir.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

impl RuntimeDir {
    /// Resolves the runtime directory from the environment (see the type
    /// docs), creates it if needed and checks it.
    pub fn resolve() -> Result<Self, RuntimeDirError> {
        Self::at(Self::default_path()?)
    }

    /// The path [`resolve`](Self::resolve) would use, without touching the
    /// file system.
    pub fn default_path() -> Result<PathBuf, RuntimeDirError> {
        resolve_path(
            std::env::var_os(RUNTIME_DIR_ENV),
            std::env::var_os("XDG_RUNTIME_DIR"),
            rustix::process::geteuid().as_raw(),
        )
    }

    /// Uses an explicit absolute directory, with the same creation and checks
    /// as [`resolve`](Self::resolve).
    pub fn at(path: impl Into<PathBuf>) -> Result<Self, RuntimeDirError> {
        let path = path.into();
        if !path.is_absolute() {
            return Err(RuntimeDirError::NotAbsolute { path });
        }
        check_ancestors(&path)?;
        let created = create_private_dir(&path)?;
        let euid = rustix::process::geteuid().as_raw();
        let meta = fs::symlink_metadata(&path).map_err(|source| RuntimeDirError::Inspect {
            path: path.clone(),
            source,
        })?;
        check_private_dir(&path, &meta, euid)?;
        if created && meta.mode() & 0o777 != 0o700 {
            // Our own fresh directory: the umask may have cleared owner bits
            // (group/other bits were rejected above, so the mode is narrower
            // than 0700). Give ourselves rwx.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(|source| {
                RuntimeDirError::Inspect {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(Self { path })
    }

    /// A private subdirectory (e.g. `<mesh>/<service>`), created with mode
    /// 0700 and checked like the runtime dir itself. `rel` must be a plain
    /// relative path without `..`.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> Result<Self, RuntimeDirError> {
        let rel = rel.as_ref();
        let plain = rel.components().next().is_some()
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(RuntimeDirError::InvalidSubdir {
                name: rel.to_path_buf(),
            });
        }
        Self::at(self.path.join(rel))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

/// The resolution rule, separated from the environment for testing.
fn resolve_path(
    commy: Option<OsString>,
    xdg: Option<OsString>,
    euid: u32,
) -> Result<PathBuf, RuntimeDirError> {
    if let Some(dir) = commy {
        if dir.is_empty() {
            return Err(RuntimeDirError::EmptyOverride);
        }
        let path = PathBuf::from(dir);
        if !path.is_absolute() {
            return Err(RuntimeDirError::NotAbsolute { path });
        }
        return Ok(path);
    }
    // The XDG base directory spec says relative values are invalid and must
    // be ignored.
    if let Some(xdg) = xdg.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Ok(xdg.join("commy"));
    }
    Ok(PathBuf::from(format!("/tmp/commy-{euid}")))
}

/// Creates `path` (mode 0700, parents too). Returns whether the last
/// component was created by this call.
fn create_private_dir(path: &Path) -> Result<bool, RuntimeDirError> {
    let create_err = |source| RuntimeDirError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        match fs::symlink_metadata(parent) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(create_err)?,
            Err(source) => {
                return Err(RuntimeDirError::Inspect {
                    path: parent.to_path_buf(),
                    source,
                });
            }
        }
    }
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(create_err(e)),
    }
}

fn check_private_dir(path: &Path, meta: &Metadata, euid: u32) -> Result<(), RuntimeDirError> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(RuntimeDirError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !ft.is_dir() {
        return Err(RuntimeDirError::NotADirectory {
            path: path.to_path_buf(),
            kind: describe_file_type(ft),
        });
    }
    if meta.uid() != euid {
        return Err(RuntimeDirError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: euid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(RuntimeDirError::TooPermissive {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn resolution_order() {
        let p = |c, x| resolve_path(c, x, 1000).unwrap();
        assert_eq!(p(os("/a/b"), os("/run/user/1000")), PathBuf::from("/a/b"));
        assert_eq!(
            p(None, os("/run/user/1000")),
            PathBuf::from("/run/user/1000/commy")
        );
        assert!(matches!(
            resolve_path(os(""), os("/x"), 1000),
            Err(RuntimeDirError::EmptyOverride)
        ));
        assert_eq!(p(None, None), PathBuf::from("/tmp/commy-1000"));
        // Relative XDG values are ignored, per the spec.
        assert_eq!(p(None, os("rel/dir")), PathBuf::from("/tmp/commy-1000"));
        assert_eq!(p(None, os("")), PathBuf::from("/tmp/commy-1000"));
    }

    #[test]
    fn a_world_writable_ancestor_without_the_sticky_bit_is_refused() {
        let base = std::env::temp_dir().join(format!("commy-ancestor-{}", std::process::id()));
        let open = base.join("open");
        fs::create_dir_all(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = RuntimeDir::at(open.join("rt")).unwrap_err();
        assert!(
            matches!(&err, RuntimeDirError::UnsafeAncestor { path, mode: 0o777 } if *path == open),
            "{err}"
        );
        assert!(!open.join("rt").exists(), "nothing was created");
        // With the sticky bit (like /tmp) it is fine.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        RuntimeDir::at(open.join("rt")).unwrap();
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn relative_override_is_an_error() {
        let err = resolve_path(os("rel"), os("/x"), 5).unwrap_err();
        assert!(matches!(err, RuntimeDirError::NotAbsolute { .. }), "{err}");
        assert!(err.to_string().contains("rel"), "{err}");
    }
}
