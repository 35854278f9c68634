//! The frame codec (sans-IO): [`FrameHeader`], [`Frame`], [`FrameRef`] and
//! the streaming [`FrameDecoder`].
//!
//! Every message on a link, over shared memory or TLS, is one frame: a fixed
//! 32-byte little-endian header ([`HEADER_LEN`]), then `metadata_len` bytes of
//! metadata (a postcard-encoded [`Metadata`]), then `payload_len` bytes of
//! opaque payload. The byte-level specification is `docs/PROTOCOL.md`.
//!
//! Nothing here does I/O. Header decoding reads a byte slice and never
//! allocates; length fields are checked against [`Limits`] before any buffer
//! for the body is allocated.
//!
//! ```
//! use commy_core::{Frame, FrameDecoder, FrameFlags, FrameKind, Limits, StreamId};
//!
//! let request = Frame::new(FrameKind::Request, StreamId(1), Vec::new(), b"ping".to_vec())?
//!     .with_flags(FrameFlags::END_STREAM);
//! let mut wire = Vec::new();
//! request.encode_into(&mut wire);
//! assert_eq!(wire.len(), 32 + 4);
//!
//! // A byte-stream transport feeds whatever chunks arrive.
//! let mut decoder = FrameDecoder::new(Limits::default());
//! let mut frames = Vec::new();
//! for chunk in wire.chunks(5) {
//!     for frame in decoder.decode(chunk) {
//!         frames.push(frame?);
//!     }
//! }
//! decoder.finish()?;
//! assert_eq!(frames, [request]);
//! # Ok::<(), commy_core::FrameError>(())
//! ```

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use bytes::{Bytes, BytesMut};

use crate::deadline::Deadline;
use crate::id::StreamId;
use crate::metadata::{Metadata, MetadataError};
use crate::status::{Status, StatusDecodeError};

/// The protocol version this crate speaks (header byte 0).
pub const PROTOCOL_VERSION: u8 = 1;

/// The TLS ALPN protocol id for this protocol version.
pub const ALPN: &[u8] = b"commy/1";

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 32;

/// Size limits a receiver enforces before allocating.
///
/// `max_frame` bounds the whole frame (header + metadata + payload);
/// `max_metadata` bounds the metadata section alone; `max_message` bounds
/// a message's payload, which may span several frames
/// ([fragmentation](crate::fragment)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Largest accepted frame, header included, in bytes.
    pub max_frame: u32,
    /// Largest accepted metadata section, in bytes.
    pub max_metadata: u32,
    /// Largest accepted message payload, all its fragments together, in bytes.
    pub max_message: u32,
}

impl Limits {
    /// Default `max_frame`: 16 MiB.
    pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;
    /// Default `max_metadata`: 16 KiB.
    pub const DEFAULT_MAX_METADATA: u32 = 16 * 1024;
    /// Default `max_message`: 64 MiB.
    pub const DEFAULT_MAX_MESSAGE: u32 = 64 * 1024 * 1024;
    /// The default limits.
    pub const DEFAULT: Limits = Limits {
        max_frame: Limits::DEFAULT_MAX_FRAME,
        max_metadata: Limits::DEFAULT_MAX_METADATA,
        max_message: Limits::DEFAULT_MAX_MESSAGE,
    };

    /// The limits of a transport that carries every message as one frame
    /// (shared memory, whose rings fragment records themselves): a frame
    /// may be as large as the largest message with the largest metadata.
    #[must_use]
    pub const fn unfragmented(self) -> Limits {
        Limits {
            max_frame: self.largest_message_frame(),
            ..self
        }
    }

