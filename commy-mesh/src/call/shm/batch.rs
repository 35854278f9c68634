//! One caller's pipelined calls on a shared-memory link
//! ([`ClientConn::call_batch`], behind `Mesh::call_many`): the requests
//! staged back to back and published a burst at a time, the answers taken
//! many per look while the caller owns the receive ring, the rest
//! delivered by the link's reader through the pending table.

use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use commy_core::{FrameHeader, FrameKind, Metadata, Status, StreamId};
use commy_shm::LinkReceiver;
use commy_shm::link::RecvError;

use super::{ClientConn, SpinBudget};
use crate::call::deadline::Due;
use crate::call::table::{CallResult, Waiter};
use crate::wire::{encode_metadata, stage_frame};

impl ClientConn {
    /// Calls with each of `payloads` at once: one caller's pipelined
    /// calls. The requests are written back to back and published
    /// together; the answers are taken as they come, many per look at the
    /// ring, by this caller while it spins (`spin`: instead of the link's)
    /// and then by the link's reader while it waits. The results are in
    /// the order of `payloads`. Dropped before the end, the calls still
    /// open are cancelled.
    pub(crate) async fn call_batch(
        &self,
        payloads: &[Bytes],
        metadata: &Metadata,
        mut due: Due,
        balanced: bool,
        spin: Option<Duration>,
    ) -> Vec<CallResult> {
        let mut results: Vec<Option<CallResult>> = (0..payloads.len()).map(|_| None).collect();
        if !self.is_alive() {
            let gone = Status::unavailable("the instance is gone");
            return results.into_iter().map(|_| Err(gone.clone())).collect();
        }
        let mut open = self.start_batch(payloads, metadata, &mut due, balanced, spin, &mut results);
        while !open.calls.is_empty() {
            let answered = std::future::poll_fn(|cx| {
                self.collect(&mut open, &mut results, cx.waker());
                if open.calls.is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            match due.absolute() {
                Some(d) => {
                    if tokio::time::timeout_at(d.instant().into(), answered)
                        .await
                        .is_err()
                    {
                        for (k, _) in &open.calls {
                            results[*k] = Some(Err(Status::deadline_exceeded(
                                "no response before the deadline",
                            )));
                        }
                        // Dropping `open` cancels them.
                        break;
                    }
                }
                None => answered.await,
            }
        }
        drop(open);
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Status::internal("a call of the batch got no result")))
            })
            .collect()
    }

    /// The synchronous part of [`ClientConn::call_batch`]: sends the
    /// requests and, owning the receive ring, takes the answers that come
    /// within the spin. Returns the calls still open (registered in the
    /// pending table, the reader woken for them).
    fn start_batch(
        &self,
        payloads: &[Bytes],
        metadata: &Metadata,
        due: &mut Due,
        balanced: bool,
        spin: Option<Duration>,
        results: &mut [Option<CallResult>],
    ) -> Batch<'_> {
        let md = encode_metadata(metadata);
        let mut open = Batch {
            conn: self,
            calls: Vec::with_capacity(payloads.len()),
            first: 0,
            sent: Vec::new(),
            in_flight: 0,
        };
        // Owning the receive ring, this caller takes the answers itself
        // while it spins, and its calls need no registration until then;
        // otherwise whoever owns it settles them through the table.
        let rx = self.rx.try_lock();
        {
            let mut tx = self.tx.lock();
            open.first = tx.next_stream;
            for (k, payload) in payloads.iter().enumerate() {
                match self.limits.check_message(md.len(), payload.len()) {
                    Ok(()) => {
                        let id = open.first.wrapping_add(2 * open.calls.len() as u64);
                        open.calls.push((k, id));
                    }
                    Err(status) => results[k] = Some(Err(status)),
                }
            }
            open.sent = open.calls.iter().map(|&(k, _)| k).collect();
            if rx.is_none() {
                self.register_all(open.calls.iter().map(|&(_, id)| (id, Waiter::Task(None))));
            }
            if balanced {
                open.in_flight = open.calls.len();
                self.stats
                    .in_flight
                    .fetch_add(open.in_flight, Ordering::Relaxed);
            }
            let header = FrameHeader {
                deadline_us: due.wire(),
                ..FrameHeader::new(FrameKind::Request, StreamId(0))
            };
            let patience = due.patience();
            let mut failed = None;
            for (sent, &(k, _)) in open.calls.iter().enumerate() {
                let header = FrameHeader {
                    stream_id: StreamId(tx.open_stream()),
                    ..header
                };
                if let Err(e) = stage_frame(&mut tx.sender, header, &md, &payloads[k], patience) {
                    failed = Some((sent, e));
                    break;
                }
                // Published every so many, so that the server starts on
                // a large batch while the rest is written.
                if (sent + 1) % SEND_BURST == 0 {
                    tx.sender.flush();
                }
            }
            tx.sender.flush();
            drop(tx);
            if let Some((sent, e)) = failed {
                let status = self.send_failed(e);
                for (k, id) in open.calls.drain(sent..) {
                    if rx.is_none() {
                        self.forget(id);
                    }
                    results[k] = Some(Err(status.clone()));
                }
            }
        }
        let Some(mut rx) = rx else {
            // Whoever owns the ring may be a caller that takes its own
            // answer and goes, leaving ours to a reader that parked while
            // nothing was pending: it is woken for them now (a single
            // call's `Poller` does the same when it leaves).
            self.wake_reader();
            return open;
        };
        rx.release();
        // The spin lasts while answers keep coming: it starts again with
        // each that does.
        let spin = spin.unwrap_or(self.spin);
        let mut spinning = SpinBudget::new(spin, 64);
        while !open.calls.is_empty() {
            match self.take_own(&mut rx, &mut open, results) {
                Err(status) => {
                    for (k, _) in open.calls.drain(..) {
                        results[k] = Some(Err(status.clone()));
                    }
                }
                Ok(0) if spinning.spent(due) => break,
                Ok(0) => std::hint::spin_loop(),
                Ok(_) => spinning = SpinBudget::new(spin, 64),
            }
        }
        if !open.calls.is_empty() {
            // Not all answered within the spin: the reader takes over.
            self.register_all(open.calls.iter().map(|&(_, id)| (id, Waiter::Task(None))));
            drop(rx);
            self.wake_reader();
        }
        open
    }

    /// Takes the answers waiting in the ring we own (a batch at a time):
    /// those of `batch`'s calls go straight into `results`, others' to
    /// their calls through the pending table. Returns how many of
    /// `batch`'s came, or the link's failure.
    fn take_own(
        &self,
        rx: &mut LinkReceiver,
        batch: &mut Batch<'_>,
        results: &mut [Option<CallResult>],
    ) -> Result<usize, Status> {
        const AT_ONCE: usize = 64;
        let mut others: smallvec::SmallVec<[(u64, CallResult); 4]> = smallvec::SmallVec::new();
        let mut malformed = false;
        let mut ours = 0;
        let taken = rx.try_recv_batch(AT_ONCE, |msg| match self.answer(msg) {
            Some((id, result)) => match batch.index(id) {
                Some(k) if results[k].is_none() => {
                    results[k] = Some(result);
                    ours += 1;
                }
                _ => others.push((id, result)),
            },
            None => malformed = true,
        });
        for (id, result) in others {
            self.settle(id, result);
        }
        if malformed {
            return Err(self.fail(RecvError::Protocol("malformed frame")));
        }
        if let Err(e) = taken {
            return Err(self.fail(e));
        }
        if ours > 0 {
            batch.calls.retain(|&(k, _)| results[k].is_none());
        }
        Ok(ours)
    }

    /// Moves the answers of `batch`'s calls that came into `results`
    /// (under one lock of the pending table), leaving `waker` with the
    /// others.
    fn collect(&self, batch: &mut Batch<'_>, results: &mut [Option<CallResult>], waker: &Waker) {
        self.with_pending(|pending| {
            batch
                .calls
                .retain(|&(k, id)| match pending.take_answer(id, waker) {
                    Some(result) => {
                        results[k] = Some(result);
                        false
                    }
                    None => true,
                });
        });
    }
}

