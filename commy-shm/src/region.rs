//! Named shared-memory regions.
