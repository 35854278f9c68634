//! The status taxonomy: [`Code`] and [`Status`].
//!
//! Every failure that crosses a process boundary (an `Error` frame, a binding
//! exception, a CLI exit) is a [`Status`]: a stable [`Code`] plus a human
//! readable message. Code numbers follow gRPC's, so operators and tools that
//! know gRPC read them the same way; numbers gRPC uses for codes Commy does not
//! have (2, 11, 12, 15) are reserved.
//!
//! ```
//! use commy_core::{Code, Status};
//!
//! let status = Status::not_found("no instance of service 'billing'");
//! assert_eq!(status.code(), Code::NotFound);
//! assert_eq!(status.to_string(), "NOT_FOUND: no instance of service 'billing'");
//!
//! // The wire form carried in Error frames (postcard).
//! let bytes = status.encode();
//! assert_eq!(Status::decode(&bytes)?, status);
//!
//! assert_eq!("DEADLINE_EXCEEDED".parse::<Code>()?, Code::DeadlineExceeded);
//! assert_eq!(Code::try_from(14u16)?, Code::Unavailable);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::wire;

/// A stable status code.
///
/// The numeric value (`code as u16`) is part of the wire protocol and never
/// changes; new codes may only be added together with a protocol version bump
/// (see `docs/PROTOCOL.md`). The values match gRPC's status codes.
///
/// | value | code | name |
/// |------:|------|------|
/// | 0 | [`Ok`](Code::Ok) | `OK` |
/// | 1 | [`Cancelled`](Code::Cancelled) | `CANCELLED` |
/// | 3 | [`InvalidArgument`](Code::InvalidArgument) | `INVALID_ARGUMENT` |
/// | 4 | [`DeadlineExceeded`](Code::DeadlineExceeded) | `DEADLINE_EXCEEDED` |
/// | 5 | [`NotFound`](Code::NotFound) | `NOT_FOUND` |
/// | 6 | [`AlreadyExists`](Code::AlreadyExists) | `ALREADY_EXISTS` |
/// | 7 | [`PermissionDenied`](Code::PermissionDenied) | `PERMISSION_DENIED` |
/// | 8 | [`ResourceExhausted`](Code::ResourceExhausted) | `RESOURCE_EXHAUSTED` |
/// | 9 | [`FailedPrecondition`](Code::FailedPrecondition) | `FAILED_PRECONDITION` |
/// | 10 | [`Aborted`](Code::Aborted) | `ABORTED` |
/// | 13 | [`Internal`](Code::Internal) | `INTERNAL` |
/// | 14 | [`Unavailable`](Code::Unavailable) | `UNAVAILABLE` |
/// | 16 | [`Unauthenticated`](Code::Unauthenticated) | `UNAUTHENTICATED` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
#[repr(u16)]
#[non_exhaustive]
pub enum Code {
    /// Not an error; returned on success.
    Ok = 0,
    /// The operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// The caller specified an invalid argument (independent of system state).
    InvalidArgument = 3,
    /// The deadline expired before the operation could complete.
    DeadlineExceeded = 4,
    /// The requested entity (service, instance, topic, region) was not found.
    NotFound = 5,
    /// The entity the caller tried to create already exists.
    AlreadyExists = 6,
    /// The caller is authenticated but not allowed to do this.
    PermissionDenied = 7,
    /// A resource (credit, quota, memory, ring space, rate limit) is exhausted.
    ResourceExhausted = 8,
    /// The system is not in a state required for the operation.
    FailedPrecondition = 9,
    /// The operation was aborted, typically by a concurrency conflict.
    Aborted = 10,
    /// An invariant the system relies on was broken. A bug.
    Internal = 13,
    /// The service is currently unavailable; retrying may succeed.
    Unavailable = 14,
    /// The request lacks valid authentication credentials.
    Unauthenticated = 16,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 13] = [
        Code::Ok,
        Code::Cancelled,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::Internal,
        Code::Unavailable,
        Code::Unauthenticated,
    ];

    /// The stable numeric value of this code.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The stable SCREAMING_SNAKE_CASE name of this code, e.g. `"NOT_FOUND"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Code> for u16 {
    fn from(code: Code) -> u16 {
        code.as_u16()
    }
}

impl TryFrom<u16> for Code {
    type Error = CodeError;

    /// Maps a wire value back to a code; values outside the table are rejected.
    fn try_from(value: u16) -> Result<Code, CodeError> {
        Code::ALL
            .into_iter()
            .find(|c| c.as_u16() == value)
            .ok_or(CodeError::UnknownValue { value })
    }
}

