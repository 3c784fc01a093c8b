//! roam-hip: the Host Identity Protocol version 2 (RFC 7401) as pure codecs,
//! cryptography and a state machine, so that roamd can speak HIP on behalf
//! of each VM and keep its connections bound to a key, not an address.
//!
//! **Owns:** the HIP packet and parameter codec ([`wire`]), host identities,
//! HIT derivation and LSIs ([`identity`]), the protocol cryptography
//! ([`crypto`]: DH groups, KEYMAT, puzzle, HIP_MAC/signature coverage,
//! ENCRYPTED), the association state machine ([`machine`]) and the ESP
//! data-plane codec ([`esp`]). RFC 5770 UDP framing is in [`wire::udp`].
//!
//! **Does not touch:** sockets, TUN devices, clocks or threads. Callers feed
//! packets and the current time in, and send what comes out. The daemon
//! integration (which VM owns which identity, moving an identity with a VM,
//! the TUN plumbing that turns ESP payloads back into IP packets) lives in
//! roamd.
//!
//! ```text
//!              UDP :10500 (RFC 5770)
//!   datagram ──► wire::udp::classify ──┬─ 0x00000000 | HIP ──► Packet::decode
//!                                      │                          │
//!                                      │              machine::Host::receive(now, from, packet)
//!                                      │                 │  uses identity, crypto::{dh, keymat,
//!                                      │                 │  puzzle, mac, cipher}
//!                                      │                 ▼
//!                                      │        Vec<Output>: Send{to, packet} ──► encode ─► frame_hip
//!                                      │                     Established{keys} ──► esp::sas(keys)
//!                                      │                     PeerLocators / Closed / Failed / ...
//!                                      └─ SPI | ESP ──► esp::Inbound::open ──► (next header, payload)
//!   Host::poll(now) drives retransmissions and timers; next_deadline() says when.
//! ```
//!
//! ## What is implemented and tested
//! - RFC 7401 §5.1 header and §5.1.1 checksum (known answers from Appendix
//!   C), §5.2.1 TLV padding, ordering and the critical bit, every §5.2
//!   parameter, plus ESP_INFO/ESP_TRANSFORM (RFC 7402), LOCATOR_SET (RFC
//!   8046), REG_INFO/REQUEST/RESPONSE/FAILED (RFC 8003), FROM/RVS_HMAC/VIA_RVS
//!   (RFC 8004). Unknown non-critical parameters are preserved, unknown
//!   critical ones reject the packet. Property tests and a cargo-fuzz
//!   target (`fuzz/`) cover the decoder.
//! - HITs per RFC 7343 ORCHIDv2 (2001:20::/28, OGA ID = HIT suite, middle 96
//!   bits of the hash); ECDSA P-256 identities (suite 2, SHA-384) and RSA
//!   identities ([`hi_rsa`]: RFC 3110 key format, RSASSA-PSS/SHA-256, suite
//!   1). LSIs from 198.19.0.0/16.
//! - DH groups 7 (P-256) and 3 (1536-bit MODP, the one §5.2.7 makes
//!   mandatory); KEYMAT by HKDF (§6.5); the puzzle (§4.1.2, §6.3);
//!   HIP_MAC, HIP_MAC_2, HIP_SIGNATURE, HIP_SIGNATURE_2 (§6.4); AES-128-CBC
//!   for ENCRYPTED (§5.2.18).
//! - The state machine of §4.4 / §6: base exchange, retransmission,
//!   simultaneous open, R1 precreation with a rotating puzzle secret, #K
//!   raised under an I1 flood, CLOSE/CLOSE_ACK, NOTIFY, UPDATE with SEQ/ACK
//!   and LOCATOR_SET; return routability of a new peer locator
//!   (ECHO_REQUEST_SIGNED / ECHO_RESPONSE_SIGNED, RFC 8046 §5.4) with
//!   credit-based authorisation for data sent before it is verified;
//!   rekeying the ESP SAs through UPDATE with ESP_INFO (RFC 7402 §3.3,
//!   keys drawn further along the KEYMAT, no new DH).
//! - ESP suite 8 (AES-128-CBC, HMAC-SHA-256-128) in BEET semantics with a
//!   64-packet anti-replay window.
//! - Registration (RFC 8003) inside the base exchange: REG_INFO in R1,
//!   REG_REQUEST in I2, REG_RESPONSE / REG_FAILED in R2; and inside UPDATE
//!   (renewal at half the granted lifetime, cancellation with lifetime 0,
//!   the answer in the ACKing UPDATE), with expiry at the registrar.
//! - Rendezvous (RFC 8004): relaying an I1 with FROM and RVS_HMAC
//!   ([`rvs`]); a Responder answers a relayed I1 directly with VIA_RVS.
//! - Moving an association with its VM: a versioned, bounded, checksummed
//!   export/import of the association, ESP sequence numbers and replay
//!   window carried over.
//! - An independent check: `tests/hip_check.py` re-verifies a whole base
//!   exchange from the RFC text with Python's `cryptography`.
//!
//! ## Not implemented
//! DSA host identities, ECDSA P-384 and ECDSA_LOW, DH groups 4, 8, 9, 10, 11, opportunistic mode,
//! CERT, rekeying with a new Diffie-Hellman, multihoming (RFC 8047), registrar-initiated
//! cancellation (an unsolicited REG_RESPONSE with lifetime 0), per-type lifetimes,
//! ICMP error generation, ESP suites other than 8 and extended sequence
//! numbers.

pub mod crypto;
pub mod error;
pub mod esp;
pub mod hi_rsa;
pub mod identity;
pub mod machine;
pub mod rvs;
pub mod wire;

pub use error::{CryptoError, Error, WireError};
pub use identity::{HitSuite, HostIdentity, LsiPool, PeerIdentity};
pub use machine::{AssociationKeys, Config, Host, Output, State};
pub use wire::{Hit, Packet, PacketType};
