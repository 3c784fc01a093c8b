//! BEET rewriting between the TUN device and ESP payloads, pure.
//!
//! HIT traffic (IPv6, 2001:20::/28) is carried in true BEET form (RFC 7402
//! §3.2, RFC 7401 Appendix): the 40-byte IPv6 header is stripped, ESP's next
//! header names what followed it, and the receiver rebuilds the header from
//! the association (source = peer HIT, destination = our HIT). Transport
//! checksums stay valid because both ends use the same two HITs.
//!
//! LSI traffic (IPv4, 198.19.0.0/16) cannot share the SA that way: a BEET
//! payload does not say which inner family it had, and TCP is protocol 6 in
//! both. roam therefore sends an IPv4 packet whole, as next header 4
//! (IP-in-IP), and the receiver rewrites its addresses to its own view of
//! the LSIs (LSIs are local names; two ends need not agree on them),
//! adjusting the IPv4 and TCP/UDP checksums incrementally (RFC 1624). This
//! costs 20 bytes per LSI packet and is a deliberate deviation from pure
//! BEET, which has one inner family per SA.
//!
//! ```text
//!  TUN ─► classify ─► Dest::Hit | Dest::Lsi ─► (next header, payload) ─► seal
//!  open ─► (next header, payload) ─► rebuild(view) ─► TUN
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use roam_hip::Hit;

use crate::error::PacketError;

/// IP-in-IP: the ESP payload is a whole IPv4 packet (LSI traffic).
pub const NEXT_HEADER_IPV4: u8 = 4;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const IPV6_HEADER: usize = 40;
/// Largest inner packet accepted from TUN or rebuilt for it.
pub const MAX_INNER: usize = 65535;

/// Where a packet read from TUN is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    Hit(Hit),
    Lsi(Ipv4Addr),
}

/// A packet read from TUN, ready to seal.
#[derive(Debug, PartialEq, Eq)]
pub struct Outbound<'a> {
    pub dest: Dest,
    pub next_header: u8,
    pub payload: &'a [u8],
}

/// Addresses the receiver rebuilds with.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub our_hit: Hit,
    pub peer_hit: Hit,
    pub our_lsi: Ipv4Addr,
    pub peer_lsi: Ipv4Addr,
}

fn is_orchid(a: &Ipv6Addr) -> bool {
    roam_hip::identity::is_orchid(&Hit(a.octets()))
}

/// Splits a packet read from TUN into its destination and BEET payload.
/// `our_hit` must be the IPv6 source: the receiver rebuilds the header with
/// it, so any other source would break the transport checksum.
pub fn outbound<'a>(pkt: &'a [u8], our_hit: &Hit) -> Result<Outbound<'a>, PacketError> {
    if pkt.len() > MAX_INNER {
        return Err(PacketError::TooLarge(pkt.len()));
    }
    match pkt.first().map(|b| b >> 4) {
        Some(6) => {
            if pkt.len() < IPV6_HEADER {
                return Err(PacketError::Truncated);
            }
            let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            if IPV6_HEADER + plen > pkt.len() || plen == 0 {
                return Err(PacketError::Truncated);
            }
            let src = octets16(&pkt[8..24]);
            let dst = octets16(&pkt[24..40]);
            if !is_orchid(&Ipv6Addr::from(dst)) {
                return Err(PacketError::NotHip);
            }
            if src != our_hit.0 {
                return Err(PacketError::WrongSource);
            }
            Ok(Outbound {
                dest: Dest::Hit(Hit(dst)),
                next_header: pkt[6],
                payload: &pkt[IPV6_HEADER..IPV6_HEADER + plen],
            })
        }
        Some(4) => {
            let (ihl, total) = ipv4_lengths(pkt)?;
            let _ = ihl;
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            if !crate::config::is_lsi(dst) {
                return Err(PacketError::NotHip);
            }
            Ok(Outbound {
                dest: Dest::Lsi(dst),
                next_header: NEXT_HEADER_IPV4,
                payload: &pkt[..total],
            })
        }
        _ => Err(PacketError::Version),
    }
}

fn octets16(b: &[u8]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    o
}

