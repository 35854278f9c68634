//! A publisher of one topic ([`Mesh::publisher`]): publishes as
//! [`Mesh::publish`] does, with the topic checked and its subscribers'
//! links found once instead of on every message.

use std::sync::Arc;

use bytes::Bytes;
use commy_core::{Status, TopicName};

use super::Mesh;
use crate::pubsub::{LinkCache, Published, Route};

/// A publisher of one topic, made by [`Mesh::publisher`].
///
/// Each message goes where [`Mesh::publish`] sends it: to every subscriber
/// of the topic and to one member of each queue group, on this host and at
/// TLS peers. The difference is the work per message: the topic's name
/// is checked and its route found once, and the links to the subscribers
/// on this host are kept from one publish to the next (they are found
/// again when a subscriber comes or goes), so publishing to subscribers
/// on this host takes no lock, no lookup and no allocation. The payload
/// is copied into each subscriber's ring straight from the borrowed
/// bytes; only when queue groups or TLS peers may take it is it copied
/// into a buffer of its own first.
///
/// A publisher is used through `&mut self`: each task or thread that
/// publishes keeps its own (a clone starts with the same topic and finds
/// its own links).
///
/// ```
/// # use commy_mesh::Mesh;
/// # async fn f(mesh: &Mesh) -> Result<(), commy_mesh::Status> {
/// let mut temps = mesh.publisher("sensors/temp")?;
/// for reading in [21.5f64, 21.6, 21.4] {
///     temps.publish(reading.to_le_bytes()).await?;
/// }
/// # Ok(()) }
/// ```
pub struct Publisher {
    mesh: Mesh,
    route: Arc<Route>,
    links: LinkCache,
}

impl Publisher {
    pub(super) fn new(mesh: Mesh, route: Arc<Route>) -> Publisher {
        Publisher {
            mesh,
            route,
            links: LinkCache::default(),
        }
    }

    /// The topic it publishes on.
    pub fn topic(&self) -> &TopicName {
        &self.route.topic
    }

    /// Publishes `payload`, as [`Mesh::publish`] does on this publisher's
    /// topic. Returns how many deliveries were made (0 when nobody
    /// listens).
    pub async fn publish(&mut self, payload: impl AsRef<[u8]>) -> Result<usize, Status> {
        self.publish_many(std::slice::from_ref(&payload)).await
    }

    /// Publishes each of `payloads` in order, as [`Mesh::publish_many`]
    /// does on this publisher's topic: to a subscriber on this host they
    /// are written back to back and made visible at once. Returns how many
    /// deliveries were made, summed over the messages.
    pub async fn publish_many<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<usize, Status> {
        self.mesh.check_open()?;
        let inner = &self.mesh.inner;
        let local: Published = inner
            .pubsub
            .publish_via(self.route.clone(), &mut self.links, payloads)
            .await;
        let (groups, beyond) = self.mesh.beyond_this_host();
        if !beyond {
            return Ok(local.delivered);
        }
        // Queue groups and TLS peers take the messages as buffers of their
        // own.
        let owned: Vec<Bytes> = payloads
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_ref()))
            .collect();
        let beyond = Box::pin(self.mesh.publish_beyond(&local, groups, &owned)).await?;
        Ok(local.delivered + beyond)
    }
}

impl Clone for Publisher {
    fn clone(&self) -> Publisher {
        Publisher::new(self.mesh.clone(), self.route.clone())
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.route.topic)
            .finish_non_exhaustive()
    }
}
