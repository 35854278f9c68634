//! The serving side: a TLS listener whose connections carry many streams,
//! each handed to a [`Handler`].
//!
//! Every connection gets a stream credit ([`Settings::stream_credit`]) when
//! it starts; a handler that answers without waiting is answered from the
//! connection's reader, one that waits continues as a task. Bad peers are
//! refused or closed with a log line and a counter ([`ServerStats`]), and
//! never hold up other connections.
//!
//! ```
//! use std::sync::Arc;
//! use commy_net::{Client, Credentials, DevCa, Handler, Identity, LeafSpec, Reply, Server, Settings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("commy-net-server-doc-{}", std::process::id()));
//! let ca = DevCa::load_or_create(&dir)?;
//! let creds = ca.credentials(&LeafSpec::for_this_host(Identity::new("default", "echo")?, &[]))?;
//! let echo: Handler = Arc::new(|req: commy_net::Inbound| {
//!     Box::pin(async move { Ok(Reply::new(req.payload)) })
//! });
//! let server = Server::bind("127.0.0.1:0".parse()?, creds.server_config(false)?, Settings::default(), echo).await?;
//! let client = Client::new("127.0.0.1", server.local_addr().port(), creds.client_config()?, Settings::default())?;
//! let reply = client.call(bytes::Bytes::new(), bytes::Bytes::from_static(b"hi"), None).await?;
//! assert_eq!(&reply.payload[..], b"hi");
//! server.shutdown().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use commy_core::backoff::AcceptBackoff;
use commy_core::log_limit::{LogLimit, left_out};
use commy_core::{Deadline, FrameFlags, FrameHeader, FrameKind, Limits, Status, StreamId};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

use crate::link::{
    FrameReader, Out, PUSH_CREDIT, Quiet, ReadError, Received, Settings, WriterEnd, write_frames,
};
use crate::mux::CreditWindow;
use crate::stats::{Reason, ServerStats};
use crate::tls::Identity;

/// A handler's answer: response metadata (encoded, usually empty) and payload.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Encoded metadata section (see `docs/PROTOCOL.md`).
    pub metadata: Bytes,
    /// The payload.
    pub payload: Bytes,
    /// Set by [`Reply::streaming`]: messages to push on the stream.
    pushed: Option<PushedRx>,
}

impl Reply {
    /// A reply with `payload` and no metadata.
    pub fn new(payload: impl Into<Bytes>) -> Reply {
        Reply {
            metadata: Bytes::new(),
            payload: payload.into(),
            pushed: None,
        }
    }

    /// A reply with `metadata` and `payload`.
    pub fn with_metadata(metadata: Bytes, payload: impl Into<Bytes>) -> Reply {
        Reply {
            metadata,
            ..Reply::new(payload)
        }
    }

    /// This reply, sent as a Response that keeps the stream open (no
    /// END_STREAM), and the [`Pusher`] whose messages follow it as Publish
    /// frames on the stream, as far as the client's stream credit allows
    /// ([`PUSH_CREDIT`](crate::PUSH_CREDIT) at first, then what its Credit
    /// frames on the stream grant). The stream ends when the pusher is
    /// dropped (a Publish with END_STREAM), fails ([`Pusher::fail`]),
    /// the client cancels it, the connection closes, or the server drains.
    /// A reply to a one-way message pushes nothing.
    pub fn streaming(self) -> (Reply, Pusher) {
        let (tx, rx) = mpsc::channel(1);
        let reply = Reply {
            pushed: Some(PushedRx(Arc::new(Mutex::new(Some(rx))))),
            ..self
        };
        (reply, Pusher { tx })
    }
}

/// What a [`Pusher`] sends.
enum Pushed {
    Message(Bytes, Bytes),
    Fail(Status),
}

/// The receiving end of a [`Pusher`], inside a [`Reply`] (which stays
/// cheap to clone; the receiver is taken once).
#[derive(Clone)]
struct PushedRx(Arc<Mutex<Option<mpsc::Receiver<Pushed>>>>);

impl std::fmt::Debug for PushedRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushedRx")
    }
}

