//! Typed parameter bodies. Each struct encodes/decodes only the Contents of
//! its TLV; [`super::packet::RawParam`] adds type, length and padding.
//!
//! Sources: RFC 7401 §5.2 (base), RFC 7402 §5.1 (ESP_INFO, ESP_TRANSFORM),
//! RFC 8046 §4 (LOCATOR_SET), RFC 8003 §4 (REG_*), RFC 8004 §4 (FROM,
//! RVS_HMAC, VIA_RVS).

use std::net::Ipv6Addr;

use super::packet::RawParam;
use crate::error::WireError;

/// Parameter type numbers.
pub mod ty {
    pub const ESP_INFO: u16 = 65;
    pub const R1_COUNTER: u16 = 129;
    pub const LOCATOR_SET: u16 = 193;
    pub const PUZZLE: u16 = 257;
    pub const SOLUTION: u16 = 321;
    pub const SEQ: u16 = 385;
    pub const ACK: u16 = 449;
    pub const DH_GROUP_LIST: u16 = 511;
    pub const DIFFIE_HELLMAN: u16 = 513;
    pub const HIP_CIPHER: u16 = 579;
    pub const ENCRYPTED: u16 = 641;
    pub const HOST_ID: u16 = 705;
    pub const HIT_SUITE_LIST: u16 = 715;
    pub const CERT: u16 = 768;
    pub const NOTIFICATION: u16 = 832;
    pub const ECHO_REQUEST_SIGNED: u16 = 897;
    pub const REG_INFO: u16 = 930;
    pub const REG_REQUEST: u16 = 932;
    pub const REG_RESPONSE: u16 = 934;
    pub const REG_FAILED: u16 = 936;
    pub const ECHO_RESPONSE_SIGNED: u16 = 961;
    pub const TRANSPORT_FORMAT_LIST: u16 = 2049;
    pub const ESP_TRANSFORM: u16 = 4095;
    pub const HIP_MAC: u16 = 61505;
    pub const HIP_MAC_2: u16 = 61569;
    pub const HIP_SIGNATURE_2: u16 = 61633;
    pub const HIP_SIGNATURE: u16 = 61697;
    pub const ECHO_RESPONSE_UNSIGNED: u16 = 63425;
    pub const ECHO_REQUEST_UNSIGNED: u16 = 63661;
    pub const FROM: u16 = 65498;
    pub const RVS_HMAC: u16 = 65500;
    pub const VIA_RVS: u16 = 65502;
}

/// The Contents of one parameter type.
pub trait ParamBody: Sized {
    const TYPE: u16;
    fn decode(c: &[u8]) -> Result<Self, WireError>;
    fn encode(&self, out: &mut Vec<u8>);
}

fn bad(ty: u16, reason: &'static str) -> WireError {
    WireError::BadParam { ty, reason }
}

fn be16(c: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([c[at], c[at + 1]])
}

fn be32(c: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]])
}

fn addr16(c: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&c[at..at + 16]);
    Ipv6Addr::from(a)
}

/// Puzzle #I / #J lengths: RHASH_len / 8 for SHA-1, SHA-256, SHA-384.
fn rhash_len_ok(n: usize) -> bool {
    matches!(n, 20 | 32 | 48)
}

/// Parameters whose whole contents are one opaque byte string.
macro_rules! opaque_param {
    ($(#[$m:meta])* $name:ident, $ty:expr) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name(pub Vec<u8>);
        impl ParamBody for $name {
            const TYPE: u16 = $ty;
            fn decode(c: &[u8]) -> Result<Self, WireError> {
                Ok($name(c.to_vec()))
            }
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.0);
            }
        }
    };
}

/// Parameters that are a list of one-octet identifiers.
macro_rules! u8_list_param {
    ($(#[$m:meta])* $name:ident, $ty:expr) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name(pub Vec<u8>);
        impl ParamBody for $name {
            const TYPE: u16 = $ty;
            fn decode(c: &[u8]) -> Result<Self, WireError> {
                Ok($name(c.to_vec()))
            }
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.0);
            }
        }
    };
}

