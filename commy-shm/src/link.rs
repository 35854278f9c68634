//! The shared-memory link: an ordered, message-framed, bidirectional channel
//! between two processes on one host, with backpressure, orderly close and
//! immediate detection of a dead peer.
//!
//! A server [`ShmListener::bind`]s a Unix socket (in the runtime dir, mode
//! 0700); a client [`ShmLink::connect`]s. The server checks the client's
//! `SO_PEERCRED` against its [`PeerPolicy`], creates one sealed memfd holding
//! two rings (one per direction) and passes it with `SCM_RIGHTS`. The socket
//! then stays open as the liveness channel: when the peer process dies the
//! kernel closes it, the per-process liveness monitor notices at once, and
//! the link reports [`RingError::PeerGone`] after delivering every message
//! the peer committed.
//!
//! Messages up to [`ShmLink::max_record`] bytes travel as one ring record and
//! are received in place (zero-copy). Larger messages, up to
//! [`LinkConfig::max_message`], are split into fragments and reassembled by
//! the receiver into one buffer; anything larger is refused with
//! [`SendError::TooLarge`] before a byte is written.
//!
//! ```
//! use commy_shm::{LinkConfig, ShmLink, ShmListener};
//!
//! let dir = std::env::temp_dir().join(format!("commy-link-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let listener = ShmListener::bind(dir.join("echo.sock"), LinkConfig::default())?;
//! let server = std::thread::spawn(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let mut link = listener.accept()?;
//!     let msg = link.recv()?.to_vec();
//!     link.send(&msg)?;
//!     Ok(())
//! });
//! let mut client = ShmLink::connect(dir.join("echo.sock"), LinkConfig::default())?;
//! client.send(b"ping")?;
//! assert_eq!(&*client.recv()?, b"ping");
//! server.join().unwrap().unwrap();
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::monitor::{self, Watch};
use crate::ring::{self, Consumer, Init, Loan, LocalState, Producer, Received, RingError};
use crate::segment::kind;
use crate::uds::{self, PeerCred, PeerPolicy, UdsListener, UdsStream};
use crate::{Segment, SegmentError, WaitStrategy};

/// Handshake protocol version.
pub const HANDSHAKE_VERSION: u32 = 1;
const HELLO_MAGIC: &[u8; 8] = b"CMYHELO1";
const WELCOME_MAGIC: &[u8; 8] = b"CMYWELC1";
const HELLO_LEN: usize = 32;
const WELCOME_LEN: usize = 40;
const MAX_REJECT_REASON: usize = 512;

/// Record tags used by the link (see the module docs).
const TAG_WHOLE: u8 = 0;
const TAG_FIRST: u8 = 1;
const TAG_MIDDLE: u8 = 2;
const TAG_LAST: u8 = 3;

/// Settings of a link. Both sides send theirs in the handshake; the server
/// decides the ring size, and each side enforces its own `max_message` on
/// what it receives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinkConfig {
    /// Bytes of each of the two rings (a power of two, 64 B to 4 GiB). The
    /// client's value is a request; the server uses it if it is within
    /// `max_ring_capacity`, otherwise its own `ring_capacity`.
    pub ring_capacity: usize,
    /// The largest ring a server will create on a client's request.
    pub max_ring_capacity: usize,
    /// The largest message accepted, fragmented or not. The default holds
    /// a frame with the largest message and metadata of
    /// [`Limits::DEFAULT`](commy_core::Limits::DEFAULT).
    pub max_message: usize,
    /// How to wait for data or space.
    pub wait: WaitStrategy,
    /// Which peers a server admits (the client checks the server the same way).
    pub peer_policy: PeerPolicy,
    /// How long each side waits for the other's handshake message.
    pub handshake_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            ring_capacity: 1 << 20,
            max_ring_capacity: 64 << 20,
            max_message: commy_core::Limits::DEFAULT.largest_message_frame() as usize,
            wait: WaitStrategy::default(),
            peer_policy: PeerPolicy::default(),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl LinkConfig {
    /// Sets [`ring_capacity`](LinkConfig::ring_capacity).
    pub fn ring_capacity(mut self, bytes: usize) -> Self {
        self.ring_capacity = bytes;
        self
    }

    /// Sets [`max_message`](LinkConfig::max_message).
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Sets [`wait`](LinkConfig::wait).
    pub fn wait(mut self, strategy: WaitStrategy) -> Self {
        self.wait = strategy;
        self
    }

    /// Sets [`peer_policy`](LinkConfig::peer_policy).
    pub fn peer_policy(mut self, policy: PeerPolicy) -> Self {
        self.peer_policy = policy;
        self
    }
}

