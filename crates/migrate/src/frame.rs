//! Disk frames: the binary format of the `Disk` stream.
//!
//! JSON would double the bytes of a disk copy, so chunks travel in a fixed little header
//! followed by the payload:
//!
//! ```text
//!  0      4    5    6       8              16        20         24          56
//!  | magic | ver| kind| rsvd |  chunk index  | raw len | body len |  blake3  | body…
//! ```
//!
//! * `Data`: body is the chunk compressed with zstd; `Raw`: body is the chunk as is (used
//!   when compression does not pay); `Zero`: no body, the chunk is all zeroes (the
//!   destination punches a hole) — zero chunks are never sent in the first pass at all.
//! * `Seal`: no body; `index` carries the number of chunk frames sent so far and `hash`
//!   the source's disk digest; the destination answers on the control stream.
//! * `Sync`: no body; `index` carries the number of chunk frames sent so far. The
//!   destination answers on the same stream, once it has written them all, with that
//!   count as 8 big-endian bytes. The source uses it to know what really arrived (QUIC
//!   accepts writes long before the peer has them), which is what makes its rate
//!   measurement and its round decisions honest.
//! * `Hash` (source → destination): no body; chunk `index` holds content `hash`. Sent for
//!   every allocated chunk when the destination already holds an older copy of the disk
//!   (a return move): it compares with what it has and asks only for what differs.
//! * `Query` (source → destination): no body; `index` = number of `Hash` frames sent.
//!   The destination answers with one `Want` frame per chunk it lacks, then `WantEnd`
//!   (`index` = number of wants). `hash[0]` = 1 (`QUERY_UNOFFERED_HELD`): the source
//!   offered only the chunks written since the replica batch the destination named in
//!   `Accept`; every other chunk of the base is held as it is (the destination keeps it
//!   and hashes it for the seal) instead of being cleared. 0: unoffered chunks are zero.
//!
//! Frames going back (destination → source, on the same stream) use the same header:
//! `Sync` (acknowledgement, `index` = chunk frames written), `Want`, `WantEnd`.
//!
//! Post-copy (the guest resumes at the destination before the disk is complete):
//!
//! * `Pending` (source → destination): body = runs of chunks, 16 bytes each (first chunk,
//!   count, both big-endian u64), `index` = number of runs: chunks whose content the
//!   destination does not hold yet. Sent at the switchover, while the guest is paused.
//! * `Switch` (source → destination): no body; `index` = chunk frames sent so far. The
//!   pending list is complete: every other chunk the destination holds is final. The
//!   guest may run there from now on; chunks keep coming, then a `Seal`.
//! * On the separate `DiskDemand` stream the destination sends one `Want` per chunk a
//!   guest request is waiting for, and the source answers with that chunk's
//!   `Data`/`Raw`/`Zero` frame, ahead of the background copy.
//!
//! Lengths are checked against `MAX_CHUNK` before anything is allocated, and the hash of
//! every decoded chunk is checked by the receiver against the bytes it will write.

use thiserror::Error;

pub const MAGIC: u32 = 0x524F_444B; // "RODK"
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 56;
/// `Query`'s `hash[0]` when the chunks the source did not offer are held as they are
/// at the destination (see the module doc).
pub const QUERY_UNOFFERED_HELD: u8 = 1;
/// Largest chunk (uncompressed) a frame may describe.
pub const MAX_CHUNK: u32 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Data = 1,
    Raw = 2,
    Zero = 3,
    Seal = 4,
    Sync = 5,
    Hash = 6,
    Query = 7,
    Want = 8,
    WantEnd = 9,
    Pending = 10,
    Switch = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Data,
            2 => Kind::Raw,
            3 => Kind::Zero,
            4 => Kind::Seal,
            5 => Kind::Sync,
            6 => Kind::Hash,
            7 => Kind::Query,
            8 => Kind::Want,
            9 => Kind::WantEnd,
            10 => Kind::Pending,
            11 => Kind::Switch,
            _ => return None,
        })
    }
}

