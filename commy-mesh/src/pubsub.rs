//! Publish/subscribe: topics, subscriptions and queue groups.
//!
//! A subscription announces itself like a service instance, in the mesh's
//! topic registry (`<mesh>.t`): plain subscribers of a topic share one
//! subscriber set, and each queue group has a set of its own. A publish
//! sends the message to every plain subscriber and to exactly one member of
//! each group (the least loaded of two), over the same shared-memory links
//! calls use; per publisher, each subscriber sees messages in order.
//!
//! A subscriber that cannot keep up meets its [`SlowSubscriber`] policy:
//! `Block` (the default) applies backpressure to publishers, `DropOldest`
//! discards the oldest queued message, `Disconnect` ends the subscription;
//! what was dropped is counted in [`Subscription::dropped`]. A message
//! `DropOldest` discards is also counted in the shared memory of the link
//! it came on, so its publisher sees it too
//! ([`Mesh::dropped_by_subscribers`](crate::Mesh::dropped_by_subscribers)).
//!
//! Under `Block` a subscription reads the rings of its publishers on this
//! host itself, in batches, with no thread or queue in between: the rings
//! are its queue. Under the other policies a thread per publisher moves
//! messages from its ring into the subscription's queue, where the policy
//! applies.
//!
//! Backpressure lasts while the subscriber makes progress. One that takes
//! nothing for the stall time (the setting `subscriber_stall`, 1 s by
//! default) is disconnected by the publisher that waited for it: its
//! announcement is removed, so no publisher waits for it again, and the
//! topic goes on at full speed for the others. The subscriber, when it
//! runs again, takes what reached it, then its subscription ends
//! ([`Subscription::end_reason`]) with the loss counted: nothing is lost
//! silently.
//!
//! ```
//! use commy_mesh::Mesh;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("commy-pubsub-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! let mesh = Mesh::builder().runtime_dir(&dir).open().await?;
//! let mut sub = mesh.subscribe("prices/eur").await?;
//! // Publish until the subscriber is visible to this publisher.
//! while mesh.publish("prices/eur", &b"1.08"[..]).await? == 0 {
//!     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
//! }
//! let msg = sub.next().await.expect("a message");
//! assert_eq!(&msg.payload()[..], b"1.08");
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use commy_config::TransportPreference;
use commy_core::{
    Code, Deadline, FrameKind, FrameRef, InstanceId, Limits, Metadata, ServiceName, Status,
    TopicName,
};
use commy_discovery::LocalRegistry;
use commy_shm::link::RecvError;
use commy_shm::{LinkConfig, RingError, ShmLink};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

mod inbox;
pub(crate) mod remote;
mod subscription;

pub(crate) use subscription::Queue;
pub use subscription::{
    Message, MessageRef, SlowSubscriber, SubscribeOptions, Subscription, SubscriptionHealth,
};

use inbox::{Inbox, Reader};

use crate::accept::{bind_announcement, start_accepting};
use crate::call::endpoint::Endpoint;
use crate::call::pool::{LOCAL_INLINE, LocalLink, Pools};
use crate::call::shm::{SentPublish, Unsent};
use crate::sync::Counted;
use crate::warn::CLIENT_LINKS;
use crate::wire::TOPIC_HEADER;

/// The registry name of a topic's plain subscribers: 12 hex digits of a
/// hash of the topic (short, because Unix socket paths are limited to 107
/// bytes). Collisions are harmless: subscribers check the topic header.
fn topic_key(topic: &TopicName) -> String {
    format!("{:012x}", fnv1a(topic.as_str().as_bytes()) >> 16)
}

