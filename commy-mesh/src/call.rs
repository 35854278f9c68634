//! The call path: from a service name to an answer.
//!
//! Over shared memory a call is written by the calling thread into the
//! link's ring ([`shm`]), its answer matched by stream id in the link's
//! [`table`], and received by the caller itself while it spins, else by the
//! link's [`reader`] thread. [`deadline`] computes when it is due, once.

pub(crate) mod deadline;
pub(crate) mod reader;
pub(crate) mod shm;
pub(crate) mod table;
