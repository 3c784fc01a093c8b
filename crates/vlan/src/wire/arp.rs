//! ARP for IPv4 over Ethernet (RFC 826): the only hardware/protocol pair we carry.

use std::net::Ipv4Addr;

use super::{be16, ip_at, need, Mac, WireError};

/// Length of an Ethernet/IPv4 ARP packet.
pub const LEN: usize = 28;
/// Operation: request.
pub const OP_REQUEST: u16 = 1;
/// Operation: reply.
pub const OP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// Parses an ARP packet; trailing bytes (Ethernet padding) are ignored.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        need("arp", buf, LEN)?;
        if be16(buf, 0) != 1 || be16(buf, 2) != 0x0800 || buf[4] != 6 || buf[5] != 4 {
            return Err(WireError::Invalid {
                what: "arp",
                detail: "not Ethernet/IPv4",
            });
        }
        let mut sha = [0u8; 6];
        let mut tha = [0u8; 6];
        sha.copy_from_slice(&buf[8..14]);
        tha.copy_from_slice(&buf[18..24]);
        Ok(Arp {
            op: be16(buf, 6),
            sender_mac: Mac(sha),
            sender_ip: ip_at(buf, 14),
            target_mac: Mac(tha),
            target_ip: ip_at(buf, 24),
        })
    }

    /// Encodes the packet.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes());
        b[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        b[4] = 6;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sender_mac.0);
        b[14..18].copy_from_slice(&self.sender_ip.octets());
        b[18..24].copy_from_slice(&self.target_mac.0);
        b[24..28].copy_from_slice(&self.target_ip.octets());
        b
    }

    /// The reply to this request from `mac`, who owns `self.target_ip`.
    pub fn reply_from(&self, mac: Mac) -> Arp {
        Arp {
            op: OP_REPLY,
            sender_mac: mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bytes_round_trip() {
        // A request "who has 198.18.100.1? tell 198.18.100.2" as Linux sends it.
        let wire: [u8; 28] = [
            0, 1, 8, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 198, 18, 100, 2, 0, 0, 0, 0,
            0, 0, 198, 18, 100, 1,
        ];
        let a = Arp::parse(&wire).unwrap();
        assert_eq!(a.op, OP_REQUEST);
        assert_eq!(a.sender_ip, Ipv4Addr::new(198, 18, 100, 2));
        assert_eq!(a.target_ip, Ipv4Addr::new(198, 18, 100, 1));
        assert_eq!(a.encode(), wire);
        let r = a.reply_from(Mac([2, 0x72, 0x6f, 0x61, 0x6d, 1]));
        assert_eq!(r.op, OP_REPLY);
        assert_eq!(r.sender_ip, a.target_ip);
        assert_eq!(r.target_mac, a.sender_mac);
        let mut bad = wire;
        bad[5] = 16;
        assert!(Arp::parse(&bad).is_err());
        assert!(Arp::parse(&wire[..27]).is_err());
    }
}