fn group_key(topic: &TopicName, group: &str) -> String {
    format!(
        "{}-{:08x}",
        topic_key(topic),
        fnv1a(group.as_bytes()) & 0xffff_ffff
    )
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The metadata of a message on `topic` as a publish sends it: the topic
/// header alone.
fn topic_metadata(topic: &TopicName) -> Vec<u8> {
    let mut metadata = Metadata::default();
    metadata.add_header(TOPIC_HEADER, topic.as_str().as_bytes().to_vec());
    metadata.encode()
}

/// The message a subscriber of `topic` takes from `frame`: `None` for a
/// frame that is not a Publish or a message on another topic with the same
/// key (a hash collision). `plain` is [`topic_metadata`] of `topic`: a
/// message that carries nothing else is taken without decoding it.
fn decode_publish(
    frame: &[u8],
    topic: &TopicName,
    plain: &[u8],
    limits: &Limits,
) -> Result<Option<Message>, String> {
    Ok(
        decode_publish_parts(frame, topic, plain, limits)?.map(|(payload, metadata)| {
            let metadata = metadata.unwrap_or_default();
            Message::new(topic.clone(), Bytes::copy_from_slice(payload), metadata)
        }),
    )
}

/// As [`decode_publish`], lending the message to `each` in place (not
/// called for a frame that is not a message on `topic`).
fn decode_publish_ref(
    frame: &[u8],
    topic: &TopicName,
    plain: &[u8],
    limits: &Limits,
    each: impl FnOnce(MessageRef<'_>),
) -> Result<(), String> {
    if let Some((payload, metadata)) = decode_publish_parts(frame, topic, plain, limits)? {
        each(MessageRef {
            topic,
            payload,
            metadata: metadata.as_ref(),
        });
    }
    Ok(())
}

/// A message's payload in place and its metadata beyond the topic header.
type PublishParts<'f> = (&'f [u8], Option<Metadata>);

/// What both decodes share: the payload in place and the metadata beyond
/// the topic header (`None` when there is none) of a message on `topic`;
/// `None` for another frame.
fn decode_publish_parts<'f>(
    frame: &'f [u8],
    topic: &TopicName,
    plain: &[u8],
    limits: &Limits,
) -> Result<Option<PublishParts<'f>>, String> {
    let frame = FrameRef::decode(frame, limits).map_err(|e| format!("malformed frame: {e}"))?;
    if frame.header().kind != FrameKind::Publish {
        return Ok(None);
    }
    let metadata = if frame.metadata() == plain {
        None
    } else {
        let mut metadata = crate::wire::decode_metadata(frame.metadata(), limits)
            .map_err(|_| "malformed metadata".to_owned())?;
        if metadata.header(TOPIC_HEADER) != Some(topic.as_str().as_bytes()) {
            return Ok(None);
        }
        metadata.headers.retain(|(k, _)| k != TOPIC_HEADER);
        Some(metadata).filter(|m| !m.is_empty())
    };
    Ok(Some((frame.payload(), metadata)))
}

fn topic_name(topic: &str) -> Result<TopicName, Status> {
    TopicName::new(topic)
        .map_err(|e| Status::invalid_argument(format!("invalid topic {topic:?}: {e}")))
}

fn key_name(key: &str) -> Result<ServiceName, Status> {
    ServiceName::new(key).map_err(|e| Status::internal(format!("bad topic key {key}: {e}")))
}

/// Ends the subscription of `queue` if a publisher cut it: its
/// announcement (`path`) is gone though the subscription was not dropped
/// (`stop`). Returns whether it still lasts.
fn end_if_cut(queue: &Queue, path: &std::path::Path, stop: &AtomicBool) -> bool {
    if stop.load(Ordering::Acquire) || path.exists() {
        return true;
    }
    let (lost, what) = match &queue.group {
        // The message the publisher could not hand over went to another
        // member: the group lost nothing.
        Some(group) => (
            0,
            format!("the message it could not take went to another member of group {group}"),
        ),
        None => (1, "messages were lost".to_owned()),
    };
    let reason = Status::resource_exhausted(format!(
        "the subscription to {} ended: it took nothing for the stall time and a publisher \
         disconnected it ({what})",
        queue.topic
    ));
    CLIENT_LINKS.warn(|| reason.message().to_owned());
    queue.end_lossy(lost, reason);
    false
}

