//! Local discovery: the instances of a service on this host, found in the
//! runtime directory, with no daemon and no configuration.
//!
//! A process that serves service `S` in mesh `M` listens on a Unix socket at
//! `<runtime dir>/<M>/<S>/<instance id>-<pid>.sock` (see
//! [`LocalRegistry::socket_path`]); that socket file *is* the announcement.
//! [`commy_shm::ShmListener::bind`] binds it under a dot-name and publishes
//! it with an atomic rename, so a socket at its final name always listens
//! already, and the listener unlinks it when dropped. So:
//!
//! - [`LocalRegistry::instances`] lists a service's instances by scanning its
//!   directory; [`LocalRegistry::services`] lists every service of the mesh.
//! - [`LocalRegistry::watch`] returns an [`InstanceWatch`], an async stream of
//!   instance sets: the current set first, then a new set after every change.
//!   New and cleanly departed instances are noticed through inotify (the
//!   socket being renamed into place or unlinked), crashed ones through a
//!   pidfd per instance, which becomes readable the moment the process dies;
//!   nothing polls on a timer.
//!
//! [`LocalRegistry`] explains how crashed instances, stale sockets and pid
//! reuse are handled, and the limits.
//!
//! # Example
//!
//! ```
//! use commy_core::{InstanceId, MeshName, ServiceName};
//! use commy_discovery::LocalRegistry;
//! use commy_shm::{RuntimeDir, UdsListener};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("commy-discovery-doc-{}", std::process::id()));
//! let registry = LocalRegistry::new(RuntimeDir::at(&dir)?, &MeshName::default())?;
//! let billing = ServiceName::new("billing")?;
//! assert!(registry.instances(&billing)?.is_empty());
//!
//! // Serving means listening at the instance's socket path (a real server
//! // binds a `commy_shm::ShmListener` there).
//! let id = InstanceId::random();
//! let listener = UdsListener::bind(registry.socket_path(&billing, id)?)?;
//!
//! let found = registry.instances(&billing)?;
//! assert_eq!(found.len(), 1);
//! assert_eq!((found[0].id, found[0].pid), (id, std::process::id()));
//! assert!(found[0].endpoint.to_string().starts_with("shm:///"));
//! assert_eq!(registry.services()?[0].0, billing);
//!
//! // Watching needs a tokio runtime.
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(async {
//!     let mut watch = registry.watch(&billing)?;
//!     assert_eq!(watch.changed().await.map(|set| set.len()), Some(1)); // the current set
//!     drop(listener); // unlinks the socket: the instance is gone
//!     assert_eq!(watch.changed().await.map(|set| set.len()), Some(0));
//!     Ok::<_, commy_discovery::DiscoveryError>(())
//! })?;
//!
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use commy_core::{Endpoint, EndpointError, HostId, InstanceId, MeshName, ServiceName};
use commy_shm::{
    MAX_SOCKET_PATH_LEN, RemoveStaleError, RuntimeDir, RuntimeDirError, remove_stale_socket,
};
use futures_core::Stream;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, pidfd_open, test_kill_process};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Environment variable that overrides [`host_id`].
pub const HOST_ID_ENV: &str = "COMMY_HOST_ID";

/// File name suffix of instance sockets.
const SOCKET_SUFFIX: &str = ".sock";

/// How much later than its socket a process may seem to have started before
/// we conclude it merely reuses the pid of the socket's dead creator. Covers
/// clock-tick truncation and leap seconds.
const PID_REUSE_SLACK: Duration = Duration::from_secs(2);

/// Size of a watch's inotify read buffer (a dozen events with long names).
const INOTIFY_BUFFER: usize = 4096;

/// What a watch asks inotify to report about a service directory.
fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a local discovery operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The runtime directory, or the mesh or service directory in it, could
    /// not be created or may not be trusted (the source names the path).
    #[error("local discovery cannot use its directory: {0}")]
    RuntimeDir(#[from] RuntimeDirError),
    /// Listing a directory failed.
    #[error("cannot list directory {}: {source}", .path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An instance socket path would not fit in a Unix socket address.
    #[error(
        "instance socket path {} is {len} bytes long; Unix socket paths are limited to {max} \
         bytes (use a shorter runtime dir, mesh name or service name)",
        .path.display()
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// [`MAX_SOCKET_PATH_LEN`].
        max: usize,
    },
    /// The mesh directory cannot be written as an `shm://` endpoint (e.g. the
    /// runtime dir is not valid UTF-8).
    #[error("sockets under {} cannot be named as shm:// endpoints: {source}", .path.display())]
    InvalidEndpoint {
        /// The mesh directory.
        path: PathBuf,
        /// Why the endpoint was rejected.
        source: EndpointError,
    },
    /// Setting up inotify on a service directory failed.
    #[error(
        "cannot watch {} for instances: {op} failed: {source}{hint}",
        .path.display(),
        hint = limit_hint(.source)
    )]
    Watch {
        /// The service directory.
        path: PathBuf,
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Reading inotify events failed; the watch has ended.
    #[error("watch of {} ended: reading inotify events failed: {source}", .path.display())]
    WatchEvents {
        /// The service directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// [`LocalRegistry::watch`] was called outside a tokio runtime.
    #[error(
        "cannot watch {}: watching needs a tokio runtime (call it from within a runtime, \
         e.g. inside #[tokio::main] or Runtime::block_on)",
        .path.display()
    )]
    NoRuntime {
        /// The service directory.
        path: PathBuf,
    },
    /// The instance is not reached through a local socket.
    #[error("instance {id} of service {service} has endpoint {endpoint}, not a local socket")]
    NotLocal {
        /// The service.
        service: ServiceName,
        /// The instance.
        id: InstanceId,
        /// Its endpoint.
        endpoint: Endpoint,
    },
    /// Removing a stale socket failed.
    #[error("cannot remove a stale instance socket: {0}")]
    RemoveStale(#[from] RemoveStaleError),
    /// `$COMMY_HOST_ID` is set to something that is not a host id.
    #[error("${HOST_ID_ENV} is {value:?}, not a valid host id: {reason}")]
    HostId {
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A registry (a [`Register`](crate::Register), a remote source) refused
    /// or failed.
    #[error("{registry}: {reason}")]
    Registry {
        /// The registry's name.
        registry: String,
        /// What it said.
        reason: String,
    },
}

/// Advice for the errors inotify returns when a per-user limit is hit.
fn limit_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::MFILE) => {
            " (too many inotify instances: raise sysctl fs.inotify.max_user_instances or use fewer watches)"
        }
        Some(Errno::NOSPC) => {
            " (too many inotify watches: raise sysctl fs.inotify.max_user_watches)"
        }
        _ => "",
    }
}

