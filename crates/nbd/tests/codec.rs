//! Codec round-trips and "never panics on arbitrary bytes".

#![allow(clippy::unwrap_used)] // tests may unwrap

use proptest::prelude::*;
use roam_nbd::proto::handshake::{
    self, decode_greeting, encode_greeting, info_requests, ClientFlags, ClientOption, InfoItem,
    OptionError, OptionHeader, OptionReplyHeader,
};
use roam_nbd::proto::{
    self, check_request, cmd, cmdflags, errno, opt, rep, tflags, Action, Request, SimpleReply,
};

#[test]
fn greeting_has_fixed_newstyle_and_no_zeroes() {
    let g = encode_greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(decode_greeting(&g).unwrap(), 3);
}

#[test]
fn client_flags_unknown_bits_rejected() {
    assert!(ClientFlags::decode(&4u32.to_be_bytes()).is_err());
    assert!(ClientFlags::decode(&0u32.to_be_bytes()).is_err());
    assert_eq!(
        ClientFlags::decode(&3u32.to_be_bytes()).unwrap(),
        ClientFlags { no_zeroes: true }
    );
}

#[test]
fn option_header_caps_length_before_allocation() {
    let h = OptionHeader {
        option: opt::GO,
        length: proto::MAX_OPTION_LEN + 1,
    };
    assert!(matches!(
        OptionHeader::decode(&h.encode()),
        Err(handshake::HandshakeError::OptionTooLong(_))
    ));
    let mut bad = h.encode();
    bad[0] ^= 1;
    assert!(matches!(
        OptionHeader::decode(&bad),
        Err(handshake::HandshakeError::BadMagic(_))
    ));
}

#[test]
fn go_payload_inconsistent_count_is_invalid() {
    let mut data = Vec::new();
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(b"disk");
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&3u16.to_be_bytes()); // only one of two
    let e = ClientOption::decode(opt::GO, &data).unwrap_err();
    assert_eq!(e.reply_type(), rep::ERR_INVALID);

    let mut long = Vec::new();
    long.extend_from_slice(&5000u32.to_be_bytes());
    long.extend_from_slice(&[b'a'; 5000]);
    long.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        ClientOption::decode(opt::INFO, &long).unwrap_err(),
        OptionError::NameTooLong
    );
}

#[test]
fn unknown_and_unsupported_options_decode_as_unsupported() {
    for o in [
        opt::STRUCTURED_REPLY,
        opt::STARTTLS,
        opt::SET_META_CONTEXT,
        999,
    ] {
        assert_eq!(
            ClientOption::decode(o, b"xyz").unwrap(),
            ClientOption::Unsupported(o)
        );
    }
    assert!(ClientOption::decode(opt::LIST, b"x").is_err());
}

#[test]
fn info_items_round_trip() {
    let mut out = Vec::new();
    handshake::encode_info_export(&mut out, opt::GO, 1 << 40, 0x1ff);
    handshake::encode_info_block_size(&mut out, opt::GO);
    handshake::encode_info_name(&mut out, opt::GO, "vm-desk");
    let mut items = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let h = OptionReplyHeader::decode(rest[..20].try_into().unwrap()).unwrap();
        assert_eq!(h.reply_type, rep::INFO);
        let body = &rest[20..20 + h.length as usize];
        items.push(InfoItem::decode(body).unwrap());
        rest = &rest[20 + h.length as usize..];
    }
    assert_eq!(
        items,
        vec![
            InfoItem::Export {
                size: 1 << 40,
                flags: 0x1ff
            },
            InfoItem::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            },
            InfoItem::Name("vm-desk".into()),
        ]
    );
}

#[test]
fn transmission_flags_follow_read_only() {
    let rw = proto::transmission_flags(false);
    assert!(rw & tflags::SEND_TRIM != 0 && rw & tflags::READ_ONLY == 0);
    let ro = proto::transmission_flags(true);
    assert!(ro & tflags::READ_ONLY != 0 && ro & tflags::SEND_WRITE_ZEROES == 0);
    for f in [rw, ro] {
        assert!(f & tflags::HAS_FLAGS != 0 && f & tflags::SEND_FLUSH != 0);
        assert!(f & tflags::SEND_FUA != 0 && f & tflags::CAN_MULTI_CONN != 0);
    }
}

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 7,
        offset,
        length,
    }
}

