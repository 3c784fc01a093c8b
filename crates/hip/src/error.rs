//! Typed errors for every layer of the crate.

use thiserror::Error;

/// A packet or parameter could not be decoded (or encoded) per RFC 7401 §5.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the fixed header or a declared length needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The packet is larger than a HIP header length can describe.
    #[error("packet of {0} bytes exceeds the 2048-byte HIP maximum")]
    TooLarge(usize),
    /// Header length field below the minimum of 4 (the two HITs).
    #[error("header length field {0} is below the minimum of 4")]
    HeaderLength(u8),
    /// Only version 2 is implemented.
    #[error("unsupported HIP version {0}")]
    Version(u8),
    /// The two fixed bits (SHIM6 compatibility) are wrong.
    #[error("fixed header bits are not 0/1")]
    FixedBits,
    /// An unrecognised packet type: RFC 7401 §5.1 says drop it.
    #[error("unknown packet type {0}")]
    PacketType(u8),
    /// A parameter's declared length runs past the end of the packet.
    #[error("parameter type {ty} at offset {offset} overruns the packet")]
    ParamOverrun { ty: u16, offset: usize },
    /// Parameters must appear in increasing type order (§5.2.1).
    #[error("parameter type {next} follows type {prev}: wrong order")]
    Order { prev: u16, next: u16 },
    /// A critical parameter (odd type) this implementation does not know.
    #[error("unknown critical parameter type {0}")]
    UnknownCritical(u16),
    /// A known parameter whose contents do not match its format.
    #[error("malformed parameter type {ty}: {reason}")]
    BadParam { ty: u16, reason: &'static str },
    /// A parameter's contents are longer than the 16-bit length field.
    #[error("parameter contents of {0} bytes exceed 65535")]
    ParamTooLong(usize),
    /// A UDP datagram that is neither a HIP control packet nor ESP.
    #[error("UDP payload is not a RFC 5770 HIP or ESP datagram")]
    NotHipUdp,
}

/// A cryptographic operation failed or its input was unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    #[error("unsupported DH group {0}")]
    DhGroup(u8),
    #[error("peer DH public value is invalid")]
    DhPublic,
    #[error("unsupported host identity algorithm {0}")]
    HiAlgorithm(u16),
    #[error("host identity public key is malformed")]
    HostId,
    #[error("unsupported HIT suite {0}")]
    HitSuite(u8),
    #[error("signature does not verify")]
    Signature,
    #[error("HMAC does not verify")]
    Mac,
    #[error("unsupported HIP cipher {0}")]
    Cipher(u16),
    #[error("decryption failed")]
    Decrypt,
    #[error("puzzle solution is wrong")]
    Puzzle,
    #[error("puzzle difficulty {0} is out of range")]
    PuzzleDifficulty(u8),
    #[error("keying material exhausted")]
    Keymat,
    #[error("ESP packet rejected: {0}")]
    Esp(&'static str),
}

/// Why a received packet was dropped by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A parameter that this packet type requires is missing.
    #[error("packet lacks required parameter type {0}")]
    Missing(u16),
    /// The packet is valid but not acceptable in the current state.
    #[error("packet not acceptable: {0}")]
    Unexpected(&'static str),
    /// The peer's HIT does not match the HOST_ID it sent.
    #[error("HIT does not match the host identity")]
    HitMismatch,
    /// No common algorithm (DH group, cipher, transport, HIT suite).
    #[error("negotiation failed: {0}")]
    Negotiation(&'static str),
}