// ---------------------------------------------------------------------------
// Host id
// ---------------------------------------------------------------------------

/// This host's id: `$COMMY_HOST_ID` if it is set, else `<machine
/// id>-<boot id>` from `/etc/machine-id` (or `/var/lib/dbus/machine-id`)
/// and `/proc/sys/kernel/random/boot_id` (dashes dropped), so it changes
/// with every boot. Falls back to the kernel's host name, then
/// `localhost`, if those files are missing. A `$COMMY_HOST_ID` that is set
/// but empty or not a valid [`HostId`] is an error naming it: a typo must
/// not quietly make two "hosts" one.
///
/// Processes with the same host id may talk through shared memory; setting
/// [`HOST_ID_ENV`] lets tests pretend to be several hosts on one machine.
pub fn host_id() -> Result<HostId, DiscoveryError> {
    let Some(value) = std::env::var_os(HOST_ID_ENV) else {
        return Ok(machine_host_id());
    };
    let bad = |reason: String| DiscoveryError::HostId {
        value: value.to_string_lossy().into_owned(),
        reason,
    };
    let text = value
        .to_str()
        .ok_or_else(|| bad("not valid UTF-8".into()))?;
    HostId::new(text).map_err(|e| bad(e.to_string()))
}

fn machine_host_id() -> HostId {
    let machine =
        read_hex_id("/etc/machine-id").or_else(|| read_hex_id("/var/lib/dbus/machine-id"));
    let boot = read_hex_id("/proc/sys/kernel/random/boot_id");
    let parts: Vec<String> = machine.into_iter().chain(boot).collect();
    let candidates = [
        (!parts.is_empty()).then(|| parts.join("-")),
        fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned()),
    ];
    for text in candidates.into_iter().flatten() {
        if let Ok(id) = HostId::new(&text) {
            return id;
        }
    }
    localhost()
}

