//! Requests taken out of a driven link by their poller
//! ([`PolledRequest`]), answered straight into the link.

use std::sync::Arc;

use commy_core::{Status, StreamId};

use crate::serve::link::{Answering, LinkShared, send_answer_locked};

/// A request taken out of a driven link by
/// [`DrivenLink::poll_requests`](crate::embed::DrivenLink::poll_requests), for its poller to answer once, now or
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
    pub(crate) link: Option<Arc<LinkShared>>,
    pub(crate) id: StreamId,
    /// A one-way message: answering it only releases what it holds.
    pub(crate) one_way: bool,
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
            let answering = Answering::start(&link);
            {
                let mut polled = link.polled.lock();
                for (id, _, flag) in &mut group {
                    let one_way = *flag;
                    *flag = !one_way && polled.remove(&id.0);
                    if one_way || *flag {
                        n += 1;
                    }
                }
            }
            {
                let mut tx = link.tx.lock();
                for (id, answer, send) in group.drain(..) {
                    if send {
                        let answer = answer.map(|p| (&[][..], p));
                        send_answer_locked(&mut tx, &link.limits, id, answer, false);
                    }
                }
            }
            drop(answering);
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
pub(crate) const POLLED_PERMITS: usize = 32;

/// Permits a poll took for requests it has not handed out (yet), each
/// counted in progress: given back when dropped.
pub(crate) struct HeldPermits {
    pub(crate) link: Arc<LinkShared>,
    pub(crate) n: usize,
}

impl Drop for HeldPermits {
    fn drop(&mut self) {
        self.link.release_polled(self.n);
    }
}
