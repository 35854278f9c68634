//! The calling side: one connection to one server, shared by every caller
//! and multiplexed by stream id, re-established when lost.
//!
//! A call waits for stream credit (the server grants it, so a slow server
//! makes callers wait instead of making the client buffer), registers its
//! stream, queues the request on the bounded writer and waits for the
//! answer or its deadline. Dropping a call's future cancels it (a Cancel
//! frame tells the server). When the connection is lost, calls in flight
//! fail with `UNAVAILABLE`, and the next call reconnects; failed attempts
//! back off exponentially with full jitter
//! ([`Settings::backoff_base`] .. [`Settings::backoff_cap`]), and calls made
//! while waiting for the next attempt fail at once with `UNAVAILABLE`.
//! A GOAWAY from the server lets calls in flight finish while new calls
//! open a new connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use commy_core::{Deadline, FrameFlags, FrameHeader, FrameKind, Limits, Status, StreamId};
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_rustls::TlsConnector;

use crate::link::{
    FrameReader, Out, PUSH_CREDIT, Quiet, ReadError, Received, Settings, WriterEnd, write_frames,
};
use crate::mux::Backoff;
use crate::server::Reply;
use crate::tls::Identity;

/// Errors from [`Client::new`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The host is neither a DNS name nor an IP address.
    #[error("invalid server name {host:?}: {source}")]
    ServerName {
        /// The host given.
        host: String,
        /// The cause.
        source: rustls::pki_types::InvalidDnsNameError,
    },
}

/// How a call failed ([`Client::call_attempt`]).
#[derive(Debug, Clone)]
pub enum CallFailure {
    /// The server provably did not process the request: no connection
    /// could be made (the payload comes back then, for another server),
    /// the connection closed before the request was queued, or the
    /// server's GoAway refused it.
    Unsent(Status, Option<Bytes>),
    /// The request was sent (or may have been) and failed.
    Failed(Status),
}

impl CallFailure {
    /// The failure's status.
    pub fn into_status(self) -> Status {
        match self {
            CallFailure::Unsent(s, _) | CallFailure::Failed(s) => s,
        }
    }
}

/// A client of one server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.target)
            .finish_non_exhaustive()
    }
}

struct ClientInner {
    host: String,
    port: u16,
    target: String,
    name: ServerName<'static>,
    connector: TlsConnector,
    settings: Settings,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    connects: AtomicU64,
}

struct State {
    session: Option<Arc<Session>>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Client {
    /// A client of the server at `host:port`, whose certificate must be
    /// valid for `host` and chain to the roots of `tls`. Connects lazily.
    pub fn new(
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        settings: Settings,
    ) -> Result<Client, ClientError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name =
            ServerName::try_from(bare.to_owned()).map_err(|source| ClientError::ServerName {
                host: host.to_owned(),
                source,
            })?;
        let target = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        Ok(Client {
            inner: Arc::new(ClientInner {
                host: bare.to_owned(),
                port,
                target,
                name,
                connector: TlsConnector::from(tls),
                state: Mutex::new(State {
                    session: None,
                    backoff: Backoff::new(settings.backoff_base, settings.backoff_cap),
                    retry_at: None,
                    last_error: String::new(),
                }),
                settings,
                connecting: tokio::sync::Mutex::new(()),
                connects: AtomicU64::new(0),
            }),
        })
    }

