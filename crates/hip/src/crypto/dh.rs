//! Diffie-Hellman groups of RFC 7401 §5.2.7. Group 3 (1536-bit MODP) is the
//! one the RFC makes mandatory; group 7 (NIST P-256 ECDH) is preferred.
//!
//! Encodings: a MODP public value and shared secret are big-endian,
//! left-padded to the prime's length (as in IKE). An ECDH public value is
//! X | Y (RFC 5903 §7, no 0x04 octet); the shared secret is the X
//! coordinate of the shared point (RFC 5903 §9).

use num_bigint::BigUint;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use p256::{AffinePoint, EncodedPoint, NonZeroScalar, ProjectivePoint};
use rand_core::{OsRng, RngCore};

use crate::error::CryptoError;

/// 1536-bit MODP group (RFC 3526 §2), generator 2.
pub const GROUP_MODP_1536: u8 = 3;
/// 3072-bit MODP group (RFC 3526 §4), generator 2.
pub const GROUP_MODP_3072: u8 = 4;
/// NIST P-256 (RFC 5903).
pub const GROUP_NIST_P256: u8 = 7;
/// 2048-bit MODP group (RFC 3526 §3), generator 2.
pub const GROUP_MODP_2048: u8 = 11;

/// Groups this crate implements, in our order of preference.
pub const SUPPORTED_GROUPS: [u8; 2] = [GROUP_NIST_P256, GROUP_MODP_1536];

const MODP_1536_HEX: &str = concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74",
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437",
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05",
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB",
    "9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF",
);

/// The 1536-bit MODP prime.
pub fn modp_1536_prime() -> BigUint {
    // The constant is valid hex; a failure would be caught by every test.
    BigUint::parse_bytes(MODP_1536_HEX.as_bytes(), 16).unwrap_or_default()
}

fn left_pad(v: &BigUint, len: usize) -> Vec<u8> {
    let b = v.to_bytes_be();
    let mut out = vec![0u8; len.saturating_sub(b.len())];
    out.extend_from_slice(&b);
    out
}

#[derive(Clone)]
enum Secret {
    Modp { x: BigUint, p: BigUint },
    Ecdh(NonZeroScalar),
}

/// An ephemeral DH key pair for one group.
#[derive(Clone)]
pub struct DhKey {
    group: u8,
    secret: Secret,
    public: Vec<u8>,
}

impl std::fmt::Debug for DhKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DhKey(group {})", self.group)
    }
}

impl DhKey {
    pub fn generate(group: u8) -> Result<Self, CryptoError> {
        match group {
            GROUP_MODP_1536 => {
                let p = modp_1536_prime();
                let plen = 1536 / 8;
                // 256-bit exponent: ample for a 1536-bit group (RFC 3526 §8
                // estimates ~90-120 bits of strength) and keeps modpow cheap.
                let mut xb = [0u8; 32];
                OsRng.fill_bytes(&mut xb);
                let x = BigUint::from_bytes_be(&xb) | BigUint::from(1u8) << 255u32;
                let y = BigUint::from(2u8).modpow(&x, &p);
                let public = left_pad(&y, plen);
                Ok(DhKey {
                    group,
                    secret: Secret::Modp { x, p },
                    public,
                })
            }
            GROUP_NIST_P256 => {
                let s = NonZeroScalar::random(&mut OsRng);
                let pt = (ProjectivePoint::GENERATOR * *s).to_affine();
                let enc = pt.to_encoded_point(false);
                Ok(DhKey {
                    group,
                    secret: Secret::Ecdh(s),
                    public: enc.as_bytes()[1..].to_vec(),
                })
            }
            other => Err(CryptoError::DhGroup(other)),
        }
    }

    /// A P-256 key from a known scalar (known-answer tests, restored state).
    pub fn p256_from_secret(secret: &[u8; 32]) -> Result<Self, CryptoError> {
        let s: Option<NonZeroScalar> = NonZeroScalar::from_repr((*secret).into()).into();
        let s = s.ok_or(CryptoError::DhPublic)?;
        let pt = (ProjectivePoint::GENERATOR * *s).to_affine();
        Ok(DhKey {
            group: GROUP_NIST_P256,
            secret: Secret::Ecdh(s),
            public: pt.to_encoded_point(false).as_bytes()[1..].to_vec(),
        })
    }

    pub fn group(&self) -> u8 {
        self.group
    }

    /// Our public value, as carried in DIFFIE_HELLMAN.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// Kij from the peer's public value. Rejects values outside the group
    /// (MODP: 1 < y < p-1, RFC 2785 §3.1 range check; ECDH: on the curve).
    pub fn shared(&self, peer: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match &self.secret {
            Secret::Modp { x, p } => {
                let plen = 1536 / 8;
                if peer.len() != plen {
                    return Err(CryptoError::DhPublic);
                }
                let y = BigUint::from_bytes_be(peer);
                let one = BigUint::from(1u8);
                if y <= one || y >= p - &one {
                    return Err(CryptoError::DhPublic);
                }
                Ok(left_pad(&y.modpow(x, p), plen))
            }
            Secret::Ecdh(s) => {
                let mut sec1 = Vec::with_capacity(65);
                match peer.len() {
                    64 => {
                        sec1.push(0x04);
                        sec1.extend_from_slice(peer);
                    }
                    65 if peer[0] == 0x04 => sec1.extend_from_slice(peer),
                    _ => return Err(CryptoError::DhPublic),
                }
                let ep = EncodedPoint::from_bytes(&sec1).map_err(|_| CryptoError::DhPublic)?;
                let pt: Option<AffinePoint> = AffinePoint::from_encoded_point(&ep).into();
                let pt = pt.ok_or(CryptoError::DhPublic)?;
                let shared = (ProjectivePoint::from(pt) * **s).to_affine();
                let enc = shared.to_encoded_point(false);
                let xcoord = enc.x().ok_or(CryptoError::DhPublic)?;
                Ok(xcoord.to_vec())
            }
        }
    }
}

/// The Responder's choice (§5.2.6): the first group in its own list that
/// the Initiator also offered; `None` if there is no overlap.
pub fn select_group(responder: &[u8], initiator: &[u8]) -> Option<u8> {
    responder.iter().copied().find(|g| initiator.contains(g))
}
