//! Answers received by an embedder's own thread: the [`AnswerDriver`] of a
//! mesh handle polls the links of its callback and token calls at every
//! turn of the embedder's event loop, and an [`AnswerSink`] takes the
//! answers of token calls found elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use commy_core::Status;
use parking_lot::Mutex;

use crate::call::shm::{AnswerDrive, ClientConn, Local};

pub use crate::call::table::AnswerSink;

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
    pub(crate) claims: Arc<Claims>,
    /// Polled at every [`poll`](AnswerDriver::poll).
    pub(crate) busy: Vec<Arc<ClientConn>>,
    /// Came up empty (at the instant kept with each): looked at again at
    /// every poll, and given back once empty for `hold` (at once if no call
    /// is pending on it).
    resting: Vec<(Arc<ClientConn>, Instant)>,
    /// How long a link may stay empty before it is given back.
    pub(crate) hold: Duration,
}

impl std::fmt::Debug for AnswerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerDriver")
            .field("links", &(self.busy.len() + self.resting.len()))
            .finish_non_exhaustive()
    }
}

/// Links claimed for an [`AnswerDriver`] since its last poll, and where the
/// answers to its handle's token calls go.
#[derive(Default)]
pub(crate) struct Claims {
    pub(crate) list: Mutex<ClaimList>,
    /// `!list.conns.is_empty()`, readable without the lock.
    pub(crate) any: AtomicBool,
    /// Set if the driver was made with a sink ([`Mesh::drive_answers_with`]).
    ///
    /// [`Mesh::drive_answers_with`]: crate::Mesh::drive_answers_with
    pub(crate) sink: Option<Arc<dyn AnswerSink>>,
}

#[derive(Default)]
pub(crate) struct ClaimList {
    pub(crate) closed: bool,
    pub(crate) conns: Vec<Arc<ClientConn>>,
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
        let mut list = self.list.lock();
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
                    c.driving.polled.store(true, Ordering::Release);
                    true
                }
            });
        }
        if self.claims.any.load(Ordering::Acquire) {
            let mut list = self.claims.list.lock();
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
            let mut list = self.claims.list.lock();
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
