//! IPv6 headers (RFC 8200): parse, build, and rewrite addresses with
//! incremental transport checksum updates (RFC 1624) for the NAT between the
//! guest's address and the VM's HIT.
//!
//! IPv6 has no header checksum, but TCP, UDP and ICMPv6 all sum a
//! pseudo-header holding both addresses (RFC 8200 §8.1), so every address
//! change must be folded into the transport checksum, wherever the extension
//! header chain put it.

use std::net::Ipv6Addr;

use super::{be16, fold, need, sum_words, Mac, WireError};

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Next-header numbers the LAN and the NAT look at.
pub const PROTO_HOP_BY_HOP: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ROUTING: u8 = 43;
pub const PROTO_FRAGMENT: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_DEST_OPTS: u8 = 60;
/// Extension headers walked at most looking for the transport header. A
/// longer chain is not something an ordinary guest or peer sends.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// The fields of an IPv6 header the LAN looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length from the header (extension headers included).
    pub payload_len: usize,
    /// The header's Next Header field (may name an extension header).
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

/// A parsed IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: Header,
    /// The payload, `payload_len` bytes (link padding cut off).
    pub payload: &'a [u8],
    /// The whole packet, `40 + payload_len` bytes.
    pub bytes: &'a [u8],
}

pub(crate) fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

impl<'a> Packet<'a> {
    /// Parses and checks version and length. Bytes after the payload length
    /// (Ethernet padding) are ignored; jumbograms (length 0) are refused.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        need("ipv6", buf, HEADER_LEN)?;
        if buf[0] >> 4 != 6 {
            return Err(WireError::Invalid {
                what: "ipv6",
                detail: "version is not 6",
            });
        }
        let payload_len = usize::from(be16(buf, 4));
        need("ipv6 packet", buf, HEADER_LEN + payload_len)?;
        Ok(Packet {
            header: Header {
                payload_len,
                next_header: buf[6],
                hop_limit: buf[7],
                src: addr_at(buf, 8),
                dst: addr_at(buf, 24),
            },
            payload: &buf[HEADER_LEN..HEADER_LEN + payload_len],
            bytes: &buf[..HEADER_LEN + payload_len],
        })
    }

    /// The upper-layer protocol and the offset of its header within the
    /// packet, after the extension headers, or `None` when the chain is too
    /// long, truncated, or this is not the first fragment (the transport
    /// header is elsewhere).
    pub fn transport(&self) -> Option<(u8, usize)> {
        transport_at(self.bytes)
    }
}

/// See [`Packet::transport`]; `bytes` is a whole packet of valid length.
fn transport_at(bytes: &[u8]) -> Option<(u8, usize)> {
    let mut nh = *bytes.get(6)?;
    let mut at = HEADER_LEN;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match nh {
            PROTO_HOP_BY_HOP | PROTO_ROUTING | PROTO_DEST_OPTS => {
                let h = bytes.get(at..at + 2)?;
                nh = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            PROTO_FRAGMENT => {
                let h = bytes.get(at..at + 8)?;
                // Offset (13 bits) non-zero: the transport header was in
                // the first fragment, nothing to see or fix here.
                if be16(h, 2) & 0xfff8 != 0 {
                    return None;
                }
                nh = h[0];
                at += 8;
            }
            _ => return (at <= bytes.len()).then_some((nh, at)),
        }
    }
    None
}

/// Builds a packet (no extension headers, flow label 0).
pub fn build(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    let len = u16::try_from(payload.len()).map_err(|_| WireError::TooLong {
        what: "ipv6",
        len: payload.len(),
    })?;
    let mut p = Vec::with_capacity(HEADER_LEN + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next_header, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    Ok(p)
}

/// Sum of the IPv6 pseudo-header (RFC 8200 §8.1) for an upper-layer checksum.
pub(crate) fn pseudo_header_sum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut acc = sum_words(0, &src.octets());
    acc = sum_words(acc, &dst.octets());
    acc = acc.wrapping_add((len as u32) >> 16);
    acc = acc.wrapping_add(len as u32 & 0xffff);
    acc.wrapping_add(u32::from(proto))
}

/// The checksum of an upper-layer message `data` (with its checksum field
/// zero) carried from `src` to `dst` as protocol `proto`.
pub fn upper_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> u16 {
    fold(sum_words(
        pseudo_header_sum(src, dst, proto, data.len()),
        data,
    ))
}

