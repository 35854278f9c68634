//! Connections: commy-shm links carrying commy-core frames, bridged to tokio.
//!
//! Each link gets one reader thread per side that waits on the ring (spin,
//! yield, then futex, so an idle link costs no CPU) and dispatches frames:
//! on the client, responses complete the pending call's oneshot; on the
//! server, requests become tokio tasks running the service's handler.
//! Sending happens on the caller's thread, straight into the ring.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use commy_core::{
    Code, Deadline, FrameHeader, FrameKind, FrameRef, InstanceId, Limits, Metadata, Status,
    StreamId,
};
use commy_shm::link::{LinkSender, RecvError, SendError};
use commy_shm::{LinkReceiver, RingError, ShmLink};
use tokio::sync::oneshot;

use crate::service::{Handler, Request, Response};

/// How long a send may wait for ring space before the call fails with
/// `ResourceExhausted` (the peer is not draining its ring).
const SEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Encodes `header` + `metadata` + `payload` as one message on the link:
/// in place in the ring when it fits one record, else through the
/// fragmenting copy path.
pub(crate) fn send_frame(
    tx: &mut LinkSender,
    mut header: FrameHeader,
    metadata: &[u8],
    payload: &[u8],
    deadline: Option<Instant>,
) -> Result<(), SendError> {
    header.metadata_len = metadata.len() as u32;
    header.payload_len = payload.len() as u32;
    let total = commy_core::HEADER_LEN + metadata.len() + payload.len();
    let deadline = deadline.or_else(|| Some(Instant::now() + SEND_PATIENCE));
    if total <= tx.max_record() {
        let mut loan = tx.loan(total, deadline)?.zeroed();
        let b = loan.bytes_mut();
        b[..commy_core::HEADER_LEN].copy_from_slice(&header.encode());
        b[commy_core::HEADER_LEN..commy_core::HEADER_LEN + metadata.len()]
            .copy_from_slice(metadata);
        b[commy_core::HEADER_LEN + metadata.len()..].copy_from_slice(payload);
        loan.commit();
        Ok(())
    } else {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&header.encode());
        v.extend_from_slice(metadata);
        v.extend_from_slice(payload);
        tx.send_deadline(&v, deadline)
    }
}

/// Maps a link send failure to the caller's status.
pub(crate) fn send_status(e: SendError) -> Status {
    match e {
        SendError::TooLarge { len, max } => Status::resource_exhausted(format!(
            "message of {len} bytes exceeds the peer's limit of {max} bytes"
        )),
        SendError::TimedOut => {
            Status::resource_exhausted("the peer is not draining its queue (ring full)")
        }
        SendError::Ring(e) => Status::unavailable(format!("link lost: {e}")),
        other => Status::unavailable(format!("link error: {other}")),
    }
}

/// The metadata section of a frame: empty when there is no metadata, so
/// the common case costs nothing to encode or decode.
pub(crate) fn encode_metadata(metadata: &Metadata) -> Vec<u8> {
    if metadata.is_empty() {
        Vec::new()
    } else {
        metadata.encode()
    }
}

/// Reads a frame's metadata section (see [`encode_metadata`]).
pub(crate) fn decode_metadata(
    bytes: &[u8],
    limits: &Limits,
) -> Result<Metadata, commy_core::MetadataError> {
    if bytes.is_empty() {
        Ok(Metadata::default())
    } else {
        Metadata::decode(bytes, limits)
    }
}

/// The result a pending call receives.
pub(crate) type CallResult = Result<Response, Status>;

/// The client side of one link to one service instance.
pub(crate) struct ClientConn {
    tx: Mutex<LinkSender>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<CallResult>>>>,
    next_stream: AtomicU64,
    alive: Arc<AtomicBool>,
    /// Calls in flight (for least-loaded balancing).
    pub(crate) in_flight: AtomicUsize,
}

impl ClientConn {
    /// Wraps a connected link and starts its reader thread.
    pub(crate) fn start(instance: InstanceId, link: ShmLink, limits: Limits) -> Arc<ClientConn> {
        let (tx, rx) = link.split();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<CallResult>>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let conn = Arc::new(ClientConn {
            tx: Mutex::new(tx),
            pending: pending.clone(),
            next_stream: AtomicU64::new(1),
            alive: alive.clone(),
            in_flight: AtomicUsize::new(0),
        });
        let spawned = std::thread::Builder::new()
            .name(format!("commy-client-{instance}"))
            .spawn(move || client_reader(rx, pending, alive, limits));
        if let Err(e) = spawned {
            tracing::error!("cannot start a link reader thread: {e}");
            conn.alive.store(false, Ordering::Release);
        }
        conn
    }

