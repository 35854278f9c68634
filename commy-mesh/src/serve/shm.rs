//! The shared-memory server: one thread per link waits on the ring and
//! polls each request's handler once right there; a handler that answers
//! without waiting is answered from that thread, one that has to wait
//! continues as a tokio task (bounded by the service's concurrency
//! permits).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::{FrameHeader, FrameKind, FrameRef, Status};
use commy_shm::link::{LinkSender, RecvError};
use commy_shm::{RingError, ShmLink};
use parking_lot::Mutex;

use crate::serve::dispatch::{CatchPanic, ServeCtx, finish_waiting, panicked};
use crate::serve::handler::{Handler, InlineSlot};
use crate::serve::inherit::{Inherited, scope};
use crate::serve::link::{Answering, LinkAnswer, LinkShared, Pending, reply, send_answer};
use crate::serve::load::{InlineBusy, OwnedHandling, handling, handling_n};
use crate::serve::polled::{POLLED_PERMITS, PolledRequest};
use crate::serve::request::{ArrivedDeadline, Caller, Request};
use crate::serve::responder::{Responder, Sink};
use crate::wire::{Patience, decode_metadata, send_frame};

/// Answers a link's thread stages at most before it publishes them.
const BURST: u32 = 64;

/// How often a draining link whose client sends no more looks whether its
/// last requests are done.
const DRAINED_CHECK: Duration = Duration::from_millis(1);

/// Serves one accepted link until it closes (runs on its own thread).
///
/// Each request's handler is polled once right here, so a handler that
/// completes without waiting is answered from this thread with no hand-off;
/// one that has to wait continues as a tokio task.
pub(crate) fn serve_link(link: ShmLink, ctx: Arc<ServeCtx>) {
    let _runtime = ctx.runtime.enter();
    let caller = Caller::local(link.peer());
    let (tx, mut rx) = link.split();
    let mut server = LinkServer::new(tx, ctx, caller);
    // Answers given while more requests wait are staged, and published
    // with the burst's last (or every `BURST` answers): a client that
    // pipelines its calls gets one wake-up check per burst, not per call.
    let mut staged = 0;
    loop {
        // Once the client said it sends no more (a drain), the link closes
        // as soon as nothing of it is in progress: look every millisecond.
        let done = server.link.client_done.load(Ordering::Acquire);
        if done && server.link.drained() {
            break;
        }
        let until = done.then(|| Instant::now() + DRAINED_CHECK);
        let msg = match rx.recv(until) {
            Ok(m) => m,
            Err(RecvError::TimedOut) => continue,
            Err(e) => {
                server.closing(&e);
                break;
            }
        };
        if !server.on_frame(msg) {
            break;
        }
        let more = rx.has_data();
        let shared = &server.link;
        if shared.staging.load(Ordering::Relaxed) {
            staged += 1;
            if !more || staged >= BURST {
                shared.flush();
                staged = 0;
            }
        }
        if more != shared.staging.load(Ordering::Relaxed) {
            shared.staging.store(more, Ordering::Relaxed);
        }
    }
    // Tasks still running may hold the link: end it for the client now
    // (a client that left is gone already; one that sent a malformed frame
    // or broke the ring learns at once that the link is over).
    server.link.tx.lock().abort();
}

/// One accepted link's serving state, apart from its receive ring (whoever
/// receives hands each frame to [`on_frame`](LinkServer::on_frame)). When
/// dropped, the work of requests still running is stopped: nobody waits
/// for it any more.
pub(crate) struct LinkServer {
    pub(crate) ctx: Arc<ServeCtx>,
    pub(crate) link: Arc<LinkShared>,
    /// This link's flag in `ctx.links` (see [`Load::idle`](crate::serve::load::Load::idle)).
    pub(crate) busy: Arc<AtomicBool>,
    pub(crate) handler: LinkHandler,
    /// The highest stream id the client opened on this link.
    pub(crate) last_opened: u64,
}

