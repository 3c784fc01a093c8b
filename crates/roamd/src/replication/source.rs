//! The primary's side: one task per (VM, replica host) that keeps the replica fresh.
//!
//! ```text
//!  loop:  VM runs here, no migration under way?  ── no ─▶ paused (retry in 1 s)
//!           │ yes
//!         session: connect ─ Hello ─ Welcome{applied}
//!           │  seed = the replica's committed batch is not the one this task last saw
//!           ▼
//!         batches: Begin ─ passes (take dirty, read, send) until no FLUSH completed
//!                  during a pass ─ Sync (= committed) ─ lag 0 if nothing new
//!           │ error: paused, backoff 1 → 8 s      refused as stale: error, retry in 30 s
//! ```
//!
//! The dirty subscription outlives sessions: a link outage only makes the dirty bitmap
//! denser (memory is one bit per chunk whatever the outage length), and the chunks of a
//! batch that never committed stay pending for the next one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roam_channel::{RecvStream, StreamKind};
use roam_control::api::{ReplicaInfo, ReplicaState};
use roam_nbd::{DirtySubscription, InitialState};
use roam_store::{CutBuilder, PassEnd, Version};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::carry::{self, Carry, FileIdentity};
use super::now_ms;
use super::protocol::{needs_seed, next_seq, ReplMsg, REPL_VERSION};
use super::testhooks;
use super::throttle::{Bucket, Throttled};
use crate::daemon::Daemon;
use crate::migration::disk::{allocated_chunks, DiskSender};
use crate::runtime::{RunningVm, CHUNK_SIZE};
use crate::state::VmStatus;
use roam_store::live::{self, LiveMap};

/// Below migration streams (0), on-demand fetch (−1) and control (1): QUIC sends these
/// bytes last.
const REPLICATION_PRIORITY: i32 = -2;
/// Ungated passes of one batch before the cut rule asks for the FLUSH gate
/// (`DirtyTracker::hold_flushes`, see `docs/storage.md`).
const MAX_PASSES: u32 = 8;
const IDLE_POLL: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
const STALE_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Status {
    state: ReplicaState,
    lag_bytes: u64,
    pending_since: Option<Instant>,
    last_sync_unix_ms: Option<u64>,
    generation: u64,
    error: Option<String>,
}

/// One replica of one VM, as the primary sees it.
pub struct Link {
    pub vm: String,
    pub host: String,
    status: Mutex<Status>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    /// What this task knows the replica holds, for a migration to the replica host
    /// (`changed_since`). Taking dirty bits and recording them happen under this lock.
    known: Mutex<Option<Known>>,
    /// What this link knew when its VM stopped, for the VM's next start (`carry`).
    carry: Mutex<Option<Carry>>,
    /// The tracking of a task that ended while its VM still ran (roamd's stop cancels
    /// the links first): `carried` turns it into a carry once the VM has stopped.
    parked: Mutex<Option<Tracking>>,
}

/// The replica's committed batch and what was written here since it.
struct Known {
    sub: Arc<DirtySubscription>,
    /// Taken from `sub` but not committed at the replica.
    pending: BTreeSet<u64>,
    synced_to: Option<Version>,
}

/// The chunks written since the replica committed `batch`: those taken for a batch not
/// yet committed plus those still dirty. `None` when `batch` is not the replica's last
/// commit as this task saw it (then nothing can be assumed about the replica).
fn changed_since(k: &Known, batch: Version) -> Option<BTreeSet<u64>> {
    if k.synced_to != Some(batch) {
        return None;
    }
    let mut out = k.pending.clone();
    out.extend((0..k.sub.chunk_count()).filter(|&c| k.sub.is_dirty(c)));
    Some(out)
}

enum SessErr {
    /// The replica host refused us as a stale primary (one writer).
    Stale(String),
    Other(String),
}

impl<E: std::fmt::Display> From<E> for SessErr {
    fn from(e: E) -> Self {
        SessErr::Other(e.to_string())
    }
}

/// What the dirty tracking of one running VM has seen, across sessions.
struct Tracking {
    rt: Arc<RunningVm>,
    sub: Arc<DirtySubscription>,
    /// Taken from the subscription but not yet committed at the replica.
    pending: BTreeSet<u64>,
    /// The replica's committed batch as of this task's last commit.
    synced_to: Option<Version>,
    /// Where `sub`'s bits and `pending` also live, so that a crash of roamd keeps them
    /// (`roam_store::live`); `None` when the file could not be made (a crash then costs a hash
    /// comparison, as it always did).
    live: Option<Arc<LiveMap>>,
}

