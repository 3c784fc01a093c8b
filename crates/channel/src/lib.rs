//! roam-channel: host identity and the authenticated, encrypted host-to-host channel.
//!
//! Owns: a host's Ed25519 identity (generate/save/load, the `ed25519:…` text form the CLI
//! pins), the trust store interface, and a QUIC endpoint (quinn + rustls/ring) whose
//! connections are mutually authenticated by pinned keys. Everything two roam hosts say
//! to each other goes through it: control messages, QEMU's migration stream, disk blocks.
//!
//! Does not own: what the messages mean (roam-control, roam-migrate), where peers'
//! addresses and keys are stored (roamd), or anything about QEMU. It never touches the
//! network except through the one UDP socket of an [`Endpoint`].
//!
//! ```text
//!  roamd (office)                                roamd (home)
//!  control   QEMU migration   disk               control   QEMU migration   disk
//!   │send_msg  │AsyncWrite     │write               ▲recv_msg  ▲AsyncRead     ▲
//!   ▼          ▼               ▼                    │          │              │
//!  open_stream(kind) → (SendStream, RecvStream)    accept_stream() → (kind, tx, rx)
//!   │  each stream starts with [0x52, kind]         ▲  unknown kinds: reset, counted
//!   ▼                                               │
//!  Connection ── QUIC: TLS 1.3 with pinned Ed25519 keys, BBR, keep-alive ──▶ Connection
//!   │                                               ▲
//!  Endpoint ─ CountingSocket ─ UDP ═══ WAN ═══ UDP ─ CountingSocket ─ Endpoint
//!             (wire bytes)                            (refused keys never get past here)
//! ```
//!
//! Layout: [`identity`] keys and files, [`trust`] who may connect, `tls` certificates
//! and verifiers, [`frame`] the pure message codec, [`stream`] typed streams and framed
//! I/O, [`config`] transport tuning, [`Endpoint`]/[`Connection`] the I/O, [`stats`]
//! counters. See `docs/channel.md` for the design.

pub mod config;
mod connection;
mod endpoint;
pub mod error;
pub mod frame;
pub mod identity;
mod socket;
pub mod stats;
pub mod stream;
mod tls;
pub mod trust;

pub mod congestion;
pub use config::{ChannelConfig, CongestionControl};
pub use connection::{CloseCode, Connection};
pub use endpoint::{ConnectionSummary, Endpoint};
pub use error::ChannelError;
pub use identity::{Identity, IdentityError, KeyParseError, PublicKey};
pub use stats::{ConnectionStats, EndpointStats};
pub use stream::{recv_msg, send_msg, RecvStream, SendStream, StreamKind};
pub use trust::{Refusal, TrustSet, TrustStore};