/// The subdirectory of the runtime dir that holds the meshes of `host`
/// when it is not this machine's own id (`machine`): `h-<8 hex digits>`, a
/// stable hash of the id (ids are too long for socket paths, which have
/// 107 bytes in all).
/// Processes that share a runtime dir but not a host id so never find each
/// other's sockets, and never share memory.
fn host_dir(host: &HostId, machine: &HostId) -> Option<String> {
    (host != machine).then(|| {
        // FNV-1a, 32 bits: stable across builds and platforms.
        let hash = host.as_str().bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("h-{hash:08x}")
    })
}

fn localhost() -> HostId {
    // A constant that satisfies the name rules (ASCII letters only).
    HostId::new("localhost").expect("\"localhost\" is a valid host id")
}

/// Reads an id file: lowercase hex digits, dashes dropped; `None` if the
/// file is missing, empty or holds anything else.
fn read_hex_id(path: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let id: String = text
        .trim()
        .chars()
        .filter(|&c| c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let valid = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit());
    valid.then_some(id)
}

// ---------------------------------------------------------------------------
// Instances and the registry
// ---------------------------------------------------------------------------

/// One instance of a service found on this host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Instance {
    /// The service it serves.
    pub service: ServiceName,
    /// Its instance id (from the socket's file name).
    pub id: InstanceId,
    /// Its process id (from the socket's file name).
    pub pid: u32,
    /// How to reach it: `shm://<socket path>`.
    pub endpoint: Endpoint,
    /// The host it runs on: this host (the registry's [`host_id`]).
    pub host: HostId,
}

impl Instance {
    /// An instance of `service` with id `id`, run by process `pid` on
    /// `host`, reached at `endpoint` (for sources other than this host's
    /// runtime dir, which make their instances themselves).
    pub fn new(
        service: ServiceName,
        id: InstanceId,
        pid: u32,
        endpoint: Endpoint,
        host: HostId,
    ) -> Instance {
        Instance {
            service,
            id,
            pid,
            endpoint,
            host,
        }
    }
}

/// The instances of one mesh on this host: the sockets in
/// `<runtime dir>/<mesh>/<service>/`, one per instance, named
/// `<instance id>-<pid>.sock`. Cheap to clone.
///
/// # Stale sockets, liveness and pid reuse
///
/// A crashed instance leaves its socket file behind. Scans and watches judge
/// an instance by the pid in its file name: a pid with no process
/// (`pidfd_open` fails with `ESRCH`, or the process has exited) means the
/// instance is gone, and its socket is handed to
/// [`commy_shm::remove_stale_socket`], which deletes it only if it refuses
/// connections. To guard against pid reuse without connecting to anyone, the
/// start time of the process holding the pid is compared with the socket
/// file's modification time (when it was bound): a process that started
/// (more than two seconds) after the socket was made cannot have made it, so
/// the socket is treated as stale too. Live instances are never connected
/// to by discovery; only a socket already judged stale is probed (by
/// `remove_stale_socket`), and if it turns out to be live anyway (a clock
/// step, or a socket inherited across `fork`) it is kept and listed.
///
/// A process that is alive but has closed its listener without unlinking it
/// cannot be told from a live one without connecting. A client that gets
/// "connection refused" from an instance should call
/// [`LocalRegistry::remove_stale`], which deletes the socket (watches then
/// report the instance gone).
///
/// # Host ids
///
/// Processes with the same host id share memory; with different ones,
/// never. A process whose [`host_id`] is not the machine's own (one set by
/// `$COMMY_HOST_ID`, as tests do to play several hosts on one machine)
/// keeps its meshes in a subdirectory of the runtime dir named after that
/// id, `<runtime dir>/h-<hash>/<mesh>`; so processes that share a
/// runtime dir but not a host id neither list nor reach each other's
/// instances there (another host is reached over the network).
///
/// Limits: processes that share a runtime dir must share a pid namespace
/// (the pid in the name is interpreted in ours). Each [`InstanceWatch`] uses
/// one inotify instance (the kernel's per-user default limit is 128,
/// `fs.inotify.max_user_instances`) and one pidfd per live instance.
#[derive(Debug, Clone)]
pub struct LocalRegistry {
    mesh: MeshName,
    mesh_dir: RuntimeDir,
    host: HostId,
}

