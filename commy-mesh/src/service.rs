//! Serving requests: what a handler receives and answers, who called, and
//! the handle that keeps a service running.
//!
//! ```
//! use commy_mesh::service::{Caller, Request, Response};
//! use commy_mesh::Status;
//!
//! async fn hello(req: Request) -> Result<Response, Status> {
//!     let who = match req.caller() {
//!         Caller::Local { pid, .. } => format!("process {pid}"),
//!         _ => "a remote caller".to_owned(),
//!     };
//!     Ok(Response::new(format!("hello, {who}").into_bytes()))
//! }
//! # let _ = hello;
//! ```
//!
//! Over TLS a request names its service in the reserved header
//! [`SERVICE_HEADER`]; [`INSTANCES_SERVICE`] and [`PUBLISH_SERVICE`] are
//! the transport's reserved services (docs/PROTOCOL.md).

pub use crate::response::Response;
pub use crate::serve::inherit::inherited_deadline;
pub use crate::serve::request::{Caller, RemoteCaller, Request};
pub use crate::serve::responder::Responder;
pub use crate::serve::service::{DRAIN_GRACE, ServiceHandle};
pub use crate::wire::{INSTANCES_SERVICE, PUBLISH_SERVICE, SERVICE_HEADER};
pub use commy_core::ServiceName;
pub use commy_net::Identity;