/// Errors of the handshake, on either side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Receiving the peer's handshake message failed (timeout, EOF, ...).
    #[error("receiving the handshake: {0}")]
    Recv(#[from] uds::RecvError),
    /// Sending our handshake message failed.
    #[error("sending the handshake: {0}")]
    Send(#[from] uds::SendError),
    /// The peer is not speaking Commy's handshake.
    #[error(
        "not a Commy handshake: expected {expected} bytes starting with {magic:?}, got {len} bytes"
    )]
    NotCommy {
        /// Expected magic.
        magic: &'static str,
        /// Expected length.
        expected: usize,
        /// Received length.
        len: usize,
    },
    /// The peer speaks another handshake version.
    #[error("handshake version {theirs} not supported (this build speaks {HANDSHAKE_VERSION})")]
    Version {
        /// The peer's version.
        theirs: u32,
    },
    /// A field of the peer's message is out of range.
    #[error("invalid handshake field {field} = {value}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The server sent no memory segment, or one that does not match.
    #[error("the server's segment does not match its handshake: {0}")]
    SegmentMismatch(&'static str),
    /// The server refused us.
    #[error("the server refused the link: {reason}")]
    Refused {
        /// The reason it gave.
        reason: String,
    },
    /// The server is not a process our policy admits.
    #[error(transparent)]
    PeerRejected(#[from] uds::PeerRejected),
    /// Reading the peer's credentials failed.
    #[error("reading the peer's credentials: {0}")]
    PeerCred(std::io::Error),
}

/// Errors from [`ShmListener::bind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The configuration is unusable.
    #[error("invalid link configuration: {0}")]
    Config(#[from] ring::InvalidCapacity),
    /// Binding the socket failed.
    #[error(transparent)]
    Bind(#[from] uds::BindError),
}

/// Errors from [`ShmListener::accept`]. Each concerns one connection only:
/// the listener stays usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// Accepting the connection failed.
    #[error(transparent)]
    Accept(#[from] uds::AcceptError),
    /// The peer's credentials do not satisfy the policy (it was told so).
    #[error(transparent)]
    PeerRejected(#[from] uds::PeerRejected),
    /// The handshake failed.
    #[error("handshake with a client of {}: {source}", .path.display())]
    Handshake {
        /// The listener's socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// Creating the shared memory failed.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// Watching the connection for peer death failed.
    #[error("watching the link: {0}")]
    Monitor(std::io::Error),
}

/// Errors from [`ShmLink::connect`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The configuration is unusable.
    #[error("invalid link configuration: {0}")]
    Config(#[from] ring::InvalidCapacity),
    /// Connecting the socket failed.
    #[error(transparent)]
    Connect(#[from] uds::ConnectError),
    /// The handshake failed.
    #[error("handshake with {}: {source}", .path.display())]
    Handshake {
        /// The server's socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// The server's shared memory is unusable.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// Watching the connection for peer death failed.
    #[error("watching the link: {0}")]
    Monitor(std::io::Error),
}

/// Errors from sending on a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The message is larger than the link accepts.
    #[error("message of {len} bytes exceeds the link's limit of {max} bytes")]
    TooLarge {
        /// The message length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No ring space became free before the deadline (backpressure).
    #[error("timed out waiting for the receiver to make room")]
    TimedOut,
    /// The link is closed, its peer gone, or its memory corrupt.
    #[error(transparent)]
    Ring(#[from] RingError),
}

impl From<ring::ReserveError> for SendError {
    fn from(e: ring::ReserveError) -> Self {
        match e {
            ring::ReserveError::TooLarge { len, max } => SendError::TooLarge { len, max },
            // `Full` only comes from non-waiting reservations, which the
            // link does not make; report it as backpressure.
            ring::ReserveError::Full { .. } | ring::ReserveError::TimedOut => SendError::TimedOut,
            ring::ReserveError::Ring(e) => SendError::Ring(e),
        }
    }
}

/// Errors from receiving on a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// Nothing arrived before the deadline.
    #[error("timed out waiting for a message")]
    TimedOut,
    /// The peer announced a message larger than we accept.
    #[error("peer announced a {len}-byte message; this link accepts at most {max}")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// Our limit.
        max: usize,
    },
    /// The peer broke the fragmentation protocol. The link is unusable.
    #[error("protocol violation by the peer: {0}")]
    Protocol(&'static str),
    /// The link is closed, its peer gone, or its memory corrupt.
    #[error(transparent)]
    Ring(#[from] RingError),
}

impl From<ring::RecvError> for RecvError {
    fn from(e: ring::RecvError) -> Self {
        match e {
            ring::RecvError::Ring(e) => RecvError::Ring(e),
            ring::RecvError::TimedOut => RecvError::TimedOut,
        }
    }
}

/// What both halves of a link share: the socket (liveness channel), the
/// memory and the watch.
#[derive(Debug)]
struct Shared {
    _watch: Watch,
    sock: UdsStream,
    peer: PeerCred,
    _seg: Arc<Segment>,
}

/// A listening endpoint for shared-memory links.
#[derive(Debug)]
pub struct ShmListener {
    uds: UdsListener,
    config: LinkConfig,
}

impl ShmListener {
    /// Binds a listener at `path` (replacing a stale socket left by a dead
    /// process; refusing if another process listens there).
    pub fn bind(path: impl AsRef<Path>, config: LinkConfig) -> Result<ShmListener, BindError> {
        ring::validate_capacity(config.ring_capacity)?;
        let uds = UdsListener::bind(path)?;
        Ok(ShmListener { uds, config })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.uds.path()
    }

    /// The listening socket, to poll for incoming connections.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.uds.as_fd()
    }

    /// Accepts one connection and performs the handshake (blocking; the
    /// handshake waits at most `handshake_timeout` for the client). An error
    /// concerns that connection only.
    pub fn accept(&self) -> Result<ShmLink, AcceptError> {
        let (sock, peer) = self.uds.accept()?;
        self.handshake(sock, peer)
    }

    /// Like [`accept`](ShmListener::accept), giving up after `timeout` if no
    /// client connects (`Ok(None)`).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<ShmLink>, AcceptError> {
        match self.uds.accept_timeout(timeout)? {
            Some((sock, peer)) => self.handshake(sock, peer).map(Some),
            None => Ok(None),
        }
    }

    fn handshake(&self, sock: UdsStream, peer: PeerCred) -> Result<ShmLink, AcceptError> {
        server_handshake(sock, peer, &self.config, self.uds.path())
    }
}

/// The server side of the handshake on a connected socket.
fn server_handshake(
    sock: UdsStream,
    peer: PeerCred,
    cfg: &LinkConfig,
    path: &Path,
) -> Result<ShmLink, AcceptError> {
    {
        let hs = |source| AcceptError::Handshake {
            path: path.to_owned(),
            source,
        };
        // Read the hello before answering, even to refuse: closing a socket
        // with unread data would reset it and lose our refusal.
        let mut buf = [0u8; 64];
        let (n, fds) = sock
            .recv_msg(&mut buf, 0, Some(cfg.handshake_timeout))
            .map_err(|e| hs(e.into()))?;
        drop(fds);
        if let Err(rejected) = cfg.peer_policy.check(&peer) {
            let _ = send_refusal(&sock, "peer credentials rejected by the server's policy");
            return Err(rejected.into());
        }
        let hello = match Hello::decode(&buf[..n]) {
            Ok(h) => h,
            Err(e) => {
                let _ = send_refusal(&sock, &e.to_string());
                return Err(hs(e));
            }
        };
        let cap = if hello.ring_capacity != 0
            && ring::validate_capacity(hello.ring_capacity as usize).is_ok()
            && hello.ring_capacity as usize <= cfg.max_ring_capacity
        {
            hello.ring_capacity as usize
        } else {
            cfg.ring_capacity
        };
        let seg = Arc::new(Segment::create_kind(ring::link_data_len(cap), kind::LINK)?);
        let welcome = Welcome {
            ring_capacity: cap as u64,
            max_message: cfg.max_message as u64,
            generation: seg.generation(),
        };
        sock.send_msg(&welcome.encode(), &[seg.as_fd()])
            .map_err(|e| hs(e.into()))?;
        ShmLink::assemble(sock, peer, seg, cap, cfg, Side::Server, hello.max_message)
            .map_err(AcceptError::Monitor)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// One end of a shared-memory link.
#[derive(Debug)]
pub struct ShmLink {
    tx: LinkSender,
    rx: LinkReceiver,
}

/// The sending half of a link (see [`ShmLink::split`]).
#[derive(Debug)]
pub struct LinkSender {
    ring: Producer,
    /// Largest payload sent as one record.
    chunk: usize,
    /// The peer's receive limit.
    peer_max_message: usize,
    shared: Arc<Shared>,
}

/// The receiving half of a link (see [`ShmLink::split`]).
#[derive(Debug)]
pub struct LinkReceiver {
    ring: Consumer,
    max_message: usize,
    partial: Option<Partial>,
    shared: Arc<Shared>,
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    total: usize,
    buf: Vec<u8>,
}

/// A received message: in place in the ring (zero-copy) when it came as one
/// record, or reassembled from fragments.
#[derive(Debug)]
pub enum Message<'a> {
    /// Still in the ring; the space is released when this is dropped.
    InPlace(Received<'a>),
    /// Reassembled from fragments.
    Owned(Vec<u8>),
}

impl std::ops::Deref for Message<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Message::InPlace(r) => r,
            Message::Owned(v) => v,
        }
    }
}

impl Message<'_> {
    /// Consumes the message, handing its ring space back later (see
    /// [`Received::release_later`] and [`LinkReceiver::release`]).
    pub fn release_later(self) {
        if let Message::InPlace(r) = self {
            r.release_later();
        }
    }

    /// Takes the bytes out (copying if in place).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Message::InPlace(r) => r.to_vec(),
            Message::Owned(v) => v,
        }
    }
}

impl ShmLink {
    /// Connects to the listener at `path` and performs the handshake.
    pub fn connect(path: impl AsRef<Path>, config: LinkConfig) -> Result<ShmLink, ConnectError> {
        let path = path.as_ref();
        ring::validate_capacity(config.ring_capacity)?;
        let sock = UdsStream::connect_timeout(path, config.handshake_timeout)?;
        Self::client_handshake(sock, config, path)
    }

    /// Performs the client side of the handshake on an already connected
    /// socket, e.g. one end of [`UdsStream::pair`] inherited from a parent
    /// process. The other end calls [`ShmLink::accept_stream`].
    pub fn connect_stream(sock: UdsStream, config: LinkConfig) -> Result<ShmLink, ConnectError> {
        ring::validate_capacity(config.ring_capacity)?;
        Self::client_handshake(sock, config, Path::new("<socket pair>"))
    }

    /// Performs the server side of the handshake on an already connected
    /// socket (see [`connect_stream`](ShmLink::connect_stream)), checking the
    /// peer against `config.peer_policy`.
    pub fn accept_stream(sock: UdsStream, config: &LinkConfig) -> Result<ShmLink, AcceptError> {
        ring::validate_capacity(config.ring_capacity).map_err(|e| AcceptError::Handshake {
            path: PathBuf::from("<socket pair>"),
            source: HandshakeError::Invalid {
                field: "ring_capacity",
                value: e.capacity as u64,
            },
        })?;
        let peer = sock.peer_cred().map_err(|e| AcceptError::Handshake {
            path: PathBuf::from("<socket pair>"),
            source: HandshakeError::PeerCred(e),
        })?;
        server_handshake(sock, peer, config, Path::new("<socket pair>"))
    }

    fn client_handshake(
        sock: UdsStream,
        config: LinkConfig,
        path: &Path,
    ) -> Result<ShmLink, ConnectError> {
        let hs = |source| ConnectError::Handshake {
            path: path.to_owned(),
            source,
        };
        let peer = sock
            .peer_cred()
            .map_err(|e| hs(HandshakeError::PeerCred(e)))?;
        config.peer_policy.check(&peer).map_err(|e| hs(e.into()))?;
        let hello = Hello {
            ring_capacity: config.ring_capacity as u64,
            max_message: config.max_message as u64,
        };
        sock.send_msg(&hello.encode(), &[])
            .map_err(|e| hs(e.into()))?;
        let mut buf = [0u8; WELCOME_LEN + MAX_REJECT_REASON];
        let (n, mut fds) = sock
            .recv_msg(&mut buf, 1, Some(config.handshake_timeout))
            .map_err(|e| hs(e.into()))?;
        let welcome = Welcome::decode(&buf[..n]).map_err(hs)?;
        let cap = welcome.ring_capacity as usize;
        let Some(fd) = fds.pop() else {
            return Err(hs(HandshakeError::SegmentMismatch("no segment descriptor")));
        };
        let seg = Arc::new(Segment::attach_kind(fd, kind::LINK)?);
        if seg.generation() != welcome.generation {
            return Err(hs(HandshakeError::SegmentMismatch("generation differs")));
        }
        if peer.pid != 0 && seg.creator_pid() != peer.pid {
            return Err(hs(HandshakeError::SegmentMismatch(
                "segment was not created by the server process",
            )));
        }
        if seg.data_len() < ring::link_data_len(cap) {
            return Err(hs(HandshakeError::SegmentMismatch(
                "segment too small for the announced rings",
            )));
        }
        ShmLink::assemble(
            sock,
            peer,
            seg,
            cap,
            &config,
            Side::Client,
            welcome.max_message,
        )
        .map_err(ConnectError::Monitor)
    }

    fn assemble(
        sock: UdsStream,
        peer: PeerCred,
        seg: Arc<Segment>,
        cap: usize,
        config: &LinkConfig,
        side: Side,
        peer_max_message: u64,
    ) -> Result<ShmLink, std::io::Error> {
        let local = Arc::new(LocalState::default());
        let [c2s, s2c] = ring::link_rings(&seg, cap, &local)
            .ok_or_else(|| std::io::Error::other("link segment too small"))?;
        let (tx, rx) = match side {
            Side::Client => (c2s, s2c),
            Side::Server => (s2c, c2s),
        };
        let watch = {
            let seg = seg.clone();
            let local = local.clone();
            monitor::watch(sock.as_fd(), move || {
                local
                    .peer_gone
                    .store(true, std::sync::atomic::Ordering::Release);
                ring::wake_link(&seg);
            })?
        };
        let shared = Arc::new(Shared {
            _watch: watch,
            sock,
            peer,
            _seg: seg,
        });
        let chunk = (cap / 4).max(ring::MIN_CAPACITY / 2) - ring::RECORD_HEADER_LEN;
        Ok(ShmLink {
            tx: LinkSender {
                ring: Producer::new(tx, config.wait),
                chunk,
                peer_max_message: usize::try_from(peer_max_message).unwrap_or(usize::MAX),
                shared: shared.clone(),
            },
            rx: LinkReceiver {
                ring: Consumer::new(rx, config.wait),
                max_message: config.max_message,
                partial: None,
                shared,
            },
        })
    }

    /// Sends a message, waiting for ring space as long as it takes.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        self.tx.send(msg)
    }

    /// Sends a message, waiting for ring space until `deadline`.
    pub fn send_deadline(&mut self, msg: &[u8], deadline: Instant) -> Result<(), SendError> {
        self.tx.send_deadline(msg, Some(deadline))
    }

    /// Receives the next message, waiting as long as it takes.
    pub fn recv(&mut self) -> Result<Message<'_>, RecvError> {
        self.rx.recv(None)
    }

    /// Receives the next message, waiting until `deadline`.
    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Message<'_>, RecvError> {
        self.rx.recv(Some(deadline))
    }

    /// The sending half.
    pub fn sender(&mut self) -> &mut LinkSender {
        &mut self.tx
    }

    /// The receiving half.
    pub fn receiver(&mut self) -> &mut LinkReceiver {
        &mut self.rx
    }

    /// Splits the link into halves that can be used from different threads.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.tx, self.rx)
    }

    /// The largest message sent as a single, zero-copy record.
    pub fn max_record(&self) -> usize {
        self.tx.chunk
    }

    /// The peer process's credentials, as the kernel reported them.
    pub fn peer(&self) -> PeerCred {
        self.tx.shared.peer
    }

    /// Whether the peer process is still connected.
    pub fn is_peer_alive(&self) -> bool {
        self.tx.shared.sock.is_peer_alive()
    }
}