opaque_param!(
    /// HIP_MAC: HMAC over the packet up to this parameter (§5.2.12).
    HipMac,
    ty::HIP_MAC
);
opaque_param!(
    /// HIP_MAC_2: HMAC including the sender's HOST_ID (§5.2.13).
    HipMac2,
    ty::HIP_MAC_2
);
opaque_param!(EchoRequestSigned, ty::ECHO_REQUEST_SIGNED);
opaque_param!(EchoResponseSigned, ty::ECHO_RESPONSE_SIGNED);
opaque_param!(EchoRequestUnsigned, ty::ECHO_REQUEST_UNSIGNED);
opaque_param!(EchoResponseUnsigned, ty::ECHO_RESPONSE_UNSIGNED);
opaque_param!(
    /// RVS_HMAC (RFC 8004 §4.2.2).
    RvsHmac,
    ty::RVS_HMAC
);
u8_list_param!(
    /// Ordered DH Group IDs (§5.2.6).
    DhGroupList,
    ty::DH_GROUP_LIST
);
u8_list_param!(
    /// Ordered HIT Suite IDs, suite in the high nibble (§5.2.10).
    HitSuiteList,
    ty::HIT_SUITE_LIST
);

/// ESP_INFO (RFC 7402 §5.1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EspInfo {
    pub keymat_index: u16,
    pub old_spi: u32,
    pub new_spi: u32,
}

impl ParamBody for EspInfo {
    const TYPE: u16 = ty::ESP_INFO;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() != 12 {
            return Err(bad(Self::TYPE, "length must be 12"));
        }
        Ok(EspInfo {
            keymat_index: be16(c, 2),
            old_spi: be32(c, 4),
            new_spi: be32(c, 8),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.keymat_index.to_be_bytes());
        out.extend_from_slice(&self.old_spi.to_be_bytes());
        out.extend_from_slice(&self.new_spi.to_be_bytes());
    }
}

/// R1_COUNTER (§5.2.3). The reserved word is kept because the Initiator
/// must echo it verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R1Counter {
    pub reserved: u32,
    pub counter: u64,
}

impl ParamBody for R1Counter {
    const TYPE: u16 = ty::R1_COUNTER;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() != 12 {
            return Err(bad(Self::TYPE, "length must be 12"));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&c[4..12]);
        Ok(R1Counter {
            reserved: be32(c, 0),
            counter: u64::from_be_bytes(n),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
    }
}

/// One locator of a LOCATOR_SET (RFC 8046 §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    pub traffic_type: u8,
    pub preferred: bool,
    pub lifetime: u32,
    pub addr: LocatorAddr,
}

/// Locator Type 0 (an IPv6 or IPv4-mapped address) and 1 (ESP SPI plus
/// address); other types are kept as opaque 4-octet words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocatorAddr {
    Ip(Ipv6Addr),
    EspSpi { spi: u32, addr: Ipv6Addr },
    Other { locator_type: u8, data: Vec<u8> },
}

/// LOCATOR_SET (RFC 8046 §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatorSet(pub Vec<Locator>);

impl ParamBody for LocatorSet {
    const TYPE: u16 = ty::LOCATOR_SET;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        let mut v = Vec::new();
        let mut off = 0;
        while off < c.len() {
            if c.len() - off < 8 {
                return Err(bad(Self::TYPE, "truncated locator header"));
            }
            let traffic_type = c[off];
            let lt = c[off + 1];
            let words = usize::from(c[off + 2]);
            let preferred = c[off + 3] & 1 == 1;
            let lifetime = be32(c, off + 4);
            let body = off + 8;
            let blen = words * 4;
            if c.len() - body < blen {
                return Err(bad(Self::TYPE, "locator overruns parameter"));
            }
            let addr = match lt {
                0 if words == 4 => LocatorAddr::Ip(addr16(c, body)),
                1 if words == 5 => LocatorAddr::EspSpi {
                    spi: be32(c, body),
                    addr: addr16(c, body + 4),
                },
                0 | 1 => return Err(bad(Self::TYPE, "wrong locator length")),
                other => LocatorAddr::Other {
                    locator_type: other,
                    data: c[body..body + blen].to_vec(),
                },
            };
            v.push(Locator {
                traffic_type,
                preferred,
                lifetime,
                addr,
            });
            off = body + blen;
        }
        Ok(LocatorSet(v))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for l in &self.0 {
            let (lt, data): (u8, Vec<u8>) = match &l.addr {
                LocatorAddr::Ip(a) => (0, a.octets().to_vec()),
                LocatorAddr::EspSpi { spi, addr } => {
                    let mut d = spi.to_be_bytes().to_vec();
                    d.extend_from_slice(&addr.octets());
                    (1, d)
                }
                LocatorAddr::Other { locator_type, data } => {
                    let mut d = data.clone();
                    d.resize(data.len().div_ceil(4) * 4, 0);
                    (*locator_type, d)
                }
            };
            out.push(l.traffic_type);
            out.push(lt);
            out.push((data.len() / 4) as u8);
            out.push(u8::from(l.preferred));
            out.extend_from_slice(&l.lifetime.to_be_bytes());
            out.extend_from_slice(&data);
        }
    }
}

