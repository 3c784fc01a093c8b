//! ICMPv6 (RFC 4443) and the Neighbor Discovery messages a router on the
//! guest's link needs (RFC 4861): router solicitation/advertisement,
//! neighbor solicitation/advertisement, and echo.
//!
//! Every message is checked against the IPv6 pseudo-header, so parsing needs
//! the two addresses it travelled between. Options are type-length-value in
//! 8-octet units; a zero length is invalid and rejects the message (RFC 4861
//! §4.6), which also guarantees the option walk terminates.

use std::net::Ipv6Addr;

use super::ipv6::{addr_at, upper_checksum, upper_checksum_ok, PROTO_ICMPV6};
use super::{be16, need, Mac, WireError};

pub const ECHO_REQUEST: u8 = 128;
pub const ECHO_REPLY: u8 = 129;
pub const ROUTER_SOLICIT: u8 = 133;
pub const ROUTER_ADVERT: u8 = 134;
pub const NEIGHBOR_SOLICIT: u8 = 135;
pub const NEIGHBOR_ADVERT: u8 = 136;

/// ND option types.
pub const OPT_SOURCE_LL: u8 = 1;
pub const OPT_TARGET_LL: u8 = 2;
pub const OPT_PREFIX_INFO: u8 = 3;
pub const OPT_MTU: u8 = 5;

/// NA flags (top bits of the first word).
pub const NA_ROUTER: u32 = 0x8000_0000;
pub const NA_SOLICITED: u32 = 0x4000_0000;
pub const NA_OVERRIDE: u32 = 0x2000_0000;

/// The hop limit every ND message is sent with and must arrive with: a
/// packet that crossed a router cannot have it (RFC 4861 §6.1, §7.1).
pub const ND_HOP_LIMIT: u8 = 255;

/// A parsed ICMPv6 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub typ: u8,
    pub code: u8,
    /// Everything after type, code and checksum.
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Parses the upper-layer data `buf` sent from `src` to `dst` and checks
    /// its checksum.
    pub fn parse(buf: &'a [u8], src: Ipv6Addr, dst: Ipv6Addr) -> Result<Self, WireError> {
        need("icmpv6", buf, 4)?;
        if !upper_checksum_ok(src, dst, PROTO_ICMPV6, buf) {
            return Err(WireError::Checksum("icmpv6"));
        }
        Ok(Message {
            typ: buf[0],
            code: buf[1],
            body: &buf[4..],
        })
    }

    /// (identifier, sequence, data) of an echo request or reply.
    pub fn echo(&self) -> Option<(u16, u16, &'a [u8])> {
        (matches!(self.typ, ECHO_REQUEST | ECHO_REPLY) && self.code == 0 && self.body.len() >= 4)
            .then(|| (be16(self.body, 0), be16(self.body, 2), &self.body[4..]))
    }

    /// A router solicitation's options.
    pub fn router_solicit(&self) -> Result<Options, WireError> {
        self.nd(ROUTER_SOLICIT, 4)?;
        Options::parse(&self.body[4..])
    }

    /// A neighbor solicitation's target and options.
    pub fn neighbor_solicit(&self) -> Result<(Ipv6Addr, Options), WireError> {
        self.nd(NEIGHBOR_SOLICIT, 20)?;
        Ok((addr_at(self.body, 4), Options::parse(&self.body[20..])?))
    }

    /// A neighbor advertisement's flags word, target and options.
    pub fn neighbor_advert(&self) -> Result<(u32, Ipv6Addr, Options), WireError> {
        self.nd(NEIGHBOR_ADVERT, 20)?;
        let flags = u32::from_be_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]);
        Ok((
            flags,
            addr_at(self.body, 4),
            Options::parse(&self.body[20..])?,
        ))
    }

    fn nd(&self, typ: u8, fixed: usize) -> Result<(), WireError> {
        if self.typ != typ || self.code != 0 {
            return Err(WireError::Invalid {
                what: "icmpv6 nd",
                detail: "unexpected type or code",
            });
        }
        need("icmpv6 nd", self.body, fixed)
    }
}

/// The ND options the LAN reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub source_ll: Option<Mac>,
    pub target_ll: Option<Mac>,
}

