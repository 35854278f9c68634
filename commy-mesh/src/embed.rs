//! The binding-author API: what an SDK for another language's event loop
//! needs beyond [`Mesh`](crate::Mesh)'s async methods: driving a handle's
//! answers ([`AnswerDriver`], [`AnswerSink`]) and its served links
//! ([`DrivenLink`], [`PolledRequest`]) from its own thread, and setting up
//! the threads that serve links ([`ThreadHook`]). Applications do not need
//! it; commy-ffi is built on it.

pub(crate) mod answers;
pub(crate) mod driven;

pub use crate::config::{ThreadHook, ThreadWork};
pub use crate::serve::polled::PolledRequest;
pub use answers::{AnswerDriver, AnswerSink};
pub use commy_shm::WaitInterrupter;
pub use driven::{Drive, DrivenLink};
