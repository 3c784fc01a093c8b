//! Typed errors of the data plane.

use std::net::Ipv4Addr;

use roam_hip::Hit;
use thiserror::Error;

/// A packet from TUN or from an opened ESP payload that cannot be carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("packet is truncated or its length fields are inconsistent")]
    Truncated,
    #[error("packet of {0} bytes is too large")]
    TooLarge(usize),
    #[error("not an IPv4 or IPv6 packet")]
    Version,
    #[error("destination is neither a HIT nor an LSI")]
    NotHip,
    #[error("IPv6 source is not our HIT")]
    WrongSource,
}

/// Why an ESP datagram was not delivered (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EspDrop {
    #[error("no SA for this peer")]
    NoSa,
    #[error("unknown SPI {0:#x}")]
    UnknownSpi(u32),
    #[error("replayed or too old")]
    Replay,
    #[error("ESP packet failed authentication or is malformed")]
    Invalid,
    #[error("sequence number space exhausted: rekey needed")]
    SeqExhausted,
}

/// Configuration, identity-file and set-up errors.
#[derive(Debug, Error)]
pub enum Error {
    #[error("bad peer spec {0:?} (want HIT@ADDR:PORT[/LSI] or HIT[/LSI])")]
    PeerSpec(String),
    #[error("{0} is not an LSI (198.19.0.0/16)")]
    NotLsi(Ipv4Addr),
    #[error("LSI {lsi} is claimed by two HITs ({a} and {b})")]
    LsiClash { lsi: Ipv4Addr, a: Hit, b: Hit },
    #[error("identity file {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("TUN device {name}: {source}")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("carried state: {0}")]
    Handover(#[from] crate::handover::HandoverError),
    #[error("installing carried SAs for {0}: {1}")]
    Restore(Hit, EspDrop),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("HIP: {0}")]
    Hip(#[from] roam_hip::Error),
}
