//! Subscriptions of a process that does not listen over TLS: publishers on
//! other hosts cannot reach it, so it subscribes on its own connections
//! instead, at one peer process of each other host (docs/PROTOCOL.md 10.2,
//! "Subscribe"). That peer makes a subscription of its own under the same
//! id, which every publisher of its host reaches, and pushes what it
//! receives on the stream; the messages join this subscription's queue
//! beside those of local publishers. The same id keeps a publisher from
//! reaching both: one that reached the subscription over shared memory
//! skips the peer's copy in the peer's listing.
//!
//! A stream that ends (the peer restarts, the connection drops) is opened
//! again with backoff while the subscription lasts; a peer host that
//! appears later is followed once its listing arrives.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use commy_core::{Code, Deadline, HostId, InstanceId, Limits, Metadata, TopicName};

use crate::call::tls::{PeerState, Peers};
use crate::pubsub::{Message, Queue, SlowSubscriber, SubscribeOptions};
use crate::warn::CLIENT_LINKS;
use crate::wire::{
    GROUP_HEADER, POLICY_HEADER, QUEUE_HEADER, SERVICE_HEADER, SUBSCRIBE_SERVICE,
    SUBSCRIBER_HEADER, TOPIC_HEADER, decode_metadata,
};

/// Credit is given back to a peer in batches of this many messages, once
/// they are in the subscription's queue.
const GRANT_BATCH: u32 = commy_net::PUSH_CREDIT / 4;

/// How long a peer has to accept a subscription.
const ACCEPT_TIME: Duration = Duration::from_secs(10);

/// What a subscription asks of the peers.
pub(crate) struct Wanted {
    pub(crate) topic: TopicName,
    pub(crate) group: Option<String>,
    pub(crate) options: SubscribeOptions,
    pub(crate) id: InstanceId,
}

impl Wanted {
    /// The metadata of the subscribe request.
    fn metadata(&self) -> Bytes {
        let mut md = Metadata::default();
        md.add_header(SERVICE_HEADER, SUBSCRIBE_SERVICE.as_bytes().to_vec());
        md.add_header(TOPIC_HEADER, self.topic.as_str().as_bytes().to_vec());
        if let Some(g) = &self.group {
            md.add_header(GROUP_HEADER, g.as_bytes().to_vec());
        }
        md.add_header(SUBSCRIBER_HEADER, self.id.to_string().into_bytes());
        md.add_header(QUEUE_HEADER, self.options.queue.to_string().into_bytes());
        md.add_header(
            POLICY_HEADER,
            self.options.policy.as_str().as_bytes().to_vec(),
        );
        Bytes::from(md.encode())
    }
}

/// Follows the peers for a subscription until dropped.
pub(crate) struct Following(tokio::task::JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Subscribes at one peer of every host other than `own` (as the peers'
/// listings say where they run) for `wanted`, feeding `queue`.
pub(crate) fn follow(
    peers: Arc<Peers>,
    own: HostId,
    wanted: Wanted,
    queue: Arc<Queue>,
    limits: Limits,
) -> Following {
    Following(tokio::spawn(manage(
        peers,
        own,
        Arc::new(wanted),
        queue,
        limits,
    )))
}

/// Aborts a task when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn manage(
    peers: Arc<Peers>,
    own: HostId,
    wanted: Arc<Wanted>,
    queue: Arc<Queue>,
    limits: Limits,
) {
    let mut changes = peers.watch_changes();
    let mut streams: HashMap<HostId, Task> = HashMap::new();
    loop {
        for (host, peer) in peers.one_per_host() {
            if host == own || streams.get(&host).is_some_and(|t| !t.0.is_finished()) {
                continue;
            }
            let task = tokio::spawn(stream(peer, wanted.clone(), queue.clone(), limits));
            streams.insert(host, Task(task));
        }
        if queue.is_closed() || changes.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps one peer's stream open for the subscription, feeding its queue,
/// until the subscription is over.
async fn stream(peer: Arc<PeerState>, wanted: Arc<Wanted>, queue: Arc<Queue>, limits: Limits) {
    let md = wanted.metadata();
    let mut backoff =
        commy_net::mux::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    while !queue.is_closed() {
        let opened = peer
            .client
            .subscribe(md.clone(), Bytes::new(), Some(Deadline::after(ACCEPT_TIME)))
            .await;
        match opened {
            Ok(mut pushes) => {
                backoff.reset();
                let mut taken = 0;
                while let Some(item) = pushes.next().await {
                    let reply = match item {
                        Ok(reply) => reply,
                        Err(e) => {
                            // The peer's copy was too slow (its queue full
                            // under Disconnect, or stalled under Block):
                            // messages were lost, so this subscription ends
                            // as it would have on the peer's host.
                            let lossy = e.code() == Code::ResourceExhausted
                                && wanted.options.policy != SlowSubscriber::DropOldest;
                            tracing::debug!(
                                "subscription to {} at {} ended: {e}",
                                wanted.topic,
                                peer.addr
                            );
                            if lossy {
                                queue.end_lossy(1, e);
                                return;
                            }
                            break;
                        }
                    };
                    let Ok(metadata) = decode_metadata(&reply.metadata, &limits) else {
                        tracing::warn!(
                            "subscription to {} at {}: a message with malformed metadata",
                            wanted.topic,
                            peer.addr
                        );
                        continue;
                    };
                    let m = Message::new(wanted.topic.clone(), reply.payload, metadata);
                    if !queue.push_from_async(m) {
                        return;
                    }
                    taken += 1;
                    if taken == GRANT_BATCH {
                        pushes.grant(taken);
                        taken = 0;
                    }
                }
            }
            // Rate-limited: a peer that refuses (or cannot be reached)
            // is retried for as long as the subscription lasts.
            Err(e) => {
                CLIENT_LINKS.warn(|| {
                    format!(
                        "cannot subscribe to {} at {} (retrying): {e}",
                        wanted.topic, peer.addr
                    )
                });
            }
        }
        tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(10))).await;
    }
}
