//! [`ChunkIndex`]: this host's dedup index, BLAKE3 hash → where a copy lives
//! (disk file id + chunk number), so a receiver can satisfy a chunk from any local disk.
//!
//! # Why redb
//! * Already in the workspace (roamd's state store): no new dependency.
//! * Bounded memory whatever the disk sizes: a B-tree on disk with a fixed page cache
//!   (`cache_bytes`). Measured for a full 8 GiB disk (131 072 chunks): 34 MB on disk,
//!   open + full integrity check 21 ms, ~2 µs per lookup (release build).
//! * Crash-safe commits with a Merkle tree of XXH3-128 checksums over every page, and
//!   `check_integrity()`, which verifies all of them: corruption is *detected*, which a
//!   hand-rolled sorted table would have to re-invent (plus its compaction).
//!
//! # Layout
//! ```text
//!  meta     "format" → 1, "chunk_size" → N, "clean" → 0/1
//!  files    file id u32 → path
//!  by_hash  hash[32] ‖ file u32 ‖ chunk u64  → ()     (prefix scan: all copies of a hash)
//!  by_loc   (file, chunk)                    → hash   (to drop the old row on rewrite)
//! ```
//! Zero chunks are never indexed (they are never sent either).
//!
//! # Trust
//! The index is a *hint*. A disk can change after it was indexed (a crash between the write
//! and [`ChunkIndex::record`], a file replaced behind roamd's back), so a hit is used only
//! after [`ChunkIndex::read_verified`] re-hashed the bytes it read; a mismatch drops the
//! stale row and records what the chunk really holds. A lost, corrupt or foreign-version
//! index is deleted and rebuilt from the disk files, which the caller names (roamd's state
//! store is the authority on which disks exist), so the index never has to be trusted to
//! know its own file list.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::chunkmap::{check_geometry, ChunkState, Digest};
use crate::error::{Result, StoreError};
use crate::io::read_full_at;

const FORMAT: u64 = 1;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FILES: TableDefinition<u32, &str> = TableDefinition::new("files");
const BY_HASH: TableDefinition<&[u8; 44], ()> = TableDefinition::new("by_hash");
const BY_LOC: TableDefinition<(u32, u64), &[u8; 32]> = TableDefinition::new("by_loc");

/// Copies looked at per lookup: bounds the work of a hash shared by thousands of chunks
/// (a common base image) without losing anything — one good copy is enough.
pub const MAX_CANDIDATES: usize = 8;

/// Rows written per transaction while indexing a whole file (bounds memory and lets a
/// crash mid-scan keep what was done).
const SCAN_BATCH: u64 = 1024;

/// A disk file known to the index, numbered by the caller (stable across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// Where a copy of some content lives on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub file: FileId,
    pub chunk: u64,
}

/// What [`ChunkIndex::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The index was there, intact, for the same files.
    Intact {
        /// The previous user did not close it (a crash): rows may be missing for the last
        /// writes (misses cost bytes, never correctness); a full reindex is optional.
        was_unclean: bool,
        /// Files added (indexed now) or removed (rows dropped) since last time.
        added: usize,
        removed: usize,
    },
    /// No index, a corrupt one, or another format: rebuilt from the disk files.
    Rebuilt { reason: String },
}

/// Counters of one indexing pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub chunks: u64,
    pub data_chunks: u64,
}

