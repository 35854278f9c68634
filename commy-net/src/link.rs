//! What both ends of a connection share: [`Settings`], the bounded,
//! batching writer task and the frame reader.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use commy_core::fragment::{Assembled, Reassembly, split};
use commy_core::{Frame, FrameError, FrameHeader, FrameKind, Limits, Status, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Timeouts, limits and flow-control sizes of a connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Frame limits enforced on everything received.
    pub limits: Limits,
    /// Connecting, TLS handshake included, must finish within this.
    pub connect_timeout: Duration,
    /// A server closes a connection whose handshake takes longer.
    pub handshake_timeout: Duration,
    /// A Ping is sent when nothing arrived for this long.
    pub keepalive_interval: Duration,
    /// The connection is closed when no complete frame arrived for this long.
    pub idle_timeout: Duration,
    /// The connection is closed when a write to the peer stalls this long
    /// (the peer stopped reading).
    pub write_timeout: Duration,
    /// Frames that may wait in a connection's writer queue.
    pub writer_queue: usize,
    /// Streams a server lets one client have open at once (its credit).
    pub stream_credit: u32,
    /// The first reconnect delay ceiling (full jitter below it).
    pub backoff_base: Duration,
    /// The largest reconnect delay ceiling.
    pub backoff_cap: Duration,
    /// How long a draining server waits for in-flight streams.
    pub drain_timeout: Duration,
    /// Connections a server holds at once; more are refused.
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            limits: Limits::DEFAULT,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            writer_queue: 4096,
            stream_credit: 1024,
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// How long a connection has received nothing, without reading the clock
/// for every frame: frames are counted, and the clock is read at ticks.
/// Quiet time is measured from the first tick that saw no new frame, so it
/// is at most one tick short.
#[derive(Debug)]
pub(crate) struct Quiet {
    frames: u64,
    seen: u64,
    since: std::time::Instant,
}

impl Quiet {
    pub(crate) fn new() -> Quiet {
        Quiet {
            frames: 0,
            seen: 0,
            since: std::time::Instant::now(),
        }
    }

    /// A complete frame arrived.
    pub(crate) fn frame(&mut self) {
        self.frames = self.frames.wrapping_add(1);
    }

    /// At a tick: how long nothing has arrived.
    pub(crate) fn at_tick(&mut self) -> Duration {
        let now = std::time::Instant::now();
        if self.frames != self.seen {
            self.seen = self.frames;
            self.since = now;
        }
        now - self.since
    }

    /// The tick interval for a keepalive interval and an idle timeout.
    pub(crate) fn tick(keepalive: Duration, idle: Duration) -> Duration {
        (keepalive.min(idle) / 2).max(Duration::from_millis(1))
    }
}

/// Messages a server may push on a stream before the client grants more
/// (Credit frames on that stream): the initial stream credit of a push
/// stream ([`Reply::streaming`](crate::Reply::streaming)).
pub const PUSH_CREDIT: u32 = 256;

/// One item for the writer.
pub(crate) enum Out {
    /// A frame: header (lengths and, for kinds that end their stream,
    /// END_STREAM filled in by the writer), metadata, payload.
    Frame(FrameHeader, Bytes, Bytes),
    /// A frame whose flags stay as given: a Response that keeps its stream
    /// open for pushed messages.
    Keep(FrameHeader, Bytes, Bytes),
    /// Flush what is queued, then close the connection.
    Close,
}

impl Out {
    pub(crate) fn frame(kind: FrameKind, id: u64, metadata: Bytes, payload: Bytes) -> Out {
        Out::Frame(FrameHeader::new(kind, StreamId(id)), metadata, payload)
    }

    pub(crate) fn credit(n: u32) -> Out {
        Out::frame(
            FrameKind::Credit,
            0,
            Bytes::new(),
            Bytes::copy_from_slice(&n.to_le_bytes()),
        )
    }

    pub(crate) fn error(id: u64, status: &Status) -> Out {
        Out::frame(
            FrameKind::Error,
            id,
            Bytes::new(),
            Bytes::from(status.encode()),
        )
    }
}

/// Why the writer stopped.
#[derive(Debug)]
pub(crate) enum WriterEnd {
    /// Asked to close, or every sender is gone.
    Closed,
    /// A write stalled past the write timeout.
    TimedOut,
    /// The socket failed.
    Failed(std::io::Error),
}

/// Writes queued frames, many per write, until closed: control frames
/// (`ctrl`: credit, pings, cancels, errors; few and never waiting for room)
/// first, then the bounded data queue. A message over `max_frame` is
/// written as consecutive fragments. A write that does not finish within
/// `timeout` ends the connection (the peer stopped reading).
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    mut ctrl: mpsc::UnboundedReceiver<Out>,
    timeout: Duration,
    max_frame: u32,
) -> WriterEnd {
    const BATCH: usize = 256 * 1024;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut data_open = true;
    let end = loop {
        let first = tokio::select! {
            biased;
            c = ctrl.recv() => c,
            d = rx.recv(), if data_open => match d {
                Some(d) => Some(d),
                None => {
                    data_open = false;
                    continue;
                }
            },
        };
        let Some(first) = first else {
            break WriterEnd::Closed;
        };
        buf.clear();
        let mut close = encode(&mut buf, max_frame, first);
        while !close && buf.len() < BATCH {
            if let Ok(o) = ctrl.try_recv() {
                close = encode(&mut buf, max_frame, o);
                continue;
            }
            match rx.try_recv() {
                Ok(o) => close = encode(&mut buf, max_frame, o),
                Err(_) => break,
            }
        }
        if close {
            // Whatever data was queued before the close goes out too.
            while let Ok(o) = rx.try_recv() {
                if encode(&mut buf, max_frame, o) {
                    break;
                }
            }
        }
        let written = tokio::time::timeout(timeout, async {
            if !buf.is_empty() {
                w.write_all(&buf).await?;
            }
            w.flush().await
        })
        .await;
        match written {
            Err(_) => break WriterEnd::TimedOut,
            Ok(Err(e)) => break WriterEnd::Failed(e),
            Ok(Ok(())) => {}
        }
        if close {
            break WriterEnd::Closed;
        }
        if buf.capacity() > 4 * BATCH {
            buf = Vec::with_capacity(64 * 1024);
        }
    };
    rx.close();
    ctrl.close();
    if !matches!(end, WriterEnd::TimedOut) {
        let _ = tokio::time::timeout(timeout, w.shutdown()).await;
    }
    end
}

