//! How one attempt of a call failed: what the transports' links report
//! and the retry loop (`Mesh::call_routed`) decides on.

use bytes::Bytes;
use commy_core::Status;

/// How one attempt of a call failed.
pub(crate) enum Attempt {
    /// The request never reached the instance (the link broke before it
    /// was written, the peer could not be connected to, the peer's GoAway
    /// refused it); its payload comes back where it was not sent at all.
    Unsent(Option<Bytes>, Status),
    /// The request was sent (or may have been) and failed.
    Failed(Status),
}

impl Attempt {
    /// The failure's status.
    pub(crate) fn status(&self) -> &Status {
        match self {
            Attempt::Unsent(_, s) | Attempt::Failed(s) => s,
        }
    }

    /// The failure's status, to keep.
    pub(crate) fn into_status(self) -> Status {
        match self {
            Attempt::Unsent(_, s) | Attempt::Failed(s) => s,
        }
    }
}
