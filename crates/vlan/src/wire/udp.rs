//! UDP datagrams (RFC 768) with the IPv4 pseudo-header checksum.

use std::net::Ipv4Addr;

use super::{be16, fold, need, pseudo_header_sum, sum_words, WireError};
use crate::wire::ipv4::PROTO_UDP;

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

/// A parsed UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    /// `length - 8` bytes; anything after the UDP length is ignored.
    pub payload: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Parses the IPv4 payload `buf` sent from `src` to `dst`; a non-zero
    /// checksum must verify.
    pub fn parse(buf: &'a [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<Self, WireError> {
        need("udp", buf, HEADER_LEN)?;
        let len = usize::from(be16(buf, 4));
        if len < HEADER_LEN {
            return Err(WireError::Invalid {
                what: "udp",
                detail: "length below 8",
            });
        }
        need("udp datagram", buf, len)?;
        if be16(buf, 6) != 0 {
            let acc = pseudo_header_sum(src, dst, PROTO_UDP, len);
            if fold(sum_words(acc, &buf[..len])) != 0 {
                return Err(WireError::Checksum("udp"));
            }
        }
        Ok(Datagram {
            src_port: be16(buf, 0),
            dst_port: be16(buf, 2),
            payload: &buf[HEADER_LEN..len],
        })
    }
}

/// Builds a datagram (the IPv4 payload) with its checksum.
pub fn build(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    let len = HEADER_LEN + payload.len();
    // 20 bytes of IPv4 header must fit as well.
    let len16 = u16::try_from(len + 20)
        .map(|_| len as u16)
        .map_err(|_| WireError::TooLong { what: "udp", len })?;
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src_port.to_be_bytes());
    d.extend_from_slice(&dst_port.to_be_bytes());
    d.extend_from_slice(&len16.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut c = fold(sum_words(pseudo_header_sum(src, dst, PROTO_UDP, len), &d));
    if c == 0 {
        c = 0xffff;
    }
    d[6..8].copy_from_slice(&c.to_be_bytes());
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_checksum() {
        let (a, b) = (
            Ipv4Addr::new(198, 18, 100, 1),
            Ipv4Addr::new(198, 18, 100, 2),
        );
        let d = build(a, b, 67, 68, b"offer").unwrap();
        let p = Datagram::parse(&d, a, b).unwrap();
        assert_eq!((p.src_port, p.dst_port, p.payload), (67, 68, &b"offer"[..]));
        // Verified against the pseudo-header: other addresses fail.
        assert_eq!(
            Datagram::parse(&d, b, Ipv4Addr::new(198, 18, 100, 3)),
            Err(WireError::Checksum("udp"))
        );
        // A zero checksum means "none".
        let mut z = d.clone();
        z[6..8].copy_from_slice(&[0, 0]);
        z[8] ^= 1;
        assert!(Datagram::parse(&z, a, b).is_ok());
        assert!(Datagram::parse(&d[..12], a, b).is_err());
    }
}
