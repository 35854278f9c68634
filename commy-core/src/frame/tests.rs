//! The frame codec's unit tests.

use super::*;

#[test]
fn a_whole_message_ends_its_stream_when_written() {
    for kind in FrameKind::ALL {
        let h = FrameHeader::new(kind, StreamId(1)).with_sections(3, 4);
        assert_eq!((h.metadata_len, h.payload_len), (3, 4));
        let ends = matches!(
            kind,
            FrameKind::Request | FrameKind::Response | FrameKind::OneWay
        );
        assert_eq!(h.flags.contains(FrameFlags::END_STREAM), ends, "{kind}");
        assert_eq!(kind.ends_its_stream(), ends, "{kind}");
    }
    // Other flags are kept.
    let h = FrameHeader {
        flags: FrameFlags::FRAGMENT,
        ..FrameHeader::new(FrameKind::Publish, StreamId(2))
    }
    .with_sections(0, 0);
    assert_eq!(h.flags, FrameFlags::FRAGMENT);
}

fn header_bytes(mutate: impl FnOnce(&mut [u8; HEADER_LEN])) -> [u8; HEADER_LEN] {
    let mut raw = FrameHeader::new(FrameKind::Request, StreamId(1)).encode();
    mutate(&mut raw);
    raw
}

#[test]
fn header_layout() {
    let header = FrameHeader {
        kind: FrameKind::Response,
        flags: FrameFlags::END_STREAM | FrameFlags::FRAGMENT,
        stream_id: StreamId(0x0102_0304_0506_0708),
        deadline_us: 0x1112_1314_1516_1718,
        metadata_len: 0x2122_2324,
        payload_len: 0x3132_3334,
    };
    let raw = header.encode();
    assert_eq!(
        raw,
        [
            1, 2, 0x03, 0x00, 0x24, 0x23, 0x22, 0x21, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02,
            0x01, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x34, 0x33, 0x32, 0x31, 0, 0, 0,
            0
        ]
    );
    let limits = Limits {
        max_frame: u32::MAX,
        max_metadata: u32::MAX,
        ..Limits::DEFAULT
    };
    assert_eq!(FrameHeader::decode(&raw, &limits).unwrap(), header);
}

#[test]
fn header_rejections_are_distinct() {
    let limits = Limits::default();
    assert_eq!(
        FrameHeader::decode(&[1; 31], &limits),
        Err(FrameError::Truncated {
            needed: 32,
            available: 31
        })
    );
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[0] = 2), &limits),
        Err(FrameError::UnsupportedVersion {
            version: 2,
            supported: 1
        })
    );
    for kind in [0u8, 11, 255] {
        assert_eq!(
            FrameHeader::decode(&header_bytes(|r| r[1] = kind), &limits),
            Err(FrameError::UnknownKind { kind })
        );
    }
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[2] = 0x05), &limits),
        Err(FrameError::UnknownFlags {
            flags: 0x0005,
            unknown: 0x0004
        })
    );
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[3] = 0x80), &limits),
        Err(FrameError::UnknownFlags {
            flags: 0x8000,
            unknown: 0x8000
        })
    );
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[31] = 1), &limits),
        Err(FrameError::NonZeroReserved {
            reserved: 0x0100_0000
        })
    );
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[8] = 0), &limits),
        Err(FrameError::ZeroStreamId {
            kind: FrameKind::Request
        })
    );
    assert_eq!(
        FrameHeader::decode(&header_bytes(|r| r[1] = FrameKind::Credit as u8), &limits),
        Err(FrameError::InvalidCreditPayload { len: 0 })
    );
    let over_meta = header_bytes(|r| r[4..8].copy_from_slice(&(16 * 1024 + 1u32).to_le_bytes()));
    assert_eq!(
        FrameHeader::decode(&over_meta, &limits),
        Err(FrameError::MetadataTooLarge {
            len: 16 * 1024 + 1,
            max: 16 * 1024
        })
    );
    let over_frame =
        header_bytes(|r| r[24..28].copy_from_slice(&(16 * 1024 * 1024 - 31u32).to_le_bytes()));
    assert_eq!(
        FrameHeader::decode(&over_frame, &limits),
        Err(FrameError::FrameTooLarge {
            len: 16 * 1024 * 1024 + 1,
            metadata_len: 0,
            payload_len: 16 * 1024 * 1024 - 31,
            max: 16 * 1024 * 1024
        })
    );
    let at_limit =
        header_bytes(|r| r[24..28].copy_from_slice(&(16 * 1024 * 1024 - 32u32).to_le_bytes()));
    assert!(FrameHeader::decode(&at_limit, &limits).is_ok());
}

