//! A subscription that reads its publishers' rings itself (policy
//! `Block`): no thread and no queue between a publisher's ring and the
//! consumer, and messages taken in batches, their ring space handed back
//! with one store per batch.
//!
//! Each publisher's link has a watcher thread that only stands in while
//! the consumer waits, having found every ring empty: it sleeps on its
//! ring and wakes the consumer when something arrives, without taking it.
//! While the consumer reads, the watchers are parked. A consumer that
//! found messages recently spins a little before it waits (traffic that
//! comes that often pays for the spin); one that did not waits at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use commy_core::{Limits, TopicName};
use commy_shm::link::{LinkReceiver, LinkSender, RecvError};
use commy_shm::ring::WaitInterrupter;
use commy_shm::{RingError, ShmLink, WaitStrategy};
use parking_lot::Mutex;

use super::{Message, Queue, decode_publish, end_if_cut};
use crate::sync::Counted;
use crate::warn::CLIENT_LINKS;

/// Messages taken from one ring at a time.
const BATCH: usize = 64;

/// How long a consumer that found messages within it spins for more
/// before it waits.
const SPIN: Duration = Duration::from_micros(50);

/// How long a parked watcher sleeps before it checks whether its link
/// ended.
const WATCH_IDLE: Duration = Duration::from_millis(100);

/// The longest one wait of a watcher on its ring.
const WATCH_SLICE: Duration = Duration::from_millis(100);

/// How a watcher waits on its ring: the consumer spun already, so it
/// sleeps at once.
const WATCH_WAIT: WaitStrategy = WaitStrategy::Adaptive {
    spin: Duration::ZERO,
    yield_for: Duration::ZERO,
};

/// The links publishers opened to one subscription.
pub(crate) struct Inbox {
    links: Mutex<Vec<Arc<InLink>>>,
    /// Bumped when a link is added: the consumer refreshes its list.
    added: AtomicU64,
    /// Set while the consumer waits, having found every ring empty.
    waiting: AtomicBool,
    /// Set once the subscription is dropped.
    closed: AtomicBool,
}

/// One publisher's link, read by the consumer and watched by its thread.
struct InLink {
    rx: Mutex<LinkReceiver>,
    /// Ends the watcher's wait when the consumer wants the ring.
    interrupt: WaitInterrupter,
    tx: Mutex<LinkSender>,
    ended: AtomicBool,
    watcher: std::thread::Thread,
}

impl InLink {
    /// The receiving end, taken from the watcher if it waits on it.
    fn receiver(&self) -> parking_lot::MutexGuard<'_, LinkReceiver> {
        match self.rx.try_lock() {
            Some(rx) => rx,
            None => {
                self.interrupt.interrupt();
                self.rx.lock()
            }
        }
    }

    /// Whether a message (or the link's end) is waiting; `false` while the
    /// watcher holds the ring (it sees for itself).
    fn has_data(&self) -> bool {
        self.rx.try_lock().is_some_and(|rx| rx.has_data())
    }
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            links: Mutex::new(Vec::new()),
            added: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Takes a publisher's `link` in and watches it on the calling thread
    /// (the link's own) until it ends, counted in `links` meanwhile.
    pub(crate) fn serve(self: &Arc<Self>, link: ShmLink, queue: &Queue, links: &AtomicUsize) {
        let _serving = Counted::enter(links);
        let (tx, mut rx) = link.split();
        rx.set_wait_strategy(WATCH_WAIT);
        let link = Arc::new(InLink {
            interrupt: rx.interrupter(),
            rx: Mutex::new(rx),
            tx: Mutex::new(tx),
            ended: AtomicBool::new(false),
            watcher: std::thread::current(),
        });
        {
            let mut links = self.links.lock();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            links.push(link.clone());
            self.added.fetch_add(1, Ordering::Release);
        }
        self.watch(&link, queue);
    }

    /// The watcher's loop: parked while the consumer reads, waiting on the
    /// ring while the consumer waits, and waking it when something came.
    fn watch(&self, link: &InLink, queue: &Queue) {
        while !link.ended.load(Ordering::Acquire) {
            if !self.waiting.load(Ordering::Acquire) {
                std::thread::park_timeout(WATCH_IDLE);
                continue;
            }
            let ready = link.rx.lock().wait(Some(Instant::now() + WATCH_SLICE));
            if ready && self.waiting.swap(false, Ordering::AcqRel) {
                queue.wake();
            }
        }
    }

    /// Ends `link`: both directions are closed (its publisher's next send
    /// fails), and its watcher returns.
    fn end(&self, link: &Arc<InLink>) {
        if link.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        link.receiver().close();
        link.tx.lock().close();
        self.links.lock().retain(|l| !Arc::ptr_eq(l, link));
        link.watcher.unpark();
    }

    /// Ends every link, now and as they come (the subscription was
    /// dropped).
    pub(crate) fn close(&self) {
        let links = {
            let links = self.links.lock();
            self.closed.store(true, Ordering::Release);
            links.clone()
        };
        for link in &links {
            self.end(link);
        }
    }
}

