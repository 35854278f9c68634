//! [`Deadline`]: the point in time after which a caller no longer wants an
//! answer, and its wire form.
//!
//! A deadline is an absolute [`Instant`] on the local monotonic clock. Clocks
//! of different processes (let alone hosts) are not comparable, so on the wire
//! a deadline travels as the time *remaining* when the frame is encoded, in
//! whole microseconds (`u64`):
//!
//! - `0` means "no deadline";
//! - any other value `n` means "`n` µs from when the receiver decodes it";
//! - the remaining time is rounded *down*, so a callee's deadline never ends
//!   later than the caller's (the time a frame spends in flight only makes the
//!   callee's view later, never earlier — propagation is conservative);
//! - remaining times too large for `u64` saturate at `u64::MAX` (~584,000 years);
//! - a deadline with less than 1 µs left, or already expired, encodes as `1`,
//!   never as `0`: an expired deadline must not turn into "no deadline". The
//!   receiver sees a deadline 1 µs away and drops the request as expired.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use commy_core::Deadline;
//!
//! let now = Instant::now();
//! let deadline = Deadline::at(now + Duration::from_millis(250));
//! assert_eq!(deadline.to_wire_at(now), 250_000);
//! assert!(!deadline.is_expired_at(now));
//!
//! // The callee rebuilds it against its own clock.
//! let later = now + Duration::from_millis(10);
//! let remote = Deadline::from_wire_at(250_000, later).expect("nonzero means a deadline");
//! assert_eq!(remote.remaining_at(later), Duration::from_millis(250));
//!
//! assert_eq!(Deadline::from_wire(0), None);
//! assert_eq!(Deadline::to_wire_option(None), 0);
//! assert_eq!(Deadline::at(now).to_wire_at(later), 1); // expired, still a deadline
//! ```

use std::time::{Duration, Instant};

/// Wire value meaning "no deadline".
pub const NO_DEADLINE: u64 = 0;