impl Options {
    /// Walks the options; unknown ones are skipped (RFC 4861 §4.6).
    pub fn parse(mut buf: &[u8]) -> Result<Self, WireError> {
        let mut o = Options::default();
        while !buf.is_empty() {
            need("nd option", buf, 2)?;
            let len = usize::from(buf[1]) * 8;
            if len == 0 {
                return Err(WireError::Invalid {
                    what: "nd option",
                    detail: "length zero",
                });
            }
            need("nd option", buf, len)?;
            let mac = || {
                let mut m = [0u8; 6];
                m.copy_from_slice(&buf[2..8]);
                Mac(m)
            };
            match buf[0] {
                OPT_SOURCE_LL if len == 8 => o.source_ll = Some(mac()),
                OPT_TARGET_LL if len == 8 => o.target_ll = Some(mac()),
                _ => {}
            }
            buf = &buf[len..];
        }
        Ok(o)
    }
}

/// Builds an ICMPv6 message (type, code, `body`) with its checksum for `src` → `dst`.
pub fn build(src: Ipv6Addr, dst: Ipv6Addr, typ: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(4 + body.len());
    m.extend_from_slice(&[typ, code, 0, 0]);
    m.extend_from_slice(body);
    let c = upper_checksum(src, dst, PROTO_ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An echo request or reply.
pub fn echo(src: Ipv6Addr, dst: Ipv6Addr, typ: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + data.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(data);
    build(src, dst, typ, 0, &b)
}

fn ll_option(typ: u8, mac: Mac) -> [u8; 8] {
    let m = mac.0;
    [typ, 1, m[0], m[1], m[2], m[3], m[4], m[5]]
}

/// What a router advertisement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterAdvert {
    /// Hop limit hosts should use (0: unspecified).
    pub cur_hop_limit: u8,
    /// How long the router is a default router, seconds (at most 9000).
    pub router_lifetime: u16,
    pub source_ll: Mac,
    pub mtu: Option<u32>,
    /// The on-link, autonomous (SLAAC) prefix and its length.
    pub prefix: Option<(Ipv6Addr, u8)>,
    /// Valid and preferred lifetime of the prefix, seconds (u32::MAX: forever).
    pub prefix_valid: u32,
    pub prefix_preferred: u32,
}

/// Builds a router advertisement (no M/O flags: addresses by SLAAC, no DHCPv6).
pub fn router_advert(src: Ipv6Addr, dst: Ipv6Addr, ra: &RouterAdvert) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + 8 + 8 + 32);
    b.extend_from_slice(&[ra.cur_hop_limit, 0]);
    b.extend_from_slice(&ra.router_lifetime.to_be_bytes());
    b.extend_from_slice(&[0; 8]); // reachable time, retrans timer: unspecified
    b.extend_from_slice(&ll_option(OPT_SOURCE_LL, ra.source_ll));
    if let Some(mtu) = ra.mtu {
        b.extend_from_slice(&[OPT_MTU, 1, 0, 0]);
        b.extend_from_slice(&mtu.to_be_bytes());
    }
    if let Some((prefix, len)) = ra.prefix {
        // L (on-link) and A (autonomous address configuration).
        b.extend_from_slice(&[OPT_PREFIX_INFO, 4, len, 0xc0]);
        b.extend_from_slice(&ra.prefix_valid.to_be_bytes());
        b.extend_from_slice(&ra.prefix_preferred.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&prefix.octets());
    }
    build(src, dst, ROUTER_ADVERT, 0, &b)
}

/// Builds a neighbor advertisement for `target` with our link-layer address.
pub fn neighbor_advert(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    flags: u32,
    target: Ipv6Addr,
    target_ll: Mac,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&target.octets());
    b.extend_from_slice(&ll_option(OPT_TARGET_LL, target_ll));
    build(src, dst, NEIGHBOR_ADVERT, 0, &b)
}

/// Builds a router solicitation (what a guest sends; for tests).
pub fn router_solicit(src: Ipv6Addr, dst: Ipv6Addr, source_ll: Option<Mac>) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if let Some(m) = source_ll {
        b.extend_from_slice(&ll_option(OPT_SOURCE_LL, m));
    }
    build(src, dst, ROUTER_SOLICIT, 0, &b)
}