    /// Whether the link still works.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its response (or the deadline).
    pub(crate) async fn call(
        &self,
        payload: &[u8],
        metadata: &Metadata,
        deadline: Option<Deadline>,
    ) -> CallResult {
        if !self.is_alive() {
            return Err(Status::unavailable("the instance is gone"));
        }
        // Client-opened streams use odd ids.
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Status::internal("connection state poisoned"))?
            .insert(id, done_tx);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&self.in_flight);
        let md = encode_metadata(metadata);
        let header = FrameHeader {
            deadline_us: Deadline::to_wire_option(deadline),
            ..FrameHeader::new(FrameKind::Request, StreamId(id))
        };
        let sent = {
            let mut tx = self
                .tx
                .lock()
                .map_err(|_| Status::internal("connection state poisoned"))?;
            send_frame(&mut tx, header, &md, payload, deadline.map(|d| d.instant()))
        };
        if let Err(e) = sent {
            self.forget(id);
            return Err(send_status(e));
        }
        let outcome = match deadline {
            Some(d) => match tokio::time::timeout_at(d.instant().into(), done_rx).await {
                Ok(r) => r,
                Err(_) => {
                    self.forget(id);
                    self.cancel(id);
                    return Err(Status::deadline_exceeded("no response before the deadline"));
                }
            },
            None => done_rx.await,
        };
        match outcome {
            Ok(result) => result,
            Err(_) => Err(Status::unavailable(
                "the instance went away during the call",
            )),
        }
    }

    /// Sends a one-way message.
    pub(crate) fn send_oneway(&self, payload: &[u8], metadata: &Metadata) -> Result<(), Status> {
        self.send_unanswered(FrameKind::OneWay, &encode_metadata(metadata), payload)
    }

    /// Sends a Publish frame (its metadata carries the topic).
    pub(crate) fn send_publish(&self, metadata: &[u8], payload: &[u8]) -> Result<(), Status> {
        self.send_unanswered(FrameKind::Publish, metadata, payload)
    }

    /// Sends a frame on a fresh stream that gets no answer.
    fn send_unanswered(
        &self,
        kind: FrameKind,
        metadata: &[u8],
        payload: &[u8],
    ) -> Result<(), Status> {
        if !self.is_alive() {
            return Err(Status::unavailable("the instance is gone"));
        }
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let mut tx = self
            .tx
            .lock()
            .map_err(|_| Status::internal("connection state poisoned"))?;
        send_frame(
            &mut tx,
            FrameHeader::new(kind, StreamId(id)),
            metadata,
            payload,
            None,
        )
        .map_err(send_status)
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    /// Tells the server to stop working on `id` (best effort).
    fn cancel(&self, id: u64) {
        if let Ok(mut tx) = self.tx.lock() {
            let _ = send_frame(
                &mut tx,
                FrameHeader::new(FrameKind::Cancel, StreamId(id)),
                &[],
                &[],
                Some(Instant::now()),
            );
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's reader thread: completes pending calls with responses.
fn client_reader(
    mut rx: LinkReceiver,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<CallResult>>>>,
    alive: Arc<AtomicBool>,
    limits: Limits,
) {
    let reason = loop {
        let msg = match rx.recv(None) {
            Ok(m) => m,
            Err(e) => break e,
        };
        let frame = match FrameRef::decode(&msg, &limits) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("dropping a link: the server sent a malformed frame: {e}");
                break RecvError::Protocol("malformed frame");
            }
        };
        let h = *frame.header();
        let waiter = pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&h.stream_id.0));
        let Some(waiter) = waiter else {
            // A response to a call that timed out or was cancelled.
            continue;
        };
        let result = match h.kind {
            FrameKind::Response => match decode_metadata(frame.metadata(), &limits) {
                Ok(metadata) => Ok(Response {
                    payload: Bytes::copy_from_slice(frame.payload()),
                    metadata,
                }),
                Err(e) => Err(Status::internal(format!(
                    "malformed response metadata: {e}"
                ))),
            },
            FrameKind::Error => Err(Status::decode(frame.payload()).unwrap_or_else(|e| {
                Status::internal(format!("malformed error status from the server: {e}"))
            })),
            other => Err(Status::internal(format!(
                "unexpected {} frame in answer to a request",
                other.as_str()
            ))),
        };
        let _ = waiter.send(result);
    };
    alive.store(false, Ordering::Release);
    let status = match reason {
        RecvError::Ring(RingError::Closed) => Status::unavailable("the instance closed the link"),
        RecvError::Ring(RingError::PeerGone) => Status::unavailable("the instance died"),
        other => Status::unavailable(format!("link to the instance failed: {other}")),
    };
    let waiters: Vec<_> = pending
        .lock()
        .map(|mut p| p.drain().map(|(_, w)| w).collect())
        .unwrap_or_default();
    for w in waiters {
        let _ = w.send(Err(status.clone()));
    }
}

/// Per-service state a server connection needs.
pub(crate) struct ServeCtx {
    pub(crate) handler: Handler,
    pub(crate) limits: Limits,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// Requests being handled, across all connections (for draining).
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) drained: Arc<tokio::sync::Notify>,
    pub(crate) service: commy_core::ServiceName,
}