/// Pushes messages on a stream opened by [`Reply::streaming`].
#[derive(Debug)]
pub struct Pusher {
    tx: mpsc::Sender<Pushed>,
}

impl Pusher {
    /// Sends a message (encoded metadata, payload) as a Publish frame on
    /// the stream. Waits while the client has no credit for it. Fails with
    /// UNAVAILABLE once the stream has ended.
    pub async fn push(&self, metadata: Bytes, payload: Bytes) -> Result<(), Status> {
        self.tx
            .send(Pushed::Message(metadata, payload))
            .await
            .map_err(|_| Status::unavailable("the stream has ended"))
    }

    /// Ends the stream with an Error frame carrying `status`.
    pub async fn fail(self, status: Status) {
        let _ = self.tx.send(Pushed::Fail(status)).await;
    }

    /// Resolves once the stream has ended: the client cancelled it, the
    /// connection closed or the server drains.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote socket address.
    pub addr: SocketAddr,
    /// The identity in the client's certificate, if it presented one.
    pub identity: Option<Identity>,
}

/// A request or one-way message received.
#[derive(Debug)]
pub struct Inbound {
    /// `Request` (answered) or `OneWay` (not).
    pub kind: FrameKind,
    /// The encoded metadata section.
    pub metadata: Bytes,
    /// The payload.
    pub payload: Bytes,
    /// When the caller stops waiting.
    pub deadline: Option<Deadline>,
    /// The connection's peer.
    pub peer: Arc<Peer>,
}

/// What a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, Status>> + Send>>;

/// Handles every stream of a server.
pub type Handler = Arc<dyn Fn(Inbound) -> HandlerFuture + Send + Sync>;

/// Errors from [`Server::bind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The address cannot be listened on.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running server. [`shutdown`](Server::shutdown) drains it gracefully
/// (GOAWAY); dropping it stops accepting and closes connections.
pub struct Server {
    local_addr: SocketAddr,
    stats: Arc<ServerStats>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `addr` and serves every connection with `handler`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        settings: Settings,
        handler: Handler,
    ) -> Result<Server, BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError::Listen { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BindError::Listen { addr, source })?;
        let stats = Arc::new(ServerStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let ctx = Arc::new(ServerCtx {
            tls,
            settings,
            handler,
            stats: stats.clone(),
            refusals: parking_lot::Mutex::new(LogLimit::new(REFUSALS_BURST, REFUSALS_WINDOW)),
        });
        let task = tokio::spawn(accept_loop(listener, ctx, stop_rx));
        Ok(Server {
            local_addr,
            stats,
            stop,
            task: Some(task),
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// Stops accepting, sends GOAWAY on every connection and waits until
    /// their in-flight streams finished (at most the drain timeout).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct ServerCtx {
    tls: Arc<rustls::ServerConfig>,
    settings: Settings,
    handler: Handler,
    stats: Arc<ServerStats>,
    /// Limits the lines refused connections write.
    refusals: parking_lot::Mutex<LogLimit>,
}

/// Refusal lines written per [`REFUSALS_WINDOW`] at most: a flood of bad
/// connections is counted in the stats, and told in a handful of lines.
const REFUSALS_BURST: u32 = 10;
const REFUSALS_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl ServerCtx {
    /// Logs a refused connection (`line`), unless too many were logged
    /// lately; the next line written says how many were left out.
    fn refused(&self, line: impl FnOnce() -> String) {
        if let Some(n) = self.refusals.lock().admit(std::time::Instant::now()) {
            tracing::warn!("{}{}", line(), left_out(n));
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ServerCtx>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    // Out of descriptors, accept fails at once: wait more each time
    // instead of spinning, and log a spell of failures a few times only.
    let mut backoff = AcceptBackoff::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, addr)) => {
                    if let Some(n) = backoff.succeeded() {
                        tracing::info!("accepting again after {n} failed accepts");
                    }
                    if conns.len() >= ctx.settings.max_connections {
                        ctx.stats.record(Reason::TooManyConnections);
                        let open = conns.len();
                        ctx.refused(|| format!("refused a connection from {addr}: {open} connections open already"));
                        continue;
                    }
                    conns.spawn(serve_conn(sock, addr, ctx.clone(), stop.clone()));
                }
                Err(e) => {
                    ctx.stats.record(Reason::AcceptFailed);
                    let after = backoff.failed(std::time::Instant::now());
                    if let Some(n) = after.report {
                        tracing::warn!(
                            "accept failed: {e} ({n} failed accepts since the last report; \
                             retrying every {:?} at most)",
                            AcceptBackoff::MAX
                        );
                    }
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(after.wait) => {}
                    }
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drain = ctx.settings.drain_timeout + ctx.settings.write_timeout;
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "{} connections still busy after the drain timeout: closing them",
            conns.len()
        );
        conns.abort_all();
    }
}

