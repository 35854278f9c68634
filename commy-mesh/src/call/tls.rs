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
use commy_discovery::{Discover, DiscoveryError, Instance, InstanceStream, RoundRobin};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;

use crate::call::stats::{EndpointStats, Measured};
use crate::response::Response;
use crate::wire::{
    INSTANCES_SERVICE, LONG_POLL, Listing, PUBLISH_SERVICE, SERVICE_HEADER, TOPIC_HEADER,
    TOPIC_KEY_HEADER, decode_metadata,
};
use commy_net::CallFailure;

/// One peer process.
pub(crate) struct PeerState {
    pub(crate) addr: TlsAddr,
    pub(crate) client: commy_net::Client,
    pub(crate) listing: Mutex<Option<Listing>>,
    /// Becomes true once the first listing attempt finished (either way).
    pub(crate) tried: watch::Sender<bool>,
    /// Why the last listing attempt failed, while it did (cleared by a
    /// listing): what a caller that finds no instance is told.
    pub(crate) failure: Mutex<Option<String>>,
    /// Limits on what the peer answers.
    limits: Limits,
    /// The metadata section of calls without metadata of their own, per
    /// service called (it holds nothing but the service header).
    plain: Mutex<FxHashMap<ServiceName, Bytes>>,
}

impl PeerState {
    /// Calls `service` on this peer (`oneway`: a message with no answer),
    /// counted and timed in `stats`, those of the instance called. A
    /// request that never left (no connection could be made) says so.
    pub(crate) async fn call(
        &self,
        stats: &EndpointStats,
        service: &ServiceName,
        payload: Bytes,
        metadata: &Metadata,
        deadline: Option<Deadline>,
        oneway: bool,
    ) -> Result<Response, CallFailure> {
        let md = if metadata.is_empty() {
            let mut plain = self.plain.lock();
            match plain.get(service) {
                Some(md) => md.clone(),
                None => {
                    let md = service_metadata(service, &Metadata::default());
                    plain.insert(service.clone(), md.clone());
                    md
                }
            }
        } else {
            service_metadata(service, metadata)
        };
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let _done = DecOnDrop(&stats.in_flight);
        stats.sent();
        if oneway {
            self.client
                .send(md, payload, deadline)
                .await
                .map_err(CallFailure::Failed)?;
            return Ok(Response::new(Bytes::new()));
        }
        let reply = {
            let _measured = Measured::start(&stats.ewma);
            self.client.call_attempt(md, payload, deadline).await
        };
        stats.answered(match &reply {
            Ok(_) => None,
            Err(CallFailure::Unsent(s, _) | CallFailure::Failed(s)) => Some(s),
        });
        let reply = reply?;
        let metadata = decode_metadata(&reply.metadata, &self.limits).map_err(|e| {
            CallFailure::Failed(Status::internal(format!(
                "malformed response metadata: {e}"
            )))
        })?;
        Ok(Response::new(reply.payload).with_metadata(metadata))
    }
}

/// `metadata` with the header naming `service` added, encoded.
fn service_metadata(service: &ServiceName, metadata: &Metadata) -> Bytes {
    let mut md = metadata.clone();
    md.add_header(SERVICE_HEADER, service.as_str().as_bytes().to_vec());
    Bytes::from(md.encode())
}

