//! Commy's shared-memory transport.
//!
//! This is the only crate of Commy that contains `unsafe` code; every block
//! carries a `// SAFETY:` comment. Everything read from shared memory is
//! treated as untrusted input: a peer that scribbles over a segment turns the
//! link into an error, never into undefined behaviour, a panic or a hang.

mod region;
mod sync;
mod uds;

pub use region::{};
pub use uds::{};
