//! The puzzle (RFC 7401 §4.1.2, §6.3): find #J such that the #K lowest-order
//! bits of RHASH(#I | HIT-I | HIT-R | #J) are zero.

use rand_core::{OsRng, RngCore};

use crate::error::CryptoError;
use crate::identity::Rhash;
use crate::wire::Hit;

/// Largest #K we will solve or ask for: 2^28 hashes is seconds of work.
pub const MAX_K: u8 = 28;

fn low_bits_zero(h: &[u8], k: u8) -> bool {
    let mut k = usize::from(k);
    for b in h.iter().rev() {
        if k == 0 {
            return true;
        }
        if k >= 8 {
            if *b != 0 {
                return false;
            }
            k -= 8;
        } else {
            return b & ((1u8 << k) - 1) == 0;
        }
    }
    k == 0
}

/// True if `j` solves the puzzle.
pub fn verify(rhash: Rhash, i: &[u8], hit_i: &Hit, hit_r: &Hit, j: &[u8], k: u8) -> bool {
    if usize::from(k) > rhash.len() * 8 || j.len() != rhash.len() {
        return false;
    }
    low_bits_zero(&rhash.digest(&[i, &hit_i.0, &hit_r.0, j]), k)
}

/// Searches for #J from a random start, giving up after `max_tries`
/// attempts (the caller bounds this by the puzzle lifetime).
pub fn solve(
    rhash: Rhash,
    i: &[u8],
    hit_i: &Hit,
    hit_r: &Hit,
    k: u8,
    max_tries: u64,
) -> Result<Vec<u8>, CryptoError> {
    if k > MAX_K {
        return Err(CryptoError::PuzzleDifficulty(k));
    }
    let mut j = vec![0u8; rhash.len()];
    OsRng.fill_bytes(&mut j);
    for _ in 0..max_tries {
        if verify(rhash, i, hit_i, hit_r, &j, k) {
            return Ok(j);
        }
        // Increment #J as a big-endian counter.
        for b in j.iter_mut().rev() {
            *b = b.wrapping_add(1);
            if *b != 0 {
                break;
            }
        }
    }
    Err(CryptoError::Puzzle)
}
