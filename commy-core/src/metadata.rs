//! [`Metadata`]: the per-message context carried in a frame's metadata
//! section (auth token, W3C traceparent, content type, user headers).
//!
//! The section is the postcard encoding of [`Metadata`] (layout in
//! `docs/PROTOCOL.md`). Decoding checks the section against
//! [`Limits::max_metadata`] before it allocates anything, never trusts a
//! declared length beyond the bytes actually present, and rejects trailing
//! bytes. An empty section (length 0) decodes as `Metadata::default()`.
//!
//! ```
//! use commy_core::{Limits, Metadata};
//!
//! let mut md = Metadata {
//!     content_type: Some("application/json".into()),
//!     ..Metadata::default()
//! };
//! md.add_header("x-tenant", b"acme".to_vec());
//!
//! let bytes = md.encode();
//! assert_eq!(bytes.len(), md.encoded_len());
//! let back = Metadata::decode(&bytes, &Limits::default())?;
//! assert_eq!(back, md);
//! assert_eq!(back.header("x-tenant"), Some(&b"acme"[..]));
//!
//! let tiny = Limits { max_metadata: 8, ..Limits::default() };
//! assert!(Metadata::decode(&bytes, &tiny).is_err());
//! # Ok::<(), commy_core::MetadataError>(())
//! ```

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

use crate::frame::Limits;
use crate::wire;

