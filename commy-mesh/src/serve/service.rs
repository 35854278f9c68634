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

/// A service served by this process.
pub(crate) struct Served {
    pub(crate) service: ServiceName,
    pub(crate) id: InstanceId,
    pub(crate) path: PathBuf,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) ctx: Arc<ServeCtx>,
    /// The instance's announcements beyond its socket (the TLS listener's
    /// listing, the registrars'): withdrawn when dropped, at deregistration.
    pub(crate) registrations: parking_lot::Mutex<Vec<Registration>>,
}

impl Served {
    /// Stops accepting: the socket is unlinked now (so discovery sees the
    /// instance vanish at once) and its listener is closed.
    pub(crate) fn deregister(&self) {
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
        let links: Vec<_> = self
            .ctx
            .links
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for link in links {
            link.go_away();
        }
    }

    /// Waits until every shared-memory link is closed, or its client
    /// answered the GoAway and nothing of it is in progress, for at most
    /// `grace`; then ends those left (a client that never answers, an
    /// older one, keeps its link no longer). Returns whether every client
    /// answered in time.
    pub(crate) async fn links_drained(&self, grace: Duration) -> bool {
        let until = tokio::time::Instant::now() + grace;
        let answered = loop {
            let open: Vec<_> = self
                .ctx
                .links
                .lock()
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            if open.iter().all(|l| l.drained()) {
                break true;
            }
            if tokio::time::Instant::now() >= until {
                break false;
            }
            drop(open);
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        for link in self.ctx.links.lock().iter().filter_map(Weak::upgrade) {
            link.tx.lock().abort();
        }
        answered
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
        self.served.deregister();
        self.served.go_away();
        let answered = self.served.links_drained(grace).await;
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
