//! Host identities, HIT derivation (RFC 7401 §3.2 + RFC 7343 ORCHIDv2), HIT
//! suites (§5.2.10) and LSI allocation.
//!
//! A local identity is an ECDSA P-256 key (HI algorithm 7, curve 1), which
//! puts its HIT in suite 2 (ECDSA/SHA-384): RFC 7401 Table 10 hashes every
//! ECDSA HI with SHA-384, whatever the curve; or an RSA key (HI algorithm
//! 5, [`crate::hi_rsa`]), whose HIT is in suite 1 (RSA/DSA, SHA-256). DSA
//! keys are not implemented.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::OsRng;
use sha2::{Digest, Sha256, Sha384};

use crate::error::CryptoError;
use crate::wire::params::{di_type, HostIdParam};
use crate::wire::Hit;

/// HI algorithm numbers (§5.2.9).
pub mod algorithm {
    pub const DSA: u16 = 3;
    pub const RSA: u16 = 5;
    pub const ECDSA: u16 = 7;
    pub const ECDSA_LOW: u16 = 9;
}

/// ECC curve labels for algorithm ECDSA (§5.2.9).
pub const ECC_CURVE_P256: u16 = 1;
pub const ECC_CURVE_P384: u16 = 2;

/// HIP's ORCHID context ID (§3.2).
pub const HIT_CONTEXT_ID: [u8; 16] = [
    0xF0, 0xEF, 0xF0, 0x2F, 0xBF, 0xF4, 0x3D, 0x0F, 0xE7, 0x93, 0x0C, 0x3C, 0x6E, 0x61, 0x74, 0xEA,
];

/// First 28 bits of every ORCHIDv2: 2001:20::/28 (RFC 7343 §6).
const ORCHID_PREFIX: [u8; 4] = [0x20, 0x01, 0x00, 0x20];

/// HIT suites (§5.2.10, Table 10). The 4-bit ID is also the ORCHID OGA ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HitSuite {
    /// RSA or DSA HI, SHA-256, HMAC-SHA-256.
    RsaDsaSha256 = 1,
    /// ECDSA HI, SHA-384, HMAC-SHA-384.
    EcdsaSha384 = 2,
}

impl HitSuite {
    pub fn from_id(id: u8) -> Result<Self, CryptoError> {
        match id {
            1 => Ok(HitSuite::RsaDsaSha256),
            2 => Ok(HitSuite::EcdsaSha384),
            other => Err(CryptoError::HitSuite(other)),
        }
    }

    pub fn id(self) -> u8 {
        self as u8
    }

    /// The eight-bit encoding used in HIT_SUITE_LIST (ID in the high nibble).
    pub fn list_octet(self) -> u8 {
        (self as u8) << 4
    }

    /// Suite of a HIT, from its OGA ID.
    pub fn of_hit(hit: &Hit) -> Result<Self, CryptoError> {
        HitSuite::from_id(hit.oga_id())
    }

    /// The hash this suite names: RHASH when this is the Responder's suite.
    pub fn rhash(self) -> Rhash {
        match self {
            HitSuite::RsaDsaSha256 => Rhash::Sha256,
            HitSuite::EcdsaSha384 => Rhash::Sha384,
        }
    }
}

/// RHASH: the hash of the Responder's HIT suite, used for the puzzle, HMAC
/// and the KDF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rhash {
    Sha256,
    Sha384,
}

impl Rhash {
    /// RHASH_len / 8.
    pub fn len(self) -> usize {
        match self {
            Rhash::Sha256 => 32,
            Rhash::Sha384 => 48,
        }
    }

    pub fn is_empty(self) -> bool {
        false
    }

    /// Hash of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Rhash::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
            Rhash::Sha384 => {
                let mut h = Sha384::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
        }
    }
}

