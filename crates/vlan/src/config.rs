//! What the guest's LAN looks like. The same `LanConfig` on every host the VM
//! visits is what makes the move invisible to the guest.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::{ipv6, Mac};

/// The gateway's MAC: locally administered, "roam" in ASCII, then 01. Fixed so
/// that the guest's ARP cache stays right after a move.
pub const DEFAULT_GATEWAY_MAC: Mac = Mac([0x02, 0x72, 0x6f, 0x61, 0x6d, 0x01]);

/// The guest LAN of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    /// The guest NIC's MAC (QEMU's `-device virtio-net-pci,mac=`).
    pub guest_mac: Mac,
    /// The address the guest gets (by DHCP, or configured statically).
    pub guest_ip: Ipv4Addr,
    /// Prefix length of the LAN (8..=30).
    pub prefix_len: u8,
    /// The gateway's MAC (answered in ARP, source of every frame to the guest).
    pub gateway_mac: Mac,
    /// The gateway's address: DHCP server id, router, ICMP echo target.
    pub gateway_ip: Ipv4Addr,
    /// Lease time handed out by DHCP, seconds.
    pub lease_secs: u32,
    /// The guest's MTU (DHCP option 26) and the largest IPv4 packet carried.
    pub mtu: u16,
    /// DNS servers to announce (may be empty).
    pub dns: Vec<Ipv4Addr>,
    /// IPv6 on the LAN (router advertisements, SLAAC, NAT to one outside
    /// address); `None`: IPv6 frames are dropped.
    pub ipv6: Option<Ipv6Lan>,
}

/// The guest LAN's IPv6 side.
///
/// The gateway is `fe80::` + the EUI-64 of its MAC ([`LanConfig::gateway_ll`])
/// and advertises `prefix`/64 for SLAAC. The guest's packets leave the LAN
/// with `outside` as their source and packets to `outside` are delivered to
/// the guest's address: a NAT, like roamd's IPv4 one, but inside the LAN,
/// because only the LAN knows which address the guest picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Lan {
    /// The guest's /64 (only the first 64 bits count; the rest must be zero).
    /// Keep it the same on every host (e.g. [`ipv6::ula_prefix`] of the VM's
    /// identity), or a moved guest would keep an address nobody routes.
    pub prefix: Ipv6Addr,
    /// The guest's address off the LAN (for roamd: the VM's HIT).
    pub outside: Ipv6Addr,
}
/// A config the LAN refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("prefix length {0} out of range 8..=30")]
    Prefix(u8),
    #[error("gateway {gateway} and guest {guest} are not in one /{prefix}")]
    NotOnLink {
        guest: Ipv4Addr,
        gateway: Ipv4Addr,
        prefix: u8,
    },
    #[error("{0} is the network, broadcast or a special address")]
    BadAddress(Ipv4Addr),
    #[error("guest and gateway share the address {0}")]
    SameAddress(Ipv4Addr),
    #[error("MAC {0} is multicast, zero, or shared by guest and gateway")]
    BadMac(Mac),
    #[error("MTU {0} out of range 576..=9000")]
    Mtu(u16),
    #[error("lease of {0} s is shorter than 60 s")]
    Lease(u32),
    #[error("IPv6 {addr}: {why}")]
    Ipv6 { addr: Ipv6Addr, why: &'static str },
}

impl LanConfig {
    /// roam's default LAN for a guest NIC: guest 198.18.100.2/24, gateway
    /// 198.18.100.1 with [`DEFAULT_GATEWAY_MAC`], a one-day lease, MTU 1400
    /// (room for the IPv4 + UDP + ESP + inner-IPv4 overhead of the HIP data
    /// path on a 1500-byte WAN), no DNS.
    pub fn new(guest_mac: Mac) -> Self {
        LanConfig {
            guest_mac,
            guest_ip: Ipv4Addr::new(198, 18, 100, 2),
            prefix_len: 24,
            gateway_mac: DEFAULT_GATEWAY_MAC,
            gateway_ip: Ipv4Addr::new(198, 18, 100, 1),
            lease_secs: 86_400,
            mtu: 1400,
            dns: Vec::new(),
            ipv6: None,
        }
    }

    /// The gateway's IPv6 link-local address (from its MAC, so the same everywhere).
    pub fn gateway_ll(&self) -> Ipv6Addr {
        ipv6::link_local(self.gateway_mac)
    }

