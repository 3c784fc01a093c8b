#![no_main]
//! The carried-state container: arbitrary bytes never panic, and whatever
//! decodes re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use roam_hipnet::handover::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = decode(data) {
        assert_eq!(encode(&v), data);
    }
});
