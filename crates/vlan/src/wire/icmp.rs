//! ICMP messages (RFC 792): parse with checksum, build; echo helpers.

use super::{be16, be32, checksum, need, WireError};

/// Type of an echo reply.
pub const ECHO_REPLY: u8 = 0;
/// Type of "destination unreachable".
pub const DEST_UNREACHABLE: u8 = 3;
/// Type of an echo request.
pub const ECHO_REQUEST: u8 = 8;

/// A parsed ICMP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub typ: u8,
    pub code: u8,
    /// The second 32-bit word (identifier + sequence for echo).
    pub rest: u32,
    pub data: &'a [u8],
}

impl<'a> Message<'a> {
    /// Parses an ICMP message (the whole IPv4 payload) and checks its checksum.
    pub fn parse(buf: &'a [u8]) -> Result<Self, WireError> {
        need("icmp", buf, 8)?;
        if checksum(buf) != 0 {
            return Err(WireError::Checksum("icmp"));
        }
        Ok(Message {
            typ: buf[0],
            code: buf[1],
            rest: be32(buf, 4),
            data: &buf[8..],
        })
    }

    /// (identifier, sequence) of an echo request or reply.
    pub fn echo_id_seq(&self) -> Option<(u16, u16)> {
        if matches!(self.typ, ECHO_REQUEST | ECHO_REPLY) && self.code == 0 {
            let b = self.rest.to_be_bytes();
            Some((be16(&b, 0), be16(&b, 2)))
        } else {
            None
        }
    }
}

/// Builds an ICMP message with its checksum.
pub fn build(typ: u8, code: u8, rest: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + data.len());
    m.extend_from_slice(&[typ, code, 0, 0]);
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Builds an echo request or reply.
pub fn echo(typ: u8, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    build(typ, 0, u32::from(ident) << 16 | u32::from(seq), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trip() {
        let m = echo(ECHO_REQUEST, 0x1234, 9, b"ping");
        let p = Message::parse(&m).unwrap();
        assert_eq!(p.echo_id_seq(), Some((0x1234, 9)));
        assert_eq!(p.data, b"ping");
        let mut bad = m.clone();
        bad[9] ^= 0xff;
        assert_eq!(Message::parse(&bad), Err(WireError::Checksum("icmp")));
        assert_eq!(
            Message::parse(&build(DEST_UNREACHABLE, 3, 0, b"x"))
                .unwrap()
                .echo_id_seq(),
            None
        );
    }
}
