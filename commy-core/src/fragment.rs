//! Fragmentation (`docs/PROTOCOL.md`, section 3.1): a message larger than
//! one frame travels as consecutive frames of its kind and stream, every
//! one but the last flagged `FRAGMENT`.
//!
//! - [`split`]: the frames a sender writes for one message, each within
//!   the peer's `max_frame`;
//! - [`Reassembly`]: a receiver's state, fragments in and whole messages
//!   out, bounded by its [`Limits`] (`max_message` per message, twice that
//!   for all unfinished messages of a link together).
//!
//! Both are plain state with no I/O: a transport that carries frames on a
//! byte stream (TLS) runs every frame it writes through [`split`] and every
//! frame it reads through a [`Reassembly`].
//!
//! ```
//! use bytes::Bytes;
//! use commy_core::fragment::{Assembled, Reassembly, split};
//! use commy_core::{Frame, FrameHeader, FrameKind, Limits, StreamId};
//!
//! let limits = Limits { max_frame: 64, ..Limits::DEFAULT };
//! let payload = Bytes::from(vec![7u8; 100]);
//! let header = FrameHeader::new(FrameKind::OneWay, StreamId(1)).with_sections(0, 100);
//! let mut receiver = Reassembly::new(limits);
//! let mut whole = None;
//! for piece in split(header, 0, payload.len(), limits.max_frame) {
//!     let frame = Frame::from_header(piece.header, Bytes::new(), payload.slice(piece.payload))?;
//!     assert!(frame.encoded_len() <= 64);
//!     if let Assembled::Whole(f) = receiver.push(frame)? {
//!         whole = Some(f);
//!     }
//! }
//! assert_eq!(whole.expect("the last piece completes it").payload(), &payload);
//! # Ok::<(), commy_core::FrameError>(())
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, FrameError, FrameFlags, FrameHeader, HEADER_LEN, Limits};
use crate::status::Status;

/// One frame of a message being sent: its header (lengths and flags set),
/// whether it carries the message's metadata section, and which bytes of
/// the payload it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The frame's header.
    pub header: FrameHeader,
    /// Whether the metadata section follows the header (first piece only).
    pub metadata: bool,
    /// The payload bytes of this piece.
    pub payload: Range<usize>,
}

/// The frames that carry one message, each at most `max_frame` bytes.
///
/// `header` is the message's header as a sender finishes it
/// ([`FrameHeader::with_sections`]). A message that fits one frame, or
/// whose kind is never fragmented (see [`FrameKind::carries_message`]),
/// is one piece with that header. Otherwise the first piece carries the
/// metadata and the deadline, every piece but the last has `FRAGMENT` and
/// no `END_STREAM`, and the last keeps the header's flags. The metadata
/// must fit a frame by itself (`32 + metadata_len < max_frame`), as the
/// receiver's `max_metadata` ensures.
///
/// [`FrameKind::carries_message`]: crate::FrameKind::carries_message
pub fn split(
    header: FrameHeader,
    metadata_len: usize,
    payload_len: usize,
    max_frame: u32,
) -> Split {
    let room = (max_frame as usize).saturating_sub(HEADER_LEN).max(1);
    let whole = HEADER_LEN + metadata_len + payload_len <= max_frame as usize
        || !header.kind.carries_message();
    Split {
        header,
        metadata_len,
        payload_len,
        room,
        whole,
        offset: 0,
        first: true,
    }
}

/// The iterator of [`split`].
#[derive(Debug, Clone)]
pub struct Split {
    header: FrameHeader,
    metadata_len: usize,
    payload_len: usize,
    room: usize,
    whole: bool,
    offset: usize,
    first: bool,
}

impl Iterator for Split {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if !self.first && self.offset >= self.payload_len {
            return None;
        }
        let first = std::mem::replace(&mut self.first, false);
        if self.whole {
            self.offset = self.payload_len;
            return Some(Piece {
                header: self.header,
                metadata: true,
                payload: 0..self.payload_len,
            });
        }
        let room = if first {
            self.room.saturating_sub(self.metadata_len)
        } else {
            self.room
        };
        let start = self.offset;
        let end = start + room.min(self.payload_len - start);
        self.offset = end;
        let last = end == self.payload_len;
        let mut h = self.header;
        h.payload_len = (end - start) as u32;
        if !first {
            h.metadata_len = 0;
            h.deadline_us = 0;
        }
        if !last {
            h.flags = h.flags.without(FrameFlags::END_STREAM) | FrameFlags::FRAGMENT;
        }
        Some(Piece {
            header: h,
            metadata: first,
            payload: start..end,
        })
    }
}