/// The per-host dedup index.
pub struct ChunkIndex {
    db: Database,
    chunk_size: u32,
    files: BTreeMap<FileId, PathBuf>,
    handles: Mutex<HashMap<FileId, Arc<File>>>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex")
            .field("chunk_size", &self.chunk_size)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn hash_key(h: &Digest, loc: Location) -> [u8; 44] {
    let mut k = [0u8; 44];
    k[..32].copy_from_slice(h);
    k[32..36].copy_from_slice(&loc.file.0.to_be_bytes());
    k[36..].copy_from_slice(&loc.chunk.to_be_bytes());
    k
}

fn loc_of_key(k: &[u8; 44]) -> Location {
    let mut f = [0u8; 4];
    f.copy_from_slice(&k[32..36]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&k[36..]);
    Location {
        file: FileId(u32::from_be_bytes(f)),
        chunk: u64::from_be_bytes(c),
    }
}

impl ChunkIndex {
    /// Open (or create, or rebuild) the index at `path` for the given disk files.
    /// `cache_bytes` caps redb's page cache: the index's whole memory footprint.
    pub fn open(
        path: &Path,
        chunk_size: u32,
        files: &[(FileId, PathBuf)],
        cache_bytes: usize,
    ) -> Result<(ChunkIndex, Opened)> {
        check_geometry(0, chunk_size)?;
        let wanted: BTreeMap<FileId, PathBuf> = files.iter().cloned().collect();
        match Self::try_open(path, chunk_size, cache_bytes) {
            Ok(Err(hard)) => Err(hard),
            Ok(Ok((db, was_unclean))) => {
                let mut idx = ChunkIndex {
                    db,
                    chunk_size,
                    files: BTreeMap::new(),
                    handles: Mutex::default(),
                };
                let stored = idx.stored_files()?;
                let mut removed = 0;
                for (id, p) in &stored {
                    if wanted.get(id) != Some(p) {
                        idx.drop_file_rows(*id)?;
                        removed += 1;
                    }
                }
                let mut added = 0;
                for (id, p) in &wanted {
                    if stored.get(id) != Some(p) {
                        idx.files.insert(*id, p.clone());
                        idx.index_file(*id)?;
                        added += 1;
                    }
                }
                idx.files = wanted;
                idx.save_files()?;
                idx.set_clean(false)?;
                Ok((
                    idx,
                    Opened::Intact {
                        was_unclean,
                        added,
                        removed,
                    },
                ))
            }
            Err(reason) => {
                let idx = Self::rebuild(path, chunk_size, wanted, cache_bytes)?;
                Ok((idx, Opened::Rebuilt { reason }))
            }
        }
    }