/// A decoded frame header; the body (if any) follows on the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFrame {
    pub kind: Kind,
    pub index: u64,
    /// Uncompressed chunk length (0 for `Seal`).
    pub raw_len: u32,
    /// Bytes of body that follow the header.
    pub body_len: u32,
    pub hash: [u8; 32],
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("disk frame: bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("disk frame: unsupported version {0}")]
    BadVersion(u8),
    #[error("disk frame: unknown kind {0}")]
    BadKind(u8),
    #[error("disk frame: chunk length {0} exceeds the {MAX_CHUNK}-byte cap")]
    TooLong(u32),
    #[error("disk frame: body length {body} inconsistent with kind {kind:?} and raw length {raw}")]
    Inconsistent { kind: Kind, raw: u32, body: u32 },
    #[error("disk frame: chunk {index} content does not match its hash")]
    HashMismatch { index: u64 },
    #[error("disk frame: pending runs malformed or beyond the disk")]
    BadPending,
    #[error("disk frame: chunk {index} does not decompress: {detail}")]
    Decompress { index: u64, detail: String },
}

impl DiskFrame {
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4] = VERSION;
        h[5] = self.kind as u8;
        h[8..16].copy_from_slice(&self.index.to_be_bytes());
        h[16..20].copy_from_slice(&self.raw_len.to_be_bytes());
        h[20..24].copy_from_slice(&self.body_len.to_be_bytes());
        h[24..56].copy_from_slice(&self.hash);
        h
    }

    /// Decode and validate a header. Never allocates.
    pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<DiskFrame, FrameError> {
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(FrameError::BadVersion(h[4]));
        }
        let kind = Kind::from_u8(h[5]).ok_or(FrameError::BadKind(h[5]))?;
        let mut idx = [0u8; 8];
        idx.copy_from_slice(&h[8..16]);
        let raw_len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let body_len = u32::from_be_bytes([h[20], h[21], h[22], h[23]]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&h[24..56]);
        if raw_len > MAX_CHUNK {
            return Err(FrameError::TooLong(raw_len));
        }
        let consistent = match kind {
            Kind::Data => body_len > 0 && body_len <= zstd_bound(raw_len),
            Kind::Raw => body_len == raw_len,
            Kind::Zero => body_len == 0,
            Kind::Hash => body_len == 0,
            Kind::Seal | Kind::Sync | Kind::Query | Kind::Want | Kind::WantEnd | Kind::Switch => {
                body_len == 0 && raw_len == 0
            }
            Kind::Pending => {
                raw_len == 0
                    && body_len > 0
                    && body_len <= MAX_CHUNK
                    && (body_len as usize).is_multiple_of(PENDING_RUN_LEN)
            }
        };
        if !consistent {
            return Err(FrameError::Inconsistent {
                kind,
                raw: raw_len,
                body: body_len,
            });
        }
        Ok(DiskFrame {
            kind,
            index: u64::from_be_bytes(idx),
            raw_len,
            body_len,
            hash,
        })
    }

    /// Build the frame (and its body) for one chunk of the source disk. All-zero chunks
    /// become a `Zero` frame; otherwise the chunk is compressed at `level` and sent raw if
    /// that does not save at least 1/16.
    pub fn for_chunk(index: u64, data: &[u8], level: i32) -> (DiskFrame, Vec<u8>, [u8; 32]) {
        let hash = *blake3::hash(data).as_bytes();
        let raw_len = data.len() as u32;
        if is_zero(data) {
            let f = DiskFrame {
                kind: Kind::Zero,
                index,
                raw_len,
                body_len: 0,
                hash,
            };
            return (f, Vec::new(), hash);
        }
        let compressed = zstd::bulk::compress(data, level).ok();
        match compressed {
            Some(c) if c.len() < data.len() - data.len() / 16 => {
                let f = DiskFrame {
                    kind: Kind::Data,
                    index,
                    raw_len,
                    body_len: c.len() as u32,
                    hash,
                };
                (f, c, hash)
            }
            _ => {
                let f = DiskFrame {
                    kind: Kind::Raw,
                    index,
                    raw_len,
                    body_len: raw_len,
                    hash,
                };
                (f, data.to_vec(), hash)
            }
        }
    }

    pub fn seal(frames_sent: u64, root: [u8; 32]) -> DiskFrame {
        DiskFrame {
            kind: Kind::Seal,
            index: frames_sent,
            raw_len: 0,
            body_len: 0,
            hash: root,
        }
    }

    pub fn sync(frames_sent: u64) -> DiskFrame {
        DiskFrame::control(Kind::Sync, frames_sent)
    }

    /// A frame without body or hash (`Sync`, `Query`, `Want`, `WantEnd`).
    pub fn control(kind: Kind, index: u64) -> DiskFrame {
        DiskFrame {
            kind,
            index,
            raw_len: 0,
            body_len: 0,
            hash: [0; 32],
        }
    }

    /// "Chunk `index` of `raw_len` bytes holds content `hash`."
    pub fn hash_of(index: u64, raw_len: u32, hash: [u8; 32]) -> DiskFrame {
        DiskFrame {
            kind: Kind::Hash,
            index,
            raw_len,
            body_len: 0,
            hash,
        }
    }

    /// Turn a received body into the chunk's bytes, checking the hash. `Zero` yields an
    /// empty vector (the caller punches a hole or writes zeroes of `raw_len`).
    pub fn decode_body(&self, body: &[u8]) -> Result<Vec<u8>, FrameError> {
        let data = match self.kind {
            Kind::Data => zstd::bulk::decompress(body, self.raw_len as usize).map_err(|e| {
                FrameError::Decompress {
                    index: self.index,
                    detail: e.to_string(),
                }
            })?,
            Kind::Raw => body.to_vec(),
            Kind::Pending | Kind::Switch => return Ok(body.to_vec()),
            Kind::Zero
            | Kind::Seal
            | Kind::Sync
            | Kind::Hash
            | Kind::Query
            | Kind::Want
            | Kind::WantEnd => return Ok(Vec::new()),
        };
        if data.len() != self.raw_len as usize || *blake3::hash(&data).as_bytes() != self.hash {
            return Err(FrameError::HashMismatch { index: self.index });
        }
        Ok(data)
    }
}