/// Maps a handshake failure to its reason.
fn classify(e: &std::io::Error) -> Reason {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Reason::Handshake;
    };
    match tls {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Reason::NotTls
        }
        rustls::Error::NoApplicationProtocol => Reason::Alpn,
        rustls::Error::NoCertificatesPresented => Reason::NoClientCert,
        rustls::Error::InvalidCertificate(_) => Reason::BadClientCert,
        _ => Reason::Handshake,
    }
}

/// A connection refused during the handshake: why, in a word and in words.
struct Refused(Reason, String);

/// The TLS handshake of an accepted connection. The client's hello is read
/// first: one that does not offer ALPN `commy/1` (offering none at all
/// included, which TLS itself would let through) is refused with the
/// `no_application_protocol` alert, as docs/PROTOCOL.md says, before any
/// key exchange. A hello that is not TLS, or is malformed or oversized,
/// gets the alert rustls picks for it.
async fn handshake(
    sock: TcpStream,
    config: &Arc<rustls::ServerConfig>,
) -> Result<TlsStream<TcpStream>, Refused> {
    let failed = |e: std::io::Error| {
        let reason = classify(&e);
        let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the connection closed before a TLS hello".to_string()
        } else {
            format!("TLS handshake failed: {e}")
        };
        Refused(reason, why)
    };
    let start = match read_hello(sock).await {
        Ok(start) => start,
        Err(e) => return Err(failed(e)),
    };
    let offered = start
        .client_hello()
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == commy_core::ALPN));
    if !offered {
        let mut sock = start.io;
        let alert = alert_record(rustls::AlertDescription::NoApplicationProtocol);
        let _ = sock.write_all(&alert).await;
        linger(sock).await;
        return Err(Refused(
            Reason::Alpn,
            format!(
                "the client did not offer ALPN {:?}",
                String::from_utf8_lossy(commy_core::ALPN)
            ),
        ));
    }
    start.into_stream(config.clone()).await.map_err(failed)
}

/// Reads the client's hello. A connection that closes first, or whose
/// hello is not TLS, malformed or oversized, is refused with the fitting
/// alert (rustls's, or `decode_error` where rustls has none, as for a
/// hello over 64 KiB) and closed.
async fn read_hello(mut sock: TcpStream) -> std::io::Result<StartHandshake<TcpStream>> {
    use tokio::io::AsyncReadExt;
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (error, mut alert) = match acceptor.read_tls(&mut rest) {
                // More than rustls buffers before the hello is whole.
                Err(_) => (
                    rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge),
                    Vec::new(),
                ),
                Ok(_) => match acceptor.accept() {
                    Ok(Some(accepted)) => {
                        return Ok(StartHandshake::from_parts(accepted, sock));
                    }
                    Ok(None) => continue,
                    Err((error, mut alert)) => {
                        let mut out = Vec::new();
                        let _ = alert.write(&mut out);
                        (error, out)
                    }
                },
            };
            if alert.is_empty() {
                alert = alert_record(rustls::AlertDescription::DecodeError).to_vec();
            }
            let _ = sock.write_all(&alert).await;
            linger(sock).await;
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, error));
        }
    }
}