    /// `host:port` of the server.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Connections established so far (1 + reconnects).
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .state
            .lock()
            .session
            .as_ref()
            .is_some_and(|s| s.usable())
    }

    /// The server's identity (from its certificate), once connected.
    pub fn server_identity(&self) -> Option<Identity> {
        self.inner
            .state
            .lock()
            .session
            .as_ref()
            .and_then(|s| s.identity.clone())
    }

    /// Sends a request and waits for its reply, until `deadline` if given.
    /// `metadata` is an encoded metadata section (empty for none).
    pub async fn call(
        &self,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<Reply, Status> {
        self.call_attempt(metadata, payload, deadline)
            .await
            .map_err(CallFailure::into_status)
    }

    /// [`call`](Client::call), saying whether a failed request may have
    /// reached the server: one that could not even connect did not, and a
    /// caller may send it elsewhere.
    pub async fn call_attempt(
        &self,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<Reply, CallFailure> {
        let session = match self.session(deadline).await {
            Ok(session) => session,
            Err(status) => return Err(CallFailure::Unsent(status, Some(payload))),
        };
        session.call(metadata, payload, deadline).await
    }

    /// Sends a one-way message (no reply). Returns once it is queued.
    pub async fn send(
        &self,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<(), Status> {
        let session = self.session(deadline).await?;
        session.send_oneway(metadata, payload, deadline).await
    }

    /// Opens a stream the server pushes messages on: sends a request and
    /// waits (until `deadline` if given) for the Response that accepts it,
    /// whose stream stays open. The server then sends Publish frames on the
    /// stream as far as the stream's credit allows ([`PUSH_CREDIT`] at
    /// first; [`Pushes::grant`] gives more). An Error answer refuses it.
    pub async fn subscribe(
        &self,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<Pushes, Status> {
        let session = self.session(deadline).await?;
        session.subscribe(metadata, payload, deadline).await
    }

    /// Connects now if not connected (calls do this themselves).
    pub async fn connect(&self) -> Result<(), Status> {
        self.session(None).await.map(|_| ())
    }

    /// Closes the connection (calls in flight fail; the next call reconnects).
    pub fn disconnect(&self) {
        if let Some(s) = self.inner.state.lock().session.take() {
            s.close();
        }
    }

    async fn session(&self, deadline: Option<Deadline>) -> Result<Arc<Session>, Status> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _one = self.inner.connecting.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        {
            let st = self.inner.state.lock();
            if let Some(at) = st.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(Status::unavailable(format!(
                        "cannot reach {}: {} (next attempt in {} ms)",
                        self.inner.target,
                        st.last_error,
                        (at - now).as_millis()
                    )));
                }
            }
        }
        let mut timeout = self.inner.settings.connect_timeout;
        if let Some(d) = deadline {
            timeout = timeout.min(d.remaining());
        }
        let attempt = tokio::time::timeout(timeout, self.establish()).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => Err(format!("no connection within {timeout:?}")),
        };
        let mut st = self.inner.state.lock();
        match result {
            Ok(session) => {
                st.backoff.reset();
                st.retry_at = None;
                st.session = Some(session.clone());
                self.inner.connects.fetch_add(1, Ordering::Relaxed);
                Ok(session)
            }
            Err(e) => {
                let delay = st.backoff.next_delay();
                st.retry_at = Some(Instant::now() + delay);
                tracing::debug!(
                    "cannot connect to {}: {e}; next attempt in {delay:?}",
                    self.inner.target
                );
                st.last_error = e.clone();
                Err(Status::unavailable(format!(
                    "cannot reach {}: {e}",
                    self.inner.target
                )))
            }
        }
    }

    fn current(&self) -> Option<Arc<Session>> {
        let st = self.inner.state.lock();
        st.session.as_ref().filter(|s| s.usable()).cloned()
    }

    async fn establish(&self) -> Result<Arc<Session>, String> {
        let inner = &self.inner;
        let tcp = TcpStream::connect((inner.host.as_str(), inner.port))
            .await
            .map_err(|e| format!("TCP connect failed: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = inner
            .connector
            .connect(inner.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(commy_core::ALPN) {
            return Err("the server did not negotiate ALPN commy/1".into());
        }
        let identity = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(Identity::of_certificate);
        Ok(Session::start(
            tls,
            identity,
            &inner.settings,
            inner.target.clone(),
        ))
    }
}

type Pending = FxHashMap<u64, oneshot::Sender<Result<Reply, Status>>>;

/// Streams the server pushes messages on, by stream id: the accepting
/// Response, then each message; an Error ends them.
type Streams = FxHashMap<u64, mpsc::Sender<Result<Reply, Status>>>;

/// Messages a server pushes on a stream opened by [`Client::subscribe`].
/// Dropping it cancels the stream (a Cancel frame tells the server).
pub struct Pushes {
    session: Arc<Session>,
    id: u64,
    rx: mpsc::Receiver<Result<Reply, Status>>,
    accept: Option<Reply>,
}

impl std::fmt::Debug for Pushes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pushes")
            .field("server", &self.session.target)
            .field("stream", &self.id)
            .finish_non_exhaustive()
    }
}

impl Pushes {
    /// The next message (encoded metadata and payload); an `Err` when the
    /// server failed the stream or the connection was lost; `None` once
    /// the stream has ended.
    pub async fn next(&mut self) -> Option<Result<Reply, Status>> {
        self.rx.recv().await
    }

