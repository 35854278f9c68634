//! The policy slots of the call and serve paths: the places where
//! balancing, retry, outlier ejection, authorization and rate limits plug
//! in, once for both transports.
//!
//! - A [`CallPolicy`] belongs to the pool of one called service: it admits
//!   (or refuses) the instances a call may go to, records each call's
//!   outcome, and decides whether a failed call is tried again on a new
//!   pick. The mesh asks a [`CallPolicies`] function for each service's
//!   policy when it first calls the service.
//! - A [`ServePolicy`] belongs to one served service: it admits a
//!   request's [`Caller`](crate::Caller) and head (metadata, kind) before the handler
//!   sees it; a refusal is the caller's answer. The mesh asks a
//!   [`ServePolicies`] function for it when the service starts.
//!
//! A slot left empty costs one branch per call or request. With a policy
//! installed the calls keep the allocation-free fast path; the outcome of
//! each call is measured ([`EndpointStats`]), so the call reads the clock
//! twice more.
//!
//! ```
//! use std::sync::Arc;
//! use commy_mesh::policy::{CallPolicy, Outcome, RequestHead, ServePolicy};
//! use commy_mesh::{Caller, Mesh, Status};
//! use commy_mesh::discovery::InstanceId;
//! use commy_mesh::policy::EndpointStats;
//!
//! /// Retries a call refused by an unavailable instance, twice at most.
//! struct RetryUnavailable;
//! impl CallPolicy for RetryUnavailable {
//!     fn max_attempts(&self) -> u32 {
//!         3
//!     }
//!     fn retry(&self, status: &Status, _attempt: u32) -> bool {
//!         status.code() == commy_mesh::Code::Unavailable
//!     }
//! }
//!
//! /// Only processes of our own user may call.
//! struct SameUser(u32);
//! impl ServePolicy for SameUser {
//!     fn admit(&self, caller: &Caller, _head: &RequestHead<'_>) -> Result<(), Status> {
//!         match caller {
//!             Caller::Local { uid, .. } if *uid == self.0 => Ok(()),
//!             _ => Err(Status::permission_denied("callers of another user are refused")),
//!         }
//!     }
//! }
//!
//! let builder = Mesh::builder()
//!     .call_policy(|_service| Some(Arc::new(RetryUnavailable) as Arc<dyn CallPolicy>))
//!     .serve_policy(|service| {
//!         (service.as_str() != "public").then(|| Arc::new(SameUser(1000)) as Arc<dyn ServePolicy>)
//!     });
//! # let _ = builder;
//! # let _ = |_: InstanceId, _: &EndpointStats, _: &Outcome<'_>| ();
//! ```

pub use crate::call::policy::{CallPolicies, CallPolicy, Outcome};
pub use crate::call::stats::{EndpointStats, counts_against};
pub use crate::serve::policy::{RequestHead, ServePolicies, ServePolicy};
pub use commy_discovery::Standing;
