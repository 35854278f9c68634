//! Property tests for the codecs and parsers of commy-core.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use commy_core::{
    Code, Deadline, Endpoint, Frame, FrameDecoder, FrameError, FrameFlags, FrameHeader, FrameKind,
    FrameRef, HEADER_LEN, Host, InstanceId, Limits, MeshName, Metadata, ServiceName, Status,
    StreamId, TopicName,
};
use proptest::prelude::*;

const NO_LIMITS: Limits = Limits {
    max_frame: u32::MAX,
    max_metadata: u32::MAX,
    max_message: u32::MAX,
};

fn kind() -> impl Strategy<Value = FrameKind> {
    prop::sample::select(FrameKind::ALL.to_vec())
}

fn flags() -> impl Strategy<Value = FrameFlags> {
    (0u16..=FrameFlags::KNOWN.bits())
        .prop_map(|bits| FrameFlags::from_bits(bits).expect("known bits"))
}

fn stream_id_for(kind: FrameKind) -> BoxedStrategy<StreamId> {
    if kind.requires_stream() {
        (1u64..).prop_map(StreamId).boxed()
    } else {
        any::<u64>().prop_map(StreamId).boxed()
    }
}

/// Every header that the limits-free decoder must accept.
fn valid_header() -> impl Strategy<Value = FrameHeader> {
    kind().prop_flat_map(|kind| {
        let payload_len = if kind == FrameKind::Credit {
            Just(4u32).boxed()
        } else {
            any::<u32>().boxed()
        };
        (
            flags(),
            stream_id_for(kind),
            any::<u64>(),
            any::<u32>(),
            payload_len,
        )
            .prop_map(
                move |(flags, stream_id, deadline_us, metadata_len, payload_len)| {
                    // Keep the whole frame within u32::MAX so `max_frame: u32::MAX` admits it.
                    let max_meta = u32::MAX - HEADER_LEN as u32 - payload_len;
                    FrameHeader {
                        kind,
                        flags,
                        stream_id,
                        deadline_us,
                        metadata_len: metadata_len.min(max_meta),
                        payload_len,
                    }
                },
            )
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    kind().prop_flat_map(|kind| {
        let payload = if kind == FrameKind::Credit {
            prop::collection::vec(any::<u8>(), 4).boxed()
        } else {
            prop::collection::vec(any::<u8>(), 0..300).boxed()
        };
        (
            stream_id_for(kind),
            flags(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..40),
            payload,
        )
            .prop_map(move |(stream_id, flags, deadline_us, metadata, payload)| {
                Frame::new(kind, stream_id, metadata, payload)
                    .expect("valid by construction")
                    .with_flags(flags)
                    .with_deadline_us(deadline_us)
            })
    })
}

/// Splits `len` bytes into chunks whose sizes come from `cuts` (each 1..).
fn chunk_sizes(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut left = len;
    let mut i = 0;
    while left > 0 {
        let size = if cuts.is_empty() {
            left
        } else {
            cuts[i % cuts.len()].min(left)
        };
        sizes.push(size);
        left -= size;
        i += 1;
    }
    sizes
}

fn metadata() -> impl Strategy<Value = Metadata> {
    (
        prop::option::of(any::<String>()),
        prop::option::of("[ -~]{0,60}"),
        prop::option::of("[a-z]{1,12}/[a-z0-9.+-]{1,20}"),
        prop::collection::vec(
            (any::<String>(), prop::collection::vec(any::<u8>(), 0..200)),
            0..8,
        ),
    )
        .prop_map(
            |(auth_token, traceparent, content_type, headers)| Metadata {
                auth_token,
                traceparent,
                content_type,
                headers,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trips(header in valid_header()) {
        let raw = header.encode();
        prop_assert_eq!(raw.len(), HEADER_LEN);
        prop_assert_eq!(FrameHeader::decode(&raw, &NO_LIMITS), Ok(header));
    }

    #[test]
    fn header_decode_is_canonical(raw in prop::array::uniform32(any::<u8>())) {
        // Any accepted header re-encodes to exactly the same bytes.
        if let Ok(header) = FrameHeader::decode(&raw, &NO_LIMITS) {
            prop_assert_eq!(header.encode(), raw);
        }
    }

    #[test]
    fn header_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64),
                                  max_frame in any::<u32>(), max_metadata in any::<u32>()) {
        let limits = Limits { max_frame, max_metadata, ..Limits::DEFAULT };
        if let Ok(header) = FrameHeader::decode(&bytes, &limits) {
            prop_assert!(header.frame_len() <= u64::from(max_frame));
            prop_assert!(header.metadata_len <= max_metadata);
        }
    }

    #[test]
    fn decoder_yields_exactly_the_frames_for_any_chunking(
        frames in prop::collection::vec(frame(), 0..12),
        cuts in prop::collection::vec(1usize..80, 0..20),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut out = Vec::new();
        let mut offset = 0;
        for size in chunk_sizes(wire.len(), &cuts) {
            for f in decoder.decode(&wire[offset..offset + size]) {
                out.push(f.expect("valid stream"));
            }
            offset += size;
        }
        decoder.finish().expect("stream ends on a frame boundary");
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn push_and_decode_from_agree(frames in prop::collection::vec(frame(), 1..6),
                                  cuts in prop::collection::vec(1usize..50, 1..10)) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        let limits = Limits::default();
        // Push API by hand.
        let mut decoder = FrameDecoder::new(limits);
        let mut pushed = Vec::new();
        // BytesMut API.
        let mut buf = BytesMut::new();
        let mut taken = Vec::new();
        let mut offset = 0;
        for size in chunk_sizes(wire.len(), &cuts) {
            let mut chunk = &wire[offset..offset + size];
            while !chunk.is_empty() {
                let n = decoder.push(chunk).expect("valid stream");
                chunk = &chunk[n..];
                while let Some(f) = decoder.next_frame().expect("valid stream") {
                    pushed.push(f);
                }
            }
            buf.extend_from_slice(&wire[offset..offset + size]);
            while let Some(f) = Frame::decode_from(&mut buf, &limits).expect("valid stream") {
                taken.push(f);
            }
            offset += size;
        }
        prop_assert_eq!(&pushed, &frames);
        prop_assert_eq!(&taken, &frames);
        // And each frame decodes in place.
        let mut offset = 0;
        for f in &frames {
            let r = FrameRef::decode(&wire[offset..], &limits).expect("valid frame");
            prop_assert_eq!(r.to_frame(), f.clone());
            offset += r.encoded_len();
        }
    }

    #[test]
    fn decoder_never_panics_and_respects_limits(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(1usize..64, 0..10),
        max_frame in 0u32..512,
        max_metadata in 0u32..128,
    ) {
        let limits = Limits { max_frame, max_metadata, ..Limits::DEFAULT };
        let mut decoder = FrameDecoder::new(limits);
        let mut offset = 0;
        let mut failed: Option<FrameError> = None;
        for size in chunk_sizes(bytes.len(), &cuts) {
            for f in decoder.decode(&bytes[offset..offset + size]) {
                match f {
                    Ok(frame) => {
                        prop_assert!(failed.is_none());
                        prop_assert!(frame.encoded_len() as u64 <= u64::from(max_frame));
                        prop_assert!(frame.metadata().len() as u64 <= u64::from(max_metadata));
                    }
                    Err(e) => {
                        if let Some(prev) = &failed {
                            prop_assert_eq!(prev, &e);
                        }
                        failed = Some(e);
                    }
                }
            }
            offset += size;
        }
        let _ = decoder.finish();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Frame::decode_from(&mut buf, &limits) {}
        let _ = FrameRef::decode(&bytes, &limits);
    }

    #[test]
    fn metadata_round_trips(md in metadata()) {
        let bytes = md.encode();
        prop_assert_eq!(bytes.len(), md.encoded_len());
        prop_assert_eq!(&bytes, &postcard::to_allocvec(&md).expect("serializable"));
        prop_assert_eq!(Metadata::decode(&bytes, &NO_LIMITS), Ok(md));
    }

    #[test]
    fn metadata_and_status_decode_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        // Decoders accept non-minimal varints (as postcard does), so accepted
        // input re-encodes to the same value in at most as many bytes.
        if let Ok(md) = Metadata::decode(&bytes, &Limits::default()) {
            let again = md.encode();
            prop_assert!(again.len() <= bytes.len().max(4));
            prop_assert_eq!(Metadata::decode(&again, &Limits::default()), Ok(md));
        }
        if let Ok(status) = Status::decode(&bytes) {
            let again = status.encode();
            prop_assert!(again.len() <= bytes.len());
            prop_assert_eq!(Status::decode(&again), Ok(status));
        }
    }

    #[test]
    fn status_round_trips(code in prop::sample::select(Code::ALL.to_vec()), message in any::<String>()) {
        let status = Status::new(code, message);
        prop_assert_eq!(Status::decode(&status.encode()), Ok(status));
    }

    #[test]
    fn valid_names_are_accepted(name in "[A-Za-z0-9][A-Za-z0-9._-]{0,254}") {
        let service = ServiceName::new(&name).expect("valid");
        let mesh = MeshName::new(&name).expect("valid");
        prop_assert_eq!(service.as_str(), name.as_str());
        prop_assert_eq!(mesh.as_str(), name.as_str());
    }

    #[test]
    fn valid_topics_are_accepted(segments in prop::collection::vec("[A-Za-z0-9][A-Za-z0-9._-]{0,20}", 1..8)) {
        let topic = segments.join("/");
        let parsed = TopicName::new(&topic).expect("valid");
        prop_assert_eq!(parsed.segments().collect::<Vec<_>>(), segments);
    }

    #[test]
    fn parsers_never_panic_and_accepted_text_round_trips(text in any::<String>()) {
        if let Ok(name) = ServiceName::new(&text) {
            prop_assert_eq!(name.as_str(), text.as_str());
        }
        if let Ok(topic) = TopicName::new(&text) {
            prop_assert_eq!(topic.to_string(), text.clone());
        }
        if let Ok(id) = text.parse::<InstanceId>() {
            prop_assert_eq!(id.to_string(), text.clone());
        }
        if let Ok(ep) = text.parse::<Endpoint>() {
            prop_assert_eq!(ep.to_string().parse::<Endpoint>(), Ok(ep));
        }
        let _ = format!("shm://{text}").parse::<Endpoint>();
        let _ = format!("tls://{text}").parse::<Endpoint>();
        let _ = text.parse::<Code>();
    }

    #[test]
    fn endpoints_round_trip(
        path in prop::collection::vec("[A-Za-z0-9_][A-Za-z0-9 ._-]{0,15}", 1..6),
        labels in prop::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4),
        ip in any::<std::net::IpAddr>(),
        port in 1u16..,
    ) {
        // No component is "." or ".." (none starts with '.'), so the path is valid.
        let shm_path = format!("/{}", path.join("/"));
        let shm = Endpoint::shm(&shm_path).expect("valid shm path");
        prop_assert_eq!(shm.to_string(), format!("shm://{shm_path}"));
        prop_assert_eq!(shm.to_string().parse::<Endpoint>(), Ok(shm));
        let mut domain = labels.join(".");
        if domain.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            domain.push_str(".example");
        }
        let tls = Endpoint::tls(&domain, port).expect("valid domain");
        prop_assert_eq!(tls.to_string(), format!("tls://{domain}:{port}"));
        prop_assert_eq!(tls.to_string().parse::<Endpoint>(), Ok(tls));

        let by_ip = Endpoint::tls(&ip.to_string(), port).expect("valid ip");
        let Endpoint::Tls(addr) = &by_ip else { unreachable!("tls endpoint") };
        prop_assert_eq!(addr.host(), &Host::from(ip));
        prop_assert_eq!(by_ip.to_string().parse::<Endpoint>(), Ok(by_ip.clone()));
    }

    #[test]
    fn instance_ids_round_trip(value in any::<u128>()) {
        let id = InstanceId::from_u128(value);
        let text = id.to_string();
        prop_assert_eq!(text.len(), 32);
        prop_assert_eq!(text.parse::<InstanceId>(), Ok(id));
    }

    #[test]
    fn deadline_wire_is_never_none_and_never_later(micros in any::<u64>(), elapsed_us in 0u64..10_000_000) {
        let now = Instant::now();
        let d = Deadline::after_at(Duration::from_micros(micros), now);
        let later = now + Duration::from_micros(elapsed_us);
        let wire = d.to_wire_at(later);
        prop_assert!(wire >= 1);
        let rebuilt = Deadline::from_wire_at(wire, later).expect("nonzero wire is a deadline");
        if d.is_expired_at(later) {
            prop_assert_eq!(wire, 1);
        } else {
            prop_assert!(rebuilt <= d);
            prop_assert!(d.instant().duration_since(rebuilt.instant()) < Duration::from_micros(1));
        }
    }
}