/// PUZZLE (§5.2.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Puzzle {
    pub k: u8,
    pub lifetime: u8,
    pub opaque: [u8; 2],
    pub i: Vec<u8>,
}

impl ParamBody for Puzzle {
    const TYPE: u16 = ty::PUZZLE;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 4 || !rhash_len_ok(c.len() - 4) {
            return Err(bad(Self::TYPE, "#I length is not an RHASH length"));
        }
        Ok(Puzzle {
            k: c[0],
            lifetime: c[1],
            opaque: [c[2], c[3]],
            i: c[4..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.k, self.lifetime, self.opaque[0], self.opaque[1]]);
        out.extend_from_slice(&self.i);
    }
}

/// SOLUTION (§5.2.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Solution {
    pub k: u8,
    pub opaque: [u8; 2],
    pub i: Vec<u8>,
    pub j: Vec<u8>,
}

impl ParamBody for Solution {
    const TYPE: u16 = ty::SOLUTION;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 4 || !(c.len() - 4).is_multiple_of(2) || !rhash_len_ok((c.len() - 4) / 2) {
            return Err(bad(Self::TYPE, "#I/#J length is not an RHASH length"));
        }
        let n = (c.len() - 4) / 2;
        Ok(Solution {
            k: c[0],
            opaque: [c[2], c[3]],
            i: c[4..4 + n].to_vec(),
            j: c[4 + n..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.k, 0, self.opaque[0], self.opaque[1]]);
        out.extend_from_slice(&self.i);
        out.extend_from_slice(&self.j);
    }
}

/// SEQ (§5.2.16).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq(pub u32);

impl ParamBody for Seq {
    const TYPE: u16 = ty::SEQ;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() != 4 {
            return Err(bad(Self::TYPE, "length must be 4"));
        }
        Ok(Seq(be32(c, 0)))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
}

/// ACK (§5.2.17): one or more peer Update IDs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack(pub Vec<u32>);

impl ParamBody for Ack {
    const TYPE: u16 = ty::ACK;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if !c.len().is_multiple_of(4) {
            return Err(bad(Self::TYPE, "length not a multiple of 4"));
        }
        Ok(Ack(c.chunks_exact(4).map(|w| be32(w, 0)).collect()))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for id in &self.0 {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
}

/// DIFFIE_HELLMAN (§5.2.7): one public value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffieHellman {
    pub group: u8,
    pub public: Vec<u8>,
}

