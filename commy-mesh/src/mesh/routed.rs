//! The routed way of a call: finding (or connecting to) an instance,
//! over TLS or shared memory, trying a failed attempt again within the
//! retry budget and the deadline, and hedging an idempotent call
//! ([`Mesh::call_with`] takes it when no link is open, or after a first
//! attempt failed).

use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_config::TransportPreference;
use commy_core::{InstanceId, Status};

use super::{Mesh, service_name};
use crate::call::attempt::Attempt;
use crate::call::clock::now_ms;
use crate::call::deadline::Due;
use crate::call::options::CallOptions;
use crate::call::policy::settle;
use crate::call::resilience::{Retry, backoff};
use crate::response::Response;

impl Mesh {
    /// [`call_routed`](Mesh::call_routed) from the start, hedged if its
    /// service hedges idempotent calls and this one is.
    pub(super) async fn call_first_routed(
        &self,
        name: &str,
        payload: Bytes,
        options: CallOptions,
        preference: TransportPreference,
    ) -> Result<Response, Status> {
        let pool = self.inner.services.get(&service_name(name)?);
        let health = &pool.health;
        if (options.idempotent || health.retries.idempotent)
            && let Some(delay) = health.hedge
        {
            drop(pool);
            let start = Start::default();
            return self
                .call_hedged(name, payload, options, preference, delay, start)
                .await;
        }
        drop(pool);
        self.call_routed(name, Some(payload), options, preference, Start::default())
            .await
    }

    /// A hedged call: sent as [`call_routed`](Mesh::call_routed) sends it,
    /// and once `delay` passed with no answer, sent again to another
    /// instance: a retry of the pool's budget, made only while the budget
    /// allows, the deadline has not passed, the first attempt has its
    /// instance and the pool has another. The first answer wins and the
    /// other attempt is dropped, which cancels it; a failure waits for the
    /// other attempt's outcome. The call counts once against
    /// `max_pending`.
    pub(super) async fn call_hedged(
        &self,
        name: &str,
        payload: Bytes,
        mut options: CallOptions,
        preference: TransportPreference,
        delay: Duration,
        start: Start<'_>,
    ) -> Result<Response, Status> {
        // Both attempts are due by the first one's deadline.
        options.started.get_or_insert_with(Instant::now);
        let pool = self.inner.services.get(&service_name(name)?);
        let _pending = match start.counted {
            false => Some(pool.health.enter_pending(name)?),
            true => None,
        };
        let picked = parking_lot::Mutex::new(None);
        let first_start = Start {
            picked: Some(&picked),
            counted: true,
            ..start
        };
        let first = self.call_routed(
            name,
            Some(payload.clone()),
            options.clone(),
            preference,
            first_start,
        );
        let mut first = std::pin::pin!(first);
        tokio::select! {
            biased;
            result = &mut first => return result,
            () = tokio::time::sleep(delay) => {}
        }
        // Still finding or connecting its instance: a second attempt would
        // wait for the same (connecting takes turns), or pick it too.
        let Some(avoid) = *picked.lock() else {
            return first.await;
        };
        let mut due = self.due(&options);
        let in_time = due
            .absolute()
            .is_none_or(|d| d.remaining() > Duration::ZERO);
        let health = &pool.health;
        if !in_time || health.instances() < 2 || !health.retries.spend(now_ms()) {
            return first.await;
        }
        let second_start = Start {
            avoid: Some(avoid),
            counted: true,
            ..Start::default()
        };
        let second = self.call_routed(name, Some(payload), options, preference, second_start);
        let mut second = std::pin::pin!(second);
        tokio::select! {
            result = &mut first => match result {
                Ok(answer) => Ok(answer),
                Err(_) => second.await,
            },
            result = &mut second => match result {
                Ok(answer) => Ok(answer),
                Err(_) => first.await,
            },
        }
    }

