//! The virtual LAN as a pure state machine: frames from the guest in,
//! [`Action`]s out; IPv4 packets from the host in, frames to the guest out.
//!
//! The gateway answers ARP for its own address, DHCP for the guest's MAC and
//! ICMP echo to itself; every other unicast IPv4 packet from the guest's
//! address goes to the host unchanged. With [`LanConfig::ipv6`] it is also an
//! IPv6 router (router and neighbor discovery, SLAAC; see `lan6.rs`) whose
//! forwarded packets are NATed to one outside address (the gateway is a transparent hop: no
//! TTL decrement, so the LAN adds nothing the daemon has to undo). Nothing
//! here depends on time or on which host runs it: the same config gives the
//! same answers everywhere, so the guest cannot tell that it moved.

use std::net::Ipv4Addr;

use crate::config::{ConfigError, LanConfig};
use crate::wire::{arp, dhcp, ethernet, icmp, ipv4, udp, Mac};

/// What to do with the result of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this Ethernet frame to the guest.
    ToGuest(Vec<u8>),
    /// Hand this IPv4 or IPv6 packet to the host (roamd's data path).
    ToHost(Vec<u8>),
}

/// Counters of the LAN (since it was made).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LanStats {
    /// Frames from the guest.
    pub frames_from_guest: u64,
    /// Frames or packets that did not decode (bad length, checksum, field).
    pub malformed: u64,
    /// Frames not for the gateway: other EtherTypes (IPv6, ...), multicast,
    /// broadcast IPv4 other than DHCP, ARP not asking for the gateway.
    pub ignored: u64,
    /// "I am here" frames: QEMU's self-announce (RARP, sent after a migration
    /// or on `announce-self`) and the guest's gratuitous ARP. Seeing them on
    /// a new host means the guest now runs there.
    pub announces: u64,
    /// Frames from a MAC other than the guest's, or IPv4 from another address.
    pub spoofed: u64,
    /// ARP replies sent for the gateway.
    pub arp_replies: u64,
    pub dhcp_discovers: u64,
    pub dhcp_offers: u64,
    pub dhcp_requests: u64,
    pub dhcp_acks: u64,
    pub dhcp_naks: u64,
    /// DHCP messages with no answer (release, decline, another server's, ...).
    pub dhcp_ignored: u64,
    /// ICMP echo requests to the gateway, all answered.
    pub icmp_echo_replies: u64,
    /// Packets to the gateway or to another address on the LAN that nobody serves.
    pub unserved: u64,
    /// Packets larger than the MTU (either direction).
    pub oversize: u64,
    /// Router advertisements sent (solicited and periodic).
    pub router_adverts: u64,
    /// Neighbor advertisements sent for the gateway's IPv6 address.
    pub neighbor_adverts: u64,
    /// Times the guest's IPv6 address was learned or changed (DAD or traffic).
    pub ipv6_learned: u64,
    /// IPv4/IPv6 packets handed to the host.
    pub to_host: u64,
    /// IPv4/IPv6 packets from the host made into frames for the guest.
    pub from_host: u64,
    /// Packets from the host refused (malformed, not to the guest's address, oversize).
    pub from_host_dropped: u64,
}

/// One guest's LAN.
#[derive(Debug)]
pub struct VirtualLan {
    cfg: LanConfig,
    stats: LanStats,
    ident: u16,
    /// The guest's IPv6 address in the LAN's prefix, once seen.
    guest_ip6: Option<std::net::Ipv6Addr>,
}

