//! The sending side of one served shared-memory link, shared by its
//! requests: answers written into the ring from whichever thread answers,
//! and the requests not answered inline (a Cancel frame stops them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use commy_core::{Code, FrameHeader, FrameKind, Limits, Status, StreamId};
use commy_shm::link::{LinkSender, SendError};
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::response::Response;
use crate::serve::cancel::Shared;
use crate::serve::load::{Load, handled_n};
use crate::serve::request::Caller;
use crate::wire::{Patience, encode_metadata, send_frame, stage_frame};

/// What one served link's requests share with it, in one allocation (a
/// request answered later holds the link with one reference): the link's
/// sending half, and the requests not answered inline, by stream id
/// (removing an entry marks the answer unwanted).
pub(crate) struct LinkShared {
    pub(crate) tx: Mutex<LinkSender>,
    pub(crate) running: Mutex<FxHashMap<u64, Pending>>,
    /// The [`PolledRequest`]s handed out and neither answered nor given up
    /// by their callers, by stream id (removing one releases what it holds:
    /// whoever removes it, the answer, a Cancel frame or the link closing).
    pub(crate) polled: Mutex<FxHashSet<u64>>,
    /// The served service's load (what polled requests release).
    pub(crate) load: Arc<Load>,
    /// The frame limits answers are checked against.
    pub(crate) limits: Limits,
    /// Who is at the other end (every request of the link comes from it).
    pub(crate) caller: Caller,
    /// Set by the link's thread while more requests wait behind the one it
    /// handles: the answers it gives inline are staged, and made visible
    /// together when the burst ends ([`LinkShared::flush`]).
    pub(crate) staging: AtomicBool,
    /// Set once the service told the client to go away (its drain).
    pub(crate) going_away: AtomicBool,
    /// Set once the client answered with a GoAway of its own: it sends no
    /// new request on the link.
    pub(crate) client_done: AtomicBool,
    /// Answers taken out of `running` or `polled` and not written yet (a
    /// drained link closes only once they are out: see [`Answering`]).
    pub(crate) answering: AtomicUsize,
}

/// An answer on its way out of a link's `running` or `polled` requests
/// into the ring: counted from before its request leaves them until it is
/// written (dropped), so that a link looking drained is not closed under
/// it.
pub(crate) struct Answering<'a>(&'a AtomicUsize);

