//! Served links polled by an embedder's own thread ([`DrivenLink`]),
//! instead of by a thread of the mesh.

use std::sync::Arc;
use std::time::Instant;

use commy_shm::{LinkReceiver, ShmLink};

use crate::serve::dispatch::ServeCtx;
use crate::serve::polled::{HeldPermits, PolledRequest};
use crate::serve::request::Caller;
use crate::serve::shm::LinkServer;

/// What [`DrivenLink::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Every frame that had arrived is handled; the ring is empty.
    Empty,
    /// The most frames one poll handles were handled; more may wait.
    More,
    /// The link is closed (the client left, or broke the protocol): polling
    /// it again does nothing, and it may be dropped.
    Closed,
}

/// A link of a service served with
/// [`Mesh::serve_driven`](crate::Mesh::serve_driven), received from by the
/// embedder's own thread instead of a thread of the mesh: an event loop
/// that polls its links itself pays no hand-off between a receiving thread
/// and its own per request.
///
/// [`poll`](DrivenLink::poll) handles the requests that have arrived,
/// calling the service's handler on the polling thread. A thread that only
/// watches the link while nobody polls it [`wait`](DrivenLink::wait)s. The
/// two may be different threads, one at a time (the link is `Send`). Dropping
/// the link closes it: its client sees the instance gone.
pub struct DrivenLink {
    pub(crate) server: LinkServer,
    pub(crate) rx: LinkReceiver,
    pub(crate) closed: bool,
}

impl std::fmt::Debug for DrivenLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrivenLink")
            .field("service", &self.server.ctx.service)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl DrivenLink {
    pub(crate) fn new(link: ShmLink, ctx: Arc<ServeCtx>) -> DrivenLink {
        let caller = Caller::local(link.peer());
        let (tx, rx) = link.split();
        DrivenLink {
            server: LinkServer::new(tx, ctx, caller),
            rx,
            closed: false,
        }
    }

    /// Who is at the other end: every request of this link comes from
    /// this caller.
    pub fn caller(&self) -> &Caller {
        &self.server.link.caller
    }

    /// Handles the frames that have arrived, at most `max` of them, without
    /// waiting: each request is handed to the service's handler on this
    /// thread.
    pub fn poll(&mut self, max: usize) -> Drive {
        if self.closed {
            return Drive::Closed;
        }
        let _runtime = self.server.ctx.runtime.enter();
        for _ in 0..max {
            let open = match self.rx.try_recv() {
                Ok(Some(msg)) => self.server.on_frame(msg),
                Ok(None) => return Drive::Empty,
                Err(e) => {
                    self.server.closing(&e);
                    false
                }
            };
            if !open {
                return self.close();
            }
        }
        Drive::More
    }

    /// [`poll`](DrivenLink::poll), with each request (and one-way
    /// message) within the service's concurrency limit handed to
    /// `on_request` with its payload, borrowed from the ring, instead of to
    /// the service's handler, in the order they came: the poller answers it
    /// through its [`PolledRequest`]. For a binding that hands requests to
    /// its event loop in batches: a request then costs no allocation and
    /// one lock (its registration, for cancellation). The poller sees no
    /// deadline and no metadata. Requests beyond the concurrency limit (or
    /// while others wait for a permit) go to the service's handler, as with
    /// `poll`, which bounds them as it does there; they may then be handled
    /// after requests that came later.
    pub fn poll_requests(
        &mut self,
        max: usize,
        mut on_request: impl FnMut(PolledRequest, &[u8]),
    ) -> Drive {
        if self.closed {
            return Drive::Closed;
        }
        let _runtime = self.server.ctx.runtime.enter();
        // Permits taken (and counted in progress) but not handed out yet:
        // given back when the poll ends, also if `on_request` panics.
        let mut held = HeldPermits {
            link: self.server.link.clone(),
            n: 0,
        };
        let mut drive = Drive::More;
        for _ in 0..max {
            let msg = match self.rx.try_recv() {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    drive = Drive::Empty;
                    break;
                }
                Err(e) => {
                    self.server.closing(&e);
                    drive = Drive::Closed;
                    break;
                }
            };
            if self.server.take_request(&msg, &mut held.n, &mut on_request) {
                // Released after its poller had it (as in `on_frame`).
                drop(msg);
            } else if !self.server.on_frame(msg) {
                drive = Drive::Closed;
                break;
            }
        }
        drop(held);
        if drive == Drive::Closed {
            return self.close();
        }
        drive
    }

    pub(crate) fn close(&mut self) -> Drive {
        self.closed = true;
        self.server.stop_running();
        Drive::Closed
    }

    /// Waits (per the mesh's link wait strategy) until something arrived:
    /// `true` when [`poll`](DrivenLink::poll) has work (a request, or the
    /// news that the link closed); `false` when `deadline` passed or an
    /// [interrupter](DrivenLink::interrupter) ended the wait.
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        self.closed || self.rx.wait(deadline)
    }

    /// Whether a frame has arrived (one load: a hint for a poller deciding
    /// whether to poll again; the link's closing shows only in `poll`).
    pub fn has_data(&self) -> bool {
        self.rx.has_data()
    }

    /// A handle that ends a [`wait`](DrivenLink::wait) from another thread.
    pub fn interrupter(&self) -> commy_shm::WaitInterrupter {
        self.rx.interrupter()
    }

    /// The service this link serves.
    pub fn service(&self) -> &commy_core::ServiceName {
        self.server.ctx.service
    }
}
