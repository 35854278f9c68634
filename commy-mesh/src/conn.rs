//! Connections: commy-shm links carrying commy-core frames, bridged to tokio.
//!
//! Client side: the calling task writes its request straight into the ring
//! and then polls the link's receive ring itself for a short while
//! ([`Config::call_spin`](crate::Config::call_spin)), completing whatever
//! answers it finds (its own, or other callers' through the pending table).
//! A quick call therefore never crosses a thread. Only when no caller polls
//! and calls are still pending does a parked reader thread take over,
//! waiting on the ring (spin, yield, then futex: an idle link costs no CPU).
//! An event loop that keeps many callback calls in flight receives their
//! answers itself instead, at every turn ([`AnswerDriver`]); the reader
//! then only stands by.
//!
//! Server side: one thread per link waits on the ring and polls each
//! request's handler once right there; a handler that answers without
//! waiting is answered from that thread, one that has to wait continues as a
//! tokio task (bounded by the service's concurrency permits).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{
    Code, Deadline, FrameHeader, FrameKind, FrameRef, InstanceId, Limits, Metadata, Status,
    StreamId,
};
use commy_shm::link::{LinkSender, RecvError, SendError};
use commy_shm::{LinkReceiver, RingError, ShmLink};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::oneshot;

use crate::service::{
    ArrivedDeadline, Caller, Handler, HandlerFuture, InlineSlot, Request, Responder, Response, Shared, Sink,
};

/// How long a send may wait for ring space before the call fails with
/// `ResourceExhausted` (the peer is not draining its ring).
const SEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Frames up to this many bytes are assembled on the stack and copied into
/// the ring in one go.
const SMALL_FRAME: usize = 256;

/// Encodes `header` + `metadata` + `payload` as one message on the link:
/// in place in the ring when it fits one record, else through the
/// fragmenting copy path.
pub(crate) fn send_frame(
    tx: &mut LinkSender,
    mut header: FrameHeader,
    metadata: &[u8],
    payload: &[u8],
    patience: Patience,
) -> Result<(), SendError> {
    header.metadata_len = metadata.len() as u32;
    header.payload_len = payload.len() as u32;
    let total = commy_core::HEADER_LEN + metadata.len() + payload.len();
    if total <= tx.max_record() {
        let loan = match patience {
            Patience::Until(d) => tx.loan(total, Some(d))?,
            // The clock is only read if the ring is full.
            Patience::For(t) => tx.loan_for(total, t)?,
        };
        if total <= SMALL_FRAME {
            let mut buf = [0u8; SMALL_FRAME];
            buf[..commy_core::HEADER_LEN].copy_from_slice(&header.encode());
            let md_end = commy_core::HEADER_LEN + metadata.len();
            buf[commy_core::HEADER_LEN..md_end].copy_from_slice(metadata);
            buf[md_end..total].copy_from_slice(payload);
            loan.fill(&buf[..total]).commit();
        } else {
            loan.fill_parts(&[&header.encode(), metadata, payload])
                .commit();
        }
        Ok(())
    } else {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&header.encode());
        v.extend_from_slice(metadata);
        v.extend_from_slice(payload);
        let deadline = match patience {
            Patience::Until(d) => d,
            Patience::For(t) => Instant::now().checked_add(t).unwrap_or_else(far_future),
        };
        tx.send_deadline(&v, Some(deadline))
    }
}

/// A moment no wait reaches (for timeouts too large to add to the clock).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// How long a send may wait for ring space.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Patience {
    /// Until this moment.
    Until(Instant),
    /// This long from when the ring is found full.
    For(Duration),
}

impl Patience {
    /// The default for sends that have no deadline of their own.
    pub(crate) const DEFAULT: Patience = Patience::For(SEND_PATIENCE);
}

/// When a call must be answered: a timeout counted from the call's start
/// and/or an absolute deadline. The start is read from the clock only once
/// something needs it, so a call with just a timeout that is answered
/// quickly never reads the clock (the wire carries the timeout as is).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Due {
    timeout: Option<Duration>,
    deadline: Option<Deadline>,
    start: Option<Instant>,
}

impl Due {
    /// A call due within `timeout` (counted from `start`, or from when
    /// the clock is first read for it) and/or by `deadline`.
    pub(crate) fn new(
        timeout: Option<Duration>,
        deadline: Option<Deadline>,
        start: Option<Instant>,
    ) -> Due {
        Due {
            timeout,
            deadline,
            start,
        }
    }

    fn start(&mut self) -> Instant {
        *self.start.get_or_insert_with(Instant::now)
    }

    /// The absolute deadline, if any.
    fn absolute(&mut self) -> Option<Deadline> {
        let by_timeout = self.timeout.map(|t| Deadline::after_at(t, self.start()));
        match (by_timeout, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The frame header's deadline field.
    fn wire(&mut self) -> u64 {
        match (self.timeout, self.deadline) {
            (None, None) => commy_core::NO_DEADLINE,
            (Some(t), None) => u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1),
            _ => {
                let now = self.start();
                self.absolute()
                    .map_or(commy_core::NO_DEADLINE, |d| d.to_wire_at(now))
            }
        }
    }

    /// How long sending the request may wait for ring space.
    fn patience(&mut self) -> Patience {
        match (self.timeout, self.deadline) {
            (None, None) => Patience::DEFAULT,
            (Some(t), None) => Patience::For(t),
            _ => match self.absolute() {
                Some(d) => Patience::Until(d.instant()),
                None => Patience::DEFAULT,
            },
        }
    }
}

/// Refuses a frame the peer would reject as too large (it would close the
/// link): the caller gets `ResourceExhausted` and the link stays up.
pub(crate) fn check_frame(limits: &Limits, metadata: &[u8], payload: &[u8]) -> Result<(), Status> {
    let len = commy_core::HEADER_LEN as u64 + metadata.len() as u64 + payload.len() as u64;
    if metadata.len() as u64 > u64::from(limits.max_metadata) {
        return Err(Status::resource_exhausted(format!(
            "metadata of {} bytes exceeds the limit of {} bytes",
            metadata.len(),
            limits.max_metadata
        )));
    }
    if len > u64::from(limits.max_frame) {
        return Err(Status::resource_exhausted(format!(
            "message of {} bytes exceeds the frame limit of {} bytes",
            payload.len(),
            limits.max_frame
        )));
    }
    Ok(())
}

/// Maps a link send failure to the caller's status.
pub(crate) fn send_status(e: SendError) -> Status {
    match e {
        SendError::TooLarge { len, max } => Status::resource_exhausted(format!(
            "message of {len} bytes exceeds the peer's limit of {max} bytes"
        )),
        SendError::TimedOut => {
            Status::resource_exhausted("the peer is not draining its queue (ring full)")
        }
        SendError::Ring(e) => Status::unavailable(format!("link lost: {e}")),
        other => Status::unavailable(format!("link error: {other}")),
    }
}

/// The metadata section of a frame: empty when there is no metadata, so
/// the common case costs nothing to encode or decode.
pub(crate) fn encode_metadata(metadata: &Metadata) -> Vec<u8> {
    if metadata.is_empty() {
        Vec::new()
    } else {
        metadata.encode()
    }
}

/// Reads a frame's metadata section (see [`encode_metadata`]).
pub(crate) fn decode_metadata(
    bytes: &[u8],
    limits: &Limits,
) -> Result<Metadata, commy_core::MetadataError> {
    if bytes.is_empty() {
        Ok(Metadata::default())
    } else {
        Metadata::decode(bytes, limits)
    }
}

/// The result a pending call receives.
pub(crate) type CallResult = Result<Response, Status>;

/// An answer frame as read from the ring, its payload still in place.
enum AnswerRef<'m> {
    Response {
        payload: &'m [u8],
        metadata: Metadata,
    },
    Failed(Status),
}

impl AnswerRef<'_> {
    /// The call's result, its payload copied out of the ring.
    fn into_result(self) -> CallResult {
        match self {
            AnswerRef::Response { payload, metadata } => Ok(Response {
                payload: Bytes::copy_from_slice(payload),
                metadata: metadata.into(),
            }),
            AnswerRef::Failed(status) => Err(status),
        }
    }
}

/// Receives the answers to token calls ([`Mesh::call_token`]) that are
/// not handed to an [`AnswerDriver::poll_with`] callback: those read by
/// the links' reader threads, those that fail or time out, and those a
/// plain [`AnswerDriver::poll`] takes. Called on whichever thread finds the
/// answer; it must not block (queue the result and wake whoever waits).
///
/// [`Mesh::call_token`]: crate::Mesh::call_token
pub trait AnswerSink: Send + Sync + 'static {
    /// Call `token` finished with `result`.
    fn answer(&self, token: u64, result: Result<Response, Status>);
}

/// The client side of one link to one service instance.
///
/// Responses are read by the callers themselves: a caller that has sent its
/// request polls the link's receive ring for a short while (`spin`),
/// completing whatever responses it finds, its own or other callers'. Only
/// when no caller is polling and calls are still pending does a parked
/// reader thread take over, waiting on the ring (and sleeping when it stays
/// empty). A quick call therefore never crosses a thread.
pub(crate) struct ClientConn {
    tx: Mutex<TxState>,
    rx: Mutex<LinkReceiver>,
    pending: Mutex<PendingCalls>,
    /// `pending.len()`, readable without the lock (stored under it).
    pending_len: AtomicUsize,
    alive: AtomicBool,
    /// Callers currently polling the receive ring (the reader stands back).
    pollers: AtomicUsize,
    /// Calls in flight (for least-loaded balancing).
    pub(crate) in_flight: AtomicUsize,
    /// Set while this link's instance is the only one its pool knows, by a
    /// call under the pool's lock; cleared there whenever the pool's
    /// instances change (a thread's last-called cache relies on it).
    pub(crate) sole: AtomicBool,
    limits: Limits,
    spin: Duration,
    reader: OnceLock<std::thread::Thread>,
    /// Set when a callback call moved the earliest deadline forward (the
    /// reader then reads it again).
    sooner: AtomicBool,
    /// Ends the reader's wait on the ring, which may be set for a later
    /// deadline than a call registered since.
    interrupt: commy_shm::WaitInterrupter,
    /// Set while an [`AnswerDriver`] receives this link's answers (the
    /// reader stands by, see [`stand_by`]).
    driven: AtomicBool,
    /// Set once an [`AnswerDriver`] has claimed the link: its reader naps
    /// for a while before parking, so that the next claim needs no wake-up.
    was_driven: AtomicBool,
    /// Set by every poll of the driver; cleared by the standing-by reader
    /// each time it looks.
    polled: AtomicBool,
    /// Set while the reader is parked with no timeout (a claim wakes it).
    asleep: AtomicBool,
    /// Set once a callback call was made on the link.
    callbacks: AtomicBool,
    /// Where the answers to token calls go (set by the first one: every
    /// call on the link comes through the same mesh handle).
    sink: OnceLock<Arc<dyn AnswerSink>>,
}

/// How long the fallback reader waits on the ring before re-checking
/// whether a caller took over or nothing is pending any more.
const READER_SLICE: Duration = Duration::from_millis(20);

impl ClientConn {
    /// Wraps a connected link and starts its (parked) reader thread.
    pub(crate) fn start(
        instance: InstanceId,
        link: ShmLink,
        limits: Limits,
        spin: Duration,
    ) -> Arc<ClientConn> {
        let (tx, rx) = link.split();
        let interrupt = rx.interrupter();
        let conn = Arc::new(ClientConn {
            tx: Mutex::new(TxState {
                sender: tx,
                next_stream: 1,
            }),
            rx: Mutex::new(rx),
            pending: Mutex::new(PendingCalls::default()),
            pending_len: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            pollers: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            sole: AtomicBool::new(false),
            limits,
            spin,
            reader: OnceLock::new(),
            interrupt,
            sooner: AtomicBool::new(false),
            driven: AtomicBool::new(false),
            was_driven: AtomicBool::new(false),
            polled: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            callbacks: AtomicBool::new(false),
            sink: OnceLock::new(),
        });
        let weak = Arc::downgrade(&conn);
        let spawned = std::thread::Builder::new()
            .name(format!("commy-client-{instance}"))
            .spawn(move || client_reader(weak));
        match spawned {
            Ok(handle) => {
                let _ = conn.reader.set(handle.thread().clone());
            }
            Err(e) => {
                tracing::error!("cannot start a link reader thread: {e}");
                conn.alive.store(false, Ordering::Release);
            }
        }
        conn
    }

