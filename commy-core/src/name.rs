//! Validated names: [`MeshName`], [`ServiceName`], [`TopicName`] and [`HostId`].
//!
//! Names end up in socket paths (`<runtime-dir>/<mesh>/<service>/<id>.sock`),
//! SPIFFE ids (`spiffe://<mesh>/<service>`), DNS SRV labels and metric labels,
//! so they are deliberately narrow:
//!
//! - 1 to 255 bytes ([`MAX_NAME_LEN`]);
//! - only ASCII letters, digits, `.`, `_` and `-`;
//! - the first character is an ASCII letter or digit (so no name is `.`,
//!   `..`, a hidden file, or looks like a command-line flag);
//! - topics are one or more such names (segments) joined by `/`, with no
//!   empty segment (no leading, trailing or doubled `/`).
//!
//! Names are case-sensitive. Cloning a name is cheap (reference counted).
//!
//! ```
//! use commy_core::{MeshName, NameError, ServiceName, TopicName};
//!
//! let service: ServiceName = "billing-v2".parse()?;
//! assert_eq!(service.as_str(), "billing-v2");
//! assert_eq!(MeshName::default(), "default");
//!
//! let topic = TopicName::new("sensors/room-1/temp")?;
//! assert_eq!(topic.segments().collect::<Vec<_>>(), ["sensors", "room-1", "temp"]);
//!
//! let err = ServiceName::new("bill ing").unwrap_err();
//! assert!(matches!(err, NameError::InvalidChar { ch: ' ', index: 4, .. }));
//! assert_eq!(
//!     err.to_string(),
//!     "invalid character ' ' at byte 4 of service name \"bill ing\" \
//!      (allowed: ASCII letters, digits, '.', '_', '-')"
//! );
//! # Ok::<(), NameError>(())
//! ```

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Maximum length of any name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The mesh name used when none is configured.
pub const DEFAULT_MESH: &str = "default";

/// Error validating a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is the empty string.
    #[error("{kind} is empty")]
    Empty {
        /// What was being parsed, e.g. `"service name"`.
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{kind} is {len} bytes long, the maximum is {max}")]
    TooLong {
        /// What was being parsed.
        kind: &'static str,
        /// Length of the rejected name in bytes.
        len: usize,
        /// The maximum ([`MAX_NAME_LEN`]).
        max: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "invalid character {ch:?} at byte {index} of {kind} {name:?} \
         (allowed: ASCII letters, digits, '.', '_', '-'{slash})",
        slash = if *kind == TOPIC { ", and '/' between segments" } else { "" }
    )]
    InvalidChar {
        /// What was being parsed.
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset in `name`.
        index: usize,
    },
    /// The name (or a topic segment) starts with `.`, `_` or `-`.
    #[error(
        "{kind} {name:?} has {ch:?} at byte {index}, where a name or segment must start \
         with an ASCII letter or digit"
    )]
    InvalidStart {
        /// What was being parsed.
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// The offending first character.
        ch: char,
        /// Its byte offset in `name`.
        index: usize,
    },
    /// A topic has an empty segment (leading, trailing or doubled `/`).
    #[error(
        "topic name {name:?} has an empty segment at byte {index} (leading, trailing or doubled '/')"
    )]
    EmptySegment {
        /// The rejected topic name.
        name: String,
        /// Byte offset where the empty segment starts.
        index: usize,
    },
}

const MESH: &str = "mesh name";
const SERVICE: &str = "service name";
const TOPIC: &str = "topic name";
const HOST: &str = "host id";

fn check_length(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    Ok(())
}

/// Validates one segment (a whole name, or one topic segment) that starts at
/// byte `offset` of `full`.
fn check_segment(
    kind: &'static str,
    full: &str,
    offset: usize,
    segment: &str,
) -> Result<(), NameError> {
    let mut chars = segment.char_indices();
    match chars.next() {
        None => {
            return Err(NameError::EmptySegment {
                name: full.to_owned(),
                index: offset,
            });
        }
        Some((_, ch)) if ch.is_ascii_alphanumeric() => {}
        Some((i, ch)) if matches!(ch, '.' | '_' | '-') => {
            return Err(NameError::InvalidStart {
                kind,
                name: full.to_owned(),
                ch,
                index: offset + i,
            });
        }
        Some((i, ch)) => {
            return Err(NameError::InvalidChar {
                kind,
                name: full.to_owned(),
                ch,
                index: offset + i,
            });
        }
    }
    for (i, ch) in chars {
        if !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')) {
            return Err(NameError::InvalidChar {
                kind,
                name: full.to_owned(),
                ch,
                index: offset + i,
            });
        }
    }
    Ok(())
}

fn validate_simple(kind: &'static str, name: &str) -> Result<(), NameError> {
    check_length(kind, name)?;
    check_segment(kind, name, 0, name)
}

fn validate_mesh(name: &str) -> Result<(), NameError> {
    validate_simple(MESH, name)
}

fn validate_service(name: &str) -> Result<(), NameError> {
    validate_simple(SERVICE, name)
}

fn validate_host(name: &str) -> Result<(), NameError> {
    validate_simple(HOST, name)
}