/// Serves one accepted link until it closes (runs on its own thread).
pub(crate) fn serve_link(link: ShmLink, ctx: Arc<ServeCtx>) {
    let (tx, mut rx) = link.split();
    let tx = Arc::new(Mutex::new(tx));
    let running: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>> = Arc::default();
    loop {
        let msg = match rx.recv(None) {
            Ok(m) => m,
            Err(RecvError::Ring(RingError::Closed | RingError::PeerGone)) => break,
            Err(e) => {
                tracing::warn!("closing a link of service {}: {e}", ctx.service);
                break;
            }
        };
        let frame = match FrameRef::decode(&msg, &ctx.limits) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "closing a link of service {}: malformed frame from the client: {e}",
                    ctx.service
                );
                break;
            }
        };
        let h = *frame.header();
        match h.kind {
            FrameKind::Request | FrameKind::OneWay => {
                let metadata = match decode_metadata(frame.metadata(), &ctx.limits) {
                    Ok(m) => m,
                    Err(e) => {
                        if h.kind == FrameKind::Request {
                            reply(
                                &tx,
                                h.stream_id,
                                Err(Status::invalid_argument(format!("malformed metadata: {e}"))),
                            );
                        }
                        continue;
                    }
                };
                let deadline = Deadline::from_wire(h.deadline_us);
                if deadline.is_some_and(|d| d.is_expired()) {
                    // Expired on arrival: the caller has given up already.
                    continue;
                }
                let request = Request {
                    service: ctx.service.clone(),
                    payload: Bytes::copy_from_slice(frame.payload()),
                    metadata,
                    deadline,
                };
                drop(msg);
                spawn_handler(&ctx, &tx, &running, h, request);
            }
            FrameKind::Cancel => {
                drop(msg);
                if let Some(task) = running
                    .lock()
                    .ok()
                    .and_then(|mut r| r.remove(&h.stream_id.0))
                {
                    task.abort();
                }
            }
            FrameKind::Ping => {
                drop(msg);
                if let Ok(mut tx) = tx.lock() {
                    let _ = send_frame(
                        &mut tx,
                        FrameHeader::new(FrameKind::Pong, h.stream_id),
                        &[],
                        &[],
                        None,
                    );
                }
            }
            other => {
                tracing::debug!(
                    "service {}: ignoring an unexpected {} frame",
                    ctx.service,
                    other.as_str()
                );
            }
        }
    }
    // The client is gone: stop work nobody waits for.
    if let Ok(mut r) = running.lock() {
        for (_, task) in r.drain() {
            task.abort();
        }
    }
}

fn spawn_handler(
    ctx: &Arc<ServeCtx>,
    tx: &Arc<Mutex<LinkSender>>,
    running: &Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>,
    h: FrameHeader,
    request: Request,
) {
    let id = h.stream_id;
    let oneway = h.kind == FrameKind::OneWay;
    let deadline = request.deadline;
    let handler_fut = (ctx.handler)(request);
    ctx.in_flight.fetch_add(1, Ordering::AcqRel);
    let work = {
        let ctx = ctx.clone();
        async move {
            let _permit = ctx.permits.clone().acquire_owned().await;
            match deadline {
                Some(d) => tokio::time::timeout_at(d.instant().into(), handler_fut)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(
                            "the handler ran past the deadline",
                        ))
                    }),
                None => handler_fut.await,
            }
        }
    };
    let task = ctx.runtime.spawn(work);
    let abort = task.abort_handle();
    if !oneway {
        if let Ok(mut r) = running.lock() {
            r.insert(id.0, abort);
        }
    }
    let (ctx2, tx, running) = (ctx.clone(), tx.clone(), running.clone());
    ctx.runtime.spawn(async move {
        let result = match task.await {
            Ok(r) => Some(r),
            Err(e) if e.is_panic() => {
                tracing::error!("service {}: the handler panicked", ctx2.service);
                Some(Err(Status::internal("the service's handler panicked")))
            }
            // Cancelled by the caller: it is not waiting for an answer.
            Err(_) => None,
        };
        let still_wanted = running
            .lock()
            .map(|mut r| r.remove(&id.0).is_some())
            .unwrap_or(false);
        if let Some(result) = result {
            if !oneway && still_wanted {
                reply(&tx, id, result);
            }
        }
        if ctx2.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            ctx2.drained.notify_waiters();
        }
    });
}

/// Sends a handler's result back on the link (best effort: a client that is
/// gone gets nothing).
fn reply(tx: &Arc<Mutex<LinkSender>>, id: StreamId, result: Result<Response, Status>) {
    let Ok(mut tx) = tx.lock() else { return };
    let sent = match result {
        Ok(resp) => {
            let md = encode_metadata(&resp.metadata);
            send_frame(
                &mut tx,
                FrameHeader::new(FrameKind::Response, id),
                &md,
                &resp.payload,
                None,
            )
        }
        Err(status) => {
            let status = if status.code() == Code::Ok {
                Status::internal("handler returned an error with code OK")
            } else {
                status
            };
            send_frame(
                &mut tx,
                FrameHeader::new(FrameKind::Error, id),
                &[],
                &status.encode(),
                None,
            )
        }
    };
    if let Err(e) = sent {
        tracing::debug!("could not send a response: {e}");
    }
}
