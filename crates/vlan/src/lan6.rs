//! The LAN's IPv6 side: the gateway as an IPv6 router for an unmodified
//! guest, and the NAT between the guest's address and one outside address.
//!
//! ```text
//!  guest (SLAAC)                         gateway fe80::EUI-64(gateway MAC)
//!   NS  ::  → target (DAD)  ──────────►  learn target if in the prefix; never answer
//!   RS  fe80::g → ff02::2   ──────────►  RA: prefix/64 (L, A, lifetimes ∞), MTU, SLLA
//!   NS  → gateway           ──────────►  NA (R, S, O) with the gateway's MAC
//!   echo → gateway          ──────────►  echo reply
//!   guest addr → anywhere off-link ───►  NAT src := outside ─► ToHost
//!   frame to guest ◄── NAT dst outside := guest addr ◄── from_host
//! ```
//!
//! **Which address is the guest's.** The guest picks it (SLAAC), so the LAN
//! learns it: from the guest's duplicate address detection for an address in
//! the prefix (the authoritative "I take this address now", which also moves
//! the NAT when the guest changes it), or, when none was seen, from the first
//! forwarded packet whose source is in the prefix (a LAN on a migration's
//! destination starts knowing nothing, and the guest does not repeat DAD).
//! Until then, packets from the host go to prefix + EUI-64(guest MAC), which
//! is what a Linux guest with default settings configures. Only one address
//! is the guest's at a time: a guest with privacy addresses would have its
//! other addresses' traffic dropped.

use std::net::Ipv6Addr;

use super::{Action, VirtualLan};
use crate::config::Ipv6Lan;
use crate::wire::icmpv6::{self, RouterAdvert, ND_HOP_LIMIT};
use crate::wire::{ethernet, ipv6, Mac};

/// Router lifetime in advertisements, seconds: three times [`RA_INTERVAL_SECS`]
/// (RFC 4861's default ratio), so a guest keeps its default route between
/// periodic advertisements.
pub const ROUTER_LIFETIME_SECS: u16 = 1800;
/// How often [`crate::serve()`] sends an unsolicited advertisement.
pub const RA_INTERVAL_SECS: u64 = 600;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

impl VirtualLan {
    /// The guest's IPv6 address as far as the LAN knows (learned, or the
    /// EUI-64 guess before that); `None` without IPv6.
    pub fn guest_ipv6(&self) -> Option<Ipv6Addr> {
        let v6 = self.cfg.ipv6?;
        Some(
            self.guest_ip6
                .unwrap_or_else(|| ipv6::with_iid(v6.prefix, ipv6::eui64(self.cfg.guest_mac))),
        )
    }

    /// An unsolicited router advertisement to all nodes (the guest), sent
    /// periodically so its default route does not expire; `None` without IPv6.
    pub fn router_advert(&mut self) -> Option<Vec<u8>> {
        let v6 = self.cfg.ipv6?;
        Some(self.ra_frame(&v6, ipv6::multicast_mac(ALL_NODES), ALL_NODES))
    }

    fn ra_frame(&mut self, v6: &Ipv6Lan, dst_mac: Mac, dst: Ipv6Addr) -> Vec<u8> {
        let ra = RouterAdvert {
            cur_hop_limit: 64,
            router_lifetime: ROUTER_LIFETIME_SECS,
            source_ll: self.cfg.gateway_mac,
            mtu: Some(u32::from(self.cfg.mtu)),
            prefix: Some((v6.prefix, 64)),
            // Infinite: the address must outlive any pause in advertisements
            // (a paused or moving VM), and the prefix never changes anyway.
            prefix_valid: u32::MAX,
            prefix_preferred: u32::MAX,
        };
        let src = self.cfg.gateway_ll();
        self.stats.router_adverts += 1;
        let m = icmpv6::router_advert(src, dst, &ra);
        self.nd_frame(dst_mac, src, dst, &m)
    }