    /// Refuses what a receiver with these limits would refuse of a message:
    /// metadata over `max_metadata`, a payload over `max_message`
    /// (RESOURCE_EXHAUSTED, naming the limit). A sender checks before it
    /// sends anything, so the caller is told and the link stays up. A
    /// payload larger than a frame is fine: it is fragmented, or carried
    /// whole by a transport that does not fragment.
    #[inline]
    pub fn check_message(&self, metadata_len: usize, payload_len: usize) -> Result<(), Status> {
        if metadata_len as u64 > u64::from(self.max_metadata) {
            return Err(Status::resource_exhausted(format!(
                "metadata of {metadata_len} bytes exceeds the limit of {} bytes (max_metadata)",
                self.max_metadata
            )));
        }
        if payload_len as u64 > u64::from(self.max_message) {
            return Err(Status::resource_exhausted(format!(
                "message of {payload_len} bytes exceeds the limit of {} bytes (max_message)",
                self.max_message
            )));
        }
        Ok(())
    }

    /// The length of a frame holding the largest message and the largest
    /// metadata section at once (saturating at `u32::MAX`).
    pub const fn largest_message_frame(&self) -> u32 {
        (HEADER_LEN as u32)
            .saturating_add(self.max_metadata)
            .saturating_add(self.max_message)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// What a frame is (header byte 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameKind {
    /// Opens a call on a new stream id; payload is the request message.
    Request = 1,
    /// A reply on the stream id of a Request.
    Response = 2,
    /// A message that expects no reply.
    OneWay = 3,
    /// A pub/sub message for a subscription stream.
    Publish = 4,
    /// The sender abandons the stream; the receiver stops work on it.
    Cancel = 5,
    /// Liveness probe; the receiver answers with a Pong echoing stream id and payload.
    Ping = 6,
    /// Answer to a Ping.
    Pong = 7,
    /// The sender will accept no new streams above the given stream id and
    /// will close the link once in-flight streams finish.
    GoAway = 8,
    /// Flow-control grant; payload is a `u32` little-endian increment.
    Credit = 9,
    /// The stream (or, on stream 0, the link) failed; payload is a
    /// postcard-encoded [`Status`].
    Error = 10,
}

impl FrameKind {
    /// Every kind, in numeric order.
    pub const ALL: [FrameKind; 10] = [
        FrameKind::Request,
        FrameKind::Response,
        FrameKind::OneWay,
        FrameKind::Publish,
        FrameKind::Cancel,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::GoAway,
        FrameKind::Credit,
        FrameKind::Error,
    ];

    /// The wire value.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// Upper-case name, e.g. `"REQUEST"`, for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            FrameKind::Request => "REQUEST",
            FrameKind::Response => "RESPONSE",
            FrameKind::OneWay => "ONE_WAY",
            FrameKind::Publish => "PUBLISH",
            FrameKind::Cancel => "CANCEL",
            FrameKind::Ping => "PING",
            FrameKind::Pong => "PONG",
            FrameKind::GoAway => "GO_AWAY",
            FrameKind::Credit => "CREDIT",
            FrameKind::Error => "ERROR",
        }
    }

    /// Whether a frame of this kind is, as Commy sends it today, a whole
    /// message that is also the last its sender sends on its stream: a
    /// unary Request, its one Response, a OneWay (PROTOCOL.md sections 4.2
    /// and 4.3). Such frames carry `END_STREAM`
    /// ([`FrameHeader::with_sections`]).
    pub const fn ends_its_stream(self) -> bool {
        matches!(
            self,
            FrameKind::Request | FrameKind::Response | FrameKind::OneWay
        )
    }

    /// Whether frames of this kind carry a message, which may be
    /// [fragmented](crate::fragment) (Request, Response, OneWay, Publish).
    pub const fn carries_message(self) -> bool {
        matches!(
            self,
            FrameKind::Request | FrameKind::Response | FrameKind::OneWay | FrameKind::Publish
        )
    }

    /// Whether frames of this kind belong to one stream and so must carry a
    /// nonzero stream id (Request, Response, OneWay, Publish, Cancel).
    pub const fn requires_stream(self) -> bool {
        matches!(
            self,
            FrameKind::Request
                | FrameKind::Response
                | FrameKind::OneWay
                | FrameKind::Publish
                | FrameKind::Cancel
        )
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = FrameError;

    fn try_from(kind: u8) -> Result<FrameKind, FrameError> {
        FrameKind::ALL
            .into_iter()
            .find(|k| k.as_u8() == kind)
            .ok_or(FrameError::UnknownKind { kind })
    }
}

