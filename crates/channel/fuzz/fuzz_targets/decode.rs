//! Feeds arbitrary bytes to every decoder a peer (or a user) can reach: message frames,
//! stream headers, public-key text. Invariants checked: no panic, anything accepted
//! stays within the cap, and an accepted frame re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roam_channel::frame::{decode_frame, decode_message, encode_frame};
use roam_channel::stream::parse_stream_header;
use roam_channel::PublicKey;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            // A control stream: frames back to back under a small cap.
            let cap = 4096;
            let mut buf = rest;
            while let Ok(Some((f, used))) = decode_frame(buf, cap) {
                assert!(used <= buf.len());
                assert!(f.payload.len() <= cap as usize);
                let again = encode_frame(f.version, f.kind, &f.payload, cap).unwrap();
                assert_eq!(&again[..], &buf[..used]);
                let _ = decode_message::<serde_json::Value>(&f.payload);
                buf = &buf[used..];
            }
        }
        1 => {
            if let Some(h) = rest.first_chunk::<2>() {
                let _ = parse_stream_header(*h);
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                if let Ok(k) = s.parse::<PublicKey>() {
                    assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
                }
            }
        }
    }
});