impl LinkServer {
    pub(crate) fn new(tx: LinkSender, ctx: Arc<ServeCtx>, caller: Caller) -> LinkServer {
        let busy = Arc::new(AtomicBool::new(false));
        ctx.load.links.lock().push(busy.clone());
        let link = Arc::new(LinkShared {
            tx: Mutex::new(tx),
            running: Mutex::default(),
            polled: Mutex::default(),
            load: ctx.load.clone(),
            limits: ctx.limits,
            caller,
            staging: AtomicBool::new(false),
            going_away: AtomicBool::new(false),
            client_done: AtomicBool::new(false),
            answering: AtomicUsize::new(0),
        });
        {
            let mut links = ctx.links.lock();
            links.retain(|l| l.strong_count() > 0);
            links.push(Arc::downgrade(&link));
        }
        // SYNC: SeqCst pairs with the drain's: a link accepted while the
        // service drains is told so by one side or the other.
        if ctx.load.draining.load(Ordering::SeqCst) {
            link.go_away();
        }
        LinkServer {
            last_opened: 0,
            handler: LinkHandler::new(&ctx.handler),
            link,
            ctx,
            busy,
        }
    }

    /// Logs why the link ends (a client that left is no news).
    pub(crate) fn closing(&self, e: &RecvError) {
        if !matches!(e, RecvError::Ring(RingError::Closed | RingError::PeerGone)) {
            self.ctx
                .warn_link(|| format!("closing a link of service {}: {e}", self.ctx.service));
        }
    }

    /// Handles one frame from the client. `false` when the frame is
    /// malformed or breaks a rule of the protocol: the link must close.
    pub(crate) fn on_frame(&mut self, msg: commy_shm::link::Message<'_>) -> bool {
        let LinkServer {
            ctx,
            link: shared,
            busy,
            handler,
            last_opened,
        } = self;
        let (tx, running) = (&shared.tx, &shared.running);
        let frame = match FrameRef::decode(&msg, &ctx.limits) {
            Ok(f) => f,
            Err(e) => {
                ctx.warn_link(|| {
                    format!(
                        "closing a link of service {}: malformed frame from the client: {e}",
                        ctx.service
                    )
                });
                return false;
            }
        };
        let h = *frame.header();
        match h.kind {
            FrameKind::Request | FrameKind::OneWay => {
                let id = h.stream_id.0;
                if !opens_in_order(*last_opened, id) {
                    drop(msg);
                    let e = format!(
                        "protocol violation: a {} on stream {id}; streams open with odd ids, each \
                         above the last ({}; stream ids increase and are never reused)",
                        h.kind, *last_opened
                    );
                    ctx.warn_link(|| format!("closing a link of service {}: {e}", ctx.service));
                    let _ = send_frame(
                        &mut tx.lock(),
                        FrameHeader::new(FrameKind::Error, commy_core::StreamId(0)),
                        &[],
                        &Status::invalid_argument(e).encode(),
                        Patience::DEFAULT,
                    );
                    return false;
                }
                *last_opened = id;
                let metadata = match decode_metadata(frame.metadata(), &ctx.limits) {
                    Ok(m) => m,
                    Err(e) => {
                        drop(msg);
                        if h.kind == FrameKind::Request {
                            reply(
                                tx,
                                &ctx.limits,
                                h.stream_id,
                                Err(Status::invalid_argument(format!("malformed metadata: {e}"))),
                            );
                        }
                        return true;
                    }
                };
                if let Err(status) =
                    ctx.admit(&shared.caller, &metadata, h.kind == FrameKind::OneWay)
                {
                    drop(msg);
                    if h.kind == FrameKind::Request {
                        reply(tx, &ctx.limits, h.stream_id, Err(status));
                    }
                    return true;
                }
                let request = Request {
                    service: ctx.service,
                    payload: Bytes::copy_from_slice(frame.payload()),
                    metadata: metadata.into(),
                    // Relative on the wire: anchored when first needed.
                    deadline: ArrivedDeadline::from_wire(h.deadline_us),
                    caller: shared.caller.clone(),
                };
                // The request's record is released after the handler ran
                // (or went on as a task): releasing ends with a fence, which
                // would otherwise stand between the request and its answer.
                let link = ServedLink {
                    ctx,
                    link: shared,
                    busy,
                };
                handle(&link, handler, h, request);
                drop(msg);
            }
            FrameKind::Cancel => {
                drop(msg);
                let cancelled = running.lock().remove(&h.stream_id.0);
                if let Some(p) = cancelled {
                    p.cancel();
                } else if shared.polled.lock().remove(&h.stream_id.0) {
                    shared.release_polled(1);
                }
            }
            FrameKind::GoAway => {
                // The client's answer to ours: it opens no new stream.
                drop(msg);
                shared.client_done.store(true, Ordering::Release);
            }
            FrameKind::Ping => {
                drop(msg);
                let _ = send_frame(
                    &mut tx.lock(),
                    FrameHeader::new(FrameKind::Pong, h.stream_id),
                    &[],
                    &[],
                    Patience::DEFAULT,
                );
            }
            other => {
                tracing::debug!(
                    "service {}: ignoring an unexpected {} frame",
                    ctx.service,
                    other.as_str()
                );
            }
        }
        true
    }