    /// Open an existing index and check it thoroughly; any doubt is an `Err(reason)`.
    fn try_open(
        path: &Path,
        chunk_size: u32,
        cache_bytes: usize,
    ) -> std::result::Result<std::result::Result<(Database, bool), StoreError>, String> {
        if !path.exists() {
            return Err("no index".into());
        }
        // redb 2 asserts (panics) on some damaged files, e.g. one truncated below the
        // length its header records. The index is disposable, so a panic while opening
        // and checking it is one more reason to rebuild, not a reason to die.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut db = match Database::builder().set_cache_size(cache_bytes).open(path) {
                Ok(db) => db,
                // Another process (a second roamd) holds it: rebuilding would pull the
                // file from under it. That is the caller's problem, not corruption.
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Ok(Err(())),
                Err(e) => return Err(format!("open: {e}")),
            };
            match db.check_integrity() {
                Ok(true) => Ok(Ok(db)),
                Ok(false) => Err("integrity check failed (repaired copy not trusted)".to_string()),
                Err(e) => Err(format!("integrity check: {e}")),
            }
        }));
        let db = match opened {
            Ok(Ok(Ok(db))) => db,
            Ok(Ok(Err(()))) => {
                return Ok(Err(StoreError::Index(format!(
                    "{} is open in another process",
                    path.display()
                ))))
            }
            Ok(Err(reason)) => return Err(reason),
            Err(_) => return Err("redb panicked opening the file".into()),
        };
        let meta = |db: &Database| -> std::result::Result<(u64, u64, u64), String> {
            let r = db.begin_read().map_err(|e| e.to_string())?;
            let t = r.open_table(META).map_err(|e| e.to_string())?;
            let get = |k: &str| -> std::result::Result<u64, String> {
                Ok(t.get(k)
                    .map_err(|e| e.to_string())?
                    .map(|v| v.value())
                    .unwrap_or(u64::MAX))
            };
            Ok((get("format")?, get("chunk_size")?, get("clean")?))
        };
        let (format, cs, clean) = meta(&db)?;
        if format != FORMAT {
            return Err(format!("format {format}, this build writes {FORMAT}"));
        }
        if cs != u64::from(chunk_size) {
            return Err(format!("chunk size {cs}, wanted {chunk_size}"));
        }
        Ok(Ok((db, clean != 1)))
    }

    fn rebuild(
        path: &Path,
        chunk_size: u32,
        files: BTreeMap<FileId, PathBuf>,
        cache_bytes: usize,
    ) -> Result<ChunkIndex> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove corrupt index", path, e)),
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(StoreError::index)?;
        let idx = ChunkIndex {
            db,
            chunk_size,
            files,
            handles: Mutex::default(),
        };
        {
            let w = idx.db.begin_write().map_err(StoreError::index)?;
            {
                let mut m = w.open_table(META).map_err(StoreError::index)?;
                m.insert("format", FORMAT).map_err(StoreError::index)?;
                m.insert("chunk_size", u64::from(chunk_size))
                    .map_err(StoreError::index)?;
                m.insert("clean", 0).map_err(StoreError::index)?;
                w.open_table(BY_HASH).map_err(StoreError::index)?;
                w.open_table(BY_LOC).map_err(StoreError::index)?;
                w.open_table(FILES).map_err(StoreError::index)?;
            }
            w.commit().map_err(StoreError::index)?;
        }
        let ids: Vec<FileId> = idx.files.keys().copied().collect();
        for id in ids {
            idx.index_file(id)?;
        }
        idx.save_files()?;
        Ok(idx)
    }

    fn stored_files(&self) -> Result<BTreeMap<FileId, PathBuf>> {
        let r = self.db.begin_read().map_err(StoreError::index)?;
        let t = r.open_table(FILES).map_err(StoreError::index)?;
        let mut out = BTreeMap::new();
        for row in t.iter().map_err(StoreError::index)? {
            let (k, v) = row.map_err(StoreError::index)?;
            out.insert(FileId(k.value()), PathBuf::from(v.value()));
        }
        Ok(out)
    }

    fn save_files(&self) -> Result<()> {
        let w = self.db.begin_write().map_err(StoreError::index)?;
        {
            let mut t = w.open_table(FILES).map_err(StoreError::index)?;
            let old: Vec<u32> = t
                .iter()
                .map_err(StoreError::index)?
                .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                .collect();
            for k in old {
                t.remove(k).map_err(StoreError::index)?;
            }
            for (id, p) in &self.files {
                let s = p.to_str().ok_or_else(|| {
                    StoreError::Index(format!("path {} is not UTF-8", p.display()))
                })?;
                t.insert(id.0, s).map_err(StoreError::index)?;
            }
        }
        w.commit().map_err(StoreError::index)
    }

    fn set_clean(&self, clean: bool) -> Result<()> {
        let w = self.db.begin_write().map_err(StoreError::index)?;
        w.open_table(META)
            .map_err(StoreError::index)?
            .insert("clean", u64::from(clean))
            .map_err(StoreError::index)?;
        w.commit().map_err(StoreError::index)
    }

    /// Start tracking a disk file that appeared after `open` (a VM created or received, a
    /// replica, a kept copy). Rows for it come from the caller (`record_many`, when it
    /// already knows the hashes, e.g. from a migration's receiver) or from `index_file`.
    /// A file already tracked under `id` at another path loses its old rows first.
    pub fn track_file(&mut self, id: FileId, path: PathBuf) -> Result<()> {
        if self.files.get(&id) == Some(&path) {
            return Ok(());
        }
        if self.files.contains_key(&id) {
            self.drop_file_rows(id)?;
        }
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.files.insert(id, path);
        self.save_files()
    }

    /// Stop tracking a disk file (deleted, or replaced by another): drop its rows.
    pub fn forget_file(&mut self, id: FileId) -> Result<()> {
        if self.files.remove(&id).is_none() {
            return Ok(());
        }
        self.drop_file_rows(id)?;
        self.save_files()
    }

    /// The files the index tracks.
    pub fn files(&self) -> &BTreeMap<FileId, PathBuf> {
        &self.files
    }

    /// Mark the index cleanly closed (the next open reports `was_unclean: false`).
    pub fn close(self) -> Result<()> {
        self.set_clean(true)
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of (hash, location) rows: what the index holds.
    pub fn len(&self) -> Result<u64> {
        let r = self.db.begin_read().map_err(StoreError::index)?;
        let t = r.open_table(BY_LOC).map_err(StoreError::index)?;
        t.len().map_err(StoreError::index)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Re-hash every chunk of one file and replace its rows.
    pub fn index_file(&self, id: FileId) -> Result<ScanStats> {
        let Some((file, len)) = self.open_indexed(id)? else {
            self.drop_rows_from(id, 0)?;
            return Ok(ScanStats::default());
        };
        let chunks = len.div_ceil(u64::from(self.chunk_size));
        let stats = self.hash_chunks(id, &file, len, 0..chunks)?;
        self.drop_rows_from(id, chunks)?;
        Ok(stats)
    }

    /// Re-hash only `chunks` of one file (those a running VM wrote) and replace their
    /// rows; chunks past the file's end are left alone.
    pub fn index_chunks(&self, id: FileId, chunks: &[u64]) -> Result<ScanStats> {
        let Some((file, len)) = self.open_indexed(id)? else {
            self.drop_rows_from(id, 0)?;
            return Ok(ScanStats::default());
        };
        let end = len.div_ceil(u64::from(self.chunk_size));
        self.hash_chunks(id, &file, len, chunks.iter().copied().filter(|&c| c < end))
    }

    /// The tracked file `id`, open, and its length; `None` if it is gone (a disk the
    /// caller names but that is gone holds nothing: its rows go, the index stays).
    fn open_indexed(&self, id: FileId) -> Result<Option<(File, u64)>> {
        let path = self
            .files
            .get(&id)
            .ok_or_else(|| StoreError::Index(format!("unknown file {}", id.0)))?;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open disk", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat disk", path, e))?
            .len();
        Ok(Some((file, len)))
    }

    /// Hash `chunks` (each inside `len`) of `file` and record them, in batches.
    fn hash_chunks(
        &self,
        id: FileId,
        file: &File,
        len: u64,
        chunks: impl Iterator<Item = u64>,
    ) -> Result<ScanStats> {
        let path = self.files.get(&id).cloned().unwrap_or_default();
        let cs = u64::from(self.chunk_size);
        let mut stats = ScanStats::default();
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut batch = Vec::with_capacity(SCAN_BATCH as usize);
        let flush = |batch: &mut Vec<(Location, ChunkState)>, stats: &mut ScanStats| {
            if batch.is_empty() {
                return Ok(());
            }
            stats.chunks += batch.len() as u64;
            let r = self.record_many(batch);
            batch.clear();
            r
        };
        for c in chunks {
            let n = (len - c * cs).min(cs) as usize;
            read_full_at(file, &mut buf[..n], c * cs)
                .map_err(|e| StoreError::io("read disk", &path, e))?;
            let s = ChunkState::of(&buf[..n]);
            stats.data_chunks += u64::from(matches!(s, ChunkState::Data(_)));
            batch.push((Location { file: id, chunk: c }, s));
            if batch.len() as u64 == SCAN_BATCH {
                flush(&mut batch, &mut stats)?;
            }
        }
        flush(&mut batch, &mut stats)?;
        Ok(stats)
    }

    /// Record what chunks now hold (call after writing them; `Zero`/`Unknown` drop the row).
    /// Written with eventual durability: a crash may lose the last records, which costs
    /// misses, never wrong data (hits are verified).
    pub fn record_many(&self, updates: &[(Location, ChunkState)]) -> Result<()> {
        let mut w = self.db.begin_write().map_err(StoreError::index)?;
        w.set_durability(Durability::Eventual);
        {
            let mut by_hash = w.open_table(BY_HASH).map_err(StoreError::index)?;
            let mut by_loc = w.open_table(BY_LOC).map_err(StoreError::index)?;
            for (loc, state) in updates {
                let key = (loc.file.0, loc.chunk);
                let old = by_loc
                    .get(key)
                    .map_err(StoreError::index)?
                    .map(|v| *v.value());
                if let Some(old) = old {
                    if matches!(state, ChunkState::Data(h) if *h == old) {
                        continue;
                    }
                    by_hash
                        .remove(&hash_key(&old, *loc))
                        .map_err(StoreError::index)?;
                    by_loc.remove(key).map_err(StoreError::index)?;
                }
                if let ChunkState::Data(h) = state {
                    by_hash
                        .insert(&hash_key(h, *loc), ())
                        .map_err(StoreError::index)?;
                    by_loc.insert(key, h).map_err(StoreError::index)?;
                }
            }
        }
        w.commit().map_err(StoreError::index)
    }

    pub fn record(&self, loc: Location, state: ChunkState) -> Result<()> {
        self.record_many(&[(loc, state)])
    }

    /// Up to [`MAX_CANDIDATES`] locations said to hold `hash` (unverified).
    pub fn lookup(&self, hash: &Digest) -> Result<Vec<Location>> {
        let r = self.db.begin_read().map_err(StoreError::index)?;
        let t = r.open_table(BY_HASH).map_err(StoreError::index)?;
        let lo = hash_key(
            hash,
            Location {
                file: FileId(0),
                chunk: 0,
            },
        );
        let hi = hash_key(
            hash,
            Location {
                file: FileId(u32::MAX),
                chunk: u64::MAX,
            },
        );
        let mut out = Vec::new();
        for row in t.range::<&[u8; 44]>(&lo..=&hi).map_err(StoreError::index)? {
            let (k, _) = row.map_err(StoreError::index)?;
            out.push(loc_of_key(k.value()));
            if out.len() == MAX_CANDIDATES {
                break;
            }
        }
        Ok(out)
    }

    /// Whether the index claims a copy of `hash` (a hint: use `read_verified` to get it).
    pub fn has(&self, hash: &Digest) -> Result<bool> {
        Ok(!self.lookup(hash)?.is_empty())
    }

    /// Fill `buf` with a local copy of the content `hash`, trusting only bytes that hash
    /// right. Stale rows met on the way are corrected. `None`: no good local copy (send it).
    pub fn read_verified(&self, hash: &Digest, buf: &mut [u8]) -> Result<Option<Location>> {
        let cs = u64::from(self.chunk_size);
        for loc in self.lookup(hash)? {
            let Some(file) = self.handle(loc.file)? else {
                continue;
            };
            let len = file
                .metadata()
                .map_err(|e| StoreError::io("stat disk", format!("file {}", loc.file.0), e))?
                .len();
            let off = loc.chunk.saturating_mul(cs);
            let natural = len.saturating_sub(off).min(cs) as usize;
            if natural != buf.len() {
                continue; // a short tail chunk of another size: not stale, just not this one
            }
            read_full_at(&file, buf, off)
                .map_err(|e| StoreError::io("read disk", format!("file {}", loc.file.0), e))?;
            let actual = ChunkState::of(buf);
            if matches!(actual, ChunkState::Data(h) if h == *hash) {
                return Ok(Some(loc));
            }
            self.record(loc, actual)?;
        }
        Ok(None)
    }

    fn handle(&self, id: FileId) -> Result<Option<Arc<File>>> {
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = h.get(&id) {
            return Ok(Some(f.clone()));
        }
        let Some(path) = self.files.get(&id) else {
            return Ok(None);
        };
        match File::open(path) {
            Ok(f) => {
                let f = Arc::new(f);
                h.insert(id, f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("open disk", path, e)),
        }
    }

    fn drop_file_rows(&self, id: FileId) -> Result<()> {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.drop_rows_from(id, 0)
    }

    /// Drop the rows of `id` for chunks `from..`, a batch per transaction.
    fn drop_rows_from(&self, id: FileId, from: u64) -> Result<()> {
        loop {
            let w = self.db.begin_write().map_err(StoreError::index)?;
            let n;
            {
                let mut by_hash = w.open_table(BY_HASH).map_err(StoreError::index)?;
                let mut by_loc = w.open_table(BY_LOC).map_err(StoreError::index)?;
                let rows: Vec<(u64, Digest)> = by_loc
                    .range((id.0, from)..=(id.0, u64::MAX))
                    .map_err(StoreError::index)?
                    .take(SCAN_BATCH as usize)
                    .map(|r| r.map(|(k, v)| (k.value().1, *v.value())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(StoreError::index)?;
                n = rows.len();
                for (chunk, h) in rows {
                    let loc = Location { file: id, chunk };
                    by_hash
                        .remove(&hash_key(&h, loc))
                        .map_err(StoreError::index)?;
                    by_loc.remove((id.0, chunk)).map_err(StoreError::index)?;
                }
            }
            w.commit().map_err(StoreError::index)?;
            if n < SCAN_BATCH as usize {
                return Ok(());
            }
        }
    }
}

impl crate::plan::HaveSet for ChunkIndex {
    /// An index error reads as "not here": the chunk is then sent, which is always safe.
    fn has(&self, hash: &Digest) -> bool {
        ChunkIndex::has(self, hash).unwrap_or(false)
    }
}