    /// Whether the link still works.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its response (or the deadline).
    /// `balanced`: count the call in [`in_flight`](ClientConn::in_flight)
    /// (only needed when there are instances to choose between); `spin`:
    /// this call's polling budget instead of the link's.
    pub(crate) async fn call(
        &self,
        payload: Bytes,
        metadata: &Metadata,
        due: Due,
        balanced: bool,
        spin: Option<Duration>,
    ) -> CallResult {
        match self.start_call(payload, metadata, due, balanced, spin) {
            Started::Done(result) => result,
            Started::Waiting(waiting) => self.finish_call(waiting).await,
        }
    }

    /// The synchronous part of a call: sends the request and polls for the
    /// answer for a while. A quick call is done here, without a future.
    /// The payload is dropped once sent, while the answer is still on its
    /// way.
    pub(crate) fn start_call(
        &self,
        payload: Bytes,
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
        spin: Option<Duration>,
    ) -> Started<'_> {
        let spin = spin.unwrap_or(self.spin);
        if !self.is_alive() {
            return Started::Done(Err(Status::unavailable("the instance is gone")));
        }
        let in_flight = balanced.then(|| Counted::enter(&self.in_flight));
        let md = encode_metadata(metadata);
        if let Err(status) = check_frame(&self.limits, &md, &payload) {
            return Started::Done(Err(status));
        }
        let deadline_us = due.wire();
        let patience = due.patience();
        let send = |tx: &mut TxState, id: u64, payload: Bytes| {
            let header = FrameHeader {
                deadline_us,
                ..FrameHeader::new(FrameKind::Request, StreamId(id))
            };
            let sent = send_frame(&mut tx.sender, header, &md, &payload, patience);
            // Freed after the send, not on the answer's path.
            drop(payload);
            sent.map_err(send_status)
        };
        let (id, done) = match self.rx.try_lock() {
            Ok(mut rx) => {
                // We own the receive ring: our answer cannot be taken by
                // anyone else, so it needs no registration unless we stop
                // polling before it comes.
                let id = {
                    let mut tx = lock(&self.tx);
                    let id = tx.open_stream();
                    if let Err(status) = send(&mut tx, id, payload) {
                        return Started::Done(Err(status));
                    }
                    id
                };
                // The space of the answer before, if the last call left it.
                rx.release();
                if let Some(result) = self.poll_own(&mut rx, id, &mut due, spin) {
                    return Started::Done(result);
                }
                let (done_tx, done_rx) = oneshot::channel();
                self.register(id, Waiter::Task(done_tx));
                drop(rx);
                // Not answered within the spin: the reader thread takes over.
                self.wake_reader();
                (id, done_rx)
            }
            Err(_) => {
                // Another caller (or the reader) owns the ring: it completes
                // our call through the pending table. Polling callers make
                // the reader stand back; the last one out wakes it.
                let polling = Poller::enter(self);
                let (done_tx, mut done_rx) = oneshot::channel();
                let id = {
                    let mut tx = lock(&self.tx);
                    let id = tx.open_stream();
                    self.register(id, Waiter::Task(done_tx));
                    if let Err(e) = send(&mut tx, id, payload) {
                        drop(tx);
                        self.take(id);
                        return Started::Done(Err(e));
                    }
                    id
                };
                // Spinning pays only while few callers wait: with many in
                // flight, spinners would take the threads their answers are
                // delivered on (and the other callers' work) away.
                if polling.may_spin() {
                    if let Some(result) = self.poll_shared(&mut done_rx, &mut due, spin) {
                        return Started::Done(result);
                    }
                }
                drop(polling);
                (id, done_rx)
            }
        };
        Started::Waiting(Waiting {
            abandon: Abandon {
                conn: self,
                id,
                armed: true,
            },
            done,
            due,
            _in_flight: in_flight,
        })
    }

    /// The rest of a call [`start_call`](ClientConn::start_call) left
    /// waiting: its answer, or `DeadlineExceeded`.
    pub(crate) async fn finish_call(&self, waiting: Waiting<'_>) -> CallResult {
        // From here on the caller may give up (drop this future) or time
        // out: either way the call leaves the pending table (`abandon`) and
        // the server is told to stop working on it.
        let Waiting {
            mut abandon,
            mut done,
            mut due,
            _in_flight,
        } = waiting;
        let outcome = match due.absolute() {
            Some(d) => match tokio::time::timeout_at(d.instant().into(), &mut done).await {
                Ok(r) => r,
                Err(_) => {
                    drop(abandon);
                    return Err(Status::deadline_exceeded("no response before the deadline"));
                }
            },
            None => done.await,
        };
        abandon.armed = false;
        outcome.unwrap_or_else(|_| Err(gone_status()))
    }

    /// Polls the ring we own until the answer to `id` comes (completing
    /// other callers' answers on the way), the spin budget runs out or the
    /// deadline passes (`None` in the last two cases).
    fn poll_own(
        &self,
        rx: &mut LinkReceiver,
        id: u64,
        due: &mut Due,
        spin: Duration,
    ) -> Option<CallResult> {
        // One cheap round is a load and a pause: the clock (which takes
        // as long as a few dozen rounds) is read rarely.
        let mut spin = SpinBudget::new(spin, 1024);
        loop {
            // A cheap look first; the full receive (which also sees a
            // closed link) when something came, and every 1024 rounds.
            if !rx.has_data() && !spin.checks_now() {
                spin.round();
                std::hint::spin_loop();
                continue;
            }
            match rx.try_recv() {
                Ok(Some(msg)) => match self.deliver(&msg, Some(id)) {
                    Ok(None) => {}
                    Ok(Some(result)) => {
                        // Its space goes back after the next request is
                        // sent (or with the next receive), not on the way
                        // to the caller.
                        msg.release_later();
                        return Some(result);
                    }
                    Err(status) => return Some(Err(status)),
                },
                Ok(None) => {
                    if spin.spent(due) {
                        return None;
                    }
                    std::hint::spin_loop();
                }
                Err(e) => {
                    let status = self.fail(e);
                    return Some(Err(status));
                }
            }
        }
    }

    /// Waits for our pending answer while another thread owns the ring,
    /// taking the ring over if it is released.
    fn poll_shared(
        &self,
        done: &mut oneshot::Receiver<CallResult>,
        due: &mut Due,
        spin: Duration,
    ) -> Option<CallResult> {
        let mut spin = SpinBudget::new(spin, 64);
        loop {
            if let Ok(mut rx) = self.rx.try_lock() {
                self.drain(&mut rx);
            }
            match done.try_recv() {
                Ok(r) => return Some(r),
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => return Some(Err(gone_status())),
            }
            if spin.spent(due) {
                return None;
            }
            for _ in 0..8 {
                std::hint::spin_loop();
            }
        }
    }

    /// Completes every answer waiting in the ring. Returns false once the
    /// link failed (pending calls have been failed then).
    fn drain(&self, rx: &mut LinkReceiver) -> bool {
        loop {
            match rx.try_recv() {
                Ok(Some(msg)) => {
                    if self.deliver(&msg, None).is_err() {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    let _ = self.fail(e);
                    return false;
                }
            }
        }
    }

    /// Handles one answer frame: returns its result if it answers `own`,
    /// else hands it to the pending call it belongs to (if that still
    /// waits). A malformed frame fails the link: its status is the error.
    fn deliver(&self, msg: &[u8], own: Option<u64>) -> Result<Option<CallResult>, Status> {
        let Some((id, result)) = self.answer(msg) else {
            return Err(self.fail(RecvError::Protocol("malformed frame")));
        };
        if own == Some(id) {
            return Ok(Some(result));
        }
        if let Some(waiter) = self.take(id) {
            waiter.complete(self, result);
        }
        Ok(None)
    }

    /// Reads an answer frame: its stream and the call's result. `None` when
    /// the frame is malformed (the link must be dropped).
    fn answer(&self, msg: &[u8]) -> Option<(u64, CallResult)> {
        let (id, answer) = self.answer_ref(msg)?;
        Some((id, answer.into_result()))
    }

    /// Reads an answer frame without copying its payload: its stream and
    /// what it says. `None` when the frame is malformed (the link must be
    /// dropped).
    fn answer_ref<'m>(&self, msg: &'m [u8]) -> Option<(u64, AnswerRef<'m>)> {
        let frame = match FrameRef::decode(msg, &self.limits) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("dropping a link: the server sent a malformed frame: {e}");
                return None;
            }
        };
        let h = *frame.header();
        let answer = match h.kind {
            FrameKind::Response => match decode_metadata(frame.metadata(), &self.limits) {
                Ok(metadata) => AnswerRef::Response {
                    payload: frame.payload(),
                    metadata,
                },
                Err(e) => AnswerRef::Failed(Status::internal(format!(
                    "malformed response metadata: {e}"
                ))),
            },
            FrameKind::Error => {
                AnswerRef::Failed(Status::decode(frame.payload()).unwrap_or_else(|e| {
                    Status::internal(format!("malformed error status from the server: {e}"))
                }))
            }
            other => AnswerRef::Failed(Status::internal(format!(
                "unexpected {} frame in answer to a request",
                other.as_str()
            ))),
        };
        Some((h.stream_id.0, answer))
    }

    /// Marks the link dead and fails every pending call with the reason,
    /// which it returns.
    fn fail(&self, reason: RecvError) -> Status {
        self.alive.store(false, Ordering::Release);
        let status = match reason {
            RecvError::Ring(RingError::Closed) => {
                Status::unavailable("the instance closed the link")
            }
            RecvError::Ring(RingError::PeerGone) => Status::unavailable("the instance died"),
            other => Status::unavailable(format!("link to the instance failed: {other}")),
        };
        let waiters: Vec<_> = {
            let mut pending = lock(&self.pending);
            self.pending_len.store(0, Ordering::Release);
            pending.earliest = None;
            pending.calls.drain()
        };
        for w in waiters {
            w.complete(self, Err(status.clone()));
        }
        status
    }

    /// Sends a one-way message.
    pub(crate) fn send_oneway(&self, payload: &[u8], metadata: &Metadata) -> Result<(), Status> {
        self.send_unanswered(FrameKind::OneWay, &encode_metadata(metadata), payload)
    }

    /// Sends a Publish frame (its metadata carries the topic).
    pub(crate) fn send_publish(&self, metadata: &[u8], payload: &[u8]) -> Result<(), Status> {
        self.send_unanswered(FrameKind::Publish, metadata, payload)
    }

    /// Sends a frame on a fresh stream that gets no answer.
    fn send_unanswered(
        &self,
        kind: FrameKind,
        metadata: &[u8],
        payload: &[u8],
    ) -> Result<(), Status> {
        if !self.is_alive() {
            return Err(Status::unavailable("the instance is gone"));
        }
        check_frame(&self.limits, metadata, payload)?;
        let mut tx = lock(&self.tx);
        let id = tx.open_stream();
        send_frame(
            &mut tx.sender,
            FrameHeader::new(kind, StreamId(id)),
            metadata,
            payload,
            Patience::DEFAULT,
        )
        .map_err(send_status)
    }

    /// Adds a call to the pending table.
    fn register(&self, id: u64, waiter: Waiter) {
        self.register_all([(id, waiter)]);
    }

    /// [`register`](ClientConn::register)s each call under one lock.
    fn register_all(&self, calls: impl IntoIterator<Item = (u64, Waiter)>) {
        let mut pending = lock(&self.pending);
        let mut sooner = false;
        for (id, waiter) in calls {
            if let Waiter::Callback(Callback {
                deadline: Some(d), ..
            }) = &waiter
            {
                if pending.earliest.is_none_or(|e| *d < e) {
                    pending.earliest = Some(*d);
                    sooner = true;
                }
            }
            pending.calls.insert(id, waiter);
        }
        if sooner {
            self.sooner.store(true, Ordering::Release);
        }
        self.pending_len
            .store(pending.calls.len(), Ordering::Release);
        drop(pending);
        if sooner {
            // The reader may sleep until a later deadline (or for its whole
            // slice): it wakes, sees `sooner` and waits again until ours.
            self.interrupt.interrupt();
            if self.driven.load(Ordering::Acquire) {
                // Standing by, it naps instead.
                self.wake_reader();
            }
        }
    }

    /// Takes a call out of the pending table.
    fn take(&self, id: u64) -> Option<Waiter> {
        self.take_calls(|calls| calls.remove(id))
    }

    /// Runs `take` on the pending table under its lock (once for any
    /// number of calls taken out), keeping `pending_len` in step.
    fn take_calls<R>(&self, take: impl FnOnce(&mut CallTable) -> R) -> R {
        let mut pending = lock(&self.pending);
        let taken = take(&mut pending.calls);
        self.pending_len
            .store(pending.calls.len(), Ordering::Release);
        taken
    }

    /// Makes `sink` the receiver of this link's token calls' answers (it
    /// stays the first one set: a link serves one mesh handle).
    pub(crate) fn set_sink(&self, sink: &Arc<dyn AnswerSink>) {
        if self.sink.get().is_none() {
            let _ = self.sink.set(sink.clone());
        }
    }

    /// Notes that callback calls are made on this link, and gives what a
    /// callback call due per `due` is sent with: its request's header (its
    /// stream id still to set), its patience for ring space, and the
    /// instant its deadline passes.
    fn callback_request(&self, due: &mut Due) -> (FrameHeader, Patience, Option<Instant>) {
        if !self.callbacks.load(Ordering::Relaxed) {
            self.callbacks.store(true, Ordering::Relaxed);
        }
        let header = FrameHeader {
            deadline_us: due.wire(),
            ..FrameHeader::new(FrameKind::Request, StreamId(0))
        };
        (
            header,
            due.patience(),
            due.absolute().map(Deadline::instant),
        )
    }

    /// [`call_then`](ClientConn::call_then) for many token calls at once
    /// (`calls`: each payload with its token), all with the same metadata
    /// and due: their streams are opened, registered and sent under one
    /// lock of each table, and the reader is woken once.
    pub(crate) fn call_tokens_then<'a>(
        &self,
        calls: impl IntoIterator<Item = (&'a [u8], u64)>,
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
    ) {
        let calls = calls.into_iter();
        if !self.is_alive() {
            for (_, token) in calls {
                Done::Token(token).finish(self, Err(Status::unavailable("the instance is gone")));
            }
            return;
        }
        let md = encode_metadata(metadata);
        let (header, patience, deadline) = self.callback_request(&mut due);
        // Finished once the locks are given back: those refused at once,
        // and those whose request could not be sent.
        let mut refused: Vec<(u64, Status)> = Vec::new();
        let mut unsent: Vec<(u64, Status)> = Vec::new();
        let mut sent = 0usize;
        {
            let mut tx = lock(&self.tx);
            let mut streams = Vec::with_capacity(calls.size_hint().0);
            for (payload, token) in calls {
                match check_frame(&self.limits, &md, payload) {
                    Ok(()) => streams.push((tx.open_stream(), payload, token)),
                    Err(status) => refused.push((token, status)),
                }
            }
            if balanced {
                self.in_flight.fetch_add(streams.len(), Ordering::Relaxed);
            }
            self.register_all(streams.iter().map(|&(id, _, token)| {
                let waiter = Waiter::Callback(Callback {
                    done: Done::Token(token),
                    deadline,
                    balanced,
                });
                (id, waiter)
            }));
            for (id, payload, _) in streams {
                let header = FrameHeader {
                    stream_id: StreamId(id),
                    ..header
                };
                match send_frame(&mut tx.sender, header, &md, payload, patience) {
                    Ok(()) => sent += 1,
                    Err(e) => unsent.push((id, send_status(e))),
                }
            }
        }
        for (token, status) in refused {
            Done::Token(token).finish(self, Err(status));
        }
        for (id, status) in unsent {
            if let Some(w) = self.take(id) {
                w.complete(self, Err(status));
            }
        }
        if sent > 0
            && self.pollers.load(Ordering::Acquire) == 0
            && !self.driven.load(Ordering::Acquire)
        {
            self.wake_reader();
        }
    }

    /// Sends a request whose answer goes to `done`, called on the thread
    /// that reads the answer (or on this one if the call fails at once).
    /// The link's reader thread enforces the deadline. `balanced`: as in
    /// [`call`](ClientConn::call).
    pub(crate) fn call_then(
        &self,
        payload: &[u8],
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
        done: Done,
    ) {
        if !self.is_alive() {
            return done.finish(self, Err(Status::unavailable("the instance is gone")));
        }
        let md = encode_metadata(metadata);
        if let Err(status) = check_frame(&self.limits, &md, payload) {
            return done.finish(self, Err(status));
        }
        let (header, patience, deadline) = self.callback_request(&mut due);
        if balanced {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let waiter = Waiter::Callback(Callback {
            done,
            deadline,
            balanced,
        });
        let sent = {
            let mut tx = lock(&self.tx);
            let id = tx.open_stream();
            self.register(id, waiter);
            let header = FrameHeader {
                stream_id: StreamId(id),
                ..header
            };
            send_frame(&mut tx.sender, header, &md, payload, patience)
                .map_err(|e| (id, send_status(e)))
        };
        match sent {
            Ok(()) => {
                // The reader delivers the answer unless a caller polls or
                // an answer driver receives for this link.
                if self.pollers.load(Ordering::Acquire) == 0 && !self.driven.load(Ordering::Acquire)
                {
                    self.wake_reader();
                }
            }
            Err((id, status)) => {
                if let Some(w) = self.take(id) {
                    w.complete(self, Err(status));
                }
            }
        }
    }

    /// When the earliest deadline of a callback call has passed, fails the
    /// callback calls past their deadline (telling the server to stop).
    /// Returns the earliest deadline still pending.
    fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let expired: Vec<(u64, Waiter)> = {
            let mut pending = lock(&self.pending);
            match pending.earliest {
                Some(e) if e <= now => {}
                other => return other,
            }
            let ids: Vec<u64> = pending
                .calls
                .iter()
                .filter_map(|(id, w)| match w {
                    Waiter::Callback(Callback {
                        deadline: Some(d), ..
                    }) if *d <= now => Some(id),
                    _ => None,
                })
                .collect();
            let expired = ids
                .into_iter()
                .filter_map(|id| pending.calls.remove(id).map(|w| (id, w)))
                .collect();
            pending.earliest = pending
                .calls
                .iter()
                .filter_map(|(_, w)| match w {
                    Waiter::Callback(c) => c.deadline,
                    Waiter::Task(_) => None,
                })
                .min();
            self.pending_len
                .store(pending.calls.len(), Ordering::Release);
            expired
        };
        for (id, w) in expired {
            self.cancel(id);
            w.complete(
                self,
                Err(Status::deadline_exceeded("no response before the deadline")),
            );
        }
        lock(&self.pending).earliest
    }

    /// Tells the server to stop working on `id` (best effort).
    fn cancel(&self, id: u64) {
        let _ = send_frame(
            &mut lock(&self.tx).sender,
            FrameHeader::new(FrameKind::Cancel, StreamId(id)),
            &[],
            &[],
            Patience::For(Duration::ZERO),
        );
    }

    fn wake_reader(&self) {
        if let Some(t) = self.reader.get() {
            t.unpark();
        }
    }

    /// Makes an [`AnswerDriver`] the receiver of this link's answers.
    /// Returns false if one already is.
    fn claim(&self) -> bool {
        if self.driven.load(Ordering::Relaxed) || self.driven.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.was_driven.store(true, Ordering::Relaxed);
        // SYNC: SeqCst pairs with the reader's store of `asleep` and load of
        // `driven` before it parks: either it sees the claim and stands by,
        // or we see it asleep and wake it (a parked reader could not
        // receive for a driver that stops polling).
        if self.asleep.load(Ordering::SeqCst) {
            self.wake_reader();
        }
        true
    }

    /// Gives the link's answers back to its reader thread.
    fn hand_back(&self) {
        self.driven.store(false, Ordering::SeqCst);
        // A reader standing by notices within a nap; calls still pending
        // need it at once.
        if self.pending_len.load(Ordering::Acquire) > 0 {
            self.wake_reader();
        }
    }

    /// Receives up to `max` answers on the calling thread (an
    /// [`AnswerDriver`]'s), completing their calls there: the token calls'
    /// through `local` if given (their payloads still in the ring), every
    /// other call as it waits. Also says how many answers it took.
    fn drive(&self, max: usize, mut local: Option<&mut Local<'_>>) -> (AnswerDrive, usize) {
        self.polled.store(true, Ordering::Release);
        // Held by a caller polling, or by the reader receiving for us: it
        // completes the calls it finds; we look again next time.
        let Some(mut rx) = try_lock(&self.rx) else {
            return (AnswerDrive::More, 0);
        };
        // The answers found are matched with their calls under one lock of
        // the pending table: those for `local` are handed to it there, the
        // others completed once the lock is let go.
        let mut others = Vec::new();
        let mut failed = None;
        let mut outcome = AnswerDrive::More;
        let mut taken = 0;
        {
            let mut pending = lock(&self.pending);
            while taken < max {
                let msg = match rx.try_recv() {
                    Ok(Some(msg)) => msg,
                    Ok(None) => {
                        outcome = AnswerDrive::Empty;
                        break;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                let Some((id, answer)) = self.answer_ref(&msg) else {
                    failed = Some(RecvError::Protocol("malformed frame"));
                    break;
                };
                taken += 1;
                match (pending.calls.remove(id), local.as_deref_mut()) {
                    // Given up on (timed out) before the answer came.
                    (None, _) => {}
                    (
                        Some(Waiter::Callback(Callback {
                            done: Done::Token(token),
                            balanced,
                            ..
                        })),
                        Some(local),
                    ) => {
                        if balanced {
                            self.in_flight.fetch_sub(1, Ordering::Relaxed);
                        }
                        local(
                            token,
                            match answer {
                                AnswerRef::Response { payload, .. } => Ok(payload),
                                AnswerRef::Failed(status) => Err(status),
                            },
                        );
                    }
                    (Some(waiter), _) => others.push((waiter, answer.into_result())),
                }
            }
            self.pending_len
                .store(pending.calls.len(), Ordering::Release);
        }
        for (waiter, result) in others {
            waiter.complete(self, result);
        }
        match failed {
            Some(reason) => {
                // After the answers that came before it.
                let _ = self.fail(reason);
                (AnswerDrive::Closed, taken)
            }
            None => (outcome, taken),
        }
    }

    /// Whether answers wait in the ring (true while another thread holds
    /// it: that one may be receiving).
    fn has_answers(&self) -> bool {
        try_lock(&self.rx).is_none_or(|rx| rx.has_data())
    }
}

/// Receives the answers to callback calls ([`Mesh::call_then`]) and token
/// calls ([`Mesh::call_token`]) on the thread that owns it, instead of on
/// the links' reader threads: an event loop that polls it at every turn
/// takes its answers in with no hand-off between threads, and no wake-up
/// while it is busy.
///
/// Made by [`Mesh::drive_answers`]. A link becomes the driver's when a
/// callback call is made on it; the driver gives it back to its reader
/// thread once it finds it empty at two polls in a row, or for longer (see
/// [`set_hold`](AnswerDriver::set_hold)) while calls are pending (the reader then
/// waits on the ring, and its callbacks run there as without a driver). A
/// reader whose link the driver has watches the driver: if it leaves the
/// link unpolled for 2 ms (the thread is busy elsewhere, or blocked), the
/// reader receives for it until it polls again, so answers never wait on a
/// busy thread and a peer is never held up by a full ring. Dropping the
/// driver gives every link back.
///
/// [`Mesh::call_then`]: crate::Mesh::call_then
/// [`Mesh::call_token`]: crate::Mesh::call_token
/// [`Mesh::drive_answers`]: crate::Mesh::drive_answers
pub struct AnswerDriver {
    claims: Arc<Claims>,
    /// Polled at every [`poll`](AnswerDriver::poll).
    busy: Vec<Arc<ClientConn>>,
    /// Came up empty (at the instant kept with each): looked at again at
    /// every poll, and given back once empty for `hold` (at once if no call
    /// is pending on it).
    resting: Vec<(Arc<ClientConn>, Instant)>,
    /// How long a link may stay empty before it is given back.
    hold: Duration,
}

impl std::fmt::Debug for AnswerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerDriver")
            .field("links", &(self.busy.len() + self.resting.len()))
            .finish_non_exhaustive()
    }
}

