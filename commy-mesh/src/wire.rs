//! What both sides of a shared-memory link write: frames into the ring
//! (in place when they fit one record), the metadata section, the frame
//! limits checked before sending, and how a failed send reads to a caller.

use std::time::{Duration, Instant};

use commy_core::{FrameHeader, HostId, InstanceId, Limits, Metadata, ServiceName, Status};
use commy_shm::link::{LinkSender, SendError};

/// How long a send may wait for ring space before the call fails with
/// `ResourceExhausted` (the peer is not draining its ring).
const SEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Frames up to this many bytes are assembled on the stack and copied into
/// the ring in one go.
const SMALL_FRAME: usize = 256;

/// Encodes `header` + `metadata` + `payload` as one message on the link:
/// in place in the ring when it fits one record, else through the
/// fragmenting copy path.
pub(crate) fn send_frame(
    tx: &mut LinkSender,
    header: FrameHeader,
    metadata: &[u8],
    payload: &[u8],
    patience: Patience,
) -> Result<(), SendError> {
    write_frame(tx, header, metadata, payload, patience, true)
}

/// As [`send_frame`], but a frame that fits one record is only staged:
/// the receiver sees it with the sender's next flush, commit, or full
/// ring (so that a batch of frames costs one publication).
pub(crate) fn stage_frame(
    tx: &mut LinkSender,
    header: FrameHeader,
    metadata: &[u8],
    payload: &[u8],
    patience: Patience,
) -> Result<(), SendError> {
    write_frame(tx, header, metadata, payload, patience, false)
}

/// Writes a frame in place, committed or (`commit` false) staged.
fn write_frame(
    tx: &mut LinkSender,
    header: FrameHeader,
    metadata: &[u8],
    payload: &[u8],
    patience: Patience,
    commit: bool,
) -> Result<(), SendError> {
    let header = header.with_sections(metadata.len() as u32, payload.len() as u32);
    let total = commy_core::HEADER_LEN + metadata.len() + payload.len();
    if total <= tx.max_record() {
        let loan = match patience {
            Patience::Until(d) => tx.loan(total, Some(d))?,
            // The clock is only read if the ring is full.
            Patience::For(t) => tx.loan_for(total, t)?,
        };
        if total <= SMALL_FRAME {
            let mut buf = [0u8; SMALL_FRAME];
            buf[..commy_core::HEADER_LEN].copy_from_slice(&header.encode());
            let md_end = commy_core::HEADER_LEN + metadata.len();
            buf[commy_core::HEADER_LEN..md_end].copy_from_slice(metadata);
            buf[md_end..total].copy_from_slice(payload);
            let filled = loan.fill(&buf[..total]);
            if commit {
                filled.commit()
            } else {
                filled.stage()
            }
        } else {
            let filled = loan.fill_parts(&[&header.encode(), metadata, payload]);
            if commit {
                filled.commit()
            } else {
                filled.stage()
            }
        }
        Ok(())
    } else {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&header.encode());
        v.extend_from_slice(metadata);
        v.extend_from_slice(payload);
        let deadline = match patience {
            Patience::Until(d) => d,
            Patience::For(t) => Instant::now().checked_add(t).unwrap_or_else(far_future),
        };
        tx.send_deadline(&v, Some(deadline))
    }
}

/// A moment no wait reaches (for timeouts too large to add to the clock).
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// How long a send may wait for ring space.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Patience {
    /// Until this moment.
    Until(Instant),
    /// This long from when the ring is found full.
    For(Duration),
}

impl Patience {
    /// The default for sends that have no deadline of their own.
    pub(crate) const DEFAULT: Patience = Patience::For(SEND_PATIENCE);
}

/// Maps a link send failure to the caller's status.
pub(crate) fn send_status(e: SendError) -> Status {
    match e {
        SendError::TooLarge { len, max } => Status::resource_exhausted(format!(
            "message of {len} bytes exceeds the peer's limit of {max} bytes"
        )),
        SendError::TimedOut => {
            Status::resource_exhausted("the peer is not draining its queue (ring full)")
        }
        SendError::Ring(e) => Status::unavailable(format!("link lost: {e}")),
        other => Status::unavailable(format!("link error: {other}")),
    }
}

