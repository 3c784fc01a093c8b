//! This host's dedup index in use: which disk files it covers, when rows are written, and
//! the handle a disk receiver asks "do you hold this content anywhere?".
//!
//! ```text
//!  roamd start ──(blocking task)──▶ ChunkIndex::open(STATE/chunks.redb, every disk here)
//!                                    rebuilt when lost/corrupt; new files hashed once
//!  migration received ──hashes the receiver already has──▶ note_disk(final path)
//!  migration sent     ──the sender's hashes (= the kept disk)──▶ note_disk(kept path)
//!  VM created         ──▶ scan_disk (hash the file once, in the background)
//!  replica committed  ──▶ note_chunks(replica disk, the chunks it staged)
//!  VM stopped         ──▶ note_written: the chunks it wrote while it ran, re-hashed
//!  DiskReceiver  ◀── index() ── Hash frame: read_verified(hash) → copy locally, or Want
//! ```
//!
//! The write path of a running VM never touches the index: NBD writes stay as fast as a
//! plain file. A running disk's rows therefore go stale as the guest writes, which costs
//! only misses, because a hit is used only after the bytes read hash right
//! (`ChunkIndex::read_verified`); a migration, a commit or the VM's stop refreshes them.
//! Index errors are logged and read as "not here": the chunk is then sent, always safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use roam_migrate::digest::{zero_hash, ChunkHashes};
use roam_store::{ChunkIndex, ChunkState, FileId, Location};
use tracing::{info, warn};

/// The index's page cache: its whole memory footprint, whatever the disks' sizes.
const CACHE_BYTES: usize = 16 << 20;
/// Chunk size of every disk roamd serves (the NBD tracker's and the frames').
pub const CHUNK_SIZE: u32 = 64 * 1024;

/// (chunk, content hash) of a disk's chunks.
pub type ChunkRows = Vec<(u64, [u8; 32])>;

/// A shareable handle on the open index. Lookups, scans and records take the read side
/// (redb serialises its own write transactions), so a long scan of a new disk never
/// holds up a receiver's lookups; only changing the file set takes the write side.
pub type SharedIndex = Arc<RwLock<ChunkIndex>>;

/// The daemon's dedup state. `index()` is `None` until the background open finished (or
/// if it failed): migrations then simply send what the destination lacks at the offset.
#[derive(Default)]
pub struct Dedup {
    index: Mutex<Option<SharedIndex>>,
    /// Hashes a migration receiver handed over at its seal, waiting for the disk's final
    /// path (`adopt_received`).
    received: Mutex<HashMap<String, ChunkRows>>,
}