impl LocalRegistry {
    /// The registry of `mesh` in `runtime`; creates the mesh directory
    /// (mode 0700) if needed. Reads [`host_id`] once.
    pub fn new(runtime: RuntimeDir, mesh: &MeshName) -> Result<Self, DiscoveryError> {
        let host = host_id()?;
        let runtime = match host_dir(&host, &machine_host_id()) {
            Some(name) => runtime.subdir(name)?,
            None => runtime,
        };
        let mesh_dir = runtime.subdir(mesh.as_str())?;
        // Every endpoint we produce is under this directory: reject paths
        // that cannot be written as `shm://` locators once, here.
        let probe = mesh_dir.join(format!("s/{}-1{SOCKET_SUFFIX}", InstanceId::from_u128(0)));
        Endpoint::shm(&probe).map_err(|source| DiscoveryError::InvalidEndpoint {
            path: mesh_dir.path().to_path_buf(),
            source,
        })?;
        Ok(Self {
            mesh: mesh.clone(),
            mesh_dir,
            host,
        })
    }

    /// The registry of `mesh` in the default runtime directory
    /// ([`RuntimeDir::resolve`]: `$COMMY_RUNTIME_DIR`,
    /// `$XDG_RUNTIME_DIR/commy` or `/tmp/commy-<uid>`).
    pub fn open_default(mesh: &MeshName) -> Result<Self, DiscoveryError> {
        Self::new(RuntimeDir::resolve()?, mesh)
    }

    /// The mesh.
    pub fn mesh(&self) -> &MeshName {
        &self.mesh
    }

    /// The mesh directory, `<runtime dir>/<mesh>`.
    pub fn dir(&self) -> &Path {
        self.mesh_dir.path()
    }

    /// Removes the mesh's empty directories: those of services without
    /// instances, then the mesh's own if nothing is left in it. For a
    /// process that is done with the mesh: what another process still
    /// uses is not empty and stays. A process about to bind a socket in a
    /// directory removed meanwhile makes it again
    /// ([`LocalRegistry::socket_path`]) and binds again.
    pub fn tidy(&self) {
        if let Ok(entries) = fs::read_dir(self.mesh_dir.path()) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
        let _ = fs::remove_dir(self.mesh_dir.path());
    }

    /// This host's id, as put in every [`Instance`] found.
    pub fn host(&self) -> &HostId {
        &self.host
    }

    /// The directory of `service`'s sockets, created (mode 0700) if missing.
    pub fn service_dir(&self, service: &ServiceName) -> Result<PathBuf, DiscoveryError> {
        Ok(self.mesh_dir.subdir(service.as_str())?.path().to_path_buf())
    }

    /// Where this process announces instance `id` of `service`:
    /// `<service dir>/<id>-<our pid>.sock`. Creates the service directory;
    /// fails if the path is too long for a Unix socket. Bind a
    /// [`commy_shm::ShmListener`] there to serve.
    pub fn socket_path(
        &self,
        service: &ServiceName,
        id: InstanceId,
    ) -> Result<PathBuf, DiscoveryError> {
        let path = self
            .service_dir(service)?
            .join(socket_file_name(id, std::process::id()));
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH_LEN {
            return Err(DiscoveryError::SocketPathTooLong {
                path,
                len,
                max: MAX_SOCKET_PATH_LEN,
            });
        }
        Ok(path)
    }

    /// The live instances of `service`, sorted by id. Sockets of dead
    /// processes are removed on the way (see [`LocalRegistry`]); files
    /// that are not instance sockets are ignored and left alone. A service
    /// without a directory has no instances (the directory is not created).
    pub fn instances(&self, service: &ServiceName) -> Result<Vec<Instance>, DiscoveryError> {
        let dir = self.mesh_dir.join(service.as_str());
        let mut found = Vec::new();
        for entry in read_entries(&dir)? {
            if let Some((instance, _pidfd)) = self.classify(service, &entry) {
                found.push(instance);
            }
        }
        found.sort_by_key(|i| (i.id, i.pid));
        Ok(found)
    }