    /// The Response that accepted the stream.
    pub fn accepted(&self) -> Option<&Reply> {
        self.accept.as_ref()
    }

    /// Lets the server push `n` more messages (a Credit frame on the
    /// stream). Grant as messages are consumed, so that at most
    /// [`PUSH_CREDIT`] wait unconsumed.
    pub fn grant(&self, n: u32) {
        if n > 0 {
            let _ = self.session.ctrl.send(Out::frame(
                FrameKind::Credit,
                self.id,
                Bytes::new(),
                Bytes::copy_from_slice(&n.to_le_bytes()),
            ));
        }
    }

    /// The stream's id on its connection.
    pub fn stream_id(&self) -> u64 {
        self.id
    }
}

impl Drop for Pushes {
    fn drop(&mut self) {
        let open = self
            .session
            .pending
            .lock()
            .streams
            .remove(&self.id)
            .is_some();
        if open {
            let _ = self.session.ctrl.send(Out::frame(
                FrameKind::Cancel,
                self.id,
                Bytes::new(),
                Bytes::new(),
            ));
        }
    }
}

/// One established connection.
struct Session {
    out: mpsc::Sender<Out>,
    ctrl: mpsc::UnboundedSender<Out>,
    /// Streams the server lets us open (its Credit frames add to it).
    credit: Semaphore,
    pending: Mutex<PendingTable>,
    /// Set once the connection is lost (under the pending lock).
    closed: AtomicBool,
    /// Set once the server sent GOAWAY: no new streams here.
    going_away: AtomicBool,
    identity: Option<Identity>,
    target: String,
    limits: Limits,
}

struct PendingTable {
    calls: Pending,
    streams: Streams,
    /// Calls the server's GoAway refused (it did not process them), until
    /// their callers see it.
    refused: FxHashSet<u64>,
    closed_reason: Option<String>,
    /// The next stream id to open (odd: this side connected).
    next_id: u64,
}

impl PendingTable {
    /// Nothing in flight: no call waits, no stream is open.
    fn idle(&self) -> bool {
        self.calls.is_empty() && self.streams.is_empty()
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 2;
        id
    }
}

/// The header of a Request or OneWay opening stream `id`.
fn stream_header(kind: FrameKind, id: u64, deadline: Option<Deadline>) -> FrameHeader {
    FrameHeader {
        deadline_us: Deadline::to_wire_option(deadline),
        ..FrameHeader::new(kind, StreamId(id))
    }
}

