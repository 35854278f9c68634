//! How a mesh handle's pools route around failing instances and retry
//! failed calls and how they pick, from its settings (`balance`, `eject_after`, `ejection_time`,
//! `max_ejected_percent`,
//! `retry_attempts`, `retry_budget_percent`, `idempotent`):
//!
//! - an instance whose calls fail 5 times in a row is ejected from its
//!   pool for 30 s (longer each time), at most 10 % of a pool at once; once
//!   its time is up, trial calls decide whether it comes back (the state
//!   is an [`Outlier`](commy_discovery::Outlier) in each endpoint's
//!   statistics, the pool's count a [`PoolHealth`]);
//! - a call that provably never reached an instance (the link broke before
//!   the request was in it, the peer could not be connected to) is tried
//!   again on another instance; a call of an idempotent service (or one
//!   marked so) also after a failure of the instance that may have
//!   reached it;
//! - a pool picks by its service's strategy (the `balance` setting:
//!   [`Strategy`]);
//! - every retry draws from the pool's [`RetryBudget`] (20 % of the
//!   requests of the last 10 s plus 10 a second), an idempotent retry
//!   waits a jittered, growing backoff first, and none is made past the
//!   call's deadline.

use std::time::Duration;

use commy_config::{Settings, parse_duration};
use commy_core::{Code, ServiceName, Status};
use commy_discovery::{OutlierConfig, RetryBudget};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::call::clock::now_ms;

/// The first backoff of an idempotent retry (before jitter); each retry
/// doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(5);

/// The longest backoff of an idempotent retry (before jitter).
const BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Retries the budget allows per second whatever the requests (Finagle's
/// and linkerd's floor).
const BUDGET_FLOOR_PER_SEC: u32 = 10;

/// How long a request's deposit stays in the budget, in milliseconds.
const BUDGET_WINDOW_MS: u64 = 10_000;

/// How a pool picks among the instances of a tier (the `balance`
/// setting, per service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// The less loaded of two random instances: calls in flight over
    /// shared memory, peak-EWMA round trips times calls in flight over TLS
    /// (`p2c`, the default).
    #[default]
    PowerOfTwo,
    /// Each instance in turn (`round_robin`).
    RoundRobin,
    /// Consistent hashing (Maglev) on the call's
    /// [`hash_key`](crate::CallOptions::hash_key): the same key goes to
    /// the same instance while it is in the pool, from every process and
    /// SDK; calls without a key, or whose instance is ejected, are
    /// balanced as with `p2c` (`maglev`).
    Maglev,
}

impl Strategy {
    /// The strategy named `name` (`p2c`, `round_robin`, `maglev`).
    pub fn parse(name: &str) -> Option<Strategy> {
        Some(match name {
            "p2c" => Strategy::PowerOfTwo,
            "round_robin" => Strategy::RoundRobin,
            "maglev" => Strategy::Maglev,
            _ => return None,
        })
    }
}

/// The resilience settings of a mesh handle, read once at open.
#[derive(Debug, Clone)]
pub(crate) struct Resilience {
    /// `None`: instances are never ejected.
    outlier: Option<OutlierConfig>,
    max_ejected_percent: u32,
    attempts: u32,
    budget_percent: u32,
    idempotent: Vec<ServiceName>,
    /// Calls to one service waiting at once (0: no limit).
    max_pending: usize,
    /// The strategy of every service not named in `balance`.
    strategy: Strategy,
    /// Services' own strategies.
    balance: Vec<(ServiceName, Strategy)>,
    /// The hedge delay of every service not named in `hedges` (`None`:
    /// not hedged).
    hedge: Option<Duration>,
    /// Services' own hedge delays (`None`: not hedged).
    hedges: Vec<(ServiceName, Option<Duration>)>,
}

