//! The binding-author API: what an SDK for another language's event loop
//! needs beyond [`Mesh`](crate::Mesh)'s async methods, that is, driving a
//! handle's answers ([`answers`]) and its served links ([`driven`]) from
//! its own thread.

pub(crate) mod answers;
pub(crate) mod driven;