    /// The netmask of `prefix_len`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len.clamp(1, 32))))
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.guest_ip) | !u32::from(self.netmask()))
    }

    /// Whether `ip` lies in the LAN's subnet.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.netmask());
        u32::from(ip) & m == u32::from(self.guest_ip) & m
    }

    /// Checks the config for consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(8..=30).contains(&self.prefix_len) {
            return Err(ConfigError::Prefix(self.prefix_len));
        }
        if !self.on_link(self.gateway_ip) {
            return Err(ConfigError::NotOnLink {
                guest: self.guest_ip,
                gateway: self.gateway_ip,
                prefix: self.prefix_len,
            });
        }
        let m = u32::from(self.netmask());
        for ip in [self.guest_ip, self.gateway_ip] {
            let host = u32::from(ip) & !m;
            if host == 0 || host == !m || ip.is_multicast() || ip.is_loopback() {
                return Err(ConfigError::BadAddress(ip));
            }
        }
        if self.guest_ip == self.gateway_ip {
            return Err(ConfigError::SameAddress(self.guest_ip));
        }
        for mac in [self.guest_mac, self.gateway_mac] {
            if mac.is_multicast() || mac.0 == [0; 6] || self.guest_mac == self.gateway_mac {
                return Err(ConfigError::BadMac(mac));
            }
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if self.lease_secs < 60 {
            return Err(ConfigError::Lease(self.lease_secs));
        }
        if let Some(v6) = &self.ipv6 {
            v6.validate()?;
        }
        Ok(())
    }
}

impl Ipv6Lan {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |addr, why| Err(ConfigError::Ipv6 { addr, why });
        let p = self.prefix;
        if p.octets()[8..] != [0; 8] {
            return bad(p, "prefix has bits set beyond /64");
        }
        if p.is_multicast() || p.is_unspecified() || ipv6::is_link_local(p) {
            return bad(p, "prefix is multicast, unspecified or link-local");
        }
        let o = self.outside;
        if o.is_multicast() || o.is_unspecified() || o.is_loopback() || ipv6::is_link_local(o) {
            return bad(o, "outside address is not a global unicast address");
        }
        if ipv6::same_64(o, p) {
            return bad(o, "outside address lies in the guest's prefix");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_checks_fire() {
        let c = LanConfig::new(Mac([0x52, 0x54, 0, 0, 0, 2]));
        c.validate().unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(198, 18, 100, 255));
        let mut b = c.clone();
        b.gateway_ip = Ipv4Addr::new(198, 18, 101, 1);
        assert!(matches!(b.validate(), Err(ConfigError::NotOnLink { .. })));
        let mut b = c.clone();
        b.guest_ip = Ipv4Addr::new(198, 18, 100, 255);
        assert_eq!(b.validate(), Err(ConfigError::BadAddress(b.guest_ip)));
        let mut b = c.clone();
        b.gateway_mac = b.guest_mac;
        assert!(matches!(b.validate(), Err(ConfigError::BadMac(_))));
        let mut b = c.clone();
        b.mtu = 100;
        assert_eq!(b.validate(), Err(ConfigError::Mtu(100)));
        let mut b = c.clone();
        b.prefix_len = 31;
        assert_eq!(b.validate(), Err(ConfigError::Prefix(31)));
        let hit: Ipv6Addr = "2001:2a::1".parse().unwrap();
        let prefix = ipv6::ula_prefix([1, 2, 3, 4, 5]);
        let mut b = c.clone();
        b.ipv6 = Some(Ipv6Lan {
            prefix,
            outside: hit,
        });
        b.validate().unwrap();
        assert_eq!(
            b.gateway_ll(),
            "fe80::72:6fff:fe61:6d01".parse::<Ipv6Addr>().unwrap()
        );
        for (prefix, outside) in [
            ("fd01:203:405::1", "2001:2a::1"),
            ("fe80::", "2001:2a::1"),
            ("fd01:203:405::", "fd01:203:405::9"),
            ("fd01:203:405::", "ff02::1"),
        ] {
            b.ipv6 = Some(Ipv6Lan {
                prefix: prefix.parse().unwrap(),
                outside: outside.parse().unwrap(),
            });
            assert!(
                matches!(b.validate(), Err(ConfigError::Ipv6 { .. })),
                "{prefix} {outside}"
            );
        }
    }
}