impl Session {
    fn start(
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        identity: Option<Identity>,
        settings: &Settings,
        target: String,
    ) -> Arc<Session> {
        let (r, w) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel(settings.writer_queue);
        let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            out: tx,
            ctrl,
            credit: Semaphore::new(0),
            pending: Mutex::new(PendingTable {
                calls: FxHashMap::default(),
                refused: FxHashSet::default(),
                streams: FxHashMap::default(),
                closed_reason: None,
                next_id: 1,
            }),
            closed: AtomicBool::new(false),
            going_away: AtomicBool::new(false),
            identity,
            target,
            limits: settings.limits,
        });
        let writer = tokio::spawn(write_frames(
            w,
            rx,
            ctrl_rx,
            settings.write_timeout,
            settings.limits.max_frame,
        ));
        tokio::spawn(read_loop(
            Arc::downgrade(&session),
            FrameReader::new(r, settings.limits),
            writer,
            settings.clone(),
            session.ctrl.clone(),
        ));
        session
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.going_away.load(Ordering::Acquire)
    }

    async fn open_stream(
        &self,
        deadline: Option<Deadline>,
        metadata: &Bytes,
        payload: &Bytes,
    ) -> Result<(), Status> {
        self.limits.check_message(metadata.len(), payload.len())?;
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d.instant().into(), self.credit.acquire())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(
                        "no stream credit from the server before the deadline",
                    )
                })?,
            None => self.credit.acquire().await,
        };
        match permit {
            Ok(p) => {
                p.forget();
                Ok(())
            }
            Err(_) => Err(self.lost()),
        }
    }

    fn lost(&self) -> Status {
        let reason = self
            .pending
            .lock()
            .closed_reason
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Status::unavailable(format!("connection to {} lost: {reason}", self.target))
    }

    /// A call on this connection; a failure says whether the server
    /// provably did not process it (the connection closed before the
    /// request was queued, or the server's GoAway refused it).
    async fn call(
        self: Arc<Session>,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<Reply, CallFailure> {
        let (done_tx, done_rx) = oneshot::channel();
        let opened = self
            .open(FrameKind::Request, metadata, payload, deadline, |p, id| {
                p.calls.insert(id, done_tx);
            })
            .await;
        let id = match opened {
            Ok(id) => id,
            // Closed before the request was queued.
            Err(status) if status.code() == commy_core::Code::Unavailable => {
                return Err(CallFailure::Unsent(status, None));
            }
            Err(status) => return Err(CallFailure::Failed(status)),
        };
        let guard = CallGuard { session: &self, id };
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d.instant().into(), done_rx)
                .await
                .map_err(|_| {
                    CallFailure::Failed(Status::deadline_exceeded(
                        "no response before the deadline",
                    ))
                })?,
            None => done_rx.await,
        };
        std::mem::forget(guard);
        answer
            .unwrap_or_else(|_| Err(self.lost()))
            .map_err(|status| {
                if self.pending.lock().refused.remove(&id) {
                    CallFailure::Unsent(status, None)
                } else {
                    CallFailure::Failed(status)
                }
            })
    }

    async fn subscribe(
        self: Arc<Session>,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<Pushes, Status> {
        // Room for every message the credit allows, the accepting
        // Response and an Error.
        let (tx, rx) = mpsc::channel(PUSH_CREDIT as usize + 2);
        let id = self
            .open(FrameKind::Request, metadata, payload, deadline, |p, id| {
                p.streams.insert(id, tx);
            })
            .await?;
        let mut pushes = Pushes {
            session: self.clone(),
            id,
            rx,
            accept: None,
        };
        let first = match deadline {
            Some(d) => tokio::time::timeout_at(d.instant().into(), pushes.rx.recv())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded("the stream was not accepted before the deadline")
                })?,
            None => pushes.rx.recv().await,
        };
        match first {
            Some(Ok(reply)) => {
                pushes.accept = Some(reply);
                Ok(pushes)
            }
            Some(Err(status)) => Err(status),
            None => Err(self.lost()),
        }
    }

    async fn send_oneway(
        &self,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
    ) -> Result<(), Status> {
        self.open(FrameKind::OneWay, metadata, payload, deadline, |_, _| {})
            .await
            .map(drop)
    }

    /// Opens a stream with a Request or OneWay: waits for the server's
    /// credit and room in the writer's queue, then takes the stream's id,
    /// `register`s what waits for its answer, and queues the frame, all
    /// under one lock, so ids reach the server in increasing order, as it
    /// requires. Returns the id.
    async fn open(
        &self,
        kind: FrameKind,
        metadata: Bytes,
        payload: Bytes,
        deadline: Option<Deadline>,
        register: impl FnOnce(&mut PendingTable, u64),
    ) -> Result<u64, Status> {
        self.open_stream(deadline, &metadata, &payload).await?;
        let permit = self.room(deadline).await?;
        let mut p = self.pending.lock();
        if p.closed_reason.is_some() {
            drop(p);
            return Err(self.lost());
        }
        let id = p.take_id();
        register(&mut p, id);
        permit.send(Out::Frame(
            stream_header(kind, id, deadline),
            metadata,
            payload,
        ));
        Ok(id)
    }

    /// Room in the writer's queue for one frame, once a stream's credit is
    /// taken (given back if the deadline passes first).
    async fn room(&self, deadline: Option<Deadline>) -> Result<mpsc::Permit<'_, Out>, Status> {
        let reserved = match deadline {
            Some(d) => tokio::time::timeout_at(d.instant().into(), self.out.reserve())
                .await
                .map_err(|_| {
                    // Never sent: the stream's credit is ours again.
                    self.credit.add_permits(1);
                    Status::deadline_exceeded("the request could not be queued before the deadline")
                })?,
            None => self.out.reserve().await,
        };
        reserved.map_err(|_| self.lost())
    }

    /// Refuses new calls (they fail with `reason`) but leaves the ones in
    /// flight waiting. Returns whether any call is still in flight.
    fn stop_new_calls(&self, reason: &str) -> bool {
        let mut p = self.pending.lock();
        self.closed.store(true, Ordering::Release);
        if p.closed_reason.is_none() {
            p.closed_reason = Some(reason.to_string());
        }
        !p.idle()
    }

    /// Fails every pending call and refuses new ones.
    fn fail_all(&self, reason: String) {
        let (calls, streams) = {
            let mut p = self.pending.lock();
            self.closed.store(true, Ordering::Release);
            if p.closed_reason.is_none() {
                p.closed_reason = Some(reason.clone());
            }
            (std::mem::take(&mut p.calls), std::mem::take(&mut p.streams))
        };
        self.credit.close();
        let lost = || {
            Status::unavailable(format!(
                "connection to {} lost during the call: {reason}",
                self.target
            ))
        };
        for (_, waiter) in calls {
            let _ = waiter.send(Err(lost()));
        }
        for (_, stream) in streams {
            let _ = stream.try_send(Err(lost()));
        }
    }

    fn close(&self) {
        let _ = self.ctrl.send(Out::Close);
        self.fail_all("closed by this side".into());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The last user is gone: close the connection.
        let _ = self.ctrl.send(Out::Close);
    }
}