    /// Every service of the mesh that has at least one live instance, with
    /// its instances, sorted by name (for a `commy services` listing).
    /// Directories that are not valid service names are ignored.
    pub fn services(&self) -> Result<Vec<(ServiceName, Vec<Instance>)>, DiscoveryError> {
        let dir = self.mesh_dir.path();
        let read_err = |source| DiscoveryError::ReadDir {
            path: dir.to_path_buf(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| ServiceName::new(n).ok())
            else {
                continue;
            };
            // `DirEntry::file_type` does not follow symlinks.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                names.push(name);
            }
        }
        names.sort();
        let mut services = Vec::new();
        for name in names {
            let instances = self.instances(&name)?;
            if !instances.is_empty() {
                services.push((name, instances));
            }
        }
        Ok(services)
    }

    /// Watches `service`'s instances: see [`InstanceWatch`]. Creates the
    /// service directory if missing, so the watch can start before any
    /// instance exists. Must be called within a tokio runtime, whose reactor
    /// then wakes the watch; outside one it fails with
    /// [`DiscoveryError::NoRuntime`].
    ///
    /// # Panics
    ///
    /// Like tokio's own I/O types, if the runtime was built without I/O
    /// (`enable_io`/`enable_all` not called).
    pub fn watch(&self, service: &ServiceName) -> Result<InstanceWatch, DiscoveryError> {
        let dir = self.service_dir(service)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(DiscoveryError::NoRuntime { path: dir });
        }
        let watch_err = |op| {
            let path = dir.clone();
            move |source| DiscoveryError::Watch { path, op, source }
        };
        let inotify = Inotify::init().map_err(watch_err("inotify_init"))?;
        // Watch first, then scan: nothing that happens after the scan's
        // readdir can be missed.
        let wd = inotify
            .watches()
            .add(&dir, watch_mask())
            .map_err(watch_err("inotify_add_watch"))?;
        let events = inotify
            .into_event_stream(vec![0u8; INOTIFY_BUFFER].into_boxed_slice())
            .map_err(watch_err("registering inotify with tokio"))?;
        let mut watch = InstanceWatch {
            registry: self.clone(),
            service: service.clone(),
            dir,
            events,
            wd,
            known: BTreeMap::new(),
            current: Vec::new(),
            delivered: false,
            error: None,
        };
        watch.rescan()?;
        watch.current = watch.snapshot();
        Ok(watch)
    }

    /// Deletes `instance`'s socket if it refuses connections (its process
    /// is gone or no longer listens), e.g. after a connect attempt was
    /// refused. Returns whether it deleted it; watches then report the
    /// instance gone. A live socket is left alone (this connects to it once,
    /// without sending anything).
    pub fn remove_stale(&self, instance: &Instance) -> Result<bool, DiscoveryError> {
        match &instance.endpoint {
            Endpoint::Shm(addr) => Ok(remove_stale_socket(addr.path())?),
            other => Err(DiscoveryError::NotLocal {
                service: instance.service.clone(),
                id: instance.id,
                endpoint: other.clone(),
            }),
        }
    }

    /// Judges one socket: `Some` if its instance is live (with a pidfd to
    /// watch its process when there is one), `None` if it is gone (its stale
    /// socket removed) or cannot be an endpoint.
    fn classify(
        &self,
        service: &ServiceName,
        entry: &Entry,
    ) -> Option<(Instance, Option<OwnedFd>)> {
        let endpoint = match Endpoint::shm(&entry.path) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(path = %entry.path.display(), error = %e, "skipping socket");
                return None;
            }
        };
        let instance = Instance {
            service: service.clone(),
            id: entry.id,
            pid: entry.pid,
            endpoint,
            host: self.host.clone(),
        };
        match liveness(entry.pid, entry.modified) {
            Liveness::Alive(pidfd) => Some((instance, pidfd)),
            Liveness::Gone => settle_stale(&entry.path).then_some((instance, None)),
        }
    }
}

/// `<id>-<pid>.sock`.
fn socket_file_name(id: InstanceId, pid: u32) -> String {
    format!("{id}-{pid}{SOCKET_SUFFIX}")
}

/// Parses `<32 lowercase hex>-<pid>.sock` (pid in canonical decimal, > 0).
fn parse_socket_name(name: &str) -> Option<(InstanceId, u32)> {
    let stem = name.strip_suffix(SOCKET_SUFFIX)?;
    let (id, pid) = stem.split_once('-')?;
    let id: InstanceId = id.parse().ok()?;
    let canonical = !pid.is_empty()
        && pid.len() <= 10
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !pid.starts_with('0');
    if !canonical {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    // Pids are positive `pid_t`s.
    i32::try_from(pid).ok()?;
    Some((id, pid))
}

/// An instance socket found in a service directory.
struct Entry {
    name: OsString,
    path: PathBuf,
    id: InstanceId,
    pid: u32,
    /// When the socket was bound.
    modified: Option<SystemTime>,
}

/// The instance sockets in `dir` (none if it does not exist). Skips
/// dot-files (sockets being published or removed), names that are not
/// `<id>-<pid>.sock`, and anything that is not a socket (symlinks included).
fn read_entries(dir: &Path) -> Result<Vec<Entry>, DiscoveryError> {
    let read_err = |source| DiscoveryError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let listing = match fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut entries = Vec::new();
    for entry in listing {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some((id, pid)) = name.to_str().and_then(parse_socket_name) else {
            continue;
        };
        let path = entry.path();
        // The entry may vanish meanwhile; then it is simply not listed.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_socket() {
            continue;
        }
        entries.push(Entry {
            name,
            path,
            id,
            pid,
            modified: meta.modified().ok(),
        });
    }
    Ok(entries)
}