/// Serves one publisher's link into a subscription's queue, in order. A
/// link that ends while the subscription's announcement (`path`) is gone,
/// though the subscription was not dropped (`stop`), was cut by a
/// publisher that found it stalled: the subscription ends.
fn serve_topic_link(
    link: ShmLink,
    queue: Arc<Queue>,
    limits: Limits,
    path: &std::path::Path,
    stop: &AtomicBool,
    links: &AtomicUsize,
) {
    let _serving = Counted::enter(links);
    let plain = topic_metadata(&queue.topic);
    let (_tx, mut rx) = link.split();
    // What the queue discards of this link's messages is counted in its
    // ring, where the publisher reads it.
    let discarded = Arc::new(rx.discard_counter());
    loop {
        let msg = match rx.recv(None) {
            Ok(m) => m,
            Err(RecvError::Ring(RingError::Closed | RingError::PeerGone)) => {
                end_if_cut(&queue, path, stop);
                return;
            }
            Err(e) => {
                CLIENT_LINKS
                    .warn(|| format!("subscription to {}: closing a link: {e}", queue.topic));
                return;
            }
        };
        let m = match decode_publish(&msg, &queue.topic, &plain, &limits) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                CLIENT_LINKS.warn(|| format!("subscription to {}: {e}", queue.topic));
                return;
            }
        };
        drop(msg);
        if !queue.push_from(m, Some(&discarded)) {
            return;
        }
    }
}

/// Members of a queue group a publish tries at most, when those it picks
/// are found stalled.
const GROUP_TRIES: usize = 3;

/// Which queue groups exist per topic key, kept current from the topic
/// registry's directory (inotify), so a publish does not scan it.
#[derive(Default)]
struct GroupIndex {
    groups: Mutex<HashMap<String, Arc<[String]>>>,
    /// Whether `groups` has any.
    some: AtomicBool,
    started: AtomicBool,
}

impl GroupIndex {
    fn rescan(&self, dir: &std::path::Path) {
        let mut map: HashMap<String, HashSet<String>> = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some((topic, _)) = name.split_once('-')
                    && topic.len() == 12
                {
                    map.entry(topic.to_owned()).or_default().insert(name);
                }
            }
        }
        let mut groups = self.groups.lock();
        *groups = map
            .into_iter()
            .map(|(topic, groups)| (topic, groups.into_iter().collect()))
            .collect();
        self.some.store(!groups.is_empty(), Ordering::Release);
    }

    /// Whether any topic may have a queue group (always, until the
    /// registry's directory is watched).
    fn any(&self) -> bool {
        !self.started.load(Ordering::Acquire) || self.some.load(Ordering::Acquire)
    }

    /// The queue groups of a topic key (none: an empty list, without
    /// allocating).
    fn groups_of(&self, key: &str) -> Arc<[String]> {
        static NONE: std::sync::LazyLock<Arc<[String]>> =
            std::sync::LazyLock::new(|| Arc::from(Vec::new()));
        self.groups
            .lock()
            .get(key)
            .cloned()
            .unwrap_or_else(|| NONE.clone())
    }

    /// Starts watching the topic registry's directory (once).
    fn ensure_started(self: &Arc<Self>, dir: &std::path::Path) {
        if self.started.load(Ordering::Acquire) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let dir = dir.to_owned();
        use inotify::{EventMask, Inotify, WatchMask};
        let mask = WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::DELETE
            | WatchMask::DELETE_SELF
            | WatchMask::ONLYDIR;
        // The directory may have been tidied away by a process that closed
        // its mesh handle: it is made again, here and whenever that happens
        // while it is watched.
        let make = |dir: &std::path::Path| {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        };
        make(&dir);
        let inotify = Inotify::init().and_then(|i| {
            i.watches().add(&dir, mask)?;
            Ok(i)
        });
        self.rescan(&dir);
        let index = Arc::downgrade(self);
        match inotify.and_then(|i| i.into_event_stream([0u8; 1024])) {
            Ok(mut events) => {
                tokio::spawn(async move {
                    use tokio_stream::StreamExt;
                    while let Some(ev) = events.next().await {
                        let Some(index) = index.upgrade() else { return };
                        let Ok(ev) = ev else { return };
                        if ev.mask.contains(EventMask::IGNORED) {
                            make(&dir);
                            if let Err(e) = events.watches().add(&dir, mask) {
                                tracing::warn!(
                                    "cannot watch {} for queue groups again ({e}); groups \
                                     created later are not seen",
                                    dir.display()
                                );
                                return;
                            }
                        }
                        index.rescan(&dir);
                    }
                });
            }
            Err(e) => {
                tracing::warn!(
                    "cannot watch {} for queue groups ({e}); groups created later are not seen",
                    dir.display()
                );
            }
        }
    }
}

