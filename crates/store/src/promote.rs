//! [`Promoted`]: a disk file lent, in place, to a writer that may have to give it back.
//!
//! A host holding a replica (or the copy it kept when the VM left) of a disk that migrates
//! back to it lets the migration write that very file instead of copying it first: the
//! file is renamed to the migration's path, and every chunk the migration overwrites for
//! the first time is saved in an **undo log** before it is written. If the migration
//! commits, the log is dropped; if it fails, or the host crashes meanwhile, the log is
//! played back and the file renamed home, so it is again exactly the state it was lent in.
//!
//! ```text
//!  promote:   1 undo log := header; fsync                    (debris until 2)
//!             2 marker := {home, at, log, geometry}          ◀── from here recovery rolls back
//!             3 rename home → at; fsync both directories
//!  write(c):  pre-image of c already in the log? write c now. Else queue c (reads see
//!             the queue); when the queue is full, or on `flush`/`sync`:
//!             4 append the pre-images of the queued chunks  5 fsync log  6 write them
//!  keep:      flush, fsync disk; 7 remove marker             ◀── commit: the file stays at `at`
//!             8 remove log
//!  roll back: 9 write every logged pre-image back  10 fsync disk
//!             11 rename at → home; fsync    12 remove marker  13 remove log
//! ```
//!
//! **Why it is exact.** A chunk is overwritten only after its pre-image is durable in the
//! log (step 5 before 6), and only its *first* overwrite is logged, so every pre-image is
//! the chunk as lent. Rolling back writes those pre-images, which is idempotent: a crash
//! during a roll back is recovered by rolling back again. Records appended after the last
//! fsync may be torn; each carries its own BLAKE3, and the first one that does not verify
//! ends the log. That loses nothing: the chunks of an unsynced record were never written.
//! (The same rule cannot tell a torn tail from a record damaged *before* the last fsync;
//! such damage would leave that chunk as the migration wrote it.)
//!
//! **Crash recovery** ([`recover`]) needs only the marker: the file is at `at` (roll back
//! and rename home), at `home` (a roll back interrupted after its rename: roll back again,
//! idempotent), or at neither, which cannot happen unless something else removed it (an
//! error, never a guess). After step 7 there is nothing to recover: the file belongs to
//! the migration.
//!
//! Zero chunks are punched as holes (both ways), so a sparse file stays sparse.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::chunkmap::{check_geometry, is_zero};
use crate::envelope::{self, Kind};
use crate::error::{Result, StoreError};
use crate::io::read_full_at;
use crate::replica::{FaultHook, Step};

const MARKER: Kind = Kind {
    what: "promotion marker",
    magic: 0x524F_504D, // "ROPM"
    version: 1,
    min_version: 1,
    cap: 16 * 1024,
};

const LOG_MAGIC: u32 = 0x524F_554C; // "ROUL"
const LOG_VERSION: u16 = 1;
/// magic u32 | version u16 | disk bytes u64 | chunk size u32 | BLAKE3 of those 18 bytes.
const LOG_HEADER: usize = 18 + 32;
/// chunk u64 | kind u8 | length u32, then the body (data records), then BLAKE3 of both.
const REC_HEADER: usize = 13;
const REC_SUM: usize = 32;
const REC_DATA: u8 = 1;
const REC_ZERO: u8 = 2;

/// Bytes of queued writes held in memory before a flush (one fsync per flush).
pub const DEFAULT_QUEUE_BYTES: usize = 8 << 20;

/// Where a promoted file lives and what describes it. All on one filesystem: the file is
/// renamed, never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotePaths {
    /// Where the file lives when it is not lent out (e.g. `replicas/VM/disk`).
    pub home: PathBuf,
    /// Where the borrower writes it (e.g. `incoming/VM/disk.raw`).
    pub at: PathBuf,
    /// The marker whose presence says "lent out: roll back after a crash".
    pub marker: PathBuf,
    /// The undo log.
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    paths: PromotePaths,
    disk_bytes: u64,
    chunk_size: u32,
}

