//! The source side of a migration: drives QEMU, copies the disk, decides the switch.
//!
//! Ownership rule: until the destination says the guest runs there, the source's QEMU
//! is the VM. Every error before `migrate-continue` cancels QEMU's migration and the
//! guest keeps running here; the destination removes what it built.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roam_channel::{Connection, PublicKey, RecvStream, SendStream, StreamKind};
use roam_control::api::{
    ApiError, ByteCounts, LinkStats, MigrateRequest, MigrationResult, Outcome, Phase,
    PostcopyStats, Progress,
};
use roam_migrate::plan::{self, Decision, RoundStats};
use roam_migrate::protocol::{Msg, VmManifest};
use roam_nbd::{DirtySubscription, InitialState};
use roam_vm::{LinkFigures, MigrationStatus};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::disk::{allocated_chunks, DiskSender};
use super::postcopy;
use super::relay::Relay;
use super::{recv_ctl, send_ctl, Meter};
use crate::daemon::{api_accel, now_ms, to_api, Daemon};
use crate::error::{Error, Result};
use crate::runtime::{RunningVm, CHUNK_SIZE};
use crate::state::VmStatus;

/// The final disk sync may take this much of the downtime budget.
const DISK_SYNC_BUDGET_MS: u64 = 50;
/// Post-copy: how long the disk copy before the switchover may last (it measures the
/// link for QEMU's tuning).
const POSTCOPY_PROBE: Duration = Duration::from_millis(1500);
/// The connection's send window during that probe.
const POSTCOPY_PROBE_WINDOW: u64 = 2 << 20;
/// How long the destination may take to answer a step.
/// How long the dirty rate is measured for (alongside the post-copy disk probe).
const DIRTY_PERIOD: Duration = Duration::from_millis(1000);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn migrate(
    d: Arc<Daemon>,
    req: MigrateRequest,
    progress: mpsc::Sender<Progress>,
) -> Result<MigrationResult, ApiError> {
    // Up-front checks: refusing here changes nothing.
    let rec = d.vm_record(&req.vm).map_err(to_api)?;
    if rec.status != VmStatus::Running {
        return Err(ApiError::conflict(format!(
            "VM '{}' is not running on this host",
            req.vm
        )));
    }
    let rt = d.running(&req.vm).await.ok_or_else(|| {
        ApiError::conflict(format!("VM '{}' is not running on this host", req.vm))
    })?;
    let peer = d.peer_record(&req.to).map_err(to_api)?;
    // The peer's rate limit (`roam peer set-limit`) caps a migration that sets none.
    let mut req = req;
    req.bandwidth_limit_mbit = req.bandwidth_limit_mbit.or(peer.rate_limit_mbit);
    let key: PublicKey = peer
        .key
        .parse()
        .map_err(|e| ApiError::internal(format!("stored key of peer '{}': {e}", peer.name)))?;
    let addr = peer
        .addr
        .parse()
        .map_err(|e| ApiError::internal(format!("stored address of peer '{}': {e}", peer.name)))?;
    let _guard = d.claim(&req.vm).map_err(to_api)?;

    let meter = Meter::new(progress);
    let mut m = Source {
        d: d.clone(),
        rt: rt.clone(),
        req: req.clone(),
        meter,
        result: MigrationResult {
            vm: req.vm.clone(),
            from: d.cfg.name.clone(),
            to: req.to.clone(),
            outcome: Outcome::Aborted,
            error: None,
            total_ms: 0,
            downtime_ms: None,
            guest_downtime_ms: None,
            pause_ms: None,
            bytes: ByteCounts::default(),
            link: LinkStats::default(),
            acked_writes: 0,
            acked_writes_lost: 0,
            guest_rebooted: false,
            accel: api_accel(d.accel),
            phases: Default::default(),
            tuning: serde_json::Value::Null,
            chunks_skipped: None,
            postcopy: None,
            chunks_deduped: None,
            least_bytes: None,
            chunks_offered: None,
        },
        conn: None,
        qemu_migrating: false,
        ram_postcopy: false,
        continued: false,
        hip_export: None,
        hip_forward: None,
        refused: false,
        demand_bytes: Default::default(),
        ram_dirty: None,
        running_there: false,
        let_go: false,
    };
    info!(vm = %req.vm, to = %req.to, "migration starting");
    let outcome = m.run(addr, key, &rec).await;
    m.finish(outcome).await;
    Ok(m.result)
}

struct Source {
    d: Arc<Daemon>,
    rt: Arc<RunningVm>,
    req: MigrateRequest,
    meter: Meter,
    result: MigrationResult,
    conn: Option<Connection>,
    /// QEMU's own migration was started (so it must be cancelled on failure).
    qemu_migrating: bool,
    /// `migrate-start-postcopy` was issued: from then on neither QEMU holds the whole
    /// VM (the destination lacks pages, the source's state is being handed over), so
    /// nothing may cancel the migration or resume the guest here.
    ram_postcopy: bool,
    /// Post-copy: the guest's RAM dirty rate measured before the memory phase.
    ram_dirty: Option<roam_vm::DirtyEstimate>,
    /// `migrate-continue` was sent: from here the guest may already run at the destination.
    continued: bool,
    /// The VM's HIP associations, exported (and the endpoint stopped) at pre-switchover.
    /// When the guest resumes here after an abort (before `migrate-continue`, or on a
    /// refused handover) the endpoint restarts from them: the peers never heard of a
    /// move, so nothing else has to be undone.
    hip_export: Option<Vec<u8>>,
    /// The forwarding pointer left on the VM's old HIP port during the handover.
    hip_forward: Option<crate::esp_forward::Forwarder>,
    /// After `migrate-continue`, the destination refused the handover before running the
    /// guest (its QEMU is held with -S until the disk digest matches).
    refused: bool,
    /// Post-copy: frame bytes of chunks sent on demand.
    demand_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The destination said the guest runs there (`Running`): it owns the VM.
    running_there: bool,
    /// This host let go: QEMU quit, the VM recorded as moved (see `let_go`).
    let_go: bool,
}

/// The move may have happened (the destination may run the guest): note it, so that the
/// destination's resume request settles it (`resume`), and tell the user how.
fn note_unknown_handover(
    d: &Daemon,
    req: &MigrateRequest,
    error: &mut Option<String>,
    ram: bool,
    how: String,
) {
    let Ok(r) = d.vm_record(&req.vm) else { return };
    d.unknown_handovers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            req.vm.clone(),
            super::resume::Handover {
                to: req.to.clone(),
                generation: r.generation + 1,
                ram,
            },
        );
    if let Some(e) = error.as_mut() {
        e.push_str(&how);
    }
}

