//! [`PersistentDirtyMap`]: which chunks a replica still lacks, kept on disk so that
//! replication resumes after a link outage or a restart of either daemon without resending
//! what already arrived, in memory bounded by the disk size (1 bit per chunk, per bitmap).
//!
//! ```text
//!  writes ──mark──▶ dirty ──cut()──▶ in-flight batch #s ──ack(s)──▶ (gone: replica has it)
//!                     ▲                    │ link lost / restart
//!                     └────── resume(replica's applied seq): unacked batches re-queued
//! ```
//!
//! * `mark` only sets bits in memory (cheap enough for the write path or for a task that
//!   drains `DirtySubscription::take()`).
//! * `cut` turns the dirty set into batch `s` (a rising sequence number, persisted, never
//!   reused across restarts); the consumer sends it and the replica commits it atomically
//!   (`crate::replica`). `ack(s)` drops every batch `≤ s`. At most [`MAX_INFLIGHT`] batches
//!   are outstanding, so memory is `(2 + MAX_INFLIGHT)` bitmaps whatever the outage length:
//!   an outage only makes `dirty` denser, never longer.
//! * `persist` writes the whole state (sparse: only non-zero words) into a versioned,
//!   checksummed file replaced atomically (tmp, fsync, rename, fsync dir). Call it at each
//!   FLUSH epoch or periodically, and with `clean = true` from `close`.
//!
//! # Crashes and the activity log
//! Marks made after the last `persist` live only in memory. To bound what a crash can
//! lose, the file also carries *hot extents* (64 chunks = one bitmap word = 4 MiB): the
//! extents written since the previous persist. On an unclean open every hot extent is
//! marked dirty. `mark` returns `true` when the chunk's extent is not hot in the file; if
//! the write path persists before acknowledging such a write (rare after warm-up: a
//! working set stays in the same extents), then no acknowledged write can be missed after
//! a crash. Without that gate an unclean open is reported as such and the daemon must
//! fall back to a hash comparison ([`crate::ChunkMap::diff`]) for the whole disk.
//!
//! Wiring the gate (roamd) needs this order to be sound, with a lock-free view of the
//! persisted hot set shared with the NBD write path:
//!
//! ```text
//!  write path:  pwrite → tracker.mark → view.is_hot(extent)? ─yes─▶ ack
//!                                                └─no─▶ ask for extent, wait until hot, ack
//!  persist:     1 view.remove(extents about to cool)   2 take() → mark() (drain tracker)
//!               3 persist()                             4 view.add(extents now hot in file)
//! ```
//! A write that saw "hot" before step 1 marked the tracker before step 2 drained it, so its
//! bit is in the file; one that checks after step 1 waits for a file that lists its extent.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::chunkmap::check_geometry;
use crate::envelope::{self, Kind};
use crate::error::{Result, StoreError};

/// Batches cut and not yet acknowledged, at most.
pub const MAX_INFLIGHT: usize = 4;

const KIND: Kind = Kind {
    what: "dirty map",
    magic: 0x524F_444D, // "RODM"
    version: 1,
    min_version: 1,
    // Worst case: every word of (dirty + inflight + hot) non-zero, 16 bytes each.
    cap: 64 + (2 + MAX_INFLIGHT as u64) * (crate::chunkmap::MAX_CHUNKS / 64) * 16,
};

/// A plain bitmap, one bit per chunk (or per extent).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits {
    words: Vec<u64>,
}

impl Bits {
    fn new(bits: u64) -> Bits {
        Bits {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        match self.words.get_mut(w) {
            Some(x) => {
                let was = *x & (1 << b) != 0;
                *x |= 1 << b;
                !was
            }
            None => false,
        }
    }
    fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|x| x & (1 << (i % 64)) != 0)
    }
    fn or(&mut self, o: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&o.words) {
            *a |= b;
        }
    }
    fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }
    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut v = w;
            std::iter::from_fn(move || {
                if v == 0 {
                    return None;
                }
                let b = v.trailing_zeros();
                v &= v - 1;
                Some(i as u64 * 64 + u64::from(b))
            })
        })
    }
    fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
    fn encode(&self, out: &mut Vec<u8>) {
        let nz: Vec<(usize, u64)> = self
            .words
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, w)| *w != 0)
            .collect();
        out.extend_from_slice(&(nz.len() as u64).to_be_bytes());
        for (i, w) in nz {
            out.extend_from_slice(&(i as u64).to_be_bytes());
            out.extend_from_slice(&w.to_be_bytes());
        }
    }
    fn decode(r: &mut Reader<'_>, bits: u64) -> Result<Bits> {
        let mut b = Bits::new(bits);
        let n = r.u64()?;
        if n > b.words.len() as u64 {
            return Err(r.bad(format!("{n} words for a {bits}-bit map")));
        }
        let mut prev = None;
        for _ in 0..n {
            let i = r.u64()?;
            let w = r.u64()?;
            if i >= b.words.len() as u64 || prev.is_some_and(|p| p >= i) {
                return Err(r.bad(format!("word index {i} out of order or range")));
            }
            // Bits past the last chunk would be phantom chunks.
            if i == b.words.len() as u64 - 1 && bits & 63 != 0 && w >> (bits & 63) != 0 {
                return Err(r.bad("bits set past the end".into()));
            }
            prev = Some(i);
            b.words[i as usize] = w;
        }
        Ok(b)
    }
}

