//! KEYMAT (RFC 7401 §6.5): HKDF (RFC 5869) with RHASH, salt = #I | #J,
//! IKM = Kij, info = sort(HIT-I | HIT-R). Keys are drawn in order: HIP-gl
//! encryption, HIP-gl integrity, HIP-lg encryption, HIP-lg integrity, then
//! (RFC 7402 §7) ESP SA-gl encryption, SA-gl authentication, SA-lg
//! encryption, SA-lg authentication. "g" is the host with the greater HIT.

use hkdf::Hkdf;
use sha2::{Sha256, Sha384};

use crate::error::CryptoError;
use crate::identity::Rhash;
use crate::wire::Hit;

/// Derives `len` bytes of KEYMAT.
pub fn derive(
    rhash: Rhash,
    kij: &[u8],
    hit_i: &Hit,
    hit_r: &Hit,
    i: &[u8],
    j: &[u8],
    len: usize,
) -> Result<Vec<u8>, CryptoError> {
    let mut salt = Vec::with_capacity(i.len() + j.len());
    salt.extend_from_slice(i);
    salt.extend_from_slice(j);
    let (lo, hi) = if hit_i <= hit_r {
        (hit_i, hit_r)
    } else {
        (hit_r, hit_i)
    };
    let mut info = [0u8; 32];
    info[..16].copy_from_slice(&lo.0);
    info[16..].copy_from_slice(&hi.0);
    let mut out = vec![0u8; len];
    match rhash {
        Rhash::Sha256 => Hkdf::<Sha256>::new(Some(&salt), kij)
            .expand(&info, &mut out)
            .map_err(|_| CryptoError::Keymat)?,
        Rhash::Sha384 => Hkdf::<Sha384>::new(Some(&salt), kij)
            .expand(&info, &mut out)
            .map_err(|_| CryptoError::Keymat)?,
    }
    Ok(out)
}

/// Draws keys sequentially from KEYMAT.
#[derive(Debug)]
pub struct Drawer<'a> {
    keymat: &'a [u8],
    at: usize,
}

impl<'a> Drawer<'a> {
    pub fn new(keymat: &'a [u8]) -> Self {
        Drawer { keymat, at: 0 }
    }

    pub fn draw(&mut self, n: usize) -> Result<Vec<u8>, CryptoError> {
        let end = self.at.checked_add(n).ok_or(CryptoError::Keymat)?;
        let k = self.keymat.get(self.at..end).ok_or(CryptoError::Keymat)?;
        self.at = end;
        Ok(k.to_vec())
    }

    /// Index of the next undrawn byte (the ESP_INFO KEYMAT index).
    pub fn index(&self) -> usize {
        self.at
    }
}

/// The four HIP association keys, already oriented for this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HipKeys {
    pub our_enc: Vec<u8>,
    pub our_mac: Vec<u8>,
    pub peer_enc: Vec<u8>,
    pub peer_mac: Vec<u8>,
}

impl HipKeys {
    /// Draws the HIP keys; `we_are_greater` says whether our HIT is HOST_g.
    pub fn draw(
        d: &mut Drawer<'_>,
        enc_len: usize,
        mac_len: usize,
        we_are_greater: bool,
    ) -> Result<Self, CryptoError> {
        let gl_enc = d.draw(enc_len)?;
        let gl_mac = d.draw(mac_len)?;
        let lg_enc = d.draw(enc_len)?;
        let lg_mac = d.draw(mac_len)?;
        Ok(if we_are_greater {
            HipKeys {
                our_enc: gl_enc,
                our_mac: gl_mac,
                peer_enc: lg_enc,
                peer_mac: lg_mac,
            }
        } else {
            HipKeys {
                our_enc: lg_enc,
                our_mac: lg_mac,
                peer_enc: gl_enc,
                peer_mac: gl_mac,
            }
        })
    }
}