#[test]
fn error_messages_name_values() {
    let err = FrameError::UnknownFlags {
        flags: 0x0005,
        unknown: 0x0004,
    };
    assert_eq!(
        err.to_string(),
        "unknown frame flag bits 0x0004 set (flags 0x0005, known bits 0x0003)"
    );
    let err = FrameError::FrameTooLarge {
        len: 100,
        metadata_len: 10,
        payload_len: 58,
        max: 64,
    };
    assert_eq!(
        err.to_string(),
        "frame of 100 bytes (32 header + 10 metadata + 58 payload) exceeds the limit of 64 bytes (max_frame)"
    );
    assert_eq!(
        FrameError::ZeroStreamId {
            kind: FrameKind::Cancel
        }
        .to_string(),
        "CANCEL frame has stream id 0, which is reserved for link-wide frames"
    );
}

#[test]
fn debug_output_is_bounded() {
    let frame = Frame::new(
        FrameKind::OneWay,
        StreamId(5),
        b"md".to_vec(),
        vec![b'x'; 1000],
    )
    .unwrap();
    let text = format!("{frame:?}");
    assert!(text.contains("metadata: 2 bytes b\"md\""), "{text}");
    assert!(
        text.contains(&format!("payload: 1000 bytes b\"{}\"...", "x".repeat(64))),
        "{text}"
    );
    assert!(text.len() < 400, "{text}");
    let wire = frame.to_vec();
    let r = FrameRef::decode(&wire, &Limits::default()).unwrap();
    assert!(format!("{r:?}").starts_with("FrameRef { header: FrameHeader { kind: OneWay"));
}

#[test]
fn kinds_and_flags() {
    for kind in FrameKind::ALL {
        assert_eq!(FrameKind::try_from(kind.as_u8()).unwrap(), kind);
    }
    assert_eq!(FrameFlags::from_bits(3), Some(FrameFlags::KNOWN));
    assert_eq!(FrameFlags::from_bits(4), None);
    assert!(FrameFlags::empty().is_empty());
    let mut flags = FrameFlags::empty();
    flags |= FrameFlags::FRAGMENT;
    assert!(flags.contains(FrameFlags::FRAGMENT));
    assert!(!flags.contains(FrameFlags::END_STREAM));
    assert_eq!(format!("{flags:?}"), "FrameFlags(FRAGMENT)");
    assert_eq!(
        format!("{:?}", FrameFlags::KNOWN),
        "FrameFlags(END_STREAM | FRAGMENT)"
    );
    assert_eq!(format!("{:?}", FrameFlags::empty()), "FrameFlags(empty)");
}

#[test]
fn frame_constructors_enforce_kind_rules() {
    assert_eq!(
        Frame::new(FrameKind::OneWay, StreamId(0), Bytes::new(), Bytes::new()),
        Err(FrameError::ZeroStreamId {
            kind: FrameKind::OneWay
        })
    );
    assert_eq!(
        Frame::new(FrameKind::Credit, StreamId(0), Bytes::new(), vec![1, 2, 3]),
        Err(FrameError::InvalidCreditPayload { len: 3 })
    );
    let ping = Frame::new(FrameKind::Ping, StreamId(0), Bytes::new(), vec![1; 8]).unwrap();
    assert_eq!(ping.kind(), FrameKind::Ping);
    assert_eq!(ping.credit_increment(), None);
    assert!(ping.status().is_none());

    let credit = Frame::credit(StreamId::CONNECTION, 64);
    assert_eq!(credit.credit_increment(), Some(64));
    let decoded = FrameRef::decode(&credit.to_vec(), &Limits::default())
        .unwrap()
        .to_frame();
    assert_eq!(decoded, credit);

    let status = Status::unavailable("draining");
    let err = Frame::error(StreamId(3), &status).unwrap();
    assert_eq!(err.status(), Some(Ok(status)));
    assert_eq!(err.stream_id(), StreamId(3));
}

#[test]
fn deadline_helpers() {
    let now = std::time::Instant::now();
    let frame = Frame::new(FrameKind::Request, StreamId(1), Bytes::new(), Bytes::new())
        .unwrap()
        .with_deadline_us(5_000);
    assert_eq!(
        frame.header().deadline_at(now).unwrap().remaining_at(now),
        std::time::Duration::from_millis(5)
    );
    let frame = frame.with_deadline(None);
    assert_eq!(frame.header().deadline_us, 0);
    assert_eq!(frame.header().deadline_at(now), None);
    let frame = frame.with_deadline(Some(Deadline::after(std::time::Duration::from_secs(1))));
    assert!(frame.header().deadline_us > 0 && frame.header().deadline_us <= 1_000_000);
}

#[test]
fn frame_validate_uses_limits() {
    let frame = Frame::new(FrameKind::Publish, StreamId(2), vec![0; 10], vec![0; 100]).unwrap();
    assert!(frame.validate(&Limits::default()).is_ok());
    let small = Limits {
        max_frame: 141,
        max_metadata: 10,
        ..Limits::DEFAULT
    };
    assert!(matches!(
        frame.validate(&small),
        Err(FrameError::FrameTooLarge { len: 142, .. })
    ));
    let small = Limits {
        max_frame: 1000,
        max_metadata: 9,
        ..Limits::DEFAULT
    };
    assert_eq!(
        frame.validate(&small),
        Err(FrameError::MetadataTooLarge { len: 10, max: 9 })
    );
}