impl VirtualLan {
    /// A LAN for `cfg` (validated).
    pub fn new(cfg: LanConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(VirtualLan {
            cfg,
            stats: LanStats::default(),
            ident: 0,
            guest_ip6: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &LanConfig {
        &self.cfg
    }

    /// The counters.
    pub fn stats(&self) -> LanStats {
        self.stats
    }

    /// Handles one Ethernet frame sent by the guest.
    pub fn from_guest(&mut self, frame: &[u8]) -> Option<Action> {
        self.stats.frames_from_guest += 1;
        let Ok(f) = ethernet::Frame::parse(frame) else {
            self.stats.malformed += 1;
            return None;
        };
        if f.src != self.cfg.guest_mac {
            self.stats.spoofed += 1;
            return None;
        }
        if f.ethertype == ethernet::ETHERTYPE_IPV6 {
            // Neighbor discovery is multicast: its own destination checks.
            return self.ipv6_from_guest(f.dst, f.payload);
        }
        if f.dst != self.cfg.gateway_mac && !f.dst.is_broadcast() {
            self.stats.ignored += 1;
            return None;
        }
        match f.ethertype {
            ethernet::ETHERTYPE_ARP => self.arp(f.payload),
            ethernet::ETHERTYPE_IPV4 => self.ipv4_from_guest(f.payload, f.dst.is_broadcast()),
            ethernet::ETHERTYPE_RARP => {
                self.stats.announces += 1;
                None
            }
            _ => {
                self.stats.ignored += 1;
                None
            }
        }
    }

    /// Turns a packet from the host into a frame for the guest. An IPv4
    /// packet must be addressed to the guest's address (the daemon's NAT has
    /// already put it there); an IPv6 one to [`crate::Ipv6Lan::outside`]
    /// (the LAN's NAT puts the guest's address there). Both must fit the MTU.
    pub fn from_host(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        if packet.first().map(|b| b >> 4) == Some(6) {
            return self.ipv6_from_host(packet);
        }
        let p = match ipv4::Packet::parse(packet) {
            Ok(p) if p.header.dst == self.cfg.guest_ip => p,
            _ => {
                self.stats.from_host_dropped += 1;
                return None;
            }
        };
        if p.bytes.len() > usize::from(self.cfg.mtu) {
            self.stats.oversize += 1;
            self.stats.from_host_dropped += 1;
            return None;
        }
        self.stats.from_host += 1;
        Some(self.frame_to_guest(self.cfg.guest_mac, p.bytes))
    }

    fn frame_to_guest(&self, dst: Mac, ip_packet: &[u8]) -> Vec<u8> {
        ethernet::build(
            dst,
            self.cfg.gateway_mac,
            ethernet::ETHERTYPE_IPV4,
            ip_packet,
        )
    }

    fn arp(&mut self, payload: &[u8]) -> Option<Action> {
        let Ok(a) = arp::Arp::parse(payload) else {
            self.stats.malformed += 1;
            return None;
        };
        if a.sender_ip == self.cfg.guest_ip && a.target_ip == self.cfg.guest_ip {
            self.stats.announces += 1;
            return None;
        }
        // Only requests for the gateway. Never answer a probe for the guest's
        // own address (duplicate address detection would see a conflict).
        if a.op != arp::OP_REQUEST || a.target_ip != self.cfg.gateway_ip {
            self.stats.ignored += 1;
            return None;
        }
        if a.sender_mac != self.cfg.guest_mac {
            self.stats.spoofed += 1;
            return None;
        }
        self.stats.arp_replies += 1;
        let r = a.reply_from(self.cfg.gateway_mac);
        Some(Action::ToGuest(ethernet::build(
            a.sender_mac,
            self.cfg.gateway_mac,
            ethernet::ETHERTYPE_ARP,
            &r.encode(),
        )))
    }

    fn ipv4_from_guest(&mut self, payload: &[u8], l2_broadcast: bool) -> Option<Action> {
        let Ok(p) = ipv4::Packet::parse(payload) else {
            self.stats.malformed += 1;
            return None;
        };
        let h = p.header;
        let to_gateway = h.dst == self.cfg.gateway_ip;
        let broadcast = h.dst == Ipv4Addr::BROADCAST || h.dst == self.cfg.broadcast();
        // DHCP first: a client without an address sends from 0.0.0.0.
        if h.protocol == ipv4::PROTO_UDP && (to_gateway || broadcast) && !h.is_fragment() {
            match udp::Datagram::parse(p.payload, h.src, h.dst) {
                Ok(d) if d.dst_port == dhcp::SERVER_PORT => return self.dhcp(d.payload),
                Ok(_) => {}
                Err(_) => {
                    self.stats.malformed += 1;
                    return None;
                }
            }
        }
        if h.src != self.cfg.guest_ip {
            self.stats.spoofed += 1;
            return None;
        }
        if broadcast || h.dst.is_multicast() || l2_broadcast {
            self.stats.ignored += 1;
            return None;
        }
        if p.bytes.len() > usize::from(self.cfg.mtu) {
            self.stats.oversize += 1;
            return None;
        }
        if to_gateway {
            return self.gateway_icmp(&p);
        }
        if self.cfg.on_link(h.dst) || h.dst.is_unspecified() || h.dst.is_loopback() {
            self.stats.unserved += 1;
            return None;
        }
        self.stats.to_host += 1;
        Some(Action::ToHost(p.bytes.to_vec()))
    }

    fn gateway_icmp(&mut self, p: &ipv4::Packet<'_>) -> Option<Action> {
        let echo = (p.header.protocol == ipv4::PROTO_ICMP && !p.header.is_fragment())
            .then(|| icmp::Message::parse(p.payload).ok())
            .flatten()
            .filter(|m| m.typ == icmp::ECHO_REQUEST)
            .and_then(|m| m.echo_id_seq().map(|(id, seq)| (id, seq, m.data)));
        let Some((id, seq, data)) = echo else {
            self.stats.unserved += 1;
            return None;
        };
        let reply = icmp::echo(icmp::ECHO_REPLY, id, seq, data);
        let ip = self.ip_packet(self.cfg.guest_ip, ipv4::PROTO_ICMP, &reply)?;
        self.stats.icmp_echo_replies += 1;
        Some(Action::ToGuest(
            self.frame_to_guest(self.cfg.guest_mac, &ip),
        ))
    }

    fn ip_packet(&mut self, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Option<Vec<u8>> {
        self.ident = self.ident.wrapping_add(1);
        ipv4::build(self.cfg.gateway_ip, dst, proto, 64, self.ident, payload).ok()
    }

    fn dhcp(&mut self, payload: &[u8]) -> Option<Action> {
        use dhcp::MessageType as T;
        let Ok(m) = dhcp::Message::parse(payload) else {
            self.stats.malformed += 1;
            return None;
        };
        // One client per LAN: the guest's NIC. Relayed requests do not happen here.
        if m.op != dhcp::OP_REQUEST
            || m.chaddr != self.cfg.guest_mac
            || m.giaddr != Ipv4Addr::UNSPECIFIED
        {
            self.stats.dhcp_ignored += 1;
            return None;
        }
        let ours = m.options.server_id.is_none_or(|s| s == self.cfg.gateway_ip);
        let reply = match m.options.message_type {
            Some(T::Discover) => {
                self.stats.dhcp_discovers += 1;
                self.stats.dhcp_offers += 1;
                T::Offer
            }
            Some(T::Request) if ours => {
                self.stats.dhcp_requests += 1;
                // SELECTING/INIT-REBOOT name the address in option 50,
                // RENEWING/REBINDING in ciaddr.
                let asked = m.options.requested_ip.unwrap_or(m.ciaddr);
                if asked == self.cfg.guest_ip {
                    self.stats.dhcp_acks += 1;
                    T::Ack
                } else {
                    self.stats.dhcp_naks += 1;
                    T::Nak
                }
            }
            Some(T::Inform) => {
                self.stats.dhcp_acks += 1;
                T::Ack
            }
            _ => {
                self.stats.dhcp_ignored += 1;
                return None;
            }
        };
        let inform = m.options.message_type == Some(T::Inform);
        let lease = self.cfg.lease_secs;
        let options = if reply == T::Nak {
            dhcp::Options {
                message_type: Some(T::Nak),
                server_id: Some(self.cfg.gateway_ip),
                ..dhcp::Options::default()
            }
        } else {
            dhcp::Options {
                message_type: Some(reply),
                server_id: Some(self.cfg.gateway_ip),
                lease_secs: (!inform).then_some(lease),
                renewal_secs: (!inform).then_some(lease / 2),
                rebinding_secs: (!inform).then_some(lease / 8 * 7),
                subnet_mask: Some(self.cfg.netmask()),
                routers: vec![self.cfg.gateway_ip],
                dns: self.cfg.dns.clone(),
                mtu: Some(self.cfg.mtu),
                ..dhcp::Options::default()
            }
        };
        let out = dhcp::Message {
            op: dhcp::OP_REPLY,
            xid: m.xid,
            secs: 0,
            flags: m.flags,
            ciaddr: if inform {
                m.ciaddr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            yiaddr: if reply == T::Nak || inform {
                Ipv4Addr::UNSPECIFIED
            } else {
                self.cfg.guest_ip
            },
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: m.chaddr,
            options,
        };
        // RFC 2131 §4.1: NAKs are broadcast; a client with an address gets
        // unicast to it; one asking for broadcast gets broadcast; else unicast
        // to chaddr/yiaddr (the guest accepts it before configuring).
        let (dst_mac, dst_ip) = if reply == T::Nak || m.flags & dhcp::FLAG_BROADCAST != 0 {
            (Mac::BROADCAST, Ipv4Addr::BROADCAST)
        } else if m.ciaddr != Ipv4Addr::UNSPECIFIED {
            (m.chaddr, m.ciaddr)
        } else {
            (m.chaddr, self.cfg.guest_ip)
        };
        let d = udp::build(
            self.cfg.gateway_ip,
            dst_ip,
            dhcp::SERVER_PORT,
            dhcp::CLIENT_PORT,
            &out.encode(),
        )
        .ok()?;
        let ip = self.ip_packet(dst_ip, ipv4::PROTO_UDP, &d)?;
        Some(Action::ToGuest(self.frame_to_guest(dst_mac, &ip)))
    }
}

#[path = "lan6.rs"]
mod lan6;
pub use lan6::{RA_INTERVAL_SECS, ROUTER_LIFETIME_SECS};

#[cfg(test)]
#[path = "lan_tests.rs"]
mod tests;