/// ORCHIDv2 (RFC 7343 §3): Prefix | OGA ID | Encode_96(Hash(Context ID |
/// Input)), where Encode_96 takes the middle 96 bits of the hash and the
/// input is the HOST_ID's Host Identity field as encoded on the wire.
pub fn orchid(suite: HitSuite, hi: &[u8]) -> Hit {
    let h = suite.rhash().digest(&[&HIT_CONTEXT_ID, hi]);
    let start = (h.len() - 12) / 2;
    let mut out = ORCHID_PREFIX;
    out[3] |= suite.id();
    let mut hit = [0u8; 16];
    hit[..4].copy_from_slice(&out);
    hit[4..].copy_from_slice(&h[start..start + 12]);
    Hit(hit)
}

/// True if `hit` lies in 2001:20::/28.
pub fn is_orchid(hit: &Hit) -> bool {
    hit.0[..3] == ORCHID_PREFIX[..3] && hit.0[3] & 0xf0 == ORCHID_PREFIX[3]
}

/// The HIT suite an HI algorithm belongs to.
pub fn suite_for_algorithm(alg: u16) -> Result<HitSuite, CryptoError> {
    match alg {
        algorithm::RSA | algorithm::DSA => Ok(HitSuite::RsaDsaSha256),
        algorithm::ECDSA => Ok(HitSuite::EcdsaSha384),
        other => Err(CryptoError::HiAlgorithm(other)),
    }
}

/// Encodes a P-256 public key as the ECDSA Host Identity field: ECC Curve
/// (2 octets) followed by the SEC1 uncompressed point (0x04 | X | Y).
fn ecdsa_hi(key: &VerifyingKey) -> Vec<u8> {
    let mut hi = ECC_CURVE_P256.to_be_bytes().to_vec();
    hi.extend_from_slice(key.to_encoded_point(false).as_bytes());
    hi
}

/// The private half of a host identity.
#[derive(Clone)]
enum Secret {
    Ecdsa(SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// Largest encoded secret [`HostIdentity::from_secret`] parses.
const SECRET_MAX: usize = 4096;

/// Our own host identity: the private key, its HOST_ID encoding and HIT.
/// This is what travels with a VM when it migrates.
#[derive(Clone)]
pub struct HostIdentity {
    key: Secret,
    hi: Vec<u8>,
    hit: Hit,
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostIdentity({})", self.hit)
    }
}

impl HostIdentity {
    /// A fresh ECDSA P-256 identity.
    pub fn generate() -> Self {
        Self::from_key(SigningKey::random(&mut OsRng))
    }

    /// A fresh RSA identity (HI algorithm 5, HIT suite 1) of `bits` bits
    /// (1024..=4096; 2048 or more outside tests).
    pub fn generate_rsa(bits: usize) -> Result<Self, CryptoError> {
        Ok(Self::from_rsa(crate::hi_rsa::generate(bits)?))
    }

    /// Restores an identity from its 32-byte private scalar.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Result<Self, CryptoError> {
        let key = SigningKey::from_bytes(secret.into()).map_err(|_| CryptoError::HostId)?;
        Ok(Self::from_key(key))
    }

    fn from_key(key: SigningKey) -> Self {
        let hi = ecdsa_hi(key.verifying_key());
        let hit = orchid(HitSuite::EcdsaSha384, &hi);
        HostIdentity {
            key: Secret::Ecdsa(key),
            hi,
            hit,
        }
    }

    fn from_rsa(key: rsa::RsaPrivateKey) -> Self {
        let hi = crate::hi_rsa::encode_hi(&key.to_public_key());
        let hit = orchid(HitSuite::RsaDsaSha256, &hi);
        HostIdentity {
            key: Secret::Rsa(Box::new(key)),
            hi,
            hit,
        }
    }

    /// The 32-byte private scalar of an ECDSA identity (secret: store
    /// encrypted). An RSA identity has none and gives all zeros, which
    /// [`HostIdentity::from_secret_bytes`] refuses; use
    /// [`HostIdentity::to_secret`] for any identity.
    pub fn secret_bytes(&self) -> [u8; 32] {
        match &self.key {
            Secret::Ecdsa(k) => k.to_bytes().into(),
            Secret::Rsa(_) => [0; 32],
        }
    }