/// The metadata section of a frame: empty when there is no metadata, so
/// the common case costs nothing to encode or decode.
pub(crate) fn encode_metadata(metadata: &Metadata) -> Vec<u8> {
    if metadata.is_empty() {
        Vec::new()
    } else {
        metadata.encode()
    }
}

/// Reads a frame's metadata section (see [`encode_metadata`]).
pub(crate) fn decode_metadata(
    bytes: &[u8],
    limits: &Limits,
) -> Result<Metadata, commy_core::MetadataError> {
    if bytes.is_empty() {
        Ok(Metadata::default())
    } else {
        Metadata::decode(bytes, limits)
    }
}

// ---------------------------------------------------------------------------
// The TLS transport's reserved services and headers (docs/PROTOCOL.md)
// ---------------------------------------------------------------------------

/// The metadata header naming a request's service on the TLS transport.
pub const SERVICE_HEADER: &str = "commy-service";

/// The control service listing a process's instances.
pub const INSTANCES_SERVICE: &str = "commy.instances";

/// The reserved service that takes published messages for this process's
/// subscriptions (a OneWay with the topic and its subscriber-set key in
/// the headers `commy-topic` and `commy-topic-key`).
pub const PUBLISH_SERVICE: &str = "commy.publish";

/// The reserved service a client subscribes through on its own
/// connection: the server accepts with a Response that keeps the stream
/// open, then pushes the topic's messages on it (docs/PROTOCOL.md 10.2).
pub(crate) const SUBSCRIBE_SERVICE: &str = "commy.subscribe";

/// Subscribe headers: the queue group to join, the subscription's id
/// (32 hex digits), its queue length and its slow-subscriber policy.
pub(crate) const GROUP_HEADER: &str = "commy-group";
pub(crate) const SUBSCRIBER_HEADER: &str = "commy-subscriber";
pub(crate) const QUEUE_HEADER: &str = "commy-queue";
pub(crate) const POLICY_HEADER: &str = "commy-policy";

/// The header naming the subscriber set (topic key or queue-group key) a
/// message published over TLS is for.
pub(crate) const TOPIC_KEY_HEADER: &str = "commy-topic-key";

/// How long a listing request waits for a change before answering anyway.
pub(crate) const LONG_POLL: Duration = Duration::from_secs(20);

/// A process's instances, as its `commy.instances` control service lists them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Listing {
    pub(crate) version: u64,
    pub(crate) host: HostId,
    pub(crate) pid: u32,
    pub(crate) instances: Vec<(ServiceName, InstanceId)>,
    /// Subscriptions: (subscriber-set key, subscription id).
    pub(crate) subscriptions: Vec<(ServiceName, InstanceId)>,
}

/// The metadata header that carries the topic of a published message.
pub(crate) const TOPIC_HEADER: &str = "commy-topic";

#[cfg(test)]
mod tests {
    use super::*;
    use commy_core::{HostId, InstanceId, ServiceName};

    /// A listing encodes as docs/PROTOCOL.md section 10.2 says: varint
    /// integers, strings with a varint length, ids as 16 raw bytes (most
    /// significant first).
    #[test]
    fn a_listing_is_encoded_as_the_protocol_doc_says() {
        let id = InstanceId::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let listing = Listing {
            version: 300,
            host: HostId::new("h").unwrap(),
            pid: 7,
            instances: vec![(ServiceName::new("echo").unwrap(), id)],
            subscriptions: Vec::new(),
        };
        let mut expected = vec![0xac, 0x02, 0x01, b'h', 0x07, 0x01, 0x04];
        expected.extend_from_slice(b"echo");
        expected.extend(1..=16u8);
        expected.push(0x00);
        assert_eq!(postcard::to_allocvec(&listing).unwrap(), expected);
        // The request's payload: a u64 varint; "none known" is u64::MAX.
        assert_eq!(
            postcard::to_allocvec(&u64::MAX).unwrap(),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }
}