/// Appends `out` to `buf`, fragmented to `max_frame`; true if it asks to
/// close. The fragments of a message are written back to back.
fn encode(buf: &mut Vec<u8>, max_frame: u32, out: Out) -> bool {
    match out {
        Out::Frame(h, md, payload) => {
            let h = h.with_sections(md.len() as u32, payload.len() as u32);
            encode_frame(buf, max_frame, h, &md, &payload);
            false
        }
        Out::Keep(h, md, payload) => {
            let h = FrameHeader {
                metadata_len: md.len() as u32,
                payload_len: payload.len() as u32,
                ..h
            };
            encode_frame(buf, max_frame, h, &md, &payload);
            false
        }
        Out::Close => true,
    }
}

/// Appends a finished header's frame, fragmented to `max_frame`.
fn encode_frame(buf: &mut Vec<u8>, max_frame: u32, h: FrameHeader, md: &[u8], payload: &[u8]) {
    for piece in split(h, md.len(), payload.len(), max_frame) {
        buf.extend_from_slice(&piece.header.encode());
        if piece.metadata {
            buf.extend_from_slice(md);
        }
        buf.extend_from_slice(&payload[piece.payload]);
    }
}

fn violation(e: FrameError) -> ReadError {
    ReadError::Violation(e.to_string())
}

/// Reads frames off a byte stream and joins fragmented messages; checks
/// that the streams the peer opens have increasing ids.
pub(crate) struct FrameReader<R> {
    r: R,
    buf: BytesMut,
    limits: Limits,
    fragments: Reassembly,
    /// The highest stream id a Request or OneWay opened so far.
    last_opened: u64,
}

/// What the reader read.
#[derive(Debug)]
pub(crate) enum Received {
    /// A frame, or a whole message joined from its fragments.
    Frame(Frame),
    /// A message over `max_message`: its stream fails with `status`. The
    /// header is its first frame's.
    TooLarge(FrameHeader, Status),
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the stream between frames.
    Eof,
    /// The peer closed the stream in the middle of a frame.
    Truncated,
    /// A frame broke the protocol or a limit (the text says how).
    Violation(String),
    /// The socket failed (TLS alerts land here).
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => f.write_str("the peer closed the connection"),
            ReadError::Truncated => f.write_str("the peer closed the connection inside a frame"),
            ReadError::Violation(e) => f.write_str(e),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(r: R, limits: Limits) -> FrameReader<R> {
        FrameReader {
            r,
            buf: BytesMut::with_capacity(64 * 1024),
            limits,
            fragments: Reassembly::new(limits),
            last_opened: 0,
        }
    }

    /// The next complete frame or message. Cancel safe: bytes read stay
    /// buffered, fragments stay held.
    pub(crate) async fn next(&mut self) -> Result<Received, ReadError> {
        loop {
            while let Some(f) =
                Frame::decode_from(&mut self.buf, &self.limits).map_err(violation)?
            {
                let id = f.stream_id().0;
                match f.kind() {
                    FrameKind::Cancel => self.fragments.forget(id),
                    // A stream opens with its first frame, so ids are checked
                    // in the order streams open, whenever their messages
                    // are whole.
                    FrameKind::Request | FrameKind::OneWay if !self.fragments.is_unfinished(id) => {
                        if id <= self.last_opened {
                            return Err(ReadError::Violation(format!(
                                "a {} on stream {id}, which is not above stream {} opened \
                                 before it (stream ids increase and are never reused)",
                                f.kind(),
                                self.last_opened
                            )));
                        }
                        self.last_opened = id;
                    }
                    _ => {}
                }
                match self.fragments.push(f).map_err(violation)? {
                    Assembled::Whole(f) => return Ok(Received::Frame(f)),
                    Assembled::Pending => {}
                    Assembled::TooLarge { header, status } => {
                        return Ok(Received::TooLarge(header, status));
                    }
                }
            }
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            match self.r.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Eof),
                Ok(0) => return Err(ReadError::Truncated),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_time_counts_from_the_first_tick_without_frames() {
        let mut q = Quiet::new();
        q.frame();
        assert!(q.at_tick() < Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(20));
        let silent = q.at_tick();
        assert!(silent >= Duration::from_millis(20), "{silent:?}");
        q.frame();
        assert!(q.at_tick() < silent, "a frame resets the quiet time");
        assert_eq!(
            Quiet::tick(Duration::from_secs(10), Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        assert_eq!(
            Quiet::tick(Duration::ZERO, Duration::ZERO),
            Duration::from_millis(1)
        );
    }
}
