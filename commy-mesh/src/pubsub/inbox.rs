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

use super::{Message, MessageRef, Queue, decode_publish_ref, end_if_cut};
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
    rings: Rings,
    /// Messages taken from the rings, not handed out yet.
    batch: VecDeque<Message>,
}

/// The publishers' rings as the consumer reads them.
struct Rings {
    inbox: Arc<Inbox>,
    /// The inbox's links as of `seen`.
    links: Vec<Arc<InLink>>,
    seen: u64,
    /// The link read first next time (each gets its turn to be first).
    next: usize,
    topic: TopicName,
    /// The metadata of a message that carries only its topic header.
    plain: Vec<u8>,
    limits: Limits,
    /// When a read last found messages.
    last_found: Option<Instant>,
    /// Whether waiting a moment after the first message pays.
    coalesce: Coalesce,
}

/// Adaptive coalescing of a dense stream, as a network card moderates its
/// interrupts: a subscriber that keeps up with a fast publisher reads each
/// message right behind it, and the two cores then pass the ring's cache
/// lines back and forth on every message, which costs the publisher more
/// than the message itself. Once messages keep coming less than [`DENSE`]
/// apart, the reader waits `linger` after it sees one before it takes it,
/// and takes what came meanwhile with it. A wait that brought nothing
/// more means the stream is not dense (a round trip, say): the reader
/// then asks for twice as many dense reads before it waits again, so a
/// request-reply exchange almost never waits.
#[derive(Debug)]
struct Coalesce {
    /// How long to wait (zero: never).
    linger: Duration,
    /// Reads in a row that found messages less than [`DENSE`] apart.
    dense: u32,
    /// Dense reads in a row needed before waiting.
    needed: u32,
    /// Set when the reader waited before the next read.
    lingered: bool,
}

/// Messages closer than this are a dense stream (see [`Coalesce`]).
const DENSE: Duration = Duration::from_nanos(500);
/// Dense reads in a row before the first wait, and the most ever asked.
const DENSE_READS: (u32, u32) = (16, 1 << 14);

impl Coalesce {
    fn new(linger: Duration) -> Coalesce {
        Coalesce {
            linger,
            dense: 0,
            needed: DENSE_READS.0,
            lingered: false,
        }
    }

    /// Whether to wait before taking the message just seen.
    fn should_linger(&mut self) -> bool {
        self.lingered = !self.linger.is_zero() && self.dense >= self.needed;
        self.lingered
    }

    /// Notes a read that found `found` messages `since` the last one that
    /// found any.
    fn read(&mut self, found: usize, since: Option<Duration>) {
        if std::mem::take(&mut self.lingered) {
            if found > 1 {
                self.needed = DENSE_READS.0;
            } else {
                self.needed = (self.needed * 2).min(DENSE_READS.1);
                self.dense = 0;
                return;
            }
        }
        let dense = since.is_some_and(|gap| gap < DENSE * found as u32);
        self.dense = if dense {
            self.dense.saturating_add(1)
        } else {
            0
        };
    }
}

/// Where a subscription's end is told apart from a publisher's cut: its
/// queue, its announcement and whether it was dropped.
pub(crate) struct Ends<'a> {
    pub(crate) queue: &'a Queue,
    pub(crate) path: &'a std::path::Path,
    pub(crate) stop: &'a AtomicBool,
}

impl Reader {
    pub(crate) fn new(
        inbox: Arc<Inbox>,
        topic: TopicName,
        limits: Limits,
        linger: Duration,
    ) -> Reader {
        Reader {
            rings: Rings {
                inbox,
                links: Vec::new(),
                seen: u64::MAX,
                next: 0,
                plain: super::topic_metadata(&topic),
                topic,
                limits,
                last_found: None,
                coalesce: Coalesce::new(linger),
            },
            batch: VecDeque::new(),
        }
    }

    /// The next message: from the batch taken already, the queue (what
    /// came over TLS), or the rings. `cx`: wait for one (spinning first if
    /// messages came recently); `None`: only look.
    pub(crate) fn poll(
        &mut self,
        ends: &Ends<'_>,
        cx: Option<&mut Context<'_>>,
    ) -> Poll<Option<Message>> {
        self.poll_with(ends, cx, None, |reader| {
            if let Some(m) = reader.batch.pop_front() {
                return Some(Some(m));
            }
            if let Some(m) = ends.queue.try_pop() {
                return Some(Some(m));
            }
            let Reader { rings, batch } = reader;
            rings.read(ends, BATCH, |m| batch.push_back(m.to_message()));
            batch.pop_front().map(Some)
        })
    }