/// The pub/sub side of a mesh handle: its subscriptions' announcements
/// (the topic registry), the pools of subscriber sets it publishes to, and
/// the queue groups per topic. Subscribers and groups at TLS peers are the
/// network side's (the mesh handle joins the two).
pub(crate) struct PubSub {
    /// Subscribers announce themselves here (mesh `<mesh>.t`).
    registry: LocalRegistry,
    /// The pools of subscriber sets, keyed by their registry name.
    pools: Pools,
    /// Queue groups per topic.
    groups: Arc<GroupIndex>,
    /// How publishers' links are accepted.
    link: LinkConfig,
    limits: Limits,
    /// How long a publish waits for a subscriber that takes nothing.
    stall: Duration,
    /// What publishing on each topic needs, by topic.
    routes: Mutex<FxHashMap<Box<str>, Arc<Route>>>,
    /// Messages this handle published that subscribers on this host
    /// discarded unread (`DropOldest`), by topic, as found so far.
    discarded: Mutex<FxHashMap<TopicName, u64>>,
}

/// A subscription made by [`PubSub::subscribe`], with what the network
/// side needs to announce it to peers.
pub(crate) struct NewSubscription {
    pub(crate) subscription: Subscription,
    /// Its subscriber set's registry name.
    pub(crate) key: ServiceName,
    pub(crate) id: InstanceId,
    pub(crate) queue: Arc<Queue>,
}

/// The subscribers of a topic on this host ([`PubSub::subscribers`]).
pub(crate) struct Local {
    pub(crate) key: String,
    pub(crate) plain: Vec<InstanceId>,
    pub(crate) groups: Vec<String>,
}

/// What a publish on a topic needs each time ([`PubSub::route`]).
pub(crate) struct Route {
    pub(crate) topic: TopicName,
    /// The topic's subscriber-set key.
    pub(crate) key: String,
    /// The encoded metadata of its messages: the topic header.
    metadata: Vec<u8>,
    /// The pool of its plain subscribers.
    pool: Arc<crate::call::pool::Pool>,
}

/// Topics whose [`Route`] a pub/sub side keeps; past that many it forgets
/// them all (a publisher of ever new topics stays bounded).
const MAX_ROUTES: usize = 4096;

/// The links to the plain subscribers of a topic on this host that a
/// publisher keeps from one publish to the next
/// ([`PubSub::publish_via`]): current while their pool's
/// [`version`](crate::call::pool::Pool::version) stays and each link
/// lives.
#[derive(Default)]
pub(crate) struct LinkCache {
    /// The pool's version they were found at; `None`: to be found again.
    version: Option<u64>,
    links: SmallVec<[(Endpoint, InstanceId); LOCAL_INLINE]>,
}

impl LinkCache {
    /// Whether the links are still all of `pool`'s subscribers, and live.
    fn is_current(&self, pool: &crate::call::pool::Pool) -> bool {
        self.version == Some(pool.version()) && self.links.iter().all(|(l, _)| l.is_alive())
    }
}

/// What a publish delivered on this host.
pub(crate) struct Published {
    /// The topic's route (its name and subscriber-set key).
    pub(crate) route: Arc<Route>,
    /// Deliveries made (each message to each plain subscriber is one).
    pub(crate) delivered: usize,
    /// The plain subscribers reached (not to be reached again remotely).
    pub(crate) reached: SmallVec<[InstanceId; LOCAL_INLINE]>,
}

impl PubSub {
    /// Pub/sub with subscriptions announced in `registry` and subscriber
    /// sets reached through `pools`.
    pub(crate) fn new(
        registry: LocalRegistry,
        pools: Pools,
        link: LinkConfig,
        limits: Limits,
        stall: Duration,
    ) -> PubSub {
        PubSub {
            registry,
            pools,
            groups: Arc::default(),
            link,
            limits,
            stall,
            routes: Mutex::default(),
            discarded: Mutex::default(),
        }
    }

    /// Counts `n` messages on `topic` that a subscriber discarded unread.
    fn count_discarded(&self, topic: &TopicName, n: u64) {
        if n > 0 {
            *self.discarded.lock().entry(topic.clone()).or_default() += n;
        }
    }