    /// The private key of any identity: algorithm (u16) | key, where the
    /// key is the P-256 scalar (ECDSA) or the PKCS#1 DER RSAPrivateKey (RSA).
    /// Secret: store encrypted.
    pub fn to_secret(&self) -> Vec<u8> {
        let mut v = self.algorithm().to_be_bytes().to_vec();
        match &self.key {
            Secret::Ecdsa(k) => v.extend_from_slice(&k.to_bytes()),
            Secret::Rsa(k) => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                // Encoding a valid key into DER cannot fail.
                if let Ok(der) = k.to_pkcs1_der() {
                    v.extend_from_slice(der.as_bytes());
                }
            }
        }
        v
    }

    /// Restores any identity from [`HostIdentity::to_secret`]'s bytes
    /// (bounded to 4 KiB before parsing).
    pub fn from_secret(b: &[u8]) -> Result<Self, CryptoError> {
        if b.len() < 2 || b.len() > SECRET_MAX {
            return Err(CryptoError::HostId);
        }
        let (alg, key) = b.split_at(2);
        match u16::from_be_bytes([alg[0], alg[1]]) {
            algorithm::ECDSA => {
                let k: &[u8; 32] = key.try_into().map_err(|_| CryptoError::HostId)?;
                Self::from_secret_bytes(k)
            }
            algorithm::RSA => {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                use rsa::traits::PublicKeyParts;
                let k = rsa::RsaPrivateKey::from_pkcs1_der(key).map_err(|_| CryptoError::HostId)?;
                let bits = k.size() * 8;
                if !(crate::hi_rsa::MIN_BITS..=crate::hi_rsa::MAX_BITS).contains(&bits)
                    || k.validate().is_err()
                {
                    return Err(CryptoError::HostId);
                }
                Ok(Self::from_rsa(k))
            }
            other => Err(CryptoError::HiAlgorithm(other)),
        }
    }

    pub fn hit(&self) -> Hit {
        self.hit
    }

    pub fn suite(&self) -> HitSuite {
        match self.key {
            Secret::Ecdsa(_) => HitSuite::EcdsaSha384,
            Secret::Rsa(_) => HitSuite::RsaDsaSha256,
        }
    }

    pub fn algorithm(&self) -> u16 {
        match self.key {
            Secret::Ecdsa(_) => algorithm::ECDSA,
            Secret::Rsa(_) => algorithm::RSA,
        }
    }

    /// The HOST_ID parameter (no domain identifier).
    pub fn host_id_param(&self) -> HostIdParam {
        HostIdParam {
            algorithm: self.algorithm(),
            hi: self.hi.clone(),
            di_type: di_type::NONE,
            di: Vec::new(),
        }
    }

    /// Signs `data` with the identity's algorithm and its suite's hash:
    /// ECDSA over the SHA-384 digest (FIPS 186-4 truncates it to the P-256
    /// order), encoded r | s (RFC 6090), 64 bytes; RSA with RSASSA-PSS /
    /// SHA-256, as long as the modulus.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        match &self.key {
            Secret::Ecdsa(key) => {
                let digest = Sha384::digest(data);
                // Signing a well-formed digest with a valid key cannot fail.
                let sig: Signature = key
                    .sign_prehash(&digest)
                    .unwrap_or_else(|_| unreachable!("ECDSA prehash signing failed"));
                sig.to_bytes().to_vec()
            }
            // PSS fails only for a modulus too short for the salt and
            // hash, which key generation and import exclude.
            Secret::Rsa(key) => crate::hi_rsa::sign(key, data)
                .unwrap_or_else(|_| unreachable!("RSA-PSS signing failed")),
        }
    }

    pub fn peer(&self) -> PeerIdentity {
        let key = match &self.key {
            Secret::Ecdsa(k) => PeerKey::Ecdsa(*k.verifying_key()),
            Secret::Rsa(k) => PeerKey::Rsa(Box::new(k.to_public_key())),
        };
        PeerIdentity {
            algorithm: self.algorithm(),
            key,
            hit: self.hit,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PeerKey {
    Ecdsa(VerifyingKey),
    Rsa(Box<rsa::RsaPublicKey>),
}

/// A verified-format peer public identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub algorithm: u16,
    key: PeerKey,
    hit: Hit,
}

impl PeerIdentity {
    /// Parses a HOST_ID and derives the HIT from its HI bytes as received.
    pub fn from_param(p: &HostIdParam) -> Result<Self, CryptoError> {
        match p.algorithm {
            algorithm::ECDSA => Self::ecdsa(p),
            algorithm::RSA => Ok(PeerIdentity {
                algorithm: p.algorithm,
                key: PeerKey::Rsa(Box::new(crate::hi_rsa::decode_hi(&p.hi)?)),
                hit: orchid(HitSuite::RsaDsaSha256, &p.hi),
            }),
            other => Err(CryptoError::HiAlgorithm(other)),
        }
    }

    fn ecdsa(p: &HostIdParam) -> Result<Self, CryptoError> {
        if p.hi.len() < 2 || u16::from_be_bytes([p.hi[0], p.hi[1]]) != ECC_CURVE_P256 {
            return Err(CryptoError::HostId);
        }
        let point = &p.hi[2..];
        // Accept the raw X | Y form too, as some implementations omit 0x04.
        let key = match point.len() {
            65 => VerifyingKey::from_sec1_bytes(point),
            64 => {
                let mut v = vec![0x04];
                v.extend_from_slice(point);
                VerifyingKey::from_sec1_bytes(&v)
            }
            _ => return Err(CryptoError::HostId),
        }
        .map_err(|_| CryptoError::HostId)?;
        Ok(PeerIdentity {
            algorithm: p.algorithm,
            key: PeerKey::Ecdsa(key),
            hit: orchid(HitSuite::EcdsaSha384, &p.hi),
        })
    }

    pub fn hit(&self) -> Hit {
        self.hit
    }

    pub fn verify(&self, data: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
        match &self.key {
            PeerKey::Ecdsa(key) => {
                let sig = Signature::from_slice(sig).map_err(|_| CryptoError::Signature)?;
                key.verify_prehash(&Sha384::digest(data), &sig)
                    .map_err(|_| CryptoError::Signature)
            }
            PeerKey::Rsa(key) => crate::hi_rsa::verify(key, data, sig),
        }
    }
}

/// Local-scope IPv4 stand-ins for HITs (LSIs), from 198.19.0.0/16 (the
/// project's test range), never the 1.0.0.0/8 block older HIP code used.
#[derive(Debug, Default)]
pub struct LsiPool {
    by_hit: BTreeMap<Hit, Ipv4Addr>,
    by_lsi: BTreeMap<Ipv4Addr, Hit>,
}

/// The pool has no free address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("LSI pool 198.19.0.0/16 is exhausted")]
pub struct LsiExhausted;

impl LsiPool {
    pub const NETWORK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);

    pub fn new() -> Self {
        Self::default()
    }

    /// The LSI for `hit`, allocating one if needed. The first candidate is
    /// derived from the HIT so a HIT tends to keep its LSI across restarts.
    pub fn allocate(&mut self, hit: Hit) -> Result<Ipv4Addr, LsiExhausted> {
        if let Some(a) = self.by_hit.get(&hit) {
            return Ok(*a);
        }
        let start = u16::from_be_bytes([hit.0[14], hit.0[15]]);
        for step in 0..=u16::MAX {
            let host = start.wrapping_add(step);
            // Skip the network and broadcast addresses of the /16.
            if host == 0 || host == u16::MAX {
                continue;
            }
            let [a, b] = host.to_be_bytes();
            let lsi = Ipv4Addr::new(198, 19, a, b);
            if !self.by_lsi.contains_key(&lsi) {
                self.by_hit.insert(hit, lsi);
                self.by_lsi.insert(lsi, hit);
                return Ok(lsi);
            }
        }
        Err(LsiExhausted)
    }

    pub fn get(&self, hit: &Hit) -> Option<Ipv4Addr> {
        self.by_hit.get(hit).copied()
    }

    pub fn hit_of(&self, lsi: &Ipv4Addr) -> Option<Hit> {
        self.by_lsi.get(lsi).copied()
    }

    pub fn release(&mut self, hit: &Hit) {
        if let Some(a) = self.by_hit.remove(hit) {
            self.by_lsi.remove(&a);
        }
    }

    pub fn len(&self) -> usize {
        self.by_hit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hit.is_empty()
    }
}
