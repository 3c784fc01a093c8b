//! The disk digest that proves, at switchover, that the destination's disk equals the
//! source's — at a cost of well under a millisecond, not a re-read of the disk.
//!
//! Both sides keep one BLAKE3 hash per chunk:
//! * the source records the hash of the bytes it *read and sent* for a chunk (and the
//!   zero hash for chunks it never sent because they were holes or all zeroes);
//! * the destination records the hash of the bytes it *decoded and wrote*.
//!
//! At pause-before-switchover the guest is stopped and QEMU has drained and flushed its
//! writes to the source's NBD server, so the source's dirty set is final; the source sends
//! every chunk still dirty (updating its hashes) and then the digest: BLAKE3 over the
//! concatenated per-chunk hashes. Equal digests mean every chunk the destination holds is
//! the last version the source sent, and the dirty tracker guarantees that a chunk written
//! after it was sent was sent again. (Hashing a 2 GiB disk's 32 768 chunk hashes is 1 MiB
//! of BLAKE3: about half a millisecond.)

use serde::{Deserialize, Serialize};

pub type Digest = [u8; 32];

/// Hash of an all-zero chunk of `len` bytes.
pub fn zero_hash(len: usize) -> Digest {
    *blake3::hash(&vec![0u8; len]).as_bytes()
}

/// Per-chunk hashes of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHashes {
    chunk_size: u32,
    disk_bytes: u64,
    hashes: Vec<Digest>,
}

impl ChunkHashes {
    /// All chunks start as zero chunks (a new sparse file, or chunks a source never sent).
    pub fn new_zero(disk_bytes: u64, chunk_size: u32) -> Self {
        let n = chunk_count(disk_bytes, chunk_size);
        let mut hashes = vec![zero_hash(chunk_size as usize); n as usize];
        // The last chunk may be short; its zero hash differs.
        let tail = disk_bytes % chunk_size as u64;
        if tail != 0 {
            if let Some(last) = hashes.last_mut() {
                *last = zero_hash(tail as usize);
            }
        }
        ChunkHashes {
            chunk_size,
            disk_bytes,
            hashes,
        }
    }

    /// The hashes of a raw disk file of `disk_bytes` (read in full; bytes past the
    /// file's end count as zeroes, as in a sparse file that was never extended).
    pub fn of_file(
        path: &std::path::Path,
        disk_bytes: u64,
        chunk_size: u32,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path)?;
        let mut h = ChunkHashes::new_zero(disk_bytes, chunk_size);
        let mut buf = vec![0u8; chunk_size as usize];
        for i in 0..h.len() {
            let Some((off, len)) = h.range(i) else { break };
            let b = &mut buf[..len];
            let mut done = 0;
            while done < len {
                let n = f.read_at(&mut b[done..], off + done as u64)?;
                if n == 0 {
                    b[done..].fill(0);
                    break;
                }
                done += n;
            }
            h.hashes[i as usize] = *blake3::hash(b).as_bytes();
        }
        Ok(h)
    }

    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Byte range of chunk `index` on the disk.
    pub fn range(&self, index: u64) -> Option<(u64, usize)> {
        if index >= self.len() {
            return None;
        }
        let off = index * self.chunk_size as u64;
        let len = (self.disk_bytes - off).min(self.chunk_size as u64) as usize;
        Some((off, len))
    }

    /// Record chunk `index`'s hash. Out-of-range indexes are refused, not ignored.
    pub fn set(&mut self, index: u64, hash: Digest) -> bool {
        match self.hashes.get_mut(index as usize) {
            Some(h) => {
                *h = hash;
                true
            }
            None => false,
        }
    }

    pub fn get(&self, index: u64) -> Option<&Digest> {
        self.hashes.get(index as usize)
    }

    /// The digest of the whole disk (BLAKE3 over the per-chunk hashes, prefixed by the
    /// geometry so two disks of different shapes never compare equal).
    pub fn root(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(&self.disk_bytes.to_be_bytes());
        h.update(&self.chunk_size.to_be_bytes());
        for c in &self.hashes {
            h.update(c);
        }
        *h.finalize().as_bytes()
    }
}

pub fn chunk_count(disk_bytes: u64, chunk_size: u32) -> u64 {
    disk_bytes.div_ceil(chunk_size as u64)
}

pub fn to_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn of_file_hashes_each_chunk_and_reads_past_the_end_as_zeroes() {
        let dir = std::env::temp_dir().join(format!("roam-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        // 2.5 chunks of data on a 4.25-chunk disk.
        let data: Vec<u8> = (0..4096 * 5 / 2).map(|i| (i % 253) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let h = ChunkHashes::of_file(&path, 4096 * 4 + 1024, 4096).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(h.get(0), Some(blake3::hash(&data[..4096]).as_bytes()));
        let mut third = data[8192..].to_vec();
        third.resize(4096, 0);
        assert_eq!(h.get(2), Some(blake3::hash(&third).as_bytes()));
        let zero = ChunkHashes::new_zero(4096 * 4 + 1024, 4096);
        assert_eq!(h.get(3), zero.get(3));
        assert_eq!(h.get(4), zero.get(4));
        assert_ne!(h.root(), zero.root());
    }

    #[test]
    fn geometry_and_tail() {
        let h = ChunkHashes::new_zero(10 * 65536 + 100, 65536);
        assert_eq!(h.len(), 11);
        assert_eq!(h.range(10), Some((655360, 100)));
        assert_eq!(h.range(11), None);
        assert_eq!(h.get(10), Some(&zero_hash(100)));
    }

    proptest! {
        #[test]
        fn digests_equal_iff_same_updates(
            updates in proptest::collection::vec((0u64..64, any::<u8>()), 0..50),
            flip in 0usize..50,
        ) {
            let mut a = ChunkHashes::new_zero(64 * 4096, 4096);
            let mut b = ChunkHashes::new_zero(64 * 4096, 4096);
            for (i, v) in &updates {
                let d = *blake3::hash(&[*v]).as_bytes();
                a.set(*i, d);
                b.set(*i, d);
            }
            prop_assert_eq!(a.root(), b.root());
            if let Some((i, v)) = updates.get(flip) {
                // A hash no single-byte update can produce, so it differs from whatever
                // chunk i ended up holding.
                b.set(*i, *blake3::hash(&[*v, 0xAA, 0x55]).as_bytes());
                prop_assert_ne!(a.root(), b.root());
            }
        }
    }
}
