//! The accept loop of a Unix socket that announces an instance (a service,
//! or a topic subscription): each link's handshake and work run on a
//! thread of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use commy_core::Status;
use commy_shm::{LinkConfig, ShmLink, UdsListener};

/// Starts a thread accepting links on `listener` until `stop` is set; each
/// link is handed to `on_link` on a thread of its own, the handshake
/// included, so a silent client cannot hold up others.
pub(crate) fn start_accepting(
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: impl Fn(ShmLink) + Send + Sync + 'static,
) -> Result<(), Status> {
    let on_link = Arc::new(on_link);
    std::thread::Builder::new()
        .name(format!("commy-accept-{name}"))
        .spawn(move || {
            // The tick only bounds how long a stopped listener keeps its
            // thread; its socket is unlinked at once on deregistration.
            let tick = Duration::from_millis(100);
            while !stop.load(Ordering::Acquire) {
                match listener.accept_timeout(tick) {
                    Ok(Some((sock, _peer))) => {
                        let (on_link, link, name2) = (on_link.clone(), link.clone(), name.clone());
                        let spawned = std::thread::Builder::new()
                            .name(format!("commy-link-{name}"))
                            .spawn(move || match ShmLink::accept_stream(sock, &link) {
                                Ok(l) => on_link(l),
                                Err(e) => tracing::warn!("{name2}: refused a connection: {e}"),
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a link thread: {e}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{name}: accept failed: {e}"),
                }
            }
            drop(listener);
        })
        .map(|_| ())
        .map_err(|e| Status::internal(format!("cannot start the accept thread: {e}")))
}