impl Source {
    async fn run(
        &mut self,
        addr: std::net::SocketAddr,
        key: PublicKey,
        rec: &crate::state::VmRecord,
    ) -> Result<()> {
        // --- connect and offer -------------------------------------------------------
        self.meter.phase(Phase::Connect);
        // Guest-visible downtime is the longest heartbeat gap during this migration.
        self.rt.agent.reset_gap();
        let conn =
            tokio::time::timeout(Duration::from_secs(15), self.d.endpoint.connect(addr, key))
                .await
                .map_err(|_| self.peer_err(format!("no answer from {addr} within 15 s")))?
                .map_err(|e| self.peer_err(e.to_string()))?;
        self.conn = Some(conn.clone());
        let (mut ctl_tx, mut ctl_rx) = conn
            .open_stream(StreamKind::Control)
            .await
            .map_err(|e| self.peer_err(e.to_string()))?;
        let manifest = manifest(rec, &self.rt)?;
        self.meter.disk_total(manifest.disk_allocated_bytes);
        send_ctl(
            &mut ctl_tx,
            &Msg::Offer {
                version: roam_migrate::protocol::offer_version(&manifest),
                source_host: self.d.cfg.name.clone(),
                vm: manifest.clone(),
                postcopy: self.req.postcopy,
            },
        )
        .await?;
        let (base_chunks, indexed_chunks, rate_hint, base_replica) =
            match recv_ctl(&mut ctl_rx, STEP_TIMEOUT).await? {
                Msg::Accept {
                    base_chunks,
                    indexed_chunks,
                    link_rate_hint,
                    base_replica,
                    ..
                } => (base_chunks, indexed_chunks, link_rate_hint, base_replica),
                Msg::Refuse { reason } => {
                    return Err(self.peer_err(format!("refused the VM: {reason}")))
                }
                other => return Err(unexpected("accept", &other)),
            };

        // --- disk: bulk copy, then rounds on what the guest dirtied ----------------
        let (mut disk_tx, mut disk_rx) = conn
            .open_stream(StreamKind::Disk)
            .await
            .map_err(|e| self.peer_err(e.to_string()))?;
        let file = Arc::new(
            std::fs::File::open(self.rt.disk_path())
                .map_err(|e| Error::io("open disk for copy", e))?,
        );
        // Subscribe BEFORE reading anything: a write that lands during the bulk copy is
        // then either seen by the bulk read or marked for the next round (or both).
        let sub = self.rt.tracker.subscribe(InitialState::Clean);
        let mut sender = DiskSender::new(file.clone(), manifest.disk_bytes, CHUNK_SIZE, 3);
        // Taken after `sub`: a write between the two is stale in the cache or in `sub`.
        let cache = self
            .rt
            .hash_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = cache {
            let (hashes, stale) = c.into_known();
            sender.know(hashes, stale);
        }
        self.meter
            .attach_disk(sender.counters.clone(), conn.clone());
        let postcopy = self.req.postcopy;
        let mut probe_sent = Vec::new();
        // Post-copy: how fast the guest rewrites RAM, and how well that compresses,
        // measured while the disk probe runs; it decides whether RAM follows the disk
        // into post-copy or goes pre-copy with multifd+zstd.
        let dirty_probe = postcopy.then(|| {
            let rt = self.rt.clone();
            postcopy::Task(tokio::spawn(async move {
                let ram = u64::from(rt.config.memory_mib) << 20;
                rt.vm()
                    .await?
                    .estimate_dirty(DIRTY_PERIOD, ram, &rt.config.run_dir, 1)
                    .await
                    .map_err(|e| Error::Vm(format!("estimate the dirty rate: {e}")))
            }))
        });
        let (rate, rtt_ms, demand) = if postcopy {
            self.postcopy_start(
                &conn,
                &file,
                &manifest,
                &mut sender,
                &mut disk_tx,
                &mut disk_rx,
                &mut probe_sent,
            )
            .await?
        } else {
            let (rate, rtt_ms) = self
                .precopy_disk(
                    &conn,
                    &file,
                    &manifest,
                    Accepted {
                        base_chunks,
                        indexed_chunks,
                        rate_hint,
                        base_replica,
                    },
                    &sub,
                    &mut sender,
                    &mut disk_tx,
                    &mut disk_rx,
                )
                .await?;
            (rate, rtt_ms, None)
        };

        // --- memory: QEMU pre-copies through our relay --------------------------------
        self.meter.phase(Phase::Memory);
        let dirty = match dirty_probe {
            Some(mut t) => match (&mut t.0).await {
                Ok(Ok(d)) => {
                    info!(vm = %self.req.vm, dirty_mb_s = d.dirty_bytes_per_s as f64 / 1e6,
                        zstd_ratio = ?d.zstd_ratio, changed = d.changed_pages,
                        sampled = d.sampled_pages, "guest RAM dirty rate");
                    Some(d)
                }
                Ok(Err(e)) => {
                    warn!(vm = %self.req.vm, "{e}; RAM may go post-copy if pre-copy stalls");
                    None
                }
                Err(e) => {
                    warn!(vm = %self.req.vm, "dirty rate task: {e}");
                    None
                }
            },
            None => None,
        };
        let tuning = roam_vm::choose_tuning(&LinkFigures {
            bandwidth_bytes_per_s: rate as u64,
            rtt_ms,
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u16)
                .unwrap_or(1),
            accel: self.d.accel,
            dirty_bytes_per_s: dirty.map(|d| d.dirty_bytes_per_s),
            dirty_zstd_ratio: dirty.and_then(|d| d.zstd_ratio),
        });
        // `--postcopy`: RAM follows the disk into post-copy (switched when pre-copy
        // stalls) when a compressed pre-copy could not keep up, or when that is not
        // known. Otherwise RAM pre-copies compressed: QEMU 10.0 cannot combine
        // post-copy with multifd, and an uncompressed stream took 4× longer here.
        let tuning = if postcopy && (dirty.is_none() || tuning.postcopy) {
            tuning.with_postcopy_ram()
        } else {
            tuning
        };
        self.ram_dirty = dirty;
        let tuning_json = serde_json::to_value(&tuning).unwrap_or(serde_json::Value::Null);
        self.result.tuning = tuning_json.clone();
        send_ctl(
            &mut ctl_tx,
            &Msg::StartMemory {
                tuning: tuning_json,
            },
        )
        .await?;
        match recv_ctl(&mut ctl_rx, STEP_TIMEOUT).await? {
            Msg::MemoryReady => {}
            other => return Err(unexpected("memory_ready", &other)),
        }
        let relay_path = self.rt.config.run_dir.join("migrate-out.sock");
        let relay = Relay::listen(relay_path.clone(), conn.clone())?;
        self.rt
            .vm()
            .await?
            .apply_tuning(&tuning)
            .await
            .map_err(|e| Error::Vm(format!("set migration parameters: {e}")))?;
        // Subscribed before the start so no state change falls in between: the guest is
        // paused from the moment QEMU enters pre-switchover, and every millisecond until
        // roam notices is downtime. A 200 ms poll alone cost 100 ms on average.
        let mut events = self.rt.vm().await?.subscribe();
        self.rt
            .vm()
            .await?
            .migrate(&format!("unix:{}", relay_path.display()))
            .await
            .map_err(|e| Error::Vm(format!("start QEMU migration: {e}")))?;
        self.qemu_migrating = true;
        // While QEMU copies memory, keep the disk's dirty set small.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        // When the guest stopped (QMP STOP), for the real pause figure.
        let mut stopped_unix_ms = None;
        let mut stall = roam_vm::PrecopyStall::new();
        // (ms from the request, pre-copy passes, remaining bytes) at the RAM switch.
        let mut ram_switch: Option<(u64, u64, u64)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(roam_vm::VmEvent::Stop) => {
                        stopped_unix_ms = Some(now_ms());
                        continue;
                    }
                    Ok(roam_vm::VmEvent::Migration { .. })
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    // Other events: no reason to query before the next tick.
                    Ok(_) => continue,
                    // QMP gone: the query below reports it.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
            }
            let st = self
                .rt
                .vm()
                .await?
                .query_migrate()
                .await
                .map_err(|e| Error::Vm(format!("query-migrate: {e}")))?;
            self.meter.memory(&st);
            match st.status {
                MigrationStatus::PreSwitchover => break,
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    return Err(Error::Migration(format!(
                        "QEMU's memory migration {}: {}",
                        if st.status == MigrationStatus::Failed {
                            "failed"
                        } else {
                            "was cancelled"
                        },
                        st.error_desc.unwrap_or_else(|| "no detail".into())
                    )));
                }
                _ => {}
            }
            if relay.failed() {
                return Err(self.peer_err("the migration stream broke".into()));
            }
            if postcopy {
                // Pre-copy cannot converge at this dirty rate over this link: switch RAM
                // to post-copy. QEMU stops the guest and pauses at pre-switchover as
                // for a converged pre-copy, so the disk switch and the associations
                // hand-over below run once, the same way.
                if ram_switch.is_none() && tuning.postcopy && st.status == MigrationStatus::Active {
                    if let Some(ram) = st.ram.as_ref().filter(|r| stall.observe(r)) {
                        info!(
                            vm = %self.req.vm,
                            passes = ram.dirty_sync_count,
                            remaining = ram.remaining,
                            "pre-copy stalled; switching RAM to post-copy"
                        );
                        self.rt
                            .vm()
                            .await?
                            .migrate_start_postcopy()
                            .await
                            .map_err(|e| Error::Vm(format!("migrate-start-postcopy: {e}")))?;
                        self.ram_postcopy = true;
                        ram_switch =
                            Some((self.meter.elapsed_ms(), ram.dirty_sync_count, ram.remaining));
                    }
                }
                continue; // the disk moves after the switchover
            }
            let dirty = sub.take();
            if !dirty.is_empty() {
                sender.send(&mut disk_tx, dirty, false).await?;
            }
        }

        // --- switchover: the guest is paused; make the disks provably equal ------------
        self.meter.phase(Phase::Switchover);
        let paused_at = Instant::now();
        info!(vm = %self.req.vm, "guest paused for the switchover");
        // Without the STOP event (lagged receiver), now is within a poll of it.
        let stopped_unix_ms = stopped_unix_ms.or_else(|| Some(now_ms()));
        // The guest is paused: freeze its HIP endpoint here (no sequence number may be
        // used twice) and hand its associations over first, so the destination can
        // announce its locator while the disk is sealed and the device state travels:
        // peers then switch before the guest resumes. A forwarding pointer on the old
        // port passes on what they send meanwhile.
        if let (Some(_), Some(net)) = (&rec.net, &self.rt.net) {
            let (state, forward) = net.export_and_forward().await?;
            self.hip_export = Some(state.clone());
            self.hip_forward = forward;
            send_ctl(
                &mut ctl_tx,
                &Msg::Associations {
                    state: hex::encode(&state),
                },
            )
            .await?;
        }
        let mut background = None;
        let mut _demand_server = None;
        // The kept disk holds exactly what a pre-copy seals: its hashes index it later.
        let mut kept_hashes = None;
        let root = if let Some((dtx, drx)) = demand {
            // Post-copy: name what the destination lacks, let the guest go, and copy
            // it in the background while the demand stream serves what the guest needs.
            let pending = postcopy::send_switch(
                &mut disk_tx,
                &file,
                manifest.disk_bytes,
                CHUNK_SIZE,
                &probe_sent,
                sub.take(),
            )
            .await?;
            // A short queue at the bottleneck: a demanded chunk waits behind at most a
            // quarter of a round trip of background data, wherever the queue is.
            let bdp = rate * (rtt_ms.max(1) as f64) / 1000.0;
            conn.set_send_window((1.25 * bdp) as u64);
            self.result.postcopy = Some(PostcopyStats {
                chunks_pending_at_resume: pending.len() as u64,
                ram: ram_switch.is_some(),
                ram_started_ms: ram_switch.map(|r| r.0),
                ram_precopy_passes: ram_switch.map_or(0, |r| r.1),
                ram_remaining_at_switch: ram_switch.map_or(0, |r| r.2),
                ram_dirty_bytes_per_s: self.ram_dirty.map(|d| d.dirty_bytes_per_s),
                ram_dirty_zstd_ratio: self.ram_dirty.and_then(|d| d.zstd_ratio),
                ..Default::default()
            });
            let gate = Arc::new(postcopy::DemandGate::default());
            sender.yield_to(gate.clone());
            background = Some(postcopy::Task(tokio::spawn(postcopy::background_copy(
                sender, disk_tx, pending,
            ))));
            _demand_server = Some(postcopy::Task(tokio::spawn(postcopy::serve_demands(
                file.clone(),
                manifest.disk_bytes,
                CHUNK_SIZE,
                dtx,
                drx,
                self.demand_bytes.clone(),
                gate,
            ))));
            "post-copy".to_string()
        } else {
            let last = sub.take();
            sender.send(&mut disk_tx, last, false).await?;
            // The destination checks the digest while the device state travels: its QEMU
            // was started with -S and runs the guest only once the disks are proven equal,
            // so the check costs the downtime about a millisecond of hashing, not a round
            // trip.
            let root = sender.seal(&mut disk_tx).await?;
            kept_hashes = sender.hashes().cloned();
            root
        };
        let disk_sync_ms = paused_at.elapsed().as_millis() as u64;
        self.rt
            .vm()
            .await?
            .migrate_continue_pre_switchover()
            .await
            .map_err(|e| Error::Vm(format!("migrate-continue: {e}")))?;
        self.continued = true;
        // In RAM post-copy QEMU reports `postcopy-active` once the device state and the
        // `run` command went out; `completed` comes only after every page did, which
        // the guest, running at the destination, needs no longer wait for.
        let done: &[MigrationStatus] = if ram_switch.is_some() {
            &[
                MigrationStatus::PostcopyActive,
                MigrationStatus::PostcopyPaused,
                MigrationStatus::Completed,
                MigrationStatus::Failed,
                MigrationStatus::Cancelled,
            ]
        } else {
            &[
                MigrationStatus::Completed,
                MigrationStatus::Failed,
                MigrationStatus::Cancelled,
            ]
        };
        let st = self
            .rt
            .vm()
            .await?
            .wait_migration_status(done, Duration::from_secs(120))
            .await
            .map_err(|e| Error::Vm(format!("waiting for QEMU to complete: {e}")))?;
        self.meter.memory(&st);
        self.result.downtime_ms = st.downtime_ms;
        self.result.bytes.memory = st.ram.as_ref().map(|r| r.transferred).unwrap_or(0);
        if !matches!(
            st.status,
            MigrationStatus::Completed | MigrationStatus::PostcopyActive
        ) {
            return Err(Error::Migration(format!(
                "QEMU's final switchover failed: {}",
                st.error_desc.unwrap_or_else(|| format!("{:?}", st.status))
            )));
        }
        // Until the destination confirms the disks, it has not run the guest: a refusal
        // here means the guest is safe to resume on this host.
        match self.recv_ctl_noting_endpoint(&mut ctl_rx).await? {
            Msg::DiskVerified { ok: true, .. } => {}
            Msg::DiskVerified {
                ok: false,
                root: theirs,
                detail,
                ..
            } => {
                self.refused = true;
                return Err(Error::Migration(format!(
                    "destination disk does not match (ours {root}, theirs {theirs}{}); not switching",
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                )));
            }
            other => {
                self.refused = matches!(other, Msg::Abort(_));
                return Err(unexpected("disk_verified", &other));
            }
        }
        info!(vm = %self.req.vm, disk_sync_ms, downtime_ms = ?st.downtime_ms, "switched over");

        // --- the guest must run at the destination before we let go ---------------------
        let (first_hb, their_boot) = match self.recv_ctl_noting_endpoint(&mut ctl_rx).await? {
            Msg::Running {
                first_heartbeat_unix_ms,
                boot_id,
                resumed_unix_ms,
            } => {
                self.result.pause_ms = resumed_unix_ms
                    .zip(stopped_unix_ms)
                    .map(|(r, s)| r.saturating_sub(s));
                (first_heartbeat_unix_ms, boot_id)
            }
            other => return Err(unexpected("running", &other)),
        };
        self.running_there = true;
        if let Some(p) = self.result.postcopy.as_mut() {
            p.time_to_running_ms = self.meter.elapsed_ms();
        }
        let our = self.rt.agent.snapshot();
        if let Some(last_hb) = our.last_heartbeat_unix_ms {
            if first_hb >= last_hb {
                let cross = first_hb - last_hb;
                self.result.guest_downtime_ms = Some(cross.max(our.max_gap_ms));
            }
        }
        self.result.guest_rebooted = match (&our.boot_id, &their_boot) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        };

        // --- verify every acknowledged write on the destination ------------------------
        self.meter.phase(Phase::Verify);
        self.result.acked_writes = our.acked;
        send_ctl(
            &mut ctl_tx,
            &Msg::Verify {
                upto_seq: our.max_acked_seq.unwrap_or(0),
                acked: our.acked,
                boot_id: our.boot_id.clone(),
            },
        )
        .await?;
        match recv_ctl(&mut ctl_rx, Duration::from_secs(120)).await? {
            Msg::VerifyReport {
                bad,
                missing,
                boot_id,
                detail,
                ..
            } => {
                self.result.acked_writes_lost = bad + missing;
                if boot_id.is_some() && boot_id != our.boot_id {
                    self.result.guest_rebooted = true;
                }
                if let Some(d) = detail {
                    info!(vm = %self.req.vm, "verify: {d}");
                }
            }
            other => return Err(unexpected("verify_report", &other)),
        }

        // --- let go: quit (never cont) the source QEMU, keep the disk -------------------
        self.meter.phase(Phase::Cleanup);
        if self.ram_postcopy {
            self.finish_ram_postcopy().await?;
        }
        drop(sub);
        let r = self.let_go().await?;
        // The kept disk holds exactly what was sealed: index it from the sender's hashes.
        if let Some(h) = &kept_hashes {
            self.d.dedup.note_all(&self.rt.disk_path(), h);
        }
        if let Some(bg) = background {
            self.postcopy_finish(bg, &mut ctl_rx).await?;
        }
        // Replication follows the VM: this host's links stop here, the new primary
        // takes them over, and this host's kept disk becomes one of its replicas.
        let mut replicas = crate::replication::hand_over(&self.d, &self.req.vm).await;
        replicas.retain(|h| h != &self.req.to);
        replicas.push(self.d.cfg.name.clone());
        send_ctl(
            &mut ctl_tx,
            &Msg::Commit {
                generation: r.generation,
                replicas,
            },
        )
        .await?;
        match recv_ctl(&mut ctl_rx, STEP_TIMEOUT).await {
            Ok(Msg::Committed) => {}
            Ok(other) => warn!("after commit: unexpected {}", other.name()),
            Err(e) => warn!("after commit: {e}"),
        }
        drop(relay);
        // Peers acknowledged the new locator long ago (the verify step alone takes
        // longer than their UPDATE round trip): the pointer has done its job.
        if let Some(f) = self.hip_forward.take() {
            f.stop().await;
        }
        Ok(())
    }

    /// Pre-copy storage: the bulk pass (or, to a host holding an older copy, the hash
    /// negotiation), then rounds on what the guest dirtied. Returns the measured rate
    /// and the round-trip time.
    #[allow(clippy::too_many_arguments)]
    /// A bandwidth limit (the request's, else the peer's) caps what QEMU may send
    /// (max-bandwidth) and the send window.
    fn capped(&self, rate: f64) -> f64 {
        match self.req.bandwidth_limit_mbit.filter(|&m| m > 0) {
            Some(m) => rate.min(f64::from(m) * 1e6 / 8.0),
            None => rate,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn precopy_disk(
        &mut self,
        conn: &Connection,
        file: &std::fs::File,
        manifest: &VmManifest,
        accepted: Accepted,
        sub: &DirtySubscription,
        sender: &mut DiskSender,
        disk_tx: &mut SendStream,
        disk_rx: &mut roam_channel::RecvStream,
    ) -> Result<(f64, u64)> {
        let Accepted {
            base_chunks,
            indexed_chunks,
            rate_hint,
            base_replica,
        } = accepted;
        self.meter.phase(Phase::DiskBulk);
        let bulk = allocated_chunks(file, manifest.disk_bytes, CHUNK_SIZE)
            .map_err(|e| Error::io("map allocated disk ranges", e))?;
        let mut t0 = Instant::now();
        let mut before = conn.stats().tx_bytes;
        if base_chunks > 0 || indexed_chunks > 0 {
            // The destination holds an older copy, or other disks that may share content:
            // offer hashes, send only what it holds nowhere (see disk.rs, "Dedup").
            let allocated = bulk.len();
            // Its base is our replica in a state we know: offer only what changed since.
            // `sub` exists already, so what is written from now on goes in the rounds.
            let changed = match base_replica.filter(|_| base_chunks > 0) {
                Some(b) => {
                    let v = roam_store::Version {
                        generation: b.generation,
                        seq: b.seq,
                    };
                    self.d
                        .replication
                        .changed_since(&self.req.vm, &self.req.to, v)
                        .await
                }
                None => None,
            };
            let n = match &changed {
                Some(c) => sender.negotiate_changed(disk_tx, disk_rx, bulk, c).await?,
                None => sender.negotiate(disk_tx, disk_rx, bulk).await?,
            };
            // The rate is measured on the chunks' transfer, not on hashing and its RTT.
            t0 = Instant::now();
            before = conn.stats().tx_bytes;
            let offered = sender
                .counters
                .offered_chunks
                .load(std::sync::atomic::Ordering::Relaxed);
            let cached = sender
                .counters
                .cached_hashes
                .load(std::sync::atomic::Ordering::Relaxed);
            info!(vm = %self.req.vm, allocated, offered, cached, wanted = n.wanted.len(), held = n.held,
                deduped = n.deduped, copied = n.copied, base_chunks, indexed_chunks,
                replica_delta = changed.is_some(), "destination already holds the rest");
            self.result.chunks_skipped = Some(allocated.saturating_sub(n.wanted.len()) as u64);
            self.result.chunks_offered = Some(offered);
            sender.send(disk_tx, n.wanted, false).await?;
        } else {
            sender.send(disk_tx, bulk, true).await?;
        }
        // Written is not delivered: wait for the destination to have it all.
        sender.sync(disk_tx, disk_rx).await?;
        let bulk_s = t0.elapsed().as_secs_f64();
        let sent = conn.stats().tx_bytes.saturating_sub(before);
        let rtt_ms = conn.stats().rtt.as_millis() as u64;
        // Only a copy that lasted long enough measures the link; else the last figure
        // either end measured (linkrate.rs), or the congestion window's estimate.
        let rate = if bulk_s > 1.0 {
            let r = sent as f64 / bulk_s;
            self.d.link_rates.record(&self.req.to, r);
            r
        } else {
            let known = self.d.link_rates.get(&self.req.to).max(rate_hint) as f64;
            let estimate = conn
                .stats()
                .bandwidth_estimate_bytes_per_s()
                .unwrap_or(12.5e6);
            if known > 0.0 {
                known
            } else {
                estimate
            }
        };
        let rate = self.capped(rate);
        self.meter.set_rate_hint(rate);
        // From now on keep no more than a few bandwidth-delay products unacknowledged, so
        // that QEMU (which writes its stream into our relay) sees the real link rate and
        // nothing deep sits in buffers when the guest pauses.
        let bdp = rate * (rtt_ms.max(1) as f64) / 1000.0;
        conn.set_send_window((2.5 * bdp) as u64);
        // Faster links leave less time per byte to compress: trade ratio for speed
        // (roam-store's rule: least wire time + CPU time per byte at this rate).
        sender.set_level(roam_store::level::choose_level(
            roam_store::level::LevelInput::link(rate * 8.0),
        ));
        info!(vm = %self.req.vm, mbit = rate * 8.0 / 1e6, rtt_ms, "link measured by the bulk copy");
        self.meter.phase(Phase::DiskIterate);
        self.iterate_disk(sub, sender, disk_tx, disk_rx, rate)
            .await?;
        Ok((rate, rtt_ms))
    }

    async fn let_go(&mut self) -> Result<crate::state::VmRecord> {
        let r = let_go(&self.d, &self.rt, &self.req.vm, &self.req.to).await?;
        self.let_go = true;
        Ok(r)
    }

    /// Post-copy: the guest runs at the destination (and this host's QEMU has quit);
    /// wait until the background copy delivered every chunk and the destination
    /// compared digests. Only then may the migration commit.
    async fn postcopy_finish(
        &mut self,
        mut bg: postcopy::Task<Result<String>>,
        ctl_rx: &mut roam_channel::RecvStream,
    ) -> Result<()> {
        self.meter.phase(Phase::DiskPostcopy);
        let interrupted = |e: &dyn std::fmt::Display, to: &str| {
            Error::Migration(format!(
                "post-copy disk copy interrupted ({e}): the VM runs at '{to}' (paused there \
                 if it lost the link), and this host keeps its complete disk as of the switchover"
            ))
        };
        let root = match (&mut bg.0).await {
            Ok(Ok(root)) => root,
            Ok(Err(e)) => return Err(interrupted(&e, &self.req.to)),
            Err(e) => return Err(interrupted(&e, &self.req.to)),
        };
        let msg = recv_ctl(ctl_rx, Duration::from_secs(24 * 3600))
            .await
            .map_err(|e| interrupted(&e, &self.req.to))?;
        let Msg::DiskComplete {
            ok,
            root: theirs,
            demand_fetches,
            waits,
            wait_p50_ms,
            wait_max_ms,
            fetch_p50_ms,
            fetch_max_ms,
            single_reads,
            single_read_p50_ms,
            single_read_max_ms,
            superseded,
            detail,
        } = msg
        else {
            return Err(unexpected("disk_complete", &msg));
        };
        let p = self.result.postcopy.get_or_insert_with(Default::default);
        p.demand_fetches = demand_fetches;
        p.demand_waits = waits;
        p.demand_fetch_p50_ms = wait_p50_ms;
        p.demand_fetch_max_ms = wait_max_ms;
        p.block_fetch_p50_ms = fetch_p50_ms;
        p.block_fetch_max_ms = fetch_max_ms;
        p.single_reads = single_reads;
        p.single_read_p50_ms = single_read_p50_ms;
        p.single_read_max_ms = single_read_max_ms;
        p.chunks_superseded = superseded;
        p.demand_bytes = self.demand_bytes.load(std::sync::atomic::Ordering::Relaxed);
        p.disk_complete_ms = self.meter.elapsed_ms();
        if !ok {
            return Err(Error::Migration(format!(
                "post-copy: the destination's disk does not match (ours {root}, theirs {theirs}{})",
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            )));
        }
        info!(vm = %self.req.vm, demand_fetches, wait_p50_ms, wait_max_ms, superseded,
            "post-copy: the destination holds the whole disk");
        Ok(())
    }

    /// Post-copy storage: the disk follows the switchover. Before it, only a short probe
    /// (about [`POSTCOPY_PROBE`] of the bulk pass) measures the link, so that QEMU is
    /// tuned from a real rate and the connection's window can be cut as in pre-copy;
    /// the chunks it sent count as delivered unless the guest rewrites them (`sent`).
    /// The background copy goes below QEMU's stream; the demand stream above both.
    #[allow(clippy::too_many_arguments)]
    async fn postcopy_start(
        &mut self,
        conn: &Connection,
        file: &std::fs::File,
        manifest: &VmManifest,
        sender: &mut DiskSender,
        disk_tx: &mut SendStream,
        disk_rx: &mut roam_channel::RecvStream,
        sent: &mut Vec<u64>,
    ) -> Result<(f64, u64, Option<(SendStream, roam_channel::RecvStream)>)> {
        let (dtx, drx) = conn
            .open_stream(StreamKind::DiskDemand)
            .await
            .map_err(|e| self.peer_err(e.to_string()))?;
        let _ = disk_tx.set_priority(-1);
        let _ = dtx.set_priority(2);
        // The path's own round trip, before the probe queues data at the bottleneck
        // (the smoothed RTT after it is the path's plus that queue).
        let idle_rtt = conn.stats().rtt;
        self.meter.phase(Phase::DiskBulk);
        let bulk = allocated_chunks(file, manifest.disk_bytes, CHUNK_SIZE)
            .map_err(|e| Error::io("map allocated disk ranges", e))?;
        // Writes must track delivery for the probe to last what it says: a modest
        // window (several bandwidth-delay products of any link roam expects).
        conn.set_send_window(POSTCOPY_PROBE_WINDOW);
        let t0 = Instant::now();
        // The rate is taken over the probe's second half: the first is slow start.
        let mut mark: Option<(Instant, u64)> = None;
        for slice in bulk.chunks(32) {
            sender.send(disk_tx, slice.to_vec(), true).await?;
            sent.extend_from_slice(slice);
            if mark.is_none() && t0.elapsed() >= POSTCOPY_PROBE / 2 {
                mark = Some((Instant::now(), conn.stats().tx_bytes));
            }
            if t0.elapsed() >= POSTCOPY_PROBE {
                break;
            }
        }
        sender.sync(disk_tx, disk_rx).await?;
        let loaded_rtt = conn.stats().rtt;
        let rtt_ms = if idle_rtt.is_zero() {
            loaded_rtt
        } else {
            idle_rtt.min(loaded_rtt)
        }
        .as_millis() as u64;
        let measured = mark.and_then(|(t, b)| {
            let s = t.elapsed().as_secs_f64();
            (s > 0.3).then(|| conn.stats().tx_bytes.saturating_sub(b) as f64 / s)
        });
        let rate = if let Some(r) = measured {
            r
        } else {
            conn.stats()
                .bandwidth_estimate_bytes_per_s()
                .unwrap_or(12.5e6)
        };
        let rate = self.capped(rate);
        self.meter.set_rate_hint(rate);
        let bdp = rate * (rtt_ms.max(1) as f64) / 1000.0;
        conn.set_send_window((2.5 * bdp) as u64);
        info!(vm = %self.req.vm, mbit = rate * 8.0 / 1e6, rtt_ms, probe_chunks = sent.len(),
            "post-copy: link measured; the rest of the disk follows the switchover");
        Ok((rate, rtt_ms, Some((dtx, drx))))
    }

    async fn iterate_disk(
        &mut self,
        sub: &DirtySubscription,
        sender: &mut DiskSender,
        w: &mut SendStream,
        r: &mut roam_channel::RecvStream,
        rate: f64,
    ) -> Result<()> {
        let mut prev = None;
        for round in 1.. {
            let dirty = sub.take();
            let bytes = dirty.len() as u64 * CHUNK_SIZE as u64;
            let decision = plan::decide(
                RoundStats {
                    round,
                    dirty_bytes: bytes,
                    previous_dirty_bytes: prev,
                    rate_bytes_per_s: rate,
                },
                DISK_SYNC_BUDGET_MS,
            );
            // Whatever we took must be sent now, whatever we decide: the marks are gone.
            sender.send(w, dirty, false).await?;
            sender.sync(w, r).await?;
            if decision == Decision::StartMemory {
                break;
            }
            prev = Some(bytes);
        }
        Ok(())
    }

    fn peer_err(&self, detail: String) -> Error {
        Error::Peer {
            peer: self.req.to.clone(),
            detail,
        }
    }

    /// Fill in the result; on failure make sure the guest runs here again.
    async fn finish(&mut self, outcome: Result<()>) {
        let conn = self.conn.take();
        if let Some(c) = &conn {
            let s = c.stats();
            self.result.bytes.wire = s.tx_bytes;
            self.result.link = LinkStats {
                bandwidth_mbit: self.meter.rate_hint() * 8.0 / 1e6,
                rtt_ms: s.rtt.as_secs_f64() * 1000.0,
                loss_pct: s.loss_pct(),
            };
        }
        self.result.bytes.disk = self.meter.disk_bytes();
        if let Some(c) = self.meter.disk_counters() {
            use std::sync::atomic::Ordering::Relaxed;
            info!(
                vm = %self.req.vm,
                frames = c.chunks.load(Relaxed),
                zero_frames = c.zero_chunks.load(Relaxed),
                raw = c.raw_bytes.load(Relaxed),
                stream = c.stream_bytes.load(Relaxed),
                held = c.held_chunks.load(Relaxed),
                offered = c.offered_chunks.load(Relaxed),
                least = c.least_bytes.load(Relaxed),
                "disk stream"
            );
            let deduped = c.deduped_chunks.load(std::sync::atomic::Ordering::Relaxed);
            self.result.chunks_deduped = (deduped > 0).then_some(deduped);
            self.result.least_bytes =
                Some(c.least_bytes.load(std::sync::atomic::Ordering::Relaxed));
        }
        self.result.phases = self.meter.phases();
        self.result.total_ms = self.meter.elapsed_ms();
        match outcome {
            Ok(()) => {
                self.result.outcome = Outcome::Completed;
                self.meter.phase(Phase::Done);
                if let Some(c) = conn {
                    c.close(0, "done");
                }
            }
            Err(e) => {
                // When the channel died, say so first: "send disk chunk: connection lost"
                // alone does not tell a person that the other host went away.
                let mut msg = e.to_string();
                let lost = conn.as_ref().and_then(|c| c.close_reason());
                if let Some(reason) = lost {
                    if !msg.contains(&reason.to_string()) {
                        msg = format!(
                            "connection to '{}' lost during {}: {reason} ({msg})",
                            self.req.to,
                            self.meter.current_phase()
                        );
                    }
                }
                warn!(vm = %self.req.vm, "migration aborted: {msg}");
                self.result.outcome = Outcome::Aborted;
                self.result.error = Some(msg);
                self.meter.phase(Phase::Aborted);
                if let Some(c) = &conn {
                    // Best effort: tell the destination to clean up; it also does so when
                    // the channel dies.
                    let abort = async {
                        if let Ok((mut tx, _rx)) = c.open_stream(StreamKind::Control).await {
                            super::send_last(&mut tx, &Msg::abort(e.to_string())).await;
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), abort).await;
                    c.close(1, "aborted");
                }
                self.recover().await;
            }
        }
    }

    /// The guest resumes here: so does its HIP endpoint, from the associations exported
    /// at pre-switchover (when it got that far). The destination may already have
    /// announced its own locator (it does so before its guest runs), so peers are told
    /// to come back here — with an UPDATE SEQ past the destination's.
    async fn restart_hip(&self, export: Option<Vec<u8>>) {
        let (Some(state), Some(net)) = (export, &self.rt.net) else {
            return;
        };
        if state.is_empty() {
            return;
        }
        let ip = self.d.cfg.listen.ip();
        if let Err(e) = net.reclaim_endpoint(ip, state).await {
            warn!(vm = %self.req.vm, "restart the HIP endpoint after the abort: {e}");
            return;
        }
        match net.set_locator(ip).await {
            Ok(n) => info!(vm = %self.req.vm, peers = n, "HIP: peers told the VM stayed here"),
            Err(e) => warn!(vm = %self.req.vm, "HIP locator after the abort: {e}"),
        }
    }

    /// The next control message, after acting on any `EndpointAt` (which the
    /// destination sends whenever its HIP endpoint comes up, between other steps).
    async fn recv_ctl_noting_endpoint(&mut self, rx: &mut RecvStream) -> Result<Msg> {
        loop {
            match recv_ctl(rx, STEP_TIMEOUT).await? {
                Msg::EndpointAt { addr } => self.point_hip_to(&addr),
                m => return Ok(m),
            }
        }
    }

    /// The destination's endpoint runs: pass on what peers still send here.
    fn point_hip_to(&mut self, addr: &str) {
        let to = match addr.parse::<std::net::SocketAddr>() {
            Ok(a) if !a.ip().is_unspecified() && a.port() != 0 => a,
            _ => {
                warn!(vm = %self.req.vm, addr, "destination sent an unusable HIP endpoint address");
                return;
            }
        };
        if let Some(f) = self.hip_forward.as_mut() {
            f.forward_to(to);
        }
    }

    /// RAM post-copy: this QEMU holds pages the destination has not fetched yet, so it
    /// must not quit before QEMU reports every page sent (`completed`).
    async fn finish_ram_postcopy(&mut self) -> Result<()> {
        let st = self
            .rt
            .vm()
            .await?
            .wait_migration_status(
                &[MigrationStatus::Completed, MigrationStatus::PostcopyPaused],
                Duration::from_secs(600),
            )
            .await
            .map_err(|e| Error::Migration(format!("RAM post-copy did not complete: {e}")))?;
        if st.status != MigrationStatus::Completed {
            // The stream broke: QEMU paused the post-copy on both sides.
            return Err(Error::Migration(format!(
                "RAM post-copy paused ({:?}): {}",
                st.status,
                st.error_desc
                    .unwrap_or_else(|| "the migration stream broke".into())
            )));
        }
        self.meter.memory(&st);
        self.result.downtime_ms = st.downtime_ms.or(self.result.downtime_ms);
        if let Some(r) = &st.ram {
            self.result.bytes.memory = r.transferred;
        }
        let elapsed = self.meter.elapsed_ms();
        let p = self.result.postcopy.get_or_insert_with(Default::default);
        p.ram_complete_ms = Some(elapsed);
        if let Some(r) = &st.ram {
            p.ram_postcopy_bytes = r.postcopy_bytes;
            p.ram_postcopy_requests = r.postcopy_requests;
            // `migrate-start-postcopy` only sets a flag: a pre-copy already on its way
            // to completion ignores it. Then nothing went in post-copy.
            p.ram = r.postcopy_bytes > 0 || r.postcopy_requests > 0;
        }
        Ok(())
    }

    /// After a failure: the VM must be running here, as it was.
    async fn recover(&mut self) {
        // The old port is needed back by the endpoint that restarts here.
        if let Some(f) = self.hip_forward.take() {
            f.stop().await;
        }
        // Post-copy storage, after the destination ran the guest: it owns the VM and
        // will ask for the rest of the disk when the link is back (`resume`). This host
        // lets go (if it had not yet) and keeps its disk as of the switchover.
        if self.running_there && self.result.postcopy.is_some() && !self.ram_postcopy {
            if !self.let_go {
                if let Err(e) = self.let_go().await {
                    warn!(vm = %self.req.vm, "letting go after the post-copy switch: {e}");
                }
            }
            if let Some(e) = self.result.error.as_mut() {
                e.push_str(&format!(
                    " — the VM runs at '{}' (paused there while chunks are missing); this \
                     host keeps its disk as of the switchover and sends the rest when '{}' \
                     asks again",
                    self.req.to, self.req.to
                ));
            }
            return;
        }
        let mut hip_export = self.hip_export.take();
        let vm = match self.rt.vm().await {
            Ok(vm) => vm,
            Err(e) => {
                warn!("recover: {e}");
                return;
            }
        };
        if self.ram_postcopy {
            // RAM post-copy started: the destination may lack pages only this QEMU
            // holds, and this guest's state already went out. Cancelling or resuming
            // could leave two diverging halves; QEMU pauses (`postcopy-paused`) on a
            // broken stream, and the guest stays stopped on both sides until an
            // operator recovers the stream (`migrate-recover`, not automated yet).
            warn!(vm = %self.req.vm, "RAM post-copy interrupted; the VM stays paused here, QEMU kept");
            if let Some(e) = self.result.error.as_mut() {
                e.push_str(
                    " — RAM post-copy was interrupted: neither host holds the whole VM; \
                     the source QEMU is kept paused for a post-copy recovery",
                );
            }
            // The destination asks for it when the link is back (`resume`).
            if self.running_there && self.result.postcopy.is_some() {
                let how = format!(", which '{}' asks for when the link is back", self.req.to);
                note_unknown_handover(&self.d, &self.req, &mut self.result.error, true, how);
            }
            return;
        }
        if self.qemu_migrating {
            if let Err(e) = vm.migrate_cancel().await {
                warn!("migrate_cancel: {e}");
            }
            let _ = vm
                .wait_migration_status(
                    &[
                        MigrationStatus::Cancelled,
                        MigrationStatus::Failed,
                        MigrationStatus::Completed,
                    ],
                    Duration::from_secs(30),
                )
                .await;
        }
        if self.continued && self.refused {
            // The destination never ran the guest (it refused before `cont`): resume here.
            self.restart_hip(hip_export.take()).await;
            match vm.query_status().await {
                Ok(roam_vm::RunState::Postmigrate) | Ok(roam_vm::RunState::Paused) => {
                    if let Err(e) = vm.resume_after_refused_handover().await {
                        warn!("resume after a refused handover: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("query-status after a refused handover: {e}"),
            }
            return;
        }
        if self.continued {
            // QEMU completed but the destination never confirmed: the guest may run there.
            // Resuming here could make two copies; stay paused and say so.
            warn!(vm = %self.req.vm, "switchover state unknown; the VM stays paused here");
            if let Some(e) = self.result.error.as_mut() {
                e.push_str(
                    " — the VM is paused on the source because the destination may be running it",
                );
            }
            // Post-copy storage: a destination that runs the guest will ask for the rest
            // of the disk; that request settles it (`resume`).
            if self.result.postcopy.is_some() && !self.ram_postcopy {
                let how = format!(
                    "; if '{}' runs it, it will ask for the rest of the disk and this host \
                     lets go then",
                    self.req.to
                );
                note_unknown_handover(&self.d, &self.req, &mut self.result.error, false, how);
            }
            return;
        }
        self.restart_hip(hip_export.take()).await;
        match vm.query_status().await {
            Ok(roam_vm::RunState::Paused) => {
                if let Err(e) = vm.cont().await {
                    warn!("resume after failed migration: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => warn!("query-status after failed migration: {e}"),
        }
    }
}

/// What the destination's `Accept` said about what it holds and the link.
struct Accepted {
    base_chunks: u64,
    indexed_chunks: u64,
    rate_hint: u64,
    base_replica: Option<roam_migrate::protocol::ReplicaBatch>,
}

/// The guest runs at destination `to`, which owns it: quit (never cont) this QEMU, keep
/// the disk, record the VM as moved there at the next generation.
pub async fn let_go(
    d: &Arc<Daemon>,
    rt: &Arc<RunningVm>,
    vm: &str,
    to: &str,
) -> Result<crate::state::VmRecord> {
    d.vms.lock().await.remove(vm);
    if let Err(e) = rt.stop(&d.nbd).await {
        warn!(vm, "stopping the source QEMU after switchover: {e}");
    }
    let mut r = d.vm_record(vm)?;
    r.status = VmStatus::Moved;
    r.moved_to = Some(to.to_string());
    r.generation += 1;
    d.store.put_vm(&r)?;
    d.store.log(&serde_json::json!({
        "event": "migrated_out", "vm": r.name, "to": to,
        "generation": r.generation,
        "unix_ms": now_ms(),
    }))?;
    Ok(r)
}

fn unexpected(wanted: &str, got: &Msg) -> Error {
    match got {
        Msg::Abort(r) => Error::Migration(format!("destination aborted: {}", r.message)),
        other => Error::Migration(format!("protocol: expected {wanted}, got {}", other.name())),
    }
}

fn manifest(rec: &crate::state::VmRecord, rt: &RunningVm) -> Result<VmManifest> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(rt.disk_path()).map_err(|e| Error::io("stat disk", e))?;
    Ok(VmManifest {
        name: rec.name.clone(),
        memory_mib: rec.memory_mib,
        vcpus: rec.vcpus,
        kernel: super::file_ref(&rec.kernel)?,
        initrd: super::file_ref(&rec.initrd)?,
        cmdline: rec.cmdline.clone(),
        disk_bytes: rec.disk_bytes,
        disk_allocated_bytes: meta.blocks() * 512,
        chunk_size: CHUNK_SIZE,
        generation: rec.generation,
        created_at: rec.created_at.to_string(),
        net: rec.net.clone().map(Box::new),
        free_page_hint: rec.free_page_hint,
        free_page_reporting: rec.free_page_reporting,
    })
}