/// (header length, total length) of an IPv4 packet, checked against `pkt`.
fn ipv4_lengths(pkt: &[u8]) -> Result<(usize, usize), PacketError> {
    if pkt.len() < 20 {
        return Err(PacketError::Truncated);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if ihl < 20 || total < ihl || total > pkt.len() {
        return Err(PacketError::Truncated);
    }
    Ok((ihl, total))
}

/// Rebuilds the packet to write to TUN from an opened ESP payload.
pub fn inbound(next_header: u8, payload: &[u8], view: &View) -> Result<Vec<u8>, PacketError> {
    if next_header == NEXT_HEADER_IPV4 {
        return rewrite_ipv4(payload, view.peer_lsi, view.our_lsi);
    }
    if payload.len() + IPV6_HEADER > MAX_INNER {
        return Err(PacketError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(IPV6_HEADER + payload.len());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.push(next_header);
    out.push(64);
    out.extend_from_slice(&view.peer_hit.0);
    out.extend_from_slice(&view.our_hit.0);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Rewrites source/destination of an IPv4 packet, fixing the header
/// checksum and (first fragments only) the TCP/UDP checksum incrementally.
fn rewrite_ipv4(pkt: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<Vec<u8>, PacketError> {
    if pkt.first().map(|b| b >> 4) != Some(4) {
        return Err(PacketError::Version);
    }
    let (ihl, total) = ipv4_lengths(pkt)?;
    let mut out = pkt[..total].to_vec();
    let old: [u8; 8] = out[12..20].try_into().map_err(|_| PacketError::Truncated)?;
    let mut new = [0u8; 8];
    new[..4].copy_from_slice(&src.octets());
    new[4..].copy_from_slice(&dst.octets());
    if old == new {
        return Ok(out);
    }
    out[12..20].copy_from_slice(&new);
    let hc = u16::from_be_bytes([out[10], out[11]]);
    out[10..12].copy_from_slice(&csum_adjust(hc, &old, &new).to_be_bytes());
    let frag_offset = u16::from_be_bytes([out[6], out[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Ok(out);
    }
    let at = match out[9] {
        PROTO_TCP => ihl + 16,
        PROTO_UDP => ihl + 6,
        _ => return Ok(out),
    };
    if at + 2 > out.len() {
        return Ok(out);
    }
    let c = u16::from_be_bytes([out[at], out[at + 1]]);
    // A zero UDP checksum means "none" and stays zero.
    if out[9] == PROTO_UDP && c == 0 {
        return Ok(out);
    }
    let mut c2 = csum_adjust(c, &old, &new);
    if out[9] == PROTO_UDP && c2 == 0 {
        c2 = 0xffff;
    }
    out[at..at + 2].copy_from_slice(&c2.to_be_bytes());
    Ok(out)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), over every changed word.
pub fn csum_adjust(hc: u16, old: &[u8], new: &[u8]) -> u16 {
    let old_sum = fold(sum16(old));
    !fold(u32::from(!hc) + u32::from(!old_sum) + sum16(new))
}

/// Internet checksum of `data` (for tests and building packets).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(data))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hit(last: u8) -> Hit {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x22]);
        h[15] = last;
        Hit(h)
    }

    fn tcp_v4(src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
        let total = 20 + 20 + data.len();
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let hc = internet_checksum(&p);
        p[10..12].copy_from_slice(&hc.to_be_bytes());
        let mut tcp = vec![
            0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
        ];
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(data);
        let c = tcp_checksum_v4(src, dst, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&tcp);
        p
    }

    fn tcp_checksum_v4(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
        let mut ph = Vec::new();
        ph.extend_from_slice(&src.octets());
        ph.extend_from_slice(&dst.octets());
        ph.extend_from_slice(&[0, PROTO_TCP]);
        ph.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        let mut tmp = seg.to_vec();
        tmp[16] = 0;
        tmp[17] = 0;
        ph.extend_from_slice(&tmp);
        internet_checksum(&ph)
    }

    #[test]
    fn lsi_rewrite_keeps_checksums_valid() {
        let a = Ipv4Addr::new(198, 19, 1, 1);
        let b = Ipv4Addr::new(198, 19, 2, 2);
        let pkt = tcp_v4(a, b, b"hello, odd length");
        let me = hit(1);
        let o = outbound(&pkt, &me).unwrap();
        assert_eq!(o.dest, Dest::Lsi(b));
        assert_eq!(o.next_header, NEXT_HEADER_IPV4);
        // The receiver names the peers differently.
        let view = View {
            our_hit: hit(2),
            peer_hit: me,
            our_lsi: Ipv4Addr::new(198, 19, 9, 9),
            peer_lsi: Ipv4Addr::new(198, 19, 7, 7),
        };
        let r = inbound(o.next_header, o.payload, &view).unwrap();
        assert_eq!(&r[12..16], &[198, 19, 7, 7]);
        assert_eq!(&r[16..20], &[198, 19, 9, 9]);
        assert_eq!(internet_checksum(&r[..20]), 0);
        let seg = &r[20..];
        let want = tcp_checksum_v4(view.peer_lsi, view.our_lsi, seg);
        assert_eq!(u16::from_be_bytes([seg[16], seg[17]]), want);
    }

    #[test]
    fn hit_packet_is_stripped_and_rebuilt() {
        let (a, b) = (hit(1), hit(2));
        let mut p = vec![0x60, 0, 0, 0, 0, 4, 17, 64];
        p.extend_from_slice(&a.0);
        p.extend_from_slice(&b.0);
        p.extend_from_slice(&[1, 2, 3, 4]);
        let o = outbound(&p, &a).unwrap();
        assert_eq!(o.dest, Dest::Hit(b));
        assert_eq!((o.next_header, o.payload), (17, &[1u8, 2, 3, 4][..]));
        let view = View {
            our_hit: b,
            peer_hit: a,
            our_lsi: Ipv4Addr::new(198, 19, 0, 2),
            peer_lsi: Ipv4Addr::new(198, 19, 0, 1),
        };
        assert_eq!(inbound(17, o.payload, &view).unwrap(), p);
        // Wrong source, non-HIT destination, truncation: refused.
        assert_eq!(outbound(&p, &b), Err(PacketError::WrongSource));
        let mut q = p.clone();
        q[24] = 0xfe;
        assert_eq!(outbound(&q, &a), Err(PacketError::NotHip));
        assert_eq!(outbound(&p[..30], &a), Err(PacketError::Truncated));
        assert_eq!(outbound(&[], &a), Err(PacketError::Version));
    }

    #[test]
    fn garbage_never_panics() {
        let view = View {
            our_hit: hit(1),
            peer_hit: hit(2),
            our_lsi: Ipv4Addr::new(198, 19, 0, 2),
            peer_lsi: Ipv4Addr::new(198, 19, 0, 1),
        };
        let mut x = 0x1234_5678u32;
        for len in 0..200 {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = outbound(&v, &view.our_hit);
            let _ = inbound(4, &v, &view);
            let mut w = v.clone();
            if !w.is_empty() {
                w[0] = 0x45;
            }
            let _ = outbound(&w, &view.our_hit);
            let _ = inbound(4, &w, &view);
        }
    }
}
