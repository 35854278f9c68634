//! When a call is due: one computation of a call's deadline, its wire
//! form and how long sending may wait, reading the clock only when needed.

use std::time::{Duration, Instant};

use commy_core::Deadline;

use crate::wire::Patience;

/// When a call must be answered: a timeout counted from the call's start
/// and/or an absolute deadline. The start is read from the clock only once
/// something needs it, so a call with just a timeout that is answered
/// quickly never reads the clock (the wire carries the timeout as is).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Due {
    pub(crate) timeout: Option<Duration>,
    pub(crate) deadline: Option<Deadline>,
    pub(crate) start: Option<Instant>,
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

    pub(crate) fn start(&mut self) -> Instant {
        *self.start.get_or_insert_with(Instant::now)
    }

    /// The absolute deadline, if any.
    pub(crate) fn absolute(&mut self) -> Option<Deadline> {
        let by_timeout = self.timeout.map(|t| Deadline::after_at(t, self.start()));
        match (by_timeout, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the deadline has passed (reads the clock if there is one).
    pub(crate) fn expired(&mut self) -> bool {
        self.absolute().is_some_and(|d| d.is_expired())
    }

    /// The frame header's deadline field.
    pub(crate) fn wire(&mut self) -> u64 {
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
    pub(crate) fn patience(&mut self) -> Patience {
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
