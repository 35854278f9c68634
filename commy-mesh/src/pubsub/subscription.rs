//! What a subscriber holds: its options ([`SubscribeOptions`], with the
//! [`SlowSubscriber`] policy), the messages it takes ([`Message`], and
//! [`MessageRef`] lent in place), the queue its publishers' messages wait
//! in under the queueing policies ([`Queue`]), and the [`Subscription`]
//! itself, which reads its publishers' rings through its
//! [`Reader`](super::inbox::Reader).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use commy_core::{Metadata, Status, TopicName};
use commy_shm::DiscardCounter;
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::inbox::{Ends, Reader};
use crate::accept::withdraw;

/// What happens when a subscriber's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowSubscriber {
    /// Publishers wait (backpressure through the ring); nothing is lost.
    #[default]
    Block,
    /// The oldest queued message is discarded (and counted).
    DropOldest,
    /// The subscription ends (the drop is counted); `next` returns `None`.
    Disconnect,
}

impl SlowSubscriber {
    /// The policy's name on the wire (docs/PROTOCOL.md 10.2).
    pub fn as_str(self) -> &'static str {
        match self {
            SlowSubscriber::Block => "block",
            SlowSubscriber::DropOldest => "drop-oldest",
            SlowSubscriber::Disconnect => "disconnect",
        }
    }

    /// The policy named `name` ([`SlowSubscriber::as_str`]).
    pub fn from_name(name: &str) -> Option<SlowSubscriber> {
        [
            SlowSubscriber::Block,
            SlowSubscriber::DropOldest,
            SlowSubscriber::Disconnect,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

/// Options of a subscription.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Messages queued before the slow-subscriber policy applies. Under
    /// `Block` this bounds only what comes from TLS peers: the rings of
    /// publishers on this host hold what waits from them.
    pub queue: usize,
    /// The slow-subscriber policy.
    pub policy: SlowSubscriber,
    /// How long a `Block` subscriber that keeps up with a dense stream
    /// (messages less than half a microsecond apart) waits after it sees a
    /// message, to take what comes meanwhile with it; zero: never. Reading
    /// right behind a fast publisher makes the two cores pass the ring's
    /// memory back and forth on every message, which slows the publisher
    /// down more than the wait costs: with the default of 1 µs, one
    /// publisher to one subscriber carries some 40 % more messages a
    /// second, each up to 1 µs later. Request-reply traffic and sparse
    /// streams are not dense, and do not wait. At most
    /// [`SubscribeOptions::MAX_LINGER`] (the wait is a spin).
    pub linger: Duration,
}

/// The default [`SubscribeOptions::linger`].
const DEFAULT_LINGER: Duration = Duration::from_micros(1);

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            queue: 1024,
            policy: SlowSubscriber::Block,
            linger: DEFAULT_LINGER,
        }
    }
}

impl SubscribeOptions {
    /// Sets the queue length.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// Sets the slow-subscriber policy.
    pub fn policy(mut self, p: SlowSubscriber) -> Self {
        self.policy = p;
        self
    }

    /// The longest [`SubscribeOptions::linger`].
    pub const MAX_LINGER: Duration = Duration::from_micros(100);

    /// Sets how long a subscriber of a dense stream waits to take more at
    /// once (see [`SubscribeOptions::linger`]; at most
    /// [`SubscribeOptions::MAX_LINGER`]); zero never waits.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger.min(Self::MAX_LINGER);
        self
    }
}

/// A published message as a subscriber receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    topic: TopicName,
    payload: Bytes,
    /// `None` when empty (most messages): a message stays small to move.
    metadata: Option<Box<Metadata>>,
}

/// The metadata of a message that carries none.
static NO_METADATA: Metadata = Metadata {
    auth_token: None,
    traceparent: None,
    content_type: None,
    headers: Vec::new(),
};

impl Message {
    pub(crate) fn new(topic: TopicName, payload: Bytes, metadata: Metadata) -> Message {
        Message {
            topic,
            payload,
            metadata: (!metadata.is_empty()).then(|| Box::new(metadata)),
        }
    }

    /// The topic it was published on.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// The message body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The publisher's metadata (without the topic header).
    pub fn metadata(&self) -> &Metadata {
        self.metadata.as_deref().unwrap_or(&NO_METADATA)
    }

    /// Takes the body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The message lent out, as [`Subscription::next_batch`] hands them.
    pub fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            topic: &self.topic,
            payload: &self.payload,
            metadata: self.metadata.as_deref(),
        }
    }
}

