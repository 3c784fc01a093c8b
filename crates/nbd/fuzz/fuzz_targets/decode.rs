//! Feeds arbitrary bytes to every decoder a client can reach: client flags,
//! option headers and payloads, request headers and their validation.
//! Invariants checked: no panic, and anything accepted stays within caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roam_nbd::proto::handshake::{ClientFlags, ClientOption, InfoItem, OptionHeader};
use roam_nbd::proto::{check_request, Action, Request, MAX_OPTION_LEN, MAX_REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            // A handshake stream: flags, then options until the bytes run out.
            let Some((flags, mut rest)) = rest.split_first_chunk::<4>() else {
                return;
            };
            let _ = ClientFlags::decode(flags);
            while let Some((h, tail)) = rest.split_first_chunk::<{ OptionHeader::LEN }>() {
                let Ok(h) = OptionHeader::decode(h) else { return };
                assert!(h.length <= MAX_OPTION_LEN);
                let Some(payload) = tail.get(..h.length as usize) else { return };
                let _ = ClientOption::decode(h.option, payload);
                rest = &tail[h.length as usize..];
            }
        }
        1 => {
            // A transmission stream against a small export, read-only or not.
            let size = 1u64 << 20;
            let ro = rest.first().is_some_and(|b| b & 1 == 1);
            let mut rest = rest.get(1..).unwrap_or_default();
            while let Some((h, tail)) = rest.split_first_chunk::<{ Request::LEN }>() {
                let Ok(r) = Request::decode(h) else { return };
                match check_request(&r, size, ro) {
                    Ok(Action::Read { offset, len }) => {
                        assert!(len <= MAX_REQUEST_LEN && offset + u64::from(len) <= size)
                    }
                    Ok(Action::Write { offset, len, .. }) => {
                        assert!(!ro && len <= MAX_REQUEST_LEN && offset + u64::from(len) <= size)
                    }
                    Ok(_) => {}
                    Err(rej) => assert!(rej.close || rej.skip == r.payload_len()),
                }
                let skip = (r.payload_len() as usize).min(tail.len());
                rest = &tail[skip..];
            }
        }
        2 => {
            let _ = InfoItem::decode(rest);
        }
        _ => {
            let option = rest.first().map_or(0, |&b| u32::from(b % 12));
            let _ = ClientOption::decode(option, rest.get(1..).unwrap_or_default());
        }
    }
});