/// Frame flags (header bytes 2-3). Only the bits defined here are valid;
/// a header with any other bit set is rejected.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(u16);

impl FrameFlags {
    /// The sender sends no more frames on this stream in this direction
    /// (the last Request or Response of a call).
    pub const END_STREAM: FrameFlags = FrameFlags(0x0001);
    /// The message continues in the next frame of the same kind on the same
    /// stream; set on every fragment but the last.
    pub const FRAGMENT: FrameFlags = FrameFlags(0x0002);
    /// Every defined bit.
    pub const KNOWN: FrameFlags = FrameFlags(0x0003);

    /// No flags.
    pub const fn empty() -> FrameFlags {
        FrameFlags(0)
    }

    /// The flags for `bits`, or `None` if an undefined bit is set.
    pub const fn from_bits(bits: u16) -> Option<FrameFlags> {
        if bits & !FrameFlags::KNOWN.0 == 0 {
            Some(FrameFlags(bits))
        } else {
            None
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// These flags without those in `other`.
    #[must_use]
    pub const fn without(self, other: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 & !other.0)
    }

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for FrameFlags {
    type Output = FrameFlags;

    fn bitor(self, rhs: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for FrameFlags {
    fn bitor_assign(&mut self, rhs: FrameFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for FrameFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(FrameFlags::END_STREAM) {
            names.push("END_STREAM");
        }
        if self.contains(FrameFlags::FRAGMENT) {
            names.push("FRAGMENT");
        }
        if names.is_empty() {
            f.write_str("FrameFlags(empty)")
        } else {
            write!(f, "FrameFlags({})", names.join(" | "))
        }
    }
}

/// Error decoding, validating or building a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the header or the declared frame needs.
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The version byte is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {version} (this side speaks version {supported})")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
        /// The version supported.
        supported: u8,
    },
    /// The kind byte is not a known [`FrameKind`].
    #[error("unknown frame kind {kind} (known kinds are 1 to 10)")]
    UnknownKind {
        /// The kind byte found.
        kind: u8,
    },
    /// Flag bits outside [`FrameFlags::KNOWN`] are set.
    #[error("unknown frame flag bits {unknown:#06x} set (flags {flags:#06x}, known bits {known:#06x})", known = FrameFlags::KNOWN.bits())]
    UnknownFlags {
        /// The whole flags field.
        flags: u16,
        /// The undefined bits that were set.
        unknown: u16,
    },
    /// The reserved header bytes 28-31 are not zero.
    #[error("reserved header field is {reserved:#010x}, must be zero")]
    NonZeroReserved {
        /// The reserved field's value.
        reserved: u32,
    },
    /// A stream-scoped kind carries the link-wide stream id 0.
    #[error("{kind} frame has stream id 0, which is reserved for link-wide frames")]
    ZeroStreamId {
        /// The frame kind.
        kind: FrameKind,
    },
    /// A Credit frame's payload is not exactly 4 bytes.
    #[error("CREDIT frame payload is {len} bytes, must be exactly 4 (u32 increment)")]
    InvalidCreditPayload {
        /// The declared payload length.
        len: u32,
    },
    /// The metadata section is larger than [`Limits::max_metadata`].
    #[error("metadata length {len} exceeds the limit of {max} bytes (max_metadata)")]
    MetadataTooLarge {
        /// The declared metadata length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The whole frame is larger than [`Limits::max_frame`].
    #[error(
        "frame of {len} bytes (32 header + {metadata_len} metadata + {payload_len} payload) \
         exceeds the limit of {max} bytes (max_frame)"
    )]
    FrameTooLarge {
        /// Total frame length.
        len: u64,
        /// The declared metadata length.
        metadata_len: u32,
        /// The declared payload length.
        payload_len: u32,
        /// The limit.
        max: u32,
    },
    /// A section given to [`Frame::new`] does not fit a `u32` length field.
    #[error("{section} section of {len} bytes does not fit the 32-bit length field")]
    SectionTooLong {
        /// `"metadata"` or `"payload"`.
        section: &'static str,
        /// Its length.
        len: usize,
    },
    /// A fragment broke the rules of fragmentation (see
    /// [`Reassembly::push`](crate::fragment::Reassembly::push)).
    #[error("bad fragment on stream {stream}: {problem}")]
    BadFragment {
        /// The stream of the fragment.
        stream: u64,
        /// What is wrong.
        problem: String,
    },
    /// The byte stream ended in the middle of a frame.
    #[error("stream ended inside a frame: {buffered} of {expected} bytes received")]
    UnexpectedEof {
        /// Bytes of the unfinished frame received.
        buffered: u64,
        /// Bytes the frame needs (32 while the header itself is incomplete).
        expected: u64,
    },
}

/// The fixed 32-byte frame header, decoded.
///
/// The version byte is implicit ([`PROTOCOL_VERSION`]) and the reserved bytes
/// are always zero, so neither is a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// What the frame is.
    pub kind: FrameKind,
    /// Flags.
    pub flags: FrameFlags,
    /// The stream the frame belongs to (0 = the whole link).
    pub stream_id: StreamId,
    /// Remaining time in microseconds, 0 = no deadline (see [`Deadline`]).
    pub deadline_us: u64,
    /// Length of the metadata section.
    pub metadata_len: u32,
    /// Length of the payload section.
    pub payload_len: u32,
}