/// A message lent out by [`Subscription::next_batch`]: its bytes are still
/// where they arrived (the publisher's ring, on this host), and their
/// space is handed back once the batch is done. Copy what you keep
/// ([`MessageRef::to_message`]).
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    pub(crate) topic: &'a TopicName,
    pub(crate) payload: &'a [u8],
    pub(crate) metadata: Option<&'a Metadata>,
}

impl<'a> MessageRef<'a> {
    /// The topic it was published on.
    pub fn topic(&self) -> &'a TopicName {
        self.topic
    }

    /// The message body, in place.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The publisher's metadata (without the topic header).
    pub fn metadata(&self) -> &'a Metadata {
        self.metadata.unwrap_or(&NO_METADATA)
    }

    /// An owned copy.
    pub fn to_message(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            payload: Bytes::copy_from_slice(self.payload),
            metadata: self.metadata.map(|m| Box::new(m.clone())),
        }
    }
}

/// The queue between a subscription's link threads and its consumer (for
/// what comes from TLS peers, and under the policies other than `Block`).
pub(crate) struct Queue {
    pub(crate) topic: TopicName,
    state: Mutex<QueueState>,
    /// Link threads blocked on a full queue (policy `Block`) wait here.
    space: Condvar,
    cap: usize,
    policy: SlowSubscriber,
    dropped: AtomicU64,
    /// The queue group the subscription is a member of, if any.
    pub(crate) group: Option<String>,
}

struct QueueState {
    messages: VecDeque<Queued>,
    closed: bool,
    /// Why the subscription ended, if the mesh ended it.
    reason: Option<Status>,
    /// The consumer's task, when it waits for a message.
    waker: Option<std::task::Waker>,
}

/// A message in a subscription's queue, and where to count it if it is
/// discarded unread: the shared-memory link it came on, whose publisher
/// then sees the loss ([`PubSub::dropped_by_subscribers`](super::PubSub::dropped_by_subscribers)).
struct Queued {
    msg: Message,
    from: Option<Arc<DiscardCounter>>,
}

impl Queue {
    /// An empty queue of a subscription to `topic` (in queue `group`, if
    /// given) with `options`' length and policy.
    pub(crate) fn new(topic: TopicName, options: &SubscribeOptions, group: Option<&str>) -> Queue {
        Queue {
            topic,
            state: Mutex::new(QueueState {
                messages: VecDeque::new(),
                closed: false,
                reason: None,
                waker: None,
            }),
            space: Condvar::new(),
            cap: options.queue.max(1),
            policy: options.policy,
            dropped: AtomicU64::new(0),
            group: group.map(str::to_owned),
        }
    }

    /// The topic this queue receives.
    pub(crate) fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Queues a message per the policy; false once the subscription is over.
    pub(crate) fn push(&self, msg: Message) -> bool {
        self.push_from(msg, None)
    }