/// What one poll of a link by an [`AnswerDriver`] found.
enum AnswerDrive {
    /// The most answers one poll takes were taken; more may wait.
    More,
    /// Every answer that had come was taken; the ring is empty.
    Empty,
    /// The link failed (its calls have been failed).
    Closed,
}

/// The receiver of a token call's answer as [`AnswerDriver::poll_with`]
/// takes it.
type Local<'a> = dyn FnMut(u64, Result<&[u8], Status>) + 'a;

/// Links claimed for an [`AnswerDriver`] since its last poll, and where the
/// answers to its handle's token calls go.
#[derive(Default)]
pub(crate) struct Claims {
    list: Mutex<ClaimList>,
    /// `!list.conns.is_empty()`, readable without the lock.
    any: AtomicBool,
    /// Set if the driver was made with a sink ([`Mesh::drive_answers_with`]).
    ///
    /// [`Mesh::drive_answers_with`]: crate::Mesh::drive_answers_with
    pub(crate) sink: Option<Arc<dyn AnswerSink>>,
}

#[derive(Default)]
struct ClaimList {
    closed: bool,
    conns: Vec<Arc<ClientConn>>,
}

impl Claims {
    pub(crate) fn new(sink: Option<Arc<dyn AnswerSink>>) -> Claims {
        Claims {
            sink,
            ..Claims::default()
        }
    }