/// Requests of a [`ClientConn::call_batch`] made visible together.
const SEND_BURST: usize = 64;

/// The calls of a [`ClientConn::call_batch`] still open, by their index in
/// the batch and stream id: dropped, it cancels them, and it counts them
/// in flight meanwhile (`in_flight`: how many it added).
struct Batch<'a> {
    conn: &'a ClientConn,
    calls: Vec<(usize, u64)>,
    /// The stream id of the batch's first call (the others follow, 2
    /// apart).
    first: u64,
    /// The index in the batch of each call sent, in the order of their
    /// streams.
    sent: Vec<usize>,
    in_flight: usize,
}

impl Batch<'_> {
    /// The index in the batch of the call on stream `id`, if it is one of
    /// them.
    fn index(&self, id: u64) -> Option<usize> {
        let n = id.wrapping_sub(self.first);
        let i = usize::try_from(n / 2)
            .ok()
            .filter(|_| n.is_multiple_of(2))?;
        self.sent.get(i).copied()
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for &(_, id) in &self.calls {
            if self.conn.forget(id) {
                self.conn.cancel(id);
            }
        }
        if self.in_flight > 0 {
            self.conn
                .stats
                .in_flight
                .fetch_sub(self.in_flight, Ordering::Relaxed);
        }
    }
}
