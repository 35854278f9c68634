//! What a service handler sees and returns.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{Deadline, Metadata, NO_DEADLINE, ServiceName, Status};

/// A request as the handler receives it.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) service: ServiceName,
    pub(crate) payload: Bytes,
    pub(crate) metadata: Metadata,
    pub(crate) deadline: ArrivedDeadline,
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
        &self.service
    }
}

/// A handler's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    pub(crate) payload: Bytes,
    pub(crate) metadata: Metadata,
}

impl Response {
    /// A response carrying `payload`.
    pub fn new(payload: impl Into<Bytes>) -> Response {
        Response {
            payload: payload.into(),
            metadata: Metadata::default(),
        }
    }

    /// Attaches metadata (headers) to the response.
    pub fn with_metadata(mut self, metadata: Metadata) -> Response {
        self.metadata = metadata;
        self
    }

    /// The response body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The response metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Takes the response body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

impl From<Bytes> for Response {
    fn from(b: Bytes) -> Response {
        Response::new(b)
    }
}

impl From<Vec<u8>> for Response {
    fn from(v: Vec<u8>) -> Response {
        Response::new(v)
    }
}

impl From<&'static [u8]> for Response {
    fn from(s: &'static [u8]) -> Response {
        Response::new(Bytes::from_static(s))
    }
}

impl From<&'static str> for Response {
    fn from(s: &'static str) -> Response {
        Response::new(Bytes::from_static(s.as_bytes()))
    }
}

/// The future a handler returns, boxed.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response, Status>> + Send>>;

/// A type-erased handler.
pub(crate) type Handler = Arc<dyn Fn(Request) -> HandlerFuture + Send + Sync>;

/// Erases an async handler function.
pub(crate) fn erase<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, Status>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}