    /// Queues a message that came on the shared-memory link counted by
    /// `from`, per the policy: a message `DropOldest` discards is counted
    /// there too, for its publisher. False once the subscription is over.
    pub(crate) fn push_from(&self, msg: Message, from: Option<&Arc<DiscardCounter>>) -> bool {
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return false;
            }
            if st.messages.len() < self.cap {
                break;
            }
            match self.policy {
                SlowSubscriber::Block => {
                    self.space.wait(&mut st);
                }
                SlowSubscriber::DropOldest => {
                    if let Some(Queued {
                        from: Some(from), ..
                    }) = st.messages.pop_front()
                    {
                        from.add(1);
                    }
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                SlowSubscriber::Disconnect => {
                    let reason = Status::resource_exhausted(format!(
                        "the subscription to {} ended: its queue of {} was full \
                         (policy Disconnect)",
                        self.topic, self.cap
                    ));
                    self.end(st, 1, Some(reason));
                    return false;
                }
            }
        }
        st.messages.push_back(Queued {
            msg,
            from: from.cloned(),
        });
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Queues a message from async code: as [`Queue::push`], on a
    /// multi-threaded runtime without holding up the worker's other tasks
    /// while a full queue (policy `Block`) waits.
    pub(crate) fn push_from_async(&self, msg: Message) -> bool {
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            tokio::task::block_in_place(|| self.push(msg))
        } else {
            self.push(msg)
        }
    }

    /// Ends the subscription because messages were lost on the way
    /// (`lost`; none for a group member, whose message another member
    /// took), with `reason`; only the first end counts.
    pub(crate) fn end_lossy(&self, lost: u64, reason: Status) {
        self.end(self.state.lock(), lost, Some(reason));
    }

    /// Ends the subscription (the first end sets the count of `lost`
    /// messages and the `reason`) and wakes whoever waits: the consumer,
    /// and link threads blocked on a full queue.
    fn end(&self, mut st: MutexGuard<'_, QueueState>, lost: u64, reason: Option<Status>) {
        if !st.closed {
            st.closed = true;
            st.reason = reason;
            self.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        let waker = st.waker.take();
        drop(st);
        self.space.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Why the mesh ended the subscription, if it did.
    fn reason(&self) -> Option<Status> {
        self.state.lock().reason.clone()
    }

    /// Whether the subscription is over.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Ends the subscription for its consumer (`next` returns `None` once
    /// the queue is empty), as `Disconnect` does.
    pub(crate) fn close(&self) {
        self.end(self.state.lock(), 0, None);
    }

    /// Wakes the consumer if it waits.
    pub(crate) fn wake(&self) {
        let waker = self.state.lock().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Registers the consumer's `waker`, unless a message is queued or the
    /// subscription ended (false: look again instead of waiting).
    pub(crate) fn park(&self, waker: &std::task::Waker) -> bool {
        let mut st = self.state.lock();
        if !st.messages.is_empty() || st.closed {
            return false;
        }
        match &mut st.waker {
            Some(w) => w.clone_from(waker),
            slot => *slot = Some(waker.clone()),
        }
        true
    }

    /// A queued message, without waiting.
    pub(crate) fn try_pop(&self) -> Option<Message> {
        let m = self.state.lock().messages.pop_front();
        if m.is_some() {
            self.space.notify_one();
        }
        m.map(|q| q.msg)
    }

    /// Whether the subscription is over and nothing is left to take.
    fn is_drained(&self) -> bool {
        let st = self.state.lock();
        st.closed && st.messages.is_empty()
    }

    fn poll_message(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Message>> {
        let mut st = self.state.lock();
        if let Some(q) = st.messages.pop_front() {
            drop(st);
            self.space.notify_one();
            return std::task::Poll::Ready(Some(q.msg));
        }
        if st.closed {
            return std::task::Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// A subscription: a stream of messages, ended by dropping it.
pub struct Subscription {
    queue: Arc<Queue>,
    /// Under `Block`: the publishers' rings, read directly.
    reader: Option<Reader>,
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    /// Withdraws its announcement to TLS peers, if it was made.
    withdraw: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.queue.topic)
            .field("group", &self.queue.group)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Subscription {
    /// A subscription announced at `path` (its announcement withdrawn and
    /// `stop` set when it is dropped), taking its messages from `queue`
    /// and, under `Block`, from its publishers' rings through `reader`.
    pub(crate) fn new(
        queue: Arc<Queue>,
        reader: Option<Reader>,
        path: std::path::PathBuf,
        stop: Arc<AtomicBool>,
    ) -> Subscription {
        Subscription {
            queue,
            reader,
            path,
            stop,
            withdraw: None,
        }
    }

    /// The next message, or `None` once the subscription has ended (only
    /// after a `Disconnect` for being too slow).
    pub async fn next(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_message(Some(cx))).await
    }

    /// The next message if one is queued, without waiting; `None` if none
    /// is ([`Subscription::is_ended`] tells whether more can come).
    pub fn try_next(&mut self) -> Option<Message> {
        match self.poll_message(None) {
            std::task::Poll::Ready(m) => m,
            std::task::Poll::Pending => None,
        }
    }

    /// The next message; `cx`: wait for one, `None`: only look.
    fn poll_message(
        &mut self,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> std::task::Poll<Option<Message>> {
        let ends = Ends {
            queue: &self.queue,
            path: &self.path,
            stop: &self.stop,
        };
        match (&mut self.reader, cx) {
            (Some(reader), cx) => reader.poll(&ends, cx),
            (None, Some(cx)) => self.queue.poll_message(cx),
            (None, None) => match self.queue.try_pop() {
                Some(m) => std::task::Poll::Ready(Some(m)),
                None if self.queue.is_closed() => std::task::Poll::Ready(None),
                None => std::task::Poll::Pending,
            },
        }
    }

    /// Waits for the next message, then hands it and up to `max - 1` more
    /// that are already there to `each`, lent out in place: under `Block`,
    /// straight from the publishers' rings, with no copy and no allocation
    /// per message, their space handed back once the batch is done.
    /// Returns how many `each` got; 0 once the subscription has ended.
    /// The cheapest way to take a fast stream.
    pub async fn next_batch(&mut self, max: usize, mut each: impl FnMut(MessageRef<'_>)) -> usize {
        std::future::poll_fn(|cx| self.poll_batch(Some(cx), max, &mut each)).await
    }

    /// As [`Subscription::next_batch`], without waiting: 0 when nothing is
    /// there ([`Subscription::is_ended`] tells whether more can come).
    pub fn try_next_batch(&mut self, max: usize, mut each: impl FnMut(MessageRef<'_>)) -> usize {
        match self.poll_batch(None, max, &mut each) {
            std::task::Poll::Ready(n) => n,
            std::task::Poll::Pending => 0,
        }
    }

    fn poll_batch(
        &mut self,
        cx: Option<&mut std::task::Context<'_>>,
        max: usize,
        each: &mut dyn FnMut(MessageRef<'_>),
    ) -> std::task::Poll<usize> {
        if let Some(reader) = &mut self.reader {
            let ends = Ends {
                queue: &self.queue,
                path: &self.path,
                stop: &self.stop,
            };
            return reader.poll_batch(&ends, cx, max, each);
        }
        // The queue: the first message as `next` takes it, then what else
        // is there.
        let first = match self.poll_message(cx) {
            std::task::Poll::Ready(Some(m)) => m,
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(0),
            std::task::Poll::Pending => return std::task::Poll::Pending,
        };
        each(first.as_ref());
        let mut n = 1;
        while n < max {
            let Some(m) = self.queue.try_pop() else { break };
            each(m.as_ref());
            n += 1;
        }
        std::task::Poll::Ready(n)
    }

    /// The next message, waiting at most `timeout`: `Ok(None)` once the
    /// subscription has ended, `DEADLINE_EXCEEDED` if nothing came in time.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Status> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no message on {} within {timeout:?}",
                    self.queue.topic
                ))
            })
    }

    /// Whether the subscription has ended (only after a `Disconnect` for
    /// being too slow) and every message it received was taken.
    pub fn is_ended(&self) -> bool {
        self.queue.is_drained() && self.reader.as_ref().is_none_or(Reader::is_empty)
    }

    /// Why the mesh ended this subscription (`RESOURCE_EXHAUSTED`): its
    /// queue was full under `Disconnect`, or it took nothing for the stall
    /// time and a publisher disconnected it (a queue group member loses
    /// nothing then: the message goes to another member). `None` while it
    /// lasts.
    pub fn end_reason(&self) -> Option<Status> {
        self.queue.reason()
    }

    /// Messages discarded (`DropOldest`) or refused (`Disconnect`) because
    /// this subscriber was too slow, or lost when a publisher disconnected
    /// it (counted as one: the publisher that gave up knows only its own;
    /// none for a queue group member, whose message another member took).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// The topic.
    pub fn topic(&self) -> &TopicName {
        &self.queue.topic
    }

    /// The queue group, if any.
    pub fn group(&self) -> Option<&str> {
        self.queue.group.as_deref()
    }

    /// A handle on this subscription's losses and end, readable from
    /// anywhere while a task waits in [`Subscription::next`] (the SDKs'
    /// subscriptions use it).
    pub fn health(&self) -> SubscriptionHealth {
        SubscriptionHealth {
            queue: self.queue.clone(),
        }
    }

    /// Runs `withdraw` when the subscription ends (its announcement to
    /// peers is taken back).
    pub(crate) fn on_drop(&mut self, withdraw: Box<dyn FnOnce() + Send + Sync>) {
        self.withdraw = Some(withdraw);
    }
}

/// What [`Subscription::dropped`] and [`Subscription::end_reason`] say,
/// from a handle that does not need the subscription itself
/// ([`Subscription::health`]); it outlives the subscription.
#[derive(Clone)]
pub struct SubscriptionHealth {
    queue: Arc<Queue>,
}

impl std::fmt::Debug for SubscriptionHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHealth")
            .field("topic", &self.queue.topic)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl SubscriptionHealth {
    /// As [`Subscription::dropped`].
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// As [`Subscription::end_reason`].
    pub fn end_reason(&self) -> Option<Status> {
        self.queue.reason()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            withdraw(&self.path);
        }
        if let Some(withdraw) = self.withdraw.take() {
            withdraw();
        }
        self.queue.close();
        if let Some(reader) = &self.reader {
            reader.close();
        }
    }
}

impl tokio_stream::Stream for Subscription {
    type Item = Message;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        self.get_mut().poll_message(Some(cx))
    }
}
