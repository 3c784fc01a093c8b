//! The fixed HIP header (RFC 7401 §5.1) and its checksum (§5.1.1).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use crate::error::WireError;

/// Length of the fixed header: 8 bytes + two 16-byte HITs.
pub const HEADER_LEN: usize = 40;
/// Largest packet the 8-bit header length field can describe: (255 + 1) * 8.
pub const MAX_PACKET_LEN: usize = 2048;
/// IP protocol number of HIP.
pub const HIP_PROTOCOL: u8 = 139;
/// IPPROTO_NONE: the only Next Header value RFC 7401 defines processing for.
pub const NEXT_HEADER_NONE: u8 = 59;
/// The HIP version this crate speaks.
pub const HIP_VERSION: u8 = 2;

/// A Host Identity Tag: 128 bits, compared as an unsigned big-endian integer
/// (RFC 7401 §6.5), which is exactly byte-wise lexicographic order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hit(pub [u8; 16]);

impl Hit {
    /// The all-zero HIT used for opportunistic mode.
    pub const NULL: Hit = Hit([0; 16]);

    pub fn is_null(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The 4-bit OGA ID (= HIT suite) carried in bits 28..32.
    pub fn oga_id(&self) -> u8 {
        self.0[3] & 0x0f
    }

    pub fn as_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }
}

impl fmt::Debug for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hit({})", self.as_ipv6())
    }
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_ipv6())
    }
}

impl From<Ipv6Addr> for Hit {
    fn from(a: Ipv6Addr) -> Self {
        Hit(a.octets())
    }
}

/// HIP packet types (RFC 7401 Table 11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    I1 = 1,
    R1 = 2,
    I2 = 3,
    R2 = 4,
    Update = 16,
    Notify = 17,
    Close = 18,
    CloseAck = 19,
}

impl PacketType {
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => PacketType::I1,
            2 => PacketType::R1,
            3 => PacketType::I2,
            4 => PacketType::R2,
            16 => PacketType::Update,
            17 => PacketType::Notify,
            18 => PacketType::Close,
            19 => PacketType::CloseAck,
            other => return Err(WireError::PacketType(other)),
        })
    }
}

/// Controls field bit A (anonymous sender HI), §5.1.2.
pub const CONTROL_ANONYMOUS: u16 = 0x0001;

/// The decoded fixed header. The header length is not stored: it is always
/// derived from the parameters when encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub next_header: u8,
    pub packet_type: PacketType,
    pub checksum: u16,
    pub controls: u16,
    pub sender_hit: Hit,
    pub receiver_hit: Hit,
}

impl Header {
    pub fn new(packet_type: PacketType, sender_hit: Hit, receiver_hit: Hit) -> Self {
        Header {
            next_header: NEXT_HEADER_NONE,
            packet_type,
            checksum: 0,
            controls: 0,
            sender_hit,
            receiver_hit,
        }
    }

    /// Writes the 40 header bytes for a packet of `total_len` bytes
    /// (a multiple of 8, 40..=2048).
    pub(crate) fn write(&self, total_len: usize, checksum: u16, out: &mut Vec<u8>) {
        debug_assert!(
            total_len.is_multiple_of(8) && (HEADER_LEN..=MAX_PACKET_LEN).contains(&total_len)
        );
        out.push(self.next_header);
        out.push((total_len / 8 - 1) as u8);
        out.push(self.packet_type as u8 & 0x7f);
        // Version in the high nibble, three reserved zero bits, fixed bit 1.
        out.push((HIP_VERSION << 4) | 0x01);
        out.extend_from_slice(&checksum.to_be_bytes());
        out.extend_from_slice(&self.controls.to_be_bytes());
        out.extend_from_slice(&self.sender_hit.0);
        out.extend_from_slice(&self.receiver_hit.0);
    }

    /// Parses the fixed header; returns it and the packet length the header
    /// length field declares (bytes beyond that are trailing data, ignored).
    pub fn parse(buf: &[u8]) -> Result<(Header, usize), WireError> {
        if buf.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        let hlen = buf[1];
        if hlen < 4 {
            return Err(WireError::HeaderLength(hlen));
        }
        let total = (hlen as usize + 1) * 8;
        if total > buf.len() {
            return Err(WireError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        // Bit 0 of byte 2 must be 0 and bit 7 of byte 3 must be 1 (SHIM6
        // compatibility); RFC 7401 says "ignore when receiving", but a
        // mismatch means this is not a HIP packet at all, so reject it.
        if buf[2] & 0x80 != 0 || buf[3] & 0x01 != 1 {
            return Err(WireError::FixedBits);
        }
        let version = buf[3] >> 4;
        if version != HIP_VERSION {
            return Err(WireError::Version(version));
        }
        let packet_type = PacketType::from_u8(buf[2] & 0x7f)?;
        let mut s = [0u8; 16];
        let mut r = [0u8; 16];
        s.copy_from_slice(&buf[8..24]);
        r.copy_from_slice(&buf[24..40]);
        Ok((
            Header {
                next_header: buf[0],
                packet_type,
                checksum: u16::from_be_bytes([buf[4], buf[5]]),
                controls: u16::from_be_bytes([buf[6], buf[7]]),
                sender_hit: Hit(s),
                receiver_hit: Hit(r),
            },
            total,
        ))
    }
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The HIP checksum of RFC 7401 §5.1.1: the Internet checksum over the
/// IPv6 (or, for IPv4 addresses, the UDP-style IPv4) pseudo-header built from
/// the IP addresses the packet travels between, followed by the packet.
/// `packet` must have its checksum field set to zero. Mixed address families
/// are treated as IPv6 (IPv4 addresses mapped).
pub fn checksum(packet: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    let len = packet.len() as u32;
    let acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut acc = sum16(&s.octets(), 0);
            acc = sum16(&d.octets(), acc);
            acc += u32::from(HIP_PROTOCOL) + len;
            acc
        }
        (s, d) => {
            let s6 = match s {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let d6 = match d {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let mut acc = sum16(&s6.octets(), 0);
            acc = sum16(&d6.octets(), acc);
            acc = sum16(&len.to_be_bytes(), acc);
            acc += u32::from(HIP_PROTOCOL);
            acc
        }
    };
    fold(sum16(packet, acc))
}

/// Verifies the checksum of a received packet (the checksum field as sent).
pub fn verify_checksum(packet: &[u8], src: IpAddr, dst: IpAddr) -> bool {
    if packet.len() < HEADER_LEN {
        return false;
    }
    let mut copy = packet.to_vec();
    let sent = u16::from_be_bytes([copy[4], copy[5]]);
    copy[4] = 0;
    copy[5] = 0;
    checksum(&copy, src, dst) == sent
}