    /// Messages this handle published on `topic` that subscribers on this
    /// host discarded unread under `DropOldest`: each discarded copy counts
    /// once, whichever subscriber (plain or in a queue group) dropped it.
    /// Reads the subscribers' counts on every link it has to them first,
    /// so the answer is as of now for those still linked.
    pub(crate) fn dropped_by_subscribers(&self, topic: &str) -> Result<u64, Status> {
        let topic = topic_name(topic)?;
        let key = topic_key(&topic);
        let mut keys = vec![key.clone()];
        keys.extend(self.groups.groups_of(&key).iter().cloned());
        for key in keys {
            let pool = self.pools.get(&key_name(&key)?);
            for link in self.pools.local_links(&pool) {
                if let LocalLink::Linked(conn, _) = link
                    && let Some(conn) = conn.shm()
                {
                    self.count_discarded(&topic, conn.take_discarded());
                }
            }
        }
        Ok(self.discarded.lock().get(&topic).copied().unwrap_or(0))
    }

    /// Links this publisher to every member of a queue group's `pool` it
    /// has no link to yet, each within the stall time: a member that does
    /// not take its link by then (stopped before any publisher reached it)
    /// is cut.
    async fn cut_unlinked(&self, pool: &Arc<crate::call::pool::Pool>, topic: &TopicName) {
        for member in self.pools.instances_of(pool) {
            if self.pools.linked(pool, &member).is_some() {
                continue;
            }
            let within = Some(Deadline::after(self.stall));
            if let Err(e) = self.pools.connect(pool, &member, within).await
                && e.code() == Code::DeadlineExceeded
            {
                self.cut(&member, topic);
            }
        }
    }

    /// Disconnects a subscriber that took nothing for the stall time (its
    /// link was ended): its announcement is removed, so no publisher waits
    /// for it again, and it ends its subscription when it runs again.
    fn cut(&self, inst: &commy_discovery::Instance, topic: &TopicName) {
        if let commy_core::Endpoint::Shm(addr) = &inst.endpoint {
            let _ = std::fs::remove_file(addr.to_path_buf());
        }
        CLIENT_LINKS.warn(|| {
            format!(
                "disconnected a subscriber of {topic} (instance {}): it took nothing for {:?}",
                inst.id, self.stall
            )
        });
    }

    /// Subscribes to `topic`, optionally as a member of queue group
    /// `group`, under the id `id` (a new one if `None`).
    pub(crate) fn subscribe(
        &self,
        topic: &str,
        group: Option<&str>,
        options: SubscribeOptions,
        id: Option<InstanceId>,
    ) -> Result<NewSubscription, Status> {
        let topic = topic_name(topic)?;
        if let Some(g) = group {
            ServiceName::new(g)
                .map_err(|e| Status::invalid_argument(format!("invalid group {g:?}: {e}")))?;
        }
        let key = match group {
            Some(g) => group_key(&topic, g),
            None => topic_key(&topic),
        };
        let key = key_name(&key)?;
        let id = id.unwrap_or_else(InstanceId::random);
        let (path, listener) = bind_announcement(
            &self.registry,
            &key,
            id,
            &format!("a subscription to {topic}"),
        )?;
        let queue = Arc::new(Queue::new(topic.clone(), &options, group));
        let stop = Arc::new(AtomicBool::new(false));
        let limits = self.limits;
        // Under Block the consumer reads the publishers' rings itself;
        // under the other policies a thread per link fills the queue.
        let inbox = (options.policy == SlowSubscriber::Block).then(|| Arc::new(Inbox::new()));
        // Links being served: while one is, its end says whether a
        // publisher cut the subscription. With none, the accept loop's
        // check does: a publisher that found the subscriber stalled before
        // it ever had a link removes the announcement too.
        let links = Arc::new(AtomicUsize::new(0));
        let on_link = {
            let (inbox, q, announced, stopped, served) = (
                inbox.clone(),
                queue.clone(),
                path.clone(),
                stop.clone(),
                links.clone(),
            );
            move |link| match &inbox {
                Some(inbox) => inbox.serve(link, &q, &served),
                None => serve_topic_link(link, q.clone(), limits, &announced, &stopped, &served),
            }
        };
        let go_on = {
            let (q, announced, stopped) = (queue.clone(), path.clone(), stop.clone());
            move || links.load(Ordering::Acquire) > 0 || end_if_cut(&q, &announced, &stopped)
        };
        start_accepting(
            listener,
            self.link.clone(),
            format!("sub-{topic}"),
            stop.clone(),
            on_link,
            Some(Box::new(go_on)),
        )?;
        let linger = options.linger.min(SubscribeOptions::MAX_LINGER);
        let reader = inbox.map(|inbox| Reader::new(inbox, topic.clone(), limits, linger));
        Ok(NewSubscription {
            subscription: Subscription::new(queue.clone(), reader, path, stop),
            key,
            id,
            queue,
        })
    }