#[test]
fn frame_ref_decodes_in_place() {
    let frame = Frame::new(
        FrameKind::Request,
        StreamId(9),
        b"meta".to_vec(),
        b"payload".to_vec(),
    )
    .unwrap();
    let mut wire = frame.to_vec();
    wire.extend_from_slice(&[0xAA; 5]); // record padding
    let r = FrameRef::decode(&wire, &Limits::default()).unwrap();
    assert_eq!(r.metadata(), b"meta");
    assert_eq!(r.payload(), b"payload");
    assert_eq!(r.encoded_len(), 32 + 4 + 7);
    assert_eq!(r.header(), frame.header());
    assert_eq!(
        FrameRef::decode(&wire[..42], &Limits::default()),
        Err(FrameError::Truncated {
            needed: 43,
            available: 42
        })
    );
}

#[test]
fn decode_from_bytes_mut() {
    let a = Frame::new(
        FrameKind::Request,
        StreamId(1),
        b"m".to_vec(),
        b"first".to_vec(),
    )
    .unwrap();
    let b = Frame::new(
        FrameKind::Response,
        StreamId(1),
        Bytes::new(),
        b"second".to_vec(),
    )
    .unwrap();
    let mut wire = a.to_vec();
    wire.extend_from_slice(&b.to_vec());
    let limits = Limits::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in wire {
        buf.extend_from_slice(&[byte]);
        while let Some(frame) = Frame::decode_from(&mut buf, &limits).unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, [a, b]);
    assert!(buf.is_empty());

    let mut bad = BytesMut::from(&header_bytes(|r| r[0] = 9)[..]);
    assert!(matches!(
        Frame::decode_from(&mut bad, &limits),
        Err(FrameError::UnsupportedVersion { version: 9, .. })
    ));
}

#[test]
fn decoder_push_stops_at_frame_end() {
    let a = Frame::new(
        FrameKind::Request,
        StreamId(1),
        Bytes::new(),
        b"abc".to_vec(),
    )
    .unwrap();
    let b = Frame::new(FrameKind::Cancel, StreamId(1), Bytes::new(), Bytes::new()).unwrap();
    let mut wire = a.to_vec();
    wire.extend_from_slice(&b.to_vec());
    let mut dec = FrameDecoder::new(Limits::default());
    assert_eq!(dec.wanted(), 32);
    assert_eq!(dec.push(&wire).unwrap(), 35);
    assert_eq!(dec.wanted(), 0);
    assert_eq!(dec.push(&wire[35..]).unwrap(), 0);
    assert_eq!(dec.next_frame().unwrap(), Some(a));
    assert_eq!(dec.next_frame().unwrap(), None);
    assert_eq!(dec.push(&wire[35..40]).unwrap(), 5);
    assert_eq!(dec.buffered(), 5);
    assert!(matches!(
        dec.finish(),
        Err(FrameError::UnexpectedEof {
            buffered: 5,
            expected: 32
        })
    ));
    assert_eq!(dec.push(&wire[40..]).unwrap(), 27);
    assert_eq!(dec.next_frame().unwrap(), Some(b));
    dec.finish().unwrap();
}

#[test]
fn decoder_reports_eof_inside_body() {
    let a = Frame::new(FrameKind::Request, StreamId(1), Bytes::new(), vec![7; 100]).unwrap();
    let wire = a.to_vec();
    let mut dec = FrameDecoder::new(Limits::default());
    assert_eq!(dec.decode(&wire[..50]).count(), 0);
    assert_eq!(
        dec.finish(),
        Err(FrameError::UnexpectedEof {
            buffered: 50,
            expected: 132
        })
    );
}

#[test]
fn decoder_errors_are_sticky_and_allocate_nothing() {
    let limits = Limits {
        max_frame: 1024,
        max_metadata: 64,
        ..Limits::DEFAULT
    };
    let mut dec = FrameDecoder::new(limits);
    // A header claiming a 4 GiB payload: rejected before any allocation.
    let huge = header_bytes(|r| r[24..28].copy_from_slice(&u32::MAX.to_le_bytes()));
    let err = dec.push(&huge).unwrap_err();
    assert!(matches!(err, FrameError::FrameTooLarge { .. }));
    assert_eq!(dec.body.capacity(), 0);
    assert_eq!(dec.push(&[1, 2, 3]), Err(err.clone()));
    assert_eq!(dec.next_frame(), Err(err.clone()));
    assert_eq!(dec.finish(), Err(err.clone()));
    assert_eq!(dec.wanted(), 0);
    let mut frames = dec.decode(&[0; 100]);
    assert_eq!(frames.next(), Some(Err(err)));
    assert_eq!(frames.next(), None);
}