/// Bytes of one run in a `Pending` body.
pub const PENDING_RUN_LEN: usize = 16;

/// `Pending` frames (header, body) listing `chunks` (sorted ascending) as runs.
pub fn pending_frames(chunks: &[u64]) -> Vec<(DiskFrame, Vec<u8>)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == c => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    let per_frame = MAX_CHUNK as usize / PENDING_RUN_LEN;
    runs.chunks(per_frame)
        .map(|rs| {
            let mut body = Vec::with_capacity(rs.len() * PENDING_RUN_LEN);
            for (s, n) in rs {
                body.extend_from_slice(&s.to_be_bytes());
                body.extend_from_slice(&n.to_be_bytes());
            }
            let f = DiskFrame {
                kind: Kind::Pending,
                index: rs.len() as u64,
                raw_len: 0,
                body_len: body.len() as u32,
                hash: [0; 32],
            };
            (f, body)
        })
        .collect()
}

/// The runs of a `Pending` body, each checked to end within `chunks`.
pub fn decode_pending(body: &[u8], chunks: u64) -> Result<Vec<(u64, u64)>, FrameError> {
    if !body.len().is_multiple_of(PENDING_RUN_LEN) {
        return Err(FrameError::BadPending);
    }
    body.chunks_exact(PENDING_RUN_LEN)
        .map(|r| {
            let mut a = [0u8; 8];
            let mut b = [0u8; 8];
            a.copy_from_slice(&r[..8]);
            b.copy_from_slice(&r[8..]);
            let (s, n) = (u64::from_be_bytes(a), u64::from_be_bytes(b));
            match s.checked_add(n) {
                Some(e) if e <= chunks && n > 0 => Ok((s, n)),
                _ => Err(FrameError::BadPending),
            }
        })
        .collect()
}