    /// A call that has to find (or connect to) an instance first, or goes
    /// over TLS, or is tried again after `start.failed` (its last attempt;
    /// the payload is `None` when it was not kept for a retry), or is a
    /// hedged call's attempt (`start.avoid`, `start.picked`). Each attempt's
    /// outcome is recorded with the service's call policy, if it has one.
    /// A failed attempt is tried again on a new pick, away from the
    /// instance that failed it, when it provably never reached an instance,
    /// or when the call is idempotent (or the policy says so) and the
    /// instance failed: within `retry_attempts`, the pool's retry budget
    /// and the call's deadline, after a backoff unless it never reached an
    /// instance.
    pub(super) async fn call_routed(
        &self,
        name: &str,
        mut payload: Option<Bytes>,
        mut options: CallOptions,
        preference: TransportPreference,
        start: Start<'_>,
    ) -> Result<Response, Status> {
        let Start {
            mut failed,
            avoid: first_avoid,
            picked,
            counted,
        } = start;
        let pool = self.inner.services.get(&service_name(name)?);
        // A call handed on after its first attempt (or a hedged call's
        // second) holds its place already.
        let _pending = match failed {
            None if !counted => Some(pool.health.enter_pending(name)?),
            _ => None,
        };
        let policy = pool.policy.clone();
        let retries = &pool.health.retries;
        let idempotent = options.idempotent || retries.idempotent;
        let keep = retries.attempts > 1 && idempotent
            || policy.as_ref().is_some_and(|p| p.max_attempts() > 1);
        if keep || failed.is_some() || policy.is_some() {
            // Every attempt is due by the first one's deadline.
            options.started.get_or_insert_with(Instant::now);
        }
        let (mut attempt, mut avoid) = (1, first_avoid);
        loop {
            if let Some(f) = failed.take() {
                let unsent = matches!(f.failure, Attempt::Unsent(..));
                let status = match f.failure {
                    Attempt::Unsent(back, status) => {
                        payload = payload.or(back);
                        status
                    }
                    Attempt::Failed(status) => status,
                };
                if payload.is_none() {
                    // Not kept for a retry: nothing to send again.
                    return Err(status);
                }
                let how = if f.policy_again && !unsent {
                    retries.spend(now_ms()).then_some(Retry::Idempotent)
                } else {
                    retries.retry(&status, unsent, idempotent, f.attempt, now_ms())
                };
                let Some(how) = how else {
                    return Err(status);
                };
                if how == Retry::Idempotent {
                    let wait = backoff(f.attempt);
                    let mut due = self.due(&options);
                    if due.absolute().is_some_and(|d| d.remaining() <= wait) {
                        return Err(status);
                    }
                    tokio::time::sleep(wait).await;
                }
                attempt = f.attempt + 1;
                avoid = Some(f.instance);
            }
            let mut due = self.due(&options);
            let (endpoint, instance) = self
                .inner
                .services
                .pick(
                    &pool,
                    preference,
                    due.absolute(),
                    avoid,
                    options.hash_key.as_deref(),
                )
                .await?;
            if let Some(picked) = picked {
                // The instance this attempt went to (a retry's, after an
                // unsent one): the one a hedge avoids.
                *picked.lock() = Some(instance);
            }
            check_due(&mut due, name)?;
            // A request that never left comes back with its payload (over
            // TLS: when no connection could be made); one the peer's
            // GoAway refused does not, and is retried only if kept.
            let body = if keep {
                payload.clone()
            } else {
                payload.take()
            }
            .unwrap_or_default();
            let started = policy.as_ref().map(|_| Instant::now());
            let md = &options.metadata;
            let result = endpoint
                .call(&pool.service, body, md, due, true, options.spin)
                .await;
            let again = match (&policy, started) {
                (Some(policy), Some(started)) => {
                    let failure = result.as_ref().err().map(Attempt::status);
                    settle(
                        &**policy,
                        instance,
                        endpoint.stats(),
                        started,
                        attempt,
                        failure,
                    )
                }
                _ => false,
            };
            match result {
                Ok(answer) => return Ok(answer),
                Err(failure) if due.expired() => return Err(failure.into_status()),
                Err(failure) => {
                    failed = Some(Failed {
                        failure,
                        instance,
                        attempt,
                        policy_again: again,
                    });
                }
            }
        }
    }
}

/// How [`Mesh::call_routed`] starts.
#[derive(Default)]
pub(super) struct Start<'a> {
    /// The attempt before, which failed (`None`: this is the first).
    pub(super) failed: Option<Failed>,
    /// An instance not to pick at the first attempt: where a hedged call's
    /// first attempt went.
    pub(super) avoid: Option<InstanceId>,
    /// Where the first attempt's pick is told (a hedged call's first).
    pub(super) picked: Option<&'a parking_lot::Mutex<Option<InstanceId>>>,
    /// The call counts against the service's `max_pending` already.
    pub(super) counted: bool,
}

impl Start<'_> {
    /// After the first attempt's `failure` at `instance`.
    pub(super) fn after(
        failure: Attempt,
        instance: InstanceId,
        policy_again: bool,
    ) -> Start<'static> {
        Start {
            failed: Some(Failed {
                failure,
                instance,
                attempt: 1,
                policy_again,
            }),
            ..Start::default()
        }
    }
}

/// A failed attempt of a call, handed on to be tried again.
pub(super) struct Failed {
    failure: Attempt,
    /// The instance it failed at.
    instance: InstanceId,
    /// Its number (1 for the first).
    attempt: u32,
    /// The call policy asked for it to be tried again.
    policy_again: bool,
}

/// `DeadlineExceeded` if a call's deadline passed while its instance was
/// found or connected to: the request is not sent then.
fn check_due(due: &mut Due, service: &str) -> Result<(), Status> {
    if due.expired() {
        return Err(Status::deadline_exceeded(format!(
            "the deadline passed while an instance of '{service}' was found or connected to"
        )));
    }
    Ok(())
}
