//! The options of one call: timeout or deadline, metadata, transport,
//! polling budget.

use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_config::TransportPreference;
use commy_core::{Deadline, Metadata};

/// Options of one call.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallOptions {
    /// Give up after this long (overrides the mesh's default timeout).
    pub timeout: Option<Duration>,
    /// An absolute deadline (the earlier of this and `timeout` applies).
    pub deadline: Option<Deadline>,
    /// Metadata sent with the request.
    pub metadata: Metadata,
    /// The transport this call may use (default: the mesh's).
    pub transport: Option<TransportPreference>,
    /// How long this caller polls for its answer before it sleeps, instead
    /// of [`MeshBuilder::call_spin`](crate::MeshBuilder::call_spin).
    pub spin: Option<Duration>,
    /// When the call's timeout starts counting on the calling side
    /// (default: when it is made, read from the clock once needed): a
    /// caller making many calls at once may read the clock once for all of
    /// them. The service is told the timeout itself, counted from the
    /// request's arrival.
    pub started: Option<Instant>,
    /// The call may be made more than once: after a failure of the
    /// instance that may have reached it, it is tried again on another
    /// (within the retry budget, `retry_attempts` and its deadline), as
    /// the calls of the services the `idempotent` setting names are. A
    /// call that provably never reached an instance is tried again
    /// either way.
    pub idempotent: bool,
    /// The key a service balanced by consistent hashing (the `balance`
    /// setting's `maglev`) routes on: calls with the same key go to the
    /// same instance while it is in the pool, from every process and SDK.
    /// Other strategies ignore it.
    pub hash_key: Option<Bytes>,
}

impl CallOptions {
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> CallOptions {
        self.timeout = Some(t);
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, m: Metadata) -> CallOptions {
        self.metadata = m;
        self
    }

    /// Forces a transport for this call.
    pub fn transport(mut self, t: TransportPreference) -> CallOptions {
        self.transport = Some(t);
        self
    }

    /// Sets this call's polling budget (see [`MeshBuilder::call_spin`](crate::MeshBuilder::call_spin)).
    pub fn spin(mut self, spin: Duration) -> CallOptions {
        self.spin = Some(spin);
        self
    }

    /// Marks the call idempotent (see [`idempotent`](CallOptions::idempotent)).
    pub fn idempotent(mut self, yes: bool) -> CallOptions {
        self.idempotent = yes;
        self
    }

    /// Sets the call's hash key (see [`hash_key`](CallOptions::hash_key)).
    pub fn hash_key(mut self, key: impl Into<Bytes>) -> CallOptions {
        self.hash_key = Some(key.into());
        self
    }

    /// Sets when the call's timeout starts counting (see
    /// [`started`](CallOptions::started)).
    pub fn started_at(mut self, at: Instant) -> CallOptions {
        self.started = Some(at);
        self
    }
}
