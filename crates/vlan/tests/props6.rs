//! Property tests of the IPv6 side: the NAT's incremental checksum fix agrees
//! with a full recomputation for any addresses and payloads, and no input makes
//! a parser, the rewrite or the LAN panic.

#![allow(clippy::unwrap_used)]

use std::net::Ipv6Addr;

use proptest::prelude::*;
use roam_vlan::wire::{ethernet, icmpv6, ipv6, Mac};
use roam_vlan::{Ipv6Lan, LanConfig, VirtualLan};

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
const HIT: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2a, 1, 2, 3, 4, 5, 6);

fn addr() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

fn lan() -> VirtualLan {
    let mut c = LanConfig::new(GUEST_MAC);
    c.ipv6 = Some(Ipv6Lan {
        prefix: ipv6::ula_prefix([1, 2, 3, 4, 5]),
        outside: HIT,
    });
    VirtualLan::new(c).unwrap()
}

/// An upper-layer message of `proto` (TCP, UDP or ICMPv6) with a random body
/// and a correct checksum for `src` → `dst`.
fn upper(proto: u8, src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> Vec<u8> {
    let (len, at) = match proto {
        ipv6::PROTO_TCP => (20, 16),
        ipv6::PROTO_UDP => (8, 6),
        _ => (4, 2),
    };
    let mut m = vec![0u8; len];
    m[..len.min(body.len())].copy_from_slice(&body[..len.min(body.len())]);
    m.extend_from_slice(&body[len.min(body.len())..]);
    if proto == ipv6::PROTO_UDP {
        let l = m.len() as u16;
        m[4..6].copy_from_slice(&l.to_be_bytes());
    }
    m[at..at + 2].copy_from_slice(&[0, 0]);
    let mut c = ipv6::upper_checksum(src, dst, proto, &m);
    if c == 0 && proto == ipv6::PROTO_UDP {
        c = 0xffff;
    }
    m[at..at + 2].copy_from_slice(&c.to_be_bytes());
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// RFC 1624 in the NAT: after any rewrite the checksum verifies exactly as a
    /// freshly computed one would, and rewriting back restores the message.
    #[test]
    fn rewrite_keeps_transport_checksums(
        proto in prop_oneof![Just(ipv6::PROTO_TCP), Just(ipv6::PROTO_UDP), Just(ipv6::PROTO_ICMPV6)],
        src in addr(), dst in addr(), a in addr(), b in addr(),
        body in proptest::collection::vec(any::<u8>(), 20..600),
        which in 0u8..3,
    ) {
        let m = upper(proto, src, dst, &body);
        let mut p = ipv6::build(src, dst, proto, 64, &m).unwrap();
        prop_assert!(ipv6::transport_checksum_ok(&ipv6::Packet::parse(&p).unwrap()));
        let (ns, nd) = match which { 0 => (Some(a), None), 1 => (None, Some(b)), _ => (Some(a), Some(b)) };
        ipv6::rewrite_addrs(&mut p, ns, nd).unwrap();
        let q = ipv6::Packet::parse(&p).unwrap();
        prop_assert_eq!((q.header.src, q.header.dst), (ns.unwrap_or(src), nd.unwrap_or(dst)));
        prop_assert!(ipv6::transport_checksum_ok(&q));
        // Everything but the checksum field is untouched; the checksum itself
        // equals a full recomputation up to the two encodings of zero.
        let at = match proto { ipv6::PROTO_TCP => 16, ipv6::PROTO_UDP => 6, _ => 2 };
        let mut fresh = q.payload.to_vec();
        fresh[at..at + 2].copy_from_slice(&[0, 0]);
        let full = ipv6::upper_checksum(q.header.src, q.header.dst, proto, &fresh);
        let got = u16::from_be_bytes([q.payload[at], q.payload[at + 1]]);
        prop_assert!(got == full || (got | full) == 0xffff && (got & full) == 0,
                     "incremental {:#06x}, full {:#06x}", got, full);
        let mut body_now = q.payload.to_vec();
        body_now[at..at + 2].copy_from_slice(&m[at..at + 2]);
        prop_assert_eq!(&body_now, &m);
        ipv6::rewrite_addrs(&mut p, Some(src), Some(dst)).unwrap();
        let r = ipv6::Packet::parse(&p).unwrap();
        prop_assert!(ipv6::transport_checksum_ok(&r));
    }

    /// The guest's packets through the LAN and the peers' back: always NATed
    /// with a verifying checksum, whatever the payload.
    #[test]
    fn lan_nat_round_trip(
        proto in prop_oneof![Just(ipv6::PROTO_TCP), Just(ipv6::PROTO_UDP), Just(ipv6::PROTO_ICMPV6)],
        iid in any::<[u8; 8]>(), peer_low in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 20..1200),
    ) {
        let mut l = lan();
        let me = ipv6::with_iid(ipv6::ula_prefix([1, 2, 3, 4, 5]), iid);
        prop_assume!(me != ipv6::ula_prefix([1, 2, 3, 4, 5]));
        let peer = Ipv6Addr::from((0x2001_002b_u128 << 96) | u128::from(peer_low));
        let m = upper(proto, me, peer, &body);
        let p = ipv6::build(me, peer, proto, 64, &m).unwrap();
        let f = ethernet::build(l.config().gateway_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV6, &p);
        let Some(roam_vlan::Action::ToHost(out)) = l.from_guest(&f) else {
            return Err(TestCaseError::fail("not forwarded"));
        };
        let q = ipv6::Packet::parse(&out).unwrap();
        prop_assert_eq!((q.header.src, q.header.dst), (HIT, peer));
        prop_assert!(ipv6::transport_checksum_ok(&q));
        let back = ipv6::build(peer, HIT, proto, 64, &upper(proto, peer, HIT, &body)).unwrap();
        let f = l.from_host(&back).unwrap();
        let q = ipv6::Packet::parse(&f[ethernet::HEADER_LEN..]).unwrap();
        prop_assert_eq!((q.header.src, q.header.dst), (peer, me));
        prop_assert!(ipv6::transport_checksum_ok(&q));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700),
                                   a in addr(), b in addr()) {
        let _ = ipv6::Packet::parse(&bytes).map(|p| p.transport());
        let _ = icmpv6::Message::parse(&bytes, a, b);
        let _ = icmpv6::Options::parse(&bytes);
        let mut copy = bytes.clone();
        let _ = ipv6::rewrite_addrs(&mut copy, Some(a), Some(b));
        let mut l = lan();
        let f = ethernet::build(l.config().gateway_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV6, &bytes);
        let _ = l.from_guest(&f);
        let _ = l.from_host(&bytes);
    }

    /// Valid IPv6 headers around random ICMPv6/extension-header bodies, to the
    /// gateway, to multicast groups and off-link, reach deep into the LAN.
    #[test]
    fn structured_guest_frames_never_panic(
        nh in prop_oneof![Just(58u8), Just(0u8), Just(44u8), Just(60u8), any::<u8>()],
        typ in prop_oneof![Just(133u8), Just(135u8), Just(128u8), any::<u8>()],
        src_ll in any::<bool>(),
        dst in prop_oneof![Just(0u8), Just(1u8), Just(2u8)],
        hop in prop_oneof![Just(255u8), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut l = lan();
        let gw = l.config().gateway_ll();
        let src = if src_ll { ipv6::link_local(GUEST_MAC) } else { Ipv6Addr::UNSPECIFIED };
        let (dst, mac) = match dst {
            0 => (gw, l.config().gateway_mac),
            1 => {
                let g = ipv6::solicited_node(gw);
                (g, ipv6::multicast_mac(g))
            }
            _ => (HIT, l.config().gateway_mac),
        };
        let mut m = vec![typ, 0, 0, 0];
        m.extend_from_slice(&body);
        let c = ipv6::upper_checksum(src, dst, 58, &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let p = ipv6::build(src, dst, nh, hop, &m).unwrap();
        let f = ethernet::build(mac, GUEST_MAC, ethernet::ETHERTYPE_IPV6, &p);
        let _ = l.from_guest(&f);
        prop_assert_eq!(l.stats().frames_from_guest, 1);
    }
}