/// What the pid in a socket's name tells.
enum Liveness {
    /// A process with that pid runs and may have made the socket; its pidfd
    /// if the kernel has pidfds.
    Alive(Option<OwnedFd>),
    /// No such process, it has exited, or it started after the socket was
    /// made (the pid was reused).
    Gone,
}

fn liveness(pid: u32, socket_made: Option<SystemTime>) -> Liveness {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Liveness::Gone;
    };
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        // No such process; EINVAL: a thread id, not a process.
        Err(Errno::SRCH | Errno::INVAL) => return Liveness::Gone,
        // Kernels before 5.3: existence only (zombies count as alive), and no
        // crash notification for this instance.
        Err(Errno::NOSYS) => {
            return match test_kill_process(pid) {
                Err(Errno::SRCH) => Liveness::Gone,
                _ => Liveness::Alive(None),
            };
        }
        Err(e) => {
            tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e,
                "pidfd_open failed; treating the instance as alive without crash notification");
            return Liveness::Alive(None);
        }
    };
    // Read the start time first and check the pidfd after: if the process
    // is still running then, the start time we read was its own.
    let started = process_start_time(pid.as_raw_nonzero().get());
    if has_exited(&pidfd) {
        return Liveness::Gone;
    }
    if let (Some(started), Some(made)) = (started, socket_made)
        && started > made + PID_REUSE_SLACK
    {
        return Liveness::Gone;
    }
    Liveness::Alive(Some(pidfd))
}

