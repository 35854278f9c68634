//! Who sent a request, in terms every binding can show: a kind name and
//! plain values.
//!
//! [`FfiCaller`] keeps the mesh's [`Caller`] as it came (a copy of three
//! numbers on shared memory, a shared reference to the connection's peer
//! over TLS) and converts on demand, so a request whose handler never asks
//! costs nothing more.
//!
//! ```
//! use bytes::Bytes;
//! use commy_ffi::{FfiMesh, MeshOptions, block_on};
//!
//! # let dir = std::env::temp_dir().join(format!("commy-ffi-caller-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! # let mut options = MeshOptions::default();
//! # options.settings.set("runtime_dir", dir.to_str().unwrap());
//! let mesh = FfiMesh::open(options)?;
//! let _whoami = mesh.serve("whoami", |req, reply| {
//!     let caller = req.caller();
//!     let who = match caller.kind() {
//!         "local" => format!("pid {}", caller.pid().unwrap_or(0)),
//!         "remote" => caller.identity().unwrap_or_else(|| "anonymous".into()),
//!         _ => "someone".into(),
//!     };
//!     reply.ok(who.into());
//! })?;
//!
//! let no_interrupt = || Ok::<(), ()>(());
//! let who = block_on(mesh.call("whoami", Bytes::new(), None), no_interrupt).unwrap()?;
//! assert_eq!(who, format!("pid {}", std::process::id()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::net::SocketAddr;

use commy_mesh::Caller;

/// Who sent a request, as its transport vouches for it (see
/// [`Caller`]): [`kind`](FfiCaller::kind) `"local"` (a process of this
/// host, over shared memory: [`uid`](FfiCaller::uid),
/// [`gid`](FfiCaller::gid), [`pid`](FfiCaller::pid)) or `"remote"` (over
/// TLS: [`identity`](FfiCaller::identity), [`addr`](FfiCaller::addr)).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct FfiCaller(Caller);

impl FfiCaller {
    /// `"local"`, `"remote"`, or `"unknown"` for a kind of caller this
    /// version does not know.
    pub fn kind(&self) -> &'static str {
        match &self.0 {
            Caller::Local { .. } => "local",
            Caller::Remote(_) => "remote",
            _ => "unknown",
        }
    }

    /// The local caller's effective user id.
    pub fn uid(&self) -> Option<u32> {
        self.local().map(|(uid, _, _)| uid)
    }

    /// The local caller's effective group id.
    pub fn gid(&self) -> Option<u32> {
        self.local().map(|(_, gid, _)| gid)
    }

    /// The local caller's process id in this process's pid namespace (0
    /// when it lives in another one).
    pub fn pid(&self) -> Option<u32> {
        self.local().map(|(_, _, pid)| pid)
    }

    /// The remote caller's SPIFFE ID (`spiffe://<mesh>/<service>`), `None`
    /// when it presented no client certificate (or is local).
    pub fn identity(&self) -> Option<String> {
        match &self.0 {
            Caller::Remote(r) => r.identity().map(ToString::to_string),
            _ => None,
        }
    }

    /// The remote caller's address (its TLS connection's peer address).
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.0 {
            Caller::Remote(r) => Some(r.addr()),
            _ => None,
        }
    }

    /// The mesh's own description.
    pub fn caller(&self) -> &Caller {
        &self.0
    }

    fn local(&self) -> Option<(u32, u32, u32)> {
        match self.0 {
            Caller::Local { uid, gid, pid } => Some((uid, gid, pid)),
            _ => None,
        }
    }
}

impl From<Caller> for FfiCaller {
    fn from(caller: Caller) -> FfiCaller {
        FfiCaller(caller)
    }
}

impl From<&Caller> for FfiCaller {
    fn from(caller: &Caller) -> FfiCaller {
        FfiCaller(caller.clone())
    }
}

/// Equal when every value above is (two requests of one link, or of one
/// TLS connection, have equal callers). A caller of an unknown kind equals
/// none.
impl PartialEq for FfiCaller {
    fn eq(&self, other: &FfiCaller) -> bool {
        match (&self.0, &other.0) {
            (Caller::Local { .. }, Caller::Local { .. }) => self.local() == other.local(),
            (Caller::Remote(a), Caller::Remote(b)) => {
                a.addr() == b.addr() && a.identity() == b.identity()
            }
            _ => false,
        }
    }
}