/// Whether the upper-layer checksum of `data` (its checksum field as sent)
/// verifies.
pub fn upper_checksum_ok(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> bool {
    upper_checksum(src, dst, proto, data) == 0
}

/// RFC 1624 eq. 3 for a 16-byte field: `HC' = ~(~HC + ~m + m')`, word by word.
pub fn adjust_checksum(sum: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut acc = u32::from(!sum);
    for i in (0..16).step_by(2) {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    fold(acc)
}

/// Rewrites the source and/or destination address of the IPv6 packet in
/// `packet` in place, folding the change into the TCP, UDP or ICMPv6
/// checksum when the packet carries that header (after any extension
/// headers; non-first fragments carry none). A zero UDP checksum, invalid in
/// IPv6, is left alone. Other upper layers are rewritten without a fix:
/// their checksums, if any, do not cover the addresses.
pub fn rewrite_addrs(
    packet: &mut [u8],
    new_src: Option<Ipv6Addr>,
    new_dst: Option<Ipv6Addr>,
) -> Result<(), WireError> {
    let len = HEADER_LEN + Packet::parse(packet)?.header.payload_len;
    let transport = transport_at(&packet[..len]);
    let is_udp = transport.map(|t| t.0) == Some(PROTO_UDP);
    let sum_at = match transport {
        Some((PROTO_TCP, at)) if len >= at + 18 => Some(at + 16),
        Some((PROTO_UDP, at)) if len >= at + 8 => Some(at + 6).filter(|&c| be16(packet, c) != 0),
        Some((PROTO_ICMPV6, at)) if len >= at + 4 => Some(at + 2),
        _ => None,
    };
    for (at, new) in [(8usize, new_src), (24usize, new_dst)] {
        let Some(new) = new else { continue };
        let mut old = [0u8; 16];
        old.copy_from_slice(&packet[at..at + 16]);
        let new = new.octets();
        packet[at..at + 16].copy_from_slice(&new);
        if let Some(c) = sum_at {
            let mut s = adjust_checksum(be16(packet, c), &old, &new);
            // UDP sends a computed zero as all ones (RFC 8200 §8.1).
            if s == 0 && is_udp {
                s = 0xffff;
            }
            packet[c..c + 2].copy_from_slice(&s.to_be_bytes());
        }
    }
    Ok(())
}

/// Whether the TCP/UDP/ICMPv6 checksum of an unfragmented packet verifies
/// (for tests and diagnostics). False when there is no such header.
pub fn transport_checksum_ok(packet: &Packet<'_>) -> bool {
    match packet.transport() {
        Some((proto @ (PROTO_TCP | PROTO_UDP | PROTO_ICMPV6), at)) => {
            let h = &packet.header;
            upper_checksum_ok(h.src, h.dst, proto, &packet.bytes[at..])
        }
        _ => false,
    }
}

/// The modified EUI-64 interface identifier of `mac` (RFC 4291 App. A): what
/// a SLAAC guest without privacy or stable-privacy addresses appends to the
/// prefix, and what link-local addresses are made of.
pub fn eui64(mac: Mac) -> [u8; 8] {
    let m = mac.0;
    [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]
}

/// `prefix` (its first 64 bits) joined with `iid`.
pub fn with_iid(prefix: Ipv6Addr, iid: [u8; 8]) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..].copy_from_slice(&iid);
    Ipv6Addr::from(o)
}

/// The link-local address fe80::/64 + EUI-64 of `mac`.
pub fn link_local(mac: Mac) -> Ipv6Addr {
    with_iid(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), eui64(mac))
}

/// Whether `a` and `b` share their first 64 bits.
pub fn same_64(a: Ipv6Addr, b: Ipv6Addr) -> bool {
    a.octets()[..8] == b.octets()[..8]
}