    /// Makes the driver the receiver of `conn`'s answers (a callback call
    /// is about to be made on it), unless it already is.
    pub(crate) fn claim(&self, conn: &Arc<ClientConn>) {
        self.claim_for(conn, 1);
    }

    /// [`claim`](Claims::claim) for `calls` calls about to be made at once.
    pub(crate) fn claim_for(&self, conn: &Arc<ClientConn>, calls: usize) {
        // A lone call is left to the reader: the thread that makes it may
        // well go to sleep until its answer, and the reader, woken now,
        // waits on the ring while the request travels. Calls made while
        // others are in flight are the driver's.
        let lone = calls <= 1 && conn.pending_len.load(Ordering::Relaxed) == 0;
        if lone || !conn.claim() {
            return;
        }
        let mut list = lock(&self.list);
        if list.closed {
            drop(list);
            conn.hand_back();
            return;
        }
        list.conns.push(conn.clone());
        self.any.store(true, Ordering::Release);
    }
}

impl AnswerDriver {
    pub(crate) fn new(claims: Arc<Claims>) -> AnswerDriver {
        AnswerDriver {
            claims,
            busy: Vec::new(),
            resting: Vec::new(),
            hold: Duration::ZERO,
        }
    }

    /// Receives the answers waiting on the links the driver has (at most
    /// `max` per link), completing their calls on this thread. Returns
    /// whether the driver still has links: poll again soon then (their
    /// readers stand by).
    pub fn poll(&mut self, max: usize) -> bool {
        self.poll_links(max, None)
    }

    /// Like [`poll`](AnswerDriver::poll), but hands the answers of token
    /// calls ([`Mesh::call_token`]) to `on_answer` instead of the answer
    /// sink: the call's token and its reply's payload, borrowed from the
    /// ring (its metadata is checked, not kept), or the status it failed
    /// with. No copy, no allocation. `max` bounds the answers of this poll
    /// in all, across links. `on_answer` runs while the link's table of
    /// pending calls is locked: it must not call into the mesh.
    ///
    /// [`Mesh::call_token`]: crate::Mesh::call_token
    pub fn poll_with(
        &mut self,
        max: usize,
        mut on_answer: impl FnMut(u64, Result<&[u8], Status>),
    ) -> bool {
        self.poll_links(max, Some(&mut on_answer))
    }

    /// [`poll`](AnswerDriver::poll) (`local` unset: `max` answers per link)
    /// or [`poll_with`](AnswerDriver::poll_with) (`max` in all).
    fn poll_links(&mut self, max: usize, mut local: Option<&mut Local<'_>>) -> bool {
        if !self.resting.is_empty() {
            let now = Instant::now();
            let (busy, hold) = (&mut self.busy, self.hold);
            self.resting.retain(|(c, since)| {
                let alive = c.is_alive();
                if alive && c.has_answers() {
                    busy.push(c.clone());
                    false
                } else if !alive
                    || c.pending_len.load(Ordering::Acquire) == 0
                    || now.duration_since(*since) >= hold
                {
                    // Gone, nothing to wait for, or waited long enough.
                    c.hand_back();
                    false
                } else {
                    // Looked at again next time.
                    c.polled.store(true, Ordering::Release);
                    true
                }
            });
        }
        if self.claims.any.load(Ordering::Acquire) {
            let mut list = lock(&self.claims.list);
            self.claims.any.store(false, Ordering::Relaxed);
            self.busy.append(&mut list.conns);
        }
        let in_all = local.is_some();
        let mut budget = max;
        let resting = &mut self.resting;
        let mut now = None;
        self.busy.retain(|c| {
            if budget == 0 && in_all {
                // Polled first next time.
                return true;
            }
            let (drive, taken) = c.drive(budget, local.as_deref_mut());
            if in_all {
                budget -= taken;
            }
            match drive {
                AnswerDrive::More => true,
                AnswerDrive::Empty => {
                    resting.push((c.clone(), *now.get_or_insert_with(Instant::now)));
                    false
                }
                AnswerDrive::Closed => {
                    c.hand_back();
                    false
                }
            }
        });
        !self.busy.is_empty() || !self.resting.is_empty()
    }

    /// Keeps a link that came up empty, with calls still pending on it,
    /// for `hold` before giving it back to its reader (looking at it at
    /// every poll meanwhile): a thread that polls often then takes answers
    /// that come within `hold` itself, instead of the reader handing them
    /// over (which wakes it). Without this (and for a link with no call
    /// pending), a link is given back at the next poll that finds it still
    /// empty.
    pub fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    /// Whether the driver has no link: polling it does nothing until a
    /// call is made.
    pub fn is_idle(&self) -> bool {
        self.busy.is_empty() && self.resting.is_empty() && !self.claims.any.load(Ordering::Acquire)
    }

    /// Gives every link back to its reader and claims no more: later
    /// callback calls are answered on the readers' threads.
    pub fn close(&mut self) {
        {
            let mut list = lock(&self.claims.list);
            list.closed = true;
            self.claims.any.store(false, Ordering::Relaxed);
            self.busy.append(&mut list.conns);
        }
        for c in self
            .busy
            .drain(..)
            .chain(self.resting.drain(..).map(|(c, _)| c))
        {
            c.hand_back();
        }
    }
}

impl Drop for AnswerDriver {
    fn drop(&mut self) {
        self.close();
    }
}

fn gone_status() -> Status {
    Status::unavailable("the instance went away during the call")
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        // Lets the reader thread notice that the connection is gone.
        self.alive.store(false, Ordering::Release);
        self.wake_reader();
    }
}

/// How [`ClientConn::start_call`] left a call.
pub(crate) enum Started<'a> {
    /// Answered (or failed) already.
    Done(CallResult),
    /// Sent, the answer still to come: see [`ClientConn::finish_call`].
    Waiting(Waiting<'a>),
}

/// A call sent whose answer is still to come.
pub(crate) struct Waiting<'a> {
    abandon: Abandon<'a>,
    done: oneshot::Receiver<CallResult>,
    due: Due,
    _in_flight: Option<Counted<'a>>,
}

/// A call still waiting for its answer: if dropped armed (the caller gave
/// up), it takes the call out of the pending table and sends Cancel, unless
/// the answer came meanwhile.
struct Abandon<'a> {
    conn: &'a ClientConn,
    id: u64,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.armed && self.conn.take(self.id).is_some() {
            self.conn.cancel(self.id);
        }
    }
}

/// How long a caller polls: the clock is first read after a while, so a
/// quick answer costs no clock read at all.
struct SpinBudget {
    spin: Duration,
    end: Option<Instant>,
    round: u32,
    /// Rounds per clock read.
    every: u32,
}

impl SpinBudget {
    fn new(spin: Duration, every: u32) -> SpinBudget {
        SpinBudget {
            spin,
            end: None,
            round: 0,
            every,
        }
    }

    /// Counts a round that checks nothing.
    fn round(&mut self) {
        self.round = self.round.wrapping_add(1);
    }

    /// Whether the next [`spent`](SpinBudget::spent) reads the clock.
    fn checks_now(&self) -> bool {
        self.round.wrapping_add(1) % self.every == 0
    }

    /// Whether polling should stop: the budget or the call's deadline is
    /// reached (checks the clock every `every` rounds).
    fn spent(&mut self, due: &mut Due) -> bool {
        self.round = self.round.wrapping_add(1);
        if self.round % self.every != 0 {
            return false;
        }
        let now = Instant::now();
        let end = match self.end {
            Some(end) => end,
            None => {
                due.start.get_or_insert(now);
                let spin_end = now.checked_add(self.spin).unwrap_or_else(far_future);
                let end = due
                    .absolute()
                    .map_or(spin_end, |d| spin_end.min(d.instant()));
                *self.end.insert(end)
            }
        };
        now >= end
    }
}

/// How many callers besides the one owning the receive ring may spin for
/// their answers at once; the others wait to be woken at once.
const MAX_SHARED_SPINNERS: usize = 1;

/// A caller polling the receive ring; the last one leaving wakes the
/// reader if calls are still pending.
struct Poller<'a> {
    conn: &'a ClientConn,
    /// Pollers before this one.
    ahead: usize,
}

impl<'a> Poller<'a> {
    fn enter(conn: &'a ClientConn) -> Poller<'a> {
        let ahead = conn.pollers.fetch_add(1, Ordering::AcqRel);
        Poller { conn, ahead }
    }

    /// Whether this caller may spin for its answer (few others do).
    fn may_spin(&self) -> bool {
        self.ahead < MAX_SHARED_SPINNERS
    }
}

impl Drop for Poller<'_> {
    fn drop(&mut self) {
        // The last poller out hands over to the reader if any call still
        // waits (a caller that gives up polling is still pending here).
        if self.conn.pollers.fetch_sub(1, Ordering::AcqRel) == 1
            && self.conn.pending_len.load(Ordering::Acquire) > 0
        {
            self.conn.wake_reader();
        }
    }
}