/// What [`Reassembly::push`] made of a frame.
#[derive(Debug)]
pub enum Assembled {
    /// A whole message (its fragments joined), or a frame that was no
    /// fragment. A joined message has the first fragment's metadata and
    /// deadline (less the time its fragments took to arrive) and the last
    /// fragment's flags.
    Whole(Frame),
    /// A fragment was taken (or dropped, its message having failed):
    /// nothing to act on yet.
    Pending,
    /// The message on this stream is over the receiver's limit: the stream
    /// fails with `status` (RESOURCE_EXHAUSTED). Its later fragments are
    /// dropped as they arrive. `header` is its first frame's.
    TooLarge {
        /// The first frame's header (kind, stream, deadline).
        header: FrameHeader,
        /// The status to fail the stream with.
        status: Status,
    },
}

/// A receiver's unfinished messages, by stream id.
#[derive(Debug)]
pub struct Reassembly {
    limits: Limits,
    partial: HashMap<u64, Partial>,
    /// Payload bytes held for unfinished messages.
    held: u64,
}

#[derive(Debug)]
struct Partial {
    first: FrameHeader,
    metadata: Bytes,
    payload: BytesMut,
    /// When the first fragment arrived, if it carried a deadline.
    since: Option<Instant>,
    /// Over the limit: later fragments are dropped.
    failed: bool,
}

impl Reassembly {
    /// No unfinished message yet; `limits.max_message` bounds each message.
    pub fn new(limits: Limits) -> Reassembly {
        Reassembly {
            limits,
            partial: HashMap::new(),
            held: 0,
        }
    }

    /// The most payload bytes held for all unfinished messages together:
    /// twice `max_message`. A fragment that would pass it fails its
    /// message as too large.
    pub fn max_held(&self) -> u64 {
        2 * u64::from(self.limits.max_message)
    }

    /// Payload bytes held for unfinished messages right now.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Takes the next frame received. A frame that breaks the rules of
    /// fragmentation is an error for the whole link (its sender is broken):
    /// `FRAGMENT` on a kind that is never fragmented, or together with
    /// `END_STREAM`; inside a fragmented message, a frame of another kind on
    /// the same stream, or a later fragment with metadata or a deadline.
    pub fn push(&mut self, frame: Frame) -> Result<Assembled, FrameError> {
        let h = *frame.header();
        let fragment = h.flags.contains(FrameFlags::FRAGMENT);
        let max = self.limits.max_message;
        if !fragment && self.partial.is_empty() {
            if h.kind.carries_message() && h.payload_len > max {
                return Ok(Assembled::TooLarge {
                    header: h,
                    status: too_large(&h, u64::from(h.payload_len), max),
                });
            }
            return Ok(Assembled::Whole(frame));
        }
        let id = h.stream_id.0;
        let max_held = self.max_held();
        let bad = |problem: String| FrameError::BadFragment {
            stream: id,
            problem,
        };
        if fragment && !h.kind.carries_message() {
            return Err(bad(format!(
                "FRAGMENT is set on a {} frame, a kind that is never fragmented",
                h.kind
            )));
        }
        if fragment && h.flags.contains(FrameFlags::END_STREAM) {
            return Err(bad(
                "FRAGMENT and END_STREAM are both set: only the last fragment may end the stream"
                    .into(),
            ));
        }
        let Some(p) = self.partial.get_mut(&id) else {
            if !fragment {
                return Ok(Assembled::Whole(frame));
            }
            return Ok(self.first_fragment(frame));
        };
        if h.kind != p.first.kind {
            return Err(bad(format!(
                "a {} frame arrived inside a fragmented {} message on the same stream",
                h.kind, p.first.kind
            )));
        }
        if h.metadata_len != 0 {
            return Err(bad(format!(
                "a later fragment carries {} bytes of metadata (only the first may)",
                h.metadata_len
            )));
        }
        if h.deadline_us != 0 {
            return Err(bad(
                "a later fragment carries a deadline (only the first may)".into(),
            ));
        }
        if p.failed {
            if !fragment {
                self.partial.remove(&id);
            }
            return Ok(Assembled::Pending);
        }
        let len = p.payload.len() as u64 + u64::from(h.payload_len);
        if len > u64::from(max) || self.held + u64::from(h.payload_len) > max_held {
            self.held -= p.payload.len() as u64;
            p.payload = BytesMut::new();
            p.failed = true;
            let first = p.first;
            if !fragment {
                self.partial.remove(&id);
            }
            let status = if len > u64::from(max) {
                too_large(&first, len, max)
            } else {
                crowded_out(&first, max_held)
            };
            return Ok(Assembled::TooLarge {
                header: first,
                status,
            });
        }
        p.payload.extend_from_slice(frame.payload());
        self.held += u64::from(h.payload_len);
        if fragment {
            return Ok(Assembled::Pending);
        }
        let Some(p) = self.partial.remove(&id) else {
            return Ok(Assembled::Pending);
        };
        self.held -= p.payload.len() as u64;
        let mut header = p.first;
        header.flags = h.flags;
        header.payload_len = p.payload.len() as u32;
        if let Some(since) = p.since {
            let waited = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            header.deadline_us = header.deadline_us.saturating_sub(waited).max(1);
        }
        Ok(Assembled::Whole(Frame::from_parts_unchecked(
            header,
            p.metadata,
            p.payload.freeze(),
        )))
    }