/// Upper bound of zstd's output for `len` input bytes (ZSTD_COMPRESSBOUND).
fn zstd_bound(len: u32) -> u32 {
    let len = len as u64;
    let extra = if len < (128 << 10) {
        ((128u64 << 10) - len) >> 11
    } else {
        0
    };
    (len + (len >> 8) + extra).min(u32::MAX as u64) as u32
}

pub fn is_zero(data: &[u8]) -> bool {
    // Word at a time: this runs over every chunk of every disk copy.
    let mut words = data.chunks_exact(8);
    let body_zero = words
        .by_ref()
        .all(|c| <[u8; 8]>::try_from(c).is_ok_and(|w| u64::from_ne_bytes(w) == 0));
    body_zero && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pending_runs_round_trip_and_are_bounded() {
        let chunks = [0, 1, 2, 7, 9, 10];
        let frames = pending_frames(&chunks);
        assert_eq!(frames.len(), 1);
        let (f, body) = &frames[0];
        let back = DiskFrame::decode_header(&f.encode_header()).unwrap();
        assert_eq!(back.kind, Kind::Pending);
        assert_eq!(back.index, 3);
        let runs = decode_pending(body, 11).unwrap();
        assert_eq!(runs, vec![(0, 3), (7, 1), (9, 2)]);
        assert_eq!(decode_pending(body, 10), Err(FrameError::BadPending));
        assert_eq!(decode_pending(&body[..15], 11), Err(FrameError::BadPending));
    }

    #[test]
    fn zero_chunk_has_no_body() {
        let (f, body, _) = DiskFrame::for_chunk(7, &[0u8; 65536], 3);
        assert_eq!(f.kind, Kind::Zero);
        assert!(body.is_empty());
    }

    #[test]
    fn compressible_chunk_is_compressed_and_round_trips() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8 + b'a').collect();
        let (f, body, _) = DiskFrame::for_chunk(1, &data, 3);
        assert_eq!(f.kind, Kind::Data);
        assert!(body.len() < data.len() / 4);
        let h = DiskFrame::decode_header(&f.encode_header()).unwrap();
        assert_eq!(h.decode_body(&body).unwrap(), data);
    }

    #[test]
    fn tampered_body_is_refused() {
        let data = vec![5u8; 4096];
        let (f, mut body, _) = DiskFrame::for_chunk(1, &data, 3);
        let last = body.len() - 1;
        body[last] ^= 0xff;
        assert!(f.decode_body(&body).is_err());
    }

    #[test]
    fn oversized_length_refused_before_allocation() {
        let mut f = DiskFrame::seal(0, [0; 32]);
        f.kind = Kind::Raw;
        f.raw_len = MAX_CHUNK + 1;
        f.body_len = MAX_CHUNK + 1;
        assert_eq!(
            DiskFrame::decode_header(&f.encode_header()),
            Err(FrameError::TooLong(MAX_CHUNK + 1))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&bytes);
            let _ = DiskFrame::decode_header(&h);
        }

        #[test]
        fn chunks_round_trip(data in proptest::collection::vec(any::<u8>(), 1..8192), idx in any::<u64>()) {
            let (f, body, hash) = DiskFrame::for_chunk(idx, &data, 1);
            let h = DiskFrame::decode_header(&f.encode_header()).unwrap();
            prop_assert_eq!(h.index, idx);
            prop_assert_eq!(h.hash, hash);
            if h.kind == Kind::Zero {
                prop_assert!(is_zero(&data));
            } else {
                prop_assert_eq!(h.decode_body(&body).unwrap(), data);
            }
        }

        #[test]
        fn is_zero_matches_naive(data in proptest::collection::vec(0u8..3, 0..100)) {
            prop_assert_eq!(is_zero(&data), data.iter().all(|&b| b == 0));
        }
    }
}