/// Whether the process behind `pidfd` has exited (the pidfd is readable);
/// zombies have.
fn has_exited(pidfd: &OwnedFd) -> bool {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&zero)) {
            Ok(n) => return n > 0,
            Err(Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

/// When process `pid` started, in wall-clock time: field 22 of
/// `/proc/<pid>/stat` (clock ticks after boot, on `CLOCK_BOOTTIME`)
/// converted with the current offset between the two clocks. Rounded down
/// to a clock tick.
fn process_start_time(pid: i32) -> Option<SystemTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; the start time is field 22.
    let ticks: u64 = after_comm.split_ascii_whitespace().nth(19)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second();
    if hz == 0 {
        return None;
    }
    let since_boot = Duration::from_secs(ticks / hz)
        + Duration::from_nanos((ticks % hz).checked_mul(1_000_000_000)? / hz);
    let boot_now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let boot_now = Duration::new(
        u64::try_from(boot_now.tv_sec).ok()?,
        u32::try_from(boot_now.tv_nsec).ok()?,
    );
    SystemTime::now().checked_sub(boot_now.checked_sub(since_boot)?)
}

/// Deals with the socket of an instance whose process is gone: removes it if
/// it refuses connections. Returns whether it is (still) there and live
/// after all, in which case it is listed.
fn settle_stale(path: &Path) -> bool {
    match remove_stale_socket(path) {
        Ok(true) => {
            tracing::debug!(path = %path.display(), "removed the stale socket of a dead instance");
            false
        }
        // Gone meanwhile, or live: someone still listens there (a socket
        // inherited across fork, or a clock step fooled the reuse check).
        Ok(false) => fs::symlink_metadata(path).is_ok(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot remove the stale socket of a dead instance; not listing it");
            false
        }
    }
}

/// Registers a pidfd with the tokio reactor.
///
/// `AsyncFd::with_interest` is deprecated because it is unsound for inner
/// types whose descriptor can change or be closed behind the reactor's back;
/// its replacement is an unchecked constructor, which `forbid(unsafe_code)` rules out. `OwnedFd` owns its
/// descriptor for its whole life and always returns the same one, which is
/// exactly the contract the replacement asks for, so the safe constructor is
/// sound here.
#[allow(deprecated)]
fn register_pidfd(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(pidfd, Interest::READABLE)
}

// ---------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------

/// A live view of one service's instances on this host, from
/// [`LocalRegistry::watch`].
///
/// It is a [`Stream`] of instance sets (`Vec<Instance>`, sorted by id): the
/// first item is the set found when the watch started, then one item each
/// time the set changes. Every item is the complete set, so a consumer just
/// replaces what it had. Changes that happen while nobody polls are
/// coalesced (an instance that comes and goes in between may never be
/// seen), and nothing is yielded when events do not change the set.
/// Without a stream combinator library, use [`changed`](Self::changed);
/// [`current`](Self::current) is the last set yielded.
///
/// New instances and clean exits are seen through inotify on the service
/// directory, crashes through one pidfd per instance (the crashed instance's
/// socket is then removed); both wake the polling task directly, typically
/// well within a millisecond. The watch does its work while it is polled;
/// dropping it closes the inotify instance and the pidfds.
///
/// If the service directory is deleted, it is recreated and watched again.
/// Errors reading a directory are logged and the last known set is kept.
/// The stream ends (returns `None`) only if inotify itself fails; then
/// [`error`](Self::error) says why.
#[derive(Debug)]
pub struct InstanceWatch {
    registry: LocalRegistry,
    service: ServiceName,
    dir: PathBuf,
    events: EventStream<Box<[u8]>>,
    wd: WatchDescriptor,
    /// Live instances by socket file name (which sorts by id).
    known: BTreeMap<OsString, Known>,
    /// The set last yielded (or about to be yielded first).
    current: Vec<Instance>,
    /// Whether the first set has been yielded.
    delivered: bool,
    error: Option<DiscoveryError>,
}

#[derive(Debug)]
struct Known {
    instance: Instance,
    path: PathBuf,
    /// Readable when the instance's process exits.
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl InstanceWatch {
    /// The next instance set: the initial set on the first call, then the
    /// set after the next change. `None` once the watch has failed (see
    /// [`error`](Self::error)).
    pub async fn changed(&mut self) -> Option<Vec<Instance>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The set last yielded; before the first item, the set found when the
    /// watch started.
    pub fn current(&self) -> &[Instance] {
        &self.current
    }

    /// The watched service.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the stream ended, if it did.
    pub fn error(&self) -> Option<&DiscoveryError> {
        self.error.as_ref()
    }

    fn snapshot(&self) -> Vec<Instance> {
        self.known.values().map(|k| k.instance.clone()).collect()
    }

    /// Re-reads the directory: keeps known instances whose socket is still
    /// there, judges new ones, forgets the rest (closing their pidfds).
    fn rescan(&mut self) -> Result<(), DiscoveryError> {
        let entries = read_entries(&self.dir)?;
        let mut known = BTreeMap::new();
        for entry in entries {
            if let Some(k) = self.known.remove(&entry.name) {
                known.insert(entry.name, k);
                continue;
            }
            let Some((instance, pidfd)) = self.registry.classify(&self.service, &entry) else {
                continue;
            };
            let pidfd = pidfd.and_then(|fd| match register_pidfd(fd) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(pid = instance.pid, error = %e,
                        "cannot watch the process of an instance; its crash will go unnoticed");
                    None
                }
            });
            known.insert(
                entry.name,
                Known {
                    instance,
                    path: entry.path,
                    pidfd,
                },
            );
        }
        self.known = known;
        Ok(())
    }

    /// Watches the directory again after its watch was removed (the
    /// directory was deleted or moved away), recreating it if needed.
    fn rewatch(&mut self) -> Result<(), DiscoveryError> {
        let dir = self.registry.service_dir(&self.service)?;
        self.wd = self
            .events
            .watches()
            .add(&dir, watch_mask())
            .map_err(|source| DiscoveryError::Watch {
                path: dir.clone(),
                op: "inotify_add_watch",
                source,
            })?;
        self.dir = dir;
        Ok(())
    }

    /// Drains ready inotify events. Returns whether any arrived and whether
    /// the directory must be watched again; `Err` when the stream failed.
    fn drain_events(&mut self, cx: &mut Context<'_>) -> Result<(bool, bool), DiscoveryError> {
        let mut any = false;
        let mut rewatch = false;
        loop {
            match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    any = true;
                    if event.wd == self.wd && event.mask.contains(EventMask::MOVE_SELF) {
                        // The directory moved away; the watch follows it, so
                        // drop it (IGNORED follows) and watch our path again.
                        let _ = self.events.watches().remove(self.wd.clone());
                        rewatch = true;
                    }
                    if event.mask.contains(EventMask::IGNORED) && event.wd == self.wd {
                        rewatch = true;
                    }
                    // Q_OVERFLOW: events were lost; the rescan catches up.
                }
                Poll::Ready(Some(Err(source))) => {
                    return Err(DiscoveryError::WatchEvents {
                        path: self.dir.clone(),
                        source,
                    });
                }
                Poll::Ready(None) => {
                    return Err(DiscoveryError::WatchEvents {
                        path: self.dir.clone(),
                        source: io::Error::from(io::ErrorKind::UnexpectedEof),
                    });
                }
                Poll::Pending => return Ok((any, rewatch)),
            }
        }
    }

    /// Handles instances whose process exited: removes their stale sockets.
    /// Returns whether any exited.
    fn reap_exited(&mut self, cx: &mut Context<'_>) -> bool {
        let mut exited = Vec::new();
        for (name, k) in &self.known {
            if let Some(fd) = &k.pidfd {
                // Ready (or an error, which leaves it unwatchable): either way
                // judge the socket now.
                if fd.poll_read_ready(cx).is_ready() {
                    exited.push(name.clone());
                }
            }
        }
        for name in &exited {
            let Some(k) = self.known.get_mut(name) else {
                continue;
            };
            k.pidfd = None;
            if !settle_stale(&k.path) {
                self.known.remove(name);
            }
        }
        !exited.is_empty()
    }
}

