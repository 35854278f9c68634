//! The one error type bindings see: a stable status code and a message.
//!
//! Every failure crossing into a binding is an [`FfiError`]: its
//! [`code_name`](FfiError::code_name) (`"NOT_FOUND"`, `"UNAVAILABLE"`, ...)
//! is what the Python exception class or the Node error's `code` is chosen
//! by, and never changes for a given failure kind.
//!
//! ```
//! use commy_ffi::FfiError;
//! use commy_mesh::{Code, Status};
//!
//! let e = FfiError::from(Status::not_found("no instance of service 'billing'"));
//! assert_eq!(e.code(), Code::NotFound);
//! assert_eq!(e.code_name(), "NOT_FOUND");
//! assert_eq!(e.message(), "no instance of service 'billing'");
//! assert_eq!(e.to_string(), "NOT_FOUND: no instance of service 'billing'");
//!
//! // A binding turns an exception it caught back into a status by name.
//! let back = FfiError::from_code_name("PERMISSION_DENIED", "not yours");
//! assert_eq!(back.code(), Code::PermissionDenied);
//! // Unknown names (and "OK", which is not an error) become INTERNAL.
//! assert_eq!(FfiError::from_code_name("WHATEVER", "x").code(), Code::Internal);
//! ```

use commy_mesh::{Code, Status};

/// A failure as bindings see it: a stable [`Code`] and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct FfiError {
    code: Code,
    message: String,
}

impl FfiError {
    /// An error with `code` and `message`. `Code::Ok` is not an error and
    /// becomes `INTERNAL`.
    pub fn new(code: Code, message: impl Into<String>) -> FfiError {
        let message = message.into();
        if code == Code::Ok {
            return FfiError {
                code: Code::Internal,
                message: format!("an error was raised with code OK: {message}"),
            };
        }
        FfiError { code, message }
    }

    /// An error whose code is given by its stable name (`"NOT_FOUND"`);
    /// an unknown name gives `INTERNAL`, naming what was given.
    pub fn from_code_name(name: &str, message: impl Into<String>) -> FfiError {
        match name.parse::<Code>() {
            Ok(code) => FfiError::new(code, message),
            Err(_) => FfiError {
                code: Code::Internal,
                message: format!("unknown status code {name:?}: {}", message.into()),
            },
        }
    }

    /// `INVALID_ARGUMENT` with `message`.
    pub fn invalid_argument(message: impl Into<String>) -> FfiError {
        FfiError::new(Code::InvalidArgument, message)
    }

    /// `INTERNAL` with `message`.
    pub fn internal(message: impl Into<String>) -> FfiError {
        FfiError::new(Code::Internal, message)
    }

    /// `CANCELLED` with `message`.
    pub fn cancelled(message: impl Into<String>) -> FfiError {
        FfiError::new(Code::Cancelled, message)
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The code's stable SCREAMING_SNAKE_CASE name, e.g. `"NOT_FOUND"`.
    pub fn code_name(&self) -> &'static str {
        self.code.as_str()
    }

    /// The message (without the code).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error as a [`Status`] (to answer a call with).
    pub fn to_status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

impl From<Status> for FfiError {
    fn from(s: Status) -> FfiError {
        FfiError::new(s.code(), s.message().to_owned())
    }
}

impl From<FfiError> for Status {
    fn from(e: FfiError) -> Status {
        Status::new(e.code, e.message)
    }
}

/// Every status code name a binding must map to an exception class, in
/// numeric order (`OK` excluded: it is never an error).
pub fn error_code_names() -> Vec<&'static str> {
    Code::ALL
        .iter()
        .filter(|c| **c != Code::Ok)
        .map(|c| c.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name() {
        for name in error_code_names() {
            let e = FfiError::from_code_name(name, "m");
            assert_eq!(e.code_name(), name);
            assert_eq!(e.message(), "m");
            assert_eq!(Status::from(e.clone()).code(), e.code());
        }
        assert!(!error_code_names().contains(&"OK"));
    }

    #[test]
    fn ok_is_not_an_error() {
        let e = FfiError::new(Code::Ok, "fine");
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().contains("code OK"), "{}", e.message());
        assert_eq!(FfiError::from_code_name("OK", "x").code(), Code::Internal);
    }
}
