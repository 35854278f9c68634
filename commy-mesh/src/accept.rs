//! The accept loop of a Unix socket that announces an instance (a service,
//! or a topic subscription): each link's handshake and work run on a
//! thread of their own. A failing accept (out of descriptors) backs off
//! ([`AcceptBackoff`]) instead of spinning, and is logged a few times, not
//! per attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use commy_core::Status;
use commy_core::backoff::AcceptBackoff;
use commy_shm::{LinkConfig, ShmLink, UdsListener};

use crate::warn::Warnings;

/// Starts a thread accepting links on `listener` until `stop` is set or
/// `go_on`, asked at each tick (a tenth of a second), says no; each link is
/// handed to `on_link` on a thread of its own, the handshake included, so
/// a silent client cannot hold up others.
pub(crate) fn start_accepting(
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: impl Fn(ShmLink) + Send + Sync + 'static,
    go_on: impl Fn() -> bool + Send + 'static,
) -> Result<(), Status> {
    let on_link = Arc::new(on_link);
    // Refused handshakes are logged a few at a time (they run on the
    // links' threads).
    let refusals = Arc::new(Warnings::new());
    std::thread::Builder::new()
        .name(format!("commy-accept-{name}"))
        .spawn(move || {
            // The tick only bounds how long a stopped listener keeps its
            // thread; its socket is unlinked at once on deregistration.
            let tick = Duration::from_millis(100);
            let mut backoff = AcceptBackoff::new();
            while !stop.load(Ordering::Acquire) {
                match listener.accept_timeout(tick) {
                    Ok(Some((sock, _peer))) => {
                        if let Some(n) = backoff.succeeded() {
                            tracing::info!("{name}: accepting again after {n} failed accepts");
                        }
                        let (on_link, link, name2) = (on_link.clone(), link.clone(), name.clone());
                        let refusals = refusals.clone();
                        let spawned = std::thread::Builder::new()
                            .name(format!("commy-link-{name}"))
                            .spawn(move || match ShmLink::accept_stream(sock, &link) {
                                Ok(l) => on_link(l),
                                Err(e) => {
                                    refusals.warn(|| format!("{name2}: refused a connection: {e}"));
                                }
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a link thread: {e}");
                        }
                    }
                    Ok(None) => {
                        if !go_on() {
                            break;
                        }
                    }
                    Err(commy_shm::uds::AcceptError::PeerCred { source, .. }) => {
                        // That connection is closed; the listener is fine.
                        refusals.warn(|| format!("{name}: refused a connection: {source}"));
                    }
                    Err(e) => {
                        let after = backoff.failed(Instant::now());
                        if let Some(n) = after.report {
                            tracing::warn!(
                                "{name}: {e} ({n} failed accepts since the last report; \
                                 retrying every {:?} at most)",
                                AcceptBackoff::MAX
                            );
                        }
                        std::thread::sleep(after.wait);
                    }
                }
            }
            drop(listener);
        })
        .map(|_| ())
        .map_err(|e| Status::internal(format!("cannot start the accept thread: {e}")))
}