impl LinkSender {
    /// Sends a message, waiting for ring space as long as it takes.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        self.send_deadline(msg, None)
    }

    /// Sends a message, waiting for ring space until `deadline` (if any).
    /// Messages larger than [`max_record`](LinkSender::max_record) are
    /// fragmented.
    pub fn send_deadline(
        &mut self,
        msg: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        if msg.len() > self.peer_max_message {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.peer_max_message,
            });
        }
        if msg.len() <= self.chunk {
            self.ring
                .reserve_wait(msg.len(), TAG_WHOLE, deadline)?
                .fill(msg)
                .commit();
            return Ok(());
        }
        // First fragment: total length, then data.
        let first = self.chunk - 8;
        let mut loan = self
            .ring
            .reserve_wait(8 + first, TAG_FIRST, deadline)?
            .zeroed();
        let b = loan.bytes_mut();
        b[..8].copy_from_slice(&(msg.len() as u64).to_le_bytes());
        b[8..].copy_from_slice(&msg[..first]);
        loan.commit();
        let mut rest = &msg[first..];
        while !rest.is_empty() {
            let n = rest.len().min(self.chunk);
            let tag = if n == rest.len() {
                TAG_LAST
            } else {
                TAG_MIDDLE
            };
            self.ring
                .reserve_wait(n, tag, deadline)?
                .fill(&rest[..n])
                .commit();
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Reserves a message of `len` bytes in place (zero-copy): write it, then
    /// [`commit`](Loan::commit) or [`stage`](Loan::stage) it.
    /// `len` must be at most [`max_record`](LinkSender::max_record).
    pub fn loan(
        &mut self,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<Loan<'_, ring::Uninit>, SendError> {
        if len > self.chunk {
            return Err(SendError::TooLarge {
                len,
                max: self.chunk,
            });
        }
        Ok(self.ring.reserve_wait(len, TAG_WHOLE, deadline)?)
    }

    /// Like [`loan`](LinkSender::loan), waiting for ring space at most
    /// `patience` from the moment the ring is found full.
    pub fn loan_for(
        &mut self,
        len: usize,
        patience: Duration,
    ) -> Result<Loan<'_, ring::Uninit>, SendError> {
        if len > self.chunk {
            return Err(SendError::TooLarge {
                len,
                max: self.chunk,
            });
        }
        Ok(self.ring.reserve_wait_for(len, TAG_WHOLE, patience)?)
    }

    /// Sends a message as part of a batch: it becomes visible to the
    /// receiver with the next [`flush`](LinkSender::flush) (or when the ring
    /// fills up). Messages larger than one record are sent at once.
    pub fn send_batched(&mut self, msg: &[u8]) -> Result<(), SendError> {
        if msg.len() > self.chunk {
            return self.send(msg);
        }
        let loan: Loan<'_, Init> = self
            .ring
            .reserve_wait(msg.len(), TAG_WHOLE, None)?
            .fill(msg);
        loan.stage();
        Ok(())
    }

    /// Publishes every batched message.
    pub fn flush(&mut self) {
        self.ring.publish();
    }

    /// The largest message sent as a single, zero-copy record.
    pub fn max_record(&self) -> usize {
        self.chunk
    }

    /// Closes this direction: the receiver gets every message sent so far,
    /// then [`RingError::Closed`].
    pub fn close(&mut self) {
        self.ring.close();
    }

    /// Messages the peer says it received and then discarded unread (a
    /// subscriber's drop-oldest queue, see
    /// [`LinkReceiver::discard_counter`]): a count written by the untrusted
    /// peer.
    pub fn peer_discarded(&self) -> u64 {
        self.ring.peer_discarded()
    }

    /// A handle that ends the whole link from any thread (see
    /// [`LinkAborter`]).
    pub fn aborter(&self) -> LinkAborter {
        LinkAborter {
            shared: self.shared.clone(),
        }
    }

    /// Ends the whole link now, for both sides, whatever the shared memory
    /// says (see [`LinkAborter::abort`]).
    pub fn abort(&self) {
        abort(&self.shared);
    }
}

