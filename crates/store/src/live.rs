//! [`LiveMap`]: what a replica lacks while its disk is being written, kept in a file
//! that the writing process maps `MAP_SHARED`, so that a **crash of that process** leaves
//! it on the host: the kernel's page cache keeps every store the process made before it
//! died, with no `msync` and no syscall on the write path. roamd keeps one per
//! replication link while the VM runs; its next start turns what a crashed one left into
//! the link's carry instead of comparing the whole disk by hash.
//!
//! ```text
//!  DIR/KEY.<unique>          one per tracking (roamd: KEY = VM@HOST, one VM run)
//!  ┌ header ─────────────────────────────┐┌ dirty bits ──────┐┌ pending bits ─────┐
//!  │ magic version chunks boot-id        ││ the consumer's   ││ taken for a batch │
//!  │ generation anchored synced (g, s)   ││ dirty bitmap     ││ not yet committed │
//!  └─────────────────────────────────────┘└──────────────────┘└───────────────────┘
//!   writes: mark dirty before and after the data (roam_nbd::DirtyTracker::subscribe_in)
//!   a batch takes bits: set in pending first, then cleared in dirty (take_keeping)
//!   commit (g, s):  anchored = 0 · synced = (g, s) · pending = {} · anchored = 1
//!   the process crashes: the page cache keeps every store made before death
//!   recover():      same boot id, anchored? ─ yes ─▶ synced, dirty ∪ pending
//!                                            └ no ──▶ nothing (compare by hash)
//! ```
//!
//! Why it is sound: once anchored, the chunks written since the replica's `(g, s)` are
//! in `dirty ∪ pending` at every instant (a write marks dirty before it reaches the disk;
//! a bit leaves dirty only after it is in pending; pending is emptied only together with
//! `synced` moving to the batch that holds it, inside an `anchored = 0` window). A
//! process crash keeps every store in the page cache. A crash of the *host* may have
//! written back any subset of the pages, so a file from another boot is ignored. A file
//! is removed when its tracking ends in order; a crash inside an `anchored = 0` window or
//! before the first anchor costs a hash comparison, never a chunk. The crash campaign
//! `crates/lab/tests/primary_crash.rs` kills a writing process at 50 random instants and
//! checks this each time.
//!
//! Only this module reads or writes these files; the consumer decides when to anchor.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::error::{Result, StoreError};
use crate::replica::Version;

const MAGIC: u64 = 0x5245_564C_4D41_4F52; // "ROAMLVER"
const VERSION: u64 = 1;
const HEADER_BYTES: usize = 4096;

