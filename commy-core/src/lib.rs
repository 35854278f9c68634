//! Commy's vocabulary (work in progress).
#![forbid(unsafe_code)]
