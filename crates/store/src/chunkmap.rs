//! [`ChunkMap`]: what every chunk of one disk holds, by content hash.
//!
//! A map is the disk's table of contents: chunk `i` covers bytes
//! `i*chunk_size .. min((i+1)*chunk_size, disk_bytes)` and is one of
//!
//! * `Zero` — all zero bytes (a hole or written zeroes); never stored in the dedup index,
//!   never sent;
//! * `Data(h)` — BLAKE3 of the chunk's bytes is `h`;
//! * `Unknown` — not hashed yet, or in doubt (after an unclean restart): it differs from
//!   everything, so it is always re-sent or re-hashed, never trusted.
//!
//! Comparing two maps ([`ChunkMap::diff`]) tells which chunks of a replica are stale without
//! reading the disk; the transfer plan (`crate::plan`) then decides how each stale chunk gets
//! to the destination.
//!
//! Stored form (inside the [`crate::envelope`]): `disk_bytes u64, chunk_size u32, count u64`
//! then one tag byte per chunk (0 zero, 1 data, 2 unknown), followed by 32 hash bytes for
//! data chunks only — a mostly empty 8 GiB disk is a few hundred KiB, a full one 4.3 MiB.

use crate::envelope::{self, Kind};
use crate::error::{Result, StoreError};
use std::path::Path;

pub type Digest = [u8; 32];

/// Largest disk a map describes: 2^26 chunks (4 TiB at 64 KiB).
pub const MAX_CHUNKS: u64 = 1 << 26;

const KIND: Kind = Kind {
    what: "chunk map",
    magic: 0x524F_434D, // "ROCM"
    version: 1,
    min_version: 1,
    cap: 20 + MAX_CHUNKS * 33,
};

/// What one chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkState {
    Zero,
    Data(Digest),
    Unknown,
}

impl ChunkState {
    /// The state of a chunk with these bytes.
    pub fn of(bytes: &[u8]) -> ChunkState {
        if is_zero(bytes) {
            ChunkState::Zero
        } else {
            ChunkState::Data(*blake3::hash(bytes).as_bytes())
        }
    }

    /// Whether two states certainly describe the same bytes. `Unknown` equals nothing,
    /// not even itself.
    pub fn same_as(&self, other: &ChunkState) -> bool {
        match (self, other) {
            (ChunkState::Zero, ChunkState::Zero) => true,
            (ChunkState::Data(a), ChunkState::Data(b)) => a == b,
            _ => false,
        }
    }
}

/// Per-chunk content of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    disk_bytes: u64,
    chunk_size: u32,
    states: Vec<ChunkState>,
}

impl ChunkMap {
    /// A map with every chunk in `initial` state.
    pub fn new(disk_bytes: u64, chunk_size: u32, initial: ChunkState) -> Result<ChunkMap> {
        let count = check_geometry(disk_bytes, chunk_size)?;
        Ok(ChunkMap {
            disk_bytes,
            chunk_size,
            states: vec![initial; count as usize],
        })
    }