/// Builds a neighbor solicitation (what a guest sends; for tests).
pub fn neighbor_solicit(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    source_ll: Option<Mac>,
) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    b.extend_from_slice(&target.octets());
    if let Some(m) = source_ll {
        b.extend_from_slice(&ll_option(OPT_SOURCE_LL, m));
    }
    build(src, dst, NEIGHBOR_SOLICIT, 0, &b)
}

/// Reads a router advertisement back (for tests and diagnostics): the fixed
/// fields, the source link-layer address, the MTU and the first prefix.
pub fn parse_router_advert(m: &Message<'_>) -> Result<RouterAdvert, WireError> {
    if m.typ != ROUTER_ADVERT || m.code != 0 {
        return Err(WireError::Invalid {
            what: "icmpv6 ra",
            detail: "not a router advertisement",
        });
    }
    need("icmpv6 ra", m.body, 12)?;
    let mut ra = RouterAdvert {
        cur_hop_limit: m.body[0],
        router_lifetime: be16(m.body, 2),
        source_ll: Mac([0; 6]),
        mtu: None,
        prefix: None,
        prefix_valid: 0,
        prefix_preferred: 0,
    };
    ra.source_ll = Options::parse(&m.body[12..])?
        .source_ll
        .unwrap_or(ra.source_ll);
    let mut opts = &m.body[12..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || opts.len() < len {
            break;
        }
        match opts[0] {
            OPT_MTU => ra.mtu = Some(u32::from_be_bytes([opts[4], opts[5], opts[6], opts[7]])),
            OPT_PREFIX_INFO if len == 32 && ra.prefix.is_none() => {
                ra.prefix = Some((addr_at(opts, 16), opts[2]));
                ra.prefix_valid = u32::from_be_bytes([opts[4], opts[5], opts[6], opts[7]]);
                ra.prefix_preferred = u32::from_be_bytes([opts[8], opts[9], opts[10], opts[11]]);
            }
            _ => {}
        }
        opts = &opts[len..];
    }
    Ok(ra)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
    const GW: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x72, 0x6fff, 0xfe61, 0x6d01);
    const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

    #[test]
    fn router_advert_round_trip() {
        let ra = RouterAdvert {
            cur_hop_limit: 64,
            router_lifetime: 1800,
            source_ll: Mac([2, 0x72, 0x6f, 0x61, 0x6d, 1]),
            mtu: Some(1400),
            prefix: Some(("fd12:3456:789a::".parse().unwrap(), 64)),
            prefix_valid: u32::MAX,
            prefix_preferred: u32::MAX,
        };
        let m = router_advert(GW, LL, &ra);
        let p = Message::parse(&m, GW, LL).unwrap();
        assert_eq!(parse_router_advert(&p).unwrap(), ra);
        // The checksum covers the addresses.
        assert_eq!(
            Message::parse(&m, GW, ALL_ROUTERS),
            Err(WireError::Checksum("icmpv6"))
        );
    }

    #[test]
    fn solicitations_and_options() {
        let mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let rs = router_solicit(LL, ALL_ROUTERS, Some(mac));
        let p = Message::parse(&rs, LL, ALL_ROUTERS).unwrap();
        assert_eq!(p.router_solicit().unwrap().source_ll, Some(mac));
        assert!(p.neighbor_solicit().is_err());
        let ns = neighbor_solicit(LL, GW, GW, Some(mac));
        let p = Message::parse(&ns, LL, GW).unwrap();
        let (target, o) = p.neighbor_solicit().unwrap();
        assert_eq!((target, o.source_ll), (GW, Some(mac)));
        let na = neighbor_advert(GW, LL, NA_ROUTER | NA_SOLICITED, GW, mac);
        let p = Message::parse(&na, GW, LL).unwrap();
        let (flags, t, o) = p.neighbor_advert().unwrap();
        assert_eq!(
            (flags, t, o.target_ll),
            (NA_ROUTER | NA_SOLICITED, GW, Some(mac))
        );
        // A zero-length option rejects the message.
        assert!(Options::parse(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Options::parse(&[1, 2, 0, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(Options::parse(&[]).unwrap(), Options::default());
    }

    #[test]
    fn echo_round_trip() {
        let m = echo(LL, GW, ECHO_REQUEST, 7, 9, b"ping");
        let p = Message::parse(&m, LL, GW).unwrap();
        assert_eq!(p.echo(), Some((7, 9, &b"ping"[..])));
        assert!(Message::parse(&m[..3], LL, GW).is_err());
    }
}