impl Marker {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&self.disk_bytes.to_be_bytes());
        p.extend_from_slice(&self.chunk_size.to_be_bytes());
        let ps = &self.paths;
        for path in [&ps.home, &ps.at, &ps.marker, &ps.log] {
            let b = path.as_os_str().as_bytes();
            p.extend_from_slice(&(b.len() as u32).to_be_bytes());
            p.extend_from_slice(b);
        }
        p
    }

    fn decode(mut p: &[u8]) -> Result<Marker> {
        fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
            if p.len() < n {
                return Err(bad_marker("truncated"));
            }
            let (a, b) = p.split_at(n);
            *p = b;
            Ok(a)
        }
        let mut u64b = [0u8; 8];
        u64b.copy_from_slice(take(&mut p, 8)?);
        let disk_bytes = u64::from_be_bytes(u64b);
        let mut u32b = [0u8; 4];
        u32b.copy_from_slice(take(&mut p, 4)?);
        let chunk_size = u32::from_be_bytes(u32b);
        check_geometry(disk_bytes, chunk_size)?;
        let mut path = |p: &mut &[u8]| -> Result<PathBuf> {
            u32b.copy_from_slice(take(p, 4)?);
            let n = u32::from_be_bytes(u32b) as usize;
            let b = take(p, n)?;
            if b.is_empty() {
                return Err(bad_marker("empty path"));
            }
            Ok(PathBuf::from(std::ffi::OsStr::from_bytes(b)))
        };
        let paths = PromotePaths {
            home: path(&mut p)?,
            at: path(&mut p)?,
            marker: path(&mut p)?,
            log: path(&mut p)?,
        };
        if !p.is_empty() {
            return Err(bad_marker("trailing bytes"));
        }
        Ok(Marker {
            paths,
            disk_bytes,
            chunk_size,
        })
    }
}

fn bad_marker(detail: &str) -> StoreError {
    StoreError::Malformed {
        what: MARKER.what,
        detail: detail.into(),
    }
}

fn bad_log(detail: String) -> StoreError {
    StoreError::Malformed {
        what: "undo log",
        detail,
    }
}

fn log_header(disk_bytes: u64, chunk_size: u32) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[0..4].copy_from_slice(&LOG_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&LOG_VERSION.to_be_bytes());
    h[6..14].copy_from_slice(&disk_bytes.to_be_bytes());
    h[14..18].copy_from_slice(&chunk_size.to_be_bytes());
    let sum = blake3::hash(&h[..18]);
    h[18..].copy_from_slice(sum.as_bytes());
    h
}

/// A queued write whose pre-image is not in the log yet.
#[derive(Debug, Clone)]
enum Pending {
    Data(Vec<u8>),
    Zero,
}

/// What a roll back did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolledBack {
    /// Chunks written back from the log.
    pub restored: u64,
    /// Bytes at the log's end that did not verify (a tail torn by a crash).
    pub torn_bytes: u64,
}

/// A file lent out under an undo log (see the module doc). Every write to it goes through
/// here; reads see queued writes.
pub struct Promoted {
    m: Marker,
    disk: File,
    log: File,
    log_len: u64,
    /// Log length at the last fsync: what a crash cannot tear.
    synced_len: u64,
    /// One bit per chunk: its pre-image is durable in the log.
    saved: Vec<u64>,
    queue: BTreeMap<u64, Pending>,
    queued_bytes: usize,
    queue_cap: usize,
    hook: Box<dyn FaultHook>,
    /// A durable step failed half-way: only a roll back (or a recovery) may follow.
    broken: bool,
    saved_chunks: u64,
}

