//! The `frame_decode` target: see [`commy_fuzz::frame_decode`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| commy_fuzz::frame_decode(data));
