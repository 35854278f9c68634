//! A running service: its registrations (the instance socket that
//! announces it on this host, the TLS listing and the registrars' for other
//! hosts), the drain that waits for its requests in progress, and the
//! [`ServiceHandle`] its caller keeps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use commy_core::{InstanceId, ServiceName};
use commy_discovery::Registration;

use crate::serve::dispatch::ServeCtx;
use crate::serve::link::LinkShared;

/// A service served by this process.
pub(crate) struct Served {
    pub(crate) service: ServiceName,
    pub(crate) id: InstanceId,
    pub(crate) path: PathBuf,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) ctx: Arc<ServeCtx>,
    /// The instance's announcements beyond its socket (the registrars'):
    /// withdrawn when dropped, at deregistration.
    pub(crate) registrations: parking_lot::Mutex<Vec<Registration>>,
    /// Its place among the TLS listener's services (calls from peers reach
    /// it there, and its listing names it): withdrawn at deregistration,
    /// or at the end of a drain, which only unlists it first.
    pub(crate) routed: parking_lot::Mutex<Option<Registration>>,
    /// Tells the TLS listener's watchers that its listing changed.
    pub(crate) relist: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Served {
    /// Stops accepting: the socket is unlinked now (so discovery sees the
    /// instance vanish at once) and its listener is closed.
    pub(crate) fn deregister(&self) {
        self.withdraw();
        drop(self.routed.lock().take());
    }

    /// Stops announcing the instance: its socket and the registrars'
    /// entries are withdrawn; TLS peers still reach it (see
    /// [`deregister`](Served::deregister)).
    fn withdraw(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            crate::accept::withdraw(&self.path);
            drop(std::mem::take(&mut *self.registrations.lock()));
        }
    }

    /// Tells every client linked over shared memory to open no new stream
    /// (a GoAway frame each); links accepted from now on are told at once.
    pub(crate) fn go_away(&self) {
        // SYNC: SeqCst pairs with `LinkServer::new`'s check.
        self.ctx.load.draining.store(true, Ordering::SeqCst);
        // Unlisted for TLS peers (which still reach it until then).
        if let Some(relist) = &self.relist {
            relist();
        }
        for link in self.live_links() {
            link.go_away();
        }
    }

    /// The service's shared-memory links still open.
    fn live_links(&self) -> Vec<Arc<LinkShared>> {
        let links = self.ctx.links.lock();
        links.iter().filter_map(Weak::upgrade).collect()
    }

    /// Waits until every shared-memory link is closed, or its client
    /// answered the GoAway and nothing of it is in progress, for at most
    /// `grace`; then ends those left (a client that never answers, an
    /// older one, keeps its link no longer). Returns whether every client
    /// answered in time.
    pub(crate) async fn links_drained(&self, grace: Duration) -> bool {
        let until = tokio::time::Instant::now() + grace;
        let answered = loop {
            if self.live_links().iter().all(|l| l.drained()) {
                break true;
            }
            if tokio::time::Instant::now() >= until {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        // A drained link's own thread closes it (between two frames, never
        // while it answers one): those it does not close soon, links an
        // embedder drives and those of clients that never answered, are
        // ended here.
        let settle = tokio::time::Instant::now() + LINK_CLOSE_WAIT;
        while answered && !self.live_links().is_empty() && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for link in self.live_links() {
            link.tx.lock().abort();
        }
        answered
    }

    /// Over TLS, peers learn that the instance left from its listing
    /// (they long-poll it, and it changed at [`go_away`](Served::go_away)):
    /// until they do, their calls still reach it. Waits until none came
    /// for [`TLS_QUIET`], at most `grace`.
    pub(crate) async fn tls_quiet(&self, grace: Duration) {
        if self.routed.lock().is_none() {
            return;
        }
        let until = tokio::time::Instant::now() + grace;
        let mut seen = self.ctx.load.remote_requests.load(Ordering::Acquire);
        loop {
            tokio::time::sleep(TLS_QUIET).await;
            let now = self.ctx.load.remote_requests.load(Ordering::Acquire);
            if now == seen || tokio::time::Instant::now() >= until {
                return;
            }
            seen = now;
        }
    }

    /// Waits until no request is being handled.
    pub(crate) async fn drain(&self) {
        // SYNC: SeqCst pairs with `handled` (see there).
        self.ctx.load.draining.store(true, Ordering::SeqCst);
        loop {
            let notified = self.ctx.load.drained.notified();
            if self.ctx.load.idle() {
                return;
            }
            // Tasks finishing notify; handlers running inline on link
            // threads do not (that would cost every request), so look again
            // shortly.
            let _ = tokio::time::timeout(Duration::from_millis(1), notified).await;
        }
    }
}

/// How long a drain waits for the threads of drained links to close them
/// before it ends them itself.
const LINK_CLOSE_WAIT: Duration = Duration::from_millis(100);

/// How long a draining instance reached over TLS must see no call from a
/// peer before it stops taking them (its peers have seen it unlisted).
const TLS_QUIET: Duration = Duration::from_millis(100);

/// How long [`ServiceHandle::shutdown`] waits for the clients of its
/// links to stop sending before it ends their links.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// A running service. Dropping it deregisters the instance (new calls go
/// elsewhere) and lets in-flight calls finish; [`shutdown`](ServiceHandle::shutdown)
/// also waits for them.
#[derive(Clone)]
pub struct ServiceHandle {
    pub(crate) served: Arc<Served>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("service", &self.served.service)
            .field("instance", &self.served.id)
            .finish()
    }
}

impl ServiceHandle {
    /// The instance id announced for this service.
    pub fn instance_id(&self) -> InstanceId {
        self.served.id
    }

    /// The service name.
    pub fn service(&self) -> &ServiceName {
        &self.served.service
    }

    /// The socket path announcing this instance.
    pub fn socket_path(&self) -> &Path {
        &self.served.path
    }

    /// Drains the instance and stops it, with a grace of
    /// [`DRAIN_GRACE`] (see [`shutdown_within`](ServiceHandle::shutdown_within)).
    pub async fn shutdown(self) {
        self.shutdown_within(DRAIN_GRACE).await;
    }

    /// Drains the instance without failing a call, then stops it:
    /// 1. it is withdrawn from discovery (its socket on this host, its
    ///    TLS listing and registrations), so new callers go elsewhere;
    /// 2. every client linked over shared memory is told to send no new
    ///    request (GoAway, docs/PROTOCOL.md 10.1): their calls go to other
    ///    instances from then on, and one that would have gone here is
    ///    sent elsewhere;
    /// 3. the requests sent before that are handled, and each link closes
    ///    once its client answered and its requests are done.
    ///
    /// Links still open after `grace` (a client that does not answer) are
    /// ended, and requests still in progress are waited for. Returns
    /// whether every client answered in time.
    pub async fn shutdown_within(self, grace: Duration) -> bool {
        self.served.withdraw();
        self.served.go_away();
        let answered = self.served.links_drained(grace).await;
        self.served.tls_quiet(grace).await;
        self.served.deregister();
        self.served.drain().await;
        answered
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        // The last clone of the handle deregisters (the mesh keeps its own
        // reference for `close`).
        if Arc::strong_count(&self.served) <= 2 {
            self.served.deregister();
        }
    }
}