impl Resilience {
    /// From the settings (checked when they were loaded).
    pub(crate) fn from_settings(s: &Settings) -> Resilience {
        let (default_strategy, balance) = per_service(&s.balance, Strategy::parse);
        // A delay of 0: not hedged.
        let hedged = |d: &str| parse_duration(d).ok().map(|d| (!d.is_zero()).then_some(d));
        let (hedge, hedges) = per_service(&s.hedge, hedged);
        Resilience {
            // Either rule may be off (0); with both off, nothing ejects.
            outlier: (s.eject_after > 0 || s.eject_success_percent > 0).then(|| OutlierConfig {
                consecutive_failures: u16::try_from(s.eject_after).unwrap_or(u16::MAX),
                base_ejection: s.ejection_time,
                max_ejection: s.ejection_time.saturating_mul(10),
                min_success_percent: u16::try_from(s.eject_success_percent).unwrap_or(0),
                min_calls: u16::try_from(s.eject_min_calls).unwrap_or(u16::MAX),
                ..OutlierConfig::default()
            }),
            max_ejected_percent: u32::try_from(s.max_ejected_percent).unwrap_or(100),
            attempts: u32::try_from(s.retry_attempts).unwrap_or(1).max(1),
            budget_percent: u32::try_from(s.retry_budget_percent).unwrap_or(0),
            // Checked at load: every name is a service name.
            idempotent: s
                .idempotent
                .iter()
                .filter_map(|n| ServiceName::new(n).ok())
                .collect(),
            max_pending: s.max_pending,
            strategy: default_strategy.unwrap_or_default(),
            balance,
            hedge: hedge.flatten(),
            hedges,
        }
    }

    /// The strategy of `service`'s pool.
    pub(crate) fn strategy(&self, service: &ServiceName) -> Strategy {
        self.balance
            .iter()
            .find(|(s, _)| s == service)
            .map_or(self.strategy, |(_, strategy)| *strategy)
    }

    /// What the endpoints of a new pool of `service` share.
    pub(crate) fn pool_health(&self, service: &ServiceName) -> PoolHealth {
        let retries = Retries {
            attempts: self.attempts,
            idempotent: self.idempotent.contains(service),
            budget: RetryBudget::new(self.budget_percent, BUDGET_FLOOR_PER_SEC, BUDGET_WINDOW_MS),
        };
        let hedge = self
            .hedges
            .iter()
            .find(|(s, _)| s == service)
            .map_or(self.hedge, |(_, delay)| *delay);
        PoolHealth::new(
            self.outlier,
            self.max_ejected_percent,
            retries,
            self.max_pending,
            hedge,
        )
    }
}

/// Reads a list setting of `VALUE` for every service and `SERVICE=VALUE`
/// for one (checked at load; a later entry wins): the value for every
/// service, and the services' own.
fn per_service<T>(
    entries: &[String],
    parse: impl Fn(&str) -> Option<T>,
) -> (Option<T>, Vec<(ServiceName, T)>) {
    let (mut all, mut own) = (None, Vec::<(ServiceName, T)>::new());
    for entry in entries {
        match entry.split_once('=') {
            None => all = parse(entry.trim()).or(all),
            Some((service, value)) => {
                if let (Ok(service), Some(value)) =
                    (ServiceName::new(service.trim()), parse(value.trim()))
                {
                    own.retain(|(s, _)| *s != service);
                    own.push((service, value));
                }
            }
        }
    }
    (all, own)
}

/// When one pool's failed calls are tried again.
#[derive(Debug)]
pub(crate) struct Retries {
    /// Attempts in all of one call.
    pub(crate) attempts: u32,
    /// Whether the service's calls may be retried after any failure of
    /// the instance.
    pub(crate) idempotent: bool,
    /// What retries draw from.
    pub(crate) budget: RetryBudget,
}

/// Why a failed attempt may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// The request never reached an instance: at once, elsewhere.
    Unsent,
    /// The instance failed a call that is idempotent: after a backoff.
    Idempotent,
}