/// Calls waiting for their answers, by stream id.
#[derive(Default)]
struct PendingCalls {
    calls: CallTable,
    /// No callback call's deadline is earlier (it may be earlier than all
    /// of them: answered calls do not move it).
    earliest: Option<Instant>,
}

/// Pending calls by stream id: a table indexed by the id itself. Ids are
/// handed out in sequence, so the calls in flight sit in neighbouring slots:
/// adding and removing one hashes nothing and touches a line or two that
/// the calls before it touched too. A call still waiting when a newer id
/// comes to its slot (the table wrapped around it) puts the newer one in an
/// overflow map.
#[derive(Default)]
struct CallTable {
    /// A power of two long (or empty until the first call).
    slots: Vec<Option<(u64, Waiter)>>,
    overflow: FxHashMap<u64, Waiter>,
    len: usize,
}

/// The table's first size, and the largest it grows to (it doubles while
/// more than half as many calls as slots are pending).
const CALL_SLOTS_MIN: usize = 64;
const CALL_SLOTS_MAX: usize = 1 << 14;

impl CallTable {
    fn len(&self) -> usize {
        self.len
    }

    fn slot(&self, id: u64) -> usize {
        // Client stream ids are odd: consecutive ids, consecutive slots.
        (id >> 1) as usize & (self.slots.len() - 1)
    }

    fn insert(&mut self, id: u64, waiter: Waiter) {
        if self.slots.is_empty() {
            self.slots.resize_with(CALL_SLOTS_MIN, || None);
        } else if self.len >= self.slots.len() / 2 && self.slots.len() < CALL_SLOTS_MAX {
            self.grow();
        }
        self.place(id, waiter);
        self.len += 1;
    }

    /// Puts a call in its slot, or in the overflow map if that is taken.
    fn place(&mut self, id: u64, waiter: Waiter) {
        let i = self.slot(id);
        if self.slots[i].is_none() {
            self.slots[i] = Some((id, waiter));
        } else {
            self.overflow.insert(id, waiter);
        }
    }

