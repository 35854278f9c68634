//! The deadline a handler's own calls inherit: while a handler (its
//! function, then each poll of its future) runs, the deadline of the
//! request it handles is this thread's, and every call made there is due
//! by it at the latest, over either transport, without the handler
//! passing it on. Work the handler hands to another task or thread does
//! not inherit it (as with a task-local).
//!
//! A deadline that came off the wire as time left is anchored to the
//! clock only when a call first needs it or the handler first has to
//! wait, as the request's own is ([`Request::deadline`](crate::Request::deadline)):
//! a handler that answers at once and makes no call reads no clock for it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use commy_core::Deadline;

use crate::serve::request::ArrivedDeadline;

/// The deadline a handler's calls inherit, as it is carried between polls.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) enum Inherited {
    /// None: the request has no deadline, or no handler runs.
    #[default]
    None,
    /// Time left when the request arrived, not anchored yet.
    Left(Duration),
    /// Anchored.
    At(Deadline),
}

impl Inherited {
    /// What a handler of a request with `deadline` inherits (an anchor
    /// taken already is kept).
    pub(crate) fn of(deadline: &ArrivedDeadline) -> Inherited {
        match deadline.anchored() {
            Ok(Some(at)) => Inherited::At(at),
            Ok(None) => Inherited::None,
            Err(left) => Inherited::Left(left),
        }
    }
}

thread_local! {
    static INHERITED: Cell<Inherited> = const { Cell::new(Inherited::None) };
}

/// The deadline of the request whose handler runs on this thread now, if
/// it has one: calls made here are due by it at the latest.
pub fn inherited_deadline() -> Option<Deadline> {
    INHERITED.with(|c| match c.get() {
        Inherited::None => None,
        Inherited::At(at) => Some(at),
        Inherited::Left(left) => {
            let at = Deadline::after_at(left, Instant::now());
            c.set(Inherited::At(at));
            Some(at)
        }
    })
}

/// The earlier of `own` (a call's own deadline) and the inherited one:
/// when a call made on this thread is due.
pub(crate) fn due_by_inherited(own: Option<Deadline>) -> Option<Deadline> {
    match (own, inherited_deadline()) {
        (Some(own), Some(inherited)) => Some(own.min(inherited)),
        (own, inherited) => own.or(inherited),
    }
}

/// Runs `f` with `inherited` as this thread's inherited deadline, and
/// keeps in it the anchor a call took meanwhile; the one before comes back
/// after, also if `f` panics.
pub(crate) fn scope<R>(inherited: &mut Inherited, f: impl FnOnce() -> R) -> R {
    struct Restore<'a> {
        before: Inherited,
        keep: &'a mut Inherited,
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            *self.keep = INHERITED.with(|c| c.replace(self.before));
        }
    }
    let before = INHERITED.with(|c| c.replace(*inherited));
    let _restore = Restore {
        before,
        keep: inherited,
    };
    f()
}

pin_project_lite::pin_project! {
    /// A handler's future, polled with its request's deadline inherited.
    pub(crate) struct Inherit<F> {
        inherited: Inherited,
        #[pin]
        fut: F,
    }
}

impl<F> Inherit<F> {
    pub(crate) fn new(inherited: Inherited, fut: F) -> Inherit<F> {
        Inherit { inherited, fut }
    }
}

impl<F: Future> Future for Inherit<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = scope(this.inherited, || this.fut.poll(cx));
        if polled.is_pending()
            && let Inherited::Left(left) = *this.inherited
        {
            // The handler has to wait: the request's own deadline is
            // anchored now (see `Request::deadline`), and so is this one,
            // not later at the handler's first call.
            *this.inherited = Inherited::At(Deadline::after_at(left, Instant::now()));
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_lends_its_deadline_and_keeps_the_anchor_taken() {
        assert_eq!(inherited_deadline(), None);
        let mut left = Inherited::Left(Duration::from_secs(5));
        let first = scope(&mut left, inherited_deadline).unwrap();
        assert!(
            matches!(left, Inherited::At(at) if at == first),
            "anchored once"
        );
        assert_eq!(scope(&mut left, inherited_deadline), Some(first));
        let mut none = Inherited::None;
        let inner = scope(&mut left, || scope(&mut none, inherited_deadline));
        assert_eq!(inner, None, "the innermost scope's");
        assert_eq!(inherited_deadline(), None, "restored after");
        let panicked = std::panic::catch_unwind(|| {
            let mut at = Inherited::At(first);
            scope(&mut at, || panic!("a handler panics"))
        });
        assert!(panicked.is_err());
        assert_eq!(inherited_deadline(), None, "restored after a panic");
    }
}
