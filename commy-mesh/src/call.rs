//! Calling services: the options of a call and what comes back.
//!
//! ```
//! use std::time::Duration;
//! use commy_mesh::call::{CallOptions, Response};
//! use commy_mesh::Mesh;
//!
//! # async fn demo(mesh: Mesh) -> Result<(), commy_mesh::Status> {
//! let options = CallOptions::default().timeout(Duration::from_millis(200));
//! let answer: Response = mesh.call_with("echo", &b"hi"[..], options).await?;
//! assert_eq!(&answer.payload()[..], b"hi");
//! # Ok(())
//! # }
//! ```
//!
//! Inside the crate this module is the call path, from a service name to an
//! answer: a service's pool (`pool.rs`) holds its instances and our links
//! to them and picks the one a call goes to; over shared memory the calling
//! thread writes the request into the link's ring (`shm.rs`), its answer is
//! matched by stream id in the link's call table (`table.rs`) and received
//! by the caller while it spins, else by the link's reader thread
//! (`reader.rs`); over TLS a peer process takes the call (`tls.rs`).
//! `deadline.rs` computes when a call is due, once.

pub(crate) mod attempt;
pub(crate) mod clock;
pub(crate) mod deadline;
pub(crate) mod endpoint;
pub(crate) mod options;
pub(crate) mod policy;
pub(crate) mod pool;
pub(crate) mod reader;
pub(crate) mod resilience;
pub(crate) mod shm;
pub(crate) mod stats;
pub(crate) mod table;
pub(crate) mod tls;

pub use crate::response::Response;
pub use commy_config::TransportPreference;
pub use commy_core::{Deadline, Metadata};
pub use options::CallOptions;
pub use pool::EndpointInfo;
pub use resilience::Strategy;