    fn first_fragment(&mut self, frame: Frame) -> Assembled {
        let (h, metadata, payload) = frame.into_parts();
        let id = h.stream_id.0;
        let max = self.limits.max_message;
        let over = u64::from(h.payload_len) > u64::from(max);
        let crowded = self.held + u64::from(h.payload_len) > self.max_held();
        let partial = Partial {
            first: h,
            metadata,
            payload: if over || crowded {
                BytesMut::new()
            } else {
                BytesMut::from(&payload[..])
            },
            since: (h.deadline_us != 0).then(Instant::now),
            failed: over || crowded,
        };
        self.held += partial.payload.len() as u64;
        self.partial.insert(id, partial);
        if over {
            return Assembled::TooLarge {
                header: h,
                status: too_large(&h, u64::from(h.payload_len), max),
            };
        }
        if crowded {
            return Assembled::TooLarge {
                header: h,
                status: crowded_out(&h, self.max_held()),
            };
        }
        Assembled::Pending
    }

    /// Whether a message on `stream` has begun and not ended: its next
    /// frame continues it.
    pub fn is_unfinished(&self, stream: u64) -> bool {
        !self.partial.is_empty() && self.partial.contains_key(&stream)
    }

    /// Drops what is held for `stream` (it was cancelled); its later
    /// fragments, if any arrive, start a message of their own.
    pub fn forget(&mut self, stream: u64) {
        if let Some(p) = self.partial.remove(&stream) {
            self.held -= p.payload.len() as u64;
        }
    }
}

/// The status of a message dropped because the link's unfinished
/// messages would pass `max_held` bytes with it.
fn crowded_out(first: &FrameHeader, max_held: u64) -> Status {
    Status::resource_exhausted(format!(
        "unfinished messages on this link exceed {max_held} bytes; the {} on stream {} is \
         dropped",
        first.kind, first.stream_id.0
    ))
}

