//! The protocol's test vectors (`docs/protocol/vectors.json`, PROTOCOL.md
//! section 12) against the codec, in both directions: every valid frame
//! decodes to what the vector says and is encoded from it to the same
//! bytes; a fragmented message joins, and splits to the same frames; every
//! invalid frame the codec can judge alone is refused with the error named.

use bytes::{Bytes, BytesMut};
use commy_core::fragment::{Assembled, Reassembly, split};
use commy_core::{Frame, FrameFlags, FrameHeader, FrameKind, Limits, Metadata, StreamId};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol/vectors.json");
    let text = std::fs::read_to_string(path).expect("docs/protocol/vectors.json");
    serde_json::from_str(&text).expect("the vectors are JSON")
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is a list"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string"))
}

fn kind(name: &str) -> FrameKind {
    FrameKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .unwrap_or_else(|| panic!("unknown kind {name}"))
}

fn flags(v: &Value) -> FrameFlags {
    list(v, "flags")
        .iter()
        .map(|f| match f.as_str() {
            Some("END_STREAM") => FrameFlags::END_STREAM,
            Some("FRAGMENT") => FrameFlags::FRAGMENT,
            other => panic!("unknown flag {other:?}"),
        })
        .fold(FrameFlags::empty(), |a, b| a | b)
}

fn option(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The metadata section a vector describes: raw hex, fields, or none
/// (an empty section).
fn metadata_bytes(f: &Value) -> Vec<u8> {
    if let Some(raw) = f.get("metadata_hex") {
        return hex(raw.as_str().unwrap());
    }
    let md = &f["metadata"];
    if md.is_null() {
        return Vec::new();
    }
    metadata_of(md).encode()
}

fn metadata_of(md: &Value) -> Metadata {
    Metadata {
        auth_token: option(md, "auth_token"),
        traceparent: option(md, "traceparent"),
        content_type: option(md, "content_type"),
        headers: list(md, "headers")
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_owned(),
                    hex(h[1].as_str().unwrap()),
                )
            })
            .collect(),
    }
}

/// Checks that `frame` is what `f` describes, apart from the deadline.
fn check_fields(name: &str, frame: &Frame, f: &Value) {
    let h = frame.header();
    assert_eq!(h.kind, kind(text(f, "kind")), "{name}: kind");
    assert_eq!(h.flags, flags(f), "{name}: flags");
    assert_eq!(
        h.stream_id.0,
        f["stream_id"].as_u64().unwrap(),
        "{name}: stream"
    );
    assert_eq!(
        &frame.payload()[..],
        hex(text(f, "payload_hex")),
        "{name}: payload"
    );
    assert_eq!(
        &frame.metadata()[..],
        metadata_bytes(f),
        "{name}: metadata bytes"
    );
    if f["metadata"].is_object() {
        let decoded = Metadata::decode(frame.metadata(), &Limits::DEFAULT).unwrap();
        assert_eq!(decoded, metadata_of(&f["metadata"]), "{name}: metadata");
    }
}

fn decode_one(name: &str, bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Frame::decode_from(&mut buf, &Limits::DEFAULT)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: not a whole frame"));
    assert!(buf.is_empty(), "{name}: bytes after the frame");
    frame
}

#[test]
fn the_vectors_state_the_default_limits() {
    let v = vectors();
    assert_eq!(v["version"], 1);
    let l = &v["limits"];
    assert_eq!(l["max_frame"], Limits::DEFAULT.max_frame);
    assert_eq!(l["max_metadata"], Limits::DEFAULT.max_metadata);
    assert_eq!(l["max_message"], Limits::DEFAULT.max_message);
}

#[test]
fn valid_frames_decode_and_encode_as_the_vectors_say() {
    let v = vectors();
    let frames = list(&v, "frames");
    assert!(frames.len() >= 10);
    for vector in frames {
        let name = text(vector, "name");
        let bytes = hex(text(vector, "hex"));
        let f = &vector["frame"];
        // Bytes to fields.
        let frame = decode_one(name, &bytes);
        check_fields(name, &frame, f);
        assert_eq!(
            frame.header().deadline_us,
            f["deadline_us"].as_u64().unwrap(),
            "{name}: deadline"
        );
        // Fields to bytes.
        let built = Frame::new(
            kind(text(f, "kind")),
            StreamId(f["stream_id"].as_u64().unwrap()),
            metadata_bytes(f),
            hex(text(f, "payload_hex")),
        )
        .unwrap()
        .with_flags(flags(f))
        .with_deadline_us(f["deadline_us"].as_u64().unwrap());
        assert_eq!(built.to_vec(), bytes, "{name}: encoding");
    }
}