struct Reader<'a> {
    p: &'a [u8],
}

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64> {
        if self.p.len() < 8 {
            return Err(self.bad("truncated".into()));
        }
        let (a, rest) = self.p.split_at(8);
        self.p = rest;
        let mut b = [0u8; 8];
        b.copy_from_slice(a);
        Ok(u64::from_be_bytes(b))
    }
    fn bad(&self, detail: String) -> StoreError {
        StoreError::Malformed {
            what: KIND.what,
            detail,
        }
    }
}

/// What `open` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Closed cleanly: the map is exact.
    Clean,
    /// Not closed: every hot extent was marked dirty (`hot_chunks` chunks). Exact if the
    /// write path persisted before acknowledging writes to cold extents (see module doc).
    Unclean { hot_chunks: u64 },
}

/// The persistent dirty map of one (disk, replica) pair.
#[derive(Debug)]
pub struct PersistentDirtyMap {
    path: PathBuf,
    chunk_size: u32,
    chunks: u64,
    dirty: Bits,
    inflight: VecDeque<(u64, Bits)>,
    next_seq: u64,
    acked_seq: u64,
    /// Extents marked since the last persist.
    hot_now: Bits,
    /// Extents the file on disk lists as hot.
    hot_saved: Bits,
}

impl PersistentDirtyMap {
    /// A new map (every chunk dirty when `all_dirty`: a replica that has nothing yet),
    /// persisted at once.
    pub fn create(path: &Path, disk_bytes: u64, chunk_size: u32, all_dirty: bool) -> Result<Self> {
        let chunks = check_geometry(disk_bytes, chunk_size)?;
        let mut m = PersistentDirtyMap {
            path: path.to_path_buf(),
            chunk_size,
            chunks,
            dirty: Bits::new(chunks),
            inflight: VecDeque::new(),
            next_seq: 1,
            acked_seq: 0,
            hot_now: Bits::new(chunks.div_ceil(64)),
            hot_saved: Bits::new(chunks.div_ceil(64)),
        };
        if all_dirty {
            m.mark_range(0, chunks);
        }
        m.persist()?;
        Ok(m)
    }