/// Whether `a` is link-local unicast (fe80::/10).
pub fn is_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The solicited-node multicast group of `a` (ff02::1:ffXX:XXXX).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet group address an IPv6 multicast address maps to (33:33 + low 32 bits).
pub fn multicast_mac(a: Ipv6Addr) -> Mac {
    let o = a.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// A unique local /64 (RFC 4193: fd00::/8, a 40-bit global ID, subnet 0)
/// from `global_id`. Give it something stable and random-looking per VM
/// (e.g. hash bits of its HIT): the same VM then has the same prefix on
/// every host, and two VMs' prefixes do not collide in practice.
pub fn ula_prefix(global_id: [u8; 5]) -> Ipv6Addr {
    let g = global_id;
    Ipv6Addr::from([
        0xfd, g[0], g[1], g[2], g[3], g[4], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 0, 0x5054, 0xff, 0xfe12, 0x3456);
    const B: Ipv6Addr = Ipv6Addr::new(0x2001, 0x21, 1, 2, 3, 4, 5, 6);
    const HIT: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2a, 9, 8, 7, 6, 5, 4);

    /// A UDP datagram with its checksum, the IPv6 payload.
    fn udp6(src: Ipv6Addr, dst: Ipv6Addr, data: &[u8]) -> Vec<u8> {
        let mut d = vec![0x13, 0x88, 0, 7];
        d.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(data);
        let c = upper_checksum(src, dst, PROTO_UDP, &d);
        d[6..8].copy_from_slice(&c.to_be_bytes());
        d
    }

    #[test]
    fn build_parse_round_trip() {
        let p = build(A, B, PROTO_UDP, 64, &udp6(A, B, b"hi")).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!((q.header.src, q.header.dst, q.header.hop_limit), (A, B, 64));
        assert_eq!(q.header.payload_len, 10);
        assert_eq!(q.transport(), Some((PROTO_UDP, 40)));
        assert!(transport_checksum_ok(&q));
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(Packet::parse(&padded).unwrap().bytes, &p[..]);
        assert!(Packet::parse(&p[..45]).is_err());
        let mut v4 = p.clone();
        v4[0] = 0x45;
        assert!(Packet::parse(&v4).is_err());
    }

    #[test]
    fn rewrite_keeps_udp_checksum_valid_both_ways() {
        let mut p = build(A, B, PROTO_UDP, 64, &udp6(A, B, b"query")).unwrap();
        rewrite_addrs(&mut p, Some(HIT), None).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!(q.header.src, HIT);
        assert!(transport_checksum_ok(&q));
        rewrite_addrs(&mut p, None, Some(A)).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!(q.header.dst, A);
        assert!(transport_checksum_ok(&q));
    }

    #[test]
    fn rewrite_finds_the_checksum_behind_extension_headers() {
        // Hop-by-hop (8 bytes, PadN) then a first fragment, then ICMPv6 echo.
        let mut icmp = vec![128, 0, 0, 0, 0, 1, 0, 1, b'x', b'y'];
        let c = upper_checksum(A, B, PROTO_ICMPV6, &icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut payload = vec![PROTO_FRAGMENT, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&[PROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 9]);
        payload.extend_from_slice(&icmp);
        let mut p = build(A, B, PROTO_HOP_BY_HOP, 64, &payload).unwrap();
        assert_eq!(
            Packet::parse(&p).unwrap().transport(),
            Some((PROTO_ICMPV6, 56))
        );
        rewrite_addrs(&mut p, Some(HIT), Some(A)).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert!(upper_checksum_ok(HIT, A, PROTO_ICMPV6, &q.bytes[56..]));
        // A later fragment has no transport header: addresses change, nothing else.
        p[40 + 8 + 2..40 + 8 + 4].copy_from_slice(&0x0100u16.to_be_bytes());
        let before = p[56..].to_vec();
        rewrite_addrs(&mut p, Some(B), None).unwrap();
        assert_eq!(p[56..], before[..]);
        assert_eq!(Packet::parse(&p).unwrap().header.src, B);
    }

    #[test]
    fn zero_udp_checksum_is_left_alone() {
        let mut d = udp6(A, B, b"z");
        d[6..8].copy_from_slice(&[0, 0]);
        let mut p = build(A, B, PROTO_UDP, 64, &d).unwrap();
        rewrite_addrs(&mut p, Some(HIT), None).unwrap();
        assert_eq!(p[46..48], [0, 0]);
    }

    #[test]
    fn address_helpers() {
        let mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(
            link_local(mac),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert!(is_link_local(link_local(mac)) && !is_link_local(A));
        assert_eq!(
            solicited_node(A),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            multicast_mac(solicited_node(A)).0,
            [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]
        );
        let p = ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(p, "fd12:3456:789a::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(with_iid(p, eui64(mac)), A);
        assert!(same_64(p, A) && !same_64(p, B));
    }
}
