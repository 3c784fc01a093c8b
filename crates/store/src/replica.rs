//! [`ReplicaWriter`]: the receiving side of replication. It keeps a raw disk file that is,
//! after every [`ReplicaWriter::open`], exactly a state the source's disk had at a cut
//! (`crate::cut`): batches are staged in a redo journal and become visible all at once.
//!
//! ```text
//!  dir/disk      the replica (raw, what QEMU will open after a migration)
//!  dir/journal   redo log of the batch being received: records chunk|kind|len|bytes
//!  dir/record    small sealed file (envelope, atomic replace): applied batch, and
//!                "committing: batch, journal length, journal BLAKE3" while one is applied
//!
//!  begin(batch) ─▶ stage(chunk, bytes)* ─▶ commit():
//!     1 fsync journal
//!     2 record := {applied: old, committing: batch+len+hash}   ◀── the commit point
//!     3 apply journal records to disk (pwrite)                    (redo: idempotent)
//!     4 fsync disk
//!     5 record := {applied: batch}
//!     6 truncate journal
//! ```
//!
//! A crash before step 2 leaves the disk untouched and the record naming the old batch:
//! `open` discards the journal. A crash after step 2 leaves a durable, checksummed
//! journal and a record saying to redo it: `open` re-applies it (a partly applied disk
//! is overwritten with the same bytes), so the disk ends as the new batch. Either way the
//! disk is the old or the new state, never a mix — provided nobody reads it between the
//! crash and `open`, which is why only `open` hands it out.
//!
//! The generation rule (one writer): a batch names the primary's generation and id. A
//! batch from an older generation is refused (a stale primary); one from the same
//! generation but another primary is split brain, refused and reported; a newer
//! generation is accepted (the VM moved) and from then on the old one is stale.
//!
//! A migration arriving at a replica's host borrows the disk in place
//! ([`ReplicaWriter::promote`], `crate::promote`): `dir/promoted` marks it lent and
//! `dir/undo` holds the pre-images of what the migration overwrote, so a failed migration
//! or a crash gives the replica back as exactly its committed batch.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunkmap::{check_geometry, is_zero};
use crate::envelope::{self, Kind};
use crate::error::{Result, StoreError};
use crate::io::PosReader;
use crate::promote::{PromotePaths, Promoted, RolledBack};

const RECORD: Kind = Kind {
    what: "replica record",
    magic: 0x524F_5252, // "RORR"
    version: 1,
    min_version: 1,
    cap: 1024,
};

/// Longest primary id (a host name or key fingerprint).
pub const MAX_PRIMARY_LEN: usize = 255;

const REC_DATA: u8 = 1;
const REC_ZERO: u8 = 2;
const REC_HEADER: usize = 13;

/// Order of batches: generation first (it rises at each migration), then the primary's
/// batch number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Version {
    pub generation: u64,
    pub seq: u64,
}

/// One batch as the primary names it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchId {
    pub version: Version,
    /// Which host is primary at this generation.
    pub primary: String,
    /// The source's FLUSH count at the cut (for lag reports; not used for ordering, it
    /// restarts with the daemon).
    pub flush_epoch: u64,
}

/// A durable step of the writer, where a fault hook may simulate a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    JournalWrite { record: u64 },
    JournalSync,
    CommitRecord,
    Apply { chunk: u64 },
    DiskSync,
    AppliedRecord,
    JournalReset,
    // A promoted disk (`crate::promote`): lending it out ...
    UndoLogCreate,
    PromoteMarker,
    PromoteRename,
    // ... first overwrites: pre-images, then the writes ...
    UndoSave { chunk: u64 },
    UndoSync,
    PromotedWrite { chunk: u64 },
    PromotedSync,
    // ... and the end: kept (commit), or rolled back.
    PromoteDrop,
    UndoRestore { chunk: u64 },
    UndoDiskSync,
    UndoRename,
    UndoDrop,
}

