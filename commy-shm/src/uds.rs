//! Unix-domain sockets for the shared-memory handshake: the private runtime
//! directory, a listener that replaces stale socket paths safely, peer
//! credentials (`SO_PEERCRED`) with an admission policy, and message passing
//! with file descriptors (`SCM_RIGHTS`).
//!
//! A server instance binds a [`UdsListener`] in the [`RuntimeDir`](crate::RuntimeDir); a client
//! [`UdsStream::connect`]s; the server checks the [`PeerCred`] it got from
//! [`UdsListener::accept`] against a [`PeerPolicy`] and passes the ring memfds
//! with [`UdsStream::send_msg`]. The connection then stays open as the
//! liveness channel: [`UdsStream::wait_peer_gone`] returns as soon as the peer
//! process dies, however it dies (the kernel closes its sockets).
//!
//! # Socket type
//!
//! Sockets are `SOCK_SEQPACKET`: connection-oriented (so `SO_PEERCRED`, EOF on
//! peer death and `accept` work as for a stream) but each [`send_msg`] is one
//! record with its boundaries kept, delivered whole or not at all, and the
//! descriptors travel with exactly that record. With `SOCK_STREAM` a handshake
//! message could arrive split or glued to the next, and `SCM_RIGHTS` would be
//! attached to whichever byte range the kernel chose; every reader would need
//! its own framing layer. A consequence: a zero-length record would be
//! indistinguishable from end-of-file, so [`send_msg`] refuses empty messages.
//!
//! # Stale sockets and races
//!
//! A process that crashes leaves its socket file behind. [`UdsListener::bind`]
//! binds and starts listening under a private temporary name (a dot-file in
//! the same directory), then publishes it with an atomic
//! `rename(RENAME_NOREPLACE)`. So a socket at its final path is always already
//! listening, and "connection refused" reliably means "stale". A stale socket
//! is swapped out with `RENAME_EXCHANGE` and deleted only after checking that
//! the file swapped out is the very inode that was probed; non-sockets are
//! never deleted. Directory scanners should skip dot-files and use
//! [`remove_stale_socket`] rather than unlinking on their own.
//!
//! [`send_msg`]: UdsStream::send_msg
//!
//! # Example
//!
//! ```
//! use std::fs::File;
//! use std::io::Write;
//! use std::os::fd::AsFd;
//! use std::os::unix::fs::FileExt;
//!
//! use commy_shm::{PeerPolicy, RuntimeDir, UdsListener, UdsStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("commy-uds-doc-{}", std::process::id()));
//! let runtime = RuntimeDir::at(&dir)?; // created with mode 0700, checked
//! let listener = UdsListener::bind(runtime.join("demo.sock"))?;
//!
//! let client = UdsStream::connect(listener.path())?;
//! let (server, peer) = listener.accept()?;
//! PeerPolicy::SameUser.check(&peer)?; // it is us
//!
//! // Pass an open file along with a message.
//! let mut file = File::options()
//!     .read(true)
//!     .write(true)
//!     .create(true)
//!     .truncate(true)
//!     .open(runtime.join("payload"))?;
//! file.write_all(b"hello through SCM_RIGHTS")?;
//! server.send_msg(b"rings", &[file.as_fd()])?;
//!
//! let mut buf = [0u8; 64];
//! let (len, fds) = client.recv_msg(&mut buf, 1, None)?;
//! assert_eq!(&buf[..len], b"rings");
//! let received = File::from(fds.into_iter().next().ok_or("no fd")?);
//! let mut text = [0u8; 24];
//! received.read_exact_at(&mut text, 0)?;
//! assert_eq!(&text, b"hello through SCM_RIGHTS");
//!
//! // The connection is the liveness channel.
//! assert!(server.is_peer_alive());
//! drop(client);
//! assert!(server.wait_peer_gone(Some(std::time::Duration::from_secs(5)))?);
//!
//! drop(listener); // removes demo.sock
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::fs::{self, FileType, Metadata};
use std::hash::BuildHasher;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{CWD, RenameFlags, renameat_with};
use rustix::io::Errno;
use rustix::net::sockopt::{Timeout, set_socket_timeout};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix, SocketFlags,
    SocketType, accept_with, bind, connect, listen, recvmsg, sendmsg, socket_with, socketpair,
};

/// Most file descriptors one message can carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Longest socket path in bytes (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Backlog of [`UdsListener::bind`].
const DEFAULT_BACKLOG: u32 = 128;

/// How often [`UdsListener::bind`] retries publishing when other processes
/// race for the same path.
const PUBLISH_ATTEMPTS: usize = 8;

pub(crate) fn describe_file_type(ft: FileType) -> &'static str {
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "file of unknown type"
    }
}

// ---------------------------------------------------------------------------
// Peer credentials and policy
// ---------------------------------------------------------------------------