    /// Hands `msg` to `on_request` if it is a request that may start now
    /// (see [`DrivenLink::poll_requests`]; `held` counts the permits taken
    /// for it and not handed out yet). `false`: `msg` is for
    /// [`on_frame`](LinkServer::on_frame).
    pub(crate) fn take_request(
        &mut self,
        msg: &[u8],
        held: &mut usize,
        on_request: &mut impl FnMut(PolledRequest, &[u8]),
    ) -> bool {
        let limits = &self.ctx.limits;
        let Ok(frame) = FrameRef::decode(msg, limits) else {
            return false;
        };
        let h = *frame.header();
        let one_way = match h.kind {
            FrameKind::Request => false,
            FrameKind::OneWay => true,
            _ => return false,
        };
        if !opens_in_order(self.last_opened, h.stream_id.0) {
            // For `on_frame`, which fails the link.
            return false;
        }
        if *held == 0 {
            if self.ctx.load.permits.has_waiters() {
                // Requests wait for permits already: this one goes behind
                // them, through the handler's path.
                return false;
            }
            // Counted in progress before the request is handed out.
            *held = self.ctx.load.permits.try_take_up_to(POLLED_PERMITS);
            if *held == 0 {
                // The handler's path waits for a permit.
                return false;
            }
            handling_n(&self.ctx.load, *held);
        }
        // Taken from here on: the stream is open.
        self.last_opened = h.stream_id.0;
        let refused = match decode_metadata(frame.metadata(), limits) {
            Ok(metadata) => self.ctx.admit(&self.link.caller, &metadata, one_way).err(),
            Err(e) => Some(Status::invalid_argument(format!("malformed metadata: {e}"))),
        };
        if let Some(status) = refused {
            if !one_way {
                send_answer(&self.link.tx, limits, h.stream_id, Err(status));
            }
            return true;
        }
        if !one_way && !self.link.polled.lock().insert(h.stream_id.0) {
            // The request in progress keeps the stream (and gets the one
            // answer it may get).
            self.ctx.warn_link(|| {
                format!(
                    "service {}: ignoring a request that reused stream {} of one in progress",
                    self.ctx.service, h.stream_id.0
                )
            });
            return true;
        }
        *held -= 1;
        let request = PolledRequest {
            link: Some(self.link.clone()),
            id: h.stream_id,
            one_way,
        };
        on_request(request, frame.payload());
        true
    }

    /// Stops the work of requests still running (their client is gone).
    pub(crate) fn stop_running(&self) {
        let left: Vec<_> = self.link.running.lock().drain().map(|(_, p)| p).collect();
        for p in left {
            p.cancel();
        }
        let polled = std::mem::take(&mut *self.link.polled.lock());
        self.link.release_polled(polled.len());
    }
}

/// Whether a request on stream `id` may open it (docs/PROTOCOL.md 4.1): an
/// odd id (the client's) above `last`, every id the client opened before
/// on the link.
fn opens_in_order(last: u64, id: u64) -> bool {
    !id.is_multiple_of(2) && id > last
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.stop_running();
        self.ctx
            .load
            .links
            .lock()
            .retain(|b| !Arc::ptr_eq(b, &self.busy));
    }
}

/// What handling a request needs of the link it came on.
pub(crate) struct ServedLink<'a> {
    pub(crate) ctx: &'a Arc<ServeCtx>,
    pub(crate) link: &'a Arc<LinkShared>,
    /// The link's flag for handlers running inline.
    pub(crate) busy: &'a AtomicBool,
}

/// A service's handler as one link's thread runs it.
pub(crate) enum LinkHandler {
    /// An async handler, in this link's slot.
    Async(Box<dyn InlineSlot>),
    /// A deferred handler.
    Deferred(Arc<dyn Fn(Request, Responder) + Send + Sync>),
}

impl LinkHandler {
    pub(crate) fn new(handler: &Handler) -> LinkHandler {
        match handler {
            Handler::Async(f) => LinkHandler::Async(f.clone().inline_slot()),
            Handler::Deferred(f) => LinkHandler::Deferred(f.clone()),
        }
    }
}