fn too_large(first: &FrameHeader, len: u64, max: u32) -> Status {
    Status::resource_exhausted(format!(
        "the {} on stream {} has {len} bytes or more, over the limit of {max} bytes (max_message)",
        first.kind, first.stream_id.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameKind, StreamId};

    fn frames(header: FrameHeader, md: &Bytes, payload: &Bytes, max_frame: u32) -> Vec<Frame> {
        split(header, md.len(), payload.len(), max_frame)
            .map(|p| {
                let md = if p.metadata { md.clone() } else { Bytes::new() };
                Frame::from_header(p.header, md, payload.slice(p.payload)).unwrap()
            })
            .collect()
    }

    fn request(id: u64, md: usize, len: usize) -> FrameHeader {
        FrameHeader {
            deadline_us: 5_000_000,
            ..FrameHeader::new(FrameKind::Request, StreamId(id))
        }
        .with_sections(md as u32, len as u32)
    }

    #[test]
    fn a_message_that_fits_is_one_frame() {
        let md = Bytes::from_static(b"\0\0\0\0");
        let payload = Bytes::from(vec![1u8; 28]);
        let h = request(1, 4, 28);
        let f = frames(h, &md, &payload, 64);
        assert_eq!(f.len(), 1);
        assert_eq!(*f[0].header(), h);
        assert_eq!(f[0].encoded_len(), 64);
        // Empty payloads too.
        assert_eq!(
            frames(request(1, 0, 0), &Bytes::new(), &Bytes::new(), 64).len(),
            1
        );
    }

    #[test]
    fn split_frames_follow_the_rules_and_join_again() {
        let md = Bytes::from_static(b"\0\0\x01\x01x\0");
        let payload: Bytes = (0..1000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let h = request(7, md.len(), payload.len());
        let f = frames(h, &md, &payload, 100);
        // 62 bytes in the first frame, then 68 per frame: 1 + 15 frames.
        assert_eq!(f.len(), 1 + (1000 - 62usize).div_ceil(68));
        for (i, frame) in f.iter().enumerate() {
            let fh = frame.header();
            let last = i == f.len() - 1;
            assert!(frame.encoded_len() <= 100, "frame {i}");
            assert_eq!(fh.kind, FrameKind::Request);
            assert_eq!(fh.stream_id, StreamId(7));
            assert_eq!(fh.flags.contains(FrameFlags::FRAGMENT), !last, "frame {i}");
            assert_eq!(fh.flags.contains(FrameFlags::END_STREAM), last, "frame {i}");
            assert_eq!(fh.metadata_len != 0, i == 0, "frame {i}");
            assert_eq!(fh.deadline_us != 0, i == 0, "frame {i}");
        }
        let mut r = Reassembly::new(Limits {
            max_frame: 100,
            ..Limits::DEFAULT
        });
        let n = f.len();
        for (i, frame) in f.into_iter().enumerate() {
            match r.push(frame).unwrap() {
                Assembled::Pending => assert!(i < n - 1),
                Assembled::Whole(w) => {
                    assert_eq!(i, n - 1);
                    assert_eq!(w.payload(), &payload);
                    assert_eq!(w.metadata(), &md);
                    let wh = w.header();
                    assert_eq!(wh.flags, FrameFlags::END_STREAM);
                    assert_eq!(wh.payload_len, 1000);
                    assert!(wh.deadline_us > 4_000_000 && wh.deadline_us <= 5_000_000);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn other_streams_may_come_between_fragments() {
        let a: Bytes = vec![1u8; 300].into();
        let b: Bytes = vec![2u8; 300].into();
        let fa = frames(request(1, 0, 300), &Bytes::new(), &a, 100);
        let fb = frames(request(3, 0, 300), &Bytes::new(), &b, 100);
        let mut r = Reassembly::new(Limits::DEFAULT);
        let mut whole = Vec::new();
        for (x, y) in fa.into_iter().zip(fb) {
            for f in [x, y] {
                if let Assembled::Whole(w) = r.push(f).unwrap() {
                    whole.push(w);
                }
            }
        }
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].payload(), &a);
        assert_eq!(whole[1].payload(), &b);
        // A ping between fragments passes through as it is.
        let mut f = frames(request(5, 0, 300), &Bytes::new(), &a, 100).into_iter();
        assert!(matches!(
            r.push(f.next().unwrap()).unwrap(),
            Assembled::Pending
        ));
        let ping = Frame::new(FrameKind::Ping, StreamId(0), Bytes::new(), Bytes::new()).unwrap();
        assert!(
            matches!(r.push(ping).unwrap(), Assembled::Whole(p) if p.kind() == FrameKind::Ping)
        );
    }

    #[test]
    fn a_message_over_max_message_fails_its_stream_only() {
        let limits = Limits {
            max_frame: 100,
            max_message: 250,
            ..Limits::DEFAULT
        };
        let big: Bytes = vec![9u8; 400].into();
        let mut r = Reassembly::new(limits);
        let mut failed = 0;
        for f in frames(request(1, 0, 400), &Bytes::new(), &big, 100) {
            match r.push(f).unwrap() {
                Assembled::TooLarge { header, status } => {
                    failed += 1;
                    assert_eq!(header.stream_id, StreamId(1));
                    assert_eq!(status.code(), crate::Code::ResourceExhausted);
                    assert!(status.message().contains("max_message"), "{status}");
                }
                Assembled::Pending => {}
                Assembled::Whole(w) => panic!("{w:?}"),
            }
        }
        assert_eq!(failed, 1, "the stream fails once");
        assert_eq!(r.held(), 0);
        // The link goes on.
        let ok: Bytes = vec![1u8; 200].into();
        let got: Vec<_> = frames(request(3, 0, 200), &Bytes::new(), &ok, 100)
            .into_iter()
            .filter_map(|f| match r.push(f).unwrap() {
                Assembled::Whole(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(got.len(), 1);
        // A single frame over max_message is refused the same way.
        let one = Frame::new(FrameKind::OneWay, StreamId(5), Bytes::new(), vec![0u8; 251]).unwrap();
        assert!(matches!(r.push(one).unwrap(), Assembled::TooLarge { .. }));
    }

    #[test]
    fn unfinished_messages_of_a_link_are_bounded_together() {
        let limits = Limits {
            max_frame: 100,
            max_message: 200,
            ..Limits::DEFAULT
        };
        let mut r = Reassembly::new(limits);
        let piece = |id: u64| {
            Frame::from_header(
                FrameHeader {
                    flags: FrameFlags::FRAGMENT,
                    ..FrameHeader::new(FrameKind::OneWay, StreamId(id)).with_sections(0, 60)
                },
                Bytes::new(),
                vec![0u8; 60].into(),
            )
            .unwrap()
        };
        // 6 x 60 = 360 held: under 2 x 200. The 7th would pass it.
        for id in 0..6 {
            assert!(matches!(
                r.push(piece(2 * id + 1)).unwrap(),
                Assembled::Pending
            ));
        }
        assert_eq!(r.held(), 360);
        assert!(matches!(
            r.push(piece(13)).unwrap(),
            Assembled::TooLarge { .. }
        ));
        r.forget(1);
        assert_eq!(r.held(), 300);
    }

    #[test]
    fn broken_fragments_are_link_errors() {
        let mut r = Reassembly::new(Limits::DEFAULT);
        let frag = |kind, id, flags, md: usize, deadline| {
            Frame::from_header(
                FrameHeader {
                    flags,
                    deadline_us: deadline,
                    ..FrameHeader::new(kind, StreamId(id)).with_sections(md as u32, 1)
                },
                vec![0u8; md].into(),
                vec![0u8; 1].into(),
            )
            .unwrap()
        };
        let expect = |r: &mut Reassembly, f: Frame, words: &str| match r.push(f) {
            Err(e @ FrameError::BadFragment { .. }) => {
                assert!(e.to_string().contains(words), "{e}")
            }
            other => panic!("{other:?}"),
        };
        expect(
            &mut r,
            frag(FrameKind::Ping, 0, FrameFlags::FRAGMENT, 0, 0),
            "never fragmented",
        );
        let both = FrameFlags::FRAGMENT | FrameFlags::END_STREAM;
        let first = Frame::from_header(
            FrameHeader {
                flags: both,
                ..FrameHeader::new(FrameKind::OneWay, StreamId(1)).with_sections(0, 1)
            },
            Bytes::new(),
            vec![0u8].into(),
        )
        .unwrap();
        expect(&mut r, first, "only the last fragment");
        let start = frag(FrameKind::Request, 3, FrameFlags::FRAGMENT, 0, 0);
        assert!(matches!(r.push(start).unwrap(), Assembled::Pending));
        expect(
            &mut r,
            frag(FrameKind::OneWay, 3, FrameFlags::empty(), 0, 0),
            "inside a fragmented REQUEST",
        );
        expect(
            &mut r,
            frag(FrameKind::Request, 3, FrameFlags::FRAGMENT, 4, 0),
            "4 bytes of metadata",
        );
        expect(
            &mut r,
            frag(FrameKind::Request, 3, FrameFlags::FRAGMENT, 0, 10),
            "a deadline",
        );
    }
}
