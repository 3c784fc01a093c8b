//! Property tests of the pure parts: BEET rewriting and the carried-state
//! container.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use proptest::prelude::*;
use roam_hip::Hit;
use roam_hipnet::backend::SaState;
use roam_hipnet::beet::{inbound, internet_checksum, outbound, View};
use roam_hipnet::handover::{decode, encode, Carried};

fn hit(last: u16) -> Hit {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x22]);
    h[14..].copy_from_slice(&last.to_be_bytes());
    Hit(h)
}

fn lsi(x: u16) -> Ipv4Addr {
    let [a, b] = x.to_be_bytes();
    Ipv4Addr::new(198, 19, a, b)
}

/// IPv4 + TCP or UDP with valid checksums.
fn packet(src: Ipv4Addr, dst: Ipv4Addr, tcp: bool, data: &[u8]) -> Vec<u8> {
    let th = if tcp { 20 } else { 8 };
    let seg_len = th + data.len();
    let proto = if tcp { 6 } else { 17 };
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&((20 + seg_len) as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = internet_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let mut seg = vec![0u8; th];
    seg[..4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    if tcp {
        seg[12] = 0x50;
    } else {
        seg[4..6].copy_from_slice(&(seg_len as u16).to_be_bytes());
    }
    seg.extend_from_slice(data);
    let at = if tcp { 16 } else { 6 };
    let mut c = l4_checksum(src, dst, proto, &seg);
    if !tcp && c == 0 {
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&seg);
    p
}

fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    let at = if proto == 6 { 16 } else { 6 };
    let mut ph = src.octets().to_vec();
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut s = seg.to_vec();
    s[at] = 0;
    s[at + 1] = 0;
    ph.extend_from_slice(&s);
    internet_checksum(&ph)
}

proptest! {
    #[test]
    fn lsi_packets_arrive_with_valid_checksums(
        a in 1u16..0xfffe, b in 1u16..0xfffe, c in 1u16..0xfffe, d in 1u16..0xfffe,
        tcp in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        let pkt = packet(lsi(a), lsi(b), tcp, &data);
        let o = outbound(&pkt, &hit(1)).unwrap();
        let view = View { our_hit: hit(2), peer_hit: hit(1), our_lsi: lsi(c), peer_lsi: lsi(d) };
        let r = inbound(o.next_header, o.payload, &view).unwrap();
        prop_assert_eq!(r.len(), pkt.len());
        prop_assert_eq!(internet_checksum(&r[..20]), 0);
        let proto = r[9];
        let at = if tcp { 16 } else { 6 };
        let got = u16::from_be_bytes([r[20 + at], r[21 + at]]);
        let mut want = l4_checksum(lsi(d), lsi(c), proto, &r[20..]);
        if !tcp && want == 0 {
            want = 0xffff;
        }
        prop_assert_eq!(got, want);
        prop_assert_eq!(&r[20 + if tcp { 20 } else { 8 }..], &data[..]);
    }

    #[test]
    fn hit_packets_round_trip(nh in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 1..2000)) {
        prop_assume!(nh != 4);
        let (a, b) = (hit(1), hit(2));
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(data.len() as u16).to_be_bytes());
        p.extend_from_slice(&[nh, 64]);
        p.extend_from_slice(&a.0);
        p.extend_from_slice(&b.0);
        p.extend_from_slice(&data);
        let o = outbound(&p, &a).unwrap();
        let view = View { our_hit: b, peer_hit: a, our_lsi: lsi(2), peer_lsi: lsi(1) };
        prop_assert_eq!(inbound(o.next_header, o.payload, &view).unwrap(), p);
    }

    #[test]
    fn arbitrary_bytes_never_panic(nh in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let view = View { our_hit: hit(2), peer_hit: hit(1), our_lsi: lsi(2), peer_lsi: lsi(1) };
        let _ = outbound(&data, &hit(1));
        let _ = inbound(nh, &data, &view);
        let _ = decode(&data);
    }

    #[test]
    fn carried_state_round_trips(entries in proptest::collection::vec(
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..8)
    ) {
        let v: Vec<Carried> = entries.into_iter().map(|(o, t, b, l, blob)| Carried {
            sa: SaState { out_seq: o, in_top: t, in_bitmap: b },
            lsi: lsi(l),
            blob,
        }).collect();
        let bytes = encode(&v);
        prop_assert_eq!(decode(&bytes).unwrap(), v);
        for cut in [0, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(decode(&bytes[..cut]).is_err());
        }
    }
}