impl FromStr for Code {
    type Err = CodeError;

    /// Parses the exact SCREAMING_SNAKE_CASE name, e.g. `"NOT_FOUND"`.
    fn from_str(s: &str) -> Result<Code, CodeError> {
        Code::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| CodeError::UnknownName {
                name: s.chars().take(64).collect(),
            })
    }
}

/// Error converting a number or a name into a [`Code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// The number is not a status code of this protocol version.
    #[error(
        "unknown status code value {value} (known: 0, 1, 3-10, 13, 14, 16; 2, 11, 12, 15 are reserved)"
    )]
    UnknownValue {
        /// The rejected value.
        value: u16,
    },
    /// The name is not a status code name (names are SCREAMING_SNAKE_CASE).
    #[error("unknown status code name {name:?} (expected one like \"NOT_FOUND\")")]
    UnknownName {
        /// The rejected name (at most its first 64 characters).
        name: String,
    },
}

/// An error outcome: a [`Code`] and a message for humans.
///
/// Displayed as `CODE: message` (or just `CODE` when the message is empty).
/// On the wire (the payload of an `Error` frame) it is postcard-encoded as the
/// code's varint followed by the message as a varint length and UTF-8 bytes;
/// see [`Status::encode`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Status {
    code: Code,
    message: String,
}

