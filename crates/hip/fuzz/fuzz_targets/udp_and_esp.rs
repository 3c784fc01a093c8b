#![no_main]
//! RFC 5770 classification and ESP opening of arbitrary datagrams must not
//! panic. The ESP parser runs against a real SA (fixed KEYMAT) and, for half
//! the inputs, with the SPI forced to that SA's, so the fuzzer reaches the
//! length, window and ICV checks rather than stopping at the SPI; arbitrary
//! bytes must never authenticate.

use libfuzzer_sys::fuzz_target;
use roam_hip::crypto::keymat::HipKeys;
use roam_hip::esp::sas;
use roam_hip::identity::Rhash;
use roam_hip::machine::{AssociationKeys, ESP_SUITE_AES128_CBC_SHA256};
use roam_hip::wire::udp::{classify, UdpPayload};
use roam_hip::Hit;

const SPI: u32 = 0x1000;

fn keys() -> AssociationKeys {
    AssociationKeys {
        peer_hit: Hit([1; 16]),
        rhash: Rhash::Sha384,
        cipher: 0,
        hip: HipKeys {
            our_enc: vec![],
            our_mac: vec![],
            peer_enc: vec![],
            peer_mac: vec![],
        },
        keymat: (0..1024u32).map(|i| (i * 7 + 3) as u8).collect(),
        esp_keymat_index: 0,
        esp_suite: ESP_SUITE_AES128_CBC_SHA256,
        our_spi: SPI,
        peer_spi: SPI + 1,
        we_are_greater: true,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(UdpPayload::Hip(p)) = classify(data) {
        let _ = roam_hip::wire::Packet::decode(p);
    }
    let _ = roam_hip::esp::spi_of(data);
    let (_, mut inb) = sas(&keys()).expect("fixed keys build an SA");
    let mut d = data.to_vec();
    if d.first().is_some_and(|b| b & 1 == 1) && d.len() >= 4 {
        d[..4].copy_from_slice(&SPI.to_be_bytes());
    }
    assert!(inb.open(&d).is_err(), "forged ESP accepted");
});
