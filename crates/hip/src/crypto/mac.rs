//! What HIP_MAC, HIP_MAC_2, HIP_SIGNATURE and HIP_SIGNATURE_2 cover
//! (RFC 7401 §6.4), and computing/verifying them on a [`Packet`].
//!
//! In every case the covered bytes are the header (checksum zero, header
//! length recomputed to cover only what is included) followed by the
//! parameters whose type is below the MAC/signature's own type. HIP_MAC_2
//! appends the sender's HOST_ID exactly as it was sent in R1.
//! HIP_SIGNATURE_2 additionally zeroes the receiver's (Initiator's) HIT and
//! PUZZLE's Opaque and #I, so R1s can be signed before an I1 arrives.

use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384};

use crate::error::{CryptoError, Error, WireError};
use crate::identity::{HostIdentity, PeerIdentity, Rhash};
use crate::wire::params::{HipMac, HipMac2, HipSignature, HipSignature2};
use crate::wire::{ty, Hit, Packet, RawParam};

/// HMAC with RHASH.
pub fn hmac(rhash: Rhash, key: &[u8], data: &[u8]) -> Vec<u8> {
    match rhash {
        Rhash::Sha256 => {
            // HMAC accepts keys of any length; this cannot fail.
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Rhash::Sha384 => {
            let mut m = <Hmac<Sha384> as Mac>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bytes covered by HIP_MAC.
pub fn mac_input(p: &Packet) -> Result<Vec<u8>, WireError> {
    p.encode_selected(0, |q| q.ty() < ty::HIP_MAC, None)
}

/// Bytes covered by HIP_MAC_2, given the sender's HOST_ID as sent in R1.
pub fn mac2_input(p: &Packet, host_id: &RawParam) -> Result<Vec<u8>, WireError> {
    p.encode_selected(0, |q| q.ty() < ty::HIP_MAC_2, Some(host_id))
}

/// Bytes covered by HIP_SIGNATURE.
pub fn signature_input(p: &Packet) -> Result<Vec<u8>, WireError> {
    p.encode_selected(0, |q| q.ty() < ty::HIP_SIGNATURE, None)
}

/// Bytes covered by HIP_SIGNATURE_2 (R1 only).
pub fn signature2_input(p: &Packet) -> Result<Vec<u8>, WireError> {
    let mut q = p.clone();
    q.header.receiver_hit = Hit::NULL;
    for param in q.params.iter_mut() {
        if param.ty() == ty::PUZZLE {
            let c = param.contents_mut();
            // Opaque (bytes 2..4) and #I (4..) are filled per I1.
            for b in c.iter_mut().skip(2) {
                *b = 0;
            }
        }
    }
    q.encode_selected(0, |x| x.ty() < ty::HIP_SIGNATURE_2, None)
}

/// Adds HIP_MAC computed with `key`.
pub fn add_mac(p: &mut Packet, rhash: Rhash, key: &[u8]) -> Result<(), Error> {
    let m = hmac(rhash, key, &mac_input(p)?);
    p.add(&HipMac(m))?;
    Ok(())
}

/// Verifies HIP_MAC with the peer's key.
pub fn verify_mac(p: &Packet, rhash: Rhash, key: &[u8]) -> Result<(), Error> {
    let got: HipMac = p.get()?.ok_or(Error::Missing(ty::HIP_MAC))?;
    let want = hmac(rhash, key, &mac_input(p)?);
    if ct_eq(&got.0, &want) {
        Ok(())
    } else {
        Err(CryptoError::Mac.into())
    }
}

/// Adds HIP_MAC_2 (R2): covers the Responder's own HOST_ID as sent in R1.
pub fn add_mac2(p: &mut Packet, rhash: Rhash, key: &[u8], host_id: &RawParam) -> Result<(), Error> {
    let m = hmac(rhash, key, &mac2_input(p, host_id)?);
    p.add(&HipMac2(m))?;
    Ok(())
}

pub fn verify_mac2(p: &Packet, rhash: Rhash, key: &[u8], host_id: &RawParam) -> Result<(), Error> {
    let got: HipMac2 = p.get()?.ok_or(Error::Missing(ty::HIP_MAC_2))?;
    let want = hmac(rhash, key, &mac2_input(p, host_id)?);
    if ct_eq(&got.0, &want) {
        Ok(())
    } else {
        Err(CryptoError::Mac.into())
    }
}

/// Signs and adds HIP_SIGNATURE.
pub fn add_signature(p: &mut Packet, id: &HostIdentity) -> Result<(), Error> {
    let sig = id.sign(&signature_input(p)?);
    p.add(&HipSignature {
        algorithm: id.algorithm(),
        signature: sig,
    })?;
    Ok(())
}

pub fn verify_signature(p: &Packet, peer: &PeerIdentity) -> Result<(), Error> {
    let s: HipSignature = p.get()?.ok_or(Error::Missing(ty::HIP_SIGNATURE))?;
    if s.algorithm != peer.algorithm {
        return Err(CryptoError::Signature.into());
    }
    peer.verify(&signature_input(p)?, &s.signature)?;
    Ok(())
}

/// Signs and adds HIP_SIGNATURE_2.
pub fn add_signature2(p: &mut Packet, id: &HostIdentity) -> Result<(), Error> {
    let sig = id.sign(&signature2_input(p)?);
    p.add(&HipSignature2 {
        algorithm: id.algorithm(),
        signature: sig,
    })?;
    Ok(())
}

pub fn verify_signature2(p: &Packet, peer: &PeerIdentity) -> Result<(), Error> {
    let s: HipSignature2 = p.get()?.ok_or(Error::Missing(ty::HIP_SIGNATURE_2))?;
    if s.algorithm != peer.algorithm {
        return Err(CryptoError::Signature.into());
    }
    peer.verify(&signature2_input(p)?, &s.signature)?;
    Ok(())
}