impl Retries {
    /// Whether attempt number `attempt` of a call (`idempotent`: the
    /// call's own mark), which failed with `status`, is tried again and
    /// how; `unsent`: the request provably never reached an instance.
    /// Draws the retry from the budget at `now_ms`.
    pub(crate) fn retry(
        &self,
        status: &Status,
        unsent: bool,
        idempotent: bool,
        attempt: u32,
        now_ms: u64,
    ) -> Option<Retry> {
        if attempt >= self.attempts {
            return None;
        }
        let how = if unsent {
            Retry::Unsent
        } else if (idempotent || self.idempotent) && retryable(status.code()) {
            Retry::Idempotent
        } else {
            return None;
        };
        self.spend(now_ms).then_some(how)
    }

    /// Takes one retry from the budget at `now_ms`; false when it is
    /// spent. The retry is sent as a request, which counts in the budget
    /// like any: its count is taken back.
    pub(crate) fn spend(&self, now_ms: u64) -> bool {
        let ok = self.budget.try_withdraw(now_ms);
        if ok {
            self.budget.take_back(now_ms, 1);
        }
        ok
    }
}

/// Failures of an instance after which an idempotent call is tried
/// again: the instance (or the link to it) failed, not the request.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Internal | Code::Aborted)
}

/// How long retry number `retry` (1 for the first) of an idempotent call
/// waits: full jitter under a ceiling that doubles from 5 ms up to 250 ms.
pub(crate) fn backoff(retry: u32) -> Duration {
    let mut b = commy_net::mux::Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    for _ in 1..retry {
        let _ = b.next_delay_with(0.0);
    }
    b.next_delay()
}

/// What the endpoints of one pool share through their
/// [`EndpointStats`](crate::call::stats::EndpointStats):
/// the rules they are ejected by and the count of those ejected, and the
/// pool's retries. The counts follow ejections and re-admissions as they
/// happen and are set again from the endpoints themselves whenever the
/// pool's instances change.
#[derive(Debug)]
pub(crate) struct PoolHealth {
    pub(crate) outlier: OutlierConfig,
    /// Whether endpoints are ejected at all.
    ejecting: bool,
    /// The most of the pool that may be out at once, in percent (one
    /// endpoint always may be).
    max_percent: u32,
    /// Endpoints out (ejected or half-open).
    out: AtomicUsize,
    /// The pool's instances.
    total: AtomicUsize,
    /// Calls sent to an out endpoint because the pool was in panic mode.
    pub(crate) panics: AtomicU64,
    /// When the pool's failed calls are tried again.
    pub(crate) retries: Retries,
    /// Calls to the service waiting at once, counted only with a limit.
    pending: AtomicUsize,
    /// Their limit (0: none).
    pub(crate) max_pending: usize,
    /// How long an idempotent call waits for its answer before a second
    /// attempt goes to another instance (`None`: never).
    pub(crate) hedge: Option<Duration>,
}

impl PoolHealth {
    /// `outlier`: the ejection rules (`None`: never eject);
    /// `max_percent`: the most of the pool out at once; `hedge`: the
    /// delay of hedged calls (`None`: not hedged).
    pub(crate) fn new(
        outlier: Option<OutlierConfig>,
        max_percent: u32,
        retries: Retries,
        max_pending: usize,
        hedge: Option<Duration>,
    ) -> PoolHealth {
        PoolHealth {
            outlier: outlier.unwrap_or_default(),
            ejecting: outlier.is_some(),
            max_percent,
            out: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            panics: AtomicU64::new(0),
            retries,
            pending: AtomicUsize::new(0),
            max_pending,
            hedge,
        }
    }