/// A link's dirty bits, in its live map: roam-store owns the file, roam-nbd the marking.
#[derive(Debug)]
struct LiveBits(Arc<LiveMap>);

impl roam_nbd::BitStore for LiveBits {
    fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        self.0.dirty()
    }
}

impl Tracking {
    /// Take the dirty bits; with a live map, each is in its pending set before it
    /// leaves the dirty set, so a crash at any instant finds it in one of the two.
    fn take(&self) -> Vec<u64> {
        match &self.live {
            Some(l) => self.sub.take_keeping(l.pending()),
            None => self.sub.take(),
        }
    }
}

impl Drop for Tracking {
    /// The tracking ended in order (a carry, or a hash comparison, takes over).
    fn drop(&mut self) {
        if let Some(l) = &self.live {
            l.retire();
        }
    }
}

impl Link {
    pub fn start(
        d: Arc<Daemon>,
        vm: &str,
        host: &str,
        bucket: Arc<Bucket>,
        carried: Option<Carry>,
    ) -> Arc<Link> {
        let link = Arc::new(Link {
            vm: vm.to_string(),
            host: host.to_string(),
            status: Mutex::new(Status {
                state: ReplicaState::Seeding,
                lag_bytes: 0,
                pending_since: None,
                last_sync_unix_ms: None,
                generation: 0,
                error: None,
            }),
            stop: d.shutdown.child_token(),
            task: Mutex::new(None),
            known: Mutex::new(None),
            carry: Mutex::new(carried),
            parked: Mutex::new(None),
        });
        let h = tokio::spawn(run(link.clone(), d, bucket));
        *link.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        link
    }

