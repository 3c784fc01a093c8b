//! RFC 5770 / RFC 9028 UDP encapsulation: HIP control packets are prefixed
//! by 32 zero bits (a "zero SPI" that no ESP packet has), ESP packets are
//! sent as is. The HIP checksum is zero inside UDP: the UDP checksum covers
//! the packet and NATs could not fix a checksum over IP addresses.

use crate::error::WireError;

/// The port IANA assigned for HIP over UDP (RFC 5770 §4 / RFC 9028).
pub const HIP_UDP_PORT: u16 = 10500;

/// What a UDP datagram on the HIP port carries.
#[derive(Debug, PartialEq, Eq)]
pub enum UdpPayload<'a> {
    /// A HIP control packet (the zero marker removed).
    Hip(&'a [u8]),
    /// An ESP packet, starting with its non-zero SPI.
    Esp(&'a [u8]),
}

/// Frames an encoded HIP packet for UDP.
pub fn frame_hip(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packet.len() + 4);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(packet);
    out
}

/// Classifies a received datagram. Single bytes of 0xFF are NAT keepalives
/// (RFC 3948) and are not HIP.
pub fn classify(datagram: &[u8]) -> Result<UdpPayload<'_>, WireError> {
    if datagram.len() < 8 {
        return Err(WireError::NotHipUdp);
    }
    if datagram[..4] == [0, 0, 0, 0] {
        Ok(UdpPayload::Hip(&datagram[4..]))
    } else {
        Ok(UdpPayload::Esp(datagram))
    }
}
