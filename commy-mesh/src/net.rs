//! The mesh over TLS: this process's listener (serving its services to
//! other hosts), its peers (processes whose instances it may call) and the
//! call path through commy-net.
//!
//! One listener per process serves every service of the handle; a request
//! names its service in the reserved metadata header `commy-service`. Each
//! peer is one commy-net [`Client`](commy_net::Client), so one connection
//! per remote process, multiplexed. Peers are long-polled through the
//! reserved control service `commy.instances` for the instances they serve
//! (docs/PROTOCOL.md, "TLS transport"); the last listing survives a peer
//! outage, so calls to a dead peer fail with `UNAVAILABLE`, not `NOT_FOUND`.
//! The listing also names the process's subscriptions, so publishes reach
//! them through the reserved service `commy.publish`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use commy_core::{
    Deadline, Endpoint, HostId, InstanceId, Limits, MeshName, Metadata, ServiceName, Status,
    TlsAddr, TopicName,
};
use commy_discovery::{Instance, PowerOfTwo, RoundRobin};
use commy_net::{Credentials, DevCa, Identity, Inbound, LeafSpec, Reply};
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::netconfig::{NetConfig, TransportPreference};
use crate::pubsub::{Message, Queue, TOPIC_HEADER};
use crate::response::Response;
use crate::serve::dispatch::ServeCtx;
use crate::serve::request::{ArrivedDeadline, Caller, RemoteCaller, Request};
use crate::sync::lock;
use crate::wire::{decode_metadata, encode_metadata};

/// The metadata header naming a request's service on the TLS transport.
pub const SERVICE_HEADER: &str = "commy-service";

/// The control service listing a process's instances.
pub const INSTANCES_SERVICE: &str = "commy.instances";

/// The reserved service that takes published messages for this process's
/// subscriptions (a OneWay with the topic and its subscriber-set key in
/// the headers `commy-topic` and `commy-topic-key`).
pub const PUBLISH_SERVICE: &str = "commy.publish";

/// The header naming the subscriber set (topic key or queue-group key) a
/// message published over TLS is for.
const TOPIC_KEY_HEADER: &str = "commy-topic-key";

/// How long a listing request waits for a change before answering anyway.
const LONG_POLL: Duration = Duration::from_secs(20);

/// A process's instances, as its `commy.instances` control service lists them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Listing {
    version: u64,
    host: HostId,
    pid: u32,
    instances: Vec<(ServiceName, InstanceId)>,
    /// Subscriptions: (subscriber-set key, subscription id).
    subscriptions: Vec<(ServiceName, InstanceId)>,
}

/// The subscriptions of one subscriber set in this process.
type Subscribers = Vec<(InstanceId, Arc<Queue>)>;

/// The instances of one service served in this process.
type Instances = Vec<(InstanceId, Arc<ServeCtx>)>;

/// The services this process serves over TLS.
struct Router {
    services: Mutex<FxHashMap<ServiceName, Instances>>,
    version: watch::Sender<u64>,
    host: HostId,
    limits: Limits,
    /// Spreads requests over the instances of a service, and messages
    /// over the members of a queue group.
    rr: RoundRobin,
    /// Metadata sections that hold nothing but the service header, and the
    /// service they name (most requests: no need to decode them).
    plain: Mutex<FxHashMap<Bytes, ServiceName>>,
    /// This process's subscriptions, by subscriber-set key.
    topics: Mutex<FxHashMap<ServiceName, Subscribers>>,
    /// Set when the handle closes: listing requests answer at once.
    closing: watch::Sender<bool>,
}

/// At most this many entries in [`Router::plain`].
const PLAIN_CACHE: usize = 1024;

impl Router {
    fn listing(&self) -> Listing {
        let services = lock(&self.services);
        Listing {
            version: *self.version.borrow(),
            host: self.host.clone(),
            pid: std::process::id(),
            instances: services
                .iter()
                .flat_map(|(s, v)| v.iter().map(move |(id, _)| (s.clone(), *id)))
                .collect(),
            subscriptions: lock(&self.topics)
                .iter()
                .flat_map(|(k, v)| v.iter().map(move |(id, _)| (k.clone(), *id)))
                .collect(),
        }
    }

