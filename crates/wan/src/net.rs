//! IPv4 prefixes and the router's lookup table. Pure.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An address with a prefix length, as in `198.18.1.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The address (host part kept).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

/// A string that is not `a.b.c.d/n`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an IPv4 CIDR (a.b.c.d/n): {0:?}")]
pub struct BadCidr(pub String);

impl Ipv4Cidr {
    /// Builds one; `prefix` above 32 is an error.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, BadCidr> {
        if prefix > 32 {
            return Err(BadCidr(format!("{addr}/{prefix}")));
        }
        Ok(Self { addr, prefix })
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network this address is in (host bits cleared).
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.addr)) & self.mask() == 0
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix).map_err(|_| bad())
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest-prefix-match table from destination prefix to port index.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Sorted by prefix length, longest first, so the first hit is the best.
    routes: Vec<(Ipv4Cidr, usize)>,
}

impl RouteTable {
    /// Adds a route to port `port`.
    pub fn add(&mut self, net: Ipv4Cidr, port: usize) {
        self.routes.push((net.network(), port));
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix));
    }

    /// The port owning `dst`, if any.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<usize> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(dst))
            .map(|(_, p)| *p)
    }
}

/// The destination of an IPv4 packet, or `None` if it is not one.
pub fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contains() {
        let c: Ipv4Cidr = "198.18.1.2/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "198.18.1.0/24");
        assert!(c.contains(Ipv4Addr::new(198, 18, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(198, 18, 2, 1)));
        assert!("198.18.1.2".parse::<Ipv4Cidr>().is_err());
        assert!("198.18.1.2/33".parse::<Ipv4Cidr>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Ipv4Cidr>()
            .unwrap()
            .contains(Ipv4Addr::BROADCAST));
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::default();
        t.add("198.18.0.0/15".parse().unwrap(), 0);
        t.add("198.18.2.0/24".parse().unwrap(), 1);
        assert_eq!(t.lookup(Ipv4Addr::new(198, 18, 2, 9)), Some(1));
        assert_eq!(t.lookup(Ipv4Addr::new(198, 19, 0, 1)), Some(0));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn dst_of_ipv4_only() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[198, 18, 2, 2]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(198, 18, 2, 2)));
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None);
        assert_eq!(ipv4_dst(&p[..10]), None);
    }
}