/// Credentials of the process at the other end of a connection, as the
/// kernel recorded them when it called `connect` (`SO_PEERCRED`); the peer
/// cannot forge them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// Process id, as seen in our pid namespace; 0 when the peer lives in a
    /// pid namespace we cannot see into.
    pub pid: u32,
    /// Effective user id (65534 when it has no mapping in our user namespace).
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Which peers a server admits, judged on their [`PeerCred`].
///
/// `SameUser` (the default) admits only processes running under our
/// effective uid. Root peers are *not* admitted under `SameUser` unless we
/// are root ourselves: a root client is a different principal, and mixing
/// privilege levels should be a decision. (This is not a defence against
/// root, which can read our memory anyway.) To admit root as well, use
/// `Allow { uids: vec![0, our_uid], .. }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerPolicy {
    /// Only peers whose uid is our effective uid.
    #[default]
    SameUser,
    /// Peers whose uid is in `uids` or whose gid is in `gids`. Our own uid is
    /// not implied: list it if same-user peers should be admitted.
    Allow {
        /// Admitted user ids.
        uids: Vec<u32>,
        /// Admitted group ids (compared with the peer's effective gid only;
        /// supplementary groups are not visible through `SO_PEERCRED`).
        gids: Vec<u32>,
    },
    /// Every peer that can reach the socket (file permissions still apply).
    Any,
}

/// A peer was refused by a [`PeerPolicy`].
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "peer process {} (uid {}, gid {}) rejected: {reason}",
    .peer.pid, .peer.uid, .peer.gid
)]
#[non_exhaustive]
pub struct PeerRejected {
    /// The refused peer.
    pub peer: PeerCred,
    /// Which rule it failed.
    pub reason: String,
}

impl PeerPolicy {
    /// Admits exactly these user ids.
    pub fn uids(uids: impl IntoIterator<Item = u32>) -> Self {
        Self::Allow {
            uids: uids.into_iter().collect(),
            gids: Vec::new(),
        }
    }

    /// Admits exactly these group ids.
    pub fn gids(gids: impl IntoIterator<Item = u32>) -> Self {
        Self::Allow {
            uids: Vec::new(),
            gids: gids.into_iter().collect(),
        }
    }

    /// Checks `peer` against the policy.
    pub fn check(&self, peer: &PeerCred) -> Result<(), PeerRejected> {
        let reason = match self {
            Self::Any => return Ok(()),
            Self::SameUser => {
                let ours = rustix::process::geteuid().as_raw();
                if peer.uid == ours {
                    return Ok(());
                }
                format!("policy SameUser admits only uid {ours}")
            }
            Self::Allow { uids, gids } => {
                if uids.contains(&peer.uid) || gids.contains(&peer.gid) {
                    return Ok(());
                }
                format!(
                    "uid not in the allowed uids {uids:?} and gid not in the allowed gids {gids:?}"
                )
            }
        };
        Err(PeerRejected {
            peer: *peer,
            reason,
        })
    }
}

/// Reads `SO_PEERCRED`.
///
/// Not `rustix::net::sockopt::socket_peercred`: its `UCred::pid` is a
/// non-zero type, but the kernel reports pid 0 for peers in a pid namespace
/// we cannot see (containers sharing the runtime dir), which would be an
/// invalid value.
fn peer_cred_of(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let size = std::mem::size_of::<libc::ucred>();
    let mut len = libc::socklen_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: `fd` is an open descriptor for the whole call (it is borrowed);
    // `cred` is a live, aligned, writable `ucred` and `len` is its exact
    // size, so the kernel writes at most `len` bytes into it and updates
    // `len`. Any bit pattern is a valid `ucred` (three integers).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(len).ok() != Some(size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_PEERCRED returned {len} bytes, expected {size}"),
        ));
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
        gid: cred.gid,
    })
}

// ---------------------------------------------------------------------------
// Addresses, polling
// ---------------------------------------------------------------------------

enum AddrProblem {
    TooLong(usize),
    Invalid(&'static str),
}

fn unix_addr(path: &Path) -> Result<SocketAddrUnix, AddrProblem> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(AddrProblem::Invalid("the path is empty"));
    }
    if len > MAX_SOCKET_PATH_LEN {
        return Err(AddrProblem::TooLong(len));
    }
    SocketAddrUnix::new(path).map_err(|_| AddrProblem::Invalid("the path contains a NUL byte"))
}

fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        flags,
        None,
    )?)
}

