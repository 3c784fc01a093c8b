//! Unit tests of the LAN state machine: a scripted guest against `VirtualLan`.

use super::*;
use crate::wire::dhcp::{Message, MessageType, Options};

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);

fn lan() -> VirtualLan {
    VirtualLan::new(LanConfig::new(GUEST_MAC)).unwrap()
}

fn gw() -> (Mac, Ipv4Addr) {
    let c = LanConfig::new(GUEST_MAC);
    (c.gateway_mac, c.gateway_ip)
}

fn guest_ip() -> Ipv4Addr {
    LanConfig::new(GUEST_MAC).guest_ip
}

fn ip_frame(dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let p = ipv4::build(src, dst, proto, 64, 1, payload).unwrap();
    ethernet::build(dst_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV4, &p)
}

fn dhcp_frame(m: &Message, src: Ipv4Addr, dst: Ipv4Addr, dst_mac: Mac) -> Vec<u8> {
    let d = udp::build(src, dst, 68, 67, &m.encode()).unwrap();
    ip_frame(dst_mac, src, dst, ipv4::PROTO_UDP, &d)
}

fn client(t: MessageType) -> Message {
    Message {
        op: dhcp::OP_REQUEST,
        xid: 42,
        secs: 0,
        flags: 0,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr: GUEST_MAC,
        options: Options {
            message_type: Some(t),
            parameter_list: vec![1, 3, 6, 26, 51],
            ..Options::default()
        },
    }
}

/// Decodes a frame to the guest carrying a DHCP reply: (eth dst, ip dst, message).
fn dhcp_reply(a: Option<Action>) -> (Mac, Ipv4Addr, Message) {
    let Some(Action::ToGuest(f)) = a else {
        panic!("expected a frame to the guest, got {a:?}")
    };
    let e = ethernet::Frame::parse(&f).unwrap();
    assert_eq!(e.src, gw().0);
    let p = ipv4::Packet::parse(e.payload).unwrap();
    assert_eq!(p.header.src, gw().1);
    let d = udp::Datagram::parse(p.payload, p.header.src, p.header.dst).unwrap();
    assert_eq!((d.src_port, d.dst_port), (67, 68));
    (e.dst, p.header.dst, Message::parse(d.payload).unwrap())
}

#[test]
fn arp_for_gateway_is_answered_and_nothing_else() {
    let mut l = lan();
    let req = arp::Arp {
        op: arp::OP_REQUEST,
        sender_mac: GUEST_MAC,
        sender_ip: guest_ip(),
        target_mac: Mac([0; 6]),
        target_ip: gw().1,
    };
    let f = ethernet::build(
        Mac::BROADCAST,
        GUEST_MAC,
        ethernet::ETHERTYPE_ARP,
        &req.encode(),
    );
    let Some(Action::ToGuest(out)) = l.from_guest(&f) else {
        panic!("no ARP reply")
    };
    let e = ethernet::Frame::parse(&out).unwrap();
    assert_eq!((e.dst, e.src, e.ethertype), (GUEST_MAC, gw().0, 0x0806));
    let r = arp::Arp::parse(e.payload).unwrap();
    assert_eq!(r.op, arp::OP_REPLY);
    assert_eq!((r.sender_mac, r.sender_ip), (gw().0, gw().1));
    assert_eq!((r.target_mac, r.target_ip), (GUEST_MAC, guest_ip()));

    // Another address on the LAN, and a DAD probe for the guest's own address.
    for (sender_ip, target_ip) in [
        (guest_ip(), Ipv4Addr::new(198, 18, 100, 9)),
        (Ipv4Addr::UNSPECIFIED, guest_ip()),
    ] {
        let q = arp::Arp {
            sender_ip,
            target_ip,
            ..req
        };
        let f = ethernet::build(Mac::BROADCAST, GUEST_MAC, 0x0806, &q.encode());
        assert_eq!(l.from_guest(&f), None);
    }
    // A gratuitous ARP and QEMU's RARP self-announce are counted as announces.
    let garp = arp::Arp {
        sender_ip: guest_ip(),
        target_ip: guest_ip(),
        ..req
    };
    let f = ethernet::build(Mac::BROADCAST, GUEST_MAC, 0x0806, &garp.encode());
    assert_eq!(l.from_guest(&f), None);
    let rarp = ethernet::build(Mac::BROADCAST, GUEST_MAC, 0x8035, &[0; 46]);
    assert_eq!(l.from_guest(&rarp), None);
    assert_eq!(l.stats().arp_replies, 1);
    assert_eq!(l.stats().ignored, 2);
    assert_eq!(l.stats().announces, 2);
}