    fn grow(&mut self) {
        let size = self.slots.len() * 2;
        let old = std::mem::take(&mut self.slots);
        self.slots.resize_with(size, || None);
        let overflow = std::mem::take(&mut self.overflow);
        for (id, waiter) in old.into_iter().flatten().chain(overflow) {
            self.place(id, waiter);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Waiter> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.slot(id);
        let waiter = match &self.slots[i] {
            Some((held, _)) if *held == id => self.slots[i].take().map(|(_, w)| w),
            _ if self.overflow.is_empty() => None,
            _ => self.overflow.remove(&id),
        };
        if waiter.is_some() {
            self.len -= 1;
        }
        waiter
    }

    /// Every pending call, by id (in no particular order).
    fn iter(&self) -> impl Iterator<Item = (u64, &Waiter)> {
        let slots = self.slots.iter().flatten().map(|(id, w)| (*id, w));
        slots.chain(self.overflow.iter().map(|(id, w)| (*id, w)))
    }

    /// Takes every pending call out.
    fn drain(&mut self) -> Vec<Waiter> {
        self.len = 0;
        let slots = self
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .map(|(_, w)| w);
        let mut all: Vec<Waiter> = slots.collect();
        all.extend(self.overflow.drain().map(|(_, w)| w));
        all
    }
}

/// Who gets a pending call's answer.
enum Waiter {
    /// A calling task.
    Task(oneshot::Sender<CallResult>),
    /// A callback ([`ClientConn::call_then`]).
    Callback(Callback),
}

/// A call answered through a callback.
struct Callback {
    done: Done,
    deadline: Option<Instant>,
    /// Counted in [`ClientConn::in_flight`].
    balanced: bool,
}

/// Where a callback call's answer goes.
pub(crate) enum Done {
    /// A function of the caller's ([`Mesh::call_then`](crate::Mesh::call_then)).
    Call(Box<dyn FnOnce(CallResult) + Send>),
    /// The answer sink of the caller's mesh handle, named by the caller's
    /// token ([`Mesh::call_token`](crate::Mesh::call_token)).
    Token(u64),
}

impl Done {
    /// Hands `result` over.
    fn finish(self, conn: &ClientConn, result: CallResult) {
        match self {
            Done::Call(f) => f(result),
            Done::Token(token) => {
                // Set before any token call is made on the link.
                if let Some(sink) = conn.sink.get() {
                    sink.answer(token, result);
                }
            }
        }
    }
}

impl Waiter {
    /// Hands `result` to whoever waits.
    fn complete(self, conn: &ClientConn, result: CallResult) {
        match self {
            Waiter::Task(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Callback(c) => {
                if c.balanced {
                    conn.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
                c.done.finish(conn, result);
            }
        }
    }
}

/// The sending half of a client link and its stream numbering.
struct TxState {
    sender: LinkSender,
    /// The next stream id: client-opened streams use odd ids.
    next_stream: u64,
}

impl TxState {
    /// Takes a fresh stream id.
    fn open_stream(&mut self) -> u64 {
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(2);
        id
    }
}

/// Counts one in `count` until dropped (a call in flight, a task waiting
/// for a permit). SeqCst: a waiter's count pairs with [`Permits::give`].
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(count: &'a AtomicUsize) -> Counted<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a reader that delivered callback calls' answers waits on the
/// ring for more once none is pending, before it parks.
const READER_LINGER: Duration = Duration::from_millis(1);

/// How long an [`AnswerDriver`] may leave a link it has unpolled before the
/// link's reader receives for it; also the reader's nap while it stands by.
const DRIVER_STUCK_AFTER: Duration = Duration::from_millis(2);

/// Naps ([`DRIVER_STUCK_AFTER`] each) an idle reader of a link an
/// [`AnswerDriver`] has had takes before it parks with no timeout: while
/// calls keep coming, claiming the link again wakes nobody.
const IDLE_NAPS: u32 = 25;

/// The fallback reader: while calls are pending and no caller polls, it
/// waits on the ring and completes responses; otherwise it stays parked
/// (after answering callback calls, once [`READER_LINGER`] passed with none
/// pending). While an [`AnswerDriver`] has the link it stands by
/// ([`stand_by`]).
fn client_reader(conn: Weak<ClientConn>) {
    let mut delivered = 0u32;
    let mut naps = 0u32;
    // Set while the reader delivers the answers of callback calls: once
    // none is pending, it waits on the ring a while longer.
    let mut linger = false;
    loop {
        {
            let Some(c) = conn.upgrade() else { return };
            c.asleep.store(false, Ordering::Relaxed);
            let mut earliest = c.expire();
            loop {
                if !c.is_alive() {
                    return;
                }
                if c.driven.load(Ordering::Acquire) {
                    naps = 0;
                    if !stand_by(&c, &mut earliest) {
                        return;
                    }
                    continue;
                }
                if c.pollers.load(Ordering::Acquire) > 0 {
                    break;
                }
                let pending = c.pending_len.load(Ordering::Acquire) > 0;
                // After answering callback calls, the reader waits on the
                // ring a while longer once none is pending: callback calls
                // come one after another, and the next one's answer is
                // taken by a reader still waiting, so the call wakes nobody.
                if !pending && !std::mem::take(&mut linger) {
                    break;
                }
                naps = 0;
                let check = {
                    let mut rx = lock(&c.rx);
                    let now = Instant::now();
                    let until = if pending {
                        let slice = now + READER_SLICE;
                        earliest.map_or(slice, |e| e.min(slice))
                    } else {
                        now + READER_LINGER
                    };
                    match rx.recv(Some(until)) {
                        Ok(msg) => {
                            if c.deliver(&msg, None).is_err() {
                                return;
                            }
                            linger = c.callbacks.load(Ordering::Relaxed);
                            // Deadlines are checked every so many answers,
                            // and whenever the ring stays empty until one.
                            delivered = delivered.wrapping_add(1);
                            earliest.is_some() && delivered % 64 == 0
                        }
                        Err(RecvError::TimedOut) => pending,
                        Err(e) => {
                            let _ = c.fail(e);
                            return;
                        }
                    }
                };
                if check
                    || (c.sooner.load(Ordering::Relaxed) && c.sooner.swap(false, Ordering::AcqRel))
                {
                    earliest = c.expire();
                }
            }
            if c.was_driven.load(Ordering::Relaxed) && naps < IDLE_NAPS {
                naps += 1;
                drop(c);
                std::thread::park_timeout(DRIVER_STUCK_AFTER);
                continue;
            }
            // SYNC: see `ClientConn::claim`.
            c.asleep.store(true, Ordering::SeqCst);
            if c.driven.load(Ordering::SeqCst) {
                continue;
            }
        }
        std::thread::park();
    }
}

/// The reader's part while an [`AnswerDriver`] has its link: it naps, keeps
/// the callback calls' deadlines, and receives for the driver while that
/// leaves the link unpolled for [`DRIVER_STUCK_AFTER`] or more. Returns
/// once the driver gives the link back (true), or the link failed (false).
fn stand_by(c: &ClientConn, earliest: &mut Option<Instant>) -> bool {
    c.polled.store(false, Ordering::Release);
    let mut seen = Instant::now();
    loop {
        let nap = earliest.map_or(DRIVER_STUCK_AFTER, |e| {
            e.saturating_duration_since(Instant::now())
                .min(DRIVER_STUCK_AFTER)
        });
        std::thread::park_timeout(nap);
        if !c.is_alive() {
            return false;
        }
        let now = Instant::now();
        if earliest.is_some_and(|e| e <= now) || c.sooner.swap(false, Ordering::AcqRel) {
            *earliest = c.expire();
        }
        if !c.driven.load(Ordering::Acquire) {
            return true;
        }
        if c.polled.swap(false, Ordering::AcqRel) {
            seen = now;
            continue;
        }
        if now.duration_since(seen) < DRIVER_STUCK_AFTER {
            continue;
        }
        // Not polled for a while: receive until the driver polls again.
        // Held by a caller polling: it completes what it finds.
        let Some(mut rx) = try_lock(&c.rx) else {
            continue;
        };
        while !c.polled.load(Ordering::Acquire) && c.driven.load(Ordering::Acquire) {
            let slice = Instant::now() + DRIVER_STUCK_AFTER;
            match rx.recv(Some(earliest.map_or(slice, |e| e.min(slice)))) {
                Ok(msg) => {
                    if c.deliver(&msg, None).is_err() {
                        return false;
                    }
                }
                // A deadline, the slice's end, or a call registered with a
                // sooner deadline (which interrupts the wait).
                Err(RecvError::TimedOut) => {
                    if earliest.is_some_and(|e| e <= Instant::now())
                        || c.sooner.swap(false, Ordering::AcqRel)
                    {
                        *earliest = c.expire();
                    }
                }
                Err(e) => {
                    let _ = c.fail(e);
                    return false;
                }
            }
        }
        seen = Instant::now();
    }
}

/// Locks `m` unless another thread holds it (a poisoned lock is taken, as
/// by [`lock`]).
fn try_lock<T>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Locks `m`, also after a panic while it was held (the state guarded here
/// stays consistent: every critical section is a single map or ring step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Per-service state a server connection needs.
pub(crate) struct ServeCtx {
    pub(crate) handler: Handler,
    pub(crate) limits: Limits,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) permits: Permits,
    /// Requests being handled, across all connections (for draining).
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) drained: Arc<tokio::sync::Notify>,
    /// Set once somebody waits for `drained` (before it reads `in_flight`).
    pub(crate) draining: AtomicBool,
    /// One flag per live link: set while that link's thread runs a handler
    /// inline (those are not counted in `in_flight`, which costs two locked
    /// instructions per request; see [`ServeCtx::idle`]).
    pub(crate) links: Mutex<Vec<Arc<AtomicBool>>>,
    /// The service's name ([interned](crate::service::interned): requests
    /// refer to it).
    pub(crate) service: &'static commy_core::ServiceName,
}

impl ServeCtx {
    /// Whether no request is being handled: no handler runs inline on a
    /// link thread and none continues as a task.
    pub(crate) fn idle(&self) -> bool {
        // SYNC: the Acquire loads pair with the Release store that clears a
        // link's flag in `InlineBusy::drop`, made after a waiting handler
        // was counted in `in_flight`: a cleared flag means its handler is
        // done or counted, so `in_flight` is read after the flags.
        let inline = lock(&self.links)
            .iter()
            .any(|busy| busy.load(Ordering::Acquire));
        !inline && self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// A service's concurrency permits: a count taken and given back without
/// a lock (a request's permit is one compare-and-swap in and one add out),
/// and the tasks that wait for one.
pub(crate) struct Permits {
    free: AtomicUsize,
    /// Tasks waiting in [`take`](Permits::take).
    waiting: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Permits {
    /// `n` permits.
    pub(crate) fn new(n: usize) -> Permits {
        Permits {
            free: AtomicUsize::new(n),
            waiting: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Takes a permit if one is free; the caller gives it back with
    /// [`give`](Permits::give).
    pub(crate) fn try_take(&self) -> bool {
        // SYNC: SeqCst, for the re-check in `take` (see there).
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Waits for a permit (given back when the guard drops).
    pub(crate) async fn take(&self) -> Permit<'_> {
        loop {
            if self.try_take() {
                return Permit(self);
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before we count ourselves in: a `give` that sees
            // us waiting wakes a registered waiter.
            notified.as_mut().enable();
            // Counted until this task stops waiting (or is dropped).
            let _waiting = Counted::enter(&self.waiting);
            // SYNC: SeqCst with `give`: either it sees us counted (and
            // wakes a waiter), or this re-check sees its permit.
            if self.try_take() {
                return Permit(self);
            }
            notified.await;
        }
    }

    /// Takes up to `n` free permits at once (one compare-and-swap);
    /// returns how many were taken (0 when none is free). The caller gives
    /// them back with [`give_n`](Permits::give_n).
    pub(crate) fn try_take_up_to(&self, n: usize) -> usize {
        // SYNC: SeqCst, as in `try_take`.
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            let k = free.min(n);
            match self.free.compare_exchange_weak(
                free,
                free - k,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return k,
                Err(now) => free = now,
            }
        }
        0
    }

    /// Whether tasks wait for a permit.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Gives a permit back, waking a task that waits for one.
    pub(crate) fn give(&self) {
        self.give_n(1);
    }

    /// Gives `n` permits back at once, waking as many waiting tasks.
    pub(crate) fn give_n(&self, n: usize) {
        if n == 0 {
            return;
        }
        // SYNC: see `take`.
        self.free.fetch_add(n, Ordering::SeqCst);
        let waiting = self.waiting.load(Ordering::SeqCst);
        for _ in 0..waiting.min(n) {
            self.notify.notify_one();
        }
    }
}

/// A permit taken from [`Permits`], given back when dropped.
pub(crate) struct Permit<'a>(&'a Permits);

impl Permit<'_> {
    /// Hands the permit to `responder`, which gives it back once the
    /// request is answered or cancelled.
    fn into_responder(self, responder: &mut Responder) {
        std::mem::forget(self);
        responder.hold();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.give();
    }
}

/// A link thread running a handler inline: its flag is set until dropped.
/// Only that thread writes the flag, so plain stores do (no locked
/// instruction on the request path).
struct InlineBusy<'a>(&'a AtomicBool);

impl<'a> InlineBusy<'a> {
    fn enter(flag: &'a AtomicBool) -> InlineBusy<'a> {
        flag.store(true, Ordering::Relaxed);
        InlineBusy(flag)
    }
}

impl Drop for InlineBusy<'_> {
    fn drop(&mut self) {
        // SYNC: pairs with the Acquire loads in `ServeCtx::idle`.
        self.0.store(false, Ordering::Release);
    }
}

/// What one served link's requests share with it, in one allocation (a
/// request answered later holds the link with one reference): the link's
/// sending half, and the requests not answered inline, by stream id
/// (removing an entry marks the answer unwanted).
pub(crate) struct LinkShared {
    tx: Mutex<LinkSender>,
    running: Mutex<FxHashMap<u64, Pending>>,
    /// The [`PolledRequest`]s handed out and neither answered nor given up
    /// by their callers, by stream id (removing one releases what it holds:
    /// whoever removes it, the answer, a Cancel frame or the link closing).
    polled: Mutex<FxHashSet<u64>>,
    /// The service served (what polled requests release).
    ctx: Arc<ServeCtx>,
    /// Who is at the other end (every request of the link comes from it).
    caller: Caller,
}

impl LinkShared {
    /// Gives back `n` permits taken for [`PolledRequest`]s of this link
    /// (answered, given up, or never handed out) and their counts as
    /// requests in progress.
    fn release_polled(&self, n: usize) {
        self.ctx.permits.give_n(n);
        handled_n(&self.ctx, n);
    }
}

/// A request of [`LinkShared::running`].
pub(crate) enum Pending {
    /// Continuing as a task: `None` until its abort handle is filled in.
    Task(Option<tokio::task::AbortHandle>),
    /// With a deferred handler's [`Responder`](crate::Responder).
    Deferred(Arc<Shared>),
}

impl Pending {
    /// The caller gave up: stop the work.
    fn cancel(self) {
        match self {
            Pending::Task(Some(task)) => task.abort(),
            Pending::Task(None) => {}
            Pending::Deferred(shared) => shared.cancel(),
        }
    }
}

/// Where a deferred handler's answer goes on shared memory.
pub(crate) struct LinkAnswer {
    link: Arc<LinkShared>,
    limits: Limits,
    id: StreamId,
}

impl LinkAnswer {
    /// Writes the answer into the link, unless the caller gave up.
    pub(crate) fn answer(self, result: Result<Response, Status>) -> bool {
        let wanted = self.wanted();
        if wanted {
            reply(&self.link.tx, &self.limits, self.id, result);
        }
        wanted
    }

    /// Writes an answer of `payload` (and no metadata) into the link,
    /// unless the caller gave up.
    pub(crate) fn answer_payload(self, payload: &[u8]) -> bool {
        let wanted = self.wanted();
        if wanted {
            send_answer(&self.link.tx, &self.limits, self.id, Ok((&[], payload)));
        }
        wanted
    }

    /// Whether the caller still waits: takes the request out of the
    /// link's running ones.
    fn wanted(&self) -> bool {
        lock(&self.link.running).remove(&self.id.0).is_some()
    }
}

/// A request taken out of a driven link by
/// [`DrivenLink::poll_requests`], for its poller to answer once, now or
/// later, from any thread: the answer is written straight into the link.
/// Dropping it unanswered answers `Internal`.
///
/// Until answered it holds one of the service's concurrency permits and
/// counts as a request in progress (closing the service waits for it). A
/// two-way request is released earlier if the service learns that its
/// caller gave up (the caller's Cancel frame, sent when its deadline passes
/// or it cancels, or the link closing): its answer is then discarded. The
/// service enforces no deadline itself.
#[must_use = "dropping a polled request answers it INTERNAL"]
pub struct PolledRequest {
    /// `None` once answered.
    link: Option<Arc<LinkShared>>,
    id: StreamId,
    /// A one-way message: answering it only releases what it holds.
    one_way: bool,
}

impl std::fmt::Debug for PolledRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolledRequest")
            .field("stream", &self.id.0)
            .field("one_way", &self.one_way)
            .finish_non_exhaustive()
    }
}

impl PolledRequest {
    /// Answers with `payload` (and no metadata), or fails with a status
    /// (for a [one-way](PolledRequest::is_one_way) message, this only
    /// releases what it holds).
    pub fn answer(self, answer: Result<&[u8], Status>) {
        PolledRequest::answer_all([(self, answer)]);
    }

    /// Answers many requests at once: consecutive answers to one link are
    /// written under one lock of its sending half, and what their requests
    /// held is given back once for them all.
    pub fn answer_all<'a>(
        answers: impl IntoIterator<Item = (PolledRequest, Result<&'a [u8], Status>)>,
    ) {
        let mut answers = answers.into_iter().peekable();
        // One link's answers, each with a flag: whether it is one-way, then
        // (once the registrations are looked at) whether to send it.
        let mut group: Vec<(StreamId, PolledAnswer<'a>, bool)> = Vec::new();
        while let Some((mut first, answer)) = answers.next() {
            let Some(link) = first.link.take() else {
                continue;
            };
            group.clear();
            group.push((first.id, answer, first.one_way));
            let same = |(next, _): &(PolledRequest, _)| {
                next.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, &link))
            };
            while let Some((mut next, answer)) = answers.next_if(same) {
                next.link = None;
                group.push((next.id, answer, next.one_way));
            }
            // Those still holding something: every one-way message, and
            // each request its caller did not give up (released here, so
            // the registrations are not held while the answers are sent).
            let mut n = 0;
            {
                let mut polled = lock(&link.polled);
                for (id, _, flag) in &mut group {
                    let one_way = *flag;
                    *flag = !one_way && polled.remove(&id.0);
                    if one_way || *flag {
                        n += 1;
                    }
                }
            }
            {
                let mut tx = lock(&link.tx);
                for (id, answer, send) in group.drain(..) {
                    if send {
                        let answer = answer.map(|p| (&[][..], p));
                        send_answer_locked(&mut tx, &link.ctx.limits, id, answer);
                    }
                }
            }
            // After the answers are out: a drain waiting for the count sees
            // them written.
            link.release_polled(n);
        }
    }

    /// Whether this is a one-way message (its caller waits for no answer).
    pub fn is_one_way(&self) -> bool {
        self.one_way
    }
}

impl Drop for PolledRequest {
    fn drop(&mut self) {
        if self.link.is_some() {
            let unanswered = PolledRequest {
                link: self.link.take(),
                id: self.id,
                one_way: self.one_way,
            };
            let status = Status::internal("the request was dropped unanswered");
            PolledRequest::answer_all([(unanswered, Err(status))]);
        }
    }
}

/// What a [`PolledRequest`] is answered with: a payload or a status.
type PolledAnswer<'a> = Result<&'a [u8], Status>;

/// How many concurrency permits [`DrivenLink::poll_requests`] takes at a
/// time (those it does not hand out go back when the poll ends).
const POLLED_PERMITS: usize = 32;

/// Permits a poll took for requests it has not handed out (yet), each
/// counted in progress: given back when dropped.
struct HeldPermits {
    link: Arc<LinkShared>,
    n: usize,
}

impl Drop for HeldPermits {
    fn drop(&mut self) {
        self.link.release_polled(self.n);
    }
}

/// Serves one accepted link until it closes (runs on its own thread).
///
/// Each request's handler is polled once right here, so a handler that
/// completes without waiting is answered from this thread with no hand-off;
/// one that has to wait continues as a tokio task.
pub(crate) fn serve_link(link: ShmLink, ctx: Arc<ServeCtx>) {
    let _runtime = ctx.runtime.enter();
    let caller = Caller::local(link.peer());
    let (tx, mut rx) = link.split();
    let mut server = LinkServer::new(tx, ctx, caller);
    loop {
        let msg = match rx.recv(None) {
            Ok(m) => m,
            Err(e) => {
                server.closing(&e);
                break;
            }
        };
        if !server.on_frame(msg) {
            break;
        }
    }
}

/// One accepted link's serving state, apart from its receive ring (whoever
/// receives hands each frame to [`on_frame`](LinkServer::on_frame)). When
/// dropped, the work of requests still running is stopped: nobody waits
/// for it any more.
struct LinkServer {
    ctx: Arc<ServeCtx>,
    link: Arc<LinkShared>,
    /// This link's flag in `ctx.links` (see [`ServeCtx::idle`]).
    busy: Arc<AtomicBool>,
    handler: LinkHandler,
}

impl LinkServer {
    fn new(tx: LinkSender, ctx: Arc<ServeCtx>, caller: Caller) -> LinkServer {
        let busy = Arc::new(AtomicBool::new(false));
        lock(&ctx.links).push(busy.clone());
        LinkServer {
            handler: LinkHandler::new(&ctx.handler),
            link: Arc::new(LinkShared {
                tx: Mutex::new(tx),
                running: Mutex::default(),
                polled: Mutex::default(),
                ctx: ctx.clone(),
                caller,
            }),
            ctx,
            busy,
        }
    }