fn validate_topic(name: &str) -> Result<(), NameError> {
    check_length(TOPIC, name)?;
    let mut offset = 0;
    for segment in name.split('/') {
        check_segment(TOPIC, name, offset, segment)?;
        offset += segment.len() + 1;
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $validate:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates `name` and wraps it.
            pub fn new(name: &str) -> Result<$ty, NameError> {
                $validate(name)?;
                Ok($ty(Arc::from(name)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), &*self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;

            fn from_str(s: &str) -> Result<$ty, NameError> {
                $ty::new(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = NameError;

            fn try_from(s: &str) -> Result<$ty, NameError> {
                $ty::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;

            fn try_from(s: String) -> Result<$ty, NameError> {
                $validate(&s)?;
                Ok($ty(Arc::from(s)))
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                String::from(&*name.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

name_type! {
    /// The name of a mesh: a group of services that see each other.
    ///
    /// Follows the [module rules](self); [`Default`] is [`DEFAULT_MESH`].
    MeshName, validate_mesh
}

name_type! {
    /// The name of a service, shared by all its instances.
    ///
    /// Follows the [module rules](self).
    ServiceName, validate_service
}

name_type! {
    /// A pub/sub subject: `/`-separated segments, e.g. `sensors/room-1/temp`.
    ///
    /// Each segment follows the [module rules](self); the whole topic is at most
    /// [`MAX_NAME_LEN`] bytes.
    TopicName, validate_topic
}

name_type! {
    /// Identifies a host (one kernel). Peers with the same host id may use
    /// shared memory.
    ///
    /// Only the type lives here; deriving it from `/etc/machine-id` and the
    /// boot id, or from `COMMY_HOST_ID`, is done by the crates that do I/O.
    /// Follows the [module rules](self).
    HostId, validate_host
}

impl Default for MeshName {
    fn default() -> MeshName {
        MeshName(Arc::from(DEFAULT_MESH))
    }
}

impl TopicName {
    /// The `/`-separated segments of the topic, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "a",
            "A9",
            "billing",
            "billing-v2",
            "svc_1.internal",
            "0",
            &"x".repeat(255),
        ] {
            assert_eq!(ServiceName::new(name).unwrap().as_str(), name);
            assert_eq!(MeshName::new(name).unwrap().as_str(), name);
            assert_eq!(HostId::new(name).unwrap().as_str(), name);
            assert_eq!(TopicName::new(name).unwrap().as_str(), name);
        }
        for topic in ["a/b", "sensors/room-1/temp", "x.y/z_1"] {
            assert_eq!(TopicName::new(topic).unwrap().as_str(), topic);
        }
    }

    #[test]
    fn rejects_empty_and_long() {
        assert_eq!(
            ServiceName::new(""),
            Err(NameError::Empty { kind: SERVICE })
        );
        assert_eq!(
            MeshName::new(&"m".repeat(256)),
            Err(NameError::TooLong {
                kind: MESH,
                len: 256,
                max: 255
            })
        );
        assert_eq!(
            TopicName::new(&"a/".repeat(128)),
            Err(NameError::TooLong {
                kind: TOPIC,
                len: 256,
                max: 255
            })
        );
    }

    #[test]
    fn rejects_bad_characters_with_position() {
        let err = ServiceName::new("abc/def").unwrap_err();
        assert_eq!(
            err,
            NameError::InvalidChar {
                kind: SERVICE,
                name: "abc/def".into(),
                ch: '/',
                index: 3
            }
        );
        let err = MeshName::new("caf\u{e9}").unwrap_err();
        assert!(matches!(
            err,
            NameError::InvalidChar {
                ch: '\u{e9}',
                index: 3,
                ..
            }
        ));
        let err = TopicName::new("a/b c").unwrap_err();
        assert!(matches!(
            err,
            NameError::InvalidChar {
                ch: ' ',
                index: 3,
                ..
            }
        ));
        assert!(err.to_string().contains("'/' between segments"), "{err}");
        let err = HostId::new("\0").unwrap_err();
        assert!(matches!(
            err,
            NameError::InvalidChar {
                ch: '\0',
                index: 0,
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_starts() {
        for (name, ch) in [
            (".", '.'),
            ("..", '.'),
            (".hidden", '.'),
            ("-flag", '-'),
            ("_x", '_'),
        ] {
            let err = ServiceName::new(name).unwrap_err();
            assert_eq!(
                err,
                NameError::InvalidStart {
                    kind: SERVICE,
                    name: name.into(),
                    ch,
                    index: 0
                }
            );
        }
        let err = TopicName::new("a/../b").unwrap_err();
        assert!(matches!(
            err,
            NameError::InvalidStart {
                ch: '.',
                index: 2,
                ..
            }
        ));
    }

    #[test]
    fn rejects_empty_topic_segments() {
        for (topic, index) in [("/a", 0), ("a/", 2), ("a//b", 2), ("/", 0)] {
            assert_eq!(
                TopicName::new(topic),
                Err(NameError::EmptySegment {
                    name: topic.into(),
                    index
                }),
                "{topic}"
            );
        }
    }

    #[test]
    fn conversions_and_serde() {
        let name: ServiceName = "billing".parse().unwrap();
        assert_eq!(name, "billing");
        assert_eq!(format!("{name}"), "billing");
        assert_eq!(format!("{name:?}"), "ServiceName(\"billing\")");
        assert_eq!(String::from(name.clone()), "billing");
        assert_eq!(
            ServiceName::try_from(String::from("billing")).unwrap(),
            name
        );

        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"billing\"");
        assert_eq!(serde_json::from_str::<ServiceName>(&json).unwrap(), name);
        let err = serde_json::from_str::<ServiceName>("\"bad name\"").unwrap_err();
        assert!(err.to_string().contains("invalid character ' '"), "{err}");

        let bytes = postcard::to_allocvec(&name).unwrap();
        assert_eq!(postcard::from_bytes::<ServiceName>(&bytes).unwrap(), name);

        let mut set = std::collections::HashSet::new();
        set.insert(name);
        assert!(set.contains("billing"));
    }
}
