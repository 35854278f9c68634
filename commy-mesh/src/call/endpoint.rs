//! One instance as a call reaches it: an [`Endpoint`] is a live link over
//! one of the two transports. Everything above it (the pool's pick, the
//! balancer, the mesh's call methods) is transport-agnostic; the transport
//! is decided here, in each method, and where a link is made
//! ([`Pools::connect`](crate::call::pool::Pools::connect), by the
//! instance's endpoint scheme).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use commy_core::{Metadata, ServiceName, Status};

use crate::call::attempt::Attempt;
use crate::call::clock::now_ms;
use crate::call::deadline::Due;
use crate::call::shm::{ClientConn, SentPublish, Unsent};
use crate::call::stats::EndpointStats;
use crate::call::tls::PeerState;
use crate::response::Response;
use commy_net::CallFailure;

/// A live link to an instance: a shared-memory link of our own, or the TLS
/// connection to the peer process that serves it (shared by all the
/// instances that process serves). Cloning one clones a reference.
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// A shared-memory link to an instance on this host.
    Shm(Arc<ClientConn>),
    /// An instance at a peer process, reached over TLS.
    Tls(Arc<TlsInstance>),
}

/// An instance at a peer process as one pool reaches it: the connection
/// to the peer (shared with every other instance the peer serves) and the
/// statistics of this instance's calls alone, so that one slow or failing
/// service of a peer does not weigh on another.
pub(crate) struct TlsInstance {
    pub(crate) peer: Arc<PeerState>,
    pub(crate) stats: EndpointStats,
}

impl TlsInstance {
    pub(crate) fn new(peer: Arc<PeerState>, stats: EndpointStats) -> TlsInstance {
        TlsInstance { peer, stats }
    }
}

impl Endpoint {
    /// Calls `service` with `payload`. `balanced`: count the call in the
    /// endpoint's load (only needed when there are instances to choose
    /// between); `spin`: the call's polling budget on shared memory.
    pub(crate) async fn call(
        &self,
        service: &ServiceName,
        payload: Bytes,
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
        spin: Option<Duration>,
    ) -> Result<Response, Attempt> {
        match self {
            Endpoint::Shm(conn) => conn.attempt(payload, metadata, due, balanced, spin).await,
            Endpoint::Tls(tls) => {
                let deadline = due.absolute();
                (tls.peer)
                    .call(&tls.stats, service, payload, metadata, deadline, false)
                    .await
                    .map_err(|f| match f {
                        CallFailure::Unsent(status, payload) => Attempt::Unsent(payload, status),
                        CallFailure::Failed(status) => Attempt::Failed(status),
                    })
            }
        }
    }

    /// The endpoint's load for the balancer: calls in flight on a
    /// shared-memory link; the peak-EWMA cost (round trips times calls in
    /// flight) of a TLS peer, whose round trips vary far more.
    pub(crate) fn load(&self) -> u64 {
        match self {
            Endpoint::Shm(conn) => conn.stats.in_flight(),
            Endpoint::Tls(tls) => tls.stats.ewma.cost(now_ms(), tls.stats.in_flight()),
        }
    }

    /// Sends a one-way message to `service` (no answer).
    pub(crate) async fn send(
        &self,
        service: &ServiceName,
        payload: Bytes,
        metadata: &Metadata,
        mut due: Due,
    ) -> Result<(), Status> {
        match self {
            Endpoint::Shm(conn) => conn.send_oneway(&payload, metadata),
            Endpoint::Tls(tls) => (tls.peer)
                .call(&tls.stats, service, payload, metadata, due.absolute(), true)
                .await
                .map(drop)
                .map_err(CallFailure::into_status),
        }
    }

    /// Sends published messages (their topic in `metadata`) to one
    /// subscriber, in order, waiting at most `stall` for it to take
    /// anything; says how many were sent, why the others were not, and
    /// what the subscriber discarded.
    /// Subscribers at TLS peers are reached through their process's
    /// publish service instead (see
    /// [`Peers::publish`](crate::call::tls::Peers::publish)).
    pub(crate) fn send_publish_many<P: AsRef<[u8]>>(
        &self,
        metadata: &[u8],
        payloads: &[P],
        stall: Duration,
    ) -> SentPublish {
        match self {
            Endpoint::Shm(conn) => conn.send_publish_many(metadata, payloads, stall),
            Endpoint::Tls(tls) => SentPublish {
                sent: 0,
                discarded: 0,
                result: Err(Unsent::Failed(Status::failed_precondition(format!(
                    "a subscriber at peer {} is published to through its process's \
                     publish service",
                    tls.peer.addr
                )))),
            },
        }
    }

    /// The endpoint's statistics.
    pub(crate) fn stats(&self) -> &EndpointStats {
        match self {
            Endpoint::Shm(conn) => &conn.stats,
            Endpoint::Tls(tls) => &tls.stats,
        }
    }

    /// Whether the endpoint can still carry calls: a shared-memory link
    /// whose peer is gone, or that its instance told to go away, cannot
    /// (the next call makes a new one, or goes elsewhere); a TLS peer
    /// reconnects by itself.
    pub(crate) fn is_alive(&self) -> bool {
        match self {
            Endpoint::Shm(conn) => conn.takes_calls(),
            Endpoint::Tls(_) => true,
        }
    }

    /// The shared-memory link, for the paths that only exist there (the
    /// allocation-free fast path, callback and token calls).
    pub(crate) fn shm(&self) -> Option<&Arc<ClientConn>> {
        match self {
            Endpoint::Shm(conn) => Some(conn),
            Endpoint::Tls(_) => None,
        }
    }
}