    /// Hash every chunk of a disk image (a file or anything readable at offsets).
    pub fn scan(file: &std::fs::File, disk_bytes: u64, chunk_size: u32) -> Result<ChunkMap> {
        let mut map = ChunkMap::new(disk_bytes, chunk_size, ChunkState::Unknown)?;
        let mut buf = vec![0u8; chunk_size as usize];
        for i in 0..map.len() {
            let (off, len) = map.range(i)?;
            let data = &mut buf[..len];
            crate::io::read_full_at(file, data, off)
                .map_err(|e| StoreError::io("read chunk", format!("chunk {i}"), e))?;
            map.states[i as usize] = ChunkState::of(data);
        }
        Ok(map)
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// `(offset, len)` of chunk `i`; the last chunk may be short.
    pub fn range(&self, i: u64) -> Result<(u64, usize)> {
        if i >= self.len() {
            return Err(StoreError::ChunkOutOfRange {
                chunk: i,
                chunks: self.len(),
            });
        }
        let off = i * self.chunk_size as u64;
        Ok((
            off,
            (self.disk_bytes - off).min(self.chunk_size as u64) as usize,
        ))
    }

    pub fn get(&self, i: u64) -> Option<ChunkState> {
        self.states.get(i as usize).copied()
    }

    pub fn set(&mut self, i: u64, state: ChunkState) -> Result<()> {
        let chunks = self.len();
        match self.states.get_mut(i as usize) {
            Some(s) => {
                *s = state;
                Ok(())
            }
            None => Err(StoreError::ChunkOutOfRange { chunk: i, chunks }),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, ChunkState)> + '_ {
        self.states.iter().enumerate().map(|(i, s)| (i as u64, *s))
    }

    /// Chunks whose content differs between `self` and `other` (ascending). `Unknown` on
    /// either side counts as different. Maps of different geometry cannot be compared.
    pub fn diff(&self, other: &ChunkMap) -> Result<Vec<u64>> {
        self.same_geometry(other)?;
        Ok(self
            .states
            .iter()
            .zip(&other.states)
            .enumerate()
            .filter(|(_, (a, b))| !a.same_as(b))
            .map(|(i, _)| i as u64)
            .collect())
    }

    pub fn same_geometry(&self, other: &ChunkMap) -> Result<()> {
        if self.disk_bytes != other.disk_bytes || self.chunk_size != other.chunk_size {
            return Err(StoreError::Geometry {
                detail: format!(
                    "{} bytes / {} per chunk vs {} bytes / {} per chunk",
                    self.disk_bytes, self.chunk_size, other.disk_bytes, other.chunk_size
                ),
            });
        }
        Ok(())
    }

    /// Digest of the whole map (geometry included): equal roots mean equal disks. `None`
    /// while any chunk is `Unknown`: a map in doubt proves nothing.
    pub fn root(&self) -> Option<Digest> {
        let mut h = blake3::Hasher::new();
        h.update(&self.disk_bytes.to_be_bytes());
        h.update(&self.chunk_size.to_be_bytes());
        for s in &self.states {
            match s {
                ChunkState::Zero => h.update(&[0]),
                ChunkState::Data(d) => h.update(&[1]).update(d),
                ChunkState::Unknown => return None,
            };
        }
        Some(*h.finalize().as_bytes())
    }

    pub fn encode(&self) -> Vec<u8> {
        let data = self
            .states
            .iter()
            .filter(|s| matches!(s, ChunkState::Data(_)))
            .count();
        let mut out = Vec::with_capacity(20 + self.states.len() + 32 * data);
        out.extend_from_slice(&self.disk_bytes.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.len().to_be_bytes());
        for s in &self.states {
            match s {
                ChunkState::Zero => out.push(0),
                ChunkState::Data(d) => {
                    out.push(1);
                    out.extend_from_slice(d);
                }
                ChunkState::Unknown => out.push(2),
            }
        }
        envelope::seal(&KIND, &out)
    }

    /// Decode a stored map; every length is checked before it is used.
    pub fn decode(bytes: &[u8]) -> Result<ChunkMap> {
        let (_, p) = envelope::open(&KIND, bytes)?;
        Self::decode_payload(p)
    }

    fn decode_payload(p: &[u8]) -> Result<ChunkMap> {
        let bad = |detail: String| StoreError::Malformed {
            what: KIND.what,
            detail,
        };
        if p.len() < 20 {
            return Err(bad("short geometry".into()));
        }
        let disk_bytes = u64::from_be_bytes(p[0..8].try_into().map_err(|_| bad("len".into()))?);
        let chunk_size =
            u32::from_be_bytes(p[8..12].try_into().map_err(|_| bad("chunk size".into()))?);
        let count = u64::from_be_bytes(p[12..20].try_into().map_err(|_| bad("count".into()))?);
        let expect = check_geometry(disk_bytes, chunk_size)?;
        if count != expect {
            return Err(bad(format!("{count} chunks for a geometry of {expect}")));
        }
        // Each chunk takes at least one byte: refuse a count the payload cannot hold
        // before reserving memory for it.
        let mut rest = &p[20..];
        if (rest.len() as u64) < count {
            return Err(bad(format!("{count} chunks in {} bytes", rest.len())));
        }
        let mut states = Vec::with_capacity(count as usize);
        for i in 0..count {
            let (&tag, tail) = rest
                .split_first()
                .ok_or_else(|| bad(format!("chunk {i} missing")))?;
            rest = tail;
            states.push(match tag {
                0 => ChunkState::Zero,
                2 => ChunkState::Unknown,
                1 => {
                    if rest.len() < 32 {
                        return Err(bad(format!("chunk {i} hash truncated")));
                    }
                    let mut d = [0u8; 32];
                    d.copy_from_slice(&rest[..32]);
                    rest = &rest[32..];
                    ChunkState::Data(d)
                }
                t => return Err(bad(format!("chunk {i} has tag {t}"))),
            });
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        Ok(ChunkMap {
            disk_bytes,
            chunk_size,
            states,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        envelope::write_atomic(path, &self.encode())
    }

    pub fn load(path: &Path) -> Result<ChunkMap> {
        let (_, p) = envelope::read_file(&KIND, path)?;
        Self::decode_payload(&p)
    }
}

/// Chunk count for a geometry, or why it is refused.
pub fn check_geometry(disk_bytes: u64, chunk_size: u32) -> Result<u64> {
    if !chunk_size.is_power_of_two() || !(512..=4 << 20).contains(&chunk_size) {
        return Err(StoreError::Geometry {
            detail: format!("chunk size {chunk_size} is not a power of two in 512..=4 MiB"),
        });
    }
    let count = disk_bytes.div_ceil(chunk_size as u64);
    if count > MAX_CHUNKS {
        return Err(StoreError::Geometry {
            detail: format!("{disk_bytes} bytes is more than {MAX_CHUNKS} chunks"),
        });
    }
    Ok(count)
}

/// Whether every byte is zero: the migration's own test, so both paths agree on what
/// a zero chunk is.
pub use roam_migrate::frame::is_zero;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_state() -> impl Strategy<Value = ChunkState> {
        prop_oneof![
            Just(ChunkState::Zero),
            Just(ChunkState::Unknown),
            (0u8..6).prop_map(|v| ChunkState::Data(*blake3::hash(&[v]).as_bytes())),
        ]
    }

    fn arb_map() -> impl Strategy<Value = ChunkMap> {
        (1u64..300, 0u64..512).prop_flat_map(|(n, tail)| {
            let bytes = (n - 1) * 512 + tail.max(1);
            proptest::collection::vec(arb_state(), n as usize).prop_map(move |states| ChunkMap {
                disk_bytes: bytes,
                chunk_size: 512,
                states,
            })
        })
    }

    #[test]
    fn geometry() {
        let m = ChunkMap::new(10 * 65536 + 100, 65536, ChunkState::Zero).unwrap();
        assert_eq!(m.len(), 11);
        assert_eq!(m.range(10).unwrap(), (655360, 100));
        assert!(m.range(11).is_err());
        assert!(ChunkMap::new(1, 1000, ChunkState::Zero).is_err());
        assert!(ChunkMap::new(u64::MAX, 512, ChunkState::Zero).is_err());
    }

    #[test]
    fn scan_hashes_a_real_file() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let mut data = vec![0u8; 4096 * 3 + 10];
        data[4096..8192].fill(7);
        data[8192 + 4096..].fill(1);
        f.write_all(&data).unwrap();
        let m = ChunkMap::scan(&f, data.len() as u64, 4096).unwrap();
        assert_eq!(m.get(0), Some(ChunkState::Zero));
        assert_eq!(m.get(1), Some(ChunkState::of(&[7u8; 4096])));
        assert_eq!(m.get(2), Some(ChunkState::Zero));
        assert_eq!(m.get(3), Some(ChunkState::of(&[1u8; 10])));
    }

    #[test]
    fn count_larger_than_payload_refused_without_allocating() {
        let mut p = Vec::new();
        p.extend_from_slice(&(MAX_CHUNKS * 512).to_be_bytes());
        p.extend_from_slice(&512u32.to_be_bytes());
        p.extend_from_slice(&MAX_CHUNKS.to_be_bytes());
        let bytes = envelope::seal(&KIND, &p);
        assert!(matches!(
            ChunkMap::decode(&bytes),
            Err(StoreError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(m in arb_map()) {
            let back = ChunkMap::decode(&m.encode()).unwrap();
            prop_assert_eq!(&back, &m);
        }

        #[test]
        fn save_load_round_trip(m in arb_map()) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("map");
            m.save(&p).unwrap();
            prop_assert_eq!(ChunkMap::load(&p).unwrap(), m);
        }

        #[test]
        fn decode_of_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ChunkMap::decode(&bytes);
            // Also garbage inside a valid envelope, so the payload parser is exercised.
            let _ = ChunkMap::decode(&envelope::seal(&KIND, &bytes));
        }

        #[test]
        fn diff_is_exactly_the_chunks_that_are_not_certainly_equal(a in arb_map(), seed in any::<u64>()) {
            // b: a copy of a with some chunks changed.
            let mut b = a.clone();
            let mut x = seed;
            for i in 0..b.len() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if x >> 61 == 0 {
                    b.states[i as usize] = ChunkState::Data(*blake3::hash(&x.to_be_bytes()).as_bytes());
                }
            }
            let d = a.diff(&b).unwrap();
            prop_assert_eq!(&d, &b.diff(&a).unwrap(), "diff is symmetric");
            for i in 0..a.len() {
                let differs = !a.get(i).unwrap().same_as(&b.get(i).unwrap());
                prop_assert_eq!(d.binary_search(&i).is_ok(), differs);
            }
            // Applying the differing chunks of b onto a yields b (modulo Unknown).
            let mut c = a.clone();
            for &i in &d { c.set(i, b.get(i).unwrap()).unwrap(); }
            prop_assert_eq!(c, b.clone());
            // Equal roots exactly when nothing differs.
            match (a.root(), b.root()) {
                (Some(x), Some(y)) => prop_assert_eq!(x == y, d.is_empty()),
                _ => prop_assert!(a.iter().chain(b.iter()).any(|(_, s)| s == ChunkState::Unknown)),
            }
        }

        #[test]
        fn geometry_mismatch_is_an_error(a in arb_map()) {
            let mut b = a.clone();
            b.disk_bytes += 512;
            b.states.push(ChunkState::Zero);
            prop_assert!(a.diff(&b).is_err());
        }
    }
}
