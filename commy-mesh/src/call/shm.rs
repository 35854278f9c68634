//! The shared-memory client: one link to one service instance.
//!
//! The calling task writes its request straight into the ring and then
//! polls the link's receive ring itself for a short while
//! ([`MeshBuilder::call_spin`](crate::MeshBuilder::call_spin)), completing whatever
//! answers it finds (its own, or other callers' through the call table).
//! A quick call therefore never crosses a thread. Only when no caller polls
//! and calls are still pending does the link's reader thread
//! ([`reader`](super::reader)) take over. An event loop that keeps many
//! callback calls in flight receives their answers itself instead
//! ([`AnswerDriver`](crate::embed::AnswerDriver)).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{
    Deadline, FrameHeader, FrameKind, FrameRef, InstanceId, Limits, Metadata, Status, StreamId,
};
use commy_shm::link::{LinkSender, RecvError, SendError};
use commy_shm::{LinkReceiver, RingError, ShmLink};
use parking_lot::Mutex;

use crate::call::attempt::Attempt;
use crate::call::deadline::Due;
use crate::call::policy::CallPolicy;
use crate::call::resilience::PoolHealth;
use crate::call::stats::{DEPOSIT_LOT, EndpointStats};
use crate::call::table::{AnswerSink, CallResult, Callback, Done, PendingCalls, Settled, Waiter};
use crate::response::Response;
use crate::sync::Counted;
use crate::warn::CLIENT_LINKS;
mod batch;

use crate::wire::{
    Patience, decode_metadata, encode_metadata, far_future, send_frame, send_status, stage_frame,
};

/// What one poll of a link by an [`AnswerDriver`] found.
pub(crate) enum AnswerDrive {
    /// The most answers one poll takes were taken; more may wait.
    More,
    /// Every answer that had come was taken; the ring is empty.
    Empty,
    /// The link failed (its calls have been failed).
    Closed,
}

/// The receiver of a token call's answer as [`AnswerDriver::poll_with`]
/// takes it.
pub(crate) type Local<'a> = dyn FnMut(u64, Result<&[u8], Status>) + 'a;

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

/// The client side of one link to one service instance.
///
/// Responses are read by the callers themselves: a caller that has sent its
/// request polls the link's receive ring for a short while (`spin`),
/// completing whatever responses it finds, its own or other callers'. Only
/// when no caller is polling and calls are still pending does a parked
/// reader thread take over, waiting on the ring (and sleeping when it stays
/// empty). A quick call therefore never crosses a thread.
pub(crate) struct ClientConn {
    pub(crate) tx: Mutex<TxState>,
    pub(crate) rx: Mutex<LinkReceiver>,
    pub(crate) pending: Mutex<PendingCalls>,
    /// `pending.len()`, readable without the lock (stored under it).
    pub(crate) pending_len: AtomicUsize,
    pub(crate) alive: AtomicBool,
    /// Set once the instance told us to go away (its drain), or left its
    /// pool: no new request is sent on the link (checked under the send
    /// lock), the ones sent before are answered.
    going_away: AtomicBool,
    /// Set until the reader has answered the instance with a GoAway of our
    /// own (sent under the send lock, after every request sent before).
    ack_due: AtomicBool,
    /// Callers currently polling the receive ring (the reader stands back).
    pub(crate) pollers: AtomicUsize,
    /// The instance at the other end.
    pub(crate) instance: InstanceId,
    /// Calls in flight (for least-loaded balancing) and, for a service
    /// with a call policy, the calls' outcomes.
    pub(crate) stats: EndpointStats,
    /// The call policy of the instance's service, if it has one.
    pub(crate) policy: Option<Arc<dyn CallPolicy>>,
    /// Set while this link's instance is the only one its pool knows, by a
    /// call under the pool's lock; cleared there whenever the pool's
    /// instances change (a thread's last-called cache relies on it).
    pub(crate) sole: AtomicBool,
    pub(crate) limits: Limits,
    pub(crate) spin: Duration,
    pub(crate) reader: OnceLock<std::thread::Thread>,
    /// Set when a callback call moved the earliest deadline forward (the
    /// reader then reads it again).
    pub(crate) sooner: AtomicBool,
    /// Ends the reader's wait on the ring, which may be set for a later
    /// deadline than a call registered since.
    interrupt: commy_shm::WaitInterrupter,
    /// Ends the link for the server too when this side finds it broken.
    aborter: commy_shm::LinkAborter,
    /// What the answer driver, the reader and the callback and token calls
    /// of the link share (see [`Driving`]).
    pub(crate) driving: Driving,
}

