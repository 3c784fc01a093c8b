//! Property tests: no input makes a parser or the LAN panic, and what we
//! build parses back to what we meant.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use proptest::prelude::*;
use roam_vlan::wire::{arp, dhcp, ethernet, icmp, ipv4, udp, Mac};
use roam_vlan::{LanConfig, VirtualLan};

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

fn ip() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = ethernet::Frame::parse(&bytes);
        let _ = arp::Arp::parse(&bytes);
        let _ = ipv4::Packet::parse(&bytes);
        let _ = icmp::Message::parse(&bytes);
        let _ = udp::Datagram::parse(&bytes, Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST);
        let _ = dhcp::Message::parse(&bytes);
        let mut copy = bytes.clone();
        let _ = ipv4::rewrite_addrs(&mut copy, Some(Ipv4Addr::LOCALHOST), Some(Ipv4Addr::BROADCAST));
        let mut lan = VirtualLan::new(LanConfig::new(GUEST_MAC)).unwrap();
        let _ = lan.from_guest(&bytes);
        let _ = lan.from_host(&bytes);
    }

    /// Mostly-valid frames from the guest (right MACs, a valid IPv4 header,
    /// random protocol and payload) reach deep into the LAN without panicking.
    #[test]
    fn structured_guest_frames_never_panic(
        proto in prop_oneof![Just(1u8), Just(17u8), any::<u8>()],
        dst in prop_oneof![Just(Ipv4Addr::BROADCAST), Just(Ipv4Addr::new(198, 18, 100, 1)), ip()],
        src in prop_oneof![Just(Ipv4Addr::UNSPECIFIED), Just(Ipv4Addr::new(198, 18, 100, 2)), ip()],
        head in proptest::collection::vec(any::<u8>(), 0..12),
        body in proptest::collection::vec(any::<u8>(), 0..400),
        as_dhcp in any::<bool>(),
    ) {
        let mut lan = VirtualLan::new(LanConfig::new(GUEST_MAC)).unwrap();
        let payload = if as_dhcp {
            // UDP 68 -> 67 around a random DHCP-ish body with the magic cookie.
            let mut d = vec![1u8, 1, 6, 0];
            d.extend_from_slice(&head);
            d.resize(236, 0);
            d[28..34].copy_from_slice(&GUEST_MAC.0);
            d.extend_from_slice(&[0x63, 0x82, 0x53, 0x63]);
            d.extend_from_slice(&body);
            udp::build(src, dst, 68, 67, &d).unwrap()
        } else {
            let mut d = head.clone();
            d.extend_from_slice(&body);
            d
        };
        let p = ipv4::build(src, dst, if as_dhcp { 17 } else { proto }, 64, 1, &payload).unwrap();
        for dst_mac in [Mac::BROADCAST, lan.config().gateway_mac] {
            let f = ethernet::build(dst_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV4, &p);
            let _ = lan.from_guest(&f);
        }
        let s = lan.stats();
        prop_assert_eq!(s.frames_from_guest, 2);
    }

    #[test]
    fn ipv4_udp_round_trip(src in ip(), dst in ip(), sp in any::<u16>(), dp in any::<u16>(),
                           ttl in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let d = udp::build(src, dst, sp, dp, &payload).unwrap();
        let p = ipv4::build(src, dst, ipv4::PROTO_UDP, ttl, 9, &d).unwrap();
        let q = ipv4::Packet::parse(&p).unwrap();
        prop_assert_eq!((q.header.src, q.header.dst, q.header.ttl), (src, dst, ttl));
        let u = udp::Datagram::parse(q.payload, src, dst).unwrap();
        prop_assert_eq!((u.src_port, u.dst_port, u.payload), (sp, dp, &payload[..]));
    }

    /// NAT rewriting keeps both checksums valid for any addresses.
    #[test]
    fn rewrite_keeps_checksums(src in ip(), dst in ip(), a in ip(), b in ip(),
                               payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let d = udp::build(src, dst, 1, 2, &payload).unwrap();
        let mut p = ipv4::build(src, dst, ipv4::PROTO_UDP, 64, 1, &d).unwrap();
        ipv4::rewrite_addrs(&mut p, Some(a), Some(b)).unwrap();
        let q = ipv4::Packet::parse(&p).unwrap();
        prop_assert_eq!((q.header.src, q.header.dst), (a, b));
        prop_assert!(udp::Datagram::parse(q.payload, a, b).is_ok());
    }

    #[test]
    fn arp_round_trip(op in any::<u16>(), m1 in any::<[u8; 6]>(), m2 in any::<[u8; 6]>(), a in ip(), b in ip()) {
        let x = arp::Arp { op, sender_mac: Mac(m1), sender_ip: a, target_mac: Mac(m2), target_ip: b };
        prop_assert_eq!(arp::Arp::parse(&x.encode()).unwrap(), x);
    }

    #[test]
    fn dhcp_round_trip(xid in any::<u32>(), flags in any::<u16>(), a in ip(), b in ip(),
                       lease in proptest::option::of(any::<u32>()),
                       dns in proptest::collection::vec(ip(), 0..8),
                       params in proptest::collection::vec(any::<u8>(), 0..40),
                       t in 1u8..=8) {
        let types = [dhcp::MessageType::Discover, dhcp::MessageType::Offer, dhcp::MessageType::Request,
                     dhcp::MessageType::Decline, dhcp::MessageType::Ack, dhcp::MessageType::Nak,
                     dhcp::MessageType::Release, dhcp::MessageType::Inform];
        let m = dhcp::Message {
            op: 1, xid, secs: 0, flags, ciaddr: a, yiaddr: b, siaddr: a, giaddr: b, chaddr: GUEST_MAC,
            options: dhcp::Options {
                message_type: Some(types[usize::from(t - 1)]),
                server_id: Some(a), requested_ip: Some(b), lease_secs: lease,
                subnet_mask: Some(b), routers: vec![a], dns, mtu: Some(1400),
                parameter_list: params, ..dhcp::Options::default()
            },
        };
        prop_assert_eq!(dhcp::Message::parse(&m.encode()).unwrap(), m);
    }
}