/// The peer processes whose instances this handle may call over TLS,
/// each watched through its listing.
pub(crate) struct Peers {
    peers: Vec<Arc<PeerState>>,
    fallbacks: AtomicU64,
    /// Bumped whenever a peer's listing changes (pools watch it through
    /// [`PeerSource`]).
    changes: Arc<watch::Sender<u64>>,
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
        let changes = Arc::new(watch::channel(0).0);
        let mut peers = Vec::new();
        for (addr, client) in clients {
            let peer = Arc::new(PeerState {
                addr,
                client,
                listing: Mutex::new(None),
                tried: watch::channel(false).0,
                failure: Mutex::new(None),
                limits,
                plain: Mutex::new(FxHashMap::default()),
            });
            tokio::spawn(watch_peer(
                Arc::downgrade(&peer),
                closed.clone(),
                changes.clone(),
            ));
            peers.push(peer);
        }
        Peers {
            peers,
            fallbacks: AtomicU64::new(0),
            changes,
            groups: RoundRobin::new(),
        }
    }

    /// Changes of the peers' listings (a new value at each).
    pub(crate) fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether there is any peer.
    pub(crate) fn any(&self) -> bool {
        !self.peers.is_empty()
    }

    /// The first peer (in configuration order) of each host the listings
    /// name.
    pub(crate) fn one_per_host(&self) -> Vec<(commy_core::HostId, Arc<PeerState>)> {
        let mut out: Vec<(commy_core::HostId, Arc<PeerState>)> = Vec::new();
        for p in &self.peers {
            let Some(host) = p.listing.lock().as_ref().map(|l| l.host.clone()) else {
                continue;
            };
            if !out.iter().any(|(h, _)| *h == host) {
                out.push((host, p.clone()));
            }
        }
        out
    }

    /// The peer at `addr`, if it is one of ours.
    pub(crate) fn peer(&self, addr: &TlsAddr) -> Option<&Arc<PeerState>> {
        self.peers.iter().find(|p| &p.addr == addr)
    }

    /// The instances of `service` the peers listed last.
    pub(crate) fn instances_of(&self, service: &ServiceName) -> Vec<Instance> {
        let mut out = self.remote_instances();
        out.retain(|i| &i.service == service);
        out
    }

    /// Counts a call that went over TLS because shared memory failed at
    /// connect.
    pub(crate) fn count_fallback(&self, service: &ServiceName, to: &TlsAddr) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("commy_transport_fallback_total").increment(1);
        tracing::debug!("shared memory to '{service}' failed: calling {to} over TLS");
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
        let (plain, groups) = self.subscribers(key, local, groups_done);
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

    /// How many deliveries [`Peers::publish`] would make now.
    pub(crate) fn count_subscribers(
        &self,
        key: &str,
        local: &[InstanceId],
        groups_done: &[String],
    ) -> usize {
        let (plain, groups) = self.subscribers(key, local, groups_done);
        plain.iter().map(|(_, n)| n).sum::<usize>() + groups.len()
    }

    /// The subscribers the peers listed for topic key `key`: per peer, how
    /// many plain subscribers it holds (except the `local` ones, reached
    /// over shared memory), and per queue group not in `groups_done`, the
    /// peers holding members.
    #[allow(clippy::type_complexity)]
    fn subscribers(
        &self,
        key: &str,
        local: &[InstanceId],
        groups_done: &[String],
    ) -> (
        Vec<(Arc<PeerState>, usize)>,
        Vec<(String, Vec<Arc<PeerState>>)>,
    ) {
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
        (plain, groups)
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

    /// The peers whose last listing failed, each with why
    /// (`tls://ADDR: reason`).
    pub(crate) fn failures(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter_map(|p| Some(format!("tls://{}: {}", p.addr, p.failure.lock().as_ref()?)))
            .collect()
    }

    /// Drops the connections to every peer.
    pub(crate) fn disconnect(&self) {
        for p in &self.peers {
            p.client.disconnect();
        }
    }
}

/// Decrements a counter when dropped.
struct DecOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a peer's listing current by long-polling its control service.
async fn watch_peer(
    peer: std::sync::Weak<PeerState>,
    closed: Arc<AtomicBool>,
    changes: Arc<watch::Sender<u64>>,
) {
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
        let failure = match answer {
            Ok(reply) => match postcard::from_bytes::<Listing>(&reply.payload) {
                Ok(listing) => {
                    *p.listing.lock() = Some(listing);
                    changes.send_modify(|v| *v += 1);
                    backoff.reset();
                    None
                }
                Err(e) => {
                    tracing::warn!("peer {} sent an unreadable listing: {e}", p.addr);
                    Some(format!("its listing is unreadable: {e}"))
                }
            },
            Err(e) => {
                tracing::debug!("cannot list the instances of peer {}: {e}", p.addr);
                Some(e.to_string())
            }
        };
        let failed = failure.is_some();
        *p.failure.lock() = failure;
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

/// The peers as a discovery source: the instances their listings name,
/// reached over TLS. Pools take it beside the local source, so one pool
/// holds a service's local and remote instances.
pub(crate) struct PeerSource(pub(crate) Arc<Peers>);

impl Discover for PeerSource {
    fn name(&self) -> &'static str {
        "peers"
    }

    fn instances(&self, service: &ServiceName) -> Result<Vec<Instance>, DiscoveryError> {
        Ok(self.0.instances_of(service))
    }

    fn watch(&self, service: &ServiceName) -> Result<InstanceStream, DiscoveryError> {
        let (peers, service) = (self.0.clone(), service.clone());
        let changes = WatchStream::new(self.0.changes.subscribe());
        Ok(Box::pin(changes.map(move |_| peers.instances_of(&service))))
    }
}