    /// The service a request names and the rest of its metadata.
    fn route(&self, raw: &Bytes) -> Result<(ServiceName, Metadata), Status> {
        if let Some(name) = lock(&self.plain).get(raw) {
            return Ok((name.clone(), Metadata::default()));
        }
        let mut metadata = decode_metadata(raw, &self.limits)
            .map_err(|e| Status::invalid_argument(format!("malformed metadata: {e}")))?;
        let Some(pos) = metadata
            .headers
            .iter()
            .position(|(k, _)| k == SERVICE_HEADER)
        else {
            return Err(Status::invalid_argument(format!(
                "the request names no service (no {SERVICE_HEADER} header)"
            )));
        };
        let (_, name) = metadata.headers.remove(pos);
        let name = std::str::from_utf8(&name)
            .ok()
            .and_then(|n| ServiceName::new(n).ok())
            .ok_or_else(|| {
                Status::invalid_argument("the service header is not a valid service name")
            })?;
        if metadata.is_empty() {
            let mut plain = lock(&self.plain);
            if plain.len() < PLAIN_CACHE {
                plain.insert(raw.clone(), name.clone());
            }
        }
        Ok((name, metadata))
    }

    async fn handle(&self, inbound: Inbound) -> Result<Reply, Status> {
        let (name, metadata) = self.route(&inbound.metadata)?;
        if name.as_str() == INSTANCES_SERVICE {
            return self.list(&inbound.payload).await;
        }
        if name.as_str() == PUBLISH_SERVICE {
            return self.deliver(metadata, inbound.payload);
        }
        let ctx = {
            let services = lock(&self.services);
            let instances = services
                .get(&name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Status::not_found(format!("no instance of service '{name}' in this process"))
                })?;
            let i = self.rr.pick(instances.len()).unwrap_or(0);
            instances[i].1.clone()
        };
        let _handling = Handling::new(ctx.clone());
        let _permit = ctx.permits.take().await;
        let request = Request {
            service: ctx.service,
            payload: inbound.payload,
            metadata: metadata.into(),
            deadline: ArrivedDeadline::at(inbound.deadline),
            caller: Caller::Remote(RemoteCaller(inbound.peer)),
        };
        let response = ctx.handler.future(request).await?;
        Ok(Reply {
            metadata: Bytes::from(encode_metadata(&response.metadata)),
            payload: response.payload,
        })
    }

    /// Queues a message published over TLS for this process's subscribers
    /// of its key: all of them for a topic key, one for a queue group.
    fn deliver(&self, mut metadata: Metadata, payload: Bytes) -> Result<Reply, Status> {
        let text = |name: &str| {
            metadata
                .header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        };
        let topic = text(TOPIC_HEADER)
            .and_then(|t| TopicName::new(&t).ok())
            .ok_or_else(|| Status::invalid_argument("a publish without a valid topic header"))?;
        let key = text(TOPIC_KEY_HEADER)
            .and_then(|k| ServiceName::new(&k).ok())
            .ok_or_else(|| {
                Status::invalid_argument("a publish without a valid topic key header")
            })?;
        metadata
            .headers
            .retain(|(k, _)| k != TOPIC_HEADER && k != TOPIC_KEY_HEADER);
        let targets: Vec<Arc<Queue>> = {
            let topics = lock(&self.topics);
            let members = topics.get(&key).map(Vec::as_slice).unwrap_or_default();
            let members: Vec<&Arc<Queue>> = members
                .iter()
                .map(|(_, q)| q)
                .filter(|q| q.topic() == &topic)
                .collect();
            if key.as_str().contains('-') {
                // A queue group: one member.
                self.rr
                    .pick(members.len())
                    .map(|i| vec![Arc::clone(members[i])])
                    .unwrap_or_default()
            } else {
                members.into_iter().cloned().collect()
            }
        };
        for q in targets {
            let m = Message::new(topic.clone(), payload.clone(), metadata.clone());
            // A full queue with the Block policy waits here, which holds
            // back this connection's reader: backpressure, order kept.
            if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                tokio::task::block_in_place(|| q.push(m));
            } else {
                q.push(m);
            }
        }
        Ok(Reply::default())
    }

    /// Answers a listing request: at once if the caller's version is old,
    /// else when something changes (or after the long-poll time).
    async fn list(&self, payload: &[u8]) -> Result<Reply, Status> {
        let known: u64 = postcard::from_bytes(payload).unwrap_or(u64::MAX);
        let mut rx = self.version.subscribe();
        let mut closing = self.closing.subscribe();
        if *rx.borrow_and_update() == known && !*closing.borrow_and_update() {
            // Until something changes, the process shuts down (so the
            // drain never waits for a long poll) or the long-poll time ends.
            tokio::select! {
                _ = rx.changed() => {}
                _ = closing.changed() => {}
                _ = tokio::time::sleep(LONG_POLL) => {}
            }
        }
        let body = postcard::to_allocvec(&self.listing())
            .map_err(|e| Status::internal(format!("cannot encode the listing: {e}")))?;
        Ok(Reply::new(body))
    }
}

/// A request being handled, counted for draining (as on shared memory).
struct Handling(Arc<ServeCtx>);

