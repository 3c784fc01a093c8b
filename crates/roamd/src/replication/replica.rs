//! The replica host's side: receives batches into roam-store's `ReplicaWriter` under
//! `STATE/replicas/NAME/` (disk, journal, record), so the replica is after every commit —
//! and after any crash, once reopened — a state the primary's disk really had.
//!
//! ```text
//!  stream ──▶ reader (async: framed messages, then DiskFrames until Sync)
//!               │ events (bounded)
//!               ▼
//!             worker (blocking thread): begin / compare hashes / stage / commit
//!               │ replies: Ready|Refuse (framed), Want/WantEnd/Sync (DiskFrames)
//!               ▼
//!             reply writer (async) ──▶ stream
//! ```
//!
//! The writer sits in a per-VM slot behind a mutex, so a migration that borrows the
//! replica's disk (`promote`) takes it between batches, at a committed state. While it is
//! lent the slot has no writer and `ReplicaWriter::open` refuses the replica (its marker),
//! so sessions are refused and the primary retries; `give_back` (a failed migration) or
//! startup recovery (a crash) returns it exactly as lent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roam_channel::{Connection, RecvStream, SendStream};
use roam_migrate::frame::{DiskFrame, Kind, HEADER_LEN};
use roam_store::{BatchId, ReplicaWriter, StoreError, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::now_ms;
use super::protocol::{admit_hello, Held, LocalVm, ReplMsg, REPL_VERSION};
use crate::daemon::Daemon;
use crate::dedup::SharedIndex;
use crate::error::{Error, Result};
use crate::state::{ReplicaRecord, VmStatus};

/// One replica held here.
#[derive(Default)]
pub struct Slot {
    /// `None` until first opened, and after a failure (the next user reopens, recovering).
    writer: Mutex<Option<ReplicaWriter>>,
    /// The session currently writing it; a new session from the primary replaces it.
    session: Mutex<Option<CancellationToken>>,
}

/// Replicas held by this host, by VM name.
#[derive(Default)]
pub struct HeldReplicas {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl HeldReplicas {
    fn slot(&self, vm: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm.to_string())
            .or_default()
            .clone()
    }

    fn forget(&self, vm: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
    }
}

pub fn replica_dir(d: &Daemon, vm: &str) -> PathBuf {
    d.paths.state.join("replicas").join(vm)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_err(e: StoreError) -> Error {
    Error::Disk(format!("replica: {e}"))
}

/// Open (recovering) or create the replica's writer in `slot`.
fn ensure_open(
    slot: &mut Option<ReplicaWriter>,
    dir: &Path,
    create: Option<(u64, u32)>,
    prefill: Option<PathBuf>,
) -> Result<bool> {
    if slot.is_some() {
        return Ok(true);
    }
    if dir.join("record").exists()
        && !dir.join("disk").exists()
        && !roam_store::replica::promotion_marker(dir).exists()
    {
        // Its disk became the VM's in a migration that committed here, and roamd stopped
        // before it dropped the rest (`drop_held`): nothing is left to recover.
        warn!(dir = %dir.display(), "replica without a disk (taken by a migration); dropped");
        let _ = std::fs::remove_dir_all(dir);
    }
    if !dir.join("record").exists() {
        let Some((bytes, cs)) = create else {
            return Ok(false);
        };
        // A directory without a record is a creation that did not finish: start over.
        let _ = std::fs::remove_dir_all(dir);
        ReplicaWriter::create(dir, bytes, cs).map_err(store_err)?;
        if let Some(old) = prefill {
            prefill_from(&old, &dir.join("disk"));
        }
    }
    let (w, rec) =
        ReplicaWriter::open(dir, Box::new(roam_store::replica::NoFaults)).map_err(store_err)?;
    if rec.redone || rec.discarded > 0 {
        info!(dir = %dir.display(), redone = rec.redone, discarded = rec.discarded,
            "replica recovered to its last committed batch");
    }
    *slot = Some(w);
    Ok(true)
}

/// Start a new replica from the disk this host kept when the VM left it, so that the
/// seed (which compares hashes first) sends only what changed since. Best effort: on any
/// problem the replica starts empty and the seed sends everything.
fn prefill_from(old: &Path, disk: &Path) {
    // Through a temporary file: a failed copy must leave the writer's (empty) disk intact.
    let tmp = disk.with_extension("prefill");
    let copied = crate::daemon::copy_sparse(old, &tmp)
        .and_then(|()| std::fs::rename(&tmp, disk).map_err(|e| Error::io("prefill replica", e)));
    match copied {
        Ok(()) => info!(from = %old.display(), "new replica starts from the copy kept here"),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            warn!(from = %old.display(), "could not start the replica from the kept copy: {e}")
        }
    }
}

/// Copy the committed state of this host's replica of `vm` to `to` (sparse, reflinked
/// where possible), for `force-primary`. `false` if there is none to use.
pub fn seed_copy(d: &Daemon, vm: &str, disk_bytes: u64, to: &Path) -> Result<bool> {
    let dir = replica_dir(d, vm);
    if !dir.join("record").exists() {
        return Ok(false);
    }
    let slot = d.replication.held.slot(vm);
    let mut g = lock(&slot.writer);
    if !ensure_open(&mut g, &dir, None, None)? {
        return Ok(false);
    }
    let Some(w) = g.as_ref() else {
        return Ok(false);
    };
    let applied = w.applied().version;
    if w.disk_bytes() != disk_bytes || applied == Version::default() {
        return Ok(false);
    }
    crate::daemon::copy_sparse(&w.disk_path(), to)?;
    info!(vm, ?applied, "copied the replica");
    Ok(true)
}

/// Lend this host's replica of `vm`, in its committed state, to an incoming migration
/// that writes it at `at` (a rename, not a copy: `ReplicaWriter::promote`). Returns the
/// promoted disk and the batch it holds; `None` if there is no committed replica of the
/// right size. While lent, the replica has no writer: a session in progress is ended, and
/// a new one is refused by `ReplicaWriter::open` (the marker) until `give_back`, so a
/// primary's batches wait and are retried, never written into the migration's disk.
pub fn promote(
    d: &Daemon,
    vm: &str,
    (disk_bytes, chunk_size): (u64, u32),
    at: &Path,
) -> Result<Option<(roam_store::Promoted, Version)>> {
    let dir = replica_dir(d, vm);
    if !dir.join("record").exists() {
        return Ok(None);
    }
    let slot = d.replication.held.slot(vm);
    if let Some(t) = lock(&slot.session).take() {
        t.cancel();
    }
    // Taking the writer lock waits for a batch being applied: the disk is lent between
    // batches, at a committed state.
    let mut g = lock(&slot.writer);
    if !ensure_open(&mut g, &dir, None, None)? {
        return Ok(None);
    }
    match g.as_ref() {
        Some(w)
            if w.disk_bytes() == disk_bytes
                && w.chunk_size() == chunk_size
                && w.applied().version != Version::default() => {}
        _ => return Ok(None),
    }
    let Some(w) = g.take() else {
        return Ok(None);
    };
    let applied = w.applied().version;
    match w.promote(at, Box::new(roam_store::replica::NoFaults)) {
        Ok(p) => {
            info!(
                vm,
                ?applied,
                "incoming migration starts from the replica, in place"
            );
            Ok(Some((p, applied)))
        }
        Err(e) => {
            // Half lent (e.g. the rename failed after the marker): give it back now.
            if let Err(e2) = roam_store::replica::recover_promotion(
                &dir,
                Box::new(roam_store::replica::NoFaults),
            ) {
                warn!(
                    vm,
                    "replica could not be given back after a failed promotion: {e2}"
                );
            }
            Err(store_err(e))
        }
    }
}

/// A migration that borrowed the replica of `vm` failed: give the disk back (roll back the
/// undo log, rename it home) so the replica is again exactly its committed batch and
/// replication resumes at the primary's next try. `p` is `None` when the migration's
/// `Promoted` is gone (it failed inside a step): the marker on disk then says what to do.
pub fn give_back(d: &Daemon, vm: &str, p: Option<roam_store::Promoted>) {
    let dir = replica_dir(d, vm);
    let slot = d.replication.held.slot(vm);
    let _g = lock(&slot.writer);
    let recover =
        || roam_store::replica::recover_promotion(&dir, Box::new(roam_store::replica::NoFaults));
    let r = match p {
        // A roll back that failed half-way is finished from the marker (idempotent).
        Some(p) => p.roll_back().map(Some).or_else(|e| {
            warn!(
                vm,
                "replica roll back failed ({e}); retrying from its marker"
            );
            recover()
        }),
        None => recover(),
    };
    match r {
        Ok(Some(rb)) => {
            info!(
                vm,
                restored = rb.restored,
                torn = rb.torn_bytes,
                "replica given back at its committed batch"
            )
        }
        Ok(None) => {}
        Err(e) => warn!(
            vm,
            "replica could not be given back (sessions refused until a restart recovers it): {e}"
        ),
    }
}

/// A conversation whose first stream is of kind `Replication` and whose first message was
/// just read.
pub async fn serve(
    d: Arc<Daemon>,
    conn: Connection,
    mut tx: SendStream,
    rx: RecvStream,
    first: ReplMsg,
) {
    let r = match first {
        ReplMsg::Hello {
            version,
            vm,
            source_host,
            generation,
            disk_bytes,
            chunk_size,
        } => {
            let hello = Hello {
                version,
                vm,
                source_host,
                generation,
                disk_bytes,
                chunk_size,
            };
            session(&d, &mut tx, rx, hello).await
        }
        ReplMsg::Remove {
            vm,
            source_host,
            generation,
        } => remove(&d, &mut tx, &vm, &source_host, generation).await,
        other => {
            let _ = tx
                .send_msg(&ReplMsg::refuse(
                    format!("unexpected {other:?} to open a replication conversation"),
                    false,
                ))
                .await;
            Ok(())
        }
    };
    if let Err(e) = r {
        warn!(peer = ?conn.peer_name(), "replication session ended: {e}");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.finish_and_wait()).await;
}

struct Hello {
    version: u16,
    vm: String,
    source_host: String,
    generation: u64,
    disk_bytes: u64,
    chunk_size: u32,
}

fn local_vm(d: &Daemon, vm: &str) -> Result<LocalVm> {
    Ok(match d.store.vm(vm)? {
        None => LocalVm::None,
        Some(r) if r.status == VmStatus::Moved => LocalVm::Moved,
        // A copy known to be superseded is a tombstone too: the newer owner's replica
        // lives beside it (under replicas/), never in it.
        Some(r) if crate::ownership::is_stale(d, &r) => LocalVm::Moved,
        Some(_) => LocalVm::Primary,
    })
}

/// The VM now runs here: a replica of it held here is superseded by the VM's own disk.
pub async fn drop_held(d: &Arc<Daemon>, vm: &str) {
    if !replica_dir(d, vm).exists() {
        return;
    }
    let slot = d.replication.held.slot(vm);
    if let Some(t) = lock(&slot.session).take() {
        t.cancel();
    }
    let dir = replica_dir(d, vm);
    let (d2, vm2) = (d.clone(), vm.to_string());
    let _ = tokio::task::spawn_blocking(move || {
        let mut g = lock(&slot.writer);
        *g = None;
        let _ = std::fs::remove_dir_all(&dir);
        d2.replication.held.forget(&vm2);
    })
    .await;
    let _ = d.store.remove_replica(vm);
    info!(vm, "replica held here dropped: the VM runs here now");
}

async fn remove(
    d: &Arc<Daemon>,
    tx: &mut SendStream,
    vm: &str,
    source: &str,
    generation: u64,
) -> Result<()> {
    if let Some(r) = d.store.replica(vm)? {
        if r.generation > generation {
            let m = ReplMsg::refuse(
                format!(
                    "stale primary: the replica holds generation {}, '{source}' is at {generation}",
                    r.generation
                ),
                true,
            );
            return send(tx, &m).await;
        }
    }
    if roam_store::replica::promotion_marker(&replica_dir(d, vm)).exists() {
        // Its disk is lent to a migration arriving here: removing it now would strand
        // that migration's roll back. The primary may ask again.
        let m = ReplMsg::refuse(
            "the replica is in use by an incoming migration; try again",
            false,
        );
        return send(tx, &m).await;
    }
    let slot = d.replication.held.slot(vm);
    if let Some(t) = lock(&slot.session).take() {
        t.cancel();
    }
    let dir = replica_dir(d, vm);
    let d2 = d.clone();
    let vm2 = vm.to_string();
    tokio::task::spawn_blocking(move || {
        // Taking the writer lock waits for a batch being applied to finish.
        let mut g = lock(&slot.writer);
        *g = None;
        let _ = std::fs::remove_dir_all(&dir);
        d2.replication.held.forget(&vm2);
    })
    .await
    .map_err(|e| Error::Disk(format!("remove replica: {e}")))?;
    d.store.remove_replica(vm)?;
    d.store.log(&serde_json::json!({
        "event": "replica_removed", "vm": vm, "by": source, "unix_ms": now_ms(),
    }))?;
    info!(vm, by = source, "replica removed");
    send(tx, &ReplMsg::Removed).await
}

async fn send(tx: &mut SendStream, m: &ReplMsg) -> Result<()> {
    tx.send_msg(m)
        .await
        .map_err(|e| Error::Migration(format!("replication stream: {e}")))
}

enum Event {
    Begin { batch: BatchId, seed: bool },
    Frame(DiskFrame, Vec<u8>),
}

enum Reply {
    Msg(ReplMsg),
    Frame([u8; HEADER_LEN]),
}

async fn session(d: &Arc<Daemon>, tx: &mut SendStream, mut rx: RecvStream, h: Hello) -> Result<()> {
    if let Err(e) = roam_control::api::validate_name("VM", &h.vm) {
        return send(tx, &ReplMsg::refuse(e.message, false)).await;
    }
    let dir = replica_dir(d, &h.vm);
    let slot = d.replication.held.slot(&h.vm);
    let token = CancellationToken::new();
    if let Some(old) = lock(&slot.session).replace(token.clone()) {
        old.cancel(); // a half-dead session from before an outage
    }
    let local = local_vm(d, &h.vm)?;
    // Open (or create) the writer off the async threads: recovery may redo a journal.
    let (s2, dir2, geo, name) = (
        slot.clone(),
        dir.clone(),
        (h.disk_bytes, h.chunk_size),
        h.vm.clone(),
    );
    let prefill = crate::daemon::kept_disk(d, &h.vm, h.disk_bytes);
    let refusal = admit_hello(
        h.version,
        h.generation,
        h.disk_bytes,
        h.chunk_size,
        local,
        None,
    );
    if let Err(m) = refusal {
        return send(tx, &m).await;
    }
    let held: Result<Held> = tokio::task::spawn_blocking(move || {
        let mut g = lock(&s2.writer);
        ensure_open(&mut g, &dir2, Some(geo), prefill)?;
        let w = g
            .as_ref()
            .ok_or_else(|| Error::Disk(format!("replica of '{name}' did not open")))?;
        Ok(Held {
            disk_bytes: w.disk_bytes(),
            chunk_size: w.chunk_size(),
            applied: w.applied().version,
            primary: w.applied().primary.clone(),
        })
    })
    .await
    .map_err(|e| Error::Disk(format!("open replica: {e}")))?;
    let held = match held {
        Ok(h) => h,
        Err(e) => return send(tx, &ReplMsg::refuse(e.to_string(), false)).await,
    };
    if let Err(m) = admit_hello(
        h.version,
        h.generation,
        h.disk_bytes,
        h.chunk_size,
        local,
        Some(&held),
    ) {
        if let ReplMsg::Refuse { reason, .. } = &m {
            warn!(vm = %h.vm, from = %h.source_host, "replication refused: {reason}");
        }
        return send(tx, &m).await;
    }
    d.store.put_replica(&ReplicaRecord {
        vm: h.vm.clone(),
        primary: if held.primary.is_empty() {
            h.source_host.clone()
        } else {
            held.primary.clone()
        },
        disk_bytes: h.disk_bytes,
        chunk_size: h.chunk_size,
        generation: held.applied.generation,
        seq: held.applied.seq,
        last_sync_unix_ms: d.store.replica(&h.vm)?.and_then(|r| r.last_sync_unix_ms),
        dir: dir.display().to_string(),
    })?;
    send(
        tx,
        &ReplMsg::Welcome {
            version: REPL_VERSION,
            applied_generation: held.applied.generation,
            applied_seq: held.applied.seq,
        },
    )
    .await?;
    info!(vm = %h.vm, from = %h.source_host, applied = ?held.applied, "replication session");

    let (ev_tx, ev_rx) = mpsc::channel::<Event>(32);
    let (rep_tx, mut rep_rx) = mpsc::unbounded_channel::<Reply>();
    let worker = {
        let (d, slot, dir, vm, primary) = (
            d.clone(),
            slot.clone(),
            dir.clone(),
            h.vm.clone(),
            h.source_host.clone(),
        );
        let token = token.clone();
        let index = d.dedup.index();
        tokio::task::spawn_blocking(move || {
            let on_commit = |c: &BatchId, w: &ReplicaWriter| {
                d.store.put_replica(&ReplicaRecord {
                    vm: vm.clone(),
                    primary: c.primary.clone(),
                    disk_bytes: w.disk_bytes(),
                    chunk_size: w.chunk_size(),
                    generation: c.version.generation,
                    seq: c.version.seq,
                    last_sync_unix_ms: Some(now_ms()),
                    dir: dir.display().to_string(),
                })
            };
            work(&slot, &primary, &token, ev_rx, rep_tx, &on_commit, index)
        })
    };
    let replies = async {
        while let Some(r) = rep_rx.recv().await {
            let ok = match r {
                Reply::Msg(m) => tx.send_msg(&m).await.is_ok(),
                Reply::Frame(f) => tx.write_all(&f).await.is_ok(),
            };
            if !ok || (rep_rx.is_empty() && tx.flush().await.is_err()) {
                return;
            }
        }
    };
    let reading = async {
        tokio::select! {
            r = read_loop(&mut rx, ev_tx) => r,
            _ = token.cancelled() => Err(Error::Migration("replaced by a newer session".into())),
        }
    };
    // The worker ends once the reader's channel closes, and the replies once the worker
    // dropped its sender: all three run together until then.
    let done = async {
        let w = worker.await;
        w.map_err(|e| Error::Disk(format!("replica writer thread: {e}")))
    };
    let (read_result, w, ()) = tokio::join!(reading, done, replies);
    w??;
    read_result
}

/// Framed messages until `Begin`, then DiskFrames until `Sync`, and again.
async fn read_loop(rx: &mut RecvStream, ev: mpsc::Sender<Event>) -> Result<()> {
    loop {
        let m = match rx.next_msg::<ReplMsg>().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::Migration(format!("replication stream: {e}"))),
        };
        match m {
            ReplMsg::Bye => return Ok(()),
            ReplMsg::Begin {
                generation,
                seq,
                flush_epoch,
                seed,
            } => {
                let batch = BatchId {
                    version: Version { generation, seq },
                    primary: String::new(), // filled in by the worker
                    flush_epoch,
                };
                if ev.send(Event::Begin { batch, seed }).await.is_err() {
                    return Ok(());
                }
            }
            other => {
                return Err(Error::Migration(format!(
                    "replication: unexpected {other:?}"
                )))
            }
        }
        loop {
            let mut h = [0u8; HEADER_LEN];
            match rx.read_exact(&mut h).await {
                Ok(_) => {}
                // The primary gave up on this batch (e.g. it was refused).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(Error::io("receive replica frame", e)),
            }
            let frame = DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))?;
            let mut body = vec![0u8; frame.body_len as usize];
            rx.read_exact(&mut body)
                .await
                .map_err(|e| Error::io("receive replica frame body", e))?;
            let sync = frame.kind == Kind::Sync;
            if ev.send(Event::Frame(frame, body)).await.is_err() {
                return Ok(());
            }
            if sync {
                break;
            }
        }
    }
}

