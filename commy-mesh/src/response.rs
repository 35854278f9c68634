//! A call's answer, as a handler returns it and a caller receives it.

use bytes::Bytes;
use commy_core::Metadata;

/// Metadata kept out of line: most requests and responses carry none, and
/// then this is one word (the struct is 96 bytes, moved with every request
/// and response otherwise).
#[derive(Clone, Default, PartialEq)]
pub(crate) struct SomeMetadata(pub(crate) Option<Box<Metadata>>);

/// What an absent [`SomeMetadata`] reads as.
static NO_METADATA: Metadata = Metadata {
    auth_token: None,
    traceparent: None,
    content_type: None,
    headers: Vec::new(),
};

impl From<Metadata> for SomeMetadata {
    fn from(m: Metadata) -> SomeMetadata {
        SomeMetadata((!m.is_empty()).then(|| Box::new(m)))
    }
}

impl std::ops::Deref for SomeMetadata {
    type Target = Metadata;

    fn deref(&self) -> &Metadata {
        self.0.as_deref().unwrap_or(&NO_METADATA)
    }
}

impl std::fmt::Debug for SomeMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// A handler's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    pub(crate) payload: Bytes,
    pub(crate) metadata: SomeMetadata,
}

impl Response {
    /// A response carrying `payload`.
    pub fn new(payload: impl Into<Bytes>) -> Response {
        Response {
            payload: payload.into(),
            metadata: SomeMetadata::default(),
        }
    }

    /// Attaches metadata (headers) to the response.
    pub fn with_metadata(mut self, metadata: Metadata) -> Response {
        self.metadata = metadata.into();
        self
    }

    /// The response body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The response metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Takes the response body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

impl From<Bytes> for Response {
    fn from(b: Bytes) -> Response {
        Response::new(b)
    }
}

impl From<Vec<u8>> for Response {
    fn from(v: Vec<u8>) -> Response {
        Response::new(v)
    }
}

impl From<&'static [u8]> for Response {
    fn from(s: &'static [u8]) -> Response {
        Response::new(Bytes::from_static(s))
    }
}

impl From<&'static str> for Response {
    fn from(s: &'static str) -> Response {
        Response::new(Bytes::from_static(s.as_bytes()))
    }
}