impl Handling {
    fn new(ctx: Arc<ServeCtx>) -> Handling {
        ctx.in_flight.fetch_add(1, Ordering::SeqCst);
        Handling(ctx)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        // SYNC: SeqCst as in conn.rs `handled`: either the drainer sees the
        // count drop to zero, or we see it draining.
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.draining.load(Ordering::SeqCst)
        {
            self.0.drained.notify_waiters();
        }
    }
}

/// One peer process.
struct PeerState {
    addr: TlsAddr,
    client: commy_net::Client,
    listing: Mutex<Option<Listing>>,
    /// Becomes true once the first listing attempt finished (either way).
    tried: watch::Sender<bool>,
    in_flight: AtomicUsize,
}

/// The network side of a mesh handle.
pub(crate) struct NetState {
    server: Mutex<Option<commy_net::Server>>,
    endpoint: Option<TlsAddr>,
    router: Arc<Router>,
    peers: Vec<Arc<PeerState>>,
    pub(crate) preference: TransportPreference,
    fallbacks: AtomicU64,
    /// Services called over TLS so far (later calls to a service with no
    /// local instance go to TLS directly), with their metadata section for
    /// calls without metadata of their own.
    known: Mutex<FxHashMap<ServiceName, Bytes>>,
    closed: Arc<AtomicBool>,
    /// Picks the peer a call goes to.
    balancer: PowerOfTwo,
    /// Picks the peer that takes a message of a queue group.
    groups: RoundRobin,
}

/// Errors starting the network side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The certificates cannot be used.
    #[error(transparent)]
    Tls(#[from] commy_net::TlsError),
    /// The listen address cannot be used.
    #[error(transparent)]
    Listen(#[from] commy_net::BindError),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

fn program_name() -> String {
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "commy".into());
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "commy".into()
    } else {
        clean
    }
}