impl<'a> Answering<'a> {
    pub(crate) fn start(link: &'a LinkShared) -> Answering<'a> {
        // SYNC: SeqCst, and before the request leaves its table (under
        // that table's lock): whoever finds the table empty sees it.
        link.answering.fetch_add(1, Ordering::SeqCst);
        Answering(&link.answering)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LinkShared {
    /// Tells the client to open no new stream on this link (a GoAway
    /// frame, docs/PROTOCOL.md 10.1); the link's thread closes it once the
    /// client answered and nothing is in progress. Once per link.
    pub(crate) fn go_away(&self) {
        if self.going_away.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut tx = self.tx.lock();
        let _ = send_frame(
            &mut tx,
            FrameHeader::new(FrameKind::GoAway, StreamId(0)),
            &[],
            b"the service is draining",
            Patience::DEFAULT,
        );
    }

    /// Whether the link may close: the client said it sends no more, and
    /// no request of it is in progress.
    pub(crate) fn drained(&self) -> bool {
        self.client_done.load(Ordering::Acquire)
            && self.running.lock().is_empty()
            && self.polled.lock().is_empty()
            && self.answering.load(Ordering::SeqCst) == 0
    }

    /// Makes the staged answers visible to the client.
    pub(crate) fn flush(&self) {
        self.tx.lock().flush();
    }

    /// Sends an answer given inline by the link's thread: staged while a
    /// burst of requests lasts (see `staging`), else at once.
    pub(crate) fn reply_inline(&self, id: StreamId, result: Result<Response, Status>) {
        let staged = self.staging.load(Ordering::Relaxed);
        let mut tx = self.tx.lock();
        match result {
            Ok(resp) => {
                let md = encode_metadata(&resp.metadata);
                send_answer_locked(&mut tx, &self.limits, id, Ok((&md, &resp.payload)), staged);
            }
            Err(status) => send_answer_locked(&mut tx, &self.limits, id, Err(status), staged),
        }
    }

    /// Gives back `n` permits taken for [`PolledRequest`]s of this link
    /// (answered, given up, or never handed out) and their counts as
    /// requests in progress.
    pub(crate) fn release_polled(&self, n: usize) {
        self.load.permits.give_n(n);
        handled_n(&self.load, n);
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
    pub(crate) fn cancel(self) {
        match self {
            Pending::Task(Some(task)) => task.abort(),
            Pending::Task(None) => {}
            Pending::Deferred(shared) => shared.cancel(),
        }
    }
}

/// Where a deferred handler's answer goes on shared memory.
pub(crate) struct LinkAnswer {
    pub(crate) link: Arc<LinkShared>,
    pub(crate) limits: Limits,
    pub(crate) id: StreamId,
}

impl LinkAnswer {
    /// Writes the answer into the link, unless the caller gave up.
    pub(crate) fn answer(self, result: Result<Response, Status>) -> bool {
        let answering = Answering::start(&self.link);
        let wanted = self.wanted();
        if wanted {
            reply(&self.link.tx, &self.limits, self.id, result);
        }
        drop(answering);
        wanted
    }

    /// Writes an answer of `payload` (and no metadata) into the link,
    /// unless the caller gave up.
    pub(crate) fn answer_payload(self, payload: &[u8]) -> bool {
        let answering = Answering::start(&self.link);
        let wanted = self.wanted();
        if wanted {
            send_answer(&self.link.tx, &self.limits, self.id, Ok((&[], payload)));
        }
        drop(answering);
        wanted
    }

    /// Whether the caller still waits: takes the request out of the
    /// link's running ones.
    fn wanted(&self) -> bool {
        self.link.running.lock().remove(&self.id.0).is_some()
    }
}

/// Sends a handler's result back on the link (best effort: a client that is
/// gone gets nothing).
pub(crate) fn reply(
    tx: &Mutex<LinkSender>,
    limits: &Limits,
    id: StreamId,
    result: Result<Response, Status>,
) {
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
pub(crate) fn send_answer(
    tx: &Mutex<LinkSender>,
    limits: &Limits,
    id: StreamId,
    answer: Result<(&[u8], &[u8]), Status>,
) {
    let mut tx = tx.lock();
    send_answer_locked(&mut tx, limits, id, answer, false);
}

/// [`send_answer`] on a link whose sending half is locked already;
/// `staged`: written but left for a later publication (a flush, or the next
/// answer sent at once).
pub(crate) fn send_answer_locked(
    tx: &mut LinkSender,
    limits: &Limits,
    id: StreamId,
    answer: Result<(&[u8], &[u8]), Status>,
    staged: bool,
) {
    let write = if staged { stage_frame } else { send_frame };
    let answer =
        answer.and_then(
            |(md, payload)| match limits.check_message(md.len(), payload.len()) {
                Ok(()) => Ok((md, payload)),
                Err(status) => {
                    tracing::warn!("refusing a handler's response: {}", status.message());
                    Err(status)
                }
            },
        );
    let sent = match answer {
        Ok((md, payload)) => write(
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
            write(
                tx,
                FrameHeader::new(FrameKind::Error, id),
                &[],
                &status.encode(),
                Patience::DEFAULT,
            )
        }
    };
    match sent {
        Ok(()) => {}
        // A broken link (closed, corrupt): the client would wait for this
        // answer in vain. Ending the link tells it, whatever its memory
        // says, and it connects anew.
        Err(e @ SendError::Ring(_)) => {
            tracing::debug!("a response could not be sent, ending the link: {e}");
            tx.abort();
        }
        Err(e) => tracing::debug!("could not send a response: {e}"),
    }
}
