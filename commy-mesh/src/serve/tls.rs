//! The TLS server side: one listener per process serves every service of
//! the handle; a request names its service in the reserved metadata header
//! `commy-service`. The router also answers the control service
//! `commy.instances` (this process's listing, long-polled by peers) and
//! takes messages published to this process's subscriptions
//! (`commy.publish`), and subscriptions of clients that only connect
//! (`commy.subscribe`): each becomes a subscription of this process whose
//! messages are pushed on the client's stream.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use commy_core::{HostId, InstanceId, Limits, Metadata, ServiceName, Status, TopicName};
use commy_discovery::RoundRobin;
use commy_net::{Inbound, Reply};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::pubsub::{Message, Queue, SlowSubscriber, SubscribeOptions, Subscription};
use crate::serve::dispatch::{ServeCtx, serve_request};
use crate::serve::load::OwnedHandling;
use crate::serve::request::{ArrivedDeadline, Caller, RemoteCaller, Request};
use crate::wire::{
    GROUP_HEADER, INSTANCES_SERVICE, LONG_POLL, Listing, POLICY_HEADER, PUBLISH_SERVICE,
    QUEUE_HEADER, SERVICE_HEADER, SUBSCRIBE_SERVICE, SUBSCRIBER_HEADER, TOPIC_HEADER,
    TOPIC_KEY_HEADER, decode_metadata, encode_metadata,
};

/// The subscriptions of one subscriber set in this process.
pub(crate) type Subscribers = Vec<(InstanceId, Arc<Queue>)>;

/// The instances of one service served in this process.
pub(crate) type Instances = Vec<(InstanceId, Arc<ServeCtx>)>;

/// Subscribes this process to a topic (optionally in a queue group) for a
/// client that subscribed over TLS, under the client subscription's id.
pub(crate) type SubscribeHook = Box<
    dyn Fn(&str, Option<&str>, SubscribeOptions, Option<InstanceId>) -> Result<Subscription, Status>
        + Send
        + Sync,
>;

/// The largest queue a client may ask for its subscription.
const MAX_QUEUE: usize = 1 << 20;

/// The services this process serves over TLS.
pub(crate) struct Router {
    pub(crate) services: Mutex<FxHashMap<ServiceName, Instances>>,
    pub(crate) version: watch::Sender<u64>,
    pub(crate) host: HostId,
    pub(crate) limits: Limits,
    /// Spreads requests over the instances of a service, and messages
    /// over the members of a queue group.
    pub(crate) rr: RoundRobin,
    /// Metadata sections that hold nothing but the service header, and the
    /// service they name (most requests: no need to decode them).
    pub(crate) plain: Mutex<FxHashMap<Bytes, ServiceName>>,
    /// This process's subscriptions, by subscriber-set key.
    pub(crate) topics: Mutex<FxHashMap<ServiceName, Subscribers>>,
    /// Set when the handle closes: listing requests answer at once.
    pub(crate) closing: watch::Sender<bool>,
    /// Set once the mesh handle exists: makes subscriptions for clients.
    pub(crate) subscriber: OnceLock<SubscribeHook>,
}

/// At most this many entries in [`Router::plain`].
const PLAIN_CACHE: usize = 1024;

impl Router {
    pub(crate) fn listing(&self) -> Listing {
        let services = self.services.lock();
        Listing {
            version: *self.version.borrow(),
            host: self.host.clone(),
            pid: std::process::id(),
            // A draining instance still takes the calls of clients that
            // have not seen it leave, but is listed no more.
            instances: services
                .iter()
                .flat_map(|(s, v)| {
                    v.iter()
                        .filter(|(_, ctx)| !ctx.load.draining.load(Ordering::Acquire))
                        .map(move |(id, _)| (s.clone(), *id))
                })
                .collect(),
            subscriptions: self
                .topics
                .lock()
                .iter()
                .flat_map(|(k, v)| v.iter().map(move |(id, _)| (k.clone(), *id)))
                .collect(),
        }
    }

    /// The service a request names and the rest of its metadata.
    fn route(&self, raw: &Bytes) -> Result<(ServiceName, Metadata), Status> {
        if let Some(name) = self.plain.lock().get(raw) {
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
            let mut plain = self.plain.lock();
            if plain.len() < PLAIN_CACHE {
                plain.insert(raw.clone(), name.clone());
            }
        }
        Ok((name, metadata))
    }