/// Per-message context. Field order is the wire order; fields are never
/// reordered or removed within a protocol version.
///
/// `Debug` output redacts the auth token, so metadata can be logged.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Metadata {
    /// Bearer credential (JWT, API key or session token) for the callee's
    /// authentication layer.
    pub auth_token: Option<String>,
    /// W3C Trace Context `traceparent` value, e.g.
    /// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    pub traceparent: Option<String>,
    /// Media type of the payload, e.g. `application/json`,
    /// `application/postcard`.
    pub content_type: Option<String>,
    /// Application headers, in order. Names are UTF-8 and compared exactly
    /// (lowercase by convention); a name may repeat; values are raw bytes.
    #[serde(
        serialize_with = "serialize_headers",
        deserialize_with = "deserialize_headers"
    )]
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Metadata {
    /// Whether every field is empty (the default).
    pub fn is_empty(&self) -> bool {
        self.auth_token.is_none()
            && self.traceparent.is_none()
            && self.content_type.is_none()
            && self.headers.is_empty()
    }

    /// Appends a header (existing headers with the same name are kept).
    pub fn add_header(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.headers.push((name.into(), value.into()));
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The values of all headers named `name`, in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Exact number of bytes [`Metadata::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        wire::opt_str_len(self.auth_token.as_deref())
            + wire::opt_str_len(self.traceparent.as_deref())
            + wire::opt_str_len(self.content_type.as_deref())
            + wire::varint_len(self.headers.len() as u64)
            + self
                .headers
                .iter()
                .map(|(name, value)| wire::bytes_len(name.len()) + wire::bytes_len(value.len()))
                .sum::<usize>()
    }

    /// Encodes the metadata section (postcard form). Never fails.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the postcard form of the metadata to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        wire::put_opt_str(out, self.auth_token.as_deref());
        wire::put_opt_str(out, self.traceparent.as_deref());
        wire::put_opt_str(out, self.content_type.as_deref());
        wire::put_varint(out, self.headers.len() as u64);
        for (name, value) in &self.headers {
            wire::put_bytes(out, name.as_bytes());
            wire::put_bytes(out, value);
        }
    }

    /// Decodes a metadata section of exactly `bytes`.
    ///
    /// The section length is checked against `limits.max_metadata` first;
    /// after that, the allocations made are bounded by `bytes.len()` (every
    /// declared length is checked against the bytes present before use). An
    /// empty section yields `Metadata::default()`.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Metadata, MetadataError> {
        if bytes.len() > limits.max_metadata as usize {
            return Err(MetadataError::TooLarge {
                len: bytes.len(),
                max: limits.max_metadata,
            });
        }
        if bytes.is_empty() {
            return Ok(Metadata::default());
        }
        let (metadata, rest) = postcard::take_from_bytes::<Metadata>(bytes)
            .map_err(|source| MetadataError::Malformed { source })?;
        if !rest.is_empty() {
            return Err(MetadataError::TrailingBytes { count: rest.len() });
        }
        Ok(metadata)
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'a>(&'a [(String, Vec<u8>)]);
        impl fmt::Debug for Headers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(
                        self.0
                            .iter()
                            .map(|(name, value)| (name, String::from_utf8_lossy(value))),
                    )
                    .finish()
            }
        }
        f.debug_struct("Metadata")
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("traceparent", &self.traceparent)
            .field("content_type", &self.content_type)
            .field("headers", &Headers(&self.headers))
            .finish()
    }
}

/// Error decoding a metadata section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The section is larger than the configured limit (checked before decoding).
    #[error("metadata section is {len} bytes, the limit (max_metadata) is {max}")]
    TooLarge {
        /// Section length in bytes.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The bytes are not a postcard-encoded [`Metadata`] (truncated, a
    /// declared length past the end, invalid UTF-8, an option tag other than
    /// 0 or 1, or an over-long varint).
    #[error("malformed metadata section: {source}")]
    Malformed {
        /// postcard's description of the problem.
        source: postcard::Error,
    },
    /// A valid metadata value was followed by extra bytes.
    #[error("metadata section has {count} trailing byte(s) after the encoded metadata")]
    TrailingBytes {
        /// Number of unexpected bytes.
        count: usize,
    },
}

/// Borrowed byte string that serializes with `serialize_bytes` (postcard:
/// varint length + raw bytes, instead of one element per byte).
struct ByteSlice<'a>(&'a [u8]);

impl Serialize for ByteSlice<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

fn serialize_headers<S: Serializer>(
    headers: &[(String, Vec<u8>)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(headers.len()))?;
    for (name, value) in headers {
        seq.serialize_element(&HeaderRef(name, value))?;
    }
    seq.end()
}

struct HeaderRef<'a>(&'a str, &'a [u8]);

impl Serialize for HeaderRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(self.0)?;
        tuple.serialize_element(&ByteSlice(self.1))?;
        tuple.end()
    }
}

/// Initial capacity cap for sequences whose length comes from the input:
/// a declared count is a claim, not a fact, so vectors grow with the elements
/// actually decoded instead of trusting it.
const MAX_PREALLOC: usize = 16;

fn deserialize_headers<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
    struct HeadersVisitor;

    impl<'de> Visitor<'de> for HeadersVisitor {
        type Value = Vec<(String, Vec<u8>)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence of (name, value) headers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
            while let Some(HeaderOwned(name, value)) = seq.next_element()? {
                out.push((name, value));
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(HeadersVisitor)
}

struct HeaderOwned(String, Vec<u8>);

impl<'de> Deserialize<'de> for HeaderOwned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HeaderOwned, D::Error> {
        struct HeaderVisitor;

        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = HeaderOwned;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a (name, value) header")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderOwned, A::Error> {
                let name: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let ByteBuf(value) = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                Ok(HeaderOwned(name, value))
            }
        }

        deserializer.deserialize_tuple(2, HeaderVisitor)
    }
}

/// Owned byte string that deserializes from `deserialize_byte_buf` (or from
/// a sequence of numbers, the form self-describing formats such as JSON use).
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteBuf, D::Error> {
        struct ByteBufVisitor;

        impl<'de> Visitor<'de> for ByteBufVisitor {
            type Value = ByteBuf;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }

            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
                while let Some(byte) = seq.next_element::<u8>()? {
                    out.push(byte);
                }
                Ok(ByteBuf(out))
            }
        }

        deserializer.deserialize_byte_buf(ByteBufVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        Metadata {
            auth_token: Some("tok".into()),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            content_type: Some("application/json".into()),
            headers: vec![
                ("x-a".into(), vec![0, 255, 7]),
                ("x-a".into(), b"second".to_vec()),
                ("x-big".into(), vec![9; 300]),
            ],
        }
    }

    #[test]
    fn encode_matches_postcard() {
        for md in [Metadata::default(), sample()] {
            let ours = md.encode();
            assert_eq!(ours, postcard::to_allocvec(&md).unwrap());
            assert_eq!(ours.len(), md.encoded_len());
            assert_eq!(Metadata::decode(&ours, &Limits::default()).unwrap(), md);
        }
    }

    #[test]
    fn documented_layout() {
        // docs/PROTOCOL.md, "Metadata encoding".
        let mut md = Metadata {
            content_type: Some("text/plain".into()),
            ..Metadata::default()
        };
        md.add_header("k", vec![0xff]);
        let mut expected = vec![0x00, 0x00, 0x01, 0x0a];
        expected.extend_from_slice(b"text/plain");
        expected.extend_from_slice(&[0x01, 0x01, b'k', 0x01, 0xff]);
        assert_eq!(md.encode(), expected);
        assert_eq!(Metadata::default().encode(), [0, 0, 0, 0]);
    }

    #[test]
    fn non_minimal_varints_are_accepted() {
        // Encoders emit minimal varints; decoders accept longer ones, as postcard does.
        assert_eq!(
            Metadata::decode(&[0, 0, 0, 0x80, 0x00], &Limits::default()),
            Ok(Metadata::default())
        );
    }

    #[test]
    fn debug_redacts_the_token() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("tok\""), "{text}");
        assert!(text.contains("auth_token: Some(\"<redacted>\")"), "{text}");
        assert!(text.contains("(\"x-a\", \"second\")"), "{text}");
    }

    #[test]
    fn header_lookup() {
        let md = sample();
        assert_eq!(md.header("x-a"), Some(&[0, 255, 7][..]));
        assert_eq!(md.header_values("x-a").count(), 2);
        assert_eq!(md.header("missing"), None);
        assert!(!md.is_empty());
        assert!(Metadata::default().is_empty());
    }

    #[test]
    fn empty_section_is_default() {
        assert_eq!(
            Metadata::decode(&[], &Limits::default()).unwrap(),
            Metadata::default()
        );
    }

    #[test]
    fn limit_is_checked_first() {
        let bytes = sample().encode();
        let limits = Limits {
            max_metadata: bytes.len() as u32 - 1,
            ..Limits::default()
        };
        assert_eq!(
            Metadata::decode(&bytes, &limits),
            Err(MetadataError::TooLarge {
                len: bytes.len(),
                max: bytes.len() as u32 - 1
            })
        );
        let limits = Limits {
            max_metadata: bytes.len() as u32,
            ..Limits::default()
        };
        assert!(Metadata::decode(&bytes, &limits).is_ok());
    }

    #[test]
    fn malformed_inputs() {
        let limits = Limits::default();
        let bad = |bytes: &[u8]| match Metadata::decode(bytes, &limits) {
            Err(MetadataError::Malformed { .. }) => {}
            other => panic!("{bytes:?}: {other:?}"),
        };
        bad(&[2]); // option tag 2
        bad(&[0, 0, 0]); // truncated before the header count
        bad(&[1, 5, b'a']); // declared string length past the end
        bad(&[1, 1, 0xff, 0, 0, 0]); // invalid UTF-8
        bad(&[0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]); // 4 billion headers claimed, none present
        bad(&[
            0, 0, 0, 1, 1, b'k', 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
        ]); // over-long varint
        assert_eq!(
            Metadata::decode(&[0, 0, 0, 0, 9], &limits),
            Err(MetadataError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn serde_json_round_trip() {
        let md = sample();
        let json = serde_json::to_string(&md).unwrap();
        assert_eq!(serde_json::from_str::<Metadata>(&json).unwrap(), md);
    }
}
