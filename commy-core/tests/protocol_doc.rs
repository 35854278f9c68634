//! Keeps docs/PROTOCOL.md true: its worked examples are regenerated from the
//! real codec here and compared with both literal bytes and the document.

use commy_core::{
    Frame, FrameDecoder, FrameFlags, FrameHeader, FrameKind, Limits, Metadata, Status, StreamId,
};

fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md is readable")
}

/// The `0000  01 02 ...` dump format the document uses.
fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}\n", i * 16, hex.join(" "))
        })
        .collect()
}

fn spaced_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn example_request() -> Frame {
    let mut metadata = Metadata {
        content_type: Some("application/json".into()),
        ..Metadata::default()
    };
    metadata.add_header("x-tenant", b"acme".to_vec());
    Frame::new(
        FrameKind::Request,
        StreamId(1),
        metadata.encode(),
        br#"{"id":42}"#.to_vec(),
    )
    .expect("valid frame")
    .with_flags(FrameFlags::END_STREAM)
    .with_deadline_us(250_000)
}

#[test]
fn worked_request_example() {
    let wire = example_request().to_vec();
    #[rustfmt::skip]
    let expected: [u8; 76] = [
        0x01, 0x01, 0x01, 0x00, 0x23, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x90, 0xd0, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x10, b'a', b'p', b'p', b'l', b'i', b'c', b'a', b't', b'i', b'o', b'n', b'/',
        b'j', b's', b'o', b'n', 0x01, 0x08, b'x', b'-', b't', b'e', b'n', b'a', b'n', b't', 0x04, b'a',
        b'c', b'm', b'e', b'{', b'"', b'i', b'd', b'"', b':', b'4', b'2', b'}',
    ];
    assert_eq!(wire, expected);

    let doc = protocol_doc();
    let dump = hex_dump(&wire);
    assert!(
        doc.contains(&dump),
        "docs/PROTOCOL.md lacks the request dump:\n{dump}"
    );

    // And it decodes back to what the document's field table says.
    let limits = Limits::default();
    let header = FrameHeader::decode(&wire, &limits).expect("valid header");
    assert_eq!(header.kind, FrameKind::Request);
    assert_eq!(header.flags, FrameFlags::END_STREAM);
    assert_eq!(header.stream_id, StreamId(1));
    assert_eq!(header.deadline_us, 250_000);
    assert_eq!((header.metadata_len, header.payload_len), (35, 9));
    let frame = FrameDecoder::new(limits)
        .decode(&wire)
        .next()
        .expect("one frame")
        .expect("valid frame");
    let metadata = frame.decode_metadata(&limits).expect("valid metadata");
    assert_eq!(metadata.content_type.as_deref(), Some("application/json"));
    assert_eq!(metadata.header("x-tenant"), Some(&b"acme"[..]));
    assert_eq!(frame.payload().as_ref(), br#"{"id":42}"#);
}

#[test]
fn worked_error_example() {
    let status = Status::not_found("no instance");
    let wire = Frame::error(StreamId(1), &status)
        .expect("valid frame")
        .to_vec();
    #[rustfmt::skip]
    let expected: [u8; 45] = [
        0x01, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x05, 0x0b, b'n', b'o', b' ', b'i', b'n', b's', b't', b'a', b'n', b'c', b'e',
    ];
    assert_eq!(wire, expected);
    let doc = protocol_doc();
    let dump = hex_dump(&wire);
    assert!(
        doc.contains(&dump),
        "docs/PROTOCOL.md lacks the error dump:\n{dump}"
    );
    assert!(doc.contains(&spaced_hex(&status.encode()[1..])));
}

#[test]
fn metadata_example_is_in_the_doc() {
    let mut metadata = Metadata {
        content_type: Some("text/plain".into()),
        ..Metadata::default()
    };
    metadata.add_header("k", vec![0xff]);
    let bytes = metadata.encode();
    // The document lists the content_type line and the header lines.
    let doc = protocol_doc();
    assert!(
        doc.contains(&spaced_hex(&bytes[2..14])),
        "content_type line"
    );
    assert!(
        doc.contains(&format!("{}  ", spaced_hex(&bytes[15..17]))),
        "header name line"
    );
    assert_eq!(bytes.len(), 19);
    assert!(doc.contains("`00 00 00 00`"));
    assert_eq!(Metadata::default().encode(), [0, 0, 0, 0]);
}

#[test]
fn header_table_and_defaults_match() {
    let doc = protocol_doc();
    for kind in FrameKind::ALL {
        let row = format!("| {} | `{}` |", kind.as_u8(), kind.as_str());
        assert!(doc.contains(&row), "kind row {row}");
    }
    for code in commy_core::Code::ALL {
        let row = format!("| {} | `{}` |", code.as_u16(), code.as_str());
        assert!(doc.contains(&row), "code row {row}");
    }
    assert_eq!(Limits::default().max_frame, 16_777_216);
    assert_eq!(Limits::default().max_metadata, 16_384);
    assert!(doc.contains("16 MiB (16,777,216)") && doc.contains("16 KiB (16,384)"));
    assert!(doc.contains(&format!(
        "`0x{:04x}` | `END_STREAM`",
        FrameFlags::END_STREAM.bits()
    )));
    assert!(doc.contains(&format!(
        "`0x{:04x}` | `FRAGMENT`",
        FrameFlags::FRAGMENT.bits()
    )));
    assert!(doc.contains(&format!(
        "ALPN id carries the same number (`{}`)",
        String::from_utf8_lossy(commy_core::ALPN)
    )));
}