/// Ends a link for both sides from any thread, for a side that found the
/// link broken (a corrupt ring, a send that can never succeed): it shuts
/// the link's socket down, so both ends' waits end with
/// [`RingError::PeerGone`] at once. Unlike the closed flags in the
/// segment, which the peer can overwrite, the socket is the kernel's.
#[derive(Clone)]
pub struct LinkAborter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LinkAborter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkAborter").finish_non_exhaustive()
    }
}

impl LinkAborter {
    /// Ends the link now: its socket is shut down in both directions.
    pub fn abort(&self) {
        abort(&self.shared);
    }
}

fn abort(shared: &Shared) {
    // It fails only on a socket that is no longer connected: then the
    // link has ended already.
    let _ = shared.sock.shutdown();
}

impl LinkReceiver {
    /// Receives the next message, waiting until `deadline` (forever if `None`).
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<Message<'_>, RecvError> {
        match self.next(Some(deadline))? {
            Some(m) => Ok(m),
            None => Err(RecvError::TimedOut),
        }
    }

    /// Receives the next message if one is complete in the ring, without
    /// waiting (`Ok(None)` otherwise). Fragments already there are taken in
    /// and kept until the rest arrives.
    pub fn try_recv(&mut self) -> Result<Option<Message<'_>>, RecvError> {
        self.next(None)
    }

    /// Waits (per the link's wait strategy) until something arrives, without
    /// taking it: `true` once [`try_recv`](LinkReceiver::try_recv) has a
    /// message, a fragment or an error (a closed link, a dead peer) to hand
    /// out; `false` when `deadline` passes or an
    /// [interrupter](LinkReceiver::interrupter) ends the wait first. For a
    /// thread that only watches the link while another one receives.
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        match self.ring.peek_tag(deadline) {
            Ok(_) => true,
            Err(ring::RecvError::TimedOut) => false,
            Err(ring::RecvError::Ring(_)) => true,
        }
    }

    /// A handle that ends this receiver's waits early from another thread:
    /// a [`recv`](LinkReceiver::recv) then returns [`RecvError::TimedOut`]
    /// unless a message is there.
    pub fn interrupter(&self) -> crate::ring::WaitInterrupter {
        self.ring.interrupter()
    }

    /// A handle that counts messages received here and then discarded
    /// unread, from any thread, for the sender to see
    /// ([`LinkSender::peer_discarded`]).
    pub fn discard_counter(&self) -> crate::ring::DiscardCounter {
        self.ring.discard_counter()
    }

    /// Hands back the ring space of messages consumed with
    /// [`Message::release_later`].
    pub fn release(&mut self) {
        self.ring.release();
    }

    /// Whether something has arrived (one load, for a cheap spin): if so,
    /// [`try_recv`](LinkReceiver::try_recv) has a message or an error.
    /// A closed link or a dead peer shows only in `try_recv`.
    #[inline]
    pub fn has_data(&self) -> bool {
        self.ring.has_record()
    }

    /// `wait`: `Some(deadline)` to wait for a message, `None` to return
    /// `Ok(None)` as soon as the ring is empty.
    fn next(&mut self, wait: Option<Option<Instant>>) -> Result<Option<Message<'_>>, RecvError> {
        loop {
            let tag = match wait {
                Some(deadline) => self.ring.peek_tag(deadline)?,
                None => match self.ring.try_peek_tag()? {
                    Some(tag) => tag,
                    None => return Ok(None),
                },
            };
            if tag == TAG_WHOLE && self.partial.is_none() {
                return match self.ring.try_recv()? {
                    Some(r) => Ok(Some(Message::InPlace(r))),
                    None => Err(RecvError::Protocol("record vanished")),
                };
            }
            let mut done = None;
            let mut err = None;
            let Self {
                ring,
                partial,
                max_message,
                ..
            } = self;
            ring.recv_batch(1, |tag, bytes| {
                match on_fragment(partial, *max_message, tag, bytes) {
                    Ok(v) => done = v,
                    Err(e) => err = Some(e),
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            if let Some(v) = done {
                return Ok(Some(Message::Owned(v)));
            }
        }
    }

    /// Hands every available message (at most `max`, waiting until
    /// `deadline` for the first) to `f`, releasing their ring space with one
    /// store. Returns how many were delivered.
    pub fn recv_batch(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        f: impl FnMut(&[u8]),
    ) -> Result<usize, RecvError> {
        self.batch(max, Some(deadline), f)
    }

    /// Hands every message already there (at most `max`) to `f` without
    /// waiting, releasing their ring space with one store. Returns how many
    /// were delivered (0 if none is complete). The messages handed out come
    /// before an error: a closed link or a dead peer is reported by the
    /// next call.
    pub fn try_recv_batch(&mut self, max: usize, f: impl FnMut(&[u8])) -> Result<usize, RecvError> {
        self.batch(max, None, f)
    }

    /// Sets how [`wait`](LinkReceiver::wait) and the receives that wait
    /// spin, yield and sleep on this direction.
    pub fn set_wait_strategy(&mut self, strategy: WaitStrategy) {
        self.ring.set_wait_strategy(strategy);
    }

    /// `wait`: `Some(deadline)` to wait for the first message, `None` to
    /// return at once when the ring is empty.
    fn batch(
        &mut self,
        max: usize,
        wait: Option<Option<Instant>>,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, RecvError> {
        let mut err = None;
        let mut delivered = 0;
        let Self {
            ring,
            partial,
            max_message,
            ..
        } = self;
        let mut each = |tag, bytes: &[u8]| {
            if err.is_some() {
                return;
            }
            if tag == TAG_WHOLE && partial.is_none() {
                f(bytes);
                delivered += 1;
                return;
            }
            match on_fragment(partial, *max_message, tag, bytes) {
                Ok(Some(v)) => {
                    f(&v);
                    delivered += 1;
                }
                Ok(None) => {}
                Err(e) => err = Some(e),
            }
        };
        match wait {
            Some(deadline) => ring.recv_batch_wait(max, deadline, &mut each)?,
            None => ring.recv_batch(max, &mut each)?,
        };
        match err {
            Some(e) => Err(e),
            None => Ok(delivered),
        }
    }

    /// Closes this direction: the peer's next send fails with
    /// [`RingError::Closed`].
    pub fn close(&mut self) {
        self.ring.close();
    }

    /// The peer process's credentials.
    pub fn peer(&self) -> PeerCred {
        self.shared.peer
    }
}

/// Handles one non-whole record; returns a message once reassembled.
fn on_fragment(
    partial: &mut Option<Partial>,
    max_message: usize,
    tag: u8,
    bytes: &[u8],
) -> Result<Option<Vec<u8>>, RecvError> {
    match (tag, partial.as_mut()) {
        (TAG_FIRST, None) => {
            let Some((len, data)) = bytes.split_first_chunk::<8>() else {
                return Err(RecvError::Protocol(
                    "first fragment shorter than its length field",
                ));
            };
            let total = u64::from_le_bytes(*len);
            if total > max_message as u64 {
                return Err(RecvError::TooLarge {
                    len: total,
                    max: max_message,
                });
            }
            let total = total as usize;
            if data.len() >= total {
                return Err(RecvError::Protocol(
                    "first fragment holds the whole message",
                ));
            }
            // Bounded by max_message, checked above.
            let mut buf = Vec::with_capacity(total);
            buf.extend_from_slice(data);
            *partial = Some(Partial { total, buf });
            Ok(None)
        }
        (TAG_MIDDLE | TAG_LAST, Some(p)) => {
            if p.buf.len() + bytes.len() > p.total {
                return Err(RecvError::Protocol("fragments exceed the announced length"));
            }
            p.buf.extend_from_slice(bytes);
            if tag == TAG_MIDDLE {
                if p.buf.len() == p.total {
                    return Err(RecvError::Protocol("middle fragment completes the message"));
                }
                return Ok(None);
            }
            if p.buf.len() != p.total {
                return Err(RecvError::Protocol(
                    "last fragment leaves the message short",
                ));
            }
            Ok(partial.take().map(|p| p.buf))
        }
        (TAG_FIRST | TAG_WHOLE, Some(_)) => Err(RecvError::Protocol(
            "new message started inside a fragmented one",
        )),
        (TAG_MIDDLE | TAG_LAST, None) => {
            Err(RecvError::Protocol("fragment without a first fragment"))
        }
        _ => Err(RecvError::Protocol("unknown record tag")),
    }
}

/// Client-to-server handshake message.
struct Hello {
    ring_capacity: u64,
    max_message: u64,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(HELLO_MAGIC);
        b[8..12].copy_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.ring_capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.max_message.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Hello, HandshakeError> {
        if b.len() != HELLO_LEN || &b[..8] != HELLO_MAGIC {
            return Err(HandshakeError::NotCommy {
                magic: "CMYHELO1",
                expected: HELLO_LEN,
                len: b.len(),
            });
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != HANDSHAKE_VERSION {
            return Err(HandshakeError::Version { theirs: version });
        }
        let flags = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
        if flags != 0 {
            return Err(HandshakeError::Invalid {
                field: "flags",
                value: flags.into(),
            });
        }
        let max_message = u64::from_le_bytes(b[24..32].try_into().unwrap_or_default());
        if max_message == 0 {
            return Err(HandshakeError::Invalid {
                field: "max_message",
                value: 0,
            });
        }
        Ok(Hello {
            ring_capacity: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
            max_message,
        })
    }
}

/// Server-to-client handshake message (sent with the segment's descriptor),
/// or a refusal: the same header with a non-zero status and a UTF-8 reason.
struct Welcome {
    ring_capacity: u64,
    max_message: u64,
    generation: u64,
}

impl Welcome {
    fn encode(&self) -> [u8; WELCOME_LEN] {
        let mut b = [0u8; WELCOME_LEN];
        b[..8].copy_from_slice(WELCOME_MAGIC);
        b[8..12].copy_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
        // status 0 = accepted
        b[16..24].copy_from_slice(&self.ring_capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.max_message.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Welcome, HandshakeError> {
        if b.len() < WELCOME_LEN || &b[..8] != WELCOME_MAGIC {
            return Err(HandshakeError::NotCommy {
                magic: "CMYWELC1",
                expected: WELCOME_LEN,
                len: b.len(),
            });
        }
        let field =
            |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        let status = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default());
        if status != 0 {
            return Err(HandshakeError::Refused {
                reason: String::from_utf8_lossy(&b[WELCOME_LEN..]).into_owned(),
            });
        }
        if version != HANDSHAKE_VERSION {
            return Err(HandshakeError::Version { theirs: version });
        }
        if b.len() != WELCOME_LEN {
            return Err(HandshakeError::NotCommy {
                magic: "CMYWELC1",
                expected: WELCOME_LEN,
                len: b.len(),
            });
        }
        let ring_capacity = field(16..24);
        if usize::try_from(ring_capacity)
            .ok()
            .and_then(|c| ring::validate_capacity(c).ok())
            .is_none()
        {
            return Err(HandshakeError::Invalid {
                field: "ring_capacity",
                value: ring_capacity,
            });
        }
        let max_message = field(24..32);
        if max_message == 0 {
            return Err(HandshakeError::Invalid {
                field: "max_message",
                value: 0,
            });
        }
        Ok(Welcome {
            ring_capacity,
            max_message,
            generation: field(32..40),
        })
    }
}

/// Tells a client why it is refused (best effort: it may be gone already).
fn send_refusal(sock: &UdsStream, reason: &str) -> Result<(), uds::SendError> {
    let mut b = Vec::with_capacity(WELCOME_LEN + reason.len().min(MAX_REJECT_REASON));
    b.extend_from_slice(WELCOME_MAGIC);
    b.extend_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.resize(WELCOME_LEN, 0);
    let mut cut = reason.len().min(MAX_REJECT_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    b.extend_from_slice(&reason.as_bytes()[..cut]);
    sock.send_msg(&b, &[])
}