impl FrameHeader {
    /// The header as a sender writes it before sections of `metadata_len`
    /// and `payload_len` bytes: those lengths, and `END_STREAM` on a frame
    /// whose kind [ends its stream](FrameKind::ends_its_stream) (other
    /// flags are kept). Both transports' writers finish every header here.
    #[must_use]
    pub fn with_sections(mut self, metadata_len: u32, payload_len: u32) -> FrameHeader {
        self.metadata_len = metadata_len;
        self.payload_len = payload_len;
        if self.kind.ends_its_stream() {
            self.flags |= FrameFlags::END_STREAM;
        }
        self
    }

    /// A header with no flags, no deadline and empty sections.
    pub const fn new(kind: FrameKind, stream_id: StreamId) -> FrameHeader {
        FrameHeader {
            kind,
            flags: FrameFlags::empty(),
            stream_id,
            deadline_us: 0,
            metadata_len: 0,
            payload_len: 0,
        }
    }

    /// Metadata plus payload length: the bytes that follow the header.
    pub const fn body_len(&self) -> u64 {
        self.metadata_len as u64 + self.payload_len as u64
    }

    /// Length of the whole frame, header included.
    pub const fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len()
    }

    /// The deadline this header carries, counted from `now`.
    pub fn deadline_at(&self, now: std::time::Instant) -> Option<Deadline> {
        Deadline::from_wire_at(self.deadline_us, now)
    }

    /// Encodes the header (little-endian, see `docs/PROTOCOL.md`).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = PROTOCOL_VERSION;
        out[1] = self.kind.as_u8();
        out[2..4].copy_from_slice(&self.flags.bits().to_le_bytes());
        out[4..8].copy_from_slice(&self.metadata_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.stream_id.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.deadline_us.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        // Bytes 28..32 are reserved and stay zero.
        out
    }

    /// Decodes and validates the header in the first [`HEADER_LEN`] bytes of
    /// `bytes` (anything after them is ignored). Does not allocate.
    ///
    /// Checks, in order: length, version, kind, flags, reserved bytes, the
    /// stream id and payload rules of the kind, then the [`Limits`].
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<FrameHeader, FrameError> {
        let Some(raw) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN as u64,
                available: bytes.len() as u64,
            });
        };
        if raw[0] != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion {
                version: raw[0],
                supported: PROTOCOL_VERSION,
            });
        }
        let kind = FrameKind::try_from(raw[1])?;
        let flags_bits = u16::from_le_bytes([raw[2], raw[3]]);
        let flags = FrameFlags::from_bits(flags_bits).ok_or(FrameError::UnknownFlags {
            flags: flags_bits,
            unknown: flags_bits & !FrameFlags::KNOWN.bits(),
        })?;
        let reserved = u32::from_le_bytes([raw[28], raw[29], raw[30], raw[31]]);
        if reserved != 0 {
            return Err(FrameError::NonZeroReserved { reserved });
        }
        let header = FrameHeader {
            kind,
            flags,
            metadata_len: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
            stream_id: StreamId(u64::from_le_bytes([
                raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
            ])),
            deadline_us: u64::from_le_bytes([
                raw[16], raw[17], raw[18], raw[19], raw[20], raw[21], raw[22], raw[23],
            ]),
            payload_len: u32::from_le_bytes([raw[24], raw[25], raw[26], raw[27]]),
        };
        header.validate(limits)?;
        Ok(header)
    }

    /// Checks the kind rules and the limits: what [`FrameHeader::decode`]
    /// checks beyond the raw bytes. Senders can use it to check a frame
    /// against the peer's limits before sending.
    pub fn validate(&self, limits: &Limits) -> Result<(), FrameError> {
        check_kind_rules(self.kind, self.stream_id, u64::from(self.payload_len))?;
        if self.metadata_len > limits.max_metadata {
            return Err(FrameError::MetadataTooLarge {
                len: self.metadata_len,
                max: limits.max_metadata,
            });
        }
        if self.frame_len() > u64::from(limits.max_frame) {
            return Err(FrameError::FrameTooLarge {
                len: self.frame_len(),
                metadata_len: self.metadata_len,
                payload_len: self.payload_len,
                max: limits.max_frame,
            });
        }
        Ok(())
    }
}

