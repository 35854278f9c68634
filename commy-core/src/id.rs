//! Identifiers: [`InstanceId`] (one serving process) and [`StreamId`] (one
//! exchange on a link).
//!
//! ```
//! use commy_core::{InstanceId, StreamId};
//!
//! let id = InstanceId::random();
//! let text = id.to_string();
//! assert_eq!(text.len(), 32);
//! assert_eq!(text.parse::<InstanceId>()?, id);
//!
//! let fixed = InstanceId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
//! assert_eq!(fixed.to_string(), "0123456789abcdef0011223344556677");
//!
//! assert!(StreamId::CONNECTION.is_connection());
//! assert_eq!(StreamId(7).to_string(), "7");
//! # Ok::<(), commy_core::InstanceIdError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// A 128-bit identifier of one service instance (one process serving a name).
///
/// Displayed and parsed as exactly 32 lowercase hexadecimal digits (the value
/// in big-endian order). The text form is canonical: uppercase digits are
/// rejected so that one id has exactly one spelling, which matters because the
/// id is part of socket file names. With serde it is that string in
/// human-readable formats (JSON, TOML) and 16 raw bytes otherwise (postcard).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(u128);

impl InstanceId {
    /// A fresh id from the thread-local CSPRNG (seeded by the OS).
    pub fn random() -> InstanceId {
        InstanceId(rand::random())
    }

    /// Wraps a raw value.
    pub const fn from_u128(value: u128) -> InstanceId {
        InstanceId(value)
    }

    /// The raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// Builds an id from its 16 big-endian bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> InstanceId {
        InstanceId(u128::from_be_bytes(bytes))
    }

    /// The 16 big-endian bytes of the id (the order of the hex digits).
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({:032x})", self.0)
    }
}

impl FromStr for InstanceId {
    type Err = InstanceIdError;

    fn from_str(s: &str) -> Result<InstanceId, InstanceIdError> {
        if s.len() != 32 {
            return Err(InstanceIdError::Length {
                len: s.len(),
                input: s.chars().take(64).collect(),
            });
        }
        let mut value: u128 = 0;
        for (index, ch) in s.char_indices() {
            let digit = match ch {
                '0'..='9' => ch as u8 - b'0',
                'a'..='f' => ch as u8 - b'a' + 10,
                _ => {
                    return Err(InstanceIdError::InvalidChar {
                        input: s.to_owned(),
                        ch,
                        index,
                    });
                }
            };
            value = (value << 4) | u128::from(digit);
        }
        Ok(InstanceId(value))
    }
}

/// Error parsing an [`InstanceId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceIdError {
    /// The text is not exactly 32 bytes long.
    #[error("instance id {input:?} is {len} bytes long, expected 32 lowercase hex digits")]
    Length {
        /// Length of the input in bytes.
        len: usize,
        /// The input (at most its first 64 characters).
        input: String,
    },
    /// The text contains something other than `0-9a-f`.
    #[error(
        "invalid character {ch:?} at byte {index} of instance id {input:?} \
         (expected 32 lowercase hex digits 0-9a-f)"
    )]
    InvalidChar {
        /// The input.
        input: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
}

impl Serialize for InstanceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.to_bytes().serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<InstanceId, D::Error> {
        if deserializer.is_human_readable() {
            struct HexVisitor;
            impl Visitor<'_> for HexVisitor {
                type Value = InstanceId;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("32 lowercase hex digits")
                }

                fn visit_str<E: de::Error>(self, v: &str) -> Result<InstanceId, E> {
                    v.parse().map_err(E::custom)
                }
            }
            deserializer.deserialize_str(HexVisitor)
        } else {
            <[u8; 16]>::deserialize(deserializer).map(InstanceId::from_bytes)
        }
    }
}

/// Identifies one exchange (a call, a one-way message, a subscription) on a
/// link. Stream id 0 ([`StreamId::CONNECTION`]) is reserved for frames that
/// concern the whole link (Ping, Pong, GoAway, connection-wide Credit).
///
/// Which side allocates which ids is fixed by `docs/PROTOCOL.md`: the side
/// that opened the link uses odd ids, the side that accepted it even ids.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The reserved id of link-wide frames.
    pub const CONNECTION: StreamId = StreamId(0);

    /// Whether this is the link-wide id 0.
    pub const fn is_connection(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for StreamId {
    fn from(value: u64) -> StreamId {
        StreamId(value)
    }
}

impl From<StreamId> for u64 {
    fn from(id: StreamId) -> u64 {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_32_lowercase_hex() {
        assert_eq!(InstanceId::from_u128(0).to_string(), "0".repeat(32));
        assert_eq!(InstanceId::from_u128(u128::MAX).to_string(), "f".repeat(32));
        let id = InstanceId::from_u128(0xabc);
        assert_eq!(id.to_string(), format!("{}abc", "0".repeat(29)));
        assert_eq!(id.to_string().parse::<InstanceId>().unwrap(), id);
        assert_eq!(InstanceId::from_bytes(id.to_bytes()), id);
    }

    #[test]
    fn random_ids_differ() {
        let a = InstanceId::random();
        let b = InstanceId::random();
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<InstanceId>().unwrap(), a);
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            "abc".parse::<InstanceId>(),
            Err(InstanceIdError::Length { len: 3, .. })
        ));
        let upper = "A".repeat(32);
        assert_eq!(
            upper.parse::<InstanceId>(),
            Err(InstanceIdError::InvalidChar {
                input: upper.clone(),
                ch: 'A',
                index: 0
            })
        );
        let mut bad = "0".repeat(31);
        bad.push('g');
        assert!(matches!(
            bad.parse::<InstanceId>(),
            Err(InstanceIdError::InvalidChar {
                ch: 'g',
                index: 31,
                ..
            })
        ));
        // 32 bytes but a multi-byte character: reported at its byte offset.
        let mut multi = "0".repeat(30);
        multi.push('é');
        assert!(matches!(
            multi.parse::<InstanceId>(),
            Err(InstanceIdError::InvalidChar {
                ch: 'é',
                index: 30,
                ..
            })
        ));
    }

    #[test]
    fn serde_forms() {
        let id = InstanceId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0123456789abcdef0011223344556677\"");
        assert_eq!(serde_json::from_str::<InstanceId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<InstanceId>("\"xyz\"").is_err());

        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bytes, id.to_bytes());
        assert_eq!(postcard::from_bytes::<InstanceId>(&bytes).unwrap(), id);
    }

    #[test]
    fn stream_id() {
        assert!(StreamId::CONNECTION.is_connection());
        assert!(!StreamId(1).is_connection());
        assert_eq!(u64::from(StreamId::from(9)), 9);
    }
}