impl NetState {
    pub(crate) async fn start(
        config: &NetConfig,
        mesh: &MeshName,
        host: HostId,
        limits: Limits,
    ) -> Result<Arc<NetState>, NetError> {
        let listen_addr = match &config.listen {
            Some(a) => {
                let text = a.to_string();
                let resolved = tokio::net::lookup_host(text.as_str())
                    .await
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| {
                        NetError::Config(format!("cannot resolve the listen address {text}"))
                    })?;
                Some(resolved)
            }
            None => None,
        };
        let creds = match &config.tls_ca {
            Some(ca) => {
                let pair = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
                Credentials::from_pem_files(ca, pair)?
            }
            None => {
                let dir = commy_net::tls::default_dev_ca_dir()?;
                let ca = tokio::task::spawn_blocking(move || DevCa::load_or_create(&dir))
                    .await
                    .map_err(|e| NetError::Config(format!("dev CA task failed: {e}")))??;
                let identity = Identity::new(mesh.as_str(), &program_name())?;
                let extra: Vec<_> = listen_addr.iter().map(|a| a.ip()).collect();
                ca.credentials(&LeafSpec::for_this_host(identity, &extra))?
            }
        };
        let mut link = config.link.clone();
        link.limits = limits;
        let router = Arc::new(Router {
            services: Mutex::new(FxHashMap::default()),
            // A random start, so a restarted process's listing never has
            // the version a watcher knew from its previous life.
            version: watch::channel(
                u64::from_le_bytes(
                    InstanceId::random().to_bytes()[..8]
                        .try_into()
                        .unwrap_or([1; 8]),
                ) >> 1,
            )
            .0,
            host,
            limits,
            rr: RoundRobin::new(),
            plain: Mutex::new(FxHashMap::default()),
            topics: Mutex::new(FxHashMap::default()),
            closing: watch::channel(false).0,
        });
        let (server, endpoint) = match listen_addr {
            Some(addr) => {
                if !creds.has_certificate() {
                    return Err(NetError::Config(
                        "listening over TLS needs a certificate: set tls_cert and tls_key (or no tls_ca, for the dev CA)".into(),
                    ));
                }
                let tls = creds.server_config(config.require_client_cert.unwrap_or(false))?;
                let r = router.clone();
                let handler: commy_net::Handler = Arc::new(move |inbound: Inbound| {
                    let r = r.clone();
                    Box::pin(async move { r.handle(inbound).await })
                });
                let server = commy_net::Server::bind(addr, tls, link.clone(), handler).await?;
                let local = server.local_addr();
                // With port 0 the listener's port is announced, under the
                // host as configured.
                let host = match &config.listen {
                    Some(a) if a.port() != 0 => a.clone(),
                    listen => TlsAddr::new(
                        listen.as_ref().map_or_else(
                            || commy_core::Host::from(local.ip()),
                            |a| a.host().clone(),
                        ),
                        local.port(),
                    )
                    .map_err(|e| NetError::Config(e.to_string()))?,
                };
                tracing::info!("serving over TLS on {local}");
                (Some(server), Some(host))
            }
            None => (None, None),
        };
        let client_tls = creds.client_config()?;
        let closed = Arc::new(AtomicBool::new(false));
        let mut peers = Vec::new();
        for addr in &config.peers {
            let host = addr.host().to_string();
            let client =
                commy_net::Client::new(&host, addr.port(), client_tls.clone(), link.clone())
                    .map_err(|e| NetError::Config(e.to_string()))?;
            let peer = Arc::new(PeerState {
                addr: addr.clone(),
                client,
                listing: Mutex::new(None),
                tried: watch::channel(false).0,
                in_flight: AtomicUsize::new(0),
            });
            tokio::spawn(watch_peer(Arc::downgrade(&peer), closed.clone()));
            peers.push(peer);
        }
        Ok(Arc::new(NetState {
            server: Mutex::new(server),
            endpoint,
            router,
            peers,
            preference: config.transport.unwrap_or_default(),
            fallbacks: AtomicU64::new(0),
            known: Mutex::new(FxHashMap::default()),
            closed,
            balancer: PowerOfTwo::new(),
            groups: RoundRobin::new(),
        }))
    }

    /// The TLS endpoint this process serves on.
    pub(crate) fn endpoint(&self) -> Option<&TlsAddr> {
        self.endpoint.as_ref()
    }

    pub(crate) fn add(&self, service: &ServiceName, id: InstanceId, ctx: Arc<ServeCtx>) {
        if self.endpoint.is_none() {
            return;
        }
        lock(&self.router.services)
            .entry(service.clone())
            .or_default()
            .push((id, ctx));
        self.router.version.send_modify(|v| *v += 1);
    }

    pub(crate) fn remove(&self, service: &ServiceName, id: InstanceId) {
        let mut services = lock(&self.router.services);
        if let Some(v) = services.get_mut(service) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                services.remove(service);
            }
            drop(services);
            self.router.version.send_modify(|v| *v += 1);
        }
    }

    /// Announces a subscription to peers.
    pub(crate) fn add_subscription(&self, key: &ServiceName, id: InstanceId, queue: Arc<Queue>) {
        lock(&self.router.topics)
            .entry(key.clone())
            .or_default()
            .push((id, queue));
        self.router.version.send_modify(|v| *v += 1);
    }

    /// Withdraws a subscription.
    pub(crate) fn remove_subscription(&self, key: &ServiceName, id: InstanceId) {
        let mut topics = lock(&self.router.topics);
        if let Some(v) = topics.get_mut(key) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                topics.remove(key);
            }
            drop(topics);
            self.router.version.send_modify(|v| *v += 1);
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
            let listing = lock(&p.listing);
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

    async fn send_publish(
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
            if let Some(l) = &*lock(&p.listing) {
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
    fn any_untried(&self) -> bool {
        self.peers.iter().any(|p| !*p.tried.borrow())
    }

    /// Whether peer `p` serves `service` (other than the `exclude`d instances).
    fn serves(p: &PeerState, service: &ServiceName, exclude: &[InstanceId]) -> bool {
        lock(&p.listing).as_ref().is_some_and(|l| {
            l.instances
                .iter()
                .any(|(s, id)| s == service && !exclude.contains(id))
        })
    }

    /// A peer serving `service`: the less loaded of two (by calls in flight).
    fn pick_peer(&self, service: &ServiceName, exclude: &[InstanceId]) -> Option<&Arc<PeerState>> {
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
            && lock(&self.known).contains_key(service)
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
            let mut known = lock(&self.known);
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
        let metadata = decode_metadata(&reply.metadata, &self.router.limits)
            .map_err(|e| Status::internal(format!("malformed response metadata: {e}")))?;
        Ok(Response::new(reply.payload).with_metadata(metadata))
    }

    /// Stops serving (GOAWAY drain) and the peer watchers.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Peers' listing requests answer at once from now on instead of
        // holding the drain for their long-poll time.
        self.router.closing.send_replace(true);
        let server = lock(&self.server).take();
        if let Some(s) = server {
            s.shutdown().await;
        }
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

struct DecOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a peer's listing current by long-polling its control service.
async fn watch_peer(peer: std::sync::Weak<PeerState>, closed: Arc<AtomicBool>) {
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
        let known = lock(&p.listing).as_ref().map_or(u64::MAX, |l| l.version);
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
                    *lock(&p.listing) = Some(listing);
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