/// Per-batch state of the worker.
struct Batch {
    seed: bool,
    offered: Vec<bool>,
    wants: Vec<u64>,
    /// What this batch stages (chunk, content): recorded in the dedup index at commit.
    staged: Vec<(u64, [u8; 32])>,
}

/// Called after each commit (roamd records it in its store).
type OnCommit<'a> = &'a dyn Fn(&BatchId, &ReplicaWriter) -> Result<()>;

fn work(
    slot: &Slot,
    primary: &str,
    token: &CancellationToken,
    mut ev: mpsc::Receiver<Event>,
    out: mpsc::UnboundedSender<Reply>,
    on_commit: OnCommit<'_>,
    index: Option<SharedIndex>,
) -> Result<()> {
    let mut received = 0u64;
    let mut batch: Option<Batch> = None;
    let r = (|| -> Result<()> {
        while let Some(e) = ev.blocking_recv() {
            let mut g = lock(&slot.writer);
            // A newer session owns the writer now: not one more frame of ours may reach
            // its batch (checked under the lock, so none can slip in between).
            if token.is_cancelled() {
                return Ok(());
            }
            let Some(w) = g.as_mut() else {
                return Err(Error::Disk("replica writer closed".into()));
            };
            match e {
                Event::Begin { batch: mut b, seed } => {
                    b.primary = primary.to_string();
                    match w.begin(b) {
                        Ok(()) => {
                            batch = Some(Batch {
                                seed,
                                offered: if seed {
                                    vec![false; w.chunk_count() as usize]
                                } else {
                                    Vec::new()
                                },
                                wants: Vec::new(),
                                staged: Vec::new(),
                            });
                            let _ = out.send(Reply::Msg(ReplMsg::Ready));
                        }
                        Err(e) => {
                            let stale = matches!(
                                e,
                                StoreError::StaleGeneration { .. } | StoreError::SplitBrain { .. }
                            );
                            warn!(from = primary, "batch refused: {e}");
                            let _ = out.send(Reply::Msg(ReplMsg::refuse(e.to_string(), stale)));
                            return Ok(());
                        }
                    }
                }
                Event::Frame(f, body) => {
                    let b = batch
                        .as_mut()
                        .ok_or_else(|| Error::Disk("chunk frame outside a batch".into()))?;
                    let sync = f.kind == Kind::Sync;
                    frame(
                        w,
                        b,
                        &mut received,
                        f,
                        &body,
                        &out,
                        on_commit,
                        index.as_ref(),
                    )?;
                    if sync {
                        batch = None;
                    }
                }
            }
        }
        Ok(())
    })();
    if r.is_err() {
        // Whatever was staged is dropped; the next session reopens (and recovers).
        let mut g = lock(&slot.writer);
        if !token.is_cancelled() {
            *g = None;
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn frame(
    w: &mut ReplicaWriter,
    b: &mut Batch,
    received: &mut u64,
    f: DiskFrame,
    body: &[u8],
    out: &mpsc::UnboundedSender<Reply>,
    on_commit: OnCommit<'_>,
    index: Option<&SharedIndex>,
) -> Result<()> {
    let (cs, count, bytes) = (u64::from(w.chunk_size()), w.chunk_count(), w.disk_bytes());
    let chunk_len = |i: u64| -> Result<usize> {
        if i >= count {
            return Err(Error::Disk(format!("chunk {i} is beyond the replica")));
        }
        Ok((bytes - i * cs).min(cs) as usize)
    };
    match f.kind {
        Kind::Hash => {
            let len = chunk_len(f.index)?;
            if let Some(o) = b.offered.get_mut(f.index as usize) {
                *o = true;
            }
            let mut buf = vec![0u8; len];
            w.read_chunk(f.index, &mut buf).map_err(store_err)?;
            if *blake3::hash(&buf).as_bytes() != f.hash {
                // Held anywhere else on this host (another disk, another offset)? The
                // copy is staged like a received chunk, after its bytes hashed right.
                let local = index.is_some_and(|ix| {
                    matches!(
                        ix.read()
                            .unwrap_or_else(|e| e.into_inner())
                            .read_verified(&f.hash, &mut buf),
                        Ok(Some(_))
                    )
                });
                if local {
                    w.stage(f.index, &buf).map_err(store_err)?;
                    b.staged.push((f.index, f.hash));
                } else {
                    b.wants.push(f.index);
                }
            }
        }
        Kind::Query => {
            if b.seed {
                // What the primary did not offer is zero there: clear it here too.
                let file = std::fs::File::open(w.disk_path())
                    .map_err(|e| Error::io("open replica disk", e))?;
                let held =
                    crate::migration::disk::allocated_chunks(&file, w.disk_bytes(), w.chunk_size())
                        .map_err(|e| Error::io("map replica disk", e))?;
                for c in held {
                    if !b.offered.get(c as usize).copied().unwrap_or(true) {
                        let zero = vec![0u8; chunk_len(c)?];
                        w.stage(c, &zero).map_err(store_err)?;
                    }
                }
            }
            for &c in &b.wants {
                let _ = out.send(Reply::Frame(
                    DiskFrame::control(Kind::Want, c).encode_header(),
                ));
            }
            let end = DiskFrame::control(Kind::WantEnd, b.wants.len() as u64);
            let _ = out.send(Reply::Frame(end.encode_header()));
            b.wants.clear();
        }
        Kind::Sync => {
            let committed = w.commit().map_err(store_err)?;
            on_commit(&committed, w)?;
            if let Some(ix) = index {
                crate::dedup::record_rows(ix, &w.disk_path(), &b.staged);
            }
            b.staged.clear();
            let _ = out.send(Reply::Frame(DiskFrame::sync(*received).encode_header()));
        }
        Kind::Zero | Kind::Data | Kind::Raw => {
            let len = chunk_len(f.index)?;
            if f.raw_len as usize != len {
                return Err(Error::Disk(format!(
                    "chunk {} has length {} but the replica's chunk is {len}",
                    f.index, f.raw_len
                )));
            }
            let data = if f.kind == Kind::Zero {
                vec![0u8; len]
            } else {
                f.decode_body(body)
                    .map_err(|e| Error::Disk(e.to_string()))?
            };
            w.stage(f.index, &data).map_err(store_err)?;
            b.staged.push((f.index, *blake3::hash(&data).as_bytes()));
            *received += 1;
        }
        other => {
            return Err(Error::Disk(format!(
                "unexpected {other:?} frame on a replication stream"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use roam_migrate::frame::DiskFrame;

    const CS: u32 = 4096;
    const N: u64 = 8;

    fn begin(generation: u64, seq: u64, seed: bool) -> Event {
        Event::Begin {
            batch: BatchId {
                version: Version { generation, seq },
                primary: String::new(),
                flush_epoch: 0,
            },
            seed,
        }
    }

    fn data(i: u64, byte: u8) -> Event {
        let (f, body, _) = DiskFrame::for_chunk(i, &vec![byte; CS as usize], 3);
        Event::Frame(f, body)
    }

    fn ctl(kind: Kind, i: u64) -> Event {
        Event::Frame(DiskFrame::control(kind, i), Vec::new())
    }

    /// Run the worker over `events` against a real ReplicaWriter; return the replies.
    fn run(dir: &Path, events: Vec<Event>) -> (Result<()>, Vec<Reply>, u64) {
        let slot = Slot::default();
        ensure_open(
            &mut lock(&slot.writer),
            dir,
            Some((N * CS as u64, CS)),
            None,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(64);
        for e in events {
            tx.try_send(e).ok().unwrap();
        }
        drop(tx);
        let (out, mut replies) = mpsc::unbounded_channel();
        let commits = std::sync::atomic::AtomicU64::new(0);
        let on_commit = |_: &BatchId, _: &ReplicaWriter| {
            commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        let r = work(
            &slot,
            "office",
            &CancellationToken::new(),
            rx,
            out,
            &on_commit,
            None,
        );
        let mut got = Vec::new();
        while let Ok(x) = replies.try_recv() {
            got.push(x);
        }
        (r, got, commits.into_inner())
    }

    fn msgs(r: &[Reply]) -> Vec<ReplMsg> {
        r.iter()
            .filter_map(|x| match x {
                Reply::Msg(m) => Some(m.clone()),
                Reply::Frame(_) => None,
            })
            .collect()
    }

    fn disk(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join("disk")).unwrap()
    }

    #[test]
    fn batches_commit_and_a_stale_primary_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r");
        // Generation 2 writes chunk 1 (twice in one batch: the later one wins) and 3.
        let (r, replies, commits) = run(
            &dir,
            vec![
                begin(2, 1, false),
                data(1, 7),
                data(3, 9),
                data(1, 8),
                ctl(Kind::Sync, 3),
            ],
        );
        r.unwrap();
        assert_eq!(commits, 1);
        assert_eq!(msgs(&replies), vec![ReplMsg::Ready]);
        let d = disk(&dir);
        assert!(d[4096..8192].iter().all(|&b| b == 8));
        assert!(d[3 * 4096..4 * 4096].iter().all(|&b| b == 9));

        // A primary still at generation 1 (lost contact, restored from backup) is refused
        // as stale and changes nothing.
        let (r, replies, commits) = run(
            &dir,
            vec![begin(1, 99, false), data(1, 1), ctl(Kind::Sync, 1)],
        );
        r.unwrap();
        assert_eq!(commits, 0);
        match &msgs(&replies)[..] {
            [ReplMsg::Refuse {
                reason,
                stale: true,
            }] => {
                assert!(reason.contains("stale"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(disk(&dir), d);
    }

    #[test]
    fn a_seed_clears_what_the_primary_does_not_hold_and_wants_only_differences() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r");
        let (r, _, _) = run(
            &dir,
            vec![
                begin(1, 1, false),
                data(2, 5),
                data(4, 6),
                ctl(Kind::Sync, 2),
            ],
        );
        r.unwrap();
        // The primary now holds chunk 2 unchanged and chunk 5 new; chunk 4 is gone.
        let same = *blake3::hash(&[5u8; CS as usize]).as_bytes();
        let new = *blake3::hash(&[1u8; CS as usize]).as_bytes();
        let (r, replies, commits) = run(
            &dir,
            vec![
                begin(1, 2, true),
                Event::Frame(DiskFrame::hash_of(2, CS, same), Vec::new()),
                Event::Frame(DiskFrame::hash_of(5, CS, new), Vec::new()),
                ctl(Kind::Query, 2),
                data(5, 1),
                ctl(Kind::Sync, 3),
            ],
        );
        r.unwrap();
        assert_eq!(commits, 1);
        let frames: Vec<DiskFrame> = replies
            .iter()
            .filter_map(|x| match x {
                Reply::Frame(h) => DiskFrame::decode_header(h).ok(),
                Reply::Msg(_) => None,
            })
            .collect();
        let wants: Vec<u64> = frames
            .iter()
            .filter(|f| f.kind == Kind::Want)
            .map(|f| f.index)
            .collect();
        assert_eq!(wants, vec![5], "only the differing chunk is wanted");
        let d = disk(&dir);
        assert!(d[2 * 4096..3 * 4096].iter().all(|&b| b == 5));
        assert!(
            d[4 * 4096..5 * 4096].iter().all(|&b| b == 0),
            "chunk 4 not cleared"
        );
        assert!(d[5 * 4096..6 * 4096].iter().all(|&b| b == 1));
    }
}