// Header words.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_CHUNKS: usize = 2;
const H_BOOT0: usize = 3;
const H_BOOT1: usize = 4;
const H_GENERATION: usize = 5;
const H_ANCHORED: usize = 6;
const H_SYNCED_GEN: usize = 7;
const H_SYNCED_SEQ: usize = 8;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This boot of the host, as two words (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Result<[u64; 2]> {
    let io = |e| StoreError::io("read", BOOT_ID, e);
    let s = std::fs::read_to_string(BOOT_ID).map_err(io)?;
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    let bad = || StoreError::Malformed {
        what: "boot id",
        detail: s.trim().to_string(),
    };
    if hex.len() != 32 {
        return Err(bad());
    }
    let hi = u64::from_str_radix(&hex[..16], 16).map_err(|_| bad())?;
    let lo = u64::from_str_radix(&hex[16..], 16).map_err(|_| bad())?;
    Ok([hi, lo])
}

/// One tracking's state, mapped. All access goes through atomics on the mapping.
#[derive(Debug)]
pub struct LiveMap {
    path: PathBuf,
    /// Kept only to unmap at drop; never read or written through.
    _map: MmapMut,
    /// The mapping's start, taken once: every access is an atomic through it.
    base: std::ptr::NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is shared memory accessed only through `AtomicU64`s (`all`), which
// are Sync; the pointer stays valid while `_map` lives, that is, as long as `self`.
unsafe impl Send for LiveMap {}
// SAFETY: as above.
unsafe impl Sync for LiveMap {}

impl LiveMap {
    /// A new, unanchored map in `dir`, named after `key`, for a disk of `chunks` chunks
    /// written in `generation`.
    pub fn create(
        dir: &Path,
        key: &str,
        chunks: u64,
        generation: u64,
        boot: [u64; 2],
    ) -> Result<LiveMap> {
        if chunks > crate::chunkmap::MAX_CHUNKS {
            return Err(StoreError::Geometry {
                detail: format!("{chunks} chunks is more than a live map holds"),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create", dir, e))?;
        let words = chunks.div_ceil(64) as usize;
        let len = HEADER_BYTES + 2 * words * 8;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let (path, file) = loop {
            // Unique among this process's files; a leftover of a dead one with the same
            // pid is skipped by `create_new`.
            let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
            let name = format!("{key}.{:08x}{n:08x}", std::process::id());
            let path = dir.join(name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io("create", path, e)),
            }
        };
        let mapped = map_file(&file, len).and_then(|mut map| {
            let base = std::ptr::NonNull::new(map.as_mut_ptr().cast::<AtomicU64>())
                .ok_or_else(|| std::io::Error::other("mmap gave a null address"))?;
            Ok((map, base))
        });
        let (map, base) = match mapped {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(StoreError::io("map", path, e));
            }
        };
        let f = LiveMap {
            path,
            _map: map,
            base,
            words,
        };
        let h = f.header();
        h[H_VERSION].store(VERSION, Ordering::Relaxed);
        h[H_CHUNKS].store(chunks, Ordering::Relaxed);
        h[H_BOOT0].store(boot[0], Ordering::Relaxed);
        h[H_BOOT1].store(boot[1], Ordering::Relaxed);
        h[H_GENERATION].store(generation, Ordering::Relaxed);
        h[H_MAGIC].store(MAGIC, Ordering::Release);
        Ok(f)
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (so 8-aligned), `HEADER_BYTES + 2 * words
        // * 8` bytes long (zero-filled by `set_len`, a valid `AtomicU64` pattern), lives
        // as long as `self`, and is only ever accessed through these atomics.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), HEADER_BYTES / 8 + 2 * self.words) }
    }

    fn header(&self) -> &[AtomicU64] {
        &self.all()[..HEADER_BYTES / 8]
    }

    /// The bits of chunks taken for a batch that has not committed.
    pub fn pending(&self) -> &[AtomicU64] {
        &self.all()[HEADER_BYTES / 8 + self.words..]
    }

    /// From now on the replica is at `synced` and lacks (besides the dirty bits) exactly
    /// `pending`. Crash-atomic: a crash inside leaves the file unanchored.
    pub fn anchor(&self, synced: Version, pending: &BTreeSet<u64>) {
        let h = self.header();
        h[H_ANCHORED].store(0, Ordering::SeqCst);
        // A store's release order keeps what came before it, not what follows: without
        // this fence the compiler or CPU may let the changes below become visible (to the
        // page cache, so to a crash) while the map still says anchored.
        fence(Ordering::SeqCst);
        for w in self.pending() {
            w.store(0, Ordering::Relaxed);
        }
        let p = self.pending();
        for &c in pending {
            if let Some(w) = p.get((c / 64) as usize) {
                w.fetch_or(1 << (c % 64), Ordering::Relaxed);
            }
        }
        h[H_SYNCED_GEN].store(synced.generation, Ordering::Relaxed);
        h[H_SYNCED_SEQ].store(synced.seq, Ordering::Relaxed);
        h[H_ANCHORED].store(1, Ordering::SeqCst);
    }

    /// The tracking ended in order: the file says nothing any more, and goes.
    pub fn retire(&self) {
        self.header()[H_ANCHORED].store(0, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The consumer's dirty bits (one per chunk): roamd's dirty subscription lives here.
    pub fn dirty(&self) -> &[AtomicU64] {
        &self.all()[HEADER_BYTES / 8..HEADER_BYTES / 8 + self.words]
    }
}

fn map_file(file: &File, len: usize) -> std::io::Result<MmapMut> {
    file.set_len(len as u64)?;
    // SAFETY: the file was created by us (create_new) in roamd's own state directory and
    // keeps its length; nobody else maps or truncates it while it is mapped.
    unsafe { MmapMut::map_mut(file) }
}

/// What a live map left by a crashed process says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub generation: u64,
    pub synced_to: Version,
    /// Chunks written since `synced_to`: dirty ∪ pending.
    pub pending: BTreeSet<u64>,
}

/// Why no state was recovered for a link (logged; a hash comparison follows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("it was written before the host last booted")]
    OtherBoot,
    #[error("the process stopped before the replica's first commit, or while one was recorded")]
    NotAnchored,
    #[error("more than one tracking left state")]
    Ambiguous,
    #[error("it is damaged: {0}")]
    Damaged(String),
}

/// Decode one file's bytes.
pub fn decode(bytes: &[u8], boot: [u64; 2]) -> Result<Found, Unusable> {
    let word = |i: usize| -> Option<u64> {
        let b = bytes.get(i * 8..i * 8 + 8)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    };
    let damaged = |what: &str| Unusable::Damaged(what.to_string());
    if word(H_MAGIC) != Some(MAGIC) {
        return Err(damaged("no magic"));
    }
    if word(H_VERSION) != Some(VERSION) {
        return Err(damaged("unknown version"));
    }
    let chunks = word(H_CHUNKS).ok_or_else(|| damaged("short"))?;
    if chunks > crate::chunkmap::MAX_CHUNKS {
        return Err(damaged("too many chunks"));
    }
    let words = chunks.div_ceil(64) as usize;
    if bytes.len() != HEADER_BYTES + 2 * words * 8 {
        return Err(damaged("wrong length"));
    }
    if [word(H_BOOT0), word(H_BOOT1)] != [Some(boot[0]), Some(boot[1])] {
        return Err(Unusable::OtherBoot);
    }
    if word(H_ANCHORED) != Some(1) {
        return Err(Unusable::NotAnchored);
    }
    let mut pending = BTreeSet::new();
    let base = HEADER_BYTES / 8;
    for i in 0..words {
        let v = word(base + i).unwrap_or(0) | word(base + words + i).unwrap_or(0);
        let mut v = v;
        while v != 0 {
            let c = i as u64 * 64 + u64::from(v.trailing_zeros());
            if c >= chunks {
                return Err(damaged("a chunk past the disk's end"));
            }
            pending.insert(c);
            v &= v - 1;
        }
    }
    Ok(Found {
        generation: word(H_GENERATION).unwrap_or(0),
        synced_to: Version {
            generation: word(H_SYNCED_GEN).unwrap_or(0),
            seq: word(H_SYNCED_SEQ).unwrap_or(0),
        },
        pending,
    })
}

/// Read and delete every live map named after `key` in `dir` (at the start of the next
/// process, before anything tracks again). `Ok(None)`: there was none (the last stop
/// was orderly).
pub fn recover(dir: &Path, key: &str) -> Result<Option<Found>, Unusable> {
    let boot = boot_id().map_err(|e| Unusable::Damaged(e.to_string()))?;
    let pre = format!("{key}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<Result<Found, Unusable>> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&pre)) else {
            continue;
        };
        // Keys may themselves hold dots: the suffix is 16 hex digits.
        if rest.len() != 16 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let r = std::fs::read(e.path())
            .map_err(|err| Unusable::Damaged(err.to_string()))
            .and_then(|b| decode(&b, boot));
        let _ = std::fs::remove_file(e.path());
        found.push(r);
    }
    let mut good: Vec<Found> = Vec::new();
    let mut first_err = None;
    for r in found {
        match r {
            Ok(f) => good.push(f),
            // An unanchored leftover beside a good one is an older tracking's (retired
            // files are deleted, but a crash may come between the two).
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match (good.len(), first_err) {
        (1, _) => Ok(good.pop()),
        (0, None) => Ok(None),
        (0, Some(e)) => Err(e),
        _ => Err(Unusable::Ambiguous),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: [u64; 2] = [7, 9];

    fn v(g: u64, s: u64) -> Version {
        Version {
            generation: g,
            seq: s,
        }
    }

    fn read(f: &LiveMap) -> Vec<u8> {
        std::fs::read(f.path()).unwrap_or_default()
    }

    #[test]
    fn nothing_is_promised_before_the_anchor_nor_after_retirement() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = LiveMap::create(dir.path(), "desk@home", 130, 3, BOOT)
            .unwrap_or_else(|e| panic!("{e}"));
        f.dirty()[0].fetch_or(0b101, Ordering::Release);
        assert_eq!(decode(&read(&f), BOOT), Err(Unusable::NotAnchored));
        f.anchor(v(3, 17), &[64, 129].into_iter().collect());
        let got = decode(&read(&f), BOOT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.generation, 3);
        assert_eq!(got.synced_to, v(3, 17));
        assert_eq!(got.pending, [0, 2, 64, 129].into_iter().collect());
        assert_eq!(decode(&read(&f), [7, 8]), Err(Unusable::OtherBoot));
        let bytes = read(&f);
        f.retire();
        assert!(!f.path().exists());
        assert!(matches!(
            decode(&bytes[..100], BOOT),
            Err(Unusable::Damaged(_))
        ));
    }

    #[test]
    fn a_commit_replaces_the_pending_set() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f =
            LiveMap::create(dir.path(), "desk@home", 64, 1, BOOT).unwrap_or_else(|e| panic!("{e}"));
        f.anchor(v(1, 1), &[1, 2, 3].into_iter().collect());
        f.anchor(v(1, 2), &BTreeSet::new());
        let got = decode(&read(&f), BOOT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((got.synced_to, got.pending.len()), (v(1, 2), 0));
    }

    #[test]
    fn recovery_reads_and_deletes_this_links_files_only() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let boot = boot_id().unwrap_or_else(|e| panic!("{e}"));
        let ours =
            LiveMap::create(dir.path(), "desk@home", 64, 2, boot).unwrap_or_else(|e| panic!("{e}"));
        ours.anchor(v(2, 5), &[4].into_iter().collect());
        let other =
            LiveMap::create(dir.path(), "desk@city", 64, 2, boot).unwrap_or_else(|e| panic!("{e}"));
        other.anchor(v(2, 5), &BTreeSet::new());
        // A leftover of an older tracking that never anchored does not spoil ours.
        let old =
            LiveMap::create(dir.path(), "desk@home", 64, 2, boot).unwrap_or_else(|e| panic!("{e}"));
        drop(old);
        let got = recover(dir.path(), "desk@home").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.map(|f| f.pending), Some([4].into_iter().collect()));
        assert!(!ours.path().exists());
        assert!(other.path().exists());
        assert_eq!(recover(dir.path(), "desk@home"), Ok(None));

        // Two anchored trackings of one link: nothing can be trusted.
        let a =
            LiveMap::create(dir.path(), "desk@home", 64, 2, boot).unwrap_or_else(|e| panic!("{e}"));
        let b =
            LiveMap::create(dir.path(), "desk@home", 64, 2, boot).unwrap_or_else(|e| panic!("{e}"));
        a.anchor(v(2, 5), &BTreeSet::new());
        b.anchor(v(2, 6), &BTreeSet::new());
        assert_eq!(recover(dir.path(), "desk@home"), Err(Unusable::Ambiguous));
    }

    #[test]
    fn the_boot_id_is_read() {
        let a = boot_id().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(boot_id().ok(), Some(a));
        assert_ne!(a, [0, 0]);
    }
}
