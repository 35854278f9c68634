//! Commy's network link: TLS 1.3 connections that carry commy-core frames
//! (the same bytes as on shared memory), for instances on other hosts.
//!
//! - [`tls`]: rustls with the `ring` provider, TLS 1.3 only, ALPN
//!   `commy/1`; servers are always verified; a per-user dev CA is created on
//!   first use when no CA is configured ([`DevCa`]); PEM files for
//!   production ([`Credentials::from_pem_files`]); optional or required
//!   client certificates (mTLS) with SPIFFE identities ([`Identity`]).
//! - [`Server`]: one listener, many connections, many streams per
//!   connection, each handed to a [`Handler`]; stream credit, keepalive,
//!   idle and handshake timeouts, GOAWAY drain; bad peers are refused or
//!   closed with a log line and a counter ([`ServerStats`]); a handler may
//!   keep its stream open and push messages on it ([`Reply::streaming`]).
//! - [`Client`]: one connection per server, shared by all callers and
//!   multiplexed by stream id; waits for credit instead of buffering;
//!   deadlines, cancellation by drop, reconnect with full-jitter
//!   exponential backoff; streams the server pushes on
//!   ([`Client::subscribe`], [`Pushes`]).
//! - Both ends send a message larger than a frame in fragments and join
//!   what they receive (`commy_core::fragment`), up to `max_message`.
//! - [`mux`]: the protocol state machines (credit window, stream ids,
//!   backoff) as plain structs with no I/O.
//!
//! The wire format is `docs/PROTOCOL.md` (frames) plus its TLS section.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use commy_net::{Client, DevCa, Handler, Identity, Inbound, LeafSpec, Reply, Server, Settings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("commy-net-lib-doc-{}", std::process::id()));
//! let ca = DevCa::load_or_create(&dir)?;
//! let server_creds = ca.credentials(&LeafSpec::for_this_host(Identity::new("demo", "upper")?, &[]))?;
//! let upper: Handler = Arc::new(|req: Inbound| {
//!     Box::pin(async move { Ok(Reply::new(req.payload.to_ascii_uppercase())) })
//! });
//! let server = Server::bind("127.0.0.1:0".parse()?, server_creds.server_config(false)?, Settings::default(), upper).await?;
//!
//! let client = Client::new("localhost", server.local_addr().port(), server_creds.client_config()?, Settings::default())?;
//! let reply = client.call(Bytes::new(), Bytes::from_static(b"hello"), None).await?;
//! assert_eq!(&reply.payload[..], b"HELLO");
//! assert_eq!(client.server_identity().map(|i| i.to_string()).as_deref(), Some("spiffe://demo/upper"));
//! server.shutdown().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
// Atomics here are independent counters and flags, nothing loom would check
// (the workspace routes lock-free algorithms through commy-shm's `sync`).
#![allow(clippy::disallowed_types)]

mod client;
mod link;
pub mod mux;
mod server;
mod stats;
pub mod tls;

pub use client::{CallFailure, Client, ClientError, Pushes};
pub use link::{PUSH_CREDIT, Settings};
pub use server::{BindError, Handler, HandlerFuture, Inbound, Peer, Pusher, Reply, Server};
pub use stats::{Reason, ServerStats};
pub use tls::{Credentials, DevCa, Identity, LeafSpec, TlsError};