    /// The pool's instances (as last counted when they changed).
    pub(crate) fn instances(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one more call to the pool's service waiting for its answer,
    /// until the slot is dropped; with `max_pending` of them waiting
    /// already, fails at once with `RESOURCE_EXHAUSTED` (a limit of 0:
    /// none, nothing counted).
    pub(crate) fn enter_pending(&self, service: &str) -> Result<PendingSlot<'_>, Status> {
        if self.max_pending == 0 {
            return Ok(PendingSlot(None));
        }
        let taken = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(PendingSlot(Some(&self.pending))),
            Err(n) => Err(Status::resource_exhausted(format!(
                "{n} calls to service '{service}' wait for their answers already \
                 (max_pending)"
            ))),
        }
    }

    /// Whether one more endpoint may be ejected: never the only one.
    pub(crate) fn may_eject(&self) -> bool {
        // A pool of one has nowhere else to send its calls.
        self.ejecting
            && self.total.load(Ordering::Relaxed) > 1
            && commy_discovery::may_eject(
                self.out.load(Ordering::Relaxed),
                self.total.load(Ordering::Relaxed),
                self.max_percent,
            )
    }

    /// Whether fewer than half of the pool's endpoints are in: then calls
    /// go to all of them.
    pub(crate) fn panicking(&self) -> bool {
        let total = self.total.load(Ordering::Relaxed);
        let out = self.out.load(Ordering::Relaxed).min(total);
        commy_discovery::panics(total - out, total)
    }

    pub(crate) fn ejected(&self) {
        self.out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn readmitted(&self) {
        let _ = self
            .out
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Counts `n` requests made in the retry budget.
    pub(crate) fn requested(&self, n: u64) {
        self.retries
            .budget
            .deposit_many(now_ms(), u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// Sets the counts afresh: the pool has `total` instances, `out` of
    /// them out.
    pub(crate) fn reset(&self, total: usize, out: usize) {
        self.total.store(total, Ordering::Relaxed);
        self.out.store(out, Ordering::Relaxed);
    }
}

/// One call counted against its pool's `max_pending` while it lives.
pub(crate) struct PendingSlot<'a>(Option<&'a AtomicUsize>);

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        if let Some(pending) = self.0 {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
pub(crate) fn test_health() -> PoolHealth {
    let retries = Retries {
        attempts: 1,
        idempotent: false,
        budget: commy_discovery::RetryBudget::default(),
    };
    PoolHealth::new(Some(OutlierConfig::default()), 10, retries, 0, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries(idempotent: bool) -> Retries {
        Retries {
            attempts: 3,
            idempotent,
            budget: RetryBudget::new(20, 10, 10_000),
        }
    }

    #[test]
    fn only_unsent_requests_are_retried_unless_idempotent() {
        let r = retries(false);
        let down = Status::unavailable("the instance died");
        assert_eq!(r.retry(&down, true, false, 1, 0), Some(Retry::Unsent));
        assert_eq!(r.retry(&down, false, false, 1, 0), None);
        assert_eq!(r.retry(&down, false, true, 1, 0), Some(Retry::Idempotent));
        assert_eq!(
            r.retry(&down, true, false, 3, 0),
            None,
            "three attempts in all"
        );
        let bad = Status::invalid_argument("no");
        assert_eq!(retries(true).retry(&bad, false, false, 1, 0), None);
        assert_eq!(
            retries(true).retry(&down, false, false, 2, 0),
            Some(Retry::Idempotent)
        );
    }

    #[test]
    fn retries_stop_when_the_budget_is_spent() {
        let r = retries(true);
        let down = Status::unavailable("down");
        // No requests deposited: the floor alone, 10 a second over 10 s.
        // Each retry is sent as a request, which deposits.
        let made = (0..1000)
            .filter(|_| {
                let made = r.retry(&down, false, false, 1, 0).is_some();
                if made {
                    r.budget.deposit(0);
                }
                made
            })
            .count();
        assert_eq!(made, 100);
    }

    #[test]
    fn backoff_grows_and_stays_under_its_cap() {
        for retry in 1..20 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << (retry - 1).min(16))
                .min(BACKOFF_CAP);
            for _ in 0..20 {
                assert!(backoff(retry) <= ceiling, "retry {retry}");
            }
        }
    }
}
