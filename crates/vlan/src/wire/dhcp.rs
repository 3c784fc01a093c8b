//! DHCP messages (RFC 2131 BOOTP layout, RFC 2132 options): the subset a
//! one-client server needs. Bounded: messages over [`MAX_LEN`] are refused
//! before decoding, address lists hold at most [`MAX_LIST`] entries, unknown
//! options are skipped, option overload (52) is not honoured (the `sname` and
//! `file` fields are never read).

use std::net::Ipv4Addr;

use super::{be16, be32, ip_at, need, Mac, WireError};

/// UDP port of the server.
pub const SERVER_PORT: u16 = 67;
/// UDP port of the client.
pub const CLIENT_PORT: u16 = 68;
/// Largest message we decode (a client may announce up to 1500 + more; guests
/// send under 600).
pub const MAX_LEN: usize = 4096;
/// Most addresses kept from a router or DNS list.
pub const MAX_LIST: usize = 8;
/// BOOTP fixed part (op .. file).
const FIXED_LEN: usize = 236;
const MAGIC: u32 = 0x6382_5363;
/// BOOTP minimum message size; some clients drop shorter replies.
const MIN_ENCODED: usize = 300;
/// Flag bit asking for broadcast replies.
pub const FLAG_BROADCAST: u16 = 0x8000;

/// BOOTP `op` of a client message.
pub const OP_REQUEST: u8 = 1;
/// BOOTP `op` of a server message.
pub const OP_REPLY: u8 = 2;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMETER_LIST: u8 = 55;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
const OPT_END: u8 = 255;

/// DHCP message type (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        use MessageType::*;
        Some(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }
}

/// The options the LAN reads or writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub message_type: Option<MessageType>,
    pub server_id: Option<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub renewal_secs: Option<u32>,
    pub rebinding_secs: Option<u32>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub requested_ip: Option<Ipv4Addr>,
    pub parameter_list: Vec<u8>,
}

/// A DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: Mac,
    pub options: Options,
}

fn invalid(detail: &'static str) -> WireError {
    WireError::Invalid {
        what: "dhcp",
        detail,
    }
}

fn one_ip(v: &[u8]) -> Result<Ipv4Addr, WireError> {
    if v.len() != 4 {
        return Err(invalid("address option is not 4 bytes"));
    }
    Ok(ip_at(v, 0))
}

fn one_u32(v: &[u8]) -> Result<u32, WireError> {
    if v.len() != 4 {
        return Err(invalid("time option is not 4 bytes"));
    }
    Ok(be32(v, 0))
}

fn ip_list(v: &[u8]) -> Result<Vec<Ipv4Addr>, WireError> {
    if v.is_empty() || !v.len().is_multiple_of(4) {
        return Err(invalid("address list length is not a multiple of 4"));
    }
    Ok(v.chunks_exact(4)
        .take(MAX_LIST)
        .map(|c| ip_at(c, 0))
        .collect())
}