/// Closes a refused connection so that the client reads what it was sent
/// (an alert): shuts the sending side down, then reads and drops what the
/// client still sends, for a while. Closing a socket with unread bytes
/// makes the kernel reset the connection, and the client's kernel then
/// drops the alert unread.
async fn linger(mut sock: TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = sock.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// How long, and for how many bytes, [`linger`] reads.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// The TLS record of a fatal alert sent before the handshake (no keys
/// exist yet, so in plaintext): content type alert (21), version 3.3,
/// length 2, level fatal (2), the description.
fn alert_record(description: rustls::AlertDescription) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(description)]
}

async fn serve_conn(
    sock: TcpStream,
    addr: SocketAddr,
    ctx: Arc<ServerCtx>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = sock.set_nodelay(true);
    let s = &ctx.settings;
    let tls = match tokio::time::timeout(s.handshake_timeout, handshake(sock, &ctx.tls)).await {
        Err(_) => {
            ctx.stats.record(Reason::HandshakeTimeout);
            ctx.refused(|| {
                format!(
                    "refused {addr}: no TLS handshake within {:?}",
                    s.handshake_timeout
                )
            });
            return;
        }
        Ok(Err(Refused(reason, why))) => {
            ctx.stats.record(reason);
            ctx.refused(|| format!("refused {addr}: {why} ({})", reason.as_str()));
            return;
        }
        Ok(Ok(tls)) => tls,
    };
    let (_, session) = tls.get_ref();
    let identity = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(Identity::of_certificate);
    ctx.stats.accept();
    tracing::debug!(
        "accepted {addr} ({})",
        identity
            .as_ref()
            .map_or("no client certificate".to_string(), |i| i.to_string())
    );
    let (r, w) = tokio::io::split(tls);
    let (tx, rx) = mpsc::channel(s.writer_queue);
    let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_frames(
        w,
        rx,
        ctrl_rx,
        s.write_timeout,
        s.limits.max_frame,
    ));
    let window = CreditWindow::new(s.stream_credit, (s.stream_credit / 4).max(1));
    let _ = ctrl.send(Out::credit(window.initial_grant()));
    let conn = Arc::new(Conn {
        out: tx,
        ctrl,
        state: Mutex::new(ConnState {
            window,
            running: FxHashMap::default(),
            push_credit: FxHashMap::default(),
            last_stream: 0,
        }),
        drained: Notify::new(),
        draining: watch::channel(false).0,
        handler: ctx.handler.clone(),
        peer: Arc::new(Peer { addr, identity }),
        limits: s.limits,
    });
    let mut reader = FrameReader::new(r, s.limits);
    let mut tick = tokio::time::interval(Quiet::tick(s.keepalive_interval, s.idle_timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = Quiet::new();
    let mut draining = false;
    let mut writer_end = None;
    loop {
        tokio::select! {
            biased;
            end = &mut writer => {
                writer_end = Some(end.unwrap_or(WriterEnd::Closed));
                break;
            }
            frame = reader.next() => match frame {
                Ok(frame) => {
                    quiet.frame();
                    if let Err(reason) = conn.on_frame(frame, &ctx).await {
                        ctx.stats.record(reason);
                        break;
                    }
                }
                Err(ReadError::Eof) => break,
                Err(ReadError::Violation(e)) => {
                    ctx.stats.record(Reason::BadFrame);
                    tracing::warn!("closing {addr}: {e}");
                    let _ = conn.ctrl.send(Out::error(0, &Status::invalid_argument(format!("protocol violation: {e}"))));
                    break;
                }
                Err(e) => {
                    tracing::debug!("connection from {addr} ended: {e}");
                    break;
                }
            },
            _ = tick.tick() => {
                let quiet = quiet.at_tick();
                if quiet >= s.idle_timeout {
                    ctx.stats.record(Reason::Idle);
                    tracing::warn!("closing {addr}: nothing received for {quiet:?} (idle timeout)");
                    break;
                }
                if quiet >= s.keepalive_interval {
                    let _ = conn.ctrl.send(Out::frame(FrameKind::Ping, 0, Bytes::new(), Bytes::new()));
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.draining.send_replace(true);
                let last = conn.state.lock().last_stream;
                let _ = conn.ctrl.send(Out::frame(FrameKind::GoAway, last, Bytes::new(), Bytes::new()));
                if conn.state.lock().window.in_flight() == 0 {
                    break;
                }
            }
            _ = conn.drained.notified(), if draining => {
                if conn.state.lock().window.in_flight() == 0 {
                    break;
                }
            }
        }
    }
    // Work nobody waits for any more is stopped (after a drain there is none).
    let running: Vec<_> = conn.state.lock().running.drain().collect();
    for (_, task) in running {
        if let Some(task) = task {
            task.abort();
        }
    }
    let _ = conn.ctrl.send(Out::Close);
    let end = match writer_end {
        Some(end) => end,
        None => tokio::time::timeout(s.write_timeout, &mut writer)
            .await
            .map(|r| r.unwrap_or(WriterEnd::Closed))
            .unwrap_or(WriterEnd::TimedOut),
    };
    writer.abort();
    match end {
        WriterEnd::TimedOut => {
            ctx.stats.record(Reason::WriteTimeout);
            tracing::warn!(
                "closing {addr}: writing stalled for {:?} (the peer stopped reading)",
                s.write_timeout
            );
        }
        WriterEnd::Failed(e) => tracing::debug!("connection from {addr}: write failed: {e}"),
        WriterEnd::Closed => {}
    }
}

struct ConnState {
    window: CreditWindow,
    /// Streams handled by tasks: `None` until the abort handle is stored.
    running: FxHashMap<u64, Option<tokio::task::AbortHandle>>,
    /// The client's credit for each push stream.
    push_credit: FxHashMap<u64, Arc<Semaphore>>,
    last_stream: u64,
}

struct Conn {
    out: mpsc::Sender<Out>,
    /// Control frames (credit, pong, GOAWAY, errors): never wait for room.
    ctrl: mpsc::UnboundedSender<Out>,
    state: Mutex<ConnState>,
    drained: Notify,
    /// Set when the server drains: push streams end.
    draining: watch::Sender<bool>,
    handler: Handler,
    peer: Arc<Peer>,
    limits: Limits,
}

impl Conn {
    async fn on_frame(self: &Arc<Conn>, received: Received, ctx: &ServerCtx) -> Result<(), Reason> {
        let frame = match received {
            Received::Frame(frame) => frame,
            Received::TooLarge(h, status) => {
                if matches!(h.kind, FrameKind::Request | FrameKind::OneWay) {
                    let stream = self.open(&h, ctx)?;
                    if h.kind == FrameKind::Request {
                        self.reply(stream.id, Err(status)).await;
                    }
                }
                return Ok(());
            }
        };
        let (h, metadata, payload) = frame.into_parts();
        let id = h.stream_id.0;
        match h.kind {
            FrameKind::Request | FrameKind::OneWay => {
                let stream = self.open(&h, ctx)?;
                let deadline = Deadline::from_wire(h.deadline_us);
                if deadline.is_some_and(|d| d.is_expired()) {
                    // The caller has given up already: the handler is not
                    // run, and a call ends as docs/PROTOCOL.md says.
                    if h.kind == FrameKind::Request {
                        let status = Status::deadline_exceeded(
                            "the deadline passed before the request arrived",
                        );
                        self.reply(stream.id, Err(status)).await;
                    }
                    return Ok(());
                }
                let inbound = Inbound {
                    kind: h.kind,
                    metadata,
                    payload,
                    deadline,
                    peer: self.peer.clone(),
                };
                self.dispatch(stream, h.kind == FrameKind::OneWay, inbound)
                    .await;
            }
            FrameKind::Cancel => {
                let mut st = self.state.lock();
                st.push_credit.remove(&id);
                let task = st.running.remove(&id);
                drop(st);
                if let Some(Some(task)) = task {
                    task.abort();
                }
            }
            FrameKind::Ping => {
                let _ = self
                    .ctrl
                    .send(Out::frame(FrameKind::Pong, id, Bytes::new(), payload));
            }
            FrameKind::Credit if id != 0 => {
                let credit = self.state.lock().push_credit.get(&id).cloned();
                if let Some(credit) = credit {
                    let n = payload
                        .first_chunk::<4>()
                        .map_or(0, |b| u32::from_le_bytes(*b)) as usize;
                    let room = Semaphore::MAX_PERMITS.saturating_sub(credit.available_permits());
                    credit.add_permits(n.min(room));
                }
            }
            FrameKind::Pong | FrameKind::Credit | FrameKind::GoAway => {}
            FrameKind::Error if id == 0 => {
                let status =
                    Status::decode(&payload).map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::warn!("{} reported a connection error: {status}", self.peer.addr);
                return Err(Reason::BadFrame);
            }
            other => {
                tracing::debug!("{}: ignoring an unexpected {other} frame", self.peer.addr);
            }
        }
        Ok(())
    }

    /// Opens the stream of a Request or OneWay, after the receiver rules of
    /// docs/PROTOCOL.md: an odd id (the client's) within the client's
    /// credit (the reader checked that ids increase). A broken rule fails
    /// the connection (an Error on stream 0, then the close).
    fn open(self: &Arc<Conn>, h: &FrameHeader, ctx: &ServerCtx) -> Result<Stream, Reason> {
        let id = h.stream_id.0;
        let violation = |e: String, reason: Reason, status: fn(String) -> Status| {
            tracing::warn!("closing {}: {e}", self.peer.addr);
            let _ = self.ctrl.send(Out::error(0, &status(e)));
            Err(reason)
        };
        if id.is_multiple_of(2) {
            // Stream 0 is the connection's; even ids are the server's to
            // open.
            return violation(
                format!(
                    "protocol violation: a {} on stream {id}; a client opens odd stream ids",
                    h.kind
                ),
                Reason::BadFrame,
                Status::invalid_argument,
            );
        }
        ctx.stats.request();
        let mut st = self.state.lock();
        if let Err(e) = st.window.open() {
            drop(st);
            return violation(
                e.to_string(),
                Reason::CreditExceeded,
                Status::resource_exhausted,
            );
        }
        st.last_stream = st.last_stream.max(id);
        Ok(Stream {
            conn: self.clone(),
            id,
        })
    }

    async fn dispatch(self: &Arc<Conn>, stream: Stream, oneway: bool, inbound: Inbound) {
        let deadline = inbound.deadline;
        let handler = &self.handler;
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(inbound))) {
            Ok(f) => f,
            Err(_) => {
                if !oneway {
                    self.reply(stream.id, Err(panicked())).await;
                }
                return;
            }
        };
        let mut fut = CatchPanic(fut);
        let polled = {
            let mut cx = Context::from_waker(Waker::noop());
            Pin::new(&mut fut).poll(&mut cx)
        };
        if let Poll::Ready(result) = polled {
            if !oneway {
                self.answer(stream, result).await;
            }
            return;
        }
        let id = stream.id;
        if !oneway {
            self.state.lock().running.insert(id, None);
        }
        let conn = self.clone();
        let task = tokio::spawn(async move {
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d.instant().into(), fut)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(
                            "the handler ran past the deadline",
                        ))
                    }),
                None => fut.await,
            };
            if !oneway && conn.state.lock().running.remove(&id).is_some() {
                conn.answer(stream, result).await;
            }
        });
        if !oneway && let Some(slot) = self.state.lock().running.get_mut(&id) {
            *slot = Some(task.abort_handle());
        }
    }

    /// Answers the request of `stream`: with a Response or an Error, or
    /// with a Response that keeps the stream open and the messages the
    /// handler pushes on it ([`Reply::streaming`]).
    async fn answer(self: &Arc<Conn>, stream: Stream, result: Result<Reply, Status>) {
        let pushed = match &result {
            Ok(r) => r.pushed.as_ref().and_then(|p| p.0.lock().take()),
            Err(_) => None,
        };
        let Some(rx) = pushed else {
            self.reply(stream.id, result).await;
            return;
        };
        let Ok(r) = result else { return };
        if let Err(status) = self.limits.check_message(r.metadata.len(), r.payload.len()) {
            self.reply(stream.id, Err(status)).await;
            return;
        }
        let id = stream.id;
        let header = FrameHeader::new(FrameKind::Response, StreamId(id));
        if self
            .out
            .send(Out::Keep(header, r.metadata, r.payload))
            .await
            .is_err()
        {
            return;
        }
        let credit = Arc::new(Semaphore::new(PUSH_CREDIT as usize));
        let mut st = self.state.lock();
        st.push_credit.insert(id, credit.clone());
        st.running.insert(id, None);
        drop(st);
        let task = tokio::spawn(push_stream(
            self.clone(),
            stream,
            rx,
            credit,
            self.draining.subscribe(),
        ));
        if let Some(slot) = self.state.lock().running.get_mut(&id) {
            *slot = Some(task.abort_handle());
        }
    }

    async fn reply(&self, id: u64, result: Result<Reply, Status>) {
        let out = match result {
            Ok(r) => match self.limits.check_message(r.metadata.len(), r.payload.len()) {
                Ok(()) => Out::frame(FrameKind::Response, id, r.metadata, r.payload),
                Err(status) => Out::error(id, &status),
            },
            Err(status) => {
                let status = if status.code() == commy_core::Code::Ok {
                    Status::internal("handler returned an error with code OK")
                } else {
                    status
                };
                Out::error(id, &status)
            }
        };
        let _ = self.out.send(out).await;
    }
}

