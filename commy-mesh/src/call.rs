//! The call path: from a service name to an answer.
//!
//! A service's [`pool`] holds its instances and our links to them, and
//! picks the one a call goes to.
//! Over shared memory a call is written by the calling thread into the
//! link's ring ([`shm`]), its answer matched by stream id in the link's
//! [`table`], and received by the caller itself while it spins, else by the
//! link's [`reader`] thread. [`deadline`] computes when it is due, once.

pub(crate) mod deadline;
pub(crate) mod options;
pub(crate) mod pool;
pub(crate) mod reader;
pub(crate) mod shm;
pub(crate) mod table;
pub(crate) mod tls;