/// Removes a call that is given up (deadline, or its future dropped) and
/// tells the server to stop working on it.
struct CallGuard<'a> {
    session: &'a Session,
    id: u64,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let was_pending = self.session.pending.lock().calls.remove(&self.id).is_some();
        if was_pending {
            let _ = self.session.ctrl.send(Out::frame(
                FrameKind::Cancel,
                self.id,
                Bytes::new(),
                Bytes::new(),
            ));
        }
    }
}

async fn read_loop(
    session: std::sync::Weak<Session>,
    mut reader: FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    mut writer: tokio::task::JoinHandle<WriterEnd>,
    settings: Settings,
    ctrl: mpsc::UnboundedSender<Out>,
) {
    let mut tick = tokio::time::interval(Quiet::tick(
        settings.keepalive_interval,
        settings.idle_timeout,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = Quiet::new();
    let mut writer_done = false;
    let mut write_failure: Option<String> = None;
    let reason = loop {
        tokio::select! {
            biased;
            end = &mut writer, if !writer_done => {
                writer_done = true;
                let why = match end {
                    Ok(WriterEnd::TimedOut) => {
                        break format!("writing stalled for {:?}", settings.write_timeout)
                    }
                    Ok(WriterEnd::Failed(e)) => format!("write failed: {e}"),
                    _ => break "closed".to_string(),
                };
                // Nothing more can be sent, but answers may still be on their
                // way (a server draining after GOAWAY closes its read side
                // first): refuse new calls and keep reading until the calls
                // in flight are answered, the server closes, or it goes quiet.
                let Some(s) = session.upgrade() else { break why };
                if !s.stop_new_calls(&why) {
                    break why;
                }
                write_failure = Some(why);
            }
            frame = reader.next() => {
                let frame = match frame {
                    Ok(Received::Frame(f)) => f,
                    Ok(Received::TooLarge(h, status)) => {
                        quiet.frame();
                        let Some(s) = session.upgrade() else { break "client dropped".to_string() };
                        let id = h.stream_id.0;
                        let mut p = s.pending.lock();
                        if h.kind == FrameKind::Response && let Some(w) = p.calls.remove(&id) {
                            let _ = w.send(Err(status));
                        } else if matches!(h.kind, FrameKind::Response | FrameKind::Publish)
                            && let Some(stream) = p.streams.remove(&id)
                        {
                            let _ = stream.try_send(Err(status));
                            let _ = ctrl.send(Out::frame(FrameKind::Cancel, id, Bytes::new(), Bytes::new()));
                        }
                        continue;
                    }
                    Err(ReadError::Eof) => break write_failure.unwrap_or_else(|| "the server closed the connection".to_string()),
                    Err(ReadError::Violation(e)) => {
                        let _ = ctrl.send(Out::error(0, &Status::invalid_argument(format!("protocol violation: {e}"))));
                        let _ = ctrl.send(Out::Close);
                        break format!("bad frame from the server: {e}");
                    }
                    Err(e) => break e.to_string(),
                };
                quiet.frame();
                let Some(s) = session.upgrade() else { break "client dropped".to_string() };
                let (h, metadata, payload) = frame.into_parts();
                let id = h.stream_id.0;
                match h.kind {
                    FrameKind::Response | FrameKind::Error | FrameKind::Publish if id != 0 => {
                        let result = if h.kind == FrameKind::Error {
                            Err(Status::decode(&payload).unwrap_or_else(|e| {
                                Status::internal(format!("undecodable error status from the server: {e}"))
                            }))
                        } else {
                            Ok(Reply::with_metadata(metadata, payload))
                        };
                        let mut p = s.pending.lock();
                        if h.kind != FrameKind::Publish && let Some(w) = p.calls.remove(&id) {
                            drop(p);
                            let _ = w.send(result);
                        } else if let Some(stream) = p.streams.get(&id) {
                            // A Publish with END_STREAM ends the stream and
                            // carries no message.
                            let end = h.kind == FrameKind::Error
                                || (h.kind == FrameKind::Publish && h.flags.contains(FrameFlags::END_STREAM));
                            let delivered = (end && h.kind == FrameKind::Publish) || stream.try_send(result).is_ok();
                            if end || !delivered {
                                p.streams.remove(&id);
                            }
                            if !delivered {
                                drop(p);
                                tracing::warn!("{} pushed more than its credit on stream {id}: cancelling it", s.target);
                                let _ = ctrl.send(Out::frame(FrameKind::Cancel, id, Bytes::new(), Bytes::new()));
                            }
                        }
                    }
                    FrameKind::Credit => {
                        let n = payload.first_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b)) as usize;
                        let room = Semaphore::MAX_PERMITS.saturating_sub(s.credit.available_permits());
                        s.credit.add_permits(n.min(room));
                    }
                    FrameKind::Ping => {
                        let _ = ctrl.send(Out::frame(FrameKind::Pong, id, Bytes::new(), payload));
                    }
                    FrameKind::Pong => {}
                    FrameKind::GoAway => {
                        tracing::debug!("{} is going away (last stream {id})", s.target);
                        s.going_away.store(true, Ordering::Release);
                        // Streams the server will not handle fail now; the
                        // rest finish here.
                        let refused = || Status::unavailable("the server is shutting down and did not take the call");
                        let (calls, streams): (Vec<_>, Vec<_>) = {
                            let mut p = s.pending.lock();
                            let ids: Vec<u64> = p.calls.keys().copied().filter(|k| *k > id).collect();
                            p.refused.extend(ids.iter().copied());
                            let calls = ids.into_iter().filter_map(|k| p.calls.remove(&k)).collect();
                            let ids: Vec<u64> = p.streams.keys().copied().filter(|k| *k > id).collect();
                            (calls, ids.into_iter().filter_map(|k| p.streams.remove(&k)).collect())
                        };
                        for w in calls {
                            let _ = w.send(Err(refused()));
                        }
                        for stream in streams {
                            let _ = stream.try_send(Err(refused()));
                        }
                        if s.pending.lock().idle() {
                            let _ = ctrl.send(Out::Close);
                            break "the server went away (GOAWAY)".to_string();
                        }
                    }
                    FrameKind::Error => {
                        let status = Status::decode(&payload).map_or_else(|e| e.to_string(), |s| s.to_string());
                        break format!("the server closed the connection: {status}");
                    }
                    other => tracing::debug!("{}: ignoring an unexpected {other} frame", s.target),
                }
                if let Some(why) = &write_failure
                    && s.pending.lock().idle()
                {
                    break why.clone();
                }
                if s.going_away.load(Ordering::Acquire) && s.pending.lock().idle() {
                    let _ = ctrl.send(Out::Close);
                    break "the server went away (GOAWAY)".to_string();
                }
            }
            _ = tick.tick() => {
                if let Some(why) = &write_failure
                    && session.upgrade().is_none_or(|s| s.pending.lock().idle())
                {
                    break why.clone();
                }
                let quiet = quiet.at_tick();
                if quiet >= settings.idle_timeout {
                    let _ = ctrl.send(Out::Close);
                    break match write_failure {
                        Some(why) => format!("{why}; then nothing received for {quiet:?}"),
                        None => format!("nothing received for {quiet:?}"),
                    };
                }
                if quiet >= settings.keepalive_interval && write_failure.is_none() {
                    let _ = ctrl.send(Out::frame(FrameKind::Ping, 0, Bytes::new(), Bytes::new()));
                }
            }
        }
    };
    if let Some(s) = session.upgrade() {
        tracing::debug!("connection to {} ended: {reason}", s.target);
        s.fail_all(reason);
    }
    let _ = ctrl.send(Out::Close);
    if !writer_done {
        // A finished JoinHandle must not be polled again.
        let _ = tokio::time::timeout(settings.write_timeout, &mut writer).await;
    }
    writer.abort();
}