/// Called before every durable step; an error stops the writer there, as a crash would.
pub trait FaultHook: Send {
    fn before(&mut self, step: Step) -> Result<()>;
}

/// No faults (production).
#[derive(Debug, Default)]
pub struct NoFaults;

impl FaultHook for NoFaults {
    fn before(&mut self, _: Step) -> Result<()> {
        Ok(())
    }
}

/// Crash at step number `at` (counted from 0 across the writer's life); counts steps.
#[derive(Debug, Default)]
pub struct CrashAt {
    pub at: Option<u64>,
    pub seen: u64,
}

impl FaultHook for CrashAt {
    fn before(&mut self, step: Step) -> Result<()> {
        let n = self.seen;
        self.seen += 1;
        if self.at == Some(n) {
            return Err(StoreError::InjectedCrash(format!("{step:?}")));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Committing {
    batch: BatchId,
    journal_len: u64,
    journal_sum: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    disk_bytes: u64,
    chunk_size: u32,
    applied: BatchId,
    committing: Option<Committing>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&self.disk_bytes.to_be_bytes());
        p.extend_from_slice(&u64::from(self.chunk_size).to_be_bytes());
        put_batch(&mut p, &self.applied);
        match &self.committing {
            None => p.push(0),
            Some(c) => {
                p.push(1);
                put_batch(&mut p, &c.batch);
                p.extend_from_slice(&c.journal_len.to_be_bytes());
                p.extend_from_slice(&c.journal_sum);
            }
        }
        p
    }

    fn decode(p: &[u8]) -> Result<Record> {
        let mut r = Cursor { p };
        let disk_bytes = r.u64()?;
        let cs = r.u64()?;
        let chunk_size = u32::try_from(cs).map_err(|_| bad(format!("chunk size {cs}")))?;
        check_geometry(disk_bytes, chunk_size)?;
        let applied = r.batch()?;
        let committing = match r.u8()? {
            0 => None,
            1 => {
                let batch = r.batch()?;
                let journal_len = r.u64()?;
                let mut journal_sum = [0u8; 32];
                journal_sum.copy_from_slice(r.take(32)?);
                Some(Committing {
                    batch,
                    journal_len,
                    journal_sum,
                })
            }
            t => return Err(bad(format!("committing tag {t}"))),
        };
        if !r.p.is_empty() {
            return Err(bad("trailing bytes".into()));
        }
        Ok(Record {
            disk_bytes,
            chunk_size,
            applied,
            committing,
        })
    }
}

fn put_batch(p: &mut Vec<u8>, b: &BatchId) {
    p.extend_from_slice(&b.version.generation.to_be_bytes());
    p.extend_from_slice(&b.version.seq.to_be_bytes());
    p.extend_from_slice(&b.flush_epoch.to_be_bytes());
    p.push(b.primary.len() as u8);
    p.extend_from_slice(b.primary.as_bytes());
}

fn bad(detail: String) -> StoreError {
    StoreError::Malformed {
        what: RECORD.what,
        detail,
    }
}

struct Cursor<'a> {
    p: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.p.len() < n {
            return Err(bad("truncated".into()));
        }
        let (a, b) = self.p.split_at(n);
        self.p = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn batch(&mut self) -> Result<BatchId> {
        let generation = self.u64()?;
        let seq = self.u64()?;
        let flush_epoch = self.u64()?;
        let n = self.u8()? as usize;
        let primary = std::str::from_utf8(self.take(n)?)
            .map_err(|_| bad("primary is not UTF-8".into()))?
            .to_string();
        Ok(BatchId {
            version: Version { generation, seq },
            primary,
            flush_epoch,
        })
    }
}

/// What `open` did to bring the replica to a committed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub applied: BatchId,
    /// A committed batch was re-applied from the journal.
    pub redone: bool,
    /// Bytes of an uncommitted batch thrown away.
    pub discarded: u64,
}