    pub(crate) async fn handle(&self, inbound: Inbound) -> Result<Reply, Status> {
        let (name, metadata) = self.route(&inbound.metadata)?;
        if name.as_str() == INSTANCES_SERVICE {
            return self.list(&inbound.payload).await;
        }
        if name.as_str() == PUBLISH_SERVICE {
            return self.deliver(metadata, inbound.payload);
        }
        if name.as_str() == SUBSCRIBE_SERVICE {
            return self.subscribe(&metadata);
        }
        let ctx = {
            let services = self.services.lock();
            let instances = services
                .get(&name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Status::not_found(format!("no instance of service '{name}' in this process"))
                })?;
            // An instance that drains takes calls only while no other
            // instance of the service in this process may.
            let draining = |i: usize| instances[i].1.load.draining.load(Ordering::Acquire);
            let mut i = self.rr.pick(instances.len()).unwrap_or(0);
            if draining(i) {
                i = (0..instances.len()).find(|&j| !draining(j)).unwrap_or(i);
            }
            instances[i].1.clone()
        };
        ctx.load.remote_requests.fetch_add(1, Ordering::Relaxed);
        let caller = Caller::Remote(RemoteCaller(inbound.peer));
        ctx.admit(
            &caller,
            &metadata,
            inbound.kind == commy_core::FrameKind::OneWay,
        )?;
        let _handling = OwnedHandling::enter(ctx.load.clone());
        let deadline = inbound.deadline;
        let request = Request {
            service: ctx.service,
            payload: inbound.payload,
            metadata: metadata.into(),
            deadline: ArrivedDeadline::at(deadline),
            caller,
        };
        let response = serve_request(&ctx, ctx.handler.future(request), deadline).await?;
        Ok(Reply::with_metadata(
            Bytes::from(encode_metadata(&response.metadata)),
            response.payload,
        ))
    }

    /// Queues a message published over TLS for this process's subscribers
    /// of its key: all of them for a topic key, one for a queue group.
    pub(crate) fn deliver(&self, mut metadata: Metadata, payload: Bytes) -> Result<Reply, Status> {
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
            let topics = self.topics.lock();
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
            q.push_from_async(m);
        }
        Ok(Reply::default())
    }

    /// Subscribes this process for a client that asked over TLS, and
    /// pushes what the subscription receives on the client's stream until
    /// either side ends it (docs/PROTOCOL.md 10.2, "Subscribe").
    pub(crate) fn subscribe(&self, metadata: &Metadata) -> Result<Reply, Status> {
        let text = |name: &str| -> Result<Option<&str>, Status> {
            metadata
                .header(name)
                .map(|v| {
                    std::str::from_utf8(v).map_err(|_| {
                        Status::invalid_argument(format!("the {name} header is not UTF-8"))
                    })
                })
                .transpose()
        };
        let topic = text(TOPIC_HEADER)?.ok_or_else(|| {
            Status::invalid_argument(format!(
                "a subscription names no topic (no {TOPIC_HEADER} header)"
            ))
        })?;
        let group = text(GROUP_HEADER)?;
        let id = text(SUBSCRIBER_HEADER)?
            .map(|t| {
                t.parse::<InstanceId>().map_err(|e| {
                    Status::invalid_argument(format!("the {SUBSCRIBER_HEADER} header: {e}"))
                })
            })
            .transpose()?;
        let mut options = SubscribeOptions::default();
        if let Some(q) = text(QUEUE_HEADER)? {
            let n = q
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_QUEUE).contains(n));
            options = options.queue(n.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the {QUEUE_HEADER} header is {q:?}, not a queue length from 1 to {MAX_QUEUE}"
                ))
            })?);
        }
        if let Some(p) = text(POLICY_HEADER)? {
            options = options.policy(SlowSubscriber::from_name(p).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the {POLICY_HEADER} header is {p:?}, not block, drop-oldest or disconnect"
                ))
            })?);
        }
        if let Some(id) = id
            && self.topics.lock().values().flatten().any(|(i, _)| *i == id)
        {
            // Still held for an earlier stream (its end not yet seen).
            return Err(Status::already_exists(format!(
                "subscription {id} is held here already"
            )));
        }
        let hook = self
            .subscriber
            .get()
            .ok_or_else(|| Status::unavailable("this process takes no subscriptions yet"))?;
        let subscription = hook(topic, group, options, id)?;
        let (reply, pusher) = Reply::new(Bytes::new()).streaming();
        tokio::spawn(push_subscription(subscription, pusher));
        Ok(reply)
    }

    /// Answers a listing request: at once if the caller's version is old,
    /// else when something changes (or after the long-poll time).
    pub(crate) async fn list(&self, payload: &[u8]) -> Result<Reply, Status> {
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

/// Pushes what `subscription` receives on a client's stream, until the
/// client ends the stream (the subscription is dropped, and withdrawn) or
/// the subscription ends (`Disconnect`: too slow), which fails the stream.
async fn push_subscription(mut subscription: Subscription, pusher: commy_net::Pusher) {
    loop {
        let message = tokio::select! {
            m = subscription.next() => m,
            _ = pusher.closed() => return,
        };
        let Some(m) = message else {
            let status = subscription.end_reason().unwrap_or_else(|| {
                Status::resource_exhausted(format!(
                    "the subscription to {} ended: the subscriber was too slow",
                    subscription.topic()
                ))
            });
            pusher.fail(status).await;
            return;
        };
        let metadata = Bytes::from(encode_metadata(m.metadata()));
        if pusher.push(metadata, m.into_payload()).await.is_err() {
            return;
        }
    }
}