    /// Logs why the link ends (a client that left is no news).
    fn closing(&self, e: &RecvError) {
        if !matches!(e, RecvError::Ring(RingError::Closed | RingError::PeerGone)) {
            tracing::warn!("closing a link of service {}: {e}", self.ctx.service);
        }
    }

    /// Handles one frame from the client. `false` when the frame is
    /// malformed: the link must close.
    fn on_frame(&mut self, msg: commy_shm::link::Message<'_>) -> bool {
        let LinkServer {
            ctx,
            link: shared,
            busy,
            handler,
        } = self;
        let (tx, running) = (&shared.tx, &shared.running);
        let frame = match FrameRef::decode(&msg, &ctx.limits) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "closing a link of service {}: malformed frame from the client: {e}",
                    ctx.service
                );
                return false;
            }
        };
        let h = *frame.header();
        match h.kind {
            FrameKind::Request | FrameKind::OneWay => {
                let metadata = match decode_metadata(frame.metadata(), &ctx.limits) {
                    Ok(m) => m,
                    Err(e) => {
                        drop(msg);
                        if h.kind == FrameKind::Request {
                            reply(
                                tx,
                                &ctx.limits,
                                h.stream_id,
                                Err(Status::invalid_argument(format!("malformed metadata: {e}"))),
                            );
                        }
                        return true;
                    }
                };
                let request = Request {
                    service: ctx.service,
                    payload: Bytes::copy_from_slice(frame.payload()),
                    metadata: metadata.into(),
                    // Relative on the wire: anchored when first needed.
                    deadline: ArrivedDeadline::from_wire(h.deadline_us),
                    caller: shared.caller.clone(),
                };
                // The request's record is released after the handler ran
                // (or went on as a task): releasing ends with a fence, which
                // would otherwise stand between the request and its answer.
                let link = ServedLink {
                    ctx,
                    link: shared,
                    busy,
                };
                handle(&link, handler, h, request);
                drop(msg);
            }
            FrameKind::Cancel => {
                drop(msg);
                let cancelled = lock(running).remove(&h.stream_id.0);
                if let Some(p) = cancelled {
                    p.cancel();
                } else if lock(&shared.polled).remove(&h.stream_id.0) {
                    shared.release_polled(1);
                }
            }
            FrameKind::Ping => {
                drop(msg);
                let _ = send_frame(
                    &mut lock(tx),
                    FrameHeader::new(FrameKind::Pong, h.stream_id),
                    &[],
                    &[],
                    Patience::DEFAULT,
                );
            }
            other => {
                tracing::debug!(
                    "service {}: ignoring an unexpected {} frame",
                    ctx.service,
                    other.as_str()
                );
            }
        }
        true
    }

    /// Hands `msg` to `on_request` if it is a request that may start now
    /// (see [`DrivenLink::poll_requests`]; `held` counts the permits taken
    /// for it and not handed out yet). `false`: `msg` is for
    /// [`on_frame`](LinkServer::on_frame).
    fn take_request(
        &self,
        msg: &[u8],
        held: &mut usize,
        on_request: &mut impl FnMut(PolledRequest, &[u8]),
    ) -> bool {
        let limits = &self.ctx.limits;
        let Ok(frame) = FrameRef::decode(msg, limits) else {
            return false;
        };
        let h = *frame.header();
        let one_way = match h.kind {
            FrameKind::Request => false,
            FrameKind::OneWay => true,
            _ => return false,
        };
        if *held == 0 {
            if self.ctx.permits.has_waiters() {
                // Requests wait for permits already: this one goes behind
                // them, through the handler's path.
                return false;
            }
            // Counted in progress before the request is handed out.
            *held = self.ctx.permits.try_take_up_to(POLLED_PERMITS);
            if *held == 0 {
                // The handler's path waits for a permit.
                return false;
            }
            handling_n(&self.ctx, *held);
        }
        if let Err(e) = decode_metadata(frame.metadata(), limits) {
            if !one_way {
                send_answer(
                    &self.link.tx,
                    limits,
                    h.stream_id,
                    Err(Status::invalid_argument(format!("malformed metadata: {e}"))),
                );
            }
            return true;
        }
        if !one_way && !lock(&self.link.polled).insert(h.stream_id.0) {
            // The request in progress keeps the stream (and gets the one
            // answer it may get).
            tracing::warn!(
                "service {}: ignoring a request that reused stream {} of one in progress",
                self.ctx.service,
                h.stream_id.0
            );
            return true;
        }
        *held -= 1;
        let request = PolledRequest {
            link: Some(self.link.clone()),
            id: h.stream_id,
            one_way,
        };
        on_request(request, frame.payload());
        true
    }

    /// Stops the work of requests still running (their client is gone).
    fn stop_running(&self) {
        let left: Vec<_> = lock(&self.link.running).drain().map(|(_, p)| p).collect();
        for p in left {
            p.cancel();
        }
        let polled = std::mem::take(&mut *lock(&self.link.polled));
        self.link.release_polled(polled.len());
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.stop_running();
        lock(&self.ctx.links).retain(|b| !Arc::ptr_eq(b, &self.busy));
    }
}

/// What [`DrivenLink::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Every frame that had arrived is handled; the ring is empty.
    Empty,
    /// The most frames one poll handles were handled; more may wait.
    More,
    /// The link is closed (the client left, or broke the protocol): polling
    /// it again does nothing, and it may be dropped.
    Closed,
}

/// A link of a service served with
/// [`Mesh::serve_driven`](crate::Mesh::serve_driven), received from by the
/// embedder's own thread instead of a thread of the mesh: an event loop
/// that polls its links itself pays no hand-off between a receiving thread
/// and its own per request.
///
/// [`poll`](DrivenLink::poll) handles the requests that have arrived,
/// calling the service's handler on the polling thread. A thread that only
/// watches the link while nobody polls it [`wait`](DrivenLink::wait)s. The
/// two may be different threads, one at a time (the link is `Send`). Dropping
/// the link closes it: its client sees the instance gone.
pub struct DrivenLink {
    server: LinkServer,
    rx: LinkReceiver,
    closed: bool,
}

impl std::fmt::Debug for DrivenLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrivenLink")
            .field("service", &self.server.ctx.service)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl DrivenLink {
    pub(crate) fn new(link: ShmLink, ctx: Arc<ServeCtx>) -> DrivenLink {
        let caller = Caller::local(link.peer());
        let (tx, rx) = link.split();
        DrivenLink {
            server: LinkServer::new(tx, ctx, caller),
            rx,
            closed: false,
        }
    }

    /// Who is at the other end: every request of this link comes from
    /// this caller.
    pub fn caller(&self) -> &Caller {
        &self.server.link.caller
    }

    /// Handles the frames that have arrived, at most `max` of them, without
    /// waiting: each request is handed to the service's handler on this
    /// thread.
    pub fn poll(&mut self, max: usize) -> Drive {
        if self.closed {
            return Drive::Closed;
        }
        let _runtime = self.server.ctx.runtime.enter();
        for _ in 0..max {
            let open = match self.rx.try_recv() {
                Ok(Some(msg)) => self.server.on_frame(msg),
                Ok(None) => return Drive::Empty,
                Err(e) => {
                    self.server.closing(&e);
                    false
                }
            };
            if !open {
                return self.close();
            }
        }
        Drive::More
    }

    /// [`poll`](DrivenLink::poll), with each request (and one-way
    /// message) within the service's concurrency limit handed to
    /// `on_request` with its payload, borrowed from the ring, instead of to
    /// the service's handler, in the order they came: the poller answers it
    /// through its [`PolledRequest`]. For a binding that hands requests to
    /// its event loop in batches: a request then costs no allocation and
    /// one lock (its registration, for cancellation). The poller sees no
    /// deadline and no metadata. Requests beyond the concurrency limit (or
    /// while others wait for a permit) go to the service's handler, as with
    /// `poll`, which bounds them as it does there; they may then be handled
    /// after requests that came later.
    pub fn poll_requests(
        &mut self,
        max: usize,
        mut on_request: impl FnMut(PolledRequest, &[u8]),
    ) -> Drive {
        if self.closed {
            return Drive::Closed;
        }
        let _runtime = self.server.ctx.runtime.enter();
        // Permits taken (and counted in progress) but not handed out yet:
        // given back when the poll ends, also if `on_request` panics.
        let mut held = HeldPermits {
            link: self.server.link.clone(),
            n: 0,
        };
        let mut drive = Drive::More;
        for _ in 0..max {
            let msg = match self.rx.try_recv() {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    drive = Drive::Empty;
                    break;
                }
                Err(e) => {
                    self.server.closing(&e);
                    drive = Drive::Closed;
                    break;
                }
            };
            if self.server.take_request(&msg, &mut held.n, &mut on_request) {
                // Released after its poller had it (as in `on_frame`).
                drop(msg);
            } else if !self.server.on_frame(msg) {
                drive = Drive::Closed;
                break;
            }
        }
        drop(held);
        if drive == Drive::Closed {
            return self.close();
        }
        drive
    }

    fn close(&mut self) -> Drive {
        self.closed = true;
        self.server.stop_running();
        Drive::Closed
    }

    /// Waits (per the mesh's link wait strategy) until something arrived:
    /// `true` when [`poll`](DrivenLink::poll) has work (a request, or the
    /// news that the link closed); `false` when `deadline` passed or an
    /// [interrupter](DrivenLink::interrupter) ended the wait.
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        self.closed || self.rx.wait(deadline)
    }

    /// Whether a frame has arrived (one load: a hint for a poller deciding
    /// whether to poll again; the link's closing shows only in `poll`).
    pub fn has_data(&self) -> bool {
        self.rx.has_data()
    }

    /// A handle that ends a [`wait`](DrivenLink::wait) from another thread.
    pub fn interrupter(&self) -> commy_shm::WaitInterrupter {
        self.rx.interrupter()
    }

    /// The service this link serves.
    pub fn service(&self) -> &commy_core::ServiceName {
        self.server.ctx.service
    }
}

/// A handler's future with panics caught: `None` if it panicked.
struct CatchPanic(HandlerFuture);

impl Future for CatchPanic {
    type Output = Option<Result<Response, Status>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(p) => p.map(Some),
            Err(_) => Poll::Ready(None),
        }
    }
}

fn panicked(service: &commy_core::ServiceName) -> Status {
    tracing::error!("service {service}: the handler panicked");
    Status::internal("the service's handler panicked")
}

/// A request continuing as a task (or with a deferred handler): counted in
/// `in_flight` for draining until dropped (also when the task is aborted by
/// a Cancel frame).
pub(crate) struct OwnedHandling(Arc<ServeCtx>);

impl OwnedHandling {
    pub(crate) fn enter(ctx: Arc<ServeCtx>) -> OwnedHandling {
        handling(&ctx);
        OwnedHandling(ctx)
    }
}

impl Drop for OwnedHandling {
    fn drop(&mut self) {
        handled(&self.0);
    }
}

/// Counts one request in `in_flight` (ended by [`handled`]).
fn handling(ctx: &ServeCtx) {
    handling_n(ctx, 1);
}

/// Counts `n` requests in `in_flight` at once.
fn handling_n(ctx: &ServeCtx, n: usize) {
    ctx.in_flight.fetch_add(n, Ordering::SeqCst);
}