    /// Load a map (and mark the file open). A missing, corrupt or mismatched file is an error: the caller then
    /// starts over with `create(.., all_dirty = true)` or a hash comparison.
    pub fn open(path: &Path, disk_bytes: u64, chunk_size: u32) -> Result<(Self, Resume)> {
        let chunks = check_geometry(disk_bytes, chunk_size)?;
        let (_, p) = envelope::read_file(&KIND, path)?;
        let mut r = Reader { p: &p };
        let (cs, n, next_seq, acked_seq, clean) =
            (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        if cs != u64::from(chunk_size) || n != chunks {
            return Err(StoreError::Geometry {
                detail: format!(
                    "dirty map for {n} chunks of {cs}, disk has {chunks} of {chunk_size}"
                ),
            });
        }
        let hot = Bits::decode(&mut r, chunks.div_ceil(64))?;
        let mut dirty = Bits::decode(&mut r, chunks)?;
        let k = r.u64()?;
        if k > MAX_INFLIGHT as u64 {
            return Err(r.bad(format!("{k} in-flight batches")));
        }
        let mut inflight = VecDeque::new();
        for _ in 0..k {
            let seq = r.u64()?;
            let after = inflight.back().map_or(acked_seq, |(s, _)| *s);
            if seq <= after || seq >= next_seq {
                return Err(r.bad(format!(
                    "batch {seq} out of order or outside ({acked_seq}, {next_seq})"
                )));
            }
            inflight.push_back((seq, Bits::decode(&mut r, chunks)?));
        }
        if !r.p.is_empty() {
            return Err(r.bad("trailing bytes".into()));
        }
        let resume = if clean == 1 {
            Resume::Clean
        } else {
            let before = dirty.count();
            for e in hot.iter() {
                if let Some(w) = dirty.words.get_mut(e as usize) {
                    *w = u64::MAX;
                }
            }
            // The last word may cover chunks past the end.
            if chunks % 64 != 0 {
                if let Some(w) = dirty.words.last_mut() {
                    *w &= (1u64 << (chunks % 64)) - 1;
                }
            }
            Resume::Unclean {
                hot_chunks: dirty.count() - before,
            }
        };
        let mut m = PersistentDirtyMap {
            path: path.to_path_buf(),
            chunk_size,
            chunks,
            dirty,
            inflight,
            next_seq,
            acked_seq,
            hot_now: hot.clone(),
            hot_saved: hot,
        };
        // From now on the file must read as "not closed": a crash before the next persist
        // has to expand the hot extents, even if the previous run closed cleanly.
        m.write(false)?;
        Ok((m, resume))
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Mark a chunk dirty (in memory). Returns `true` if its extent is not hot in the
    /// persisted file: a write path that wants exactness after a crash persists before
    /// acknowledging that write.
    pub fn mark(&mut self, chunk: u64) -> bool {
        if chunk >= self.chunks {
            return false;
        }
        self.dirty.set(chunk);
        self.hot_now.set(chunk / 64);
        !self.hot_saved.get(chunk / 64)
    }

    /// Mark chunks `first..end`.
    pub fn mark_range(&mut self, first: u64, end: u64) -> bool {
        let mut cold = false;
        for c in first..end.min(self.chunks) {
            cold |= self.mark(c);
        }
        cold
    }

    /// Chunks dirty and not yet cut.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count()
    }

    /// Whether the replica may lack `chunk` (dirty or in an unacknowledged batch).
    pub fn is_pending(&self, chunk: u64) -> bool {
        self.dirty.get(chunk) || self.inflight.iter().any(|(_, b)| b.get(chunk))
    }

    /// All chunks the replica may lack, ascending.
    pub fn pending(&self) -> Vec<u64> {
        let mut all = self.dirty.clone();
        for (_, b) in &self.inflight {
            all.or(b);
        }
        all.iter().collect()
    }

    /// Outstanding batch numbers, oldest first.
    pub fn inflight(&self) -> Vec<u64> {
        self.inflight.iter().map(|(s, _)| *s).collect()
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Turn the dirty set into a new batch. `Ok(None)` when nothing is dirty; an error when
    /// [`MAX_INFLIGHT`] batches are already outstanding (wait for an ack).
    pub fn cut(&mut self) -> Result<Option<u64>> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        if self.inflight.len() >= MAX_INFLIGHT {
            return Err(StoreError::Dirty(format!(
                "{MAX_INFLIGHT} batches already in flight"
            )));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let b = std::mem::replace(&mut self.dirty, Bits::new(self.chunks));
        self.inflight.push_back((seq, b));
        Ok(Some(seq))
    }

    /// The chunks of an outstanding batch, ascending.
    pub fn batch(&self, seq: u64) -> Option<impl Iterator<Item = u64> + '_> {
        self.inflight
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, b)| b.iter())
    }

    /// The replica committed every batch up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.inflight.front().is_some_and(|(s, _)| *s <= seq) {
            self.inflight.pop_front();
        }
        self.acked_seq = self.acked_seq.max(seq);
    }

    /// After reconnecting: the replica reports the last batch it committed. Batches up to
    /// it are acknowledged; later ones were lost with the receiver's staging area and go
    /// back into the dirty set; new batches are numbered after everything either side saw.
    pub fn resume(&mut self, replica_applied: u64) {
        self.ack(replica_applied);
        while let Some((_, b)) = self.inflight.pop_front() {
            self.dirty.or(&b);
        }
        self.next_seq = self.next_seq.max(replica_applied + 1);
    }

    /// Write the state durably (crash-safe replace). Extents marked since the last persist
    /// become the hot set of the file.
    pub fn persist(&mut self) -> Result<()> {
        self.write(false)
    }

    /// Persist as cleanly closed.
    pub fn close(mut self) -> Result<()> {
        self.write(true)
    }

    fn write(&mut self, clean: bool) -> Result<()> {
        let mut p = Vec::new();
        for v in [
            u64::from(self.chunk_size),
            self.chunks,
            self.next_seq,
            self.acked_seq,
            u64::from(clean),
        ] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        self.hot_now.encode(&mut p);
        self.dirty.encode(&mut p);
        p.extend_from_slice(&(self.inflight.len() as u64).to_be_bytes());
        for (seq, b) in &self.inflight {
            p.extend_from_slice(&seq.to_be_bytes());
            b.encode(&mut p);
        }
        envelope::write_file(&KIND, &self.path, &p)?;
        self.hot_saved = self.hot_now.clone();
        self.hot_now.clear();
        Ok(())
    }
}

#[cfg(test)]
#[path = "dirtymap_tests.rs"]
mod tests;