fn check_kind_rules(
    kind: FrameKind,
    stream_id: StreamId,
    payload_len: u64,
) -> Result<(), FrameError> {
    if kind.requires_stream() && stream_id.is_connection() {
        return Err(FrameError::ZeroStreamId { kind });
    }
    if kind == FrameKind::Credit && payload_len != 4 {
        return Err(FrameError::InvalidCreditPayload {
            len: u32::try_from(payload_len).unwrap_or(u32::MAX),
        });
    }
    Ok(())
}

/// A complete frame that owns its sections.
///
/// The header's length fields always match the sections. The sections are
/// [`Bytes`], so frames decoded from a buffer share it instead of copying.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    header: FrameHeader,
    metadata: Bytes,
    payload: Bytes,
}

impl Frame {
    /// Builds a frame with no flags and no deadline.
    ///
    /// Fails if a section does not fit a `u32` length, or the kind's rules
    /// are broken (zero stream id for stream-scoped kinds, a Credit payload
    /// that is not 4 bytes). Limits are not checked here; see
    /// [`Frame::validate`].
    pub fn new(
        kind: FrameKind,
        stream_id: StreamId,
        metadata: impl Into<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<Frame, FrameError> {
        let metadata = metadata.into();
        let payload = payload.into();
        let section_len = |section, bytes: &Bytes| {
            u32::try_from(bytes.len()).map_err(|_| FrameError::SectionTooLong {
                section,
                len: bytes.len(),
            })
        };
        let metadata_len = section_len("metadata", &metadata)?;
        let payload_len = section_len("payload", &payload)?;
        check_kind_rules(kind, stream_id, u64::from(payload_len))?;
        Ok(Frame {
            header: FrameHeader {
                metadata_len,
                payload_len,
                ..FrameHeader::new(kind, stream_id)
            },
            metadata,
            payload,
        })
    }

    /// A frame with `header` as it is (flags, deadline, lengths), whose
    /// lengths must match the sections. Fails on a length mismatch or a
    /// broken kind rule; limits are not checked ([`Frame::validate`]).
    pub fn from_header(
        header: FrameHeader,
        metadata: Bytes,
        payload: Bytes,
    ) -> Result<Frame, FrameError> {
        let frame = Frame::new(header.kind, header.stream_id, metadata, payload)?;
        if frame.header.metadata_len != header.metadata_len
            || frame.header.payload_len != header.payload_len
        {
            return Err(FrameError::Truncated {
                needed: header.body_len(),
                available: frame.header.body_len(),
            });
        }
        Ok(Frame { header, ..frame })
    }

    /// A frame from parts whose lengths the caller made match.
    pub(crate) fn from_parts_unchecked(
        header: FrameHeader,
        metadata: Bytes,
        payload: Bytes,
    ) -> Frame {
        debug_assert_eq!(header.metadata_len as usize, metadata.len());
        debug_assert_eq!(header.payload_len as usize, payload.len());
        Frame {
            header,
            metadata,
            payload,
        }
    }

    /// A Credit frame granting `increment` (stream id 0 = link-wide).
    pub fn credit(stream_id: StreamId, increment: u32) -> Frame {
        Frame {
            header: FrameHeader {
                payload_len: 4,
                ..FrameHeader::new(FrameKind::Credit, stream_id)
            },
            metadata: Bytes::new(),
            payload: Bytes::copy_from_slice(&increment.to_le_bytes()),
        }
    }

    /// An Error frame carrying `status` (stream id 0 = the whole link).
    pub fn error(stream_id: StreamId, status: &Status) -> Result<Frame, FrameError> {
        Frame::new(FrameKind::Error, stream_id, Bytes::new(), status.encode())
    }

    /// Replaces the flags.
    pub fn with_flags(mut self, flags: FrameFlags) -> Frame {
        self.header.flags = flags;
        self
    }

    /// Sets the deadline field to the wire form of `deadline`, measured now.
    pub fn with_deadline(self, deadline: Option<Deadline>) -> Frame {
        self.with_deadline_us(Deadline::to_wire_option(deadline))
    }

    /// Sets the raw deadline field (remaining µs, 0 = none).
    pub fn with_deadline_us(mut self, deadline_us: u64) -> Frame {
        self.header.deadline_us = deadline_us;
        self
    }

    /// The header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// The frame kind.
    pub fn kind(&self) -> FrameKind {
        self.header.kind
    }

    /// The stream id.
    pub fn stream_id(&self) -> StreamId {
        self.header.stream_id
    }

    /// The raw metadata section.
    pub fn metadata(&self) -> &Bytes {
        &self.metadata
    }

    /// The payload section.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Splits the frame into header, metadata and payload.
    pub fn into_parts(self) -> (FrameHeader, Bytes, Bytes) {
        (self.header, self.metadata, self.payload)
    }

    /// Decodes the metadata section (empty section = default metadata).
    pub fn decode_metadata(&self, limits: &Limits) -> Result<Metadata, MetadataError> {
        Metadata::decode(&self.metadata, limits)
    }

    /// For a Credit frame, the granted increment.
    pub fn credit_increment(&self) -> Option<u32> {
        if self.header.kind != FrameKind::Credit {
            return None;
        }
        let bytes: [u8; 4] = self.payload.as_ref().try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    }

    /// For an Error frame, the decoded status.
    pub fn status(&self) -> Option<Result<Status, StatusDecodeError>> {
        (self.header.kind == FrameKind::Error).then(|| Status::decode(&self.payload))
    }

    /// Checks the frame against `limits` (e.g. the peer's) before sending.
    pub fn validate(&self, limits: &Limits) -> Result<(), FrameError> {
        self.header.validate(limits)
    }

    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.metadata.len() + self.payload.len()
    }