#[test]
fn check_request_errors() {
    let size = 1 << 20;
    // Reads past the end: EINVAL, nothing to skip.
    let r = check_request(&req(cmd::READ, 0, size - 10, 20), size, false).unwrap_err();
    assert_eq!((r.errno, r.skip, r.close), (errno::EINVAL, 0, false));
    // Writes past the end: ENOSPC, payload skipped.
    let r = check_request(&req(cmd::WRITE, 0, size - 10, 20), size, false).unwrap_err();
    assert_eq!((r.errno, r.skip, r.close), (errno::ENOSPC, 20, false));
    // Offset overflow.
    let r = check_request(&req(cmd::TRIM, 0, u64::MAX, 2), size, false).unwrap_err();
    assert_eq!(r.errno, errno::ENOSPC);
    // Read-only.
    let r = check_request(&req(cmd::WRITE, 0, 0, 512), size, true).unwrap_err();
    assert_eq!((r.errno, r.skip), (errno::EPERM, 512));
    let r = check_request(&req(cmd::WRITE_ZEROES, 0, 0, 512), size, true).unwrap_err();
    assert_eq!((r.errno, r.skip), (errno::EPERM, 0));
    // Oversized write: cannot skip cheaply, so close.
    let r = check_request(
        &req(cmd::WRITE, 0, 0, proto::MAX_REQUEST_LEN + 1),
        u64::MAX,
        false,
    )
    .unwrap_err();
    assert!(r.close);
    // Oversized read: EINVAL, stay open.
    let r = check_request(
        &req(cmd::READ, 0, 0, proto::MAX_REQUEST_LEN + 1),
        u64::MAX,
        false,
    )
    .unwrap_err();
    assert_eq!((r.errno, r.close), (errno::EINVAL, false));
    // Unknown command and unknown flags.
    assert_eq!(
        check_request(&req(cmd::BLOCK_STATUS, 0, 0, 1), size, false)
            .unwrap_err()
            .errno,
        errno::EINVAL
    );
    assert_eq!(
        check_request(&req(cmd::READ, cmdflags::DF, 0, 1), size, false)
            .unwrap_err()
            .errno,
        errno::EINVAL
    );
    // NO_HOLE only on WRITE_ZEROES.
    assert!(check_request(&req(cmd::WRITE, cmdflags::NO_HOLE, 0, 1), size, false).is_err());
    assert_eq!(
        check_request(
            &req(
                cmd::WRITE_ZEROES,
                cmdflags::NO_HOLE | cmdflags::FUA,
                0,
                4096
            ),
            size,
            false
        )
        .unwrap(),
        Action::WriteZeroes {
            offset: 0,
            len: 4096,
            may_trim: false,
            fua: true
        }
    );
    // Trims bigger than the block size limit are fine (no payload).
    assert!(check_request(&req(cmd::TRIM, 0, 0, u32::MAX), u64::MAX, false).is_ok());
}

proptest! {
    #[test]
    fn request_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request { flags, kind, cookie, offset, length };
        prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn reply_round_trip(error: u32, cookie: u64) {
        let r = SimpleReply { error, cookie };
        prop_assert_eq!(SimpleReply::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn option_reply_header_round_trip(option: u32, reply_type: u32, length: u32) {
        let h = OptionReplyHeader { option, reply_type, length };
        prop_assert_eq!(OptionReplyHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn go_info_round_trip(name in "[a-zA-Z0-9_./-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..8), go: bool) {
        let raw: Vec<u8> = reqs.iter().flat_map(|r| r.to_be_bytes()).collect();
        let requests = info_requests(&raw);
        let o = if go { ClientOption::Go { name: &name, requests } } else { ClientOption::Info { name: &name, requests } };
        let mut wire = Vec::new();
        o.encode(&mut wire);
        let h = OptionHeader::decode(wire[..16].try_into().unwrap()).unwrap();
        prop_assert_eq!(h.length as usize, wire.len() - 16);
        let back = ClientOption::decode(h.option, &wire[16..]).unwrap();
        prop_assert_eq!(&back, &o);
        match back {
            ClientOption::Go { requests, .. } | ClientOption::Info { requests, .. } => {
                prop_assert_eq!(requests.iter().collect::<Vec<_>>(), reqs);
            }
            _ => prop_assert!(false),
        }
    }

    #[test]
    fn export_name_round_trip(name in "\\PC{0,100}") {
        let o = ClientOption::ExportName(&name);
        let mut wire = Vec::new();
        o.encode(&mut wire);
        let h = OptionHeader::decode(wire[..16].try_into().unwrap()).unwrap();
        prop_assert_eq!(ClientOption::decode(h.option, &wire[16..]).unwrap(), o);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), option: u32, size: u64, ro: bool) {
        let _ = ClientOption::decode(option, &bytes);
        let _ = ClientOption::decode(opt::GO, &bytes);
        let _ = ClientOption::decode(opt::INFO, &bytes);
        let _ = InfoItem::decode(&bytes);
        if bytes.len() >= 28 {
            if let Ok(r) = Request::decode(bytes[..28].try_into().unwrap()) {
                let _ = check_request(&r, size, ro);
            }
            let _ = OptionHeader::decode(bytes[..16].try_into().unwrap());
            let _ = OptionReplyHeader::decode(bytes[..20].try_into().unwrap());
            let _ = ClientFlags::decode(bytes[..4].try_into().unwrap());
        }
    }

    #[test]
    fn valid_actions_stay_in_bounds(kind in 0u16..9, flags in 0u16..32, offset in 0u64..(1<<21), length in 0u32..(1<<21), ro: bool) {
        let size = 1u64 << 20;
        let r = Request { flags, kind, cookie: 1, offset, length };
        match check_request(&r, size, ro) {
            Ok(Action::Read { offset, len }) => prop_assert!(offset + u64::from(len) <= size),
            Ok(Action::Write { offset, len, .. }) | Ok(Action::Trim { offset, len, .. })
            | Ok(Action::WriteZeroes { offset, len, .. }) => {
                prop_assert!(!ro);
                prop_assert!(offset + u64::from(len) <= size);
            }
            Ok(Action::Flush) | Ok(Action::Disconnect) => {}
            Err(rej) => {
                prop_assert!(rej.errno != 0);
                prop_assert_eq!(rej.skip, r.payload_len());
            }
        }
    }
}
