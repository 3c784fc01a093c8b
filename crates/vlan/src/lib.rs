//! roam-vlan: the stable virtual LAN a VM's unmodified guest sees, served by
//! the hosting roamd through QEMU's stream netdev.
//!
//! **Owns:** the Ethernet/ARP/IPv4/ICMP/UDP/DHCP codecs it needs ([`wire`],
//! pure, bounded; IPv6/ICMPv6/ND too), the LAN's behaviour ([`VirtualLan`], pure:
//! a gateway that answers ARP, DHCP and ICMP echo, and forwards the guest's other
//! IPv4 traffic to the host; with [`LanConfig::ipv6`] also an IPv6 router for
//! SLAAC whose forwarded traffic is NATed to one outside address, the VM's HIT), and the unix socket QEMU connects to ([`serve()`]: length-prefixed
//! frames, a reconnecting QEMU replaces the previous connection, bounded queues,
//! counters).
//!
//! It also offers the NAT primitive roamd needs between the guest's address
//! and the VM's LSI: [`wire::ipv4::rewrite_addrs`] (incremental checksums);
//! its IPv6 twin [`wire::ipv6::rewrite_addrs`] is used by the LAN itself,
//! which alone knows the address the guest picked by SLAAC.
//!
//! **Does not touch:** what happens to the guest's packets after they leave the
//! LAN (roamd NATs the guest address to the VM's LSI and hands the packets to
//! roam-hipnet), QEMU itself (roam-vm starts it with `NicConfig`), or any
//! state that would differ between hosts: the same [`LanConfig`] gives the same
//! gateway MAC/IP and the same lease everywhere, so a migrated guest notices
//! nothing.
//!
//! ```text
//!  guest eth0 ──virtio-net── QEMU -netdev stream ──unix socket (u32 BE len | frame)──┐
//!                                                                                    ▼
//!  ┌──────────────── roam-vlan ─────────────────────────────────────────────────────────┐
//!  │ serve: accept (newest QEMU wins) → reader ─frames→ VirtualLan::from_guest          │
//!  │          ARP who-has gateway ─► ARP reply ──────────┐                              │
//!  │          DHCP DISCOVER/REQUEST ─► OFFER/ACK/NAK ────┼─► writer (bounded) ─► QEMU   │
//!  │          ICMP(v6) echo to gateway ─► echo reply ────┤                              │
//!  │          IPv6 RS / NS for gateway ─► RA / NA ───────┘   (DAD: silent, learned)     │
//!  │          other unicast IPv4 from the guest's address ─► mpsc "from guest" ─► host  │
//!  │          IPv6 from the guest's address ─► NAT src := HIT ─► the same queue         │
//!  │        host ─► mpsc "to guest" ─► VirtualLan::from_host ─► frame ─► writer         │
//!  │                                  (IPv6: NAT dst HIT := the guest's address)        │
//!  └────────────────────────────────────────────────────────────────────────────────────┘
//!          host side (roamd): NAT guest IPv4 ↔ LSI, roam-hipnet PacketDev::Channel
//! ```
//!
//! **Why not `etherparse`.** It is well kept and would cover Ethernet, ARP,
//! IPv4, ICMP and UDP, but not DHCP, which is the largest codec here; the other
//! four are fixed layouts of a few dozen lines each. Owning them keeps one
//! error type, one style of bounds checks, and no dependency for ~400 lines.

// Tests may unwrap (project rule); library code may not.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod lan;
pub mod serve;
pub mod wire;

pub use config::{ConfigError, Ipv6Lan, LanConfig, DEFAULT_GATEWAY_MAC};
pub use lan::{Action, LanStats, VirtualLan};
pub use serve::{serve, Error, Handle, IoStats, ServeStats, MAX_FRAME, QUEUE_DEPTH};
pub use wire::{Mac, WireError};