    /// Appends the encoded frame (header, metadata, payload) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.metadata);
        out.extend_from_slice(&self.payload);
    }

    /// The encoded frame in a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Takes one complete frame off the front of `buf`, for
    /// `tokio_util::codec`-style decoders.
    ///
    /// Returns `Ok(None)` while `buf` holds less than a whole frame; once the
    /// header is valid it reserves room for the rest (bounded by `limits`).
    /// The returned sections share `buf`'s allocation. On error the link
    /// should be closed: the stream position is lost.
    pub fn decode_from(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = FrameHeader::decode(buf, limits)?;
        // validate() bounded frame_len by a u32 limit, so it fits usize.
        let total = usize::try_from(header.frame_len()).unwrap_or(usize::MAX);
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut body = buf.split_to(total).freeze().split_off(HEADER_LEN);
        let metadata = body.split_to(header.metadata_len as usize);
        Ok(Some(Frame {
            header,
            metadata,
            payload: body,
        }))
    }
}

/// A frame decoded in place from a byte slice (e.g. a shared-memory ring
/// record), borrowing its sections.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    header: FrameHeader,
    metadata: &'a [u8],
    payload: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// Decodes the frame at the start of `bytes`. Bytes after the frame (such
    /// as record padding) are ignored; [`FrameRef::encoded_len`] says how many
    /// were used. Does not allocate.
    pub fn decode(bytes: &'a [u8], limits: &Limits) -> Result<FrameRef<'a>, FrameError> {
        let header = FrameHeader::decode(bytes, limits)?;
        let available = bytes.len() as u64;
        if available < header.frame_len() {
            return Err(FrameError::Truncated {
                needed: header.frame_len(),
                available,
            });
        }
        let body = &bytes[HEADER_LEN..];
        let (metadata, rest) = body.split_at(header.metadata_len as usize);
        let payload = &rest[..header.payload_len as usize];
        Ok(FrameRef {
            header,
            metadata,
            payload,
        })
    }

    /// The header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// The raw metadata section.
    pub fn metadata(&self) -> &'a [u8] {
        self.metadata
    }

    /// The payload section.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Length of the frame in bytes, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.metadata.len() + self.payload.len()
    }

    /// Copies the sections into an owned [`Frame`].
    pub fn to_frame(&self) -> Frame {
        Frame {
            header: self.header,
            metadata: Bytes::copy_from_slice(self.metadata),
            payload: Bytes::copy_from_slice(self.payload),
        }
    }
}

