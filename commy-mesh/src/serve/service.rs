//! A running service: its registrations (the instance socket that
//! announces it on this host, the TLS listing and the registrars' for other
//! hosts), the drain that waits for its requests in progress, and the
//! [`ServiceHandle`] its caller keeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Deregisters, then waits for in-flight requests to finish.
    pub async fn shutdown(self) {
        self.served.deregister();
        self.served.drain().await;
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