impl ParamBody for DiffieHellman {
    const TYPE: u16 = ty::DIFFIE_HELLMAN;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 3 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        let n = usize::from(be16(c, 1));
        if c.len() != 3 + n {
            return Err(bad(Self::TYPE, "public value length mismatch"));
        }
        Ok(DiffieHellman {
            group: c[0],
            public: c[3..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.group);
        out.extend_from_slice(&(self.public.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.public);
    }
}

/// HIP_CIPHER (§5.2.8). Decoding keeps the first six IDs, as the RFC asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HipCipher(pub Vec<u16>);

impl ParamBody for HipCipher {
    const TYPE: u16 = ty::HIP_CIPHER;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if !c.len().is_multiple_of(2) || c.is_empty() {
            return Err(bad(Self::TYPE, "length must be a non-zero even number"));
        }
        Ok(HipCipher(
            c.chunks_exact(2).take(6).map(|w| be16(w, 0)).collect(),
        ))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for id in &self.0 {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
}

/// ENCRYPTED (§5.2.18): IV and ciphertext, split by the chosen cipher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encrypted {
    pub reserved: u32,
    pub iv_and_data: Vec<u8>,
}

impl ParamBody for Encrypted {
    const TYPE: u16 = ty::ENCRYPTED;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 4 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        Ok(Encrypted {
            reserved: be32(c, 0),
            iv_and_data: c[4..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.reserved.to_be_bytes());
        out.extend_from_slice(&self.iv_and_data);
    }
}

/// Domain Identifier types of HOST_ID.
pub mod di_type {
    pub const NONE: u8 = 0;
    pub const FQDN: u8 = 1;
    pub const NAI: u8 = 2;
}

/// HOST_ID (§5.2.9). `hi` is the Host Identity field exactly as encoded
/// (it is also the ORCHID input, so it must never be re-encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdParam {
    pub algorithm: u16,
    pub hi: Vec<u8>,
    pub di_type: u8,
    pub di: Vec<u8>,
}

impl ParamBody for HostIdParam {
    const TYPE: u16 = ty::HOST_ID;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 6 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        let hi_len = usize::from(be16(c, 0));
        let di_type = c[2] >> 4;
        let di_len = usize::from(be16(c, 2) & 0x0fff);
        if c.len() != 6 + hi_len + di_len {
            return Err(bad(Self::TYPE, "HI/DI lengths do not add up"));
        }
        if di_type == di_type::NONE && di_len != 0 {
            return Err(bad(Self::TYPE, "DI length without DI type"));
        }
        Ok(HostIdParam {
            algorithm: be16(c, 4),
            hi: c[6..6 + hi_len].to_vec(),
            di_type,
            di: c[6 + hi_len..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.hi.len() as u16).to_be_bytes());
        let di = (u16::from(self.di_type & 0x0f) << 12) | (self.di.len() as u16 & 0x0fff);
        out.extend_from_slice(&di.to_be_bytes());
        out.extend_from_slice(&self.algorithm.to_be_bytes());
        out.extend_from_slice(&self.hi);
        out.extend_from_slice(&self.di);
    }
}

/// NOTIFICATION (§5.2.19).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub msg_type: u16,
    pub data: Vec<u8>,
}

/// Notify Message Types (§5.2.19).
pub mod notify {
    pub const UNSUPPORTED_CRITICAL_PARAMETER_TYPE: u16 = 1;
    pub const INVALID_SYNTAX: u16 = 7;
    pub const NO_DH_PROPOSAL_CHOSEN: u16 = 14;
    pub const INVALID_DH_CHOSEN: u16 = 15;
    pub const NO_HIP_PROPOSAL_CHOSEN: u16 = 16;
    pub const INVALID_HIP_CIPHER_CHOSEN: u16 = 17;
    pub const UNSUPPORTED_HIT_SUITE: u16 = 20;
    pub const AUTHENTICATION_FAILED: u16 = 24;
    pub const CHECKSUM_FAILED: u16 = 26;
    pub const HIP_MAC_FAILED: u16 = 28;
    pub const ENCRYPTION_FAILED: u16 = 32;
    pub const INVALID_HIT: u16 = 40;
    pub const BLOCKED_BY_POLICY: u16 = 42;
    pub const RESPONDER_BUSY_PLEASE_RETRY: u16 = 44;
    pub const I2_ACKNOWLEDGEMENT: u16 = 16384;
}

impl ParamBody for Notification {
    const TYPE: u16 = ty::NOTIFICATION;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 4 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        Ok(Notification {
            msg_type: be16(c, 2),
            data: c[4..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.msg_type.to_be_bytes());
        out.extend_from_slice(&self.data);
    }
}

/// REG_INFO (RFC 8003 §4.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegInfo {
    pub min_lifetime: u8,
    pub max_lifetime: u8,
    pub reg_types: Vec<u8>,
}

impl ParamBody for RegInfo {
    const TYPE: u16 = ty::REG_INFO;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 2 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        Ok(RegInfo {
            min_lifetime: c[0],
            max_lifetime: c[1],
            reg_types: c[2..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.min_lifetime, self.max_lifetime]);
        out.extend_from_slice(&self.reg_types);
    }
}

macro_rules! reg_param {
    ($name:ident, $ty:expr) => {
        /// REG_REQUEST / REG_RESPONSE (RFC 8003 §4.2, §4.3).
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            pub lifetime: u8,
            pub reg_types: Vec<u8>,
        }
        impl ParamBody for $name {
            const TYPE: u16 = $ty;
            fn decode(c: &[u8]) -> Result<Self, WireError> {
                if c.is_empty() {
                    return Err(bad(Self::TYPE, "truncated"));
                }
                Ok($name {
                    lifetime: c[0],
                    reg_types: c[1..].to_vec(),
                })
            }
            fn encode(&self, out: &mut Vec<u8>) {
                out.push(self.lifetime);
                out.extend_from_slice(&self.reg_types);
            }
        }
    };
}

reg_param!(RegRequest, ty::REG_REQUEST);
reg_param!(RegResponse, ty::REG_RESPONSE);