/// Sends what a handler pushes on `stream`, one Publish frame per message
/// and per credit the client granted, until the pusher is dropped (a
/// Publish with END_STREAM), fails (an Error), or the server drains (a
/// Publish with END_STREAM). A Cancel aborts it.
async fn push_stream(
    conn: Arc<Conn>,
    stream: Stream,
    mut rx: mpsc::Receiver<Pushed>,
    credit: Arc<Semaphore>,
    mut draining: watch::Receiver<bool>,
) {
    let id = stream.id;
    let last = loop {
        // Credit first: without it nothing is taken from the handler,
        // whose pushes then wait.
        tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => break None,
            permit = credit.acquire() => match permit {
                Ok(p) => p.forget(),
                Err(_) => break None,
            },
        }
        let item = tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => break None,
            item = rx.recv() => item,
        };
        match item {
            Some(Pushed::Message(md, payload)) => {
                let frame = Out::frame(FrameKind::Publish, id, md, payload);
                if conn.out.send(frame).await.is_err() {
                    break None;
                }
            }
            Some(Pushed::Fail(status)) => break Some(Out::error(id, &status)),
            None => break None,
        }
    };
    let last = last.unwrap_or_else(|| {
        let end = FrameHeader {
            flags: FrameFlags::END_STREAM,
            ..FrameHeader::new(FrameKind::Publish, StreamId(id))
        };
        Out::Frame(end, Bytes::new(), Bytes::new())
    });
    let _ = conn.out.send(last).await;
    let mut st = conn.state.lock();
    st.push_credit.remove(&id);
    st.running.remove(&id);
    drop(st);
    drop(stream);
}

/// One open stream: its credit comes back when it is dropped (finished,
/// cancelled or aborted).
struct Stream {
    conn: Arc<Conn>,
    id: u64,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut st = self.conn.state.lock();
        let grant = st.window.complete();
        let idle = st.window.in_flight() == 0;
        drop(st);
        if let Some(n) = grant {
            let _ = self.conn.ctrl.send(Out::credit(n));
        }
        if idle {
            self.conn.drained.notify_one();
        }
        let _ = self.id;
    }
}

struct CatchPanic(crate::server::HandlerFuture);

impl Future for CatchPanic {
    type Output = Result<Reply, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(_) => Poll::Ready(Err(panicked())),
        }
    }
}

fn panicked() -> Status {
    tracing::error!("a handler panicked");
    Status::internal("the service's handler panicked")
}