    /// The subscribers a publish on `topic` reaches on this host now: its
    /// subscriber-set key, the plain subscribers, and the queue groups with
    /// a member.
    pub(crate) async fn subscribers(&self, topic: &str) -> Result<Local, Status> {
        let topic = topic_name(topic)?;
        let key = topic_key(&topic);
        let pool = self.pools.get(&key_name(&key)?);
        let plain = self
            .pools
            .instances_of(&pool)
            .iter()
            .map(|i| i.id)
            .collect();
        self.groups.ensure_started(self.registry.dir());
        let mut groups = Vec::new();
        for group in self.groups.groups_of(&key).iter() {
            let pool = self.pools.get(&key_name(group)?);
            if !self.pools.instances_of(&pool).is_empty() {
                groups.push(group.clone());
            }
        }
        Ok(Local { key, plain, groups })
    }

    /// What a publish on `topic` needs each time: the checked name, the
    /// encoded topic header, the subscriber-set key and its pool, made
    /// once per topic and kept.
    pub(crate) fn route(&self, topic: &str) -> Result<Arc<Route>, Status> {
        if let Some(route) = self.routes.lock().get(topic) {
            return Ok(route.clone());
        }
        let name = topic_name(topic)?;
        let key = topic_key(&name);
        let route = Arc::new(Route {
            metadata: topic_metadata(&name),
            pool: self.pools.get(&key_name(&key)?),
            key,
            topic: name,
        });
        let mut routes = self.routes.lock();
        if routes.len() >= MAX_ROUTES {
            routes.clear();
        }
        routes.insert(topic.into(), route.clone());
        Ok(route)
    }