impl Stream for InstanceWatch {
    type Item = Vec<Instance>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<Instance>>> {
        let this = &mut *self;
        if this.error.is_some() {
            return Poll::Ready(None);
        }
        if !this.delivered {
            this.delivered = true;
            return Poll::Ready(Some(this.current.clone()));
        }
        loop {
            // Poll every source until it is pending, so each has our waker.
            let (mut dirty, rewatch) = match this.drain_events(cx) {
                Ok(r) => r,
                Err(e) => {
                    this.error = Some(e);
                    return Poll::Ready(None);
                }
            };
            dirty |= this.reap_exited(cx);
            if rewatch {
                if let Err(e) = this.rewatch() {
                    this.error = Some(e);
                    return Poll::Ready(None);
                }
                dirty = true;
            }
            if !dirty {
                return Poll::Pending;
            }
            if let Err(e) = this.rescan() {
                tracing::warn!(error = %e, "keeping the last known instances");
                continue;
            }
            let set = this.snapshot();
            if set != this.current {
                this.current.clone_from(&set);
                return Poll::Ready(Some(set));
            }
            // No change; loop to poll the sources again (new pidfds too).
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_round_trip_and_reject_the_rest() {
        let id = InstanceId::from_u128(0xabc);
        let name = socket_file_name(id, 4242);
        assert_eq!(name, format!("{id}-4242.sock"));
        assert_eq!(parse_socket_name(&name), Some((id, 4242)));
        let hex = id.to_string();
        for bad in [
            "README".to_owned(),
            format!(".{name}"),
            format!("{hex}-4242"),
            format!("{hex}-.sock"),
            format!("{hex}-0.sock"),
            format!("{hex}-042.sock"),
            format!("{hex}-+42.sock"),
            format!("{hex}-42x.sock"),
            format!("{hex}-4294967295.sock"),
            format!("{}-42.sock", hex.to_uppercase().replace('0', "A")),
            format!("{}-42.sock", &hex[1..]),
            "zz-1.sock".to_owned(),
        ] {
            assert_eq!(parse_socket_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn hex_ids_drop_dashes_and_reject_junk() {
        let dir = std::env::temp_dir().join(format!("commy-hexid-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("id");
        fs::write(&file, "5773917A-6c5f-443b\n").unwrap();
        assert_eq!(
            read_hex_id(file.to_str().unwrap()).as_deref(),
            Some("5773917a6c5f443b")
        );
        fs::write(&file, "not hex\n").unwrap();
        assert_eq!(read_hex_id(file.to_str().unwrap()), None);
        fs::write(&file, "\n").unwrap();
        assert_eq!(read_hex_id(file.to_str().unwrap()), None);
        assert_eq!(read_hex_id("/nonexistent/commy/id"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_process_started_before_now() {
        let started = process_start_time(std::process::id() as i32).unwrap();
        let now = SystemTime::now();
        assert!(started <= now, "{started:?} > {now:?}");
        // The test binary has not run for a day.
        assert!(now.duration_since(started).unwrap() < Duration::from_secs(86_400));
    }
}