/// A file's id in the index: derived from its path, so stable across restarts without a
/// table of its own (a collision would only make two files share rows: misses, never
/// wrong data, since every hit is verified).
pub fn file_id(path: &Path) -> FileId {
    let h = blake3::hash(path.as_os_str().as_encoded_bytes());
    let b = h.as_bytes();
    FileId(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

impl Dedup {
    /// Open (or rebuild) the index for `disks` in a blocking task; `index()` is available
    /// once it finished.
    pub fn start(self: &Arc<Self>, path: PathBuf, disks: Vec<PathBuf>) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let files: Vec<(FileId, PathBuf)> =
                disks.into_iter().map(|p| (file_id(&p), p)).collect();
            let t0 = std::time::Instant::now();
            match ChunkIndex::open(&path, CHUNK_SIZE, &files, CACHE_BYTES) {
                Ok((idx, opened)) => {
                    info!(
                        files = files.len(),
                        ms = t0.elapsed().as_millis() as u64,
                        ?opened,
                        "dedup index ready"
                    );
                    *me.index.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Arc::new(RwLock::new(idx)));
                }
                Err(e) => warn!("dedup index unavailable (chunks will be sent): {e}"),
            }
        });
    }

    /// The index, once open.
    pub fn index(&self) -> Option<SharedIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rows in the index (0 while it opens): whether offering hashes first can pay.
    pub fn indexed_chunks(&self) -> u64 {
        self.index()
            .and_then(|ix| ix.read().unwrap_or_else(|e| e.into_inner()).len().ok())
            .unwrap_or(0)
    }

    /// `path` now holds exactly these chunk hashes (zero hashes drop rows). Runs in a
    /// blocking task: recording 16 k rows takes a few hundred milliseconds.
    pub fn note_disk(&self, path: &Path, hashes: Vec<(u64, [u8; 32])>) {
        let Some(ix) = self.index() else { return };
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || record_rows(&ix, &path, &hashes));
    }

    /// Record the data chunks of `hashes` (a disk whose every chunk's hash is known) for
    /// `path`. Zero chunks are left out: a row for a chunk zeroed since is merely stale.
    pub fn note_all(&self, path: &Path, hashes: &ChunkHashes) {
        let zero = zero_hash(CHUNK_SIZE as usize);
        let rows: ChunkRows = (0..hashes.len())
            .filter_map(|i| hashes.get(i).map(|h| (i, *h)))
            .filter(|(_, h)| *h != zero)
            .collect();
        self.note_disk(path, rows);
    }

    /// Track `path` and hash it whole, in the background (a VM created from an image).
    pub fn scan_disk(&self, path: &Path) {
        let Some(ix) = self.index() else { return };
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            match on_file(&ix, &path, |ix, id| ix.index_file(id)) {
                Ok(s) => info!(path = %path.display(), chunks = s.chunks,
                    data = s.data_chunks, "dedup index: disk hashed"),
                Err(e) => warn!(path = %path.display(), "dedup index: {e}"),
            }
        });
    }

    /// A VM stopped here: re-hash the chunks it wrote while it ran (its export is gone, so
    /// they hold their final bytes), in the background. A running disk's rows go stale as
    /// the guest writes; this refreshes them without touching the write path.
    pub fn note_written(&self, rt: &crate::runtime::RunningVm) {
        let Some(ix) = self.index() else { return };
        if rt.quiesced.get().is_none() {
            return;
        }
        let chunks: Vec<u64> = (0..rt.since_start.chunk_count())
            .filter(|&c| rt.since_start.is_dirty(c))
            .collect();
        if chunks.is_empty() {
            return;
        }
        let path = rt.disk_path();
        tokio::task::spawn_blocking(move || {
            match on_file(&ix, &path, |ix, id| ix.index_chunks(id, &chunks)) {
                Ok(s) => info!(path = %path.display(), chunks = s.chunks,
                    "dedup index: chunks the stopped VM wrote re-hashed"),
                Err(e) => warn!(path = %path.display(), "dedup index: {e}"),
            }
        });
    }

    /// `path` is gone (or about to be replaced): forget its rows.
    pub fn forget_disk(&self, path: &Path) {
        let Some(ix) = self.index() else { return };
        let id = file_id(path);
        let mut ix = ix.write().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = ix.forget_file(id) {
            warn!(path = %path.display(), "dedup index: {e}");
        }
    }

    /// A migration receiver's hashes for `vm`, kept until the disk reaches its final path.
    pub fn hold_received(&self, vm: &str, rows: Vec<(u64, [u8; 32])>) {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.to_string(), rows);
    }

    /// The received disk of `vm` now lives at `path`: index it from the receiver's hashes.
    pub fn adopt_received(&self, vm: &str, path: &Path) {
        let rows = self
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm);
        if let Some(rows) = rows {
            self.note_disk(path, rows);
        }
    }
}

/// Record that chunks of `path` now hold these hashes (blocking; zero hashes drop rows).
/// Errors are logged: the index is a hint, a missing row costs bytes, never data.
pub fn record_rows(ix: &SharedIndex, path: &Path, rows: &[(u64, [u8; 32])]) {
    let id = file_id(path);
    let zero = zero_hash(CHUNK_SIZE as usize);
    let rows: Vec<(Location, ChunkState)> = rows
        .iter()
        .map(|&(chunk, h)| {
            let state = if h == zero {
                ChunkState::Zero
            } else {
                ChunkState::Data(h)
            };
            (Location { file: id, chunk }, state)
        })
        .collect();
    if let Err(e) = on_file(ix, path, |ix, _| ix.record_many(&rows)) {
        warn!(path = %path.display(), "dedup index: {e}");
    }
}

/// Run `f` on the index with `path` tracked (blocking): the file set changes under the
/// write lock, the work itself under the read lock (redb serialises its writes).
fn on_file<T>(
    ix: &SharedIndex,
    path: &Path,
    f: impl FnOnce(&ChunkIndex, FileId) -> roam_store::Result<T>,
) -> roam_store::Result<T> {
    let id = file_id(path);
    ix.write()
        .unwrap_or_else(|e| e.into_inner())
        .track_file(id, path.to_path_buf())?;
    f(&ix.read().unwrap_or_else(|e| e.into_inner()), id)
}

/// Every disk file this host holds, from its state store: VM disks (running, stopped or
/// kept after a move) and replicas.
pub fn disks_of(d: &crate::state::Store) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(vms) = d.vms() {
        out.extend(vms.into_iter().map(|v| PathBuf::from(v.disk_path)));
    }
    if let Ok(reps) = d.replicas() {
        out.extend(reps.into_iter().map(|r| PathBuf::from(r.dir).join("disk")));
    }
    out.sort();
    out.dedup();
    out
}
