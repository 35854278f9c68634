//! The fuzz targets' checks, as plain functions: the targets call them,
//! and `tests/corpus.rs` replays the corpus through them without
//! libFuzzer.
//!
//! [`frame_decode`] runs every decoder of untrusted bytes in commy-core
//! and cross-checks them.
//!
//! Input layout: byte 0 picks how the rest is chunked for the streaming
//! decoder; bytes 1.. are the stream. Checks, beyond "never panics":
//! - an accepted header re-encodes to the same 32 bytes and is within limits;
//! - `FrameDecoder` (fed in chunks), `Frame::decode_from` (fed in the same
//!   chunks) and `FrameRef::decode` (in place) produce the same frames and
//!   the same first error;
//! - decoded frames re-encode to the bytes they came from;
//! - metadata and status that decode re-encode to a value that decodes equal.

use bytes::BytesMut;
use commy_core::{
    Frame, FrameDecoder, FrameError, FrameHeader, FrameRef, HEADER_LEN, Limits, Metadata, Status,
};

const LIMITS: Limits = Limits {
    max_frame: 4096,
    max_metadata: 1024,
    max_message: 4096,
};

/// Chunk sizes: cycles through 1..=n where n comes from the selector byte,
/// so both byte-at-a-time and large chunks are exercised.
fn chunks(stream: &[u8], selector: u8) -> Vec<&[u8]> {
    let period = usize::from(selector % 64) + 1;
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let size = (i % period + 1 + usize::from(selector / 64) * 17).min(rest.len());
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

fn check_frame(frame: &Frame) {
    let _ = frame.decode_metadata(&LIMITS);
    let _ = frame.status();
    let _ = frame.credit_increment();
    assert!(frame.validate(&LIMITS).is_ok());
}

/// Runs every decoder over `data` and checks what the module docs say;
/// panics on a violation.
pub fn frame_decode(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };

    // Header decode, with the fuzz limits and with the defaults.
    for limits in [LIMITS, Limits::default()] {
        if let Ok(header) = FrameHeader::decode(stream, &limits) {
            assert_eq!(header.encode()[..], stream[..HEADER_LEN]);
            assert!(header.frame_len() <= u64::from(limits.max_frame));
            assert!(header.metadata_len <= limits.max_metadata);
        }
    }

    // In-place decoding of consecutive frames: the reference sequence.
    let mut reference: Vec<Frame> = Vec::new();
    let mut reference_error: Option<FrameError> = None;
    let mut offset = 0;
    while offset < stream.len() {
        match FrameRef::decode(&stream[offset..], &LIMITS) {
            Ok(frame) => {
                let owned = frame.to_frame();
                assert_eq!(
                    owned.to_vec()[..],
                    stream[offset..offset + frame.encoded_len()]
                );
                offset += frame.encoded_len();
                reference.push(owned);
            }
            Err(FrameError::Truncated { .. }) => break,
            Err(err) => {
                reference_error = Some(err);
                break;
            }
        }
    }

    // Streaming decoder and BytesMut decoder over the same chunking.
    let mut decoder = FrameDecoder::new(LIMITS);
    let mut streamed = Vec::new();
    let mut streamed_error = None;
    let mut buf = BytesMut::new();
    let mut taken = Vec::new();
    let mut taken_error = None;
    for chunk in chunks(stream, selector) {
        for result in decoder.decode(chunk) {
            match result {
                Ok(frame) => streamed.push(frame),
                Err(err) => {
                    if let Some(prev) = &streamed_error {
                        assert_eq!(prev, &err, "errors are sticky");
                    }
                    streamed_error = Some(err);
                }
            }
        }
        if taken_error.is_none() {
            buf.extend_from_slice(chunk);
            loop {
                match Frame::decode_from(&mut buf, &LIMITS) {
                    Ok(Some(frame)) => taken.push(frame),
                    Ok(None) => break,
                    Err(err) => {
                        taken_error = Some(err);
                        break;
                    }
                }
            }
        }
    }
    let _ = decoder.finish();
    assert_eq!(streamed, reference);
    assert_eq!(taken, reference);
    assert_eq!(streamed_error, reference_error);
    assert_eq!(taken_error, reference_error);
    for frame in &reference {
        check_frame(frame);
    }

    // Section decoders on the raw bytes.
    if let Ok(metadata) = Metadata::decode(stream, &LIMITS) {
        let again = metadata.encode();
        assert_eq!(Metadata::decode(&again, &LIMITS).ok(), Some(metadata));
    }
    if let Ok(status) = Status::decode(stream) {
        let again = status.encode();
        assert_eq!(Status::decode(&again).ok(), Some(status));
    }
}
