//! Pure packet codecs for the guest LAN: Ethernet II, ARP, IPv4, ICMP, UDP, DHCP,
//! IPv6 and ICMPv6 with the Neighbor Discovery messages a router answers.
//!
//! No I/O and no allocation on the parse side: every `parse` borrows from the
//! buffer it is given, checks lengths before it reads, and returns a
//! [`WireError`] for anything short, inconsistent or with a bad checksum. Only
//! the few formats the virtual LAN needs are here, each small enough to read in
//! one sitting (see the crate docs for why not `etherparse`).

pub mod arp;
pub mod dhcp;
pub mod ethernet;
pub mod icmp;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod udp;

use std::fmt;

/// Why a packet could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the format (or its own length field) needs.
    #[error("{what}: {len} bytes, need {need}")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    /// A checksum does not verify.
    #[error("{0}: bad checksum")]
    Checksum(&'static str),
    /// A field holds a value the format does not allow (or we do not support).
    #[error("{what}: {detail}")]
    Invalid {
        what: &'static str,
        detail: &'static str,
    },
    /// Building a packet whose length does not fit its length field.
    #[error("{what}: {len} bytes is too long")]
    TooLong { what: &'static str, len: usize },
}

pub(crate) fn need(what: &'static str, buf: &[u8], need: usize) -> Result<(), WireError> {
    if buf.len() < need {
        return Err(WireError::Truncated {
            what,
            len: buf.len(),
            need,
        });
    }
    Ok(())
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn ip_at(b: &[u8], at: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Group bit set (multicast or broadcast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Adds `data` as big-endian 16-bit words (odd tail padded with zero) to `acc`.
pub(crate) fn sum_words(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
pub(crate) fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum_words(0, data))
}

/// Sum of the IPv4 pseudo-header for TCP/UDP checksums.
pub(crate) fn pseudo_header_sum(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    protocol: u8,
    len: usize,
) -> u32 {
    let mut acc = sum_words(0, &src.octets());
    acc = sum_words(acc, &dst.octets());
    acc = acc.wrapping_add(u32::from(protocol));
    acc.wrapping_add(len as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (complement 220d).
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        // Odd length: the tail byte is the high half of a zero-padded word.
        assert_eq!(checksum(&[0x01]), !0x0100);
    }

    #[test]
    fn mac_display_and_bits() {
        let m = Mac([0x02, 0x72, 0x6f, 0x61, 0x6d, 0x01]);
        assert_eq!(m.to_string(), "02:72:6f:61:6d:01");
        assert!(!m.is_multicast());
        assert!(Mac::BROADCAST.is_broadcast() && Mac::BROADCAST.is_multicast());
    }
}
