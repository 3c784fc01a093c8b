#![no_main]
//! Any bytes: decoding must not panic, and whatever decodes must re-encode
//! to the same bytes (up to the header length) and decode again equal.

use libfuzzer_sys::fuzz_target;
use roam_hip::wire::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let _ = p.typed_params();
        let bytes = p.encode().expect("a decoded packet re-encodes");
        let mut expect = data[..bytes.len()].to_vec();
        // encode() writes a zero checksum and zero reserved bits.
        expect[3] = 0x21;
        expect[4] = 0;
        expect[5] = 0;
        assert_eq!(bytes, expect);
        assert_eq!(Packet::decode(&bytes).expect("re-decodes"), p);
    }
});
