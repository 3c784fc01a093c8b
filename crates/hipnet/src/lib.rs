//! roam-hipnet: the HIP data plane. A runnable HIP endpoint that lets
//! ordinary programs (nc, curl, ssh) reach a peer by its HIT (IPv6,
//! 2001:20::/28) or LSI (IPv4, 198.19.0.0/16) through a TUN device, with
//! ESP done in user space over UDP (RFC 5770 / RFC 9028 framing, port
//! 10500), because the kernels roam runs on may have no ESP at all.
//!
//! **Owns:** the I/O loop around `roam_hip::Host` ([`endpoint`]), the
//! TUN device ([`tun`]), BEET rewriting between IP packets and ESP
//! payloads ([`beet`]), the ESP back-end seam ([`backend`]: user-space ESP
//! now, a kernel BEET back end later), drop counters ([`stats`]), the
//! control socket ([`control`]), the container that carries associations
//! and their ESP sequence state to another host ([`handover`]), the
//! rendezvous-server role (relaying I1s, RFC 8004) and the `roam-hip`
//! binary (run, keygen, show, ctl, bench).
//!
//! **Does not touch:** HIP wire formats, cryptography or protocol rules
//! (all in `roam-hip`), VMs, roamd, migration. It never routes anything but
//! 2001:20::/28 and 198.19.0.0/16 into its TUN device.
//!
//! ```text
//!   app (nc/ssh) ──► TUN "hip0" ──► beet::outbound ──► Host association by HIT/LSI
//!                                                         │ none yet: queue, connect() (I1)
//!                                                         ▼
//!                                              EspBackend::seal ──► UDP :10500 ──► peer
//!   peer ──► UDP :10500 ──► classify ─┬─ HIP ─► Host::receive ─► Send / Established(SAs)
//!                                     │                          / PeerLocators (peer moved)
//!                                     └─ ESP ─► EspBackend::open ─► beet::inbound ─► TUN ─► app
//!   roam-hip ctl locator ADDR ──► UPDATE(LOCATOR_SET) to every peer (RFC 8046)
//!   roam-hip ctl export ──► stop, hand out associations + ESP seq ──► run --import
//! ```
//!
//! Every packet that cannot be delivered (garbage, forged, replayed, for an
//! unknown SPI, to an unknown LSI) is counted in [`stats::Stats`] and
//! dropped; nothing from the network can stop the loop.

pub mod backend;
pub mod beet;
pub mod bench;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod error;
pub mod handover;
pub mod stats;
pub mod tun;

pub use backend::{EspBackend, UserEsp};
pub use config::{EndpointConfig, PeerSpec};
pub use endpoint::{Endpoint, Handle, PacketDev};
pub use error::{Error, EspDrop, PacketError};
pub use stats::Stats;