/// The consumer's side of an [`Inbox`], owned by the subscription.
pub(crate) struct Reader {
    inbox: Arc<Inbox>,
    /// The inbox's links as of `seen`.
    links: Vec<Arc<InLink>>,
    seen: u64,
    /// Messages taken from the rings, not handed out yet.
    batch: VecDeque<Message>,
    /// The link read first next time (each gets its turn to be first).
    next: usize,
    topic: TopicName,
    /// The metadata of a message that carries only its topic header.
    plain: Vec<u8>,
    limits: Limits,
    /// When a read last found messages.
    last_found: Option<Instant>,
}

impl Reader {
    pub(crate) fn new(inbox: Arc<Inbox>, topic: TopicName, limits: Limits) -> Reader {
        Reader {
            inbox,
            links: Vec::new(),
            seen: u64::MAX,
            batch: VecDeque::new(),
            next: 0,
            plain: super::topic_metadata(&topic),
            topic,
            limits,
            last_found: None,
        }
    }

    /// The next message: from the batch taken already, the queue (what
    /// came over TLS), or the rings. `cx`: wait for one (spinning first if
    /// messages came recently); `None`: only look. `path` and `stop` say
    /// whether a link that ended was cut by a publisher.
    pub(crate) fn poll(
        &mut self,
        queue: &Queue,
        path: &std::path::Path,
        stop: &AtomicBool,
        mut cx: Option<&mut Context<'_>>,
    ) -> Poll<Option<Message>> {
        self.inbox.waiting.store(false, Ordering::Release);
        loop {
            if let Some(m) = self.batch.pop_front() {
                return Poll::Ready(Some(m));
            }
            if let Some(m) = queue.try_pop() {
                return Poll::Ready(Some(m));
            }
            if self.fill(queue, path, stop) > 0 {
                continue;
            }
            if queue.is_closed() {
                return Poll::Ready(None);
            }
            let Some(cx) = cx.as_deref_mut() else {
                return Poll::Pending;
            };
            if self.spin() {
                continue;
            }
            if !queue.park(cx.waker()) {
                continue;
            }
            // SYNC: SeqCst pairs with the watchers' swap: either a watcher
            // sees `waiting` and wakes us, or the check below sees what it
            // would have woken us for.
            self.inbox.waiting.store(true, Ordering::SeqCst);
            for link in &self.links {
                link.watcher.unpark();
            }
            if self.links.iter().any(|l| l.has_data())
                || self.inbox.added.load(Ordering::Acquire) != self.seen
            {
                self.inbox.waiting.store(false, Ordering::Release);
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Ends the publishers' links (the subscription was dropped).
    pub(crate) fn close(&self) {
        self.inbox.close();
    }

    /// Whether nothing is left to take: no message in the batch or the
    /// rings.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && !self.links.iter().any(|l| l.has_data())
    }

    /// Spins for more while messages came within [`SPIN`]; true once one
    /// is there.
    fn spin(&mut self) -> bool {
        let Some(last) = self.last_found else {
            return false;
        };
        let until = last + SPIN;
        while Instant::now() < until {
            for _ in 0..64 {
                if self.links.iter().any(|l| l.has_data()) {
                    return true;
                }
                std::hint::spin_loop();
            }
        }
        self.last_found = None;
        false
    }

    /// Takes what the rings hold (a batch from each, each link first in
    /// turn) into the batch; returns how many messages came.
    fn fill(&mut self, queue: &Queue, path: &std::path::Path, stop: &AtomicBool) -> usize {
        let added = self.inbox.added.load(Ordering::Acquire);
        if added != self.seen {
            self.links = self.inbox.links.lock().clone();
            self.seen = added;
        }
        let n = self.links.len();
        if n == 0 {
            return 0;
        }
        let first = self.next % n;
        self.next = self.next.wrapping_add(1);
        let mut found = 0;
        let mut ended = Vec::new();
        for i in 0..n {
            let link = &self.links[(first + i) % n];
            let mut bad = None;
            let got = {
                let Self {
                    batch,
                    topic,
                    plain,
                    limits,
                    ..
                } = self;
                link.receiver().try_recv_batch(BATCH, |bytes| {
                    if bad.is_some() {
                        return;
                    }
                    match decode_publish(bytes, topic, plain, limits) {
                        Ok(Some(m)) => batch.push_back(m),
                        Ok(None) => {}
                        Err(e) => bad = Some(e),
                    }
                })
            };
            match got {
                Ok(k) => found += k,
                Err(RecvError::Ring(RingError::Closed | RingError::PeerGone)) => {
                    ended.push(link.clone());
                    end_if_cut(queue, path, stop);
                }
                Err(e) => {
                    CLIENT_LINKS
                        .warn(|| format!("subscription to {}: closing a link: {e}", self.topic));
                    ended.push(link.clone());
                }
            }
            if let Some(e) = bad {
                CLIENT_LINKS.warn(|| format!("subscription to {}: {e}", self.topic));
                ended.push(link.clone());
            }
        }
        for link in &ended {
            self.inbox.end(link);
            self.links.retain(|l| !Arc::ptr_eq(l, link));
        }
        if found > 0 {
            self.last_found = Some(Instant::now());
        }
        found
    }
}
