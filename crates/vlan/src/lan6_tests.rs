//! Unit tests of the LAN's IPv6 side: a scripted SLAAC guest against `VirtualLan`.

use std::net::Ipv6Addr;

use super::*;
use crate::config::{Ipv6Lan, LanConfig};
use crate::wire::icmpv6::{self, Message};
use crate::wire::{ethernet, ipv6, Mac};

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const HIT: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2a, 0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666);
const PEER_HIT: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2b, 1, 2, 3, 4, 5, 6);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn cfg() -> LanConfig {
    let mut c = LanConfig::new(GUEST_MAC);
    c.ipv6 = Some(Ipv6Lan {
        prefix: ipv6::ula_prefix([0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
        outside: HIT,
    });
    c
}

fn lan() -> VirtualLan {
    VirtualLan::new(cfg()).unwrap()
}

fn guest_ll() -> Ipv6Addr {
    ipv6::link_local(GUEST_MAC)
}

/// The address a default Linux guest configures: prefix + EUI-64.
fn slaac() -> Ipv6Addr {
    ipv6::with_iid(cfg().ipv6.unwrap().prefix, ipv6::eui64(GUEST_MAC))
}

fn frame6(dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, hop: u8, l4: &[u8]) -> Vec<u8> {
    let p = ipv6::build(src, dst, proto, hop, l4).unwrap();
    ethernet::build(dst_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV6, &p)
}

fn nd(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> Vec<u8> {
    let mac = if dst.is_multicast() {
        ipv6::multicast_mac(dst)
    } else {
        cfg().gateway_mac
    };
    frame6(mac, src, dst, ipv6::PROTO_ICMPV6, 255, icmp)
}

/// A TCP segment (20-byte header, ports 40000 → 7) with a valid checksum.
fn tcp(src: Ipv6Addr, dst: Ipv6Addr, data: &[u8]) -> Vec<u8> {
    let mut s = vec![
        0x9c, 0x40, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
    ];
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(data);
    let c = ipv6::upper_checksum(src, dst, ipv6::PROTO_TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// Decodes a frame to the guest: (Ethernet dst, the IPv6 packet's bytes).
fn to_guest(a: Option<Action>) -> (Mac, Vec<u8>) {
    let Some(Action::ToGuest(f)) = a else {
        panic!("expected a frame to the guest, got {a:?}")
    };
    let e = ethernet::Frame::parse(&f).unwrap();
    assert_eq!(e.src, cfg().gateway_mac);
    assert_eq!(e.ethertype, ethernet::ETHERTYPE_IPV6);
    (e.dst, e.payload.to_vec())
}

fn icmp_of<'a>(p: &ipv6::Packet<'a>) -> Message<'a> {
    Message::parse(p.payload, p.header.src, p.header.dst).unwrap()
}

#[test]
fn dad_for_link_local_passes_and_rs_gets_the_prefix() {
    let mut l = lan();
    // DAD probe for the link-local address: silence (so DAD succeeds).
    let ns = icmpv6::neighbor_solicit(
        Ipv6Addr::UNSPECIFIED,
        ipv6::solicited_node(guest_ll()),
        guest_ll(),
        None,
    );
    assert_eq!(
        l.from_guest(&nd(
            Ipv6Addr::UNSPECIFIED,
            ipv6::solicited_node(guest_ll()),
            &ns
        )),
        None
    );
    assert_eq!(l.stats().ipv6_learned, 0);
    // Router solicitation from the link-local address: unicast RA back.
    let rs = icmpv6::router_solicit(guest_ll(), ALL_ROUTERS, Some(GUEST_MAC));
    let (mac, pkt) = to_guest(l.from_guest(&nd(guest_ll(), ALL_ROUTERS, &rs)));
    assert_eq!(mac, GUEST_MAC);
    let p = ipv6::Packet::parse(&pkt).unwrap();
    assert_eq!(p.header.src, cfg().gateway_ll());
    assert_eq!(p.header.dst, guest_ll());
    assert_eq!(p.header.hop_limit, 255);
    let ra = icmpv6::parse_router_advert(&icmp_of(&p)).unwrap();
    assert_eq!(ra.prefix, Some((cfg().ipv6.unwrap().prefix, 64)));
    assert_eq!(ra.source_ll, cfg().gateway_mac);
    assert_eq!(ra.mtu, Some(1400));
    assert_eq!((ra.prefix_valid, ra.prefix_preferred), (u32::MAX, u32::MAX));
    assert_eq!(ra.router_lifetime, ROUTER_LIFETIME_SECS);
    // From :: the answer goes to all nodes.
    let rs = icmpv6::router_solicit(Ipv6Addr::UNSPECIFIED, ALL_ROUTERS, None);
    let (mac, pkt) = to_guest(l.from_guest(&nd(Ipv6Addr::UNSPECIFIED, ALL_ROUTERS, &rs)));
    assert_eq!(mac, ipv6::multicast_mac(ALL_NODES));
    assert_eq!(ipv6::Packet::parse(&pkt).unwrap().header.dst, ALL_NODES);
    assert_eq!(l.stats().router_adverts, 2);
    // The periodic one is the same advertisement to all nodes.
    let f = l.router_advert().unwrap();
    assert_eq!(
        ethernet::Frame::parse(&f).unwrap().dst,
        ipv6::multicast_mac(ALL_NODES)
    );
}

#[test]
fn dad_for_the_slaac_address_is_learned_not_answered() {
    let mut l = lan();
    let other = ipv6::with_iid(cfg().ipv6.unwrap().prefix, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        l.guest_ipv6(),
        Some(slaac()),
        "EUI-64 guess before anything is seen"
    );
    let ns = icmpv6::neighbor_solicit(
        Ipv6Addr::UNSPECIFIED,
        ipv6::solicited_node(other),
        other,
        None,
    );
    assert_eq!(
        l.from_guest(&nd(Ipv6Addr::UNSPECIFIED, ipv6::solicited_node(other), &ns)),
        None
    );
    assert_eq!(l.guest_ipv6(), Some(other));
    assert_eq!(l.stats().ipv6_learned, 1);
    // Traffic from another address in the prefix is not the guest's now.
    let seg = tcp(slaac(), PEER_HIT, b"x");
    let f = frame6(
        cfg().gateway_mac,
        slaac(),
        PEER_HIT,
        ipv6::PROTO_TCP,
        64,
        &seg,
    );
    assert_eq!(l.from_guest(&f), None);
    assert_eq!(l.stats().spoofed, 1);
}

#[test]
fn neighbor_solicitation_for_the_gateway_is_answered() {
    let mut l = lan();
    let gw = cfg().gateway_ll();
    for dst in [ipv6::solicited_node(gw), gw] {
        let ns = icmpv6::neighbor_solicit(guest_ll(), dst, gw, Some(GUEST_MAC));
        let (mac, pkt) = to_guest(l.from_guest(&nd(guest_ll(), dst, &ns)));
        assert_eq!(mac, GUEST_MAC);
        let p = ipv6::Packet::parse(&pkt).unwrap();
        assert_eq!((p.header.src, p.header.dst), (gw, guest_ll()));
        let (flags, target, o) = icmp_of(&p).neighbor_advert().unwrap();
        assert_eq!(target, gw);
        assert_eq!(o.target_ll, Some(cfg().gateway_mac));
        assert!(flags & icmpv6::NA_SOLICITED != 0);
        assert!(flags & icmpv6::NA_ROUTER != 0);
    }
    // Not from our link (hop limit decremented): dropped.
    let ns = icmpv6::neighbor_solicit(guest_ll(), gw, gw, Some(GUEST_MAC));
    let f = frame6(
        cfg().gateway_mac,
        guest_ll(),
        gw,
        ipv6::PROTO_ICMPV6,
        254,
        &ns,
    );
    assert_eq!(l.from_guest(&f), None);
    // Another MAC in the option: spoofed.
    let ns = icmpv6::neighbor_solicit(guest_ll(), gw, gw, Some(Mac([2, 0, 0, 0, 0, 9])));
    assert_eq!(l.from_guest(&nd(guest_ll(), gw, &ns)), None);
    assert_eq!(l.stats().spoofed, 1);
    assert_eq!(l.stats().neighbor_adverts, 2);
    // An echo to the gateway is answered.
    let e = icmpv6::echo(slaac(), gw, icmpv6::ECHO_REQUEST, 5, 6, b"ping");
    let f = frame6(cfg().gateway_mac, slaac(), gw, ipv6::PROTO_ICMPV6, 64, &e);
    let (_, pkt) = to_guest(l.from_guest(&f));
    let p = ipv6::Packet::parse(&pkt).unwrap();
    assert_eq!(icmp_of(&p).echo(), Some((5, 6, &b"ping"[..])));
    assert_eq!(p.header.dst, slaac());
}

#[test]
fn guest_traffic_is_natted_to_the_outside_address_and_back() {
    let mut l = lan();
    // Out: source becomes the HIT, checksum still valid, learned from traffic.
    let seg = tcp(slaac(), PEER_HIT, b"hello");
    let f = frame6(
        cfg().gateway_mac,
        slaac(),
        PEER_HIT,
        ipv6::PROTO_TCP,
        64,
        &seg,
    );
    let Some(Action::ToHost(out)) = l.from_guest(&f) else {
        panic!("not forwarded")
    };
    let p = ipv6::Packet::parse(&out).unwrap();
    assert_eq!((p.header.src, p.header.dst), (HIT, PEER_HIT));
    assert!(ipv6::transport_checksum_ok(&p));
    assert_eq!(l.stats().ipv6_learned, 1);
    // In: to the HIT, delivered to the guest's address.
    let seg = tcp(PEER_HIT, HIT, b"world");
    let back = ipv6::build(PEER_HIT, HIT, ipv6::PROTO_TCP, 64, &seg).unwrap();
    let frame = l.from_host(&back).unwrap();
    let e = ethernet::Frame::parse(&frame).unwrap();
    assert_eq!((e.dst, e.ethertype), (GUEST_MAC, ethernet::ETHERTYPE_IPV6));
    let p = ipv6::Packet::parse(e.payload).unwrap();
    assert_eq!((p.header.src, p.header.dst), (PEER_HIT, slaac()));
    assert!(ipv6::transport_checksum_ok(&p));
    assert_eq!(&p.payload[20..], b"world");
    assert_eq!(l.stats().from_host, 1);
    // Not to the outside address, from an on-link source, or too big: dropped.
    let wrong = ipv6::build(PEER_HIT, PEER_HIT, ipv6::PROTO_TCP, 64, &seg).unwrap();
    let onlink = ipv6::build(slaac(), HIT, ipv6::PROTO_TCP, 64, &seg).unwrap();
    let big = ipv6::build(PEER_HIT, HIT, 59, 64, &[0; 1400]).unwrap();
    for p in [wrong, onlink, big] {
        assert_eq!(l.from_host(&p), None);
    }
    assert_eq!(l.stats().from_host_dropped, 3);
}

#[test]
fn only_off_link_unicast_from_the_guest_is_forwarded() {
    let mut l = lan();
    let prefix = cfg().ipv6.unwrap().prefix;
    let neighbour = ipv6::with_iid(prefix, [9; 8]);
    let cases = [
        // To another address in the prefix: nobody there.
        (cfg().gateway_mac, slaac(), neighbour),
        // To a link-local address that is not the gateway.
        (
            cfg().gateway_mac,
            slaac(),
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9),
        ),
        // From the link-local address to a HIT (the guest would use its global one).
        (cfg().gateway_mac, guest_ll(), PEER_HIT),
        // Unicast in a frame not addressed to the gateway.
        (Mac::BROADCAST, slaac(), PEER_HIT),
    ];
    for (mac, src, dst) in cases {
        let f = frame6(mac, src, dst, ipv6::PROTO_TCP, 64, &tcp(src, dst, b"x"));
        assert_eq!(l.from_guest(&f), None, "{src} -> {dst}");
    }
    assert_eq!(l.stats().to_host, 0);
    // MLD report (hop-by-hop, ICMPv6 143) to ff02::16: ignored, not malformed.
    let mut hbh = vec![ipv6::PROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0];
    let mld_dst: Ipv6Addr = "ff02::16".parse().unwrap();
    let mut m = vec![143, 0, 0, 0, 0, 0, 0, 0];
    let c = ipv6::upper_checksum(guest_ll(), mld_dst, ipv6::PROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    hbh.extend_from_slice(&m);
    let before = l.stats();
    let f = frame6(
        ipv6::multicast_mac(mld_dst),
        guest_ll(),
        mld_dst,
        0,
        1,
        &hbh,
    );
    assert_eq!(l.from_guest(&f), None);
    assert_eq!(l.stats().ignored, before.ignored + 1);
    assert_eq!(l.stats().malformed, before.malformed);
}

#[test]
fn without_ipv6_config_ipv6_is_dropped() {
    let mut l = VirtualLan::new(LanConfig::new(GUEST_MAC)).unwrap();
    let rs = icmpv6::router_solicit(guest_ll(), ALL_ROUTERS, Some(GUEST_MAC));
    assert_eq!(l.from_guest(&nd(guest_ll(), ALL_ROUTERS, &rs)), None);
    assert_eq!(l.stats().ignored, 1);
    let seg = tcp(PEER_HIT, HIT, b"x");
    let p = ipv6::build(PEER_HIT, HIT, ipv6::PROTO_TCP, 64, &seg).unwrap();
    assert_eq!(l.from_host(&p), None);
    assert_eq!(l.router_advert(), None);
    assert_eq!(l.guest_ipv6(), None);
}

#[test]
fn a_fresh_lan_after_a_move_guesses_then_learns_from_traffic() {
    // The destination's LAN saw no DAD: until the guest speaks, packets go to
    // the EUI-64 address; a guest with another address is learned from its
    // first packet out and gets the rest.
    let mut l = lan();
    let custom = ipv6::with_iid(cfg().ipv6.unwrap().prefix, [0x11; 8]);
    let seg = tcp(PEER_HIT, HIT, b"early");
    let p = ipv6::build(PEER_HIT, HIT, ipv6::PROTO_TCP, 64, &seg).unwrap();
    let f = l.from_host(&p).unwrap();
    let dst = ipv6::Packet::parse(&f[14..]).unwrap().header.dst;
    assert_eq!(dst, slaac());
    let out = tcp(custom, PEER_HIT, b"reply");
    let f = frame6(
        cfg().gateway_mac,
        custom,
        PEER_HIT,
        ipv6::PROTO_TCP,
        64,
        &out,
    );
    assert!(matches!(l.from_guest(&f), Some(Action::ToHost(_))));
    let f = l.from_host(&p).unwrap();
    assert_eq!(ipv6::Packet::parse(&f[14..]).unwrap().header.dst, custom);
}
