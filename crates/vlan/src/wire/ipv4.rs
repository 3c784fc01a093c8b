//! IPv4 headers (RFC 791): parse with checksum, build, and rewrite addresses
//! with incremental checksum updates (RFC 1624) for the daemon's NAT.

use std::net::Ipv4Addr;

use super::{be16, checksum, fold, ip_at, need, sum_words, WireError};

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// The fields of an IPv4 header the LAN looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Header length in bytes (20..=60).
    pub header_len: usize,
    /// Total length from the header (header + payload).
    pub total_len: usize,
    pub ident: u16,
    /// Flags (top 3 bits) and fragment offset.
    pub flags_fragment: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl Header {
    /// A fragment (more-fragments set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_fragment & 0x3fff != 0
    }
}

/// A parsed IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: Header,
    /// The payload, `total_len - header_len` bytes (link padding cut off).
    pub payload: &'a [u8],
    /// The whole packet, `total_len` bytes.
    pub bytes: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses and checks version, lengths and header checksum. Bytes after
    /// `total_len` (Ethernet padding) are ignored.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        need("ipv4", buf, MIN_HEADER_LEN)?;
        if buf[0] >> 4 != 4 {
            return Err(WireError::Invalid {
                what: "ipv4",
                detail: "version is not 4",
            });
        }
        let header_len = usize::from(buf[0] & 0x0f) * 4;
        if header_len < MIN_HEADER_LEN {
            return Err(WireError::Invalid {
                what: "ipv4",
                detail: "header length below 20",
            });
        }
        need("ipv4 header", buf, header_len)?;
        let total_len = usize::from(be16(buf, 2));
        if total_len < header_len {
            return Err(WireError::Invalid {
                what: "ipv4",
                detail: "total length below header length",
            });
        }
        need("ipv4 packet", buf, total_len)?;
        if checksum(&buf[..header_len]) != 0 {
            return Err(WireError::Checksum("ipv4 header"));
        }
        Ok(Packet {
            header: Header {
                header_len,
                total_len,
                ident: be16(buf, 4),
                flags_fragment: be16(buf, 6),
                ttl: buf[8],
                protocol: buf[9],
                src: ip_at(buf, 12),
                dst: ip_at(buf, 16),
            },
            payload: &buf[header_len..total_len],
            bytes: &buf[..total_len],
        })
    }
}

/// Builds a packet with a 20-byte header, don't-fragment set.
pub fn build(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ttl: u8,
    ident: u16,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    let total = MIN_HEADER_LEN + payload.len();
    let total16 = u16::try_from(total).map_err(|_| WireError::TooLong {
        what: "ipv4",
        len: total,
    })?;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total16.to_be_bytes());
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&0x4000u16.to_be_bytes());
    p.extend_from_slice(&[ttl, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p[..MIN_HEADER_LEN]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    Ok(p)
}

/// Replaces the 16-bit word `old` by `new` in a stored checksum (RFC 1624 eq. 3).
fn adjust(sum: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    let mut acc = u32::from(!sum);
    for i in [0, 2] {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    fold(acc)
}

/// Rewrites the source and/or destination address of the IPv4 packet in
/// `packet` in place, updating the header checksum and, for an unfragmented
/// or first-fragment TCP/UDP packet, the transport checksum (an absent UDP
/// checksum stays absent). Used for the NAT between the guest's LAN address
/// and the VM's LSI.
pub fn rewrite_addrs(
    packet: &mut [u8],
    new_src: Option<Ipv4Addr>,
    new_dst: Option<Ipv4Addr>,
) -> Result<(), WireError> {
    let h = Packet::parse(packet)?.header;
    let first_fragment = h.flags_fragment & 0x1fff == 0;
    let l4 = h.header_len;
    // Offset of the transport checksum within the packet, when there is one to fix.
    let l4_sum_at = match h.protocol {
        PROTO_TCP if first_fragment && h.total_len >= l4 + 18 => Some(l4 + 16),
        PROTO_UDP if first_fragment && h.total_len >= l4 + 8 => {
            Some(l4 + 6).filter(|&at| be16(packet, at) != 0)
        }
        _ => None,
    };
    for (at, new) in [(12usize, new_src), (16usize, new_dst)] {
        let Some(new) = new else { continue };
        let mut old = [0u8; 4];
        old.copy_from_slice(&packet[at..at + 4]);
        let new = new.octets();
        packet[at..at + 4].copy_from_slice(&new);
        let s = adjust(be16(packet, 10), &old, &new);
        packet[10..12].copy_from_slice(&s.to_be_bytes());
        if let Some(cat) = l4_sum_at {
            let mut s = adjust(be16(packet, cat), &old, &new);
            // A computed UDP checksum of zero is sent as all ones (RFC 768).
            if s == 0 && h.protocol == PROTO_UDP {
                s = 0xffff;
            }
            packet[cat..cat + 2].copy_from_slice(&s.to_be_bytes());
        }
    }
    Ok(())
}

/// Whether the TCP/UDP checksum of an unfragmented packet verifies over the pseudo-header
/// (for tests and diagnostics).
pub fn transport_checksum_ok(packet: &Packet<'_>) -> bool {
    let h = &packet.header;
    let acc = super::pseudo_header_sum(h.src, h.dst, h.protocol, packet.payload.len());
    fold(sum_words(acc, packet.payload)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::udp;

    #[test]
    fn build_parse_round_trip_and_checksum() {
        let p = build(
            Ipv4Addr::new(198, 18, 100, 2),
            Ipv4Addr::new(198, 19, 0, 7),
            PROTO_UDP,
            64,
            7,
            b"hello",
        )
        .unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!(q.header.total_len, 25);
        assert_eq!(q.header.ttl, 64);
        assert!(!q.header.is_fragment());
        assert_eq!(q.payload, b"hello");
        let mut bad = p.clone();
        bad[8] = 1; // TTL changed without checksum
        assert_eq!(Packet::parse(&bad), Err(WireError::Checksum("ipv4 header")));
        // Padding after total_len is cut off.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(Packet::parse(&padded).unwrap().bytes, &p[..]);
        assert!(Packet::parse(&p[..24]).is_err());
    }

    #[test]
    fn rewrite_keeps_checksums_valid() {
        let (a, b) = (Ipv4Addr::new(198, 18, 100, 2), Ipv4Addr::new(198, 19, 1, 9));
        let d = udp::build(a, b, 5000, 53, b"query").unwrap();
        let mut p = build(a, b, PROTO_UDP, 64, 1, &d).unwrap();
        let lsi = Ipv4Addr::new(198, 19, 200, 3);
        rewrite_addrs(&mut p, Some(lsi), None).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!(q.header.src, lsi);
        assert!(transport_checksum_ok(&q));
        rewrite_addrs(&mut p, None, Some(a)).unwrap();
        let q = Packet::parse(&p).unwrap();
        assert_eq!(q.header.dst, a);
        assert!(transport_checksum_ok(&q));
    }
}