#[test]
fn dhcp_discover_request_ack() {
    let mut l = lan();
    let bcast = Ipv4Addr::BROADCAST;
    let any = Ipv4Addr::UNSPECIFIED;
    let (mac, ip, offer) = dhcp_reply(l.from_guest(&dhcp_frame(
        &client(MessageType::Discover),
        any,
        bcast,
        Mac::BROADCAST,
    )));
    assert_eq!(
        (mac, ip),
        (GUEST_MAC, guest_ip()),
        "unicast to chaddr/yiaddr"
    );
    assert_eq!(offer.op, dhcp::OP_REPLY);
    assert_eq!(offer.xid, 42);
    assert_eq!(offer.yiaddr, guest_ip());
    let o = &offer.options;
    assert_eq!(o.message_type, Some(MessageType::Offer));
    assert_eq!(o.server_id, Some(gw().1));
    assert_eq!(o.routers, vec![gw().1]);
    assert_eq!(o.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(o.lease_secs, Some(86_400));
    assert_eq!(o.mtu, Some(1400));

    let mut req = client(MessageType::Request);
    req.options.requested_ip = Some(guest_ip());
    req.options.server_id = Some(gw().1);
    let (_, _, ack) = dhcp_reply(l.from_guest(&dhcp_frame(&req, any, bcast, Mac::BROADCAST)));
    assert_eq!(ack.options.message_type, Some(MessageType::Ack));
    assert_eq!(ack.yiaddr, guest_ip());
    assert_eq!(ack.options.lease_secs, Some(86_400));

    // Asking for the broadcast flag gets a broadcast.
    let mut b = req.clone();
    b.flags = dhcp::FLAG_BROADCAST;
    let (mac, ip, _) = dhcp_reply(l.from_guest(&dhcp_frame(&b, any, bcast, Mac::BROADCAST)));
    assert_eq!((mac, ip), (Mac::BROADCAST, bcast));

    // Another address: NAK, broadcast.
    let mut wrong = req.clone();
    wrong.options.requested_ip = Some(Ipv4Addr::new(198, 18, 100, 77));
    let (mac, _, nak) = dhcp_reply(l.from_guest(&dhcp_frame(&wrong, any, bcast, Mac::BROADCAST)));
    assert_eq!(nak.options.message_type, Some(MessageType::Nak));
    assert_eq!(mac, Mac::BROADCAST);

    // The client chose another server: silence.
    let mut other = req.clone();
    other.options.server_id = Some(Ipv4Addr::new(198, 18, 100, 250));
    assert_eq!(
        l.from_guest(&dhcp_frame(&other, any, bcast, Mac::BROADCAST)),
        None
    );
    // Another client's MAC: silence.
    let mut stranger = client(MessageType::Discover);
    stranger.chaddr = Mac([0x52, 0x54, 0, 9, 9, 9]);
    assert_eq!(
        l.from_guest(&dhcp_frame(&stranger, any, bcast, Mac::BROADCAST)),
        None
    );
    let s = l.stats();
    assert_eq!((s.dhcp_offers, s.dhcp_acks, s.dhcp_naks), (1, 2, 1));
    assert_eq!(s.dhcp_ignored, 2);
}

#[test]
fn renewal_after_a_move_is_acked_identically() {
    // Two hosts, one config: the renewal the guest sends after moving is
    // answered by the new host exactly as the old one would have.
    let mut renew = client(MessageType::Request);
    renew.ciaddr = guest_ip();
    let f = dhcp_frame(&renew, guest_ip(), gw().1, gw().0);
    let mut old = lan();
    let mut new = lan();
    let a = old.from_guest(&f);
    let b = new.from_guest(&f);
    assert_eq!(a, b);
    let (mac, ip, ack) = dhcp_reply(b);
    assert_eq!((mac, ip), (GUEST_MAC, guest_ip()), "unicast to ciaddr");
    assert_eq!(ack.options.message_type, Some(MessageType::Ack));
    assert_eq!(ack.yiaddr, guest_ip());
}

#[test]
fn gateway_answers_ping() {
    let mut l = lan();
    let req = icmp::echo(icmp::ECHO_REQUEST, 7, 3, b"abcdefgh");
    let f = ip_frame(gw().0, guest_ip(), gw().1, ipv4::PROTO_ICMP, &req);
    let Some(Action::ToGuest(out)) = l.from_guest(&f) else {
        panic!("no echo reply")
    };
    let e = ethernet::Frame::parse(&out).unwrap();
    assert_eq!((e.dst, e.src), (GUEST_MAC, gw().0));
    let p = ipv4::Packet::parse(e.payload).unwrap();
    assert_eq!((p.header.src, p.header.dst), (gw().1, guest_ip()));
    let m = icmp::Message::parse(p.payload).unwrap();
    assert_eq!(m.typ, icmp::ECHO_REPLY);
    assert_eq!(m.echo_id_seq(), Some((7, 3)));
    assert_eq!(m.data, b"abcdefgh");
    // UDP to the gateway is not served.
    let d = udp::build(guest_ip(), gw().1, 1000, 53, b"q").unwrap();
    assert_eq!(
        l.from_guest(&ip_frame(gw().0, guest_ip(), gw().1, 17, &d)),
        None
    );
    assert_eq!(l.stats().icmp_echo_replies, 1);
    assert_eq!(l.stats().unserved, 1);
}

#[test]
fn off_link_traffic_goes_to_the_host_unchanged() {
    let mut l = lan();
    let d = udp::build(guest_ip(), PEER, 4000, 9, b"data").unwrap();
    let f = ip_frame(gw().0, guest_ip(), PEER, ipv4::PROTO_UDP, &d);
    let want = ipv4::Packet::parse(&f[14..]).unwrap().bytes.to_vec();
    // Ethernet padding after the packet is not passed on.
    let mut padded = f.clone();
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(l.from_guest(&padded), Some(Action::ToHost(want)));

    // Spoofed source address or MAC, on-link destination, multicast, IPv6, junk.
    let spoof = ip_frame(gw().0, Ipv4Addr::new(198, 18, 100, 3), PEER, 17, &d);
    assert_eq!(l.from_guest(&spoof), None);
    let mut other_mac = f.clone();
    other_mac[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    assert_eq!(l.from_guest(&other_mac), None);
    let onlink = ip_frame(gw().0, guest_ip(), Ipv4Addr::new(198, 18, 100, 5), 17, &d);
    assert_eq!(l.from_guest(&onlink), None);
    let mcast = ip_frame(
        Mac([1, 0, 0x5e, 0, 0, 0x16]),
        guest_ip(),
        Ipv4Addr::new(224, 0, 0, 22),
        2,
        b"igmp",
    );
    assert_eq!(l.from_guest(&mcast), None);
    let v6 = ethernet::build(
        Mac([0x33, 0x33, 0, 0, 0, 2]),
        GUEST_MAC,
        0x86dd,
        &[0x60; 40],
    );
    assert_eq!(l.from_guest(&v6), None);
    let mut bad_sum = f.clone();
    bad_sum[14 + 10] ^= 1;
    assert_eq!(l.from_guest(&bad_sum), None);
    // Larger than the MTU.
    let big = udp::build(guest_ip(), PEER, 1, 2, &[0u8; 1400]).unwrap();
    assert_eq!(
        l.from_guest(&ip_frame(gw().0, guest_ip(), PEER, 17, &big)),
        None
    );

    let s = l.stats();
    assert_eq!(s.frames_from_guest, 8);
    assert_eq!(s.to_host, 1);
    assert_eq!(s.spoofed, 2);
    assert_eq!(s.unserved, 1);
    assert_eq!(s.ignored, 2);
    assert_eq!(s.malformed, 1);
    assert_eq!(s.oversize, 1);
}

#[test]
fn host_packets_become_frames_for_the_guest() {
    let mut l = lan();
    let d = udp::build(PEER, guest_ip(), 9, 4000, b"reply").unwrap();
    let p = ipv4::build(PEER, guest_ip(), ipv4::PROTO_UDP, 60, 5, &d).unwrap();
    let f = l.from_host(&p).unwrap();
    let e = ethernet::Frame::parse(&f).unwrap();
    assert_eq!((e.dst, e.src, e.ethertype), (GUEST_MAC, gw().0, 0x0800));
    assert_eq!(e.payload, &p[..]);

    let elsewhere = ipv4::build(PEER, Ipv4Addr::new(198, 18, 100, 3), 17, 60, 5, &d).unwrap();
    assert_eq!(l.from_host(&elsewhere), None);
    assert_eq!(l.from_host(&p[..10]), None);
    let big = ipv4::build(PEER, guest_ip(), 17, 60, 5, &[0u8; 1500]).unwrap();
    assert_eq!(l.from_host(&big), None);
    let s = l.stats();
    assert_eq!((s.from_host, s.from_host_dropped, s.oversize), (1, 3, 1));
}
