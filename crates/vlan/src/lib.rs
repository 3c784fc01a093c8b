//! roam-vlan: the stable virtual LAN a VM's unmodified guest sees, served by
//! the hosting roamd through QEMU's stream netdev.
//!
//! **Owns:** the Ethernet/ARP/IPv4/ICMP/UDP/DHCP codecs it needs ([`wire`],
//! pure, bounded), the LAN's behaviour ([`VirtualLan`], pure: a gateway that
//! answers ARP, DHCP and ICMP echo, and forwards the guest's other IPv4 traffic
//! to the host), and the unix socket QEMU connects to ([`serve()`]: length-prefixed
//! frames, a reconnecting QEMU replaces the previous connection, bounded queues,
//! counters).
//!
//! It also offers the NAT primitive roamd needs between the guest's address
//! and the VM's LSI: [`wire::ipv4::rewrite_addrs`] (incremental checksums).
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
//!  │          ICMP echo to gateway ─► echo reply ────────┘                              │
//!  │          other unicast IPv4 from the guest's address ─► mpsc "from guest" ─► host  │
//!  │        host ─► mpsc "to guest" ─► VirtualLan::from_host ─► frame ─► writer         │
//!  └────────────────────────────────────────────────────────────────────────────────────┘
//!          host side (roamd): NAT guest IP ↔ LSI, roam-hipnet PacketDev::Channel
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
