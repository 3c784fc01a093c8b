#![no_main]
//! RFC 5770 classification and ESP opening of arbitrary datagrams must not
//! panic.

use libfuzzer_sys::fuzz_target;
use roam_hip::wire::udp::{classify, UdpPayload};

fuzz_target!(|data: &[u8]| {
    if let Ok(UdpPayload::Hip(p)) = classify(data) {
        let _ = roam_hip::wire::Packet::decode(p);
    }
    let _ = roam_hip::esp::spi_of(data);
});