/// The state of a client link that only callback and token calls and an
/// [`AnswerDriver`](crate::embed::AnswerDriver) use: who receives the
/// link's answers (the driver while it has the link, else the reader), and
/// where token calls' answers go. Plain calls never touch it.
#[derive(Default)]
pub(crate) struct Driving {
    /// Set while an [`AnswerDriver`](crate::embed::AnswerDriver) receives this link's answers (the
    /// reader stands by, see [`stand_by`](crate::call::reader::stand_by)).
    pub(crate) driven: AtomicBool,
    /// Set once an [`AnswerDriver`](crate::embed::AnswerDriver) has claimed the link: its reader naps
    /// for a while before parking, so that the next claim needs no wake-up.
    pub(crate) was_driven: AtomicBool,
    /// Set by every poll of the driver; cleared by the standing-by reader
    /// each time it looks.
    pub(crate) polled: AtomicBool,
    /// Set while the reader is parked with no timeout (a claim wakes it).
    pub(crate) asleep: AtomicBool,
    /// Set once a callback call was made on the link.
    pub(crate) callbacks: AtomicBool,
    /// Where the answers to token calls go (set by the first one: every
    /// call on the link comes through the same mesh handle).
    pub(crate) sink: OnceLock<Arc<dyn AnswerSink>>,
}

impl ClientConn {
    /// Wraps a connected link; its reader thread is started by
    /// [`reader::spawn`](crate::call::reader::spawn).
    pub(crate) fn new(
        link: ShmLink,
        instance: InstanceId,
        policy: Option<Arc<dyn CallPolicy>>,
        stats: EndpointStats,
        limits: Limits,
        spin: Duration,
    ) -> Arc<ClientConn> {
        let (tx, rx) = link.split();
        let interrupt = rx.interrupter();
        let aborter = tx.aborter();
        Arc::new(ClientConn {
            tx: Mutex::new(TxState {
                sender: tx,
                next_stream: 1,
                discarded_seen: 0,
                health: stats.health_arc(),
            }),
            rx: Mutex::new(rx),
            pending: Mutex::new(PendingCalls::default()),
            pending_len: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            going_away: AtomicBool::new(false),
            ack_due: AtomicBool::new(false),
            pollers: AtomicUsize::new(0),
            instance,
            stats,
            policy,
            sole: AtomicBool::new(false),
            limits,
            spin,
            reader: OnceLock::new(),
            interrupt,
            aborter,
            sooner: AtomicBool::new(false),
            driving: Driving::default(),
        })
    }

    /// Whether the link still works.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Whether new calls may go on the link: it works and the instance
    /// did not tell us to go away.
    pub(crate) fn takes_calls(&self) -> bool {
        self.is_alive() && !self.told_to_go_away()
    }

    /// Whether the instance told us to go away (or left its pool).
    pub(crate) fn told_to_go_away(&self) -> bool {
        self.going_away.load(Ordering::Acquire)
    }

    /// The failure of a call not sent on a link that takes no new calls.
    fn no_new_calls(&self) -> Status {
        if self.is_alive() {
            Status::unavailable("the instance is draining and takes no new call")
        } else {
            Status::unavailable("the instance is gone")
        }
    }

    /// The instance drains (its GoAway came) or left its pool: no new
    /// request goes on the link from now on, and the link's reader answers
    /// the instance with a GoAway of its own, after which the instance may
    /// close the link once it answered the rest. Takes no lock: it is
    /// called where answers are received.
    pub(crate) fn go_away(&self) {
        if !self.going_away.swap(true, Ordering::AcqRel) {
            self.ack_due.store(true, Ordering::Release);
            self.wake_reader();
        }
    }

    /// Answers the instance's GoAway, if that is still to do (the link's
    /// reader, holding no other lock). Every request sent on the link was
    /// sent before it: the send lock orders them.
    pub(crate) fn answer_go_away(&self) {
        if self.ack_due.swap(false, Ordering::AcqRel) {
            let _ = send_frame(
                &mut self.tx.lock().sender,
                FrameHeader::new(FrameKind::GoAway, StreamId(0)),
                &[],
                &[],
                Patience::For(Duration::ZERO),
            );
        }
    }

