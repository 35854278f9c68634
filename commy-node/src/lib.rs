//! The Node.js binding of Commy: the native addon of the npm package
//! `@commy/node`.
//!
//! This crate is the native layer only; applications use the package's
//! Promise API (`index.js`), which drives [`native::NativeMesh`]:
//!
//! ```js
//! const { Mesh } = require('@commy/node')
//! const mesh = await Mesh.open()
//! await mesh.serve('echo', async (req) => req)
//! const reply = await mesh.call('echo', Buffer.from('hi'), { timeoutMs: 1000 })
//! await mesh.close()
//! ```
//!
//! How answers reach JavaScript without blocking its thread is described in
//! [`bridge`].
// `deny`, not `forbid`: napi-derive's generated module registration carries
// an allow of the lint, which `forbid` would reject; no code written here
// needs the allowance.
#![deny(unsafe_code)]

mod bridge;
mod driven;
mod native;
mod slab;

/// The addon's allocator. Its buffers are made on the mesh's threads and
/// freed on the JS thread (and the other way round); glibc's per-thread
/// caches do not help such hand-offs and every allocation then takes the
/// arena's slow path, mimalloc's per-page free lists do.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