/// Polls one descriptor. `Ok(None)` when the deadline passed first.
fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
) -> io::Result<Option<PollFlags>> {
    loop {
        let timeout = match deadline {
            None => None,
            // A remaining time too large for a timespec is as good as forever.
            Some(d) => Timespec::try_from(d.saturating_duration_since(Instant::now())).ok(),
        };
        let mut fds = [PollFd::from_borrowed_fd(fd, events)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
            }
            Ok(_) => return Ok(Some(fds[0].revents())),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn deadline_after(timeout: Duration) -> Option<Instant> {
    // `None` (wait forever) when the timeout does not fit in an Instant.
    Instant::now().checked_add(timeout)
}

// ---------------------------------------------------------------------------
// Listener
// ---------------------------------------------------------------------------

/// A listening `SOCK_SEQPACKET` Unix socket at a path.
///
/// The socket file has mode 0600 and is removed when the listener is dropped
/// — only if the path still names this listener's socket, so a listener that
/// later took over the path is left alone. The descriptor is close-on-exec
/// and always non-blocking: [`accept`](Self::accept) waits with `poll`, so
/// the fd from [`as_fd`](AsFd::as_fd) can also be registered with an event
/// loop directly and [`try_accept`](Self::try_accept) called when readable.
#[derive(Debug)]
pub struct UdsListener {
    fd: OwnedFd,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Why [`UdsListener::bind`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The path does not fit in a Unix socket address.
    #[error(
        "socket path {} is {len} bytes long; Unix socket paths are limited to {max} bytes",
        .path.display()
    )]
    PathTooLong {
        /// The path (the final one, or the temporary name next to it).
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path is empty, has no file name or contains a NUL byte.
    #[error("invalid socket path {}: {reason}", .path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A live process is listening on the path.
    #[error("cannot listen on {}: another process is listening there (address in use)", .path.display())]
    AddrInUse {
        /// The path.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is left untouched.
    #[error(
        "cannot listen on {}: the path exists and is a {kind}, not a socket; refusing to delete it",
        .path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A system call failed.
    #[error("cannot listen on {}: {op} failed: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why [`UdsListener::accept`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// `accept` or `poll` failed (e.g. `EMFILE`: out of descriptors; the
    /// connection stays queued).
    #[error("accept on {} failed: {source}", .path.display())]
    Io {
        /// The listener's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the new connection's `SO_PEERCRED` failed; it was closed.
    #[error("cannot read the peer credentials of a connection on {}: {source}", .path.display())]
    PeerCred {
        /// The listener's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Someone accepts connections (or at least holds the socket bound).
    Live,
    /// Connection refused: nobody is bound to this socket inode.
    Stale,
    /// The path vanished.
    Missing,
}

/// Connects a throwaway non-blocking socket to find out whether anyone
/// listens. A live listener sees a connection that closes at once.
fn probe(addr: &SocketAddrUnix) -> io::Result<Probe> {
    let sock = new_socket(true)?;
    match connect(&sock, addr) {
        // EAGAIN: backlog full; EPROTOTYPE: a live socket of another type.
        Ok(()) | Err(Errno::AGAIN | Errno::INPROGRESS | Errno::PROTOTYPE) => Ok(Probe::Live),
        Err(Errno::CONNREFUSED) => Ok(Probe::Stale),
        Err(Errno::NOENT) => Ok(Probe::Missing),
        Err(e) => Err(e.into()),
    }
}

fn same_inode(meta: &Metadata, id: (u64, u64)) -> bool {
    (meta.dev(), meta.ino()) == id
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = io::Error::from(e);
            if !is_unsupported(&e) {
                return Err(e);
            }
            // File systems without RENAME_NOREPLACE: link() never replaces.
            fs::hard_link(from, to)?;
            match fs::remove_file(from) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    Ok(renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE)?)
}

/// A fresh name next to `path` for binding before publishing. Dot-files, so
/// directory scanners can skip them; short, so they fit wherever `path` does.
/// Collisions are harmless (the bind fails and we pick another name).
fn temp_sibling(path: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // `RandomState` is randomly keyed per thread and changes with every
    // `new()`, so this differs between calls, threads and processes.
    let salt = std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        std::thread::current().id(),
        nanos,
    ));
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parent.join(format!(".cb{:08x}", salt & 0xffff_ffff))
}

fn bind_addr(path: &Path) -> Result<SocketAddrUnix, BindError> {
    unix_addr(path).map_err(|p| match p {
        AddrProblem::TooLong(len) => BindError::PathTooLong {
            path: path.to_path_buf(),
            len,
            max: MAX_SOCKET_PATH_LEN,
        },
        AddrProblem::Invalid(reason) => BindError::InvalidPath {
            path: path.to_path_buf(),
            reason,
        },
    })
}

/// Removes the temporary socket file on error paths.
struct TempGuard {
    path: Option<PathBuf>,
    id: (u64, u64),
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && fs::symlink_metadata(&path).is_ok_and(|m| same_inode(&m, self.id))
        {
            let _ = fs::remove_file(path);
        }
    }
}

impl UdsListener {
    /// Binds and listens at `path`, replacing a stale socket left there by a
    /// dead process (see the [module docs](self) for how this stays safe
    /// against concurrent binders and scanners). Fails with
    /// [`BindError::AddrInUse`] if a live process listens there and with
    /// [`BindError::NotASocket`] if the path is anything but a socket.
    ///
    /// The parent directory must exist; use a [`RuntimeDir`](crate::RuntimeDir).
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, BindError> {
        Self::bind_with_backlog(path, DEFAULT_BACKLOG)
    }

    /// [`bind`](Self::bind) with an explicit `listen` backlog (pending,
    /// not yet accepted connections; the kernel caps it at `somaxconn`).
    pub fn bind_with_backlog(path: impl AsRef<Path>, backlog: u32) -> Result<Self, BindError> {
        let path = path.as_ref().to_path_buf();
        if path.file_name().is_none() {
            return Err(BindError::InvalidPath {
                path,
                reason: "the path has no file name",
            });
        }
        let final_addr = bind_addr(&path)?;
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |source: io::Error| BindError::Io { path, op, source }
        };

        // 1. Bind and listen under a private temporary name.
        let sock = new_socket(true).map_err(io_err("socket"))?;
        let mut attempts = 0;
        let temp = loop {
            let temp = temp_sibling(&path);
            match bind(&sock, &bind_addr(&temp)?) {
                Ok(()) => break temp,
                // A leftover of a process with our pid (reused pid, or a
                // sibling pid namespace): pick another name.
                Err(Errno::ADDRINUSE) if attempts < PUBLISH_ATTEMPTS => attempts += 1,
                Err(e) => return Err(io_err("bind")(e.into())),
            }
        };
        let temp_meta = fs::symlink_metadata(&temp).map_err(io_err("stat of the new socket"))?;
        let id = (temp_meta.dev(), temp_meta.ino());
        let mut guard = TempGuard {
            path: Some(temp.clone()),
            id,
        };
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600"))?;
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        listen(&sock, backlog).map_err(|e| io_err("listen")(e.into()))?;

        // 2. Publish it at `path` without ever replacing a live socket.
        for _ in 0..PUBLISH_ATTEMPTS {
            match rename_noreplace(&temp, &path) {
                Ok(()) => {
                    guard.path = None;
                    return Ok(Self {
                        fd: sock,
                        path,
                        dev: id.0,
                        ino: id.1,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("rename into place")(e)),
            }
            let existing = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat of the existing path")(e)),
            };
            if !existing.file_type().is_socket() {
                return Err(BindError::NotASocket {
                    path,
                    kind: describe_file_type(existing.file_type()),
                });
            }
            let stale_id = (existing.dev(), existing.ino());
            match probe(&final_addr).map_err(io_err("probe of the existing socket"))? {
                Probe::Live => return Err(BindError::AddrInUse { path }),
                Probe::Missing => continue,
                Probe::Stale => {}
            }
            // Swap our live socket in and the stale one out in one step, then
            // delete what came out only if it is the inode we probed.
            match rename_exchange(&temp, &path) {
                Ok(()) => {
                    let displaced = fs::symlink_metadata(&temp);
                    if displaced.is_ok_and(|m| same_inode(&m, stale_id)) {
                        guard.path = None;
                        // If this fails we are still published; the stale
                        // file merely lingers under a dot-name.
                        let _ = fs::remove_file(&temp);
                        return Ok(Self {
                            fd: sock,
                            path,
                            dev: id.0,
                            ino: id.1,
                        });
                    }
                    // Someone put a new file there after our probe: give it
                    // its place back and look again.
                    rename_exchange(&temp, &path).map_err(io_err("rename back"))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if is_unsupported(&e) => {
                    // No RENAME_EXCHANGE on this file system: remove the stale
                    // file if it is still the one we probed (a small window
                    // remains), then retry the no-replace rename.
                    if fs::symlink_metadata(&path).is_ok_and(|m| same_inode(&m, stale_id)) {
                        match fs::remove_file(&path) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                                return Err(io_err("unlink of the stale socket")(e));
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => return Err(io_err("exchange with the stale socket")(e)),
            }
        }
        // Others keep winning the race for this path.
        Err(BindError::AddrInUse { path })
    }

    /// The path the listener is published at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a connection and returns it with the peer's credentials.
    /// Check those against a [`PeerPolicy`] before trusting the peer.
    pub fn accept(&self) -> Result<(UdsStream, PeerCred), AcceptError> {
        loop {
            if let Some(conn) = self.try_accept()? {
                return Ok(conn);
            }
            self.wait_readable(None)?;
        }
    }

    /// Like [`accept`](Self::accept) but gives up after `timeout`, returning
    /// `Ok(None)`.
    pub fn accept_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<(UdsStream, PeerCred)>, AcceptError> {
        let deadline = deadline_after(timeout);
        loop {
            if let Some(conn) = self.try_accept()? {
                return Ok(Some(conn));
            }
            if !self.wait_readable(deadline)? {
                return Ok(None);
            }
        }
    }

    /// Accepts a pending connection if there is one, without waiting.
    ///
    /// The accepted stream is blocking and close-on-exec.
    pub fn try_accept(&self) -> Result<Option<(UdsStream, PeerCred)>, AcceptError> {
        loop {
            match accept_with(&self.fd, SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    let cred =
                        peer_cred_of(fd.as_fd()).map_err(|source| AcceptError::PeerCred {
                            path: self.path.clone(),
                            source,
                        })?;
                    return Ok(Some((UdsStream { fd }, cred)));
                }
                Err(Errno::AGAIN) => return Ok(None),
                // The client gave up before we got to it, or a signal.
                Err(Errno::CONNABORTED | Errno::INTR) => {}
                Err(e) => {
                    return Err(AcceptError::Io {
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Returns false on timeout.
    fn wait_readable(&self, deadline: Option<Instant>) -> Result<bool, AcceptError> {
        poll_one(self.fd.as_fd(), PollFlags::IN, deadline)
            .map(|r| r.is_some())
            .map_err(|source| AcceptError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

impl AsFd for UdsListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        // While we run, our socket still listens, so nobody can have judged
        // it stale and replaced it: if the path has our inode it is ours.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| same_inode(&m, (self.dev, self.ino))) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Why [`remove_stale_socket`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoveStaleError {
    /// The path is not a socket; it is left untouched.
    #[error("{} is a {kind}, not a socket; refusing to delete it", .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The path is not a valid socket address.
    #[error("invalid socket path {}: {reason}", .path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call failed.
    #[error("cannot check socket {} for staleness: {op} failed: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Deletes the socket at `path` if nobody listens on it any more (its owner
/// died), for directory scanners. Returns whether it deleted it: `false` when
/// the socket is live or the path is gone.
///
/// The stale socket is first moved to a private name and deleted only if it
/// is the inode that refused the connection, so a listener that takes over
/// the path concurrently is never deleted. Non-sockets are never deleted.
pub fn remove_stale_socket(path: impl AsRef<Path>) -> Result<bool, RemoveStaleError> {
    let path = path.as_ref();
    let io_err = |op: &'static str| {
        move |source: io::Error| RemoveStaleError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("stat")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(RemoveStaleError::NotASocket {
            path: path.to_path_buf(),
            kind: describe_file_type(meta.file_type()),
        });
    }
    let stale_id = (meta.dev(), meta.ino());
    let invalid = |e: BindError| RemoveStaleError::InvalidPath {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let addr = bind_addr(path).map_err(invalid)?;
    if probe(&addr).map_err(io_err("probe"))? != Probe::Stale {
        return Ok(false);
    }
    let aside = temp_sibling(path);
    match rename_noreplace(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("rename aside")(e)),
    }
    let moved = fs::symlink_metadata(&aside).map_err(io_err("stat of the moved socket"))?;
    if same_inode(&moved, stale_id) {
        fs::remove_file(&aside).map_err(io_err("unlink"))?;
        return Ok(true);
    }
    // A new socket replaced the stale one between probe and rename: put it
    // back (unless yet another one has taken the path meanwhile).
    match rename_noreplace(&aside, path) {
        Ok(()) => Ok(false),
        Err(e) => Err(io_err("rename back of a replaced socket")(e)),
    }
}

// ---------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------

/// A connected `SOCK_SEQPACKET` Unix socket: records with boundaries, each
/// optionally carrying file descriptors, and peer-death detection.
///
/// Blocking by default (see [`set_nonblocking`](Self::set_nonblocking));
/// close-on-exec. All methods take `&self`, so one thread can wait for the
/// peer's death while another sends.
#[derive(Debug)]
pub struct UdsStream {
    fd: OwnedFd,
}

/// Why [`UdsStream::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The path does not fit in a Unix socket address.
    #[error(
        "socket path {} is {len} bytes long; Unix socket paths are limited to {max} bytes",
        .path.display()
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path is empty or contains a NUL byte.
    #[error("invalid socket path {}: {reason}", .path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Nothing exists at the path.
    #[error("cannot connect to {}: no such socket", .path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The socket exists but nobody listens: its owner died (stale), or the
    /// path is not a socket.
    #[error("cannot connect to {}: connection refused (stale socket, its process is gone)", .path.display())]
    Refused {
        /// The path.
        path: PathBuf,
    },
    /// We lack permission on the socket file or a directory above it.
    #[error("cannot connect to {}: permission denied: {source}", .path.display())]
    PermissionDenied {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A live socket of another type (not `SOCK_SEQPACKET`) is there, so it is
    /// not a Commy endpoint.
    #[error("cannot connect to {}: the socket there is not a SOCK_SEQPACKET socket", .path.display())]
    WrongSocketType {
        /// The path.
        path: PathBuf,
    },
    /// The listener's backlog stayed full for the whole timeout.
    #[error("cannot connect to {}: timed out after {timeout:?} (listener backlog full)", .path.display())]
    TimedOut {
        /// The path.
        path: PathBuf,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// Another system call failure.
    #[error("cannot connect to {}: {op} failed: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why [`UdsStream::send_msg`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Empty messages are refused: on `SOCK_SEQPACKET` the receiver could not
    /// tell an empty record from end-of-file.
    #[error("cannot send an empty message (it would read as end-of-file)")]
    Empty,
    /// More descriptors than one message may carry.
    #[error("cannot send {count} file descriptors in one message; the limit is {max}")]
    TooManyFds {
        /// How many were given.
        count: usize,
        /// [`MAX_FDS_PER_MESSAGE`].
        max: usize,
    },
    /// The message exceeds the socket's send buffer (`EMSGSIZE`).
    #[error("message of {len} bytes is too large for the socket: {source}")]
    TooLarge {
        /// The message length.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The peer closed its end.
    #[error("cannot send: the peer closed the connection")]
    Closed,
    /// The socket is non-blocking and the peer's queue is full.
    #[error("cannot send now: the peer's receive queue is full (non-blocking socket)")]
    WouldBlock,
    /// Another system call failure.
    #[error("sendmsg failed: {source}")]
    Io {
        /// The OS error.
        source: io::Error,
    },
}

/// Why [`UdsStream::recv_msg`] failed. In every error case, descriptors that
/// arrived with the message have been closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// End of file: the peer closed its end (or died).
    #[error("the peer closed the connection")]
    Closed,
    /// The message did not fit the buffer; it is discarded.
    #[error("message of {len} bytes truncated to the {capacity}-byte buffer and discarded")]
    Truncated {
        /// The message's real length.
        len: usize,
        /// The buffer's length.
        capacity: usize,
    },
    /// The kernel could not deliver all ancillary data (`MSG_CTRUNC`).
    #[error(
        "ancillary data truncated (MSG_CTRUNC); the {received} descriptors that arrived were closed"
    )]
    AncillaryTruncated {
        /// How many descriptors did arrive.
        received: usize,
    },
    /// The peer sent more descriptors than the caller accepts.
    #[error("message carried {received} file descriptors, at most {max} expected; all were closed")]
    TooManyFds {
        /// How many arrived.
        received: usize,
        /// The caller's limit.
        max: usize,
    },
    /// No message arrived within the timeout.
    #[error("no message within {timeout:?}")]
    TimedOut {
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The socket is non-blocking and no message is queued.
    #[error("no message queued (non-blocking socket)")]
    WouldBlock,
    /// Another system call failure.
    #[error("recvmsg failed: {source}")]
    Io {
        /// The OS error.
        source: io::Error,
    },
}

impl UdsStream {
    /// Connects to the listener at `path`. Blocks while the listener's
    /// backlog is full; see [`connect_timeout`](Self::connect_timeout).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ConnectError> {
        Self::connect_inner(path.as_ref(), None)
    }

    /// Connects, giving up after `timeout` if the listener's backlog stays
    /// full. (Connecting to a Unix socket never waits for anything else.)
    pub fn connect_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        Self::connect_inner(path.as_ref(), Some(timeout))
    }

    fn connect_inner(path: &Path, timeout: Option<Duration>) -> Result<Self, ConnectError> {
        let addr = unix_addr(path).map_err(|p| match p {
            AddrProblem::TooLong(len) => ConnectError::PathTooLong {
                path: path.to_path_buf(),
                len,
                max: MAX_SOCKET_PATH_LEN,
            },
            AddrProblem::Invalid(reason) => ConnectError::InvalidPath {
                path: path.to_path_buf(),
                reason,
            },
        })?;
        let io_err = |op: &'static str| {
            move |source: io::Error| ConnectError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let fd = new_socket(false).map_err(io_err("socket"))?;
        let deadline = timeout.and_then(deadline_after);
        loop {
            // A blocking Unix connect waits for backlog room for at most
            // SO_SNDTIMEO, then fails with EAGAIN.
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                // Zero would mean "forever" to the kernel.
                let left = left.max(Duration::from_micros(1));
                set_socket_timeout(&fd, Timeout::Send, Some(left))
                    .map_err(|e| io_err("setsockopt SO_SNDTIMEO")(e.into()))?;
            }
            match connect(&fd, &addr) {
                Ok(()) => break,
                Err(Errno::INTR) if deadline.is_none_or(|d| Instant::now() < d) => {}
                Err(Errno::AGAIN | Errno::INTR) if timeout.is_some() => {
                    return Err(ConnectError::TimedOut {
                        path: path.to_path_buf(),
                        timeout: timeout.unwrap_or_default(),
                    });
                }
                Err(Errno::NOENT) => {
                    return Err(ConnectError::NotFound {
                        path: path.to_path_buf(),
                    });
                }
                Err(Errno::CONNREFUSED) => {
                    return Err(ConnectError::Refused {
                        path: path.to_path_buf(),
                    });
                }
                Err(e @ (Errno::ACCESS | Errno::PERM)) => {
                    return Err(ConnectError::PermissionDenied {
                        path: path.to_path_buf(),
                        source: e.into(),
                    });
                }
                Err(Errno::PROTOTYPE) => {
                    return Err(ConnectError::WrongSocketType {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => return Err(io_err("connect")(e.into())),
            }
        }
        if timeout.is_some() {
            // The timeout was for connecting only; sends block as usual.
            set_socket_timeout(&fd, Timeout::Send, None)
                .map_err(|e| io_err("setsockopt SO_SNDTIMEO")(e.into()))?;
        }
        Ok(Self { fd })
    }

    /// A connected pair in this process (`socketpair`), e.g. to hand one end
    /// to a child process or for tests.
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Self { fd: a }, Self { fd: b }))
    }

    /// The peer's credentials, as recorded when the connection was made.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        peer_cred_of(self.fd.as_fd())
    }

    /// Sends `bytes` (at least one byte) as one record, with `fds` attached
    /// (at most [`MAX_FDS_PER_MESSAGE`]); the receiver gets its own
    /// duplicates of the descriptors. One `sendmsg` call: the record is
    /// delivered whole or not at all. Never raises `SIGPIPE`.
    pub fn send_msg(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
        if bytes.is_empty() {
            return Err(SendError::Empty);
        }
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(SendError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS_PER_MESSAGE,
            });
        }
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(SendError::Io {
                source: io::Error::other("ancillary buffer too small for the descriptors"),
            });
        }
        let iov = [IoSlice::new(bytes)];
        loop {
            match sendmsg(&self.fd, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(SendError::Io {
                        source: io::Error::other(format!(
                            "sendmsg sent {n} of {} bytes of a record",
                            bytes.len()
                        )),
                    });
                }
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN) => {
                    return Err(SendError::Closed);
                }
                Err(Errno::AGAIN) => return Err(SendError::WouldBlock),
                Err(e @ Errno::MSGSIZE) => {
                    return Err(SendError::TooLarge {
                        len: bytes.len(),
                        source: e.into(),
                    });
                }
                Err(e) => return Err(SendError::Io { source: e.into() }),
            }
        }
    }

    /// Receives one record into `buf`, returning its length and the
    /// descriptors that came with it (close-on-exec, at most `max_fds`).
    ///
    /// `timeout`: `None` waits as long as it takes (or, on a non-blocking
    /// socket, fails with [`RecvError::WouldBlock`] at once); `Some(t)` waits
    /// at most `t`. Errors: [`RecvError::Closed`] at end-of-file,
    /// [`RecvError::Truncated`] if the record is longer than `buf`,
    /// [`RecvError::TooManyFds`] / [`RecvError::AncillaryTruncated`] for
    /// excess descriptors; in all of them received descriptors are closed
    /// and the record is consumed. A record of zero bytes is reported as
    /// `Ok((0, fds))` only if it carried descriptors (`send_msg` never sends
    /// one); without descriptors it is indistinguishable from `Closed`.
    pub fn recv_msg(
        &self,
        buf: &mut [u8],
        max_fds: usize,
        timeout: Option<Duration>,
    ) -> Result<(usize, Vec<OwnedFd>), RecvError> {
        let deadline = timeout.and_then(deadline_after);
        // Room for the most descriptors the kernel sends in one message, so
        // "more than expected" is told apart from real ancillary truncation,
        // plus credentials in case someone enables SO_PASSCRED.
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253), ScmCredentials(1))];
        let mut flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC;
        if timeout.is_some() {
            flags |= RecvFlags::DONTWAIT;
        }
        let capacity = buf.len();
        loop {
            if let Some(t) = timeout {
                let ready = poll_one(self.fd.as_fd(), PollFlags::IN, deadline)
                    .map_err(|source| RecvError::Io { source })?;
                if ready.is_none() {
                    return Err(RecvError::TimedOut { timeout: t });
                }
            }
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(buf)];
            let msg = match recvmsg(&self.fd, &mut iov, &mut control, flags) {
                Ok(msg) => msg,
                // EAGAIN after poll said readable: another reader was first.
                Err(Errno::AGAIN) if timeout.is_some() => continue,
                Err(Errno::AGAIN) => return Err(RecvError::WouldBlock),
                Err(Errno::INTR) => continue,
                Err(Errno::CONNRESET) => return Err(RecvError::Closed),
                Err(e) => return Err(RecvError::Io { source: e.into() }),
            };
            let mut fds = Vec::new();
            for cmsg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = cmsg {
                    fds.extend(rights);
                }
            }
            // Any early return below drops (closes) `fds`.
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                return Err(RecvError::AncillaryTruncated {
                    received: fds.len(),
                });
            }
            if fds.len() > max_fds {
                return Err(RecvError::TooManyFds {
                    received: fds.len(),
                    max: max_fds,
                });
            }
            if msg.bytes == 0 && fds.is_empty() {
                return Err(RecvError::Closed);
            }
            if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > capacity {
                return Err(RecvError::Truncated {
                    len: msg.bytes,
                    capacity,
                });
            }
            return Ok((msg.bytes, fds));
        }
    }

    /// Whether the peer still holds its end open, without blocking.
    ///
    /// After the handshake nothing more is expected on the socket, so this
    /// asks the kernel about the connection state (`poll` for
    /// `POLLHUP`/`POLLRDHUP`/`POLLERR`) instead of reading. Queued, unread
    /// records do not mask a hang-up: a peer that sent something and then
    /// died is reported dead at once, and its records can still be read with
    /// [`recv_msg`](Self::recv_msg) until it returns [`RecvError::Closed`].
    /// A peer that shut down its sending side counts as gone, and so does
    /// everything after our own [`shutdown`](Self::shutdown). If `poll`
    /// itself fails the peer is reported dead (the link is unusable anyway).
    pub fn is_peer_alive(&self) -> bool {
        match poll_one(self.fd.as_fd(), PollFlags::RDHUP, Some(Instant::now())) {
            Ok(None) => true,
            Ok(Some(revents)) => !Self::hung_up(revents),
            Err(_) => false,
        }
    }

    /// Waits until the peer is gone (see
    /// [`is_peer_alive`](Self::is_peer_alive)); `None` waits forever.
    /// Returns `true` if it is gone, `false` if the timeout passed first.
    /// Incoming records do not wake it.
    pub fn wait_peer_gone(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.and_then(deadline_after);
        loop {
            match poll_one(self.fd.as_fd(), PollFlags::RDHUP, deadline)? {
                None => return Ok(false),
                Some(r) if Self::hung_up(r) => return Ok(true),
                // Spurious: not a hang-up event. Keep waiting.
                Some(_) => {}
            }
        }
    }

    fn hung_up(revents: PollFlags) -> bool {
        revents.intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR | PollFlags::NVAL)
    }

    /// Shuts the connection down in both directions: the peer sees
    /// end-of-file (and [`is_peer_alive`](Self::is_peer_alive) false) even if
    /// other processes still hold duplicates of our descriptor.
    pub fn shutdown(&self) -> io::Result<()> {
        match rustix::net::shutdown(&self.fd, Shutdown::Both) {
            // Already disconnected: nothing to shut down.
            Ok(()) | Err(Errno::NOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Switches `O_NONBLOCK`. Non-blocking: [`send_msg`](Self::send_msg) and
    /// [`recv_msg`](Self::recv_msg) without a timeout fail with `WouldBlock`
    /// instead of waiting (with a timeout, `recv_msg` waits by `poll`
    /// either way).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        Ok(rustix::io::ioctl_fionbio(&self.fd, nonblocking)?)
    }
}

impl AsFd for UdsStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<UdsStream> for OwnedFd {
    fn from(stream: UdsStream) -> Self {
        stream.fd
    }
}

impl TryFrom<OwnedFd> for UdsStream {
    type Error = io::Error;

    /// Adopts a descriptor received from elsewhere (e.g. one end of
    /// [`UdsStream::pair`] inherited by a child process), checking that it
    /// is a Unix `SOCK_SEQPACKET` socket.
    fn try_from(fd: OwnedFd) -> Result<Self, Self::Error> {
        let ty = rustix::net::sockopt::socket_type(&fd)?;
        let domain = rustix::net::sockopt::socket_domain(&fd)?;
        if ty != SocketType::SEQPACKET || domain != AddressFamily::UNIX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor is not a Unix SOCK_SEQPACKET socket ({domain:?}, {ty:?})"),
            ));
        }
        Ok(Self { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_messages_name_the_peer() {
        let peer = PeerCred {
            pid: 4242,
            uid: 77,
            gid: 88,
        };
        let err = PeerPolicy::uids([1, 2]).check(&peer).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("4242") && text.contains("uid 77"), "{text}");
        assert!(PeerPolicy::gids([88]).check(&peer).is_ok());
        assert!(PeerPolicy::Any.check(&peer).is_ok());
    }
}