    /// Stop the task and wait (briefly) for it to say goodbye.
    pub async fn stop(&self) {
        self.stop.cancel();
        let h = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut h) = h {
            if tokio::time::timeout(Duration::from_secs(5), &mut h)
                .await
                .is_err()
            {
                h.abort();
            }
        }
    }

    /// The chunks of this VM's disk written since the replica committed `batch`, if
    /// `batch` is the replica's last commit this task knows of (see `changed_since`).
    pub fn changed_since(&self, batch: Version) -> Option<BTreeSet<u64>> {
        let k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        k.as_ref().and_then(|k| changed_since(k, batch))
    }

    /// Whether the replica committed `batch` but this task has not recorded it yet (its
    /// commit reply is on the way): worth waiting a moment for.
    pub fn commit_on_the_way(&self, batch: Version) -> bool {
        let k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        k.as_ref()
            .and_then(|k| k.synced_to)
            .is_some_and(|v| v.generation == batch.generation && v.seq < batch.seq)
    }

    /// What this link knew when its VM stopped, if the VM has not started again since.
    /// Call after the task ended and the VM stopped (roamd's orderly stop).
    pub fn carried(&self, d: &Daemon) -> Option<Carry> {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = parked {
            self.keep_carry(d, &t);
        }
        self.carry.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The VM stopped (its export is gone): keep what the replica lacks for its next
    /// start. Nothing is kept for a VM still running or a replica never synced.
    fn keep_carry(&self, d: &Daemon, tr: &Tracking) -> bool {
        let (Some(&disk), Some(synced_to)) = (tr.rt.quiesced.get(), tr.synced_to) else {
            return false;
        };
        let Ok(Some(rec)) = d.store.vm(&self.vm) else {
            return false;
        };
        let mut pending = tr.pending.clone();
        pending.extend(tr.take());
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let c = self.save_carry(d, rec.generation, synced_to, pending, disk);
        *self.carry.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        true
    }

    /// A carry, written on disk at once, so that a crash of roamd while the VM is stopped
    /// keeps it too (the disk's identity still guards it once the VM has run again).
    fn save_carry(
        &self,
        d: &Daemon,
        generation: u64,
        synced_to: Version,
        pending: BTreeSet<u64>,
        disk: FileIdentity,
    ) -> Carry {
        let c = Carry {
            generation,
            synced_to,
            pending,
            disk,
        };
        if let Err(e) = c.save(&carry::path(&d.paths.state, &self.vm, &self.host)) {
            warn!(vm = %self.vm, host = %self.host, "replication state not kept on disk: {e}");
        }
        c
    }

    /// `rt` (this link's VM) has just stopped: keep the carry now, from what `known`
    /// mirrors of the task's tracking, so that a crash of roamd right after the stop does
    /// not lose it. The task does the same from its own tracking when it notices, which
    /// may be later and newer (a batch committed meanwhile); either is sound.
    pub fn vm_stopped(&self, d: &Daemon, rt: &RunningVm) {
        let Some(&disk) = rt.quiesced.get() else {
            return;
        };
        let (synced_to, pending) = {
            let k = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let Some(k) = k.as_ref() else { return };
            let (Some(v), true) = (k.synced_to, Arc::ptr_eq(k.sub.tracker(), &rt.tracker)) else {
                return;
            };
            let mut pending = k.pending.clone();
            pending.extend((0..k.sub.chunk_count()).filter(|&c| k.sub.is_dirty(c)));
            (v, pending)
        };
        if let Ok(Some(rec)) = d.store.vm(&self.vm) {
            self.save_carry(d, rec.generation, synced_to, pending, disk);
        }
    }

    /// Forget the carry, in memory and on disk (the VM runs again, or the link goes).
    pub fn drop_carry(&self, d: &Daemon) {
        self.carry.lock().unwrap_or_else(|p| p.into_inner()).take();
        // A parked tracking goes too (its live map with it).
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take();
        carry::remove(&d.paths.state, &self.vm, &self.host);
    }

    /// A (re)started VM: track its writes from now on, and go on from the carry if it
    /// describes this very disk; otherwise the first batch compares by hash.
    fn adopt(&self, d: &Daemon, rt: &Arc<RunningVm>) -> Tracking {
        let generation = d.store.vm(&self.vm).ok().flatten().map(|r| r.generation);
        let (sub, live) = self.subscribe(d, rt, generation);
        let sub = Arc::new(sub);
        let mut tr = Tracking {
            rt: rt.clone(),
            sub: sub.clone(),
            pending: BTreeSet::new(),
            synced_to: None,
            live,
        };
        let carried = self.carry.lock().unwrap_or_else(|p| p.into_inner()).take();
        carry::remove(&d.paths.state, &self.vm, &self.host);
        if let (Some(c), Some(g)) = (carried, generation) {
            let chunks = rt.tracker.chunk_count();
            match c.check(g, rt.started_on, chunks) {
                Ok(()) => {
                    tr.pending = c.pending;
                    // Written by this QEMU before `sub` existed (`sub` came first, so
                    // nothing falls between the two).
                    tr.pending
                        .extend((0..chunks).filter(|&c| rt.since_start.is_dirty(c)));
                    tr.synced_to = Some(c.synced_to);
                    if let Some(l) = &tr.live {
                        l.anchor(c.synced_to, &tr.pending);
                    }
                    info!(vm = %self.vm, host = %self.host, pending = tr.pending.len(),
                        batch = c.synced_to.seq,
                        "replication goes on from where it was when the VM stopped");
                }
                Err(why) => info!(vm = %self.vm, host = %self.host,
                    "replication state of the last stop not used ({why}); comparing by hash"),
            }
        }
        // Writes before `sub` are known only through a carry; without one assume nothing.
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = tr.synced_to.map(|v| Known {
            sub,
            pending: tr.pending.clone(),
            synced_to: Some(v),
        });
        tr
    }

    /// The link's dirty subscription to `rt`: in a live map when its disk takes every
    /// write through the tracker (not while an arriving post-copy still fills it beneath;
    /// once it is complete, yes).
    fn subscribe(
        &self,
        d: &Daemon,
        rt: &RunningVm,
        generation: Option<u64>,
    ) -> (DirtySubscription, Option<Arc<LiveMap>>) {
        let heap = || (rt.tracker.subscribe(InitialState::Clean), None);
        let Some(generation) = generation.filter(|_| rt.tracker_sees_all()) else {
            return heap();
        };
        let made = live::boot_id().and_then(|boot| {
            let chunks = rt.tracker.chunk_count();
            let key = super::live_key(&self.vm, &self.host);
            LiveMap::create(
                &super::live_dir(&d.paths.run),
                &key,
                chunks,
                generation,
                boot,
            )
        });
        let file = match made {
            Ok(f) => Arc::new(f),
            Err(e) => {
                warn!(vm = %self.vm, host = %self.host,
                    "replication state not kept for a crash (a hash comparison would follow one): {e}");
                return heap();
            }
        };
        match rt.tracker.subscribe_in(Arc::new(LiveBits(file.clone()))) {
            Ok(sub) => (sub, Some(file)),
            Err(e) => {
                file.retire();
                warn!(vm = %self.vm, host = %self.host, "replication state not kept for a crash: {e}");
                heap()
            }
        }
    }

    /// Take the dirty bits into `pending`, atomically for `changed_since`.
    fn take_dirty(&self, tr: &mut Tracking) -> Vec<u64> {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let taken = tr.take();
        tr.pending.extend(taken.iter().copied());
        if let Some(k) = k.as_mut() {
            k.pending.extend(taken.iter().copied());
        }
        taken
    }

    /// The replica committed `v`: everything taken so far is there.
    fn record_commit(&self, tr: &mut Tracking, v: Version) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        tr.pending.clear();
        tr.synced_to = Some(v);
        if let Some(l) = &tr.live {
            l.anchor(v, &tr.pending);
        }
        *k = Some(Known {
            sub: tr.sub.clone(),
            pending: BTreeSet::new(),
            synced_to: Some(v),
        });
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn pause(&self, why: String) {
        self.update(|s| {
            if s.state != ReplicaState::Paused || s.error.as_deref() != Some(why.as_str()) {
                info!(vm = %self.vm, host = %self.host, "replication paused: {why}");
            }
            s.state = ReplicaState::Paused;
            s.error = Some(why);
        });
    }

    fn progress(&self, state: ReplicaState, pending_chunks: u64) {
        self.update(|s| {
            s.state = state;
            s.error = None;
            s.lag_bytes = pending_chunks * u64::from(CHUNK_SIZE);
            if pending_chunks == 0 && state == ReplicaState::InSync {
                s.pending_since = None;
            } else if s.pending_since.is_none() {
                s.pending_since = Some(Instant::now());
            }
        });
    }

    fn committed(&self, generation: u64, batch_started: Instant, still_dirty: u64) {
        self.update(|s| {
            s.last_sync_unix_ms = Some(now_ms());
            s.generation = generation;
            s.lag_bytes = still_dirty * u64::from(CHUNK_SIZE);
            s.pending_since = (still_dirty > 0).then_some(batch_started);
            s.state = if still_dirty == 0 {
                ReplicaState::InSync
            } else {
                ReplicaState::Lagging
            };
            s.error = None;
        });
    }

    fn last_sync(&self) -> Option<u64> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_sync_unix_ms
    }

    pub fn info(&self) -> ReplicaInfo {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        ReplicaInfo {
            vm: self.vm.clone(),
            host: self.host.clone(),
            state: s.state,
            lag_bytes: s.lag_bytes,
            lag_ms: s
                .pending_since
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            last_sync_unix_ms: s.last_sync_unix_ms,
            generation: s.generation,
            error: s.error.clone(),
        }
    }
}