#[test]
fn fragmented_messages_join_and_split_as_the_vectors_say() {
    let v = vectors();
    for vector in list(&v, "messages") {
        let name = text(vector, "name");
        let max_frame = u32::try_from(vector["max_frame"].as_u64().unwrap()).unwrap();
        let wire: Vec<Vec<u8>> = list(vector, "frames")
            .iter()
            .map(|h| hex(h.as_str().unwrap()))
            .collect();
        let m = &vector["message"];
        // Fragments to the message.
        let mut joining = Reassembly::new(Limits::DEFAULT);
        let mut whole = None;
        for (i, bytes) in wire.iter().enumerate() {
            assert!(bytes.len() <= max_frame as usize, "{name}: frame {i}");
            match joining.push(decode_one(name, bytes)).unwrap() {
                Assembled::Whole(f) => {
                    assert_eq!(i, wire.len() - 1, "{name}: whole before the last");
                    whole = Some(f);
                }
                Assembled::Pending => {}
                Assembled::TooLarge { status, .. } => panic!("{name}: {status}"),
            }
        }
        let whole = whole.unwrap_or_else(|| panic!("{name}: never whole"));
        check_fields(name, &whole, m);
        let deadline = m["deadline_us"].as_u64().unwrap();
        let got = whole.header().deadline_us;
        assert!(
            got <= deadline && got + 1_000_000 > deadline,
            "{name}: deadline {got}"
        );
        // The message to fragments.
        let md = Bytes::from(metadata_bytes(m));
        let payload = Bytes::from(hex(text(m, "payload_hex")));
        let header = FrameHeader {
            deadline_us: deadline,
            ..FrameHeader::new(
                kind(text(m, "kind")),
                StreamId(m["stream_id"].as_u64().unwrap()),
            )
        }
        .with_sections(md.len() as u32, payload.len() as u32);
        let split: Vec<Vec<u8>> = split(header, md.len(), payload.len(), max_frame)
            .map(|p| {
                let md = if p.metadata { md.clone() } else { Bytes::new() };
                Frame::from_header(p.header, md, payload.slice(p.payload))
                    .unwrap()
                    .to_vec()
            })
            .collect();
        assert_eq!(split, wire, "{name}: fragments");
    }
}

#[test]
fn invalid_frames_are_refused_with_the_error_named() {
    let v = vectors();
    let invalid = list(&v, "invalid");
    assert!(invalid.len() >= 15);
    for vector in invalid {
        let name = text(vector, "name");
        let says = text(vector, "says");
        let wire: Vec<Vec<u8>> = list(vector, "frames")
            .iter()
            .map(|h| hex(h.as_str().unwrap()))
            .collect();
        assert!(
            [
                "INVALID_ARGUMENT",
                "NOT_FOUND",
                "DEADLINE_EXCEEDED",
                "RESOURCE_EXHAUSTED"
            ]
            .contains(&text(vector, "code")),
            "{name}: code"
        );
        match text(vector, "layer") {
            // The header alone is refused, before any body is read.
            "header" => {
                let e = FrameHeader::decode(&wire[0], &Limits::DEFAULT).unwrap_err();
                assert!(e.to_string().contains(says), "{name}: {e}");
                assert_eq!(text(vector, "scope"), "link", "{name}");
            }
            // Each frame is valid; joining them is not.
            "fragments" => {
                let mut joining = Reassembly::new(Limits::DEFAULT);
                let e = wire
                    .iter()
                    .find_map(|b| joining.push(decode_one(name, b)).err())
                    .unwrap_or_else(|| panic!("{name}: accepted"));
                assert!(e.to_string().contains(says), "{name}: {e}");
                assert_eq!(text(vector, "scope"), "link", "{name}");
            }
            // Valid frames that break a rule of streams or services: the
            // codec accepts them, a server refuses them (checked live by
            // commy-mesh's conformance test).
            "streams" | "service" => {
                for b in &wire {
                    decode_one(name, b);
                }
            }
            other => panic!("{name}: unknown layer {other}"),
        }
    }
}
