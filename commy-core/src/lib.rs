//! Commy's vocabulary: the types every other Commy crate speaks, with no I/O
//! and no raw memory access (`#![forbid(unsafe_code)]`).
//!
//! - [`Code`] and [`Status`]: the stable error taxonomy;
//! - [`MeshName`], [`ServiceName`], [`TopicName`], [`HostId`]: validated names;
//!   [`InstanceId`] and [`StreamId`]: identifiers;
//! - [`Endpoint`]: `shm://` and `tls://` locators, with the [`Transport`]
//!   scheme table;
//! - [`Deadline`]: absolute deadlines and their "remaining µs" wire form;
//! - [`Metadata`]: auth token, traceparent, content type and user headers,
//!   postcard-encoded;
//! - the frame codec: [`FrameHeader`], [`Frame`], [`FrameRef`] and the
//!   streaming [`FrameDecoder`], bounded by [`Limits`].
//!
//! Each module documents its part (name rules, locator syntax, deadline wire
//! semantics, the frame layout); every public item is also re-exported at the
//! crate root. The wire format is specified byte by byte in `docs/PROTOCOL.md`.
//!
//! ```
//! use std::time::Duration;
//! use commy_core::{
//!     Deadline, Frame, FrameDecoder, FrameFlags, FrameKind, Limits, Metadata, ServiceName, Status,
//!     StreamId,
//! };
//!
//! let service = ServiceName::new("billing")?;
//!
//! // A caller builds a request with metadata and a deadline ...
//! let metadata = Metadata { content_type: Some("application/json".into()), ..Metadata::default() };
//! let request = Frame::new(FrameKind::Request, StreamId(1), metadata.encode(), br#"{"id":42}"#.to_vec())?
//!     .with_flags(FrameFlags::END_STREAM)
//!     .with_deadline(Some(Deadline::after(Duration::from_millis(250))));
//! let wire = request.to_vec();
//!
//! // ... and the callee decodes it from a byte stream and answers with an error.
//! let mut decoder = FrameDecoder::new(Limits::default());
//! let received = decoder.decode(&wire).next().expect("one frame")?;
//! assert_eq!(received.decode_metadata(decoder.limits())?, metadata);
//! assert!(received.header().deadline_us > 0);
//!
//! let status = Status::not_found(format!("no instance of service '{service}'"));
//! let reply = Frame::error(received.stream_id(), &status)?;
//! assert_eq!(reply.status(), Some(Ok(status)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod backoff;
pub mod deadline;
pub mod endpoint;
pub mod fragment;
pub mod frame;
pub mod id;
pub mod log_limit;
pub mod metadata;
pub mod name;
pub mod status;
mod wire;

pub use deadline::{Deadline, NO_DEADLINE};
pub use endpoint::{Endpoint, EndpointError, Host, MAX_SHM_PATH_LEN, ShmAddr, TlsAddr, Transport};
pub use frame::{
    ALPN, Frame, FrameDecoder, FrameError, FrameFlags, FrameHeader, FrameKind, FrameRef, Frames,
    HEADER_LEN, Limits, PROTOCOL_VERSION,
};
pub use id::{InstanceId, InstanceIdError, StreamId};
pub use metadata::{Metadata, MetadataError};
pub use name::{DEFAULT_MESH, HostId, MAX_NAME_LEN, MeshName, NameError, ServiceName, TopicName};
pub use status::{Code, CodeError, Status, StatusDecodeError};