    /// Up to `max` (at least 1) messages handed to `each` in place: those
    /// taken already, then the queue's, then straight from the rings, with
    /// no copy. `cx`: wait for the first (as [`Reader::poll`]); `None`:
    /// only look. Ready with how many; 0 once the subscription has ended.
    pub(crate) fn poll_batch(
        &mut self,
        ends: &Ends<'_>,
        cx: Option<&mut Context<'_>>,
        max: usize,
        each: &mut dyn FnMut(MessageRef<'_>),
    ) -> Poll<usize> {
        let max = max.max(1);
        self.poll_with(ends, cx, 0, |reader| {
            let mut n = 0;
            while n < max {
                let Some(m) = reader.batch.pop_front().or_else(|| ends.queue.try_pop()) else {
                    break;
                };
                each(m.as_ref());
                n += 1;
            }
            if n < max {
                n += reader.rings.read(ends, max - n, &mut *each);
            }
            (n > 0).then_some(n)
        })
    }

    /// What both receives share: `take` what is there; if nothing is,
    /// `ended` once the subscription is over, else wait (spinning first if
    /// messages came recently) and look again.
    fn poll_with<R>(
        &mut self,
        ends: &Ends<'_>,
        mut cx: Option<&mut Context<'_>>,
        ended: R,
        mut take: impl FnMut(&mut Self) -> Option<R>,
    ) -> Poll<R> {
        let rings = &self.rings;
        rings.inbox.waiting.store(false, Ordering::Release);
        loop {
            if let Some(r) = take(self) {
                return Poll::Ready(r);
            }
            if ends.queue.is_closed() {
                return Poll::Ready(ended);
            }
            let Some(cx) = cx.as_deref_mut() else {
                return Poll::Pending;
            };
            if self.rings.spin() {
                continue;
            }
            if !ends.queue.park(cx.waker()) {
                continue;
            }
            let rings = &self.rings;
            // SYNC: SeqCst pairs with the watchers' swap: either a watcher
            // sees `waiting` and wakes us, or the check below sees what it
            // would have woken us for.
            rings.inbox.waiting.store(true, Ordering::SeqCst);
            for link in &rings.links {
                link.watcher.unpark();
            }
            if rings.links.iter().any(|l| l.has_data())
                || rings.inbox.added.load(Ordering::Acquire) != rings.seen
            {
                rings.inbox.waiting.store(false, Ordering::Release);
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Ends the publishers' links (the subscription was dropped).
    pub(crate) fn close(&self) {
        self.rings.inbox.close();
    }

    /// Whether nothing is left to take: no message in the batch or the
    /// rings.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && !self.rings.links.iter().any(|l| l.has_data())
    }
}

impl Rings {
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
                    if self.coalesce.should_linger() {
                        let seen = Instant::now();
                        while seen.elapsed() < self.coalesce.linger {
                            std::hint::spin_loop();
                        }
                    }
                    return true;
                }
                std::hint::spin_loop();
            }
        }
        self.last_found = None;
        false
    }

    /// Hands up to `max` messages the rings hold to `each`, in place (at
    /// most a [`BATCH`] from each ring, each ring first in turn); returns
    /// how many it handed.
    fn read(&mut self, ends: &Ends<'_>, max: usize, mut each: impl FnMut(MessageRef<'_>)) -> usize {
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
        // Frames taken, and messages of this topic among them.
        let (mut found, mut handed) = (0, 0);
        let mut ended = Vec::new();
        for i in 0..n {
            if handed >= max {
                break;
            }
            let link = &self.links[(first + i) % n];
            let mut bad = None;
            let got = {
                let Self {
                    topic,
                    plain,
                    limits,
                    ..
                } = self;
                link.receiver()
                    .try_recv_batch(BATCH.min(max - handed), |bytes| {
                        if bad.is_some() {
                            return;
                        }
                        let lend = |m: MessageRef<'_>| {
                            each(m);
                            handed += 1;
                        };
                        if let Err(e) = decode_publish_ref(bytes, topic, plain, limits, lend) {
                            bad = Some(e);
                        }
                    })
            };
            match got {
                Ok(k) => found += k,
                Err(RecvError::Ring(RingError::Closed | RingError::PeerGone)) => {
                    ended.push(link.clone());
                    end_if_cut(ends.queue, ends.path, ends.stop);
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
            let now = Instant::now();
            let since = self
                .last_found
                .map(|last| now.saturating_duration_since(last));
            self.coalesce.read(found, since);
            self.last_found = Some(now);
        }
        handed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Option<Duration> = Some(Duration::from_nanos(200));
    const SLOW: Option<Duration> = Some(Duration::from_micros(2));

    /// Reads `n` times, each finding `found` messages `since` the last.
    fn reads(c: &mut Coalesce, n: u32, found: usize, since: Option<Duration>) {
        for _ in 0..n {
            c.read(found, since);
        }
    }

    #[test]
    fn a_dense_stream_lingers_and_keeps_lingering_while_it_pays() {
        let mut c = Coalesce::new(Duration::from_micros(1));
        reads(&mut c, DENSE_READS.0 - 1, 1, QUICK);
        assert!(!c.should_linger(), "too early");
        c.read(1, QUICK);
        for _ in 0..100 {
            assert!(c.should_linger());
            // The wait gathered several messages, closer than DENSE each.
            c.read(4, Some(Duration::from_nanos(1200)));
        }
    }

    #[test]
    fn a_wait_that_gathers_nothing_doubles_the_reads_asked_for() {
        let mut c = Coalesce::new(Duration::from_micros(1));
        let mut needed = DENSE_READS.0;
        for _ in 0..20 {
            reads(&mut c, needed, 1, QUICK);
            assert!(c.should_linger());
            c.read(1, SLOW);
            assert!(!c.should_linger());
            needed = (needed * 2).min(DENSE_READS.1);
            assert_eq!(c.needed, needed);
        }
        assert_eq!(c.needed, DENSE_READS.1);
        // A wait that pays brings the first count back.
        reads(&mut c, needed, 1, QUICK);
        assert!(c.should_linger());
        c.read(3, QUICK);
        assert_eq!(c.needed, DENSE_READS.0);
    }

    #[test]
    fn sparse_messages_and_a_zero_linger_never_wait() {
        let mut c = Coalesce::new(Duration::from_micros(1));
        reads(&mut c, 1000, 1, SLOW);
        assert!(!c.should_linger());
        // A first read has no gap to judge by.
        reads(&mut c, 1000, 1, None);
        assert!(!c.should_linger());
        let mut off = Coalesce::new(Duration::ZERO);
        reads(&mut off, 1000, 1, QUICK);
        assert!(!off.should_linger());
    }
}
