//! Subscriptions as bindings hold them: `next` from any thread, `close`
//! from any other.
//!
//! ```
//! use bytes::Bytes;
//! use commy_ffi::{FfiMesh, MeshOptions, block_on};
//!
//! # let dir = std::env::temp_dir().join(format!("commy-ffi-sub-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
//! # let mut options = MeshOptions::default();
//! # options.settings.set("runtime_dir", dir.to_str().unwrap());
//! let mesh = FfiMesh::open(options)?;
//! let sub = mesh.subscribe("prices/eur", None)?;
//! let ok = || Ok::<(), ()>(());
//! // Publish until the subscription is visible to this publisher.
//! while block_on(mesh.publish("prices/eur", Bytes::from_static(b"1.08")), ok).unwrap()? == 0 {
//!     std::thread::sleep(std::time::Duration::from_millis(1));
//! }
//! let msg = block_on(sub.next(), ok).unwrap().expect("a message");
//! assert_eq!((msg.topic(), &msg.payload()[..]), ("prices/eur", &b"1.08"[..]));
//!
//! // Closing ends a waiting `next` (here: the next one) with `None`.
//! sub.close();
//! assert!(block_on(sub.next(), ok).unwrap().is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use commy_mesh::{Subscription, SubscriptionHealth};

use crate::FfiError;
use tokio::sync::watch;

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct FfiMessage {
    topic: String,
    payload: Bytes,
}

impl FfiMessage {
    /// The topic it was published on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the body.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
}

struct Inner {
    topic: String,
    group: Option<String>,
    health: SubscriptionHealth,
    sub: tokio::sync::Mutex<Option<Subscription>>,
    closed: watch::Sender<bool>,
}

/// A subscription; clones share it. It ends on [`close`](FfiSubscription::close)
/// (or when the last clone is dropped).
#[derive(Clone)]
pub struct FfiSubscription {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FfiSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FfiSubscription")
            .field("topic", &self.inner.topic)
            .field("group", &self.inner.group)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl FfiSubscription {
    pub(crate) fn new(sub: Subscription) -> FfiSubscription {
        FfiSubscription {
            inner: Arc::new(Inner {
                topic: sub.topic().to_string(),
                group: sub.group().map(str::to_owned),
                health: sub.health(),
                sub: tokio::sync::Mutex::new(Some(sub)),
                closed: watch::Sender::new(false),
            }),
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The queue group, if any.
    pub fn group(&self) -> Option<&str> {
        self.inner.group.as_deref()
    }

    /// Messages this subscriber dropped because it fell behind (see
    /// [`Subscription::dropped`]).
    pub fn dropped(&self) -> u64 {
        self.inner.health.dropped()
    }

    /// Why the mesh ended the subscription, if it did (see
    /// [`Subscription::end_reason`]).
    pub fn end_reason(&self) -> Option<FfiError> {
        self.inner.health.end_reason().map(FfiError::from)
    }

    /// Whether [`close`](FfiSubscription::close) was called.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// The next message; `None` once the subscription is closed (also when
    /// `close` is called while this waits) or ended by the mesh. Calls from
    /// several threads at once take turns.
    pub fn next(&self) -> impl Future<Output = Option<FfiMessage>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let mut closed = inner.closed.subscribe();
            let mut guard = tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => return None,
                g = inner.sub.lock() => g,
            };
            let sub = guard.as_mut()?;
            let got = tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => None,
                m = sub.next() => m,
            };
            match got {
                Some(m) => Some(FfiMessage {
                    topic: inner.topic.clone(),
                    payload: m.into_payload(),
                }),
                None => {
                    // Closed, or ended by the mesh: let go of it now.
                    guard.take();
                    None
                }
            }
        }
    }

    /// The next message and up to `max - 1` more that have come (see
    /// [`Subscription::next_batch`]), each copied once; empty once the
    /// subscription is closed or ended. Calls from several threads at once
    /// take turns.
    pub fn next_batch(&self, max: usize) -> impl Future<Output = Vec<FfiMessage>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let mut closed = inner.closed.subscribe();
            let mut guard = tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => return Vec::new(),
                g = inner.sub.lock() => g,
            };
            let Some(sub) = guard.as_mut() else {
                return Vec::new();
            };
            let mut out = Vec::new();
            let topic = &inner.topic;
            let got = tokio::select! {
                biased;
                _ = closed.wait_for(|c| *c) => 0,
                n = sub.next_batch(max, |m| out.push(FfiMessage {
                    topic: topic.clone(),
                    payload: Bytes::copy_from_slice(m.payload()),
                })) => n,
            };
            if got == 0 {
                // Closed, or ended by the mesh: let go of it now.
                guard.take();
            }
            out
        }
    }

    /// A queued message, without waiting: `None` when none is queued, the
    /// subscription is closed, or a `next` is waiting for one (it gets
    /// the message).
    pub fn try_next(&self) -> Option<FfiMessage> {
        if self.is_closed() {
            return None;
        }
        let mut guard = self.inner.sub.try_lock().ok()?;
        let m = guard.as_mut()?.try_next()?;
        Some(FfiMessage {
            topic: self.inner.topic.clone(),
            payload: m.into_payload(),
        })
    }

    /// Ends the subscription: publishers stop seeing it, and every `next`,
    /// waiting or future, returns `None`.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
        // If no `next` holds it, drop it now; else that `next` does.
        if let Ok(mut sub) = self.inner.sub.try_lock() {
            sub.take();
        }
    }
}