/// Ends one request's count in `in_flight` (waking a drain that waits for
/// the last one).
pub(crate) fn handled(ctx: &ServeCtx) {
    handled_n(ctx, 1);
}

/// Ends `n` requests' counts in `in_flight` at once.
fn handled_n(ctx: &ServeCtx, n: usize) {
    // SYNC: SeqCst on both words, as in `Served::drain`: either the
    // drainer sees the count drop to zero, or we see it draining.
    if n > 0
        && ctx.in_flight.fetch_sub(n, Ordering::SeqCst) == n
        && ctx.draining.load(Ordering::SeqCst)
    {
        ctx.drained.notify_waiters();
    }
}

/// What handling a request needs of the link it came on.
struct ServedLink<'a> {
    ctx: &'a Arc<ServeCtx>,
    link: &'a Arc<LinkShared>,
    /// The link's flag for handlers running inline.
    busy: &'a AtomicBool,
}

/// A service's handler as one link's thread runs it.
enum LinkHandler {
    /// An async handler, in this link's slot.
    Async(Box<dyn InlineSlot>),
    /// A deferred handler.
    Deferred(Arc<dyn Fn(Request, Responder) + Send + Sync>),
}

impl LinkHandler {
    fn new(handler: &Handler) -> LinkHandler {
        match handler {
            Handler::Async(f) => LinkHandler::Async(f.clone().inline_slot()),
            Handler::Deferred(f) => LinkHandler::Deferred(f.clone()),
        }
    }
}

/// Runs one request: inline if its handler completes at once, else as a
/// task.
fn handle(link: &ServedLink<'_>, handler: &mut LinkHandler, h: FrameHeader, request: Request) {
    let ServedLink {
        ctx,
        link: shared,
        busy,
    } = *link;
    let (tx, running) = (&shared.tx, &shared.running);
    let slot = match handler {
        LinkHandler::Async(slot) => slot,
        LinkHandler::Deferred(f) => return handle_deferred(link, h, request, f),
    };
    let id = h.stream_id;
    let oneway = h.kind == FrameKind::OneWay;
    let deadline = request.deadline.clone();
    let inline = InlineBusy::enter(busy);
    // A handler that answers at once runs right here, one at a time per
    // link, without a permit: permits bound the handlers left waiting.
    let mut cx = Context::from_waker(Waker::noop());
    let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| slot.run(request, &mut cx))) {
        Ok(Ok(result)) => {
            if !oneway {
                reply(tx, &ctx.limits, id, result);
            }
            return;
        }
        Ok(Err(fut)) => CatchPanic(fut),
        Err(_) => {
            if !oneway {
                reply(tx, &ctx.limits, id, Err(panicked(ctx.service)));
            }
            return;
        }
    };
    // Counted before the link's flag clears (see `ServeCtx::idle`).
    let handling = OwnedHandling::enter(ctx.clone());
    drop(inline);
    // The handler waits: its deadline counts from now at the latest (it
    // anchored it already if it asked), and it continues as a task once it
    // has a permit.
    let deadline = deadline.get();
    let permit = ctx.permits.try_take();
    if !oneway {
        lock(running).insert(id.0, Pending::Task(None));
    }
    let work = {
        let (ctx, shared) = (ctx.clone(), shared.clone());
        async move {
            let _handling = handling;
            let _permit = if permit {
                Permit(&ctx.permits)
            } else {
                ctx.permits.take().await
            };
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d.instant().into(), fut)
                    .await
                    .unwrap_or_else(|_| {
                        Some(Err(Status::deadline_exceeded(
                            "the handler ran past the deadline",
                        )))
                    }),
                None => fut.await,
            }
            .unwrap_or_else(|| Err(panicked(ctx.service)));
            // Removed already if the caller cancelled: nobody waits then.
            if !oneway && lock(&shared.running).remove(&id.0).is_some() {
                reply(&shared.tx, &ctx.limits, id, result);
            }
        }
    };
    let task = ctx.runtime.spawn(work);
    if !oneway {
        if let Some(slot) = lock(running).get_mut(&id.0) {
            *slot = Pending::Task(Some(task.abort_handle()));
        }
    }
}

/// Runs one request of a deferred handler: the handler gets a responder
/// that writes the answer into the link from whichever thread answers.
/// Without a free concurrency permit the request waits for one on the
/// runtime and its handler is then called there.
fn handle_deferred(
    link: &ServedLink<'_>,
    h: FrameHeader,
    request: Request,
    handler: &Arc<dyn Fn(Request, Responder) + Send + Sync>,
) {
    let ServedLink {
        ctx,
        link: shared,
        busy,
    } = *link;
    let inline = InlineBusy::enter(busy);
    // Counted before the link's flag clears (see `ServeCtx::idle`); the
    // responder ends the count.
    handling(ctx);
    let sink = if h.kind == FrameKind::OneWay {
        Sink::OneWay
    } else {
        Sink::Link(LinkAnswer {
            link: shared.clone(),
            limits: ctx.limits,
            id: h.stream_id,
        })
    };
    let permit = ctx.permits.try_take();
    let waits = !permit;
    let responder = Responder::new(sink, Some(ctx.clone()), permit);
    if h.kind != FrameKind::OneWay {
        lock(&shared.running).insert(h.stream_id.0, Pending::Deferred(responder.shared().clone()));
    }
    if !waits {
        call_deferred(handler, request, responder, ctx.service);
        drop(inline);
        return;
    }
    drop(inline);
    let (ctx2, handler) = (ctx.clone(), handler.clone());
    ctx.runtime.spawn(async move {
        let mut responder = responder;
        ctx2.permits.take().await.into_responder(&mut responder);
        if responder.is_cancelled() {
            return;
        }
        call_deferred(&handler, request, responder, ctx2.service);
    });
}

/// Calls a deferred handler; if it panics, the caller gets `Internal`.
fn call_deferred(
    handler: &Arc<dyn Fn(Request, Responder) + Send + Sync>,
    request: Request,
    responder: Responder,
    service: &commy_core::ServiceName,
) {
    if std::panic::catch_unwind(AssertUnwindSafe(|| handler(request, responder))).is_err() {
        // The responder, dropped while unwinding, answered `Internal`.
        let _ = panicked(service);
    }
}

/// Sends a handler's result back on the link (best effort: a client that is
/// gone gets nothing).
fn reply(tx: &Mutex<LinkSender>, limits: &Limits, id: StreamId, result: Result<Response, Status>) {
    match result {
        Ok(resp) => {
            let md = encode_metadata(&resp.metadata);
            send_answer(tx, limits, id, Ok((&md, &resp.payload)));
        }
        Err(status) => send_answer(tx, limits, id, Err(status)),
    }
}

/// Sends an answer, its metadata section and payload or an error status,
/// back on the link (as [`reply`] does).
fn send_answer(
    tx: &Mutex<LinkSender>,
    limits: &Limits,
    id: StreamId,
    answer: Result<(&[u8], &[u8]), Status>,
) {
    let Ok(mut tx) = tx.lock() else { return };
    send_answer_locked(&mut tx, limits, id, answer);
}

/// [`send_answer`] on a link whose sending half is locked already.
fn send_answer_locked(
    tx: &mut LinkSender,
    limits: &Limits,
    id: StreamId,
    answer: Result<(&[u8], &[u8]), Status>,
) {
    let answer = answer.and_then(|(md, payload)| match check_frame(limits, md, payload) {
        Ok(()) => Ok((md, payload)),
        Err(status) => {
            tracing::warn!("refusing a handler's response: {}", status.message());
            Err(status)
        }
    });
    let sent = match answer {
        Ok((md, payload)) => send_frame(
            tx,
            FrameHeader::new(FrameKind::Response, id),
            md,
            payload,
            Patience::DEFAULT,
        ),
        Err(status) => {
            let status = if status.code() == Code::Ok {
                Status::internal("handler returned an error with code OK")
            } else {
                status
            };
            send_frame(
                tx,
                FrameHeader::new(FrameKind::Error, id),
                &[],
                &status.encode(),
                Patience::DEFAULT,
            )
        }
    };
    if let Err(e) = sent {
        tracing::debug!("could not send a response: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many tasks take and give permits at once, no more than the
    /// permits' number hold one at a time, and none is left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permits_bound_their_holders_and_wake_every_waiter() {
        let permits = Arc::new(Permits::new(3));
        let holding = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (permits, holding, peak) = (permits.clone(), holding.clone(), peak.clone());
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let _permit = permits.take().await;
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        holding.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("a task was left waiting for a permit");
        assert!(
            peak.load(Ordering::SeqCst) <= 3,
            "more holders than permits"
        );
        // Every permit came back.
        assert!((0..3).all(|_| permits.try_take()));
        assert!(!permits.try_take());
    }

    fn task_waiter() -> Waiter {
        Waiter::Task(oneshot::channel().0)
    }

    /// The call table finds every call it holds, whether in its slot or
    /// in the overflow (a call left waiting while the ids wrapped around
    /// it), across growing, and forgets what was taken out.
    #[test]
    fn the_call_table_keeps_every_call_by_its_id() {
        let mut table = CallTable::default();
        assert!(table.remove(1).is_none());
        // One call stays pending while many newer ones come and go.
        table.insert(1, task_waiter());
        let mut live = std::collections::BTreeSet::from([1u64]);
        let mut id = 3u64;
        for round in 0..200u64 {
            for _ in 0..(round % 7 + 1) {
                table.insert(id, task_waiter());
                live.insert(id);
                id += 2;
            }
            // Answers come back out of order: every third one now.
            let done: Vec<u64> = live
                .iter()
                .copied()
                .filter(|i| *i != 1 && i % 3 == 0)
                .collect();
            for i in done {
                assert!(table.remove(i).is_some(), "call {i} lost");
                live.remove(&i);
            }
            assert_eq!(table.len(), live.len());
        }
        assert!(table.slots.len() > CALL_SLOTS_MIN, "the table never grew");
        // Ids it never held, or no longer holds, are not found.
        assert!(table.remove(id + 2).is_none());
        assert!(table.remove(9).is_none());
        let mut listed: Vec<u64> = table.iter().map(|(i, _)| i).collect();
        listed.sort_unstable();
        assert_eq!(listed, live.iter().copied().collect::<Vec<_>>());
        assert!(table.remove(1).is_some());
        assert_eq!(table.drain().len(), live.len() - 1);
        assert_eq!(table.len(), 0);
        assert_eq!(table.iter().count(), 0);
    }

    /// Ids that wrap around the whole table (more calls than slots, none
    /// answered) go to the overflow and are all found again.
    #[test]
    fn the_call_table_overflows_past_its_largest_size() {
        let mut table = CallTable::default();
        let n = 2 * CALL_SLOTS_MAX as u64 + 5;
        for k in 0..n {
            table.insert(2 * k + 1, task_waiter());
        }
        assert_eq!(table.slots.len(), CALL_SLOTS_MAX);
        assert!(!table.overflow.is_empty());
        for k in (0..n).rev() {
            assert!(table.remove(2 * k + 1).is_some(), "call {} lost", 2 * k + 1);
        }
        assert_eq!(table.len(), 0);
    }

    /// A task dropped while it waits for a permit takes none with it, and
    /// the wake-up meant for it goes to the next waiter.
    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_dropped_while_waiting_loses_no_permit() {
        let permits = Arc::new(Permits::new(1));
        assert!(permits.try_take());
        let dropped = {
            let permits = permits.clone();
            tokio::spawn(async move { drop(permits.take().await) })
        };
        let next = {
            let permits = permits.clone();
            tokio::spawn(async move { drop(permits.take().await) })
        };
        tokio::task::yield_now().await;
        dropped.abort();
        let _ = dropped.await;
        permits.give();
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the remaining waiter was not woken")
            .unwrap();
        assert!(permits.try_take());
        assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
    }
}
