#![no_main]
//! Packets from TUN and opened ESP payloads of any shape must not panic,
//! and an LSI packet that is accepted must rebuild into one of the same
//! length.

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use roam_hip::Hit;
use roam_hipnet::beet::{inbound, outbound, View};

fuzz_target!(|data: &[u8]| {
    let me = Hit([0x20, 0x01, 0x00, 0x22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    let view = View {
        our_hit: me,
        peer_hit: Hit([0x20, 0x01, 0x00, 0x22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
        our_lsi: Ipv4Addr::new(198, 19, 0, 1),
        peer_lsi: Ipv4Addr::new(198, 19, 0, 2),
    };
    if let Ok(o) = outbound(data, &me) {
        if let Ok(back) = inbound(o.next_header, o.payload, &view) {
            if o.next_header == 4 {
                assert_eq!(back.len(), o.payload.len());
            }
        }
    }
    if let Some((&nh, rest)) = data.split_first() {
        let _ = inbound(nh, rest, &view);
    }
});