    /// Publishes each of `payloads` in order on `topic` to the plain
    /// subscribers of this host: each gets them all, written back to back
    /// into its ring and made visible at once. Sending to subscribers
    /// already linked takes no allocation; linking new ones takes the
    /// slower way. (Queue groups are [`PubSub::publish_groups`].)
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payloads: &[Bytes],
    ) -> Result<Published, Status> {
        let route = self.route(topic)?;
        Ok(self
            .publish_via(route, &mut LinkCache::default(), payloads)
            .await)
    }

    /// Publishes each of `payloads` in order on the topic of `route` to
    /// its plain subscribers on this host, as [`PubSub::publish`] does,
    /// through the links `cache` kept from the last publish: while they
    /// are current, that takes no lock and no lookup. Otherwise they are
    /// found again (and subscribers not linked yet linked to).
    pub(crate) async fn publish_via<P: AsRef<[u8]>>(
        &self,
        route: Arc<Route>,
        cache: &mut LinkCache,
        payloads: &[P],
    ) -> Published {
        let mut out = Published {
            route,
            delivered: 0,
            reached: SmallVec::new(),
        };
        let route = &*out.route;
        if !cache.is_current(&route.pool) {
            let (version, links) = self.pools.local_links_at(&route.pool);
            cache.links.clear();
            let mut unlinked: SmallVec<[InstanceId; LOCAL_INLINE]> = SmallVec::new();
            for link in links {
                match link {
                    LocalLink::Linked(conn, id) => cache.links.push((conn, id)),
                    LocalLink::Unlinked(id) => unlinked.push(id),
                }
            }
            cache.version = Some(version);
            if !unlinked.is_empty() {
                // Linking them changes the pool: the next publish looks
                // again.
                cache.version = None;
                let route = out.route.clone();
                Box::pin(self.send_unlinked(&route, unlinked, payloads, &mut out)).await;
            }
        }
        for (conn, id) in &cache.links {
            out.reached.push(*id);
            let sent = conn.send_publish_many(&out.route.metadata, payloads, self.stall);
            if sent.result.is_err() {
                cache.version = None;
            }
            out.delivered += self.settle_sent(&out.route, *id, sent);
        }
        out
    }

    /// Publishes one message on `topic` to the plain subscribers of this
    /// host, written in place: `write` fills a payload of at most `max`
    /// bytes and returns its length. When every subscriber is linked, it
    /// writes straight into the first one's ring (zero copy), and the
    /// others get a copy from there; otherwise (no subscriber linked yet,
    /// or a message too large for one record) it writes into a buffer and
    /// publishes that. `copy`: also return the payload as `Bytes` (for
    /// queue groups and TLS peers).
    pub(crate) async fn publish_in_place(
        &self,
        topic: &str,
        max: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
        copy: bool,
    ) -> Result<(Published, Option<Bytes>), Status> {
        let route = self.route(topic)?;
        let mut out = Published {
            route: route.clone(),
            delivered: 0,
            reached: SmallVec::new(),
        };
        let mut write = Some(write);
        let links = self.pools.local_links(&route.pool);
        let all_linked = links.iter().all(|l| matches!(l, LocalLink::Linked(..)));
        let lender = match links.first() {
            Some(LocalLink::Linked(conn, id)) if all_linked => conn.shm().map(|c| (c, *id)),
            _ => None,
        };
        if let Some((conn, id)) = lender {
            let mut copied = None;
            let mut call = |buf: &mut [u8]| write.take().map_or(0, |w| w(buf));
            let mut others = |payload: &[u8]| {
                for link in &links[1..] {
                    if let LocalLink::Linked(other, other_id) = link {
                        out.reached.push(*other_id);
                        out.delivered += self.send_to(&route, other, *other_id, &[payload]);
                    }
                }
                if copy {
                    copied = Some(Bytes::copy_from_slice(payload));
                }
            };
            let sent =
                conn.publish_in_place(&route.metadata, max, self.stall, &mut call, &mut others);
            if let Some(sent) = sent {
                let written = write.is_none();
                out.reached.push(id);
                out.delivered += self.settle_sent(&route, id, sent);
                if written {
                    return Ok((out, copied));
                }
                // The lender failed (stalled, gone) before the message was
                // written: it is cut or dropped, and the others get it the
                // usual way below.
            }
        }
        // No ring to lend from: a buffer, published as usual.
        let mut buf = vec![0u8; max];
        let n = write.take().map_or(0, |w| w(&mut buf)).min(max);
        buf.truncate(n);
        let payload = Bytes::from(buf);
        let published = self
            .publish_via(
                route,
                &mut LinkCache::default(),
                std::slice::from_ref(&payload),
            )
            .await;
        Ok((published, copy.then_some(payload)))
    }

    /// Whether a topic may have queue groups on this host (if not,
    /// [`PubSub::publish_groups`] has nothing to do).
    pub(crate) fn has_groups(&self) -> bool {
        self.groups.any()
    }

    /// Sends to one plain subscriber over `conn`, cutting it if it
    /// stalled; returns the deliveries made.
    fn send_to<P: AsRef<[u8]>>(
        &self,
        route: &Route,
        conn: &Endpoint,
        id: InstanceId,
        payloads: &[P],
    ) -> usize {
        let sent = conn.send_publish_many(&route.metadata, payloads, self.stall);
        self.settle_sent(route, id, sent)
    }

    /// Counts what a send to the plain subscriber `id` did, cutting it if
    /// it stalled; returns the deliveries made.
    fn settle_sent(&self, route: &Route, id: InstanceId, sent: SentPublish) -> usize {
        self.count_discarded(&route.topic, sent.discarded);
        match sent.result {
            Ok(()) => {}
            Err(Unsent::Stalled) => self.cut_id(&route.pool, id, &route.topic),
            Err(Unsent::Failed(e)) => {
                tracing::debug!("publish to a subscriber of {} failed: {e}", route.topic)
            }
        }
        sent.sent
    }

    /// Links this publisher to the plain subscribers `ids` and sends to
    /// them. A subscriber that does not even take its link within the
    /// stall time (stopped before this publisher first reached it) made no
    /// progress either: it is cut. (The clock is read only to connect.)
    async fn send_unlinked<P: AsRef<[u8]>>(
        &self,
        route: &Route,
        ids: SmallVec<[InstanceId; LOCAL_INLINE]>,
        payloads: &[P],
        out: &mut Published,
    ) {
        let pool = &route.pool;
        let known = self.pools.instances_of(pool);
        for id in ids {
            let Some(inst) = known.iter().find(|i| i.id == id) else {
                continue;
            };
            out.reached.push(id);
            let within = Some(Deadline::after(self.stall));
            match self.pools.connect(pool, inst, within).await {
                Ok(conn) => out.delivered += self.send_to(route, &conn, id, payloads),
                Err(e) if e.code() == Code::DeadlineExceeded => self.cut(inst, &route.topic),
                Err(e) => tracing::debug!("subscriber of {} unreachable: {e}", route.topic),
            }
        }
    }

    /// Publishes `payload` on the topic of `route` to one member of each
    /// of its queue groups on this host; returns the deliveries made and
    /// the groups that took it.
    pub(crate) async fn publish_groups(
        &self,
        route: &Route,
        payload: &Bytes,
    ) -> Result<(usize, Vec<String>), Status> {
        let topic = &route.topic;
        let (mut delivered, mut groups_done) = (0, Vec::new());
        self.groups.ensure_started(self.registry.dir());
        for group in self.groups.groups_of(&route.key).iter() {
            let pool = self.pools.get(&key_name(group)?);
            // An empty group (all members left) is not an error. A member
            // found stalled is cut, and another one takes the message.
            // Members not linked yet get their link first, each within the
            // stall time, so that the pick does not wait for one.
            self.cut_unlinked(&pool, topic).await;
            for _ in 0..GROUP_TRIES {
                let within = Some(Deadline::after(self.stall));
                let picked = self
                    .pools
                    .pick(&pool, TransportPreference::Shm, within, None, None)
                    .await;
                let (conn, id) = match picked {
                    Ok(chosen) => chosen,
                    Err(e) if e.code() == Code::DeadlineExceeded => {
                        self.cut_unlinked(&pool, topic).await;
                        continue;
                    }
                    Err(_) => break,
                };
                let sent = conn.send_publish_many(&route.metadata, &[payload], self.stall);
                self.count_discarded(topic, sent.discarded);
                match sent.result {
                    Ok(()) => {
                        delivered += 1;
                        groups_done.push(group.clone());
                        break;
                    }
                    Err(Unsent::Stalled) => self.cut_id(&pool, id, topic),
                    Err(Unsent::Failed(e)) => {
                        tracing::debug!("publish to group {group} failed: {e}");
                        break;
                    }
                }
            }
        }
        Ok((delivered, groups_done))
    }

    /// [`PubSub::cut`]s the subscriber `id` of `pool`, if it is still known.
    fn cut_id(&self, pool: &Arc<crate::call::pool::Pool>, id: InstanceId, topic: &TopicName) {
        let member = self
            .pools
            .instances_of(pool)
            .into_iter()
            .find(|i| i.id == id);
        if let Some(member) = member {
            self.cut(&member, topic);
        }
    }

    /// Removes the topic registry's empty directories.
    pub(crate) fn tidy(&self) {
        self.registry.tidy();
    }

    /// Drops the links to subscribers, and the topic registry's empty
    /// directories.
    pub(crate) fn clear(&self) {
        self.routes.lock().clear();
        self.pools.clear();
        self.tidy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys docs/PROTOCOL.md derives in its example (section 10.2,
    /// "Subscriber-set keys").
    #[test]
    fn keys_are_those_of_the_protocol_doc() {
        let topic = TopicName::new("sensors/room-1/temp").unwrap();
        assert_eq!(topic_key(&topic), "8e57a3cfcdcc");
        assert_eq!(group_key(&topic, "workers"), "8e57a3cfcdcc-383cb9cc");
    }
}