/// Registration type of the rendezvous service (RFC 8004 §4.1).
pub const REG_TYPE_RENDEZVOUS: u8 = 1;
/// REG_FAILED type: registration type unavailable (RFC 8003 §4.4).
pub const REG_FAILURE_TYPE_UNAVAILABLE: u8 = 1;

/// Seconds a registration lifetime value stands for: 2^((v - 64) / 8)
/// (RFC 8003 §4.1).
pub fn reg_lifetime_secs(v: u8) -> f64 {
    2f64.powf((f64::from(v) - 64.0) / 8.0)
}

/// The lifetime a registration value grants, or `None` for 0, which in a
/// REG_REQUEST or REG_RESPONSE means cancellation (RFC 8003 §3.2, §3.3).
pub fn reg_lifetime(v: u8) -> Option<std::time::Duration> {
    (v != 0).then(|| std::time::Duration::from_secs_f64(reg_lifetime_secs(v)))
}

/// The smallest registration lifetime value that lasts at least `d`
/// (255, about 177 days, if none does). Searched through [`reg_lifetime`]
/// rather than computed with a logarithm, so rounding can never give a
/// value one step too short.
pub fn reg_lifetime_value(d: std::time::Duration) -> u8 {
    (1..=u8::MAX)
        .find(|v| reg_lifetime(*v).is_some_and(|l| l >= d))
        .unwrap_or(u8::MAX)
}

/// REG_FAILED (RFC 8003 §4.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegFailed {
    pub lifetime: u8,
    pub failure_type: u8,
    pub reg_types: Vec<u8>,
}

impl ParamBody for RegFailed {
    const TYPE: u16 = ty::REG_FAILED;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 2 {
            return Err(bad(Self::TYPE, "truncated"));
        }
        Ok(RegFailed {
            lifetime: c[0],
            failure_type: c[1],
            reg_types: c[2..].to_vec(),
        })
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.lifetime, self.failure_type]);
        out.extend_from_slice(&self.reg_types);
    }
}

/// TRANSPORT_FORMAT_LIST (§5.2.11): parameter types of transport formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportFormatList(pub Vec<u16>);

impl ParamBody for TransportFormatList {
    const TYPE: u16 = ty::TRANSPORT_FORMAT_LIST;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if !c.len().is_multiple_of(2) {
            return Err(bad(Self::TYPE, "odd length"));
        }
        Ok(TransportFormatList(
            c.chunks_exact(2).map(|w| be16(w, 0)).collect(),
        ))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for t in &self.0 {
            out.extend_from_slice(&t.to_be_bytes());
        }
    }
}

/// ESP_TRANSFORM (RFC 7402 §5.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EspTransform(pub Vec<u16>);

impl ParamBody for EspTransform {
    const TYPE: u16 = ty::ESP_TRANSFORM;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() < 2 || !c.len().is_multiple_of(2) {
            return Err(bad(Self::TYPE, "length must be even and at least 2"));
        }
        Ok(EspTransform(
            c[2..].chunks_exact(2).map(|w| be16(w, 0)).collect(),
        ))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0]);
        for s in &self.0 {
            out.extend_from_slice(&s.to_be_bytes());
        }
    }
}

macro_rules! sig_param {
    ($name:ident, $ty:expr) => {
        /// HIP_SIGNATURE / HIP_SIGNATURE_2 (§5.2.14, §5.2.15).
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            pub algorithm: u16,
            pub signature: Vec<u8>,
        }
        impl ParamBody for $name {
            const TYPE: u16 = $ty;
            fn decode(c: &[u8]) -> Result<Self, WireError> {
                if c.len() < 2 {
                    return Err(bad(Self::TYPE, "truncated"));
                }
                Ok($name {
                    algorithm: be16(c, 0),
                    signature: c[2..].to_vec(),
                })
            }
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.algorithm.to_be_bytes());
                out.extend_from_slice(&self.signature);
            }
        }
    };
}

sig_param!(HipSignature, ty::HIP_SIGNATURE);
sig_param!(HipSignature2, ty::HIP_SIGNATURE_2);

/// FROM (RFC 8004 §4.2.1): the Initiator's address, added by a rendezvous
/// server when it relays an I1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct From(pub Ipv6Addr);

impl ParamBody for From {
    const TYPE: u16 = ty::FROM;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if c.len() != 16 {
            return Err(bad(Self::TYPE, "length must be 16"));
        }
        Ok(From(addr16(c, 0)))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.octets());
    }
}