struct Staging {
    batch: BatchId,
    len: u64,
    records: u64,
    hasher: blake3::Hasher,
    /// chunk → journal offset of its latest record (for `read_staged`).
    latest: BTreeMap<u64, u64>,
}

/// The receiver of one replica.
pub struct ReplicaWriter {
    dir: PathBuf,
    disk: File,
    journal: File,
    record: Record,
    staging: Option<Staging>,
    hook: Box<dyn FaultHook>,
    /// Set after any failure inside a durable sequence: the writer must be reopened.
    broken: bool,
}

impl std::fmt::Debug for ReplicaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWriter")
            .field("dir", &self.dir)
            .field("applied", &self.record.applied)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("disk"), dir.join("journal"), dir.join("record"))
}

impl ReplicaWriter {
    /// A new, empty (all-zero, sparse) replica in `dir`, which must not hold one already.
    pub fn create(dir: &Path, disk_bytes: u64, chunk_size: u32) -> Result<()> {
        check_geometry(disk_bytes, chunk_size)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create dir", dir, e))?;
        let (d, j, r) = paths(dir);
        if r.exists() {
            return Err(StoreError::Replica(format!(
                "{} already holds a replica",
                dir.display()
            )));
        }
        let disk = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&d)
            .map_err(|e| StoreError::io("create", &d, e))?;
        disk.set_len(disk_bytes)
            .map_err(|e| StoreError::io("size", &d, e))?;
        disk.sync_all()
            .map_err(|e| StoreError::io("fsync", &d, e))?;
        File::create(&j).map_err(|e| StoreError::io("create", &j, e))?;
        let rec = Record {
            disk_bytes,
            chunk_size,
            applied: BatchId::default(),
            committing: None,
        };
        envelope::write_file(&RECORD, &r, &rec.encode())
    }

    /// Open a replica and bring it to its last committed batch (see the module doc).
    /// A replica whose disk is lent to a migration is refused (`StoreError::Promoted`):
    /// [`recover_promotion`] gives it back first.
    pub fn open(dir: &Path, hook: Box<dyn FaultHook>) -> Result<(ReplicaWriter, Recovery)> {
        let (d, j, r) = paths(dir);
        let marker = promotion_marker(dir);
        if marker.exists() {
            return Err(StoreError::Promoted(marker));
        }
        let (_, p) = envelope::read_file(&RECORD, &r)?;
        let record = Record::decode(&p)?;
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d)
            .map_err(|e| StoreError::io("open", &d, e))?;
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&j)
            .map_err(|e| StoreError::io("open", &j, e))?;
        let mut w = ReplicaWriter {
            dir: dir.to_path_buf(),
            disk,
            journal,
            record,
            staging: None,
            hook,
            broken: false,
        };
        let rec = w.recover()?;
        Ok((w, rec))
    }

    fn recover(&mut self) -> Result<Recovery> {
        let (_, j, _) = paths(&self.dir);
        match self.record.committing.clone() {
            Some(c) => {
                self.verify_journal(&c)?;
                self.apply_and_retire(c)?;
                Ok(Recovery {
                    applied: self.record.applied.clone(),
                    redone: true,
                    discarded: 0,
                })
            }
            None => {
                let len = self
                    .journal
                    .metadata()
                    .map_err(|e| StoreError::io("stat", &j, e))?
                    .len();
                self.hook.before(Step::JournalReset)?;
                self.journal
                    .set_len(0)
                    .map_err(|e| StoreError::io("truncate", &j, e))?;
                Ok(Recovery {
                    applied: self.record.applied.clone(),
                    redone: false,
                    discarded: len,
                })
            }
        }
    }

    fn verify_journal(&self, c: &Committing) -> Result<()> {
        let (_, j, _) = paths(&self.dir);
        let len = self
            .journal
            .metadata()
            .map_err(|e| StoreError::io("stat", &j, e))?
            .len();
        if len < c.journal_len {
            return Err(StoreError::Truncated {
                what: "replica journal",
                have: len,
                need: c.journal_len,
            });
        }
        let mut h = blake3::Hasher::new();
        let mut rd = BufReader::new(PosReader {
            file: &self.journal,
            pos: 0,
            end: c.journal_len,
        });
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = read_some(&mut rd, &mut buf).map_err(|e| StoreError::io("read", &j, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if *h.finalize().as_bytes() != c.journal_sum {
            return Err(StoreError::Checksum {
                what: "replica journal",
            });
        }
        Ok(())
    }

    pub fn applied(&self) -> &BatchId {
        &self.record.applied
    }

    pub fn disk_bytes(&self) -> u64 {
        self.record.disk_bytes
    }

    pub fn chunk_size(&self) -> u32 {
        self.record.chunk_size
    }

    pub fn chunk_count(&self) -> u64 {
        self.record
            .disk_bytes
            .div_ceil(u64::from(self.record.chunk_size))
    }

    /// Lend the replica's disk, in its committed state, to an incoming migration that
    /// writes it at `at` (same filesystem): renamed, not copied, under an undo log in the
    /// replica's directory (`crate::promote`). The writer is consumed, so no batch can
    /// reach the disk meanwhile; a batch being staged is dropped (the primary sends it
    /// again). After `Promoted::roll_back`, `open` the replica again: it is exactly the
    /// batch it was lent at.
    pub fn promote(self, at: &Path, hook: Box<dyn FaultHook>) -> Result<Promoted> {
        self.check_usable()?;
        if self.record.committing.is_some() {
            // Only `open`/`commit` leave the writer, and both retire a commit first.
            return Err(StoreError::Replica("a batch is being applied".into()));
        }
        let (disk_bytes, chunk_size) = (self.record.disk_bytes, self.record.chunk_size);
        let dir = self.dir.clone();
        drop(self);
        Promoted::promote(promote_paths(&dir, at), disk_bytes, chunk_size, hook)
    }

    /// Path of the replica's disk file (consistent whenever no batch is being applied).
    pub fn disk_path(&self) -> PathBuf {
        paths(&self.dir).0
    }

    fn chunk_len(&self, chunk: u64) -> Result<usize> {
        let n = self.chunk_count();
        if chunk >= n {
            return Err(StoreError::ChunkOutOfRange { chunk, chunks: n });
        }
        let cs = u64::from(self.record.chunk_size);
        Ok((self.record.disk_bytes - chunk * cs).min(cs) as usize)
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken {
            return Err(StoreError::Replica(
                "writer failed in the middle of a step; reopen it".into(),
            ));
        }
        Ok(())
    }

    /// Whether the primary naming `batch` may write this replica now.
    pub fn admits(&self, batch: &BatchId) -> Result<()> {
        let a = &self.record.applied;
        if batch.primary.len() > MAX_PRIMARY_LEN {
            return Err(StoreError::Replica("primary id too long".into()));
        }
        if batch.version.generation < a.version.generation {
            return Err(StoreError::StaleGeneration {
                seen: a.version.generation,
                offered: batch.version.generation,
            });
        }
        if batch.version.generation == a.version.generation
            && !a.primary.is_empty()
            && batch.primary != a.primary
        {
            return Err(StoreError::SplitBrain {
                generation: a.version.generation,
                existing: a.primary.clone(),
                offered: batch.primary.clone(),
            });
        }
        if batch.version <= a.version {
            return Err(StoreError::NotNewer {
                applied: (a.version.generation, a.version.seq),
                offered: (batch.version.generation, batch.version.seq),
            });
        }
        Ok(())
    }

    /// Start staging a batch (an unfinished one is discarded).
    pub fn begin(&mut self, batch: BatchId) -> Result<()> {
        self.check_usable()?;
        self.admits(&batch)?;
        let (_, j, _) = paths(&self.dir);
        self.journal
            .set_len(0)
            .map_err(|e| StoreError::io("truncate", &j, e))?;
        self.staging = Some(Staging {
            batch,
            len: 0,
            records: 0,
            hasher: blake3::Hasher::new(),
            latest: BTreeMap::new(),
        });
        Ok(())
    }

    /// Stage chunk `chunk` with its full content (all-zero content is stored as a zero
    /// record). The caller has checked the bytes against their hash.
    pub fn stage(&mut self, chunk: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        let want = self.chunk_len(chunk)?;
        if data.len() != want {
            return Err(StoreError::Replica(format!(
                "chunk {chunk}: {} bytes, expected {want}",
                data.len()
            )));
        }
        let (kind, body) = if is_zero(data) {
            (REC_ZERO, &[][..])
        } else {
            (REC_DATA, data)
        };
        let st = self
            .staging
            .as_mut()
            .ok_or_else(|| StoreError::Replica("stage without begin".into()))?;
        let mut rec = Vec::with_capacity(REC_HEADER + body.len());
        rec.extend_from_slice(&chunk.to_be_bytes());
        rec.push(kind);
        rec.extend_from_slice(&(want as u32).to_be_bytes());
        rec.extend_from_slice(body);
        if let Err(e) = self.hook.before(Step::JournalWrite { record: st.records }) {
            self.broken = true;
            return Err(e);
        }
        let (_, j, _) = paths(&self.dir);
        if let Err(e) = self.journal.write_all_at(&rec, st.len) {
            self.broken = true;
            return Err(StoreError::io("append", &j, e));
        }
        st.hasher.update(&rec);
        st.latest.insert(chunk, st.len);
        st.len += rec.len() as u64;
        st.records += 1;
        Ok(())
    }

    /// Read a chunk of the *committed* state (local copies for the transfer plan).
    pub fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.chunk_len(chunk)?;
        if buf.len() != n {
            return Err(StoreError::Replica(format!(
                "buffer of {} for {n}",
                buf.len()
            )));
        }
        let off = chunk * u64::from(self.record.chunk_size);
        crate::io::read_full_at(&self.disk, buf, off)
            .map_err(|e| StoreError::io("read", self.disk_path(), e))
    }

    /// Read the latest staged version of a chunk of the current batch (for `CopySent`).
    pub fn read_staged(&self, chunk: u64, buf: &mut [u8]) -> Result<bool> {
        let Some(off) = self.staging.as_ref().and_then(|s| s.latest.get(&chunk)) else {
            return Ok(false);
        };
        let n = self.chunk_len(chunk)?;
        if buf.len() != n {
            return Err(StoreError::Replica(format!(
                "buffer of {} for {n}",
                buf.len()
            )));
        }
        let (_, j, _) = paths(&self.dir);
        let mut h = [0u8; REC_HEADER];
        self.journal
            .read_exact_at(&mut h, *off)
            .map_err(|e| StoreError::io("read", &j, e))?;
        if h[8] == REC_ZERO {
            buf.fill(0);
        } else {
            self.journal
                .read_exact_at(buf, off + REC_HEADER as u64)
                .map_err(|e| StoreError::io("read", &j, e))?;
        }
        Ok(true)
    }

    /// Drop the batch being staged.
    pub fn abort(&mut self) {
        self.staging = None;
    }

    /// Make the staged batch the replica's state, atomically (steps 1–6 of the module doc).
    pub fn commit(&mut self) -> Result<BatchId> {
        self.check_usable()?;
        let st = self
            .staging
            .take()
            .ok_or_else(|| StoreError::Replica("commit without begin".into()))?;
        let r = self.commit_inner(st);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn commit_inner(&mut self, st: Staging) -> Result<BatchId> {
        let (_, j, r) = paths(&self.dir);
        self.hook.before(Step::JournalSync)?;
        self.journal
            .sync_data()
            .map_err(|e| StoreError::io("fsync", &j, e))?;
        let c = Committing {
            batch: st.batch,
            journal_len: st.len,
            journal_sum: *st.hasher.finalize().as_bytes(),
        };
        let rec = Record {
            committing: Some(c.clone()),
            ..self.record.clone()
        };
        self.hook.before(Step::CommitRecord)?;
        envelope::write_file(&RECORD, &r, &rec.encode())?;
        self.record = rec;
        self.apply_and_retire(c)?;
        Ok(self.record.applied.clone())
    }

    /// Steps 3–6: redo the journal into the disk, then retire it.
    fn apply_and_retire(&mut self, c: Committing) -> Result<()> {
        let (d, j, r) = paths(&self.dir);
        let chunks = self.chunk_count();
        let cs = u64::from(self.record.chunk_size);
        let mut rd = BufReader::new(PosReader {
            file: &self.journal,
            pos: 0,
            end: c.journal_len,
        });
        let mut body = vec![0u8; self.record.chunk_size as usize];
        let zero = vec![0u8; self.record.chunk_size as usize];
        loop {
            let mut h = [0u8; REC_HEADER];
            let n = read_some(&mut rd, &mut h).map_err(|e| StoreError::io("read", &j, e))?;
            if n == 0 {
                break;
            }
            if n < REC_HEADER {
                rd.read_exact(&mut h[n..])
                    .map_err(|e| StoreError::io("read record", &j, e))?;
            }
            let mut cb = [0u8; 8];
            cb.copy_from_slice(&h[..8]);
            let chunk = u64::from_be_bytes(cb);
            let len = u32::from_be_bytes([h[9], h[10], h[11], h[12]]) as usize;
            if chunk >= chunks || len != (self.record.disk_bytes - chunk * cs).min(cs) as usize {
                return Err(StoreError::Malformed {
                    what: "replica journal",
                    detail: format!("record for chunk {chunk} of {len} bytes"),
                });
            }
            let data = match h[8] {
                REC_DATA => {
                    rd.read_exact(&mut body[..len])
                        .map_err(|e| StoreError::io("read record", &j, e))?;
                    &body[..len]
                }
                REC_ZERO => &zero[..len],
                k => {
                    return Err(StoreError::Malformed {
                        what: "replica journal",
                        detail: format!("record kind {k}"),
                    })
                }
            };
            self.hook.before(Step::Apply { chunk })?;
            self.disk
                .write_all_at(data, chunk * cs)
                .map_err(|e| StoreError::io("write", &d, e))?;
        }
        self.hook.before(Step::DiskSync)?;
        self.disk
            .sync_data()
            .map_err(|e| StoreError::io("fsync", &d, e))?;
        let rec = Record {
            applied: c.batch,
            committing: None,
            ..self.record.clone()
        };
        self.hook.before(Step::AppliedRecord)?;
        envelope::write_file(&RECORD, &r, &rec.encode())?;
        self.record = rec;
        // No fsync: a stale journal is ignored once the record no longer points at it.
        self.hook.before(Step::JournalReset)?;
        self.journal
            .set_len(0)
            .map_err(|e| StoreError::io("truncate", &j, e))?;
        Ok(())
    }
}

/// The marker of a replica lent to a migration (`ReplicaWriter::promote`).
pub fn promotion_marker(dir: &Path) -> PathBuf {
    dir.join("promoted")
}

fn promote_paths(dir: &Path, at: &Path) -> PromotePaths {
    PromotePaths {
        home: paths(dir).0,
        at: at.to_path_buf(),
        marker: promotion_marker(dir),
        log: dir.join("undo"),
    }
}

/// Give a replica lent to a migration back, after a crash or a failed migration whose
/// `Promoted` is gone: the disk returns to `dir` exactly as lent. `None`: it was not lent.
pub fn recover_promotion(dir: &Path, hook: Box<dyn FaultHook>) -> Result<Option<RolledBack>> {
    crate::promote::recover(&promotion_marker(dir), hook)
}

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