macro_rules! status_constructors {
    ($($(#[$doc:meta])* $fn:ident => $code:ident,)*) => {
        $(
            $(#[$doc])*
            pub fn $fn(message: impl Into<String>) -> Status {
                Status::new(Code::$code, message)
            }
        )*
    };
}

impl Status {
    /// Creates a status with the given code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    status_constructors! {
        /// A [`Code::Cancelled`] status.
        cancelled => Cancelled,
        /// A [`Code::InvalidArgument`] status.
        invalid_argument => InvalidArgument,
        /// A [`Code::DeadlineExceeded`] status.
        deadline_exceeded => DeadlineExceeded,
        /// A [`Code::NotFound`] status.
        not_found => NotFound,
        /// A [`Code::AlreadyExists`] status.
        already_exists => AlreadyExists,
        /// A [`Code::PermissionDenied`] status.
        permission_denied => PermissionDenied,
        /// A [`Code::ResourceExhausted`] status.
        resource_exhausted => ResourceExhausted,
        /// A [`Code::FailedPrecondition`] status.
        failed_precondition => FailedPrecondition,
        /// A [`Code::Aborted`] status.
        aborted => Aborted,
        /// A [`Code::Internal`] status.
        internal => Internal,
        /// A [`Code::Unavailable`] status.
        unavailable => Unavailable,
        /// A [`Code::Unauthenticated`] status.
        unauthenticated => Unauthenticated,
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The human-readable message (may be empty).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Exact number of bytes [`Status::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        wire::varint_len(u64::from(self.code.as_u16())) + wire::bytes_len(self.message.len())
    }

    /// Encodes the status in postcard form: varint code, varint message
    /// length, message bytes. This is the payload of an `Error` frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the postcard form of the status to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        wire::put_varint(out, u64::from(self.code.as_u16()));
        wire::put_bytes(out, self.message.as_bytes());
    }

    /// Decodes a status from exactly `bytes` (an `Error` frame payload).
    ///
    /// Allocates at most `bytes.len()` bytes (for the message).
    pub fn decode(bytes: &[u8]) -> Result<Status, StatusDecodeError> {
        let (status, rest) = postcard::take_from_bytes::<Status>(bytes)
            .map_err(|source| StatusDecodeError::Malformed { source })?;
        if !rest.is_empty() {
            return Err(StatusDecodeError::TrailingBytes { count: rest.len() });
        }
        Ok(status)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}

/// Error decoding a [`Status`] from its wire form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatusDecodeError {
    /// The bytes are not a postcard-encoded status (truncated, bad UTF-8, or an
    /// unknown code value).
    #[error("malformed status payload: {source}")]
    Malformed {
        /// postcard's description of the problem.
        source: postcard::Error,
    },
    /// A valid status was followed by extra bytes.
    #[error("status payload has {count} trailing byte(s) after the encoded status")]
    TrailingBytes {
        /// Number of unexpected bytes.
        count: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for code in Code::ALL {
            assert_eq!(code.as_str().parse::<Code>().unwrap(), code);
            assert_eq!(Code::try_from(code.as_u16()).unwrap(), code);
            assert_eq!(code.to_string(), code.as_str());
        }
    }

    #[test]
    fn numbers_are_stable() {
        let expected: [(Code, u16, &str); 13] = [
            (Code::Ok, 0, "OK"),
            (Code::Cancelled, 1, "CANCELLED"),
            (Code::InvalidArgument, 3, "INVALID_ARGUMENT"),
            (Code::DeadlineExceeded, 4, "DEADLINE_EXCEEDED"),
            (Code::NotFound, 5, "NOT_FOUND"),
            (Code::AlreadyExists, 6, "ALREADY_EXISTS"),
            (Code::PermissionDenied, 7, "PERMISSION_DENIED"),
            (Code::ResourceExhausted, 8, "RESOURCE_EXHAUSTED"),
            (Code::FailedPrecondition, 9, "FAILED_PRECONDITION"),
            (Code::Aborted, 10, "ABORTED"),
            (Code::Internal, 13, "INTERNAL"),
            (Code::Unavailable, 14, "UNAVAILABLE"),
            (Code::Unauthenticated, 16, "UNAUTHENTICATED"),
        ];
        for (code, value, name) in expected {
            assert_eq!(code as u16, value);
            assert_eq!(code.as_str(), name);
        }
    }

    #[test]
    fn unknown_numbers_and_names_are_rejected() {
        for value in [2u16, 11, 12, 15, 17, u16::MAX] {
            let err = Code::try_from(value).unwrap_err();
            assert_eq!(err, CodeError::UnknownValue { value });
            assert!(err.to_string().contains(&value.to_string()));
        }
        let err = "not_found".parse::<Code>().unwrap_err();
        assert_eq!(
            err,
            CodeError::UnknownName {
                name: "not_found".into()
            }
        );
    }

    #[test]
    fn display() {
        assert_eq!(
            Status::not_found("no instance of service 'x'").to_string(),
            "NOT_FOUND: no instance of service 'x'"
        );
        assert_eq!(Status::new(Code::Aborted, "").to_string(), "ABORTED");
    }

    #[test]
    fn constructors_set_their_code() {
        let cases = [
            (Status::cancelled("m"), Code::Cancelled),
            (Status::invalid_argument("m"), Code::InvalidArgument),
            (Status::deadline_exceeded("m"), Code::DeadlineExceeded),
            (Status::not_found("m"), Code::NotFound),
            (Status::already_exists("m"), Code::AlreadyExists),
            (Status::permission_denied("m"), Code::PermissionDenied),
            (Status::resource_exhausted("m"), Code::ResourceExhausted),
            (Status::failed_precondition("m"), Code::FailedPrecondition),
            (Status::aborted("m"), Code::Aborted),
            (Status::internal("m"), Code::Internal),
            (Status::unavailable("m"), Code::Unavailable),
            (Status::unauthenticated("m"), Code::Unauthenticated),
        ];
        for (status, code) in cases {
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "m");
        }
    }

    #[test]
    fn encode_matches_postcard_and_decodes() {
        for code in Code::ALL {
            let status = Status::new(code, "é".repeat(100));
            let bytes = status.encode();
            assert_eq!(bytes, postcard::to_allocvec(&status).unwrap());
            assert_eq!(bytes.len(), status.encoded_len());
            assert_eq!(Status::decode(&bytes).unwrap(), status);
        }
    }

    #[test]
    fn status_wire_bytes_are_documented() {
        // docs/PROTOCOL.md, "Error payload".
        let bytes = Status::not_found("no instance").encode();
        assert_eq!(
            bytes,
            [
                0x05, 0x0b, b'n', b'o', b' ', b'i', b'n', b's', b't', b'a', b'n', b'c', b'e'
            ]
        );
    }

    #[test]
    fn decode_rejects_bad_payloads() {
        // Unknown code 2.
        assert!(matches!(
            Status::decode(&[0x02, 0x00]),
            Err(StatusDecodeError::Malformed { .. })
        ));
        // Declared message length larger than the payload.
        assert!(matches!(
            Status::decode(&[0x05, 0x7f, b'a']),
            Err(StatusDecodeError::Malformed { .. })
        ));
        // Invalid UTF-8.
        assert!(matches!(
            Status::decode(&[0x05, 0x01, 0xff]),
            Err(StatusDecodeError::Malformed { .. })
        ));
        assert_eq!(
            Status::decode(&[0x05, 0x00, 0x00]),
            Err(StatusDecodeError::TrailingBytes { count: 1 })
        );
    }
}
