//! Crate-private helpers that write postcard's wire format by hand.
//!
//! postcard encodes unsigned integers wider than one byte as LEB128 varints
//! (7 bits per byte, least significant group first, high bit = "more"), and
//! strings and byte strings as a varint length followed by the raw bytes.
//! Writing these directly keeps encoding infallible and lets callers size a
//! buffer exactly; tests check the output against `postcard::to_allocvec`.

/// Number of bytes the varint encoding of `value` takes (1..=10).
pub(crate) fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends the LEB128 varint encoding of `value`.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        // Truncation is the point: keep the low 7 bits and set the "more" bit.
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Encoded size of a length-prefixed byte string of `len` bytes.
pub(crate) fn bytes_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

/// Appends a length-prefixed byte string (postcard `str` / `bytes`).
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Encoded size of an `Option<String>`.
pub(crate) fn opt_str_len(value: Option<&str>) -> usize {
    1 + value.map_or(0, |s| bytes_len(s.len()))
}

/// Appends an `Option<String>`: `0x00` for `None`, `0x01` then the string for `Some`.
pub(crate) fn put_opt_str(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_matches_postcard() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut ours = Vec::new();
            put_varint(&mut ours, v);
            assert_eq!(ours, postcard::to_allocvec(&v).unwrap(), "value {v}");
            assert_eq!(ours.len(), varint_len(v), "value {v}");
        }
    }

    #[test]
    fn bytes_match_postcard_str() {
        let s = "x".repeat(200);
        let mut ours = Vec::new();
        put_bytes(&mut ours, s.as_bytes());
        assert_eq!(ours, postcard::to_allocvec(&s).unwrap());
        assert_eq!(ours.len(), bytes_len(s.len()));
    }
}
