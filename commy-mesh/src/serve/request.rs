//! What a service handler sees and returns: the [`Request`] (payload,
//! metadata, deadline, and who the [`Caller`] is) and the [`Response`].
//!
//! ```
//! use commy_mesh::{Request, Response, Status};
//!
//! async fn greet(req: Request) -> Result<Response, Status> {
//!     if req.payload().is_empty() {
//!         return Err(Status::invalid_argument("say something"));
//!     }
//!     let mut reply = b"hello, ".to_vec();
//!     reply.extend_from_slice(req.payload());
//!     Ok(reply.into())
//! }
//! # let _ = greet;
//! ```

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{Deadline, Metadata, NO_DEADLINE, ServiceName};
use parking_lot::Mutex;

use crate::response::SomeMetadata;

/// A request as the handler receives it.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) service: &'static ServiceName,
    pub(crate) payload: Bytes,
    pub(crate) metadata: SomeMetadata,
    pub(crate) deadline: ArrivedDeadline,
    pub(crate) caller: Caller,
}

/// Who sent a request, as its transport vouches for it: the kernel on
/// shared memory, the TLS handshake across hosts. Bearer tokens a caller
/// adds travel in the [metadata](Request::metadata) and are not checked
/// here.
///
/// ```
/// use commy_mesh::{Caller, Request, Response, Status};
///
/// async fn whoami(req: Request) -> Result<Response, Status> {
///     Ok(match req.caller() {
///         Caller::Local { uid, .. } => format!("uid {uid} on this host"),
///         Caller::Remote(remote) => match remote.identity() {
///             Some(id) => id.to_string(),
///             None => format!("{} (no client certificate)", remote.addr()),
///         },
///         _ => "someone".to_owned(),
///     }
///     .into_bytes()
///     .into())
/// }
/// # let _ = whoami;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Caller {
    /// A process of this host, over shared memory: the credentials the
    /// kernel recorded when it connected (`SO_PEERCRED`). `pid` is 0 when
    /// the caller lives in another pid namespace.
    Local {
        /// Effective user id.
        uid: u32,
        /// Effective group id.
        gid: u32,
        /// Process id, as seen in this process's pid namespace.
        pid: u32,
    },
    /// A process on another host, over TLS.
    Remote(RemoteCaller),
}

impl Caller {
    /// The caller of requests that arrive on a shared-memory link with the
    /// peer `cred`.
    pub(crate) fn local(cred: commy_shm::PeerCred) -> Caller {
        Caller::Local {
            uid: cred.uid,
            gid: cred.gid,
            pid: cred.pid,
        }
    }
}

/// A caller on another host: its TLS connection's peer, shared by every
/// request of the connection (a request costs no copy of it).
#[derive(Debug, Clone)]
pub struct RemoteCaller(pub(crate) Arc<commy_net::Peer>);

impl RemoteCaller {
    /// The SPIFFE ID (`spiffe://<mesh>/<service>`) of the client's
    /// certificate; `None` when it presented none (the server did not
    /// require one).
    pub fn identity(&self) -> Option<&commy_net::Identity> {
        self.0.identity.as_ref()
    }

    /// The connection's remote address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.0.addr
    }
}

/// The one copy of a served service's name that its requests refer to, so
/// that a request costs no reference count. A copy is kept for each
/// distinct name the process serves (never freed: a handful of names).
pub(crate) fn interned(name: &ServiceName) -> &'static ServiceName {
    static NAMES: Mutex<Vec<&'static ServiceName>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock();
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static ServiceName = Box::leak(Box::new(name.clone()));
    names.push(leaked);
    leaked
}

/// A request's deadline as it came off the wire: the time the caller had
/// left when it sent the request. It is anchored to the clock the first
/// time somebody needs it (the handler asks, or the handler has to wait),
/// so a handler that answers at once costs no clock read.
#[derive(Debug, Clone)]
pub(crate) enum ArrivedDeadline {
    /// The caller set none.
    None,
    /// Remaining microseconds, counted from the anchor once it is taken.
    Wire {
        micros: u64,
        anchor: OnceLock<Instant>,
    },
    /// Already anchored by the transport.
    At(Deadline),
}

impl ArrivedDeadline {
    /// The frame header's deadline field ([`NO_DEADLINE`]: none).
    pub(crate) fn from_wire(micros: u64) -> ArrivedDeadline {
        if micros == NO_DEADLINE {
            ArrivedDeadline::None
        } else {
            ArrivedDeadline::Wire {
                micros,
                anchor: OnceLock::new(),
            }
        }
    }

    /// A deadline the transport anchored already.
    pub(crate) fn at(deadline: Option<Deadline>) -> ArrivedDeadline {
        deadline.map_or(ArrivedDeadline::None, ArrivedDeadline::At)
    }

    /// The absolute deadline if there is none or it is anchored
    /// (`Ok`), else the time left when it arrived (`Err`).
    pub(crate) fn anchored(&self) -> Result<Option<Deadline>, Duration> {
        match self {
            ArrivedDeadline::None => Ok(None),
            ArrivedDeadline::Wire { micros, anchor } => match anchor.get() {
                Some(&now) => Ok(Some(Deadline::after_at(
                    Duration::from_micros(*micros),
                    now,
                ))),
                None => Err(Duration::from_micros(*micros)),
            },
            ArrivedDeadline::At(d) => Ok(Some(*d)),
        }
    }

    /// The absolute deadline, anchoring it now if nobody did yet.
    pub(crate) fn get(&self) -> Option<Deadline> {
        match self {
            ArrivedDeadline::None => None,
            ArrivedDeadline::Wire { micros, anchor } => {
                let now = *anchor.get_or_init(Instant::now);
                Some(Deadline::after_at(Duration::from_micros(*micros), now))
            }
            ArrivedDeadline::At(d) => Some(*d),
        }
    }
}

impl Request {
    /// The request body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the request body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The caller's metadata (auth token, trace context, headers).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// When the caller stops waiting, if it set a deadline. The handler is
    /// cancelled (its future dropped) when the deadline passes or the caller
    /// cancels.
    ///
    /// The wire carries the time the caller had left; it is counted from the
    /// first call of this method or, if the handler does not ask, from the
    /// moment the handler first has to wait. Both come right after the
    /// request arrives for a handler that does not block its thread.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline.get()
    }

    /// The service this request was addressed to.
    pub fn service(&self) -> &ServiceName {
        self.service
    }

    /// Who sent the request (see [`Caller`]).
    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}
