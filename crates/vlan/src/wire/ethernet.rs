//! Ethernet II frames (no FCS: QEMU's stream netdev neither sends nor expects one).

use super::{be16, need, Mac, WireError};

/// Length of the Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of RARP (QEMU's self-announce after a migration).
pub const ETHERTYPE_RARP: u16 = 0x8035;

/// A parsed Ethernet II frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub dst: Mac,
    pub src: Mac,
    /// The EtherType as found; 802.1Q tags (0x8100) are not unwrapped.
    pub ethertype: u16,
    /// Everything after the header, padding included.
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses a frame. Lengths below 0x0600 in the type field are 802.3 frames,
    /// which this LAN does not carry.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        need("ethernet", buf, HEADER_LEN)?;
        let ethertype = be16(buf, 12);
        if ethertype < 0x0600 {
            return Err(WireError::Invalid {
                what: "ethernet",
                detail: "802.3 length field, not an EtherType",
            });
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&buf[0..6]);
        src.copy_from_slice(&buf[6..12]);
        Ok(Frame {
            dst: Mac(dst),
            src: Mac(src),
            ethertype,
            payload: &buf[HEADER_LEN..],
        })
    }
}

/// Builds a frame. No minimum-size padding: virtio-net does not need it.
pub fn build(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let f = build(
            Mac::BROADCAST,
            Mac([2, 0, 0, 0, 0, 1]),
            ETHERTYPE_ARP,
            b"xyz",
        );
        let p = Frame::parse(&f).unwrap();
        assert_eq!(p.dst, Mac::BROADCAST);
        assert_eq!(p.src, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(p.ethertype, ETHERTYPE_ARP);
        assert_eq!(p.payload, b"xyz");
        assert!(matches!(
            Frame::parse(&f[..13]),
            Err(WireError::Truncated { .. })
        ));
        let mut l = f.clone();
        l[12..14].copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(Frame::parse(&l), Err(WireError::Invalid { .. })));
    }
}
