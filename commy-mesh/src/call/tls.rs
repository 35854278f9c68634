//! The TLS client side: the peer processes this handle may call, each one
//! a commy-net [`Client`](commy_net::Client) (one connection per remote
//! process, multiplexed), long-polled through the control service
//! `commy.instances` for the instances and subscriptions it serves. The
//! last listing survives a peer outage, so calls to a dead peer fail with
//! `UNAVAILABLE`, not `NOT_FOUND`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use commy_core::{
    Deadline, Endpoint, InstanceId, Limits, Metadata, ServiceName, Status, TlsAddr, TopicName,
};
use commy_discovery::{Instance, PowerOfTwo, RoundRobin};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::response::Response;
use crate::wire::{
    INSTANCES_SERVICE, LONG_POLL, Listing, PUBLISH_SERVICE, SERVICE_HEADER, TOPIC_HEADER,
    TOPIC_KEY_HEADER, decode_metadata,
};

/// One peer process.
pub(crate) struct PeerState {
    pub(crate) addr: TlsAddr,
    pub(crate) client: commy_net::Client,
    pub(crate) listing: Mutex<Option<Listing>>,
    /// Becomes true once the first listing attempt finished (either way).
    pub(crate) tried: watch::Sender<bool>,
    pub(crate) in_flight: AtomicUsize,
}

/// The peer processes whose instances this handle may call over TLS,
/// each watched through its listing.
pub(crate) struct Peers {
    peers: Vec<Arc<PeerState>>,
    limits: Limits,
    fallbacks: AtomicU64,
    /// Services called over TLS so far (later calls to a service with no
    /// local instance go to TLS directly), with their metadata section for
    /// calls without metadata of their own.
    known: Mutex<FxHashMap<ServiceName, Bytes>>,
    /// Picks the peer a call goes to.
    balancer: PowerOfTwo,
    /// Picks the peer that takes a message of a queue group.
    groups: RoundRobin,
}

impl Peers {
    /// The peers reached through `clients` (one per peer address); each
    /// one's listing is watched until `closed` is set.
    pub(crate) fn start(
        clients: Vec<(TlsAddr, commy_net::Client)>,
        limits: Limits,
        closed: Arc<AtomicBool>,
    ) -> Peers {
        let mut peers = Vec::new();
        for (addr, client) in clients {
            let peer = Arc::new(PeerState {
                addr,
                client,
                listing: Mutex::new(None),
                tried: watch::channel(false).0,
                in_flight: AtomicUsize::new(0),
            });
            tokio::spawn(watch_peer(Arc::downgrade(&peer), closed.clone()));
            peers.push(peer);
        }
        Peers {
            peers,
            limits,
            fallbacks: AtomicU64::new(0),
            known: Mutex::new(FxHashMap::default()),
            balancer: PowerOfTwo::new(),
            groups: RoundRobin::new(),
        }
    }

    /// Publishes to the subscribers the peers listed for topic key `key`
    /// (except the `local` ones, reached over shared memory) and to one
    /// member of each of their queue groups not in `groups_done`. Returns
    /// the deliveries made.
    pub(crate) async fn publish(
        &self,
        topic: &TopicName,
        key: &str,
        local: &[InstanceId],
        groups_done: &[String],
        payload: Bytes,
    ) -> usize {
        let group_prefix = format!("{key}-");
        let mut plain: Vec<(Arc<PeerState>, usize)> = Vec::new();
        let mut groups: Vec<(String, Vec<Arc<PeerState>>)> = Vec::new();
        for p in &self.peers {
            let listing = p.listing.lock();
            let Some(l) = listing.as_ref() else { continue };
            let n = l
                .subscriptions
                .iter()
                .filter(|(k, id)| k.as_str() == key && !local.contains(id))
                .count();
            if n > 0 {
                plain.push((p.clone(), n));
            }
            for (k, _) in &l.subscriptions {
                let k = k.as_str();
                if !k.starts_with(&group_prefix) || groups_done.iter().any(|g| g == k) {
                    continue;
                }
                match groups.iter_mut().find(|(g, _)| g == k) {
                    Some((_, peers)) if peers.iter().any(|q| Arc::ptr_eq(q, p)) => {}
                    Some((_, peers)) => peers.push(p.clone()),
                    None => groups.push((k.to_owned(), vec![p.clone()])),
                }
            }
        }
        let mut delivered = 0;
        for (p, n) in plain {
            if self.send_publish(&p, topic, key, payload.clone()).await {
                delivered += n;
            }
        }
        for (g, peers) in groups {
            let i = self.groups.pick(peers.len()).unwrap_or(0);
            if self
                .send_publish(&peers[i], topic, &g, payload.clone())
                .await
            {
                delivered += 1;
            }
        }
        delivered
    }

