//! The calls in flight on one client link, by stream id, and who waits for
//! each answer: a task, a callback or an answer sink. A task's answer is
//! put in its call's place in the table, where the task takes it: waiting
//! for an answer allocates nothing.

use std::any::Any;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use commy_core::Status;
use rustc_hash::FxHashMap;

use crate::response::Response;

/// The result a pending call receives.
pub(crate) type CallResult = Result<Response, Status>;

/// Receives the answers to token calls ([`Mesh::call_token`]) that are
/// not handed to an [`AnswerDriver::poll_with`](crate::embed::AnswerDriver::poll_with) callback: those read by
/// the links' reader threads, those that fail or time out, and those a
/// plain [`AnswerDriver::poll`](crate::embed::AnswerDriver::poll) takes. Called on whichever thread finds the
/// answer; it must not block (queue the result and wake whoever waits).
///
/// [`Mesh::call_token`]: crate::Mesh::call_token
pub trait AnswerSink: Send + Sync + 'static {
    /// Call `token` finished with `result`.
    fn answer(&self, token: u64, result: Result<Response, Status>);
}

/// Calls waiting for their answers, by stream id.
#[derive(Default)]
pub(crate) struct PendingCalls {
    pub(crate) calls: CallTable,
    /// Entries of `calls` that hold an answer its task has not taken yet
    /// ([`Waiter::Answered`]).
    pub(crate) answered: usize,
    /// No callback call's deadline is earlier (it may be earlier than all
    /// of them: answered calls do not move it).
    pub(crate) earliest: Option<Instant>,
}

impl PendingCalls {
    /// Calls still waiting for their answer to come from the ring.
    pub(crate) fn unanswered(&self) -> usize {
        self.calls.len() - self.answered
    }

    /// Hands `result` to call `id`: a task's answer is put in its place
    /// and its waker returned (to wake once the table is unlocked); a
    /// callback's is taken out and returned with it, to be completed then.
    /// `None` if the call is not (or no longer) waiting.
    pub(crate) fn settle(&mut self, id: u64, result: CallResult) -> Option<Settled> {
        match self.calls.get_mut(id)? {
            Waiter::Task(waker) => {
                let waker = waker.take();
                *self.calls.get_mut(id)? = Waiter::Answered(result);
                self.answered += 1;
                Some(Settled::Task(waker))
            }
            // A second answer to the same stream: the first one counts.
            Waiter::Answered(_) => None,
            Waiter::Callback(_) => match self.calls.remove(id)? {
                Waiter::Callback(c) => Some(Settled::Callback(c, result)),
                _ => None,
            },
        }
    }

    /// Takes the answer of task call `id` if it came, else leaves `waker`
    /// to be woken when it does. `Some(Err)` if the call is not in the
    /// table (it cannot be answered any more).
    pub(crate) fn take_answer(&mut self, id: u64, waker: &Waker) -> Option<CallResult> {
        match self.calls.get_mut(id) {
            None => Some(Err(Status::unavailable(
                "the instance went away during the call",
            ))),
            Some(Waiter::Task(slot)) => {
                match slot {
                    Some(w) if w.will_wake(waker) => {}
                    _ => *slot = Some(waker.clone()),
                }
                None
            }
            Some(Waiter::Answered(_)) => match self.calls.remove(id) {
                Some(Waiter::Answered(result)) => {
                    self.answered -= 1;
                    Some(result)
                }
                _ => None,
            },
            Some(Waiter::Callback(_)) => None,
        }
    }