/// Debug view of a section: its length and at most the first 64 bytes, so
/// logging a frame never dumps a 16 MiB payload.
struct Section<'a>(&'a [u8]);

impl fmt::Debug for Section<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PREVIEW: usize = 64;
        let shown = &self.0[..self.0.len().min(PREVIEW)];
        write!(
            f,
            "{} bytes {:?}",
            self.0.len(),
            Bytes::copy_from_slice(shown)
        )?;
        if self.0.len() > PREVIEW {
            f.write_str("...")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("header", &self.header)
            .field("metadata", &Section(&self.metadata))
            .field("payload", &Section(&self.payload))
            .finish()
    }
}

impl fmt::Debug for FrameRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameRef")
            .field("header", &self.header)
            .field("metadata", &Section(self.metadata))
            .field("payload", &Section(self.payload))
            .finish()
    }
}

/// Streaming frame decoder for byte-stream transports (TCP/TLS).
///
/// Push bytes in as they arrive, pull complete [`Frame`]s out. The decoder
/// buffers at most one frame: the 32-byte header in place, then one body
/// buffer of exactly `metadata_len + payload_len` bytes, allocated only after
/// the header passed validation against the [`Limits`]. [`FrameDecoder::push`]
/// therefore consumes input only up to the end of the current frame. Errors
/// are sticky: after one, every call returns it again, because the position
/// in the byte stream is lost and the link must be closed.
///
/// The simplest driver is [`FrameDecoder::decode`], an iterator over the
/// frames completed by one chunk of input.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    header_buf: [u8; HEADER_LEN],
    header_filled: usize,
    current: Option<FrameHeader>,
    body: BytesMut,
    error: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that enforces `limits`.
    pub fn new(limits: Limits) -> FrameDecoder {
        FrameDecoder {
            limits,
            header_buf: [0; HEADER_LEN],
            header_filled: 0,
            current: None,
            body: BytesMut::new(),
            error: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes still needed to complete the current frame (the header first,
    /// then the body); 0 when a frame is ready to be taken with
    /// [`FrameDecoder::next_frame`] or after an error.
    pub fn wanted(&self) -> usize {
        if self.error.is_some() {
            return 0;
        }
        match &self.current {
            None => HEADER_LEN - self.header_filled,
            // body_len <= max_frame, a u32, checked before `current` was set.
            Some(h) => usize::try_from(h.body_len()).unwrap_or(usize::MAX) - self.body.len(),
        }
    }

    /// Bytes of an unfinished frame held (header and body).
    pub fn buffered(&self) -> usize {
        self.header_filled + self.body.len()
    }

    /// Consumes bytes from the front of `input` and returns how many. Stops at
    /// the end of the current frame, so a return value smaller than
    /// `input.len()` means a frame is complete: take it with
    /// [`FrameDecoder::next_frame`], then push the rest.
    pub fn push(&mut self, input: &[u8]) -> Result<usize, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let mut consumed = 0;
        if self.current.is_none() {
            let take = (HEADER_LEN - self.header_filled).min(input.len());
            self.header_buf[self.header_filled..self.header_filled + take]
                .copy_from_slice(&input[..take]);
            self.header_filled += take;
            consumed += take;
            if self.header_filled < HEADER_LEN {
                return Ok(consumed);
            }
            match FrameHeader::decode(&self.header_buf, &self.limits) {
                Ok(header) => {
                    // Bounded by max_frame, checked by decode.
                    self.body =
                        BytesMut::with_capacity(usize::try_from(header.body_len()).unwrap_or(0));
                    self.current = Some(header);
                }
                Err(err) => {
                    self.error = Some(err.clone());
                    return Err(err);
                }
            }
        }
        let take = self.wanted().min(input.len() - consumed);
        self.body
            .extend_from_slice(&input[consumed..consumed + take]);
        Ok(consumed + take)
    }

    /// Takes the next complete frame, if one is ready.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let Some(header) = self.current else {
            return Ok(None);
        };
        if self.wanted() != 0 {
            return Ok(None);
        }
        let mut payload = std::mem::take(&mut self.body).freeze();
        let metadata = payload.split_to(header.metadata_len as usize);
        self.current = None;
        self.header_filled = 0;
        Ok(Some(Frame {
            header,
            metadata,
            payload,
        }))
    }

    /// Feeds `input` and iterates over the frames it completes.
    ///
    /// Drive the iterator to its end: input it has not consumed yet when
    /// dropped is discarded. It stops after yielding an error.
    pub fn decode<'d>(&'d mut self, input: &'d [u8]) -> Frames<'d> {
        Frames {
            decoder: self,
            input,
            done: false,
        }
    }

    /// Call at end of stream: fails if a frame was left unfinished (or an
    /// error is pending).
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        if self.buffered() == 0 && self.current.is_none() {
            return Ok(());
        }
        let expected = self.current.map_or(HEADER_LEN as u64, |h| h.frame_len());
        Err(FrameError::UnexpectedEof {
            buffered: self.buffered() as u64,
            expected,
        })
    }
}

/// Iterator returned by [`FrameDecoder::decode`].
#[derive(Debug)]
pub struct Frames<'d> {
    decoder: &'d mut FrameDecoder,
    input: &'d [u8],
    done: bool,
}

impl Iterator for Frames<'_> {
    type Item = Result<Frame, FrameError>;

    fn next(&mut self) -> Option<Result<Frame, FrameError>> {
        if self.done {
            return None;
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            }
            if self.input.is_empty() {
                self.done = true;
                return None;
            }
            match self.decoder.push(self.input) {
                Ok(n) => self.input = &self.input[n..],
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