    pub(crate) async fn send_publish(
        &self,
        peer: &PeerState,
        topic: &TopicName,
        key: &str,
        payload: Bytes,
    ) -> bool {
        let mut md = Metadata::default();
        md.add_header(SERVICE_HEADER, PUBLISH_SERVICE.as_bytes().to_vec());
        md.add_header(TOPIC_HEADER, topic.as_str().as_bytes().to_vec());
        md.add_header(TOPIC_KEY_HEADER, key.as_bytes().to_vec());
        match peer
            .client
            .send(Bytes::from(md.encode()), payload, None)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("publish on {topic} to peer {} failed: {e}", peer.addr);
                false
            }
        }
    }

    /// Calls went to TLS because shared memory failed at connect.
    pub(crate) fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Every instance the peers listed (their last listing).
    pub(crate) fn remote_instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for p in &self.peers {
            if let Some(l) = &*p.listing.lock() {
                for (service, id) in &l.instances {
                    out.push(Instance::new(
                        service.clone(),
                        *id,
                        l.pid,
                        Endpoint::Tls(p.addr.clone()),
                        l.host.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Waits until every peer was asked for its listing once (at most `max`).
    pub(crate) async fn wait_listed(&self, max: Duration) {
        let _ = tokio::time::timeout(max, async {
            for p in &self.peers {
                let mut rx = p.tried.subscribe();
                let _ = rx.wait_for(|t| *t).await;
            }
        })
        .await;
    }

    /// Whether some peer has not yet said what it serves (nor failed to).
    pub(crate) fn any_untried(&self) -> bool {
        self.peers.iter().any(|p| !*p.tried.borrow())
    }

    /// Whether peer `p` serves `service` (other than the `exclude`d instances).
    pub(crate) fn serves(p: &PeerState, service: &ServiceName, exclude: &[InstanceId]) -> bool {
        p.listing.lock().as_ref().is_some_and(|l| {
            l.instances
                .iter()
                .any(|(s, id)| s == service && !exclude.contains(id))
        })
    }

    /// A peer serving `service`: the less loaded of two (by calls in flight).
    pub(crate) fn pick_peer(
        &self,
        service: &ServiceName,
        exclude: &[InstanceId],
    ) -> Option<&Arc<PeerState>> {
        let serving = |p: &&Arc<PeerState>| Self::serves(p, service, exclude);
        let nth = |i: usize| self.peers.iter().filter(serving).nth(i);
        let n = self.peers.iter().filter(serving).count();
        let load =
            |i: usize| nth(i).map_or(u64::MAX, |p| p.in_flight.load(Ordering::Relaxed) as u64);
        nth(self.balancer.pick(n, load)?)
    }

    /// Whether a call to `service` should skip the local lookup: it was
    /// done before, found nothing, and peers serve the service.
    pub(crate) fn go_remote(&self, service: &ServiceName, local_empty: bool) -> bool {
        local_empty
            && self.known.lock().contains_key(service)
            && self.pick_peer(service, &[]).is_some()
    }

    /// Calls `service` on a peer. `exclude`: instances reached locally;
    /// `shm_failed`: shared memory failed at connect (counted as a fallback
    /// if a peer takes the call).
    pub(crate) async fn call(
        &self,
        service: &ServiceName,
        payload: Bytes,
        metadata: &Metadata,
        deadline: Option<Deadline>,
        exclude: &[InstanceId],
        kind: CallKind,
    ) -> Result<Response, Status> {
        let plain_md = {
            let mut known = self.known.lock();
            match known.get(service) {
                Some(md) => md.clone(),
                None => {
                    let mut md = Metadata::default();
                    md.add_header(SERVICE_HEADER, service.as_str().as_bytes().to_vec());
                    let md = Bytes::from(md.encode());
                    known.insert(service.clone(), md.clone());
                    md
                }
            }
        };
        let mut peer = self.pick_peer(service, exclude);
        if peer.is_none() && self.any_untried() {
            let wait = deadline.map_or(Duration::from_secs(3), |d| {
                d.remaining().min(Duration::from_secs(3))
            });
            self.wait_listed(wait).await;
            peer = self.pick_peer(service, exclude);
        }
        let Some(peer) = peer else {
            if let Some(status) = kind.fallback {
                return Err(status);
            }
            // Not found only once every peer has said what it serves: a
            // deadline that passes while a peer is still being reached is
            // the deadline's failure.
            if deadline.is_some_and(Deadline::is_expired) && self.any_untried() {
                return Err(Status::deadline_exceeded(format!(
                    "the deadline passed while peers were still being asked for service '{service}'"
                )));
            }
            return Err(Status::not_found(format!(
                "no instance of service '{service}' (locally or at any peer)"
            )));
        };
        if kind.fallback.is_some() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("commy_transport_fallback_total").increment(1);
            tracing::debug!(
                "shared memory to '{service}' failed: calling {} over TLS",
                peer.addr
            );
        }
        let md = if metadata.is_empty() {
            plain_md
        } else {
            let mut md = metadata.clone();
            md.add_header(SERVICE_HEADER, service.as_str().as_bytes().to_vec());
            Bytes::from(md.encode())
        };
        peer.in_flight.fetch_add(1, Ordering::Relaxed);
        let _done = DecOnDrop(&peer.in_flight);
        if kind.oneway {
            peer.client.send(md, payload, deadline).await?;
            return Ok(Response::new(Bytes::new()));
        }
        let reply = peer.client.call(md, payload, deadline).await?;
        let metadata = decode_metadata(&reply.metadata, &self.limits)
            .map_err(|e| Status::internal(format!("malformed response metadata: {e}")))?;
        Ok(Response::new(reply.payload).with_metadata(metadata))
    }

    /// Drops the connections to every peer.
    pub(crate) fn disconnect(&self) {
        for p in &self.peers {
            p.client.disconnect();
        }
    }
}

/// What kind of call [`NetState::call`] makes.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallKind {
    /// A one-way message (no response).
    pub(crate) oneway: bool,
    /// Shared memory failed at connect with this: counted as a fallback
    /// if a peer takes the call, returned if none can.
    pub(crate) fallback: Option<Status>,
}

pub(crate) struct DecOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a peer's listing current by long-polling its control service.
pub(crate) async fn watch_peer(peer: std::sync::Weak<PeerState>, closed: Arc<AtomicBool>) {
    let mut backoff =
        commy_net::mux::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut md = Metadata::default();
    md.add_header(SERVICE_HEADER, INSTANCES_SERVICE.as_bytes().to_vec());
    let md = Bytes::from(md.encode());
    loop {
        let Some(p) = peer.upgrade() else { return };
        if closed.load(Ordering::Acquire) {
            return;
        }
        let known = p.listing.lock().as_ref().map_or(u64::MAX, |l| l.version);
        let client = p.client.clone();
        drop(p);
        let body = Bytes::from(postcard::to_allocvec(&known).unwrap_or_default());
        let answer = client
            .call(
                md.clone(),
                body,
                Some(Deadline::after(LONG_POLL + Duration::from_secs(10))),
            )
            .await;
        let Some(p) = peer.upgrade() else { return };
        let failed = match answer {
            Ok(reply) => match postcard::from_bytes::<Listing>(&reply.payload) {
                Ok(listing) => {
                    *p.listing.lock() = Some(listing);
                    backoff.reset();
                    false
                }
                Err(e) => {
                    tracing::warn!("peer {} sent an unreadable listing: {e}", p.addr);
                    true
                }
            },
            Err(e) => {
                tracing::debug!("cannot list the instances of peer {}: {e}", p.addr);
                true
            }
        };
        p.tried.send_replace(true);
        drop(p);
        if failed {
            if closed.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(10))).await;
        }
    }
}
