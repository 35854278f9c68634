//! The call policy slot of a service's pool (see [`crate::policy`]): the
//! trait, the function that gives each pool its policy, and how an
//! attempt's outcome reaches it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use commy_core::{InstanceId, ServiceName, Status};

use crate::call::stats::EndpointStats;

/// The policy of the calls to one service (see the [module docs](crate::policy)).
/// Every method has a default that does nothing: a policy implements what
/// it needs. Methods run on the calling thread, on the call path: they
/// must be quick and must not block.
pub trait CallPolicy: Send + Sync + 'static {
    /// Whether a call may go to `instance` now. `stats`: its endpoint's
    /// statistics, if a link to it is open. When no instance of the
    /// service is admitted, the call fails with `UNAVAILABLE`.
    fn admit(&self, instance: InstanceId, stats: Option<&EndpointStats>) -> bool {
        let _ = (instance, stats);
        true
    }

    /// A call to `instance` ended with `outcome` (recorded in `stats`
    /// already). Calls that failed before an instance was picked are not
    /// recorded.
    fn record(&self, instance: InstanceId, stats: &EndpointStats, outcome: &Outcome<'_>) {
        let _ = (instance, stats, outcome);
    }

    /// How many times one call may be tried in all (1: never again). The
    /// payload of a call is kept for a retry only when this is over 1.
    fn max_attempts(&self) -> u32 {
        1
    }

    /// Whether a call whose attempt number `attempt` (1 for the first)
    /// failed with `status` is tried again, on a new pick, within its
    /// deadline and [`max_attempts`](CallPolicy::max_attempts).
    fn retry(&self, status: &Status, attempt: u32) -> bool {
        let _ = (status, attempt);
        false
    }
}

/// How one call attempt ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct Outcome<'a> {
    /// `None` when the call was answered with OK; else its failure.
    pub status: Option<&'a Status>,
    /// From sending the request to its answer (or failure).
    pub latency: Duration,
    /// The attempt's number, 1 for the first.
    pub attempt: u32,
}

/// Records the outcome of attempt number `attempt` of a call to
/// `instance`, sent at `started`, in its endpoint's `stats` and with
/// `policy`; `status` is its failure, if it failed. Says whether the
/// policy wants the call tried again.
pub(crate) fn settle(
    policy: &dyn CallPolicy,
    instance: InstanceId,
    stats: &EndpointStats,
    started: Instant,
    attempt: u32,
    status: Option<&Status>,
) -> bool {
    let latency = started.elapsed();
    stats.record(status.is_none(), latency);
    let outcome = Outcome {
        status,
        latency,
        attempt,
    };
    policy.record(instance, stats, &outcome);
    status.is_some_and(|s| attempt < policy.max_attempts() && policy.retry(s, attempt))
}

/// Gives the call policy of each called service (`None`: the slot stays
/// empty). Asked once per service, when the handle first calls it.
#[derive(Clone)]
pub struct CallPolicies(Arc<CallPolicyFn>);

type CallPolicyFn = dyn Fn(&ServiceName) -> Option<Arc<dyn CallPolicy>> + Send + Sync;

impl CallPolicies {
    /// Policies given by `f`.
    pub fn new(
        f: impl Fn(&ServiceName) -> Option<Arc<dyn CallPolicy>> + Send + Sync + 'static,
    ) -> CallPolicies {
        CallPolicies(Arc::new(f))
    }

    /// The policy of `service`, if it has one.
    pub fn get(&self, service: &ServiceName) -> Option<Arc<dyn CallPolicy>> {
        (self.0)(service)
    }
}

impl std::fmt::Debug for CallPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallPolicies")
    }
}