/// Stand-in for durations an [`Instant`] cannot represent: ~100 years.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// An absolute deadline on the local monotonic clock.
///
/// `Ord` puts the earliest deadline first, so `a.min(b)` is the tighter one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at the given instant.
    pub const fn at(instant: Instant) -> Deadline {
        Deadline(instant)
    }

    /// A deadline `timeout` from now.
    ///
    /// Timeouts beyond what [`Instant`] can represent are clamped to about
    /// 100 years, which is indistinguishable from "never" for a request.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline::after_at(timeout, Instant::now())
    }

    /// A deadline `timeout` after `now` (clamped like [`Deadline::after`]).
    pub fn after_at(timeout: Duration, now: Instant) -> Deadline {
        let instant = now
            .checked_add(timeout)
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now);
        Deadline(instant)
    }

    /// The instant of the deadline.
    pub const fn instant(self) -> Instant {
        self.0
    }

    /// Time left until the deadline, zero if it has passed.
    pub fn remaining(self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// Time left at `now`, zero if the deadline has passed.
    pub fn remaining_at(self, now: Instant) -> Duration {
        self.0.saturating_duration_since(now)
    }

    /// Whether the deadline has passed.
    pub fn is_expired(self) -> bool {
        self.is_expired_at(Instant::now())
    }

    /// Whether the deadline has passed at `now` (a deadline equal to `now` has).
    pub fn is_expired_at(self, now: Instant) -> bool {
        self.0 <= now
    }

    /// The wire form (remaining µs, never 0) measured now.
    pub fn to_wire(self) -> u64 {
        self.to_wire_at(Instant::now())
    }

    /// The wire form measured at `now`: remaining whole microseconds, rounded
    /// down, saturating at `u64::MAX`, and at least 1.
    pub fn to_wire_at(self, now: Instant) -> u64 {
        let micros = self.remaining_at(now).as_micros();
        u64::try_from(micros).unwrap_or(u64::MAX).max(1)
    }

    /// The wire form of an optional deadline: [`NO_DEADLINE`] for `None`.
    pub fn to_wire_option(deadline: Option<Deadline>) -> u64 {
        deadline.map_or(NO_DEADLINE, Deadline::to_wire)
    }

    /// Rebuilds a deadline from its wire form, counting from now.
    /// [`NO_DEADLINE`] gives `None`.
    pub fn from_wire(micros: u64) -> Option<Deadline> {
        Deadline::from_wire_at(micros, Instant::now())
    }

    /// Rebuilds a deadline from its wire form, counting from `now`.
    /// [`NO_DEADLINE`] gives `None`.
    pub fn from_wire_at(micros: u64, now: Instant) -> Option<Deadline> {
        (micros != NO_DEADLINE).then(|| Deadline::after_at(Duration::from_micros(micros), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_and_expiry() {
        let now = Instant::now();
        let d = Deadline::after_at(Duration::from_secs(2), now);
        assert_eq!(d.instant(), now + Duration::from_secs(2));
        assert_eq!(d.remaining_at(now), Duration::from_secs(2));
        assert!(!d.is_expired_at(now));
        let after = now + Duration::from_secs(3);
        assert_eq!(d.remaining_at(after), Duration::ZERO);
        assert!(d.is_expired_at(after));
        assert!(d.is_expired_at(d.instant()));
    }

    #[test]
    fn wall_clock_helpers() {
        let d = Deadline::after(Duration::from_secs(60));
        assert!(!d.is_expired());
        assert!(d.remaining() <= Duration::from_secs(60));
        assert!(d.remaining() > Duration::from_secs(59));
        let wire = d.to_wire();
        assert!(wire > 59_000_000 && wire <= 60_000_000, "{wire}");
        let back = Deadline::from_wire(wire).unwrap();
        assert!(back.remaining() <= Duration::from_secs(60));
        let optional = Deadline::to_wire_option(Some(d));
        assert!(optional > 59_000_000 && optional <= wire, "{optional}");
        let past = Deadline::at(Instant::now());
        assert!(past.is_expired());
        assert_eq!(past.to_wire(), 1);
    }

    #[test]
    fn wire_rounds_down_and_never_zero() {
        let now = Instant::now();
        let d = Deadline::at(now + Duration::from_nanos(1_999));
        assert_eq!(d.to_wire_at(now), 1);
        let d = Deadline::at(now + Duration::from_nanos(999));
        assert_eq!(d.to_wire_at(now), 1);
        assert_eq!(Deadline::at(now).to_wire_at(now), 1);
        assert_eq!(
            Deadline::at(now).to_wire_at(now + Duration::from_secs(5)),
            1
        );
        let d = Deadline::at(now + Duration::from_micros(1_500_000));
        assert_eq!(d.to_wire_at(now), 1_500_000);
    }

    #[test]
    fn wire_none_and_round_trip() {
        let now = Instant::now();
        assert_eq!(Deadline::from_wire_at(NO_DEADLINE, now), None);
        assert_eq!(Deadline::to_wire_option(None), NO_DEADLINE);
        for micros in [1u64, 2, 999, 1_000_000, 86_400_000_000] {
            let d = Deadline::from_wire_at(micros, now).unwrap();
            assert_eq!(d.to_wire_at(now), micros);
        }
    }

    #[test]
    fn huge_values_saturate_instead_of_panicking() {
        let now = Instant::now();
        let d = Deadline::after_at(Duration::MAX, now);
        assert!(d.remaining_at(now) >= FAR_FUTURE);
        let d = Deadline::from_wire_at(u64::MAX, now).unwrap();
        assert!(!d.is_expired_at(now));
        assert!(d.to_wire_at(now) >= FAR_FUTURE.as_micros() as u64);
    }

    #[test]
    fn earliest_is_min() {
        let now = Instant::now();
        let a = Deadline::at(now + Duration::from_secs(1));
        let b = Deadline::at(now + Duration::from_secs(2));
        assert_eq!(a.min(b), a);
    }
}