/// Runs one request: inline if its handler completes at once, else as a
/// task.
pub(crate) fn handle(
    link: &ServedLink<'_>,
    handler: &mut LinkHandler,
    h: FrameHeader,
    request: Request,
) {
    let ServedLink {
        ctx,
        link: shared,
        busy,
    } = *link;
    let running = &shared.running;
    let slot = match handler {
        LinkHandler::Async(slot) => slot,
        LinkHandler::Deferred(f) => return handle_deferred(link, h, request, f),
    };
    let id = h.stream_id;
    let oneway = h.kind == FrameKind::OneWay;
    let deadline = request.deadline.clone();
    let inline = InlineBusy::enter(busy);
    // A handler that answers at once runs right here, one at a time per
    // link, without a permit: permits bound the handlers left waiting.
    let mut cx = Context::from_waker(Waker::noop());
    let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| slot.run(request, &mut cx))) {
        Ok(Ok(result)) => {
            if !oneway {
                shared.reply_inline(id, result);
            }
            return;
        }
        Ok(Err(fut)) => CatchPanic(fut),
        Err(_) => {
            if !oneway {
                shared.reply_inline(id, Err(panicked(ctx.service)));
            }
            return;
        }
    };
    // Counted before the link's flag clears (see `ServeCtx::idle`).
    let handling = OwnedHandling::enter(ctx.load.clone());
    drop(inline);
    // The handler waits: its deadline counts from now at the latest (it
    // anchored it already if it asked), and it continues as a task once it
    // has a permit.
    let deadline = deadline.get();
    let permit = ctx.load.permits.try_take();
    if !oneway {
        running.lock().insert(id.0, Pending::Task(None));
    }
    let work = {
        let (ctx, shared) = (ctx.clone(), shared.clone());
        async move {
            let _handling = handling;
            let result = finish_waiting(&ctx, fut, deadline, permit).await;
            // Removed already if the caller cancelled: nobody waits then.
            let answering = Answering::start(&shared);
            if !oneway && shared.running.lock().remove(&id.0).is_some() {
                reply(&shared.tx, &ctx.limits, id, result);
            }
            drop(answering);
        }
    };
    let task = ctx.runtime.spawn(work);
    if !oneway && let Some(slot) = running.lock().get_mut(&id.0) {
        *slot = Pending::Task(Some(task.abort_handle()));
    }
}

/// Runs one request of a deferred handler: the handler gets a responder
/// that writes the answer into the link from whichever thread answers.
/// Without a free concurrency permit the request waits for one on the
/// runtime and its handler is then called there.
fn handle_deferred(
    link: &ServedLink<'_>,
    h: FrameHeader,
    request: Request,
    handler: &Arc<dyn Fn(Request, Responder) + Send + Sync>,
) {
    let ServedLink {
        ctx,
        link: shared,
        busy,
    } = *link;
    let inline = InlineBusy::enter(busy);
    // Counted before the link's flag clears (see `ServeCtx::idle`); the
    // responder ends the count.
    handling(&ctx.load);
    let sink = if h.kind == FrameKind::OneWay {
        Sink::OneWay
    } else {
        Sink::Link(LinkAnswer {
            link: shared.clone(),
            limits: ctx.limits,
            id: h.stream_id,
        })
    };
    let permit = ctx.load.permits.try_take();
    let waits = !permit;
    let responder = Responder::new(sink, Some(ctx.load.clone()), permit);
    if h.kind != FrameKind::OneWay {
        shared
            .running
            .lock()
            .insert(h.stream_id.0, Pending::Deferred(responder.shared().clone()));
    }
    if !waits {
        call_deferred(handler, request, responder, ctx.service);
        drop(inline);
        return;
    }
    drop(inline);
    let (ctx2, handler) = (ctx.clone(), handler.clone());
    ctx.runtime.spawn(async move {
        let mut responder = responder;
        let permit = ctx2.load.permits.take().await;
        responder.hold_permit(permit);
        if responder.is_cancelled() {
            return;
        }
        call_deferred(&handler, request, responder, ctx2.service);
    });
}

/// Calls a deferred handler; if it panics, the caller gets `Internal`.
fn call_deferred(
    handler: &Arc<dyn Fn(Request, Responder) + Send + Sync>,
    request: Request,
    responder: Responder,
    service: &commy_core::ServiceName,
) {
    let mut inherited = Inherited::of(&request.deadline);
    let run = || scope(&mut inherited, || handler(request, responder));
    if std::panic::catch_unwind(AssertUnwindSafe(run)).is_err() {
        // The responder, dropped while unwinding, answered `Internal`.
        let _ = panicked(service);
    }
}
