//! The serve policy slot of a served service (see [`crate::policy`]): the
//! trait, what it sees of a request, and the function that gives each
//! service its policy.

use std::sync::Arc;

use commy_core::{Metadata, ServiceName, Status};

use crate::serve::request::Caller;

/// What a [`ServePolicy`] sees of a request before its handler does.
#[derive(Debug)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The service called.
    pub service: &'a ServiceName,
    /// The request's metadata (headers, trace context).
    pub metadata: &'a Metadata,
    /// A one-way message (its refusal is answered to nobody).
    pub one_way: bool,
}

/// The policy of the requests to one served service (see the
/// [module docs](crate::policy)). It runs on the thread that received the request,
/// before the handler: it must be quick and must not block.
pub trait ServePolicy: Send + Sync + 'static {
    /// `Ok` lets the request through to the handler; `Err(status)` is the
    /// caller's answer instead (a refused one-way message is dropped).
    fn admit(&self, caller: &Caller, head: &RequestHead<'_>) -> Result<(), Status>;
}

/// Gives the serve policy of each served service (`None`: the slot stays
/// empty). Asked once per service, when it starts being served.
#[derive(Clone)]
pub struct ServePolicies(Arc<ServePolicyFn>);

type ServePolicyFn = dyn Fn(&ServiceName) -> Option<Arc<dyn ServePolicy>> + Send + Sync;

impl ServePolicies {
    /// Policies given by `f`.
    pub fn new(
        f: impl Fn(&ServiceName) -> Option<Arc<dyn ServePolicy>> + Send + Sync + 'static,
    ) -> ServePolicies {
        ServePolicies(Arc::new(f))
    }

    /// The policy of `service`, if it has one.
    pub fn get(&self, service: &ServiceName) -> Option<Arc<dyn ServePolicy>> {
        (self.0)(service)
    }
}

impl std::fmt::Debug for ServePolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServePolicies")
    }
}
