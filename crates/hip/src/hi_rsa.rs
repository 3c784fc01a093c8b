//! RSA host identities (RFC 7401 §5.2.9, HI algorithm 5): the RFC 3110
//! public key format of the Host Identity field, and RSASSA-PSS signatures
//! with SHA-256 (RFC 8017 §8.1, MGF1-SHA-256, 32-octet salt), the hash of
//! HIT suite 1 (RSA/DSA, SHA-256; RFC 7401 §5.2.10) in which every RSA HI's
//! ORCHID is made.
//!
//! ```text
//!  RFC 3110 §2:  e_len (1 octet, 1..=255)            | e | n
//!           or:  0x00 | e_len (2 octets, 256..=4096) | e | n
//!  no leading zero octets in e or n; n of 1024..=4096 bits (bounded
//!  before any big-number arithmetic)
//! ```

use rsa::pss::{BlindedSigningKey, Signature, VerifyingKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

use crate::error::CryptoError;

/// Smallest modulus accepted, in bits.
pub const MIN_BITS: usize = 1024;
/// Largest modulus accepted, in bits (`rsa`'s own cap as well).
pub const MAX_BITS: usize = 4096;
/// Largest public exponent accepted, in octets (RSA keys use 3 or 65537).
const MAX_EXP_LEN: usize = 8;

/// Encodes a public key as the RFC 3110 Host Identity field.
pub fn encode_hi(key: &RsaPublicKey) -> Vec<u8> {
    let e = key.e().to_bytes_be();
    let n = key.n().to_bytes_be();
    let mut hi = Vec::with_capacity(3 + e.len() + n.len());
    if e.len() <= 255 {
        hi.push(e.len() as u8);
    } else {
        hi.push(0);
        hi.extend_from_slice(&(e.len() as u16).to_be_bytes());
    }
    hi.extend_from_slice(&e);
    hi.extend_from_slice(&n);
    hi
}

/// Splits an RFC 3110 Host Identity field into (exponent, modulus) octets,
/// checking every length before touching the numbers.
pub fn split_hi(hi: &[u8]) -> Result<(&[u8], &[u8]), CryptoError> {
    let (&first, rest) = hi.split_first().ok_or(CryptoError::HostId)?;
    let (e_len, rest) = if first != 0 {
        (usize::from(first), rest)
    } else {
        if rest.len() < 2 {
            return Err(CryptoError::HostId);
        }
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        // The long form exists for exponents over 255 octets only.
        if n < 256 {
            return Err(CryptoError::HostId);
        }
        (n, &rest[2..])
    };
    if e_len > MAX_EXP_LEN || rest.len() < e_len {
        return Err(CryptoError::HostId);
    }
    let (e, n) = rest.split_at(e_len);
    if e.first() == Some(&0) || n.first() == Some(&0) {
        return Err(CryptoError::HostId);
    }
    let bits = n.len() * 8;
    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
        return Err(CryptoError::HostId);
    }
    Ok((e, n))
}

/// Parses an RFC 3110 Host Identity field into a public key.
pub fn decode_hi(hi: &[u8]) -> Result<RsaPublicKey, CryptoError> {
    let (e, n) = split_hi(hi)?;
    RsaPublicKey::new(BigUint::from_bytes_be(n), BigUint::from_bytes_be(e))
        .map_err(|_| CryptoError::HostId)
}

/// RSASSA-PSS / SHA-256 signature of `data` (blinded; random salt).
pub fn sign(key: &RsaPrivateKey, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let signer = BlindedSigningKey::<Sha256>::new(key.clone());
    let sig = signer
        .try_sign_with_rng(&mut rand_core::OsRng, data)
        .map_err(|_| CryptoError::Signature)?;
    Ok(sig.to_vec())
}

/// Verifies an RSASSA-PSS / SHA-256 signature; its length must be the
/// modulus length.
pub fn verify(key: &RsaPublicKey, data: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
    if sig.len() != key.size() {
        return Err(CryptoError::Signature);
    }
    let sig = Signature::try_from(sig).map_err(|_| CryptoError::Signature)?;
    VerifyingKey::<Sha256>::new(key.clone())
        .verify(data, &sig)
        .map_err(|_| CryptoError::Signature)
}

/// A fresh RSA key of `bits` bits, public exponent 65537.
pub fn generate(bits: usize) -> Result<RsaPrivateKey, CryptoError> {
    if !(MIN_BITS..=MAX_BITS).contains(&bits) || !bits.is_multiple_of(8) {
        return Err(CryptoError::HostId);
    }
    RsaPrivateKey::new(&mut rand_core::OsRng, bits).map_err(|_| CryptoError::HostId)
}