    /// An ICMPv6 message from the gateway in a frame for the guest.
    fn nd_frame(&self, dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> Vec<u8> {
        // ICMPv6 messages the LAN builds are a few dozen bytes (or an echo
        // whose request already fitted the MTU): always below 64 KiB.
        let ip = ipv6::build(src, dst, ipv6::PROTO_ICMPV6, ND_HOP_LIMIT, icmp).unwrap_or_default();
        ethernet::build(dst_mac, self.cfg.gateway_mac, ethernet::ETHERTYPE_IPV6, &ip)
    }

    pub(super) fn ipv6_from_guest(&mut self, dst_mac: Mac, payload: &[u8]) -> Option<Action> {
        let Some(v6) = self.cfg.ipv6 else {
            self.stats.ignored += 1;
            return None;
        };
        let Ok(p) = ipv6::Packet::parse(payload) else {
            self.stats.malformed += 1;
            return None;
        };
        let h = p.header;
        let gw = self.cfg.gateway_ll();
        let multicast = h.dst.is_multicast();
        // Multicast must travel in a group frame, unicast to the gateway's MAC.
        if (multicast && !dst_mac.is_multicast()) || (!multicast && dst_mac != self.cfg.gateway_mac)
        {
            self.stats.ignored += 1;
            return None;
        }
        if multicast || h.dst == gw {
            return match p.transport() {
                Some((ipv6::PROTO_ICMPV6, at)) => self.icmpv6_to_gateway(&v6, &p, at),
                _ => {
                    // MLD reports, multicast DNS, ...: nobody listens here.
                    self.stats.ignored += 1;
                    None
                }
            };
        }
        if !self.guest_source(&v6, h.src) {
            self.stats.spoofed += 1;
            return None;
        }
        if ipv6::same_64(h.dst, v6.prefix)
            || ipv6::is_link_local(h.dst)
            || h.dst.is_unspecified()
            || h.dst.is_loopback()
        {
            self.stats.unserved += 1;
            return None;
        }
        if p.bytes.len() > usize::from(self.cfg.mtu) {
            self.stats.oversize += 1;
            return None;
        }
        let mut out = p.bytes.to_vec();
        ipv6::rewrite_addrs(&mut out, Some(v6.outside), None).ok()?;
        self.stats.to_host += 1;
        Some(Action::ToHost(out))
    }

    /// Whether `src` is the guest's address (learning it if none is known).
    fn guest_source(&mut self, v6: &Ipv6Lan, src: Ipv6Addr) -> bool {
        match self.guest_ip6 {
            Some(a) => a == src,
            None if ipv6::same_64(src, v6.prefix) && src != v6.prefix => {
                self.learn(src);
                true
            }
            None => false,
        }
    }

    fn learn(&mut self, a: Ipv6Addr) {
        if self.guest_ip6 != Some(a) {
            self.guest_ip6 = Some(a);
            self.stats.ipv6_learned += 1;
        }
    }

    fn icmpv6_to_gateway(
        &mut self,
        v6: &Ipv6Lan,
        p: &ipv6::Packet<'_>,
        at: usize,
    ) -> Option<Action> {
        let h = p.header;
        let Ok(m) = icmpv6::Message::parse(&p.bytes[at..], h.src, h.dst) else {
            self.stats.malformed += 1;
            return None;
        };
        let nd = matches!(
            m.typ,
            icmpv6::ROUTER_SOLICIT | icmpv6::NEIGHBOR_SOLICIT | icmpv6::NEIGHBOR_ADVERT
        );
        // ND that crossed a router, or comes from an address that is not the
        // guest's link-local, unspecified or its address in the prefix.
        let src_ok =
            h.src.is_unspecified() || ipv6::is_link_local(h.src) || ipv6::same_64(h.src, v6.prefix);
        if nd && (h.hop_limit != ND_HOP_LIMIT || !src_ok) {
            self.stats.malformed += 1;
            return None;
        }
        let gw = self.cfg.gateway_ll();
        // Replies go back to the sender; from :: (no address yet) to all nodes.
        let (reply_mac, reply_to) = if h.src.is_unspecified() {
            (ipv6::multicast_mac(ALL_NODES), ALL_NODES)
        } else {
            (self.cfg.guest_mac, h.src)
        };
        match m.typ {
            icmpv6::ROUTER_SOLICIT => {
                let Ok(o) = m.router_solicit() else {
                    self.stats.malformed += 1;
                    return None;
                };
                if o.source_ll.is_some_and(|mac| mac != self.cfg.guest_mac) {
                    self.stats.spoofed += 1;
                    return None;
                }
                Some(Action::ToGuest(self.ra_frame(v6, reply_mac, reply_to)))
            }
            icmpv6::NEIGHBOR_SOLICIT => {
                let Ok((target, o)) = m.neighbor_solicit() else {
                    self.stats.malformed += 1;
                    return None;
                };
                if o.source_ll.is_some_and(|mac| mac != self.cfg.guest_mac) {
                    self.stats.spoofed += 1;
                    return None;
                }
                if target == gw {
                    // Solicited only when asked by an address; a DAD probe for
                    // the gateway's address gets the "taken" answer to all nodes.
                    let mut flags = icmpv6::NA_ROUTER | icmpv6::NA_OVERRIDE;
                    if !h.src.is_unspecified() {
                        flags |= icmpv6::NA_SOLICITED;
                    }
                    let na = icmpv6::neighbor_advert(gw, reply_to, flags, gw, self.cfg.gateway_mac);
                    self.stats.neighbor_adverts += 1;
                    return Some(Action::ToGuest(self.nd_frame(reply_mac, gw, reply_to, &na)));
                }
                if h.src.is_unspecified() && ipv6::same_64(target, v6.prefix) && target != v6.prefix
                {
                    // The guest's DAD for its address: stay silent (it passes)
                    // and take note.
                    self.learn(target);
                    return None;
                }
                // DAD for its link-local address, or resolving a neighbour
                // nobody is: no answer.
                self.stats.unserved += 1;
                None
            }
            icmpv6::ECHO_REQUEST if h.dst == gw => {
                let Some((id, seq, data)) = m.echo() else {
                    self.stats.malformed += 1;
                    return None;
                };
                if h.src.is_unspecified() || p.bytes.len() > usize::from(self.cfg.mtu) {
                    self.stats.unserved += 1;
                    return None;
                }
                let r = icmpv6::echo(gw, h.src, icmpv6::ECHO_REPLY, id, seq, data);
                self.stats.icmp_echo_replies += 1;
                Some(Action::ToGuest(self.nd_frame(
                    self.cfg.guest_mac,
                    gw,
                    h.src,
                    &r,
                )))
            }
            _ => {
                self.stats.ignored += 1;
                None
            }
        }
    }

    pub(super) fn ipv6_from_host(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let to = self.guest_ipv6();
        let parsed = ipv6::Packet::parse(packet).ok();
        let (Some(v6), Some(to), Some(p)) = (self.cfg.ipv6, to, parsed) else {
            self.stats.from_host_dropped += 1;
            return None;
        };
        let s = p.header.src;
        // From a peer's global address to the VM's outside address only: a
        // source on the guest's own link would confuse its neighbour cache.
        if p.header.dst != v6.outside
            || s.is_multicast()
            || s.is_unspecified()
            || ipv6::is_link_local(s)
            || ipv6::same_64(s, v6.prefix)
        {
            self.stats.from_host_dropped += 1;
            return None;
        }
        if p.bytes.len() > usize::from(self.cfg.mtu) {
            self.stats.oversize += 1;
            self.stats.from_host_dropped += 1;
            return None;
        }
        let mut out = p.bytes.to_vec();
        ipv6::rewrite_addrs(&mut out, None, Some(to)).ok()?;
        self.stats.from_host += 1;
        Some(ethernet::build(
            self.cfg.guest_mac,
            self.cfg.gateway_mac,
            ethernet::ETHERTYPE_IPV6,
            &out,
        ))
    }
}

#[cfg(test)]
#[path = "lan6_tests.rs"]
mod tests;