    /// One attempt of a call on this link: its answer, or how it failed
    /// (unsent, with its payload back, when nothing was written).
    pub(crate) async fn attempt(
        &self,
        payload: Bytes,
        metadata: &Metadata,
        due: Due,
        balanced: bool,
        spin: Option<Duration>,
    ) -> Result<Response, Attempt> {
        match self.start_call(payload, metadata, due, balanced, spin) {
            Started::Done(result) => result.map_err(Attempt::Failed),
            Started::Waiting(waiting) => self.finish_call(waiting).await.map_err(Attempt::Failed),
            Started::Unsent(payload, status) => Err(Attempt::Unsent(Some(payload), status)),
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
        if !self.takes_calls() {
            // Nothing was sent: the call may go to another instance.
            return Started::Unsent(payload, self.no_new_calls());
        }
        let in_flight = balanced.then(|| Counted::enter(&self.stats.in_flight));
        let md = encode_metadata(metadata);
        if let Err(status) = self.limits.check_message(md.len(), payload.len()) {
            return Started::Done(Err(status));
        }
        let deadline_us = due.wire();
        let patience = due.patience();
        // The payload comes back if it could not be written.
        let send = |tx: &mut TxState, id: u64, payload: Bytes| {
            let header = FrameHeader {
                deadline_us,
                ..FrameHeader::new(FrameKind::Request, StreamId(id))
            };
            match send_frame(&mut tx.sender, header, &md, &payload, patience) {
                Ok(()) => {
                    // Freed after the send, not on the answer's path.
                    drop(payload);
                    Ok(())
                }
                Err(e) => Err((payload, e)),
            }
        };
        let id = match self.rx.try_lock() {
            Some(mut rx) => {
                // We own the receive ring: our answer cannot be taken by
                // anyone else, so it needs no registration unless we stop
                // polling before it comes.
                let id = {
                    let mut tx = self.tx.lock();
                    if self.told_to_go_away() {
                        return Started::Unsent(payload, self.no_new_calls());
                    }
                    let id = tx.open_stream();
                    if let Err((payload, e)) = send(&mut tx, id, payload) {
                        drop(tx);
                        return self.unsent(payload, e);
                    }
                    id
                };
                // The space of the answer before, if the last call left it.
                rx.release();
                if let Some(result) = self.poll_own(&mut rx, id, &mut due, spin) {
                    return Started::Done(result);
                }
                self.register(id, Waiter::Task(None));
                drop(rx);
                // Not answered within the spin: the reader thread takes over.
                self.wake_reader();
                id
            }
            None => {
                // Another caller (or the reader) owns the ring: it completes
                // our call through the pending table. Polling callers make
                // the reader stand back; the last one out wakes it.
                let polling = Poller::enter(self);
                let id = {
                    let mut tx = self.tx.lock();
                    if self.told_to_go_away() {
                        return Started::Unsent(payload, self.no_new_calls());
                    }
                    let id = tx.open_stream();
                    self.register(id, Waiter::Task(None));
                    if let Err((payload, e)) = send(&mut tx, id, payload) {
                        drop(tx);
                        self.forget(id);
                        return self.unsent(payload, e);
                    }
                    id
                };
                // Spinning pays only while few callers wait: with many in
                // flight, spinners would take the threads their answers are
                // delivered on (and the other callers' work) away.
                if polling.may_spin()
                    && let Some(result) = self.poll_shared(id, &mut due, spin)
                {
                    return Started::Done(result);
                }
                drop(polling);
                id
            }
        };
        Started::Waiting(Waiting {
            abandon: Abandon {
                conn: self,
                id,
                armed: true,
            },
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
            mut due,
            _in_flight,
        } = waiting;
        let id = abandon.id;
        // The answer is put in the call's place in the table, where this
        // takes it (the waker left there is woken then).
        let answer = std::future::poll_fn(|cx| match self.take_answer(id, cx.waker()) {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        });
        let outcome = match due.absolute() {
            Some(d) => match tokio::time::timeout_at(d.instant().into(), answer).await {
                Ok(r) => r,
                Err(_) => {
                    drop(abandon);
                    let late = Status::deadline_exceeded("no response before the deadline");
                    self.stats.answered(Some(&late));
                    return Err(late);
                }
            },
            None => answer.await,
        };
        abandon.armed = false;
        outcome
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

    /// Waits for the answer to our pending call `id` while another thread
    /// owns the ring, taking the ring over if it is released.
    fn poll_shared(&self, id: u64, due: &mut Due, spin: Duration) -> Option<CallResult> {
        let mut spin = SpinBudget::new(spin, 64);
        loop {
            if let Some(mut rx) = self.rx.try_lock() {
                self.drain(&mut rx);
            }
            if let Some(result) = self.take_answer(id, Waker::noop()) {
                return Some(result);
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
    pub(crate) fn drain(&self, rx: &mut LinkReceiver) -> bool {
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
    pub(crate) fn deliver(
        &self,
        msg: &[u8],
        own: Option<u64>,
    ) -> Result<Option<CallResult>, Status> {
        let Some((id, result)) = self.answer(msg) else {
            return Err(self.fail(RecvError::Protocol("malformed frame")));
        };
        if own == Some(id) {
            return Ok(Some(result));
        }
        self.settle(id, result);
        Ok(None)
    }

    /// Reads an answer frame: its stream and the call's result. `None` when
    /// the frame is malformed (the link must be dropped).
    pub(crate) fn answer(&self, msg: &[u8]) -> Option<(u64, CallResult)> {
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
                CLIENT_LINKS.warn(|| {
                    format!(
                        "dropping the link to instance {}: it sent a malformed frame: {e}",
                        self.instance
                    )
                });
                return None;
            }
        };
        let h = *frame.header();
        if h.kind == FrameKind::GoAway {
            // Not an answer: no call has stream 0, so whoever receives it
            // settles nothing.
            self.go_away();
            return Some((0, AnswerRef::Failed(Status::unavailable(""))));
        }
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
        // Every answer on the link passes here, whoever waits for it. A
        // deadline the instance says passed is counted where the caller
        // gives up (or not at all, if it still waits), not twice.
        match &answer {
            AnswerRef::Response { .. } => self.stats.answered(None),
            AnswerRef::Failed(status) if status.code() == commy_core::Code::DeadlineExceeded => {}
            AnswerRef::Failed(status) => self.stats.answered(Some(status)),
        }
        Some((h.stream_id.0, answer))
    }

    /// Marks the link dead and fails every pending call with the reason,
    /// which it returns.
    pub(crate) fn fail(&self, reason: RecvError) -> Status {
        let status = match reason {
            RecvError::Ring(RingError::Closed) => {
                Status::unavailable("the instance closed the link")
            }
            RecvError::Ring(RingError::PeerGone) => Status::unavailable("the instance died"),
            other => Status::unavailable(format!("link to the instance failed: {other}")),
        };
        self.stats.answered(Some(&status));
        self.fail_with(&status);
        status
    }

    /// The status of a send that failed. A broken link (closed, peer gone,
    /// corrupt: anything but backpressure or a message too large) is marked
    /// dead at once, its pending calls failed and its reader woken, so the
    /// next call connects anew instead of failing on it for good.
    fn send_failed(&self, e: SendError) -> Status {
        let broken = matches!(e, SendError::Ring(_));
        let status = send_status(e);
        if broken {
            self.fail_with(&status);
            self.wake_reader();
        }
        status
    }

    /// A request that could not be written at all: on a link that broke,
    /// its payload is handed back for another link.
    fn unsent(&self, payload: Bytes, e: SendError) -> Started<'_> {
        let status = self.send_failed(e);
        if self.takes_calls() {
            Started::Done(Err(status))
        } else {
            Started::Unsent(payload, status)
        }
    }

    /// Marks the link dead, ends it for the server, and fails every
    /// pending call with `status`.
    fn fail_with(&self, status: &Status) {
        self.alive.store(false, Ordering::Release);
        self.aborter.abort();
        let settled: Vec<Settled> = {
            let mut pending = self.pending.lock();
            pending.earliest = None;
            let ids: Vec<u64> = pending.calls.iter().map(|(id, _)| id).collect();
            let settled = ids
                .into_iter()
                .filter_map(|id| pending.settle(id, Err(status.clone())))
                .collect();
            self.pending_len.store(0, Ordering::Release);
            settled
        };
        for s in settled {
            s.finish(self);
        }
    }

    /// Sends a one-way message.
    pub(crate) fn send_oneway(&self, payload: &[u8], metadata: &Metadata) -> Result<(), Status> {
        let md = encode_metadata(metadata);
        match self
            .send_unanswered(FrameKind::OneWay, &md, &[payload], Patience::DEFAULT)
            .1
        {
            Ok(()) => Ok(()),
            Err(Unsent::Stalled) => Err(self.send_failed(SendError::TimedOut)),
            Err(Unsent::Failed(status)) => Err(status),
        }
    }

    /// Publishes each of `payloads` in order (their topic in `metadata`),
    /// written back to back and made visible to the subscriber at once,
    /// waiting at most `stall` for ring space. A subscriber whose ring
    /// stays full that long made no progress: its link is ended
    /// ([`Unsent::Stalled`]), and the publisher goes on. Returns how many
    /// were sent, and why the others were not.
    pub(crate) fn send_publish_many<P: AsRef<[u8]>>(
        &self,
        metadata: &[u8],
        payloads: &[P],
        stall: Duration,
    ) -> SentPublish {
        let (sent, result, discarded) =
            self.send_unanswered(FrameKind::Publish, metadata, payloads, Patience::For(stall));
        if let Err(Unsent::Stalled) = result {
            self.stalled();
        }
        SentPublish {
            sent,
            discarded,
            result,
        }
    }

    /// Publishes one message written in place in this subscriber's ring:
    /// a record for a frame with `max` bytes of payload is lent out,
    /// zeroed, and `write` fills the payload, returning its length (at
    /// most `max`). `written` sees the payload before it is published (to
    /// copy it elsewhere). Waits at most `stall` for ring space, as
    /// [`ClientConn::send_publish_many`] does. `None` when the frame
    /// cannot be lent out in one record (too large): `write` was not
    /// called.
    pub(crate) fn publish_in_place(
        &self,
        metadata: &[u8],
        max: usize,
        stall: Duration,
        write: &mut dyn FnMut(&mut [u8]) -> usize,
        written: &mut dyn FnMut(&[u8]),
    ) -> Option<SentPublish> {
        let sent = |sent, result| SentPublish {
            sent,
            discarded: 0,
            result,
        };
        if !self.is_alive() {
            let gone = Status::unavailable("the instance is gone");
            return Some(sent(0, Err(Unsent::Failed(gone))));
        }
        if let Err(e) = self.limits.check_message(metadata.len(), max) {
            return Some(sent(0, Err(Unsent::Failed(e))));
        }
        let start = commy_core::HEADER_LEN + metadata.len();
        let total = start + max;
        let mut tx = self.tx.lock();
        if total > tx.sender.max_record() {
            return None;
        }
        let id = tx.open_stream();
        let mut loan = match tx.sender.loan_for(total, stall) {
            Ok(loan) => loan.zeroed(),
            Err(e) => {
                drop(tx);
                let unsent = match e {
                    SendError::TimedOut => {
                        self.stalled();
                        Unsent::Stalled
                    }
                    e => Unsent::Failed(self.send_failed(e)),
                };
                return Some(sent(0, Err(unsent)));
            }
        };
        let bytes = loan.bytes_mut();
        let n = write(&mut bytes[start..]).min(max);
        let header = FrameHeader::new(FrameKind::Publish, StreamId(id))
            .with_sections(metadata.len() as u32, n as u32);
        bytes[..commy_core::HEADER_LEN].copy_from_slice(&header.encode());
        bytes[commy_core::HEADER_LEN..start].copy_from_slice(metadata);
        written(&bytes[start..start + n]);
        loan.truncate(start + n);
        loan.commit();
        let discarded = tx.take_discarded();
        Some(SentPublish {
            sent: 1,
            discarded,
            result: Ok(()),
        })
    }

    /// Ends the link of a subscriber whose ring stayed full for the stall
    /// time: it made no progress.
    fn stalled(&self) {
        self.fail_with(&Status::resource_exhausted(
            "the subscriber took nothing for the stall time: disconnected",
        ));
    }

    /// Messages sent on this link that the subscriber discarded unread
    /// since the last look (see [`SentPublish::discarded`]).
    pub(crate) fn take_discarded(&self) -> u64 {
        self.tx.lock().take_discarded()
    }

    /// Sends frames on fresh streams that get no answer, one per payload,
    /// waiting for ring space as `patience` says (`Unsent::Stalled` if it
    /// ran out). Several are staged and published together. Returns how
    /// many were sent, why the others were not, and what the peer
    /// discarded since the last look ([`TxState::take_discarded`]).
    fn send_unanswered<P: AsRef<[u8]>>(
        &self,
        kind: FrameKind,
        metadata: &[u8],
        payloads: &[P],
        patience: Patience,
    ) -> (usize, Result<(), Unsent>, u64) {
        if !self.is_alive() {
            let gone = Status::unavailable("the instance is gone");
            return (0, Err(Unsent::Failed(gone)), 0);
        }
        for payload in payloads {
            if let Err(e) = self
                .limits
                .check_message(metadata.len(), payload.as_ref().len())
            {
                return (0, Err(Unsent::Failed(e)), 0);
            }
        }
        let mut done = 0;
        let (sent, discarded) = {
            let mut tx = self.tx.lock();
            if kind == FrameKind::OneWay && self.told_to_go_away() {
                // The instance drains: a one-way message goes elsewhere.
                return (0, Err(Unsent::Failed(self.no_new_calls())), 0);
            }
            let mut sent = Ok(());
            for payload in payloads {
                let id = tx.open_stream();
                let header = FrameHeader::new(kind, StreamId(id));
                sent = stage_frame(&mut tx.sender, header, metadata, payload.as_ref(), patience);
                if sent.is_err() {
                    break;
                }
                done += 1;
            }
            // What was staged becomes visible with one publication.
            tx.sender.flush();
            (sent, tx.take_discarded())
        };
        match sent {
            Ok(()) => (done, Ok(()), discarded),
            Err(SendError::TimedOut) => (done, Err(Unsent::Stalled), discarded),
            Err(e) => (done, Err(Unsent::Failed(self.send_failed(e))), discarded),
        }
    }

    /// Adds a call to the pending table.
    fn register(&self, id: u64, waiter: Waiter) {
        self.register_all([(id, waiter)]);
    }

    /// [`register`](ClientConn::register)s each call under one lock.
    fn register_all(&self, calls: impl IntoIterator<Item = (u64, Waiter)>) {
        let mut pending = self.pending.lock();
        let mut sooner = false;
        for (id, waiter) in calls {
            if let Waiter::Callback(Callback {
                deadline: Some(d), ..
            }) = &waiter
                && pending.earliest.is_none_or(|e| *d < e)
            {
                pending.earliest = Some(*d);
                sooner = true;
            }
            pending.calls.insert(id, waiter);
        }
        if sooner {
            self.sooner.store(true, Ordering::Release);
        }
        self.pending_len
            .store(pending.unanswered(), Ordering::Release);
        drop(pending);
        if sooner {
            // The reader may sleep until a later deadline (or for its whole
            // slice): it wakes, sees `sooner` and waits again until ours.
            self.interrupt.interrupt();
            if self.driving.driven.load(Ordering::Acquire) {
                // Standing by, it naps instead.
                self.wake_reader();
            }
        }
    }

    /// Hands `result` to call `id`, if it still waits: a task's answer goes
    /// in its place in the table and the task is woken, a callback is
    /// called.
    fn settle(&self, id: u64, result: CallResult) {
        if let Some(s) = self.with_pending(|pending| pending.settle(id, result)) {
            s.finish(self);
        }
    }

    /// Takes call `id` out of the pending table (its task gave up);
    /// whether it was still waiting for its answer.
    fn forget(&self, id: u64) -> bool {
        self.with_pending(|pending| pending.forget(id))
    }

    /// The answer of task call `id` if it came (leaving `waker` to be woken
    /// when it does, if not).
    fn take_answer(&self, id: u64, waker: &Waker) -> Option<CallResult> {
        self.with_pending(|pending| pending.take_answer(id, waker))
    }

    /// Runs `f` on the pending table under its lock, keeping
    /// `pending_len` in step.
    fn with_pending<R>(&self, f: impl FnOnce(&mut PendingCalls) -> R) -> R {
        let mut pending = self.pending.lock();
        let r = f(&mut pending);
        self.pending_len
            .store(pending.unanswered(), Ordering::Release);
        r
    }

    /// Makes `sink` the receiver of this link's token calls' answers (it
    /// stays the first one set: a link serves one mesh handle).
    pub(crate) fn set_sink(&self, sink: &Arc<dyn AnswerSink>) {
        if self.driving.sink.get().is_none() {
            let _ = self.driving.sink.set(sink.clone());
        }
    }

    /// Notes that callback calls are made on this link, and gives what a
    /// callback call due per `due` is sent with: its request's header (its
    /// stream id still to set), its patience for ring space, and the
    /// instant its deadline passes.
    fn callback_request(&self, due: &mut Due) -> (FrameHeader, Patience, Option<Instant>) {
        if !self.driving.callbacks.load(Ordering::Relaxed) {
            self.driving.callbacks.store(true, Ordering::Relaxed);
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
    /// lock of each table, and the reader is woken once. Returns the calls
    /// not sent because the link takes no new calls (its instance drains,
    /// or it broke): the caller sends them elsewhere.
    pub(crate) fn call_tokens_then<'a>(
        self: &Arc<Self>,
        calls: impl IntoIterator<Item = (&'a [u8], u64)>,
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
    ) -> Vec<(&'a [u8], u64)> {
        if !self.takes_calls() {
            return calls.into_iter().collect();
        }
        let calls = calls.into_iter();
        let md = encode_metadata(metadata);
        let (header, patience, deadline) = self.callback_request(&mut due);
        // Finished once the locks are given back: those refused at once,
        // and those whose request could not be sent.
        let mut refused: Vec<(u64, Status)> = Vec::new();
        let mut unsent: Vec<(u64, SendError)> = Vec::new();
        let mut sent = 0usize;
        let streams = {
            let mut tx = self.tx.lock();
            if self.told_to_go_away() {
                return calls.collect();
            }
            let mut streams = Vec::with_capacity(calls.size_hint().0);
            for (payload, token) in calls {
                match self.limits.check_message(md.len(), payload.len()) {
                    Ok(()) => streams.push((tx.open_stream(), payload, token)),
                    Err(status) => refused.push((token, status)),
                }
            }
            if balanced {
                self.stats
                    .in_flight
                    .fetch_add(streams.len(), Ordering::Relaxed);
            }
            self.register_all(streams.iter().map(|&(id, _, token)| {
                let waiter = Waiter::Callback(Callback {
                    done: Done::Token(token),
                    _link: self.clone(),
                    deadline,
                    balanced,
                });
                (id, waiter)
            }));
            for &(id, payload, _) in &streams {
                let header = FrameHeader {
                    stream_id: StreamId(id),
                    ..header
                };
                match send_frame(&mut tx.sender, header, &md, payload, patience) {
                    Ok(()) => sent += 1,
                    Err(e) => unsent.push((id, e)),
                }
            }
            streams
        };
        self.settle_if_gone(streams.iter().map(|&(id, ..)| id));
        for (token, status) in refused {
            Done::Token(token).finish(self, Err(status));
        }
        for (id, e) in unsent {
            let status = self.send_failed(e);
            self.settle(id, Err(status));
        }
        if sent > 0
            && self.pollers.load(Ordering::Acquire) == 0
            && !self.driving.driven.load(Ordering::Acquire)
        {
            self.wake_reader();
        }
        Vec::new()
    }

    /// Sends a request whose answer goes to `done`, called on the thread
    /// that reads the answer (or on this one if the call fails at once).
    /// `Err(done)` when nothing was sent because the link takes no new
    /// calls (its instance drains, or it broke): the caller sends the call
    /// elsewhere.
    /// The link's reader thread enforces the deadline. `balanced`: as in
    /// [`call`](ClientConn::call).
    pub(crate) fn call_then(
        self: &Arc<Self>,
        payload: &[u8],
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
        done: Done,
    ) -> Result<(), Done> {
        if !self.takes_calls() {
            // Nothing sent: the caller sends it elsewhere.
            return Err(done);
        }
        let md = encode_metadata(metadata);
        if let Err(status) = self.limits.check_message(md.len(), payload.len()) {
            done.finish(self, Err(status));
            return Ok(());
        }
        let (header, patience, deadline) = self.callback_request(&mut due);
        let sent = {
            let mut tx = self.tx.lock();
            if self.told_to_go_away() {
                return Err(done);
            }
            if balanced {
                self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            }
            let waiter = Waiter::Callback(Callback {
                done,
                _link: self.clone(),
                deadline,
                balanced,
            });
            let id = tx.open_stream();
            self.register(id, waiter);
            let header = FrameHeader {
                stream_id: StreamId(id),
                ..header
            };
            let sent = send_frame(&mut tx.sender, header, &md, payload, patience);
            sent.map(|()| id).map_err(|e| (id, e))
        };
        match sent {
            Ok(id) => {
                self.settle_if_gone([id]);
                // The reader delivers the answer unless a caller polls or
                // an answer driver receives for this link.
                if self.pollers.load(Ordering::Acquire) == 0
                    && !self.driving.driven.load(Ordering::Acquire)
                {
                    self.wake_reader();
                }
            }
            Err((id, e)) => {
                let status = self.send_failed(e);
                self.settle(id, Err(status));
            }
        }
        Ok(())
    }

    /// Fails callback calls `ids` just registered if the link died
    /// meanwhile: [`fail_with`](ClientConn::fail_with) marks it dead before
    /// it empties the table, so a call it did not find is failed here (and
    /// one it failed is not found here). Without this, a call registered
    /// just after would wait for a reader that is gone, holding the link.
    fn settle_if_gone(&self, ids: impl IntoIterator<Item = u64>) {
        if self.is_alive() {
            return;
        }
        for id in ids {
            self.settle(id, Err(Status::unavailable("the instance is gone")));
        }
    }

    /// When the earliest deadline of a callback call has passed, fails the
    /// callback calls past their deadline (telling the server to stop).
    /// Returns the earliest deadline still pending.
    pub(crate) fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let expired: Vec<(u64, Settled)> = {
            let mut pending = self.pending.lock();
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
                .filter_map(|id| {
                    let late = Err(Status::deadline_exceeded("no response before the deadline"));
                    pending.settle(id, late).map(|s| (id, s))
                })
                .collect();
            pending.earliest = pending
                .calls
                .iter()
                .filter_map(|(_, w)| match w {
                    Waiter::Callback(c) => c.deadline,
                    Waiter::Task(_) | Waiter::Answered(_) => None,
                })
                .min();
            self.pending_len
                .store(pending.unanswered(), Ordering::Release);
            expired
        };
        for (id, s) in expired {
            self.stats.answered(Some(&Status::deadline_exceeded("")));
            self.cancel(id);
            s.finish(self);
        }
        self.pending.lock().earliest
    }

    /// Tells the server to stop working on `id` (best effort).
    pub(crate) fn cancel(&self, id: u64) {
        let _ = send_frame(
            &mut self.tx.lock().sender,
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
    pub(crate) fn claim(&self) -> bool {
        if self.driving.driven.load(Ordering::Relaxed)
            || self.driving.driven.swap(true, Ordering::SeqCst)
        {
            return false;
        }
        self.driving.was_driven.store(true, Ordering::Relaxed);
        // SYNC: SeqCst pairs with the reader's store of `asleep` and load of
        // `driven` before it parks: either it sees the claim and stands by,
        // or we see it asleep and wake it (a parked reader could not
        // receive for a driver that stops polling).
        if self.driving.asleep.load(Ordering::SeqCst) {
            self.wake_reader();
        }
        true
    }

    /// Gives the link's answers back to its reader thread.
    pub(crate) fn hand_back(&self) {
        self.driving.driven.store(false, Ordering::SeqCst);
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
    pub(crate) fn drive(
        &self,
        max: usize,
        mut local: Option<&mut Local<'_>>,
    ) -> (AnswerDrive, usize) {
        self.driving.polled.store(true, Ordering::Release);
        // Held by a caller polling, or by the reader receiving for us: it
        // completes the calls it finds; we look again next time.
        let Some(mut rx) = self.rx.try_lock() else {
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
            let mut pending = self.pending.lock();
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
                let token = match pending.calls.get_mut(id) {
                    Some(Waiter::Callback(Callback {
                        done: Done::Token(token),
                        balanced,
                        ..
                    })) if local.is_some() => Some((*token, *balanced)),
                    _ => None,
                };
                match (token, local.as_deref_mut()) {
                    (Some((token, balanced)), Some(local)) => {
                        pending.calls.remove(id);
                        if balanced {
                            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                        }
                        local(
                            token,
                            match answer {
                                AnswerRef::Response { payload, .. } => Ok(payload),
                                AnswerRef::Failed(status) => Err(status),
                            },
                        );
                    }
                    // Not found: given up on (timed out) before the answer
                    // came.
                    _ => others.extend(pending.settle(id, answer.into_result())),
                }
            }
            self.pending_len
                .store(pending.unanswered(), Ordering::Release);
        }
        for s in others {
            s.finish(self);
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
    pub(crate) fn has_answers(&self) -> bool {
        self.rx.try_lock().is_none_or(|rx| rx.has_data())
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        // Nothing more goes on the link: the instance learns it now, by a
        // GoAway of ours (unless sent already), not at the end of its
        // drain's grace (a server whose link no thread reads, an
        // embedder's, would not see the link close).
        if self.is_alive() {
            self.go_away();
            self.answer_go_away();
        }
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
    /// Not written: the link broke (and is now marked dead) before the
    /// request was in it. The payload is handed back; the call may go to
    /// a fresh link within its deadline.
    Unsent(Bytes, Status),
}

/// A call sent whose answer is still to come.
pub(crate) struct Waiting<'a> {
    abandon: Abandon<'a>,
    pub(crate) due: Due,
    _in_flight: Option<Counted<'a>>,
}

/// A call still waiting for its answer: if dropped armed (the caller gave
/// up), it takes the call out of the pending table and sends Cancel, unless
/// the answer came meanwhile.
struct Abandon<'a> {
    pub(crate) conn: &'a ClientConn,
    pub(crate) id: u64,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.armed && self.conn.forget(self.id) {
            self.conn.cancel(self.id);
        }
    }
}

/// How long a caller polls: the clock is first read after a while, so a
/// quick answer costs no clock read at all.
struct SpinBudget {
    pub(crate) spin: Duration,
    pub(crate) end: Option<Instant>,
    pub(crate) round: u32,
    /// Rounds per clock read.
    pub(crate) every: u32,
}

impl SpinBudget {
    pub(crate) fn new(spin: Duration, every: u32) -> SpinBudget {
        SpinBudget {
            spin,
            end: None,
            round: 0,
            every,
        }
    }

    /// Counts a round that checks nothing.
    pub(crate) fn round(&mut self) {
        self.round = self.round.wrapping_add(1);
    }

    /// Whether the next [`spent`](SpinBudget::spent) reads the clock.
    fn checks_now(&self) -> bool {
        self.round.wrapping_add(1).is_multiple_of(self.every)
    }

    /// Whether polling should stop: the budget or the call's deadline is
    /// reached (checks the clock every `every` rounds).
    fn spent(&mut self, due: &mut Due) -> bool {
        self.round = self.round.wrapping_add(1);
        if !self.round.is_multiple_of(self.every) {
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
    pub(crate) conn: &'a ClientConn,
    /// Pollers before this one.
    ahead: usize,
}

impl<'a> Poller<'a> {
    pub(crate) fn enter(conn: &'a ClientConn) -> Poller<'a> {
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

/// The sending half of a client link and its stream numbering.
pub(crate) struct TxState {
    sender: LinkSender,
    /// The next stream id: client-opened streams use odd ids.
    next_stream: u64,
    /// The peer's count of messages it discarded unread, as last read.
    discarded_seen: u64,
    /// The pool's retry budget, which every request deposits into.
    health: Arc<PoolHealth>,
}

impl TxState {
    /// Takes a fresh stream id, and counts the request in the pool's
    /// retry budget (one deposit of many requests every so often: the
    /// budget reads the clock).
    fn open_stream(&mut self) -> u64 {
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(2);
        if (id >> 1).is_multiple_of(DEPOSIT_LOT) {
            self.health.requested(DEPOSIT_LOT);
        }
        id
    }

    /// Messages the peer discarded unread since the last look (a
    /// subscriber's `DropOldest` queue). The count is the untrusted peer's:
    /// it is believed only as far as it rises and stays within the frames
    /// this side sent.
    fn take_discarded(&mut self) -> u64 {
        let now = self.sender.peer_discarded().min(self.next_stream / 2);
        let new = now.saturating_sub(self.discarded_seen);
        self.discarded_seen += new;
        new
    }
}

/// What sending published messages to one subscriber did
/// ([`ClientConn::send_publish_many`]).
pub(crate) struct SentPublish {
    /// Messages written into its ring.
    pub(crate) sent: usize,
    /// Messages this side sent earlier that the subscriber discarded unread
    /// since the last send looked (policy `DropOldest`).
    pub(crate) discarded: u64,
    /// Why the rest were not sent.
    pub(crate) result: Result<(), Unsent>,
}

impl Done {
    /// Hands `result` over.
    pub(crate) fn finish(self, conn: &ClientConn, result: CallResult) {
        match self {
            Done::Call(f) => f(result),
            Done::Token(token) => {
                // Set before any token call is made on the link.
                if let Some(sink) = conn.driving.sink.get() {
                    sink.answer(token, result);
                }
            }
        }
    }
}

impl Callback {
    /// Hands `result` to the callback.
    fn complete(self, conn: &ClientConn, result: CallResult) {
        if self.balanced {
            conn.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.done.finish(conn, result);
    }
}

impl Settled {
    /// Wakes the task whose answer was put in its place, or calls the
    /// callback (with the table unlocked).
    fn finish(self, conn: &ClientConn) {
        match self {
            Settled::Task(waker) => {
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Settled::Callback(c, result) => c.complete(conn, result),
        }
    }
}

/// Why a frame with no answer (a published message, a one-way) was not
/// sent.
#[derive(Debug)]
pub(crate) enum Unsent {
    /// The peer's ring stayed full for the sender's patience (for a
    /// published message, the stall time: the link was ended).
    Stalled,
    /// Anything else (the link is gone, the message too large).
    Failed(Status),
}