/// VIA_RVS (RFC 8004 §4.2.3): rendezvous servers an I1 went through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViaRvs(pub Vec<Ipv6Addr>);

impl ParamBody for ViaRvs {
    const TYPE: u16 = ty::VIA_RVS;
    fn decode(c: &[u8]) -> Result<Self, WireError> {
        if !c.len().is_multiple_of(16) {
            return Err(bad(Self::TYPE, "length not a multiple of 16"));
        }
        Ok(ViaRvs(
            (0..c.len() / 16).map(|k| addr16(c, k * 16)).collect(),
        ))
    }
    fn encode(&self, out: &mut Vec<u8>) {
        for a in &self.0 {
            out.extend_from_slice(&a.octets());
        }
    }
}

/// Every parameter this crate understands, or an unknown non-critical one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    EspInfo(EspInfo),
    R1Counter(R1Counter),
    LocatorSet(LocatorSet),
    Puzzle(Puzzle),
    Solution(Solution),
    Seq(Seq),
    Ack(Ack),
    DhGroupList(DhGroupList),
    DiffieHellman(DiffieHellman),
    HipCipher(HipCipher),
    Encrypted(Encrypted),
    HostId(HostIdParam),
    HitSuiteList(HitSuiteList),
    Notification(Notification),
    EchoRequestSigned(EchoRequestSigned),
    RegInfo(RegInfo),
    RegRequest(RegRequest),
    RegResponse(RegResponse),
    RegFailed(RegFailed),
    EchoResponseSigned(EchoResponseSigned),
    TransportFormatList(TransportFormatList),
    EspTransform(EspTransform),
    HipMac(HipMac),
    HipMac2(HipMac2),
    HipSignature2(HipSignature2),
    HipSignature(HipSignature),
    EchoResponseUnsigned(EchoResponseUnsigned),
    EchoRequestUnsigned(EchoRequestUnsigned),
    From(From),
    RvsHmac(RvsHmac),
    ViaRvs(ViaRvs),
    /// A non-critical parameter this crate does not interpret, kept as is.
    Unknown {
        ty: u16,
        contents: Vec<u8>,
    },
}

macro_rules! param_table {
    ($($variant:ident => $body:ty),* $(,)?) => {
        impl Param {
            /// Decodes a raw parameter; unknown critical types are an error.
            pub fn decode(raw: &RawParam) -> Result<Param, WireError> {
                let c = raw.contents();
                match raw.ty() {
                    $(<$body>::TYPE => Ok(Param::$variant(<$body>::decode(c)?)),)*
                    t if t & 1 == 1 => Err(WireError::UnknownCritical(t)),
                    t => Ok(Param::Unknown { ty: t, contents: c.to_vec() }),
                }
            }

            /// Encodes back to a raw parameter with zero padding.
            pub fn encode(&self) -> Result<RawParam, WireError> {
                match self {
                    $(Param::$variant(b) => RawParam::from_body(b),)*
                    Param::Unknown { ty, contents } => RawParam::new(*ty, contents),
                }
            }

            pub fn ty(&self) -> u16 {
                match self {
                    $(Param::$variant(_) => <$body>::TYPE,)*
                    Param::Unknown { ty, .. } => *ty,
                }
            }
        }
    };
}

param_table! {
    EspInfo => EspInfo,
    R1Counter => R1Counter,
    LocatorSet => LocatorSet,
    Puzzle => Puzzle,
    Solution => Solution,
    Seq => Seq,
    Ack => Ack,
    DhGroupList => DhGroupList,
    DiffieHellman => DiffieHellman,
    HipCipher => HipCipher,
    Encrypted => Encrypted,
    HostId => HostIdParam,
    HitSuiteList => HitSuiteList,
    Notification => Notification,
    EchoRequestSigned => EchoRequestSigned,
    RegInfo => RegInfo,
    RegRequest => RegRequest,
    RegResponse => RegResponse,
    RegFailed => RegFailed,
    EchoResponseSigned => EchoResponseSigned,
    TransportFormatList => TransportFormatList,
    EspTransform => EspTransform,
    HipMac => HipMac,
    HipMac2 => HipMac2,
    HipSignature2 => HipSignature2,
    HipSignature => HipSignature,
    EchoResponseUnsigned => EchoResponseUnsigned,
    EchoRequestUnsigned => EchoRequestUnsigned,
    From => From,
    RvsHmac => RvsHmac,
    ViaRvs => ViaRvs,
}