impl Message {
    /// Decodes a message (the UDP payload).
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() > MAX_LEN {
            return Err(WireError::TooLong {
                what: "dhcp",
                len: buf.len(),
            });
        }
        need("dhcp", buf, FIXED_LEN + 4)?;
        if buf[1] != 1 || buf[2] != 6 {
            return Err(invalid("hardware is not Ethernet"));
        }
        if be32(buf, FIXED_LEN) != MAGIC {
            return Err(invalid("no magic cookie"));
        }
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&buf[28..34]);
        let mut o = Options::default();
        let mut rest = &buf[FIXED_LEN + 4..];
        let mut ended = false;
        while let Some((&code, tail)) = rest.split_first() {
            match code {
                OPT_PAD => {
                    rest = tail;
                    continue;
                }
                OPT_END => {
                    ended = true;
                    break;
                }
                _ => {}
            }
            let (&len, tail) = tail.split_first().ok_or(invalid("option without length"))?;
            let len = usize::from(len);
            if tail.len() < len {
                return Err(WireError::Truncated {
                    what: "dhcp option",
                    len: tail.len(),
                    need: len,
                });
            }
            let (v, tail) = tail.split_at(len);
            rest = tail;
            match code {
                OPT_MESSAGE_TYPE => {
                    if v.len() != 1 {
                        return Err(invalid("message type is not 1 byte"));
                    }
                    o.message_type =
                        Some(MessageType::from_u8(v[0]).ok_or(invalid("unknown message type"))?);
                }
                OPT_SERVER_ID => o.server_id = Some(one_ip(v)?),
                OPT_REQUESTED_IP => o.requested_ip = Some(one_ip(v)?),
                OPT_SUBNET_MASK => o.subnet_mask = Some(one_ip(v)?),
                OPT_LEASE_TIME => o.lease_secs = Some(one_u32(v)?),
                OPT_RENEWAL_TIME => o.renewal_secs = Some(one_u32(v)?),
                OPT_REBINDING_TIME => o.rebinding_secs = Some(one_u32(v)?),
                OPT_ROUTER => o.routers = ip_list(v)?,
                OPT_DNS => o.dns = ip_list(v)?,
                OPT_MTU => {
                    if v.len() != 2 {
                        return Err(invalid("MTU option is not 2 bytes"));
                    }
                    o.mtu = Some(be16(v, 0));
                }
                OPT_PARAMETER_LIST => o.parameter_list = v.to_vec(),
                _ => {}
            }
        }
        if !ended {
            return Err(invalid("options without end mark"));
        }
        Ok(Message {
            op: buf[0],
            xid: be32(buf, 4),
            secs: be16(buf, 8),
            flags: be16(buf, 10),
            ciaddr: ip_at(buf, 12),
            yiaddr: ip_at(buf, 16),
            siaddr: ip_at(buf, 20),
            giaddr: ip_at(buf, 24),
            chaddr: Mac(chaddr),
            options: o,
        })
    }

    /// Encodes the message, padded to the BOOTP minimum of 300 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; FIXED_LEN];
        b[0] = self.op;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        b[10..12].copy_from_slice(&self.flags.to_be_bytes());
        for (at, ip) in [
            (12, self.ciaddr),
            (16, self.yiaddr),
            (20, self.siaddr),
            (24, self.giaddr),
        ] {
            b[at..at + 4].copy_from_slice(&ip.octets());
        }
        b[28..34].copy_from_slice(&self.chaddr.0);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        let o = &self.options;
        let mut opt = |code: u8, v: &[u8]| {
            // Values longer than one option are cut (never the case for ours).
            let v = &v[..v.len().min(255)];
            b.push(code);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        };
        if let Some(t) = o.message_type {
            opt(OPT_MESSAGE_TYPE, &[t as u8]);
        }
        if let Some(ip) = o.server_id {
            opt(OPT_SERVER_ID, &ip.octets());
        }
        if let Some(ip) = o.requested_ip {
            opt(OPT_REQUESTED_IP, &ip.octets());
        }
        for (code, t) in [
            (OPT_LEASE_TIME, o.lease_secs),
            (OPT_RENEWAL_TIME, o.renewal_secs),
            (OPT_REBINDING_TIME, o.rebinding_secs),
        ] {
            if let Some(t) = t {
                opt(code, &t.to_be_bytes());
            }
        }
        if let Some(m) = o.subnet_mask {
            opt(OPT_SUBNET_MASK, &m.octets());
        }
        for (code, list) in [(OPT_ROUTER, &o.routers), (OPT_DNS, &o.dns)] {
            if !list.is_empty() {
                let v: Vec<u8> = list
                    .iter()
                    .take(MAX_LIST)
                    .flat_map(|ip| ip.octets())
                    .collect();
                opt(code, &v);
            }
        }
        if let Some(m) = o.mtu {
            opt(OPT_MTU, &m.to_be_bytes());
        }
        if !o.parameter_list.is_empty() {
            opt(OPT_PARAMETER_LIST, &o.parameter_list);
        }
        b.push(OPT_END);
        if b.len() < MIN_ENCODED {
            b.resize(MIN_ENCODED, 0);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discover() -> Message {
        Message {
            op: OP_REQUEST,
            xid: 0xdead_beef,
            secs: 3,
            flags: FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: Mac([0x52, 0x54, 0, 1, 2, 3]),
            options: Options {
                message_type: Some(MessageType::Discover),
                requested_ip: Some(Ipv4Addr::new(198, 18, 100, 2)),
                parameter_list: vec![1, 3, 6, 26, 51],
                ..Options::default()
            },
        }
    }

    #[test]
    fn round_trip_all_options() {
        let mut m = discover();
        m.op = OP_REPLY;
        m.options = Options {
            message_type: Some(MessageType::Ack),
            server_id: Some(Ipv4Addr::new(198, 18, 100, 1)),
            lease_secs: Some(86400),
            renewal_secs: Some(43200),
            rebinding_secs: Some(75600),
            subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
            routers: vec![Ipv4Addr::new(198, 18, 100, 1)],
            dns: vec![
                Ipv4Addr::new(198, 18, 100, 1),
                Ipv4Addr::new(198, 18, 0, 53),
            ],
            mtu: Some(1400),
            requested_ip: None,
            parameter_list: vec![],
        };
        let b = m.encode();
        assert_eq!(b.len(), 300);
        assert_eq!(Message::parse(&b).unwrap(), m);
        let d = discover();
        assert_eq!(Message::parse(&d.encode()).unwrap(), d);
    }

    #[test]
    fn known_layout() {
        let b = discover().encode();
        assert_eq!(&b[..4], &[1, 1, 6, 0]);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[236..240], &[0x63, 0x82, 0x53, 0x63]);
        assert_eq!(&b[240..243], &[53, 1, 1]);
    }

    #[test]
    fn rejects_bad_messages() {
        let b = discover().encode();
        assert!(Message::parse(&b[..239]).is_err());
        let mut m = b.clone();
        m[236] = 0;
        assert!(Message::parse(&m).is_err(), "no magic");
        let mut m = b.clone();
        m[241] = 200; // option length runs past the end
        assert!(Message::parse(&m).is_err());
        let mut m = b[..243].to_vec(); // no end mark
        m.extend_from_slice(&[0, 0]);
        assert!(Message::parse(&m).is_err());
        let mut big = b.clone();
        big.resize(MAX_LEN + 1, 0);
        assert!(matches!(
            Message::parse(&big),
            Err(WireError::TooLong { .. })
        ));
    }
}