/// The VM, if it runs here and no migration is under way on this host (migration first).
async fn ready(d: &Daemon, vm: &str) -> Result<Arc<RunningVm>, String> {
    if !d.busy.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        return Err("a migration is under way on this host; replication yields".into());
    }
    match d.store.vm(vm) {
        Ok(Some(r)) if r.status == VmStatus::Moved => {
            return Err(format!(
                "VM moved to '{}'",
                r.moved_to.as_deref().unwrap_or("?")
            ))
        }
        Ok(Some(r)) if r.status == VmStatus::Running => {}
        Ok(Some(_)) => return Err("VM is not running".into()),
        Ok(None) => return Err("VM is not defined on this host".into()),
        Err(e) => return Err(e.to_string()),
    }
    d.running(vm)
        .await
        .ok_or_else(|| "VM is not running".to_string())
}

async fn sleep_or_stop(stop: &CancellationToken, t: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(t) => {}
        _ = stop.cancelled() => {}
    }
}

async fn run(link: Arc<Link>, d: Arc<Daemon>, bucket: Arc<Bucket>) {
    let mut tr: Option<Tracking> = None;
    let mut backoff = Duration::from_secs(1);
    while !link.stop.is_cancelled() {
        let rt = match ready(&d, &link.vm).await {
            Ok(rt) => rt,
            Err(why) => {
                if tr.as_ref().is_some_and(|t| link.keep_carry(&d, t)) {
                    tr = None;
                }
                link.pause(why);
                sleep_or_stop(&link.stop, Duration::from_secs(1)).await;
                continue;
            }
        };
        // A new QEMU/export (the VM restarted): its dirty bits start over, so must we.
        if !tr.as_ref().is_some_and(|t| Arc::ptr_eq(&t.rt, &rt)) {
            if let Some(old) = tr.take() {
                link.keep_carry(&d, &old);
            }
            tr = Some(link.adopt(&d, &rt));
        }
        let Some(t) = tr.as_mut() else { continue };
        let synced_before = link.last_sync();
        match session(&d, &link, &rt, t, &bucket).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(SessErr::Stale(why)) => {
                warn!(vm = %link.vm, host = %link.host, "replica refuses this host: {why}");
                link.update(|s| {
                    s.state = ReplicaState::Error;
                    s.error = Some(why);
                });
                sleep_or_stop(&link.stop, STALE_RETRY).await;
            }
            Err(SessErr::Other(why)) => {
                link.pause(format!("link: {why}"));
                // A session that committed something was healthy: retry soon again.
                if link.last_sync() != synced_before {
                    backoff = Duration::from_secs(1);
                }
                // Keep the lag figures live while the link is down.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !link.stop.is_cancelled() {
                    let n = t.sub.count() + t.pending.len() as u64;
                    link.update(|s| {
                        s.lag_bytes = n * u64::from(CHUNK_SIZE);
                        if n > 0 && s.pending_since.is_none() {
                            s.pending_since = Some(Instant::now());
                        }
                    });
                    sleep_or_stop(&link.stop, IDLE_POLL).await;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // The task is over: its subscription must not outlive it in `known`. Its tracking
    // becomes a carry now if the VM has stopped, else when `stop_all` asks, after it has.
    if let Some(t) = tr.take() {
        if !link.keep_carry(&d, &t) {
            *link.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        }
    }
    *link.known.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// The zstd level for a batch (roam-store's rule: least wire time + CPU time per byte)
/// at the rate its bytes really leave: the peer's rate limit when there is one below the
/// link, else the link as a migration last measured it, else the connection's own
/// estimate. Knowing nothing, zstd's default.
fn level_for(limit_bytes_per_s: f64, measured_bytes_per_s: u64, estimate: Option<f64>) -> i32 {
    let link = match measured_bytes_per_s {
        0 => estimate.unwrap_or(0.0),
        m => m as f64,
    };
    let rate = match (limit_bytes_per_s > 0.0, link > 0.0) {
        (true, true) => limit_bytes_per_s.min(link),
        (true, false) => limit_bytes_per_s,
        (false, true) => link,
        (false, false) => return roam_store::level::DEFAULT_LEVEL,
    };
    roam_store::level::choose_level(roam_store::level::LevelInput::link(rate * 8.0))
}

async fn recv(rx: &mut RecvStream, within: Duration) -> Result<ReplMsg, SessErr> {
    match tokio::time::timeout(within, rx.recv_msg::<ReplMsg>()).await {
        Err(_) => Err(SessErr::Other("the replica host did not answer".into())),
        Ok(r) => Ok(r?),
    }
}

fn refused(reason: String, stale: bool) -> SessErr {
    if stale {
        SessErr::Stale(reason)
    } else {
        SessErr::Other(format!("refused: {reason}"))
    }
}

async fn session(
    d: &Daemon,
    link: &Link,
    rt: &Arc<RunningVm>,
    tr: &mut Tracking,
    bucket: &Bucket,
) -> Result<(), SessErr> {
    let conn = d.connect_peer(&link.host).await?;
    let (tx, mut rx) = conn.open_stream(StreamKind::Replication).await?;
    tx.set_priority(REPLICATION_PRIORITY)?;
    let rec = d.vm_record(&link.vm)?;
    let generation = rec.generation;
    let mut w = Throttled::new(tx, bucket);
    w.inner
        .send_msg(&ReplMsg::Hello {
            version: REPL_VERSION,
            vm: link.vm.clone(),
            source_host: d.cfg.name.clone(),
            generation,
            disk_bytes: rec.disk_bytes,
            chunk_size: CHUNK_SIZE,
        })
        .await?;
    let applied = match recv(&mut rx, Duration::from_secs(60)).await? {
        ReplMsg::Welcome {
            applied_generation,
            applied_seq,
            ..
        } => Version {
            generation: applied_generation,
            seq: applied_seq,
        },
        ReplMsg::Refuse { reason, stale } => return Err(refused(reason, stale)),
        other => return Err(SessErr::Other(format!("unexpected {other:?}"))),
    };
    let mut seed = needs_seed(tr.synced_to, applied);
    let mut seq = next_seq(generation, applied) - 1;
    link.update(|s| s.generation = applied.generation);
    let file = Arc::new(std::fs::File::open(rt.disk_path())?);
    let mut sender = DiskSender::new(file.clone(), rec.disk_bytes, CHUNK_SIZE, 3);
    let r = async {
        loop {
            // Wait for something to send (or a reason to end the session).
            loop {
                // Another QEMU (the VM stopped and started between two looks) has
                // another tracker: `run` must adopt it before anything more is sent.
                let same = ready(d, &link.vm)
                    .await
                    .is_ok_and(|now| Arc::ptr_eq(&now, rt));
                if link.stop.is_cancelled() || !same {
                    return Ok(());
                }
                if let Some(e) = conn.close_reason() {
                    return Err(SessErr::Other(e.to_string()));
                }
                let n = tr.sub.count() + tr.pending.len() as u64;
                if seed {
                    link.progress(ReplicaState::Seeding, n.max(1));
                    break;
                }
                if n > 0 {
                    link.progress(ReplicaState::Lagging, n);
                    break;
                }
                link.progress(ReplicaState::InSync, 0);
                sleep_or_stop(&link.stop, IDLE_POLL).await;
            }
            let started = Instant::now();
            seq += 1;
            // Per batch: the peer's limit can change, and a migration may have measured
            // the link since the session began.
            sender.set_level(level_for(
                bucket.rate(),
                d.link_rates.get(&link.host),
                conn.stats().bandwidth_estimate_bytes_per_s(),
            ));
            w.inner
                .send_msg(&ReplMsg::Begin {
                    generation,
                    seq,
                    flush_epoch: rt.tracker.flush_epoch(),
                    seed,
                })
                .await?;
            match recv(&mut rx, Duration::from_secs(60)).await? {
                ReplMsg::Ready => {}
                ReplMsg::Refuse { reason, stale } => return Err(refused(reason, stale)),
                other => return Err(SessErr::Other(format!("unexpected {other:?}"))),
            }
            // Passes until one saw no FLUSH complete: then the batch is a state the disk
            // had (see roam_store::cut).
            let mut cut = CutBuilder::new(MAX_PASSES);
            let mut seed_stats = (0usize, 0usize);
            let mut first = true;
            // After MAX_PASSES passes a FLUSH ended, the next ones hold FLUSH replies.
            let mut hold = None;
            let cut_epoch = loop {
                cut.begin_pass(rt.tracker.flush_epoch());
                let taken = link.take_dirty(tr);
                if first && seed {
                    // Everything the primary holds, by hash: the replica says what it lacks.
                    let all = allocated_chunks(&file, rec.disk_bytes, CHUNK_SIZE)?;
                    let offered = all.len();
                    let n = sender.negotiate(&mut w, &mut rx, all).await?;
                    seed_stats = (offered, n.wanted.len());
                    sender.send(&mut w, n.wanted, false).await?;
                } else if first {
                    let all: Vec<u64> = tr.pending.iter().copied().collect();
                    sender.send(&mut w, all, false).await?;
                } else {
                    sender.send(&mut w, taken, false).await?;
                }
                first = false;
                match cut.end_pass(rt.tracker.flush_epoch()) {
                    PassEnd::Consistent { flush_epoch } => break flush_epoch,
                    PassEnd::Again => {}
                    PassEnd::Gate => {
                        // Taken before the next pass reads the epoch, so no FLUSH
                        // completes during it (each waits at most MAX_FLUSH_HOLD).
                        hold.get_or_insert_with(|| rt.tracker.hold_flushes());
                        if cut.passes().is_multiple_of(64) {
                            warn!(vm = %link.vm, passes = cut.passes(),
                                "FLUSHes still complete during gated passes (a pass outlasts the hold)");
                        }
                    }
                }
            };
            drop(hold); // the guest's FLUSH replies go out before the commit's round trip
            testhooks::proposed(testhooks::Proposal {
                source: &d.cfg.name,
                vm: &link.vm,
                host: &link.host,
                seq,
                flush_epoch: cut_epoch,
                seed,
                chunks: &tr.pending,
                hashes: sender.hashes(),
            });
            sender.sync(&mut w, &mut rx).await?; // answered once committed
            testhooks::committed(&d.cfg.name, &link.vm, &link.host);
            link.record_commit(tr, Version { generation, seq });
            if seed {
                // "sent" = chunks the replica lacked; the rest it already held.
                info!(vm = %link.vm, host = %link.host, seq, offered = seed_stats.0,
                    sent = seed_stats.1, passes = cut.passes(), "replica seeded");
            }
            seed = false;
            link.committed(generation, started, tr.sub.count());
            // Let writes gather a little: one batch per ~100 ms at most.
            sleep_or_stop(&link.stop, Duration::from_millis(100)).await;
        }
    }
    .await;
    if r.is_ok() {
        let _ = w.inner.send_msg(&ReplMsg::Bye).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), w.inner.finish_and_wait()).await;
    }
    conn.close(0u32, "replication session over");
    r
}

/// Ask `host` to delete its replica of `vm`.
pub async fn remove_remote(d: &Daemon, vm: &str, host: &str) -> Result<(), String> {
    let r: Result<(), SessErr> = async {
        let conn = d.connect_peer(host).await?;
        let (mut tx, mut rx) = conn.open_stream(StreamKind::Replication).await?;
        let generation = d.store.vm(vm)?.map_or(0, |r| r.generation);
        tx.send_msg(&ReplMsg::Remove {
            vm: vm.to_string(),
            source_host: d.cfg.name.clone(),
            generation,
        })
        .await?;
        let m = recv(&mut rx, Duration::from_secs(60)).await;
        conn.close(0u32, "done");
        match m? {
            ReplMsg::Removed => Ok(()),
            ReplMsg::Refuse { reason, stale } => Err(refused(reason, stale)),
            other => Err(SessErr::Other(format!("unexpected {other:?}"))),
        }
    }
    .await;
    r.map_err(|e| match e {
        SessErr::Stale(m) | SessErr::Other(m) => m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use roam_nbd::DirtyTracker;

    const MBIT: f64 = 1e6 / 8.0;

    #[test]
    fn batch_level_follows_the_slowest_of_limit_and_link() {
        // A 1 Gbit/s link: fast level; the same link limited to 10 Mbit/s: a high one.
        assert_eq!(level_for(0.0, (1000.0 * MBIT) as u64, None), 1);
        let limited = level_for(10.0 * MBIT, (1000.0 * MBIT) as u64, None);
        assert!(limited >= 6, "{limited}");
        // A limit above the link does not matter.
        assert_eq!(level_for(5000.0 * MBIT, (1000.0 * MBIT) as u64, None), 1);
        // Unmeasured link: the connection's estimate, else zstd's default.
        assert_eq!(level_for(0.0, 0, Some(1000.0 * MBIT)), 1);
        assert_eq!(level_for(0.0, 0, None), roam_store::level::DEFAULT_LEVEL);
        assert!(level_for(2.0 * MBIT, 0, None) > roam_store::level::DEFAULT_LEVEL);
    }

    fn known(synced_to: Option<Version>) -> (Arc<DirtyTracker>, Known) {
        let t = DirtyTracker::new(64 * 4096, 4096).unwrap();
        let sub = Arc::new(t.subscribe(InitialState::Clean));
        let k = Known {
            sub,
            pending: BTreeSet::new(),
            synced_to,
        };
        (t, k)
    }

    const V: Version = Version {
        generation: 3,
        seq: 17,
    };

    #[test]
    fn changed_since_the_known_batch_is_pending_plus_dirty() {
        let (t, mut k) = known(Some(V));
        // Taken for a batch that has not committed yet, and written since.
        k.pending.extend([2, 9]);
        t.mark(40 * 4096, 4096);
        t.mark(9 * 4096, 1);
        let got = changed_since(&k, V).unwrap();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), vec![2, 9, 40]);
        // Reading does not consume: the replication still sends them.
        assert_eq!(k.sub.count(), 2);
    }

    #[test]
    fn another_batch_or_no_commit_means_nothing_is_known() {
        let (_t, k) = known(Some(V));
        assert!(changed_since(&k, Version { seq: 16, ..V }).is_none());
        assert!(changed_since(&k, Version { generation: 4, ..V }).is_none());
        let (_t, k) = known(None);
        assert!(changed_since(&k, V).is_none());
    }
}
