//! The serve path: from a frame on a link to the handler and back.
//!
//! A [`Request`](request::Request) reaches its service's
//! [`handler`] through one [`dispatch`] (counted for draining, bounded by
//! the service's [`permits`], panics caught); shared-memory links are
//! served by a thread each ([`shm`]), their answers written back through
//! the link's sending side ([`link`]); a handler that answers later uses a
//! [`responder`]. Embedders may take requests out of a link themselves
//! ([`polled`]).

pub(crate) mod cancel;
pub(crate) mod dispatch;
pub(crate) mod handler;
pub(crate) mod inherit;
pub(crate) mod link;
pub(crate) mod load;
pub(crate) mod permits;
pub(crate) mod policy;
pub(crate) mod polled;
pub(crate) mod request;
pub(crate) mod responder;
pub(crate) mod service;
pub(crate) mod shm;
pub(crate) mod tls;
