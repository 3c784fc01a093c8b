//! Carrying an endpoint's associations to another host (a VM's identity
//! moving with the VM): every association as `Host::export_association`
//! makes it, plus the ESP sequence state the blob does not hold.
//!
//! ```text
//!  "RHIPEP" | version u16 | count u16 | count × ( out_seq u32 | in_top u32 |
//!  in_bitmap u64 | peer LSI u32 | blob_len u32 | RHIPAS blob )
//!  | SHA-256(all before)[..16]
//! ```
//! The peer's LSI travels too: a guest's connections are addressed to it,
//! so the destination must keep the same name for the same peer.
//! Bounded before decoding (at most [`MAX_ENTRIES`] blobs of
//! `roam_hip::machine` size). It holds keys: send it only inside the
//! authenticated, encrypted host-to-host channel.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::backend::SaState;

const MAGIC: &[u8; 6] = b"RHIPEP";
pub const VERSION: u16 = 1;
/// Most associations one state may carry.
pub const MAX_ENTRIES: usize = 256;
/// Largest association blob accepted (`roam_hip`'s own cap).
pub const MAX_BLOB: usize = 8192;
const SUM: usize = 16;
/// Fixed part of an entry.
const ENTRY: usize = 24;

/// One carried association.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    pub sa: SaState,
    /// Our name for the peer.
    pub lsi: Ipv4Addr,
    /// `Host::export_association` output.
    pub blob: Vec<u8>,
}

/// The state container could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("not an endpoint state (magic)")]
    Magic,
    #[error("unsupported endpoint state version {0}")]
    Version(u16),
    #[error("endpoint state is truncated or too large")]
    Length,
    #[error("endpoint state checksum mismatch")]
    Checksum,
}

pub fn encode(entries: &[Carried]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&VERSION.to_be_bytes());
    v.extend_from_slice(&(entries.len().min(MAX_ENTRIES) as u16).to_be_bytes());
    for e in entries.iter().take(MAX_ENTRIES) {
        v.extend_from_slice(&e.sa.out_seq.to_be_bytes());
        v.extend_from_slice(&e.sa.in_top.to_be_bytes());
        v.extend_from_slice(&e.sa.in_bitmap.to_be_bytes());
        v.extend_from_slice(&e.lsi.octets());
        v.extend_from_slice(&(e.blob.len() as u32).to_be_bytes());
        v.extend_from_slice(&e.blob);
    }
    let sum = Sha256::digest(&v);
    v.extend_from_slice(&sum[..SUM]);
    v
}

pub fn decode(b: &[u8]) -> Result<Vec<Carried>, HandoverError> {
    let max = 10 + MAX_ENTRIES * (ENTRY + MAX_BLOB) + SUM;
    if b.len() > max || b.len() < 10 + SUM {
        return Err(HandoverError::Length);
    }
    if &b[..6] != MAGIC {
        return Err(HandoverError::Magic);
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    if version != VERSION {
        return Err(HandoverError::Version(version));
    }
    let (body, sum) = b.split_at(b.len() - SUM);
    if Sha256::digest(body)[..SUM] != *sum {
        return Err(HandoverError::Checksum);
    }
    let count = usize::from(u16::from_be_bytes([b[8], b[9]]));
    if count > MAX_ENTRIES {
        return Err(HandoverError::Length);
    }
    let mut rest = &body[10..];
    let mut take = |n: usize| -> Result<&[u8], HandoverError> {
        if rest.len() < n {
            return Err(HandoverError::Length);
        }
        let (a, r) = rest.split_at(n);
        rest = r;
        Ok(a)
    };
    let u32_at = |s: &[u8], i: usize| u32::from_be_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let h = take(ENTRY)?;
        let mut bm = [0u8; 8];
        bm.copy_from_slice(&h[8..16]);
        let lsi = Ipv4Addr::from(u32_at(h, 16));
        let len = u32_at(h, 20) as usize;
        if len > MAX_BLOB {
            return Err(HandoverError::Length);
        }
        let blob = take(len)?.to_vec();
        out.push(Carried {
            sa: SaState {
                out_seq: u32_at(h, 0),
                in_top: u32_at(h, 4),
                in_bitmap: u64::from_be_bytes(bm),
            },
            lsi,
            blob,
        });
    }
    if !rest.is_empty() {
        return Err(HandoverError::Length);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let e = vec![
            Carried {
                sa: SaState {
                    out_seq: 7,
                    in_top: 9,
                    in_bitmap: 0b1011,
                },
                lsi: Ipv4Addr::new(198, 19, 1, 2),
                blob: vec![1, 2, 3],
            },
            Carried {
                sa: SaState::default(),
                lsi: Ipv4Addr::new(198, 19, 3, 4),
                blob: Vec::new(),
            },
        ];
        let b = encode(&e);
        assert_eq!(decode(&b).unwrap(), e);
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert_eq!(decode(&bad), Err(HandoverError::Checksum));
        let mut v2 = b.clone();
        v2[7] = 2;
        assert_eq!(decode(&v2), Err(HandoverError::Version(2)));
        assert_eq!(decode(&b[..20]), Err(HandoverError::Length));
        assert_eq!(decode(&[0u8; 30]), Err(HandoverError::Magic));
        for n in 0..b.len() {
            let _ = decode(&b[..n]);
        }
    }
}