    /// Takes call `id` out (its task gave up). Returns whether it was
    /// still waiting for its answer (the server may be told to stop).
    pub(crate) fn forget(&mut self, id: u64) -> bool {
        match self.calls.remove(id) {
            Some(Waiter::Answered(_)) => {
                self.answered -= 1;
                false
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// What [`PendingCalls::settle`] found waiting.
pub(crate) enum Settled {
    /// A task, whose answer is in the table now: wake it.
    Task(Option<Waker>),
    /// A callback call: complete it with the result.
    Callback(Callback, CallResult),
}

/// Pending calls by stream id: a table indexed by the id itself. Ids are
/// handed out in sequence, so the calls in flight sit in neighbouring slots:
/// adding and removing one hashes nothing and touches a line or two that
/// the calls before it touched too. A call still waiting when a newer id
/// comes to its slot (the table wrapped around it) puts the newer one in an
/// overflow map.
#[derive(Default)]
pub(crate) struct CallTable {
    /// A power of two long (or empty until the first call).
    slots: Vec<Option<(u64, Waiter)>>,
    overflow: FxHashMap<u64, Waiter>,
    pub(crate) len: usize,
}

/// The table's first size, and the largest it grows to (it doubles while
/// more than half as many calls as slots are pending).
const CALL_SLOTS_MIN: usize = 64;
const CALL_SLOTS_MAX: usize = 1 << 14;

impl CallTable {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn slot(&self, id: u64) -> usize {
        // Client stream ids are odd: consecutive ids, consecutive slots.
        (id >> 1) as usize & (self.slots.len() - 1)
    }

    pub(crate) fn insert(&mut self, id: u64, waiter: Waiter) {
        if self.slots.is_empty() {
            self.slots.resize_with(CALL_SLOTS_MIN, || None);
        } else if self.len >= self.slots.len() / 2 && self.slots.len() < CALL_SLOTS_MAX {
            self.grow();
        }
        self.place(id, waiter);
        self.len += 1;
    }

    /// Puts a call in its slot, or in the overflow map if that is taken.
    pub(crate) fn place(&mut self, id: u64, waiter: Waiter) {
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

    /// The call `id`, to change in place.
    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Waiter> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.slot(id);
        match &self.slots[i] {
            Some((held, _)) if *held == id => self.slots[i].as_mut().map(|(_, w)| w),
            _ => self.overflow.get_mut(&id),
        }
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Waiter> {
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
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Waiter)> {
        let slots = self.slots.iter().flatten().map(|(id, w)| (*id, w));
        slots.chain(self.overflow.iter().map(|(id, w)| (*id, w)))
    }
}

/// Who gets a pending call's answer.
pub(crate) enum Waiter {
    /// A calling task, and its waker once it waits.
    Task(Option<Waker>),
    /// A calling task's answer, until the task takes it.
    Answered(CallResult),
    /// A callback (`ClientConn::call_then`).
    Callback(Callback),
}

/// A call answered through a callback.
pub(crate) struct Callback {
    pub(crate) done: Done,
    /// The link (its `ClientConn`), kept until the call is answered: no
    /// task holds it meanwhile, and its pool may let it go (the instance
    /// drains or left discovery) while the answer is still to come.
    pub(crate) _link: Arc<dyn Any + Send + Sync>,
    pub(crate) deadline: Option<Instant>,
    /// Counted in the link's calls in flight (`ClientConn::in_flight`).
    pub(crate) balanced: bool,
}

/// Where a callback call's answer goes.
pub(crate) enum Done {
    /// A function of the caller's ([`Mesh::call_then`](crate::Mesh::call_then)).
    Call(Box<dyn FnOnce(CallResult) + Send>),
    /// The answer sink of the caller's mesh handle, named by the caller's
    /// token ([`Mesh::call_token`](crate::Mesh::call_token)).
    Token(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_waiter() -> Waiter {
        Waiter::Task(None)
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
        for id in live.iter().filter(|i| **i != 1) {
            assert!(table.remove(*id).is_some(), "call {id} lost");
        }
        assert_eq!(table.len(), 0);
        assert_eq!(table.iter().count(), 0);
    }

    /// A task's answer waits in its place until the task takes it; the
    /// task's waker is handed back to be woken; a second answer, or one
    /// for a call given up, finds nothing; a task that gives up learns
    /// whether its answer had come.
    #[test]
    fn a_task_answer_waits_in_its_place() {
        let mut pending = PendingCalls::default();
        pending.calls.insert(1, Waiter::Task(None));
        pending.calls.insert(3, Waiter::Task(None));
        assert_eq!(pending.unanswered(), 2);
        // Not answered yet: the waker stays.
        assert!(pending.take_answer(1, Waker::noop()).is_none());
        match pending.settle(1, Err(Status::internal("x"))) {
            Some(Settled::Task(Some(_))) => {}
            _ => panic!("the waiting task was not handed back"),
        }
        assert_eq!(pending.unanswered(), 1);
        assert!(pending.settle(1, Err(Status::internal("again"))).is_none());
        let taken = pending.take_answer(1, Waker::noop()).unwrap();
        assert_eq!(taken.unwrap_err().message(), "x");
        // Taken out: a later look finds the call gone.
        assert!(pending.take_answer(1, Waker::noop()).unwrap().is_err());
        assert_eq!(pending.calls.len(), 1);
        // Giving up before the answer: the server may be told to stop.
        assert!(pending.forget(3));
        assert!(pending.settle(3, Err(Status::internal("late"))).is_none());
        pending.calls.insert(5, Waiter::Task(None));
        assert!(pending.settle(5, Err(Status::internal("y"))).is_some());
        // After it: nothing to stop, and nothing left.
        assert!(!pending.forget(5));
        assert_eq!((pending.calls.len(), pending.answered), (0, 0));
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
}