impl std::fmt::Debug for Promoted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promoted")
            .field("paths", &self.m.paths)
            .field("saved_chunks", &self.saved_chunks)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Promoted {
    /// Lend the file at `paths.home` (holding a disk of `disk_bytes` in chunks of
    /// `chunk_size`) to a writer at `paths.at` (steps 1–3).
    pub fn promote(
        paths: PromotePaths,
        disk_bytes: u64,
        chunk_size: u32,
        mut hook: Box<dyn FaultHook>,
    ) -> Result<Promoted> {
        check_geometry(disk_bytes, chunk_size)?;
        if paths.marker.exists() {
            return Err(StoreError::Promoted(paths.marker.clone()));
        }
        if paths.at.exists() {
            return Err(StoreError::Replica(format!(
                "cannot promote to {}: a file is there",
                paths.at.display()
            )));
        }
        let len = std::fs::metadata(&paths.home)
            .map_err(|e| StoreError::io("stat", &paths.home, e))?
            .len();
        if len > disk_bytes {
            return Err(StoreError::Geometry {
                detail: format!(
                    "{} holds {len} bytes, the disk {disk_bytes}",
                    paths.home.display()
                ),
            });
        }
        hook.before(Step::UndoLogCreate)?;
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.log)
            .map_err(|e| StoreError::io("create", &paths.log, e))?;
        log.write_all_at(&log_header(disk_bytes, chunk_size), 0)
            .map_err(|e| StoreError::io("write", &paths.log, e))?;
        log.sync_all()
            .map_err(|e| StoreError::io("fsync", &paths.log, e))?;
        envelope::sync_dir(&paths.log)?;
        let m = Marker {
            paths,
            disk_bytes,
            chunk_size,
        };
        hook.before(Step::PromoteMarker)?;
        envelope::write_file(&MARKER, &m.paths.marker, &m.encode())?;
        hook.before(Step::PromoteRename)?;
        rename_durably(&m.paths.home, &m.paths.at)?;
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&m.paths.at)
            .map_err(|e| StoreError::io("open", &m.paths.at, e))?;
        let chunks = disk_bytes.div_ceil(u64::from(chunk_size));
        Ok(Promoted {
            m,
            disk,
            log,
            log_len: LOG_HEADER as u64,
            synced_len: LOG_HEADER as u64,
            saved: vec![0; chunks.div_ceil(64) as usize],
            queue: BTreeMap::new(),
            queued_bytes: 0,
            queue_cap: DEFAULT_QUEUE_BYTES,
            hook,
            broken: false,
            saved_chunks: 0,
        })
    }

    /// Flush after this many bytes of queued writes (at least one chunk).
    pub fn with_queue_bytes(mut self, bytes: usize) -> Promoted {
        self.queue_cap = bytes.max(1);
        self
    }

    pub fn paths(&self) -> &PromotePaths {
        &self.m.paths
    }

    /// Chunks whose pre-image is in the log.
    pub fn saved_chunks(&self) -> u64 {
        self.saved_chunks
    }

    /// Log bytes made durable so far (what a crash cannot tear).
    pub fn synced_log_len(&self) -> u64 {
        self.synced_len
    }

    fn chunks(&self) -> u64 {
        self.m.disk_bytes.div_ceil(u64::from(self.m.chunk_size))
    }

    /// Offset and length of `chunk`.
    pub fn range(&self, chunk: u64) -> Result<(u64, usize)> {
        let n = self.chunks();
        if chunk >= n {
            return Err(StoreError::ChunkOutOfRange { chunk, chunks: n });
        }
        let cs = u64::from(self.m.chunk_size);
        let off = chunk * cs;
        Ok((off, (self.m.disk_bytes - off).min(cs) as usize))
    }

    fn is_saved(&self, chunk: u64) -> bool {
        self.saved[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    fn usable(&self) -> Result<()> {
        if self.broken {
            return Err(StoreError::Replica(
                "promoted disk failed in the middle of a step; roll it back".into(),
            ));
        }
        Ok(())
    }

    /// Write `data` as chunk `chunk` (its full length). All-zero data punches a hole.
    pub fn write(&mut self, chunk: u64, data: &[u8]) -> Result<()> {
        let (_, len) = self.range(chunk)?;
        if data.len() != len {
            return Err(StoreError::Replica(format!(
                "chunk {chunk}: {} bytes, expected {len}",
                data.len()
            )));
        }
        if is_zero(data) {
            return self.put(chunk, Pending::Zero);
        }
        self.put(chunk, Pending::Data(data.to_vec()))
    }

    /// Make chunk `chunk` read as zeroes (a hole).
    pub fn zero(&mut self, chunk: u64) -> Result<()> {
        self.range(chunk)?;
        self.put(chunk, Pending::Zero)
    }

    fn put(&mut self, chunk: u64, p: Pending) -> Result<()> {
        self.usable()?;
        if self.is_saved(chunk) {
            // Its pre-image is durable already: this is not a first overwrite.
            return self.apply(chunk, &p);
        }
        // Zero writes still count a little, so a stream of them flushes too.
        let cost = |p: &Pending| match p {
            Pending::Data(d) => d.len().max(64),
            Pending::Zero => 64,
        };
        self.queued_bytes += cost(&p);
        if let Some(old) = self.queue.insert(chunk, p) {
            self.queued_bytes -= cost(&old);
        }
        if self.queued_bytes >= self.queue_cap {
            self.flush()?;
        }
        Ok(())
    }

    /// Read chunk `chunk` as the borrower last wrote it (queued writes included).
    pub fn read(&self, chunk: u64, buf: &mut [u8]) -> Result<()> {
        let (off, len) = self.range(chunk)?;
        if buf.len() != len {
            return Err(StoreError::Replica(format!(
                "buffer of {} for a chunk of {len}",
                buf.len()
            )));
        }
        match self.queue.get(&chunk) {
            Some(Pending::Data(d)) => buf.copy_from_slice(d),
            Some(Pending::Zero) => buf.fill(0),
            None => read_full_at(&self.disk, buf, off)
                .map_err(|e| StoreError::io("read", &self.m.paths.at, e))?,
        }
        Ok(())
    }

    /// Steps 4–6 for every queued write.
    pub fn flush(&mut self) -> Result<()> {
        self.usable()?;
        if self.queue.is_empty() {
            return Ok(());
        }
        let r = self.flush_inner();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn flush_inner(&mut self) -> Result<()> {
        let queue = std::mem::take(&mut self.queue);
        self.queued_bytes = 0;
        let mut buf = vec![0u8; self.m.chunk_size as usize];
        for &chunk in queue.keys() {
            let (off, len) = self.range(chunk)?;
            let pre = &mut buf[..len];
            read_full_at(&self.disk, pre, off)
                .map_err(|e| StoreError::io("read", &self.m.paths.at, e))?;
            let (kind, body) = if is_zero(pre) {
                (REC_ZERO, &[][..])
            } else {
                (REC_DATA, &pre[..])
            };
            let mut rec = Vec::with_capacity(REC_HEADER + body.len() + REC_SUM);
            rec.extend_from_slice(&chunk.to_be_bytes());
            rec.push(kind);
            rec.extend_from_slice(&(len as u32).to_be_bytes());
            rec.extend_from_slice(body);
            let sum = blake3::hash(&rec);
            rec.extend_from_slice(sum.as_bytes());
            self.hook.before(Step::UndoSave { chunk })?;
            self.log
                .write_all_at(&rec, self.log_len)
                .map_err(|e| StoreError::io("append", &self.m.paths.log, e))?;
            self.log_len += rec.len() as u64;
        }
        self.hook.before(Step::UndoSync)?;
        self.log
            .sync_data()
            .map_err(|e| StoreError::io("fsync", &self.m.paths.log, e))?;
        self.synced_len = self.log_len;
        for (chunk, p) in &queue {
            self.saved[(chunk / 64) as usize] |= 1 << (chunk % 64);
            self.saved_chunks += 1;
            self.apply(*chunk, p)?;
        }
        Ok(())
    }

    fn apply(&mut self, chunk: u64, p: &Pending) -> Result<()> {
        let (off, len) = self.range(chunk)?;
        self.hook.before(Step::PromotedWrite { chunk })?;
        let at = &self.m.paths.at;
        match p {
            Pending::Data(d) => self
                .disk
                .write_all_at(d, off)
                .map_err(|e| StoreError::io("write", at, e)),
            Pending::Zero => {
                punch(&self.disk, off, len).map_err(|e| StoreError::io("clear", at, e))
            }
        }
    }

    /// Flush and make the file durable.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.hook.before(Step::PromotedSync)?;
        self.disk
            .sync_data()
            .map_err(|e| StoreError::io("fsync", &self.m.paths.at, e))
    }

    /// Commit (steps 7–8): the file now belongs to the borrower, at `paths().at`, with
    /// every write made durable. Nothing can be rolled back after this.
    pub fn keep(mut self) -> Result<PathBuf> {
        self.sync()?;
        self.hook.before(Step::PromoteDrop)?;
        remove_durably(&self.m.paths.marker)?;
        // Debris once the marker is gone; the next promotion truncates it anyway.
        let _ = std::fs::remove_file(&self.m.paths.log);
        Ok(self.m.paths.at.clone())
    }

    /// Give the file back exactly as lent (steps 9–13). Queued writes are dropped: they
    /// never reached the file.
    pub fn roll_back(self) -> Result<RolledBack> {
        let Promoted { m, disk, hook, .. } = self;
        drop(disk);
        restore(&m, &m.paths.at, hook)
    }
}

/// Roll back a promotion a crash interrupted, if `marker` exists (see the module doc).
pub fn recover(marker: &Path, hook: Box<dyn FaultHook>) -> Result<Option<RolledBack>> {
    if !marker.exists() {
        return Ok(None);
    }
    let (_, p) = envelope::read_file(&MARKER, marker)?;
    let m = Marker::decode(&p)?;
    if m.paths.marker != marker {
        return Err(bad_marker("names another marker path"));
    }
    let disk = if m.paths.at.exists() {
        m.paths.at.clone()
    } else if m.paths.home.exists() {
        m.paths.home.clone()
    } else {
        return Err(StoreError::Replica(format!(
            "promoted disk is neither at {} nor at {}",
            m.paths.at.display(),
            m.paths.home.display()
        )));
    };
    restore(&m, &disk, hook).map(Some)
}

/// Steps 9–13 on the file at `disk` (`at`, or `home` when a roll back already renamed it).
fn restore(m: &Marker, disk_path: &Path, mut hook: Box<dyn FaultHook>) -> Result<RolledBack> {
    let ps = &m.paths;
    let disk = OpenOptions::new()
        .write(true)
        .open(disk_path)
        .map_err(|e| StoreError::io("open", disk_path, e))?;
    let log = File::open(&ps.log).map_err(|e| StoreError::io("open", &ps.log, e))?;
    let log_len = log
        .metadata()
        .map_err(|e| StoreError::io("stat", &ps.log, e))?
        .len();
    // The header was durable before the marker existed: damage there is not a torn tail.
    let mut h = [0u8; LOG_HEADER];
    read_full_at(&log, &mut h, 0).map_err(|e| StoreError::io("read", &ps.log, e))?;
    if h != log_header(m.disk_bytes, m.chunk_size) {
        return Err(bad_log("header does not match the marker".into()));
    }
    let cs = u64::from(m.chunk_size);
    let chunks = m.disk_bytes.div_ceil(cs);
    let mut pos = LOG_HEADER as u64;
    let mut out = RolledBack::default();
    let mut body = vec![0u8; m.chunk_size as usize];
    let mut sum = [0u8; REC_SUM];
    while pos < log_len {
        let mut rh = [0u8; REC_HEADER];
        if log_len - pos < (REC_HEADER + REC_SUM) as u64 {
            break;
        }
        log.read_exact_at(&mut rh, pos)
            .map_err(|e| StoreError::io("read", &ps.log, e))?;
        let mut cb = [0u8; 8];
        cb.copy_from_slice(&rh[..8]);
        let chunk = u64::from_be_bytes(cb);
        let kind = rh[8];
        let len = u32::from_be_bytes([rh[9], rh[10], rh[11], rh[12]]) as usize;
        // A torn record may hold any bytes: check the fields before trusting the length.
        let natural = (chunk < chunks).then(|| (m.disk_bytes - chunk * cs).min(cs) as usize);
        let body_len = match kind {
            REC_DATA => len,
            REC_ZERO => 0,
            _ => break,
        };
        if natural != Some(len) || log_len - pos < (REC_HEADER + body_len + REC_SUM) as u64 {
            break;
        }
        let b = &mut body[..body_len];
        log.read_exact_at(b, pos + REC_HEADER as u64)
            .map_err(|e| StoreError::io("read", &ps.log, e))?;
        log.read_exact_at(&mut sum, pos + (REC_HEADER + body_len) as u64)
            .map_err(|e| StoreError::io("read", &ps.log, e))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&rh);
        hasher.update(b);
        if *hasher.finalize().as_bytes() != sum {
            break;
        }
        hook.before(Step::UndoRestore { chunk })?;
        let off = chunk * cs;
        if kind == REC_DATA {
            disk.write_all_at(b, off)
        } else {
            punch(&disk, off, len)
        }
        .map_err(|e| StoreError::io("restore", disk_path, e))?;
        out.restored += 1;
        pos += (REC_HEADER + body_len + REC_SUM) as u64;
    }
    out.torn_bytes = log_len - pos;
    hook.before(Step::UndoDiskSync)?;
    disk.sync_data()
        .map_err(|e| StoreError::io("fsync", disk_path, e))?;
    drop(disk);
    if disk_path != ps.home {
        hook.before(Step::UndoRename)?;
        rename_durably(disk_path, &ps.home)?;
    }
    hook.before(Step::UndoDrop)?;
    remove_durably(&ps.marker)?;
    let _ = std::fs::remove_file(&ps.log);
    Ok(out)
}

fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| StoreError::io("rename", from, e))?;
    envelope::sync_dir(to)?;
    if from.parent() != to.parent() {
        envelope::sync_dir(from)?;
    }
    Ok(())
}

fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("remove", path, e)),
    }
    envelope::sync_dir(path)
}

/// Make a range read as zeroes: punch a hole, or write zeroes where holes are unsupported.
/// (Also the migration receiver's, for the chunks it clears.)
pub fn punch(file: &File, off: u64, len: usize) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments; no memory
    // is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    file.write_all_at(&vec![0u8; len], off)
}

#[cfg(test)]
#[path = "promote_tests.rs"]
mod tests;
