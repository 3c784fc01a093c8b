//! The destination side of a migration.
//!
//! It builds a paused twin of the VM (a new sparse disk in `STATE/incoming/NAME`, an NBD
//! export of it, QEMU with `-incoming defer`), fills the disk from the source's chunks,
//! proves it equal at the seal, lets QEMU take the memory stream, and takes ownership
//! once the guest runs here. Until then every failure removes all it built: no QEMU, no
//! export, no socket, no file is left behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roam_channel::{Connection, RecvStream, SendStream, StreamKind};
use roam_migrate::protocol::{version_accepted, FileRef, Msg, VmManifest};
use roam_vm::{MigrationStatus, MigrationTuning};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::disk::{DiskReceiver, SealOutcome};
use super::{postcopy, relay};
use super::{recv_ctl, send_ctl, send_last};
use crate::daemon::{now_ms, BusyGuard, Daemon};
use crate::error::{Error, Result};
use crate::runtime::RunningVm;
use crate::state::{VmRecord, VmStatus};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Handle one incoming migration whose `Offer` was just read from `ctl`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    d: Arc<Daemon>,
    conn: Connection,
    mut ctl_tx: SendStream,
    mut ctl_rx: RecvStream,
    source_host: String,
    version: u16,
    vm: VmManifest,
    postcopy: bool,
) {
    let name = vm.name.clone();
    let peer = conn.peer_name().unwrap_or(&source_host).to_string();
    crate::ownership::prepare_incoming(&d, &peer, &vm.name, vm.generation).await;
    let guard = match admit(&d, &vm, version) {
        Ok(g) => g,
        Err(e) => {
            info!(vm = %name, from = %source_host, "refused incoming migration: {e}");
            send_last(
                &mut ctl_tx,
                &Msg::Refuse {
                    reason: e.to_string(),
                },
            )
            .await;
            return;
        }
    };
    let resume = super::resume::DestCtx {
        d: d.clone(),
        source: peer.clone(),
        vm: vm.name.clone(),
        generation: vm.generation + 1,
        disk_bytes: vm.disk_bytes,
        ram: Default::default(),
    };
    let mut job = Dest {
        d: d.clone(),
        conn: conn.clone(),
        vm,
        version,
        rt: None,
        lent: None,
        owned: false,
        _guard: guard,
        postcopy: postcopy.then(|| {
            let mut p = postcopy::DestPostcopy::new();
            p.set_resume(resume);
            p
        }),
    };
    let r = job.run(&mut ctl_tx, &mut ctl_rx).await;
    if let Err(e) = r {
        warn!(vm = %name, from = %source_host, "incoming migration failed: {e}");
        send_last(&mut ctl_tx, &Msg::abort(e.to_string())).await;
        job.cleanup().await;
        conn.close(2, &e.to_string());
    }
}

fn admit(d: &Arc<Daemon>, vm: &VmManifest, version: u16) -> Result<BusyGuard> {
    if !version_accepted(version) {
        return Err(Error::BadRequest(format!(
            "migration protocol version {version} is not supported here"
        )));
    }
    roam_control::api::validate_name("VM", &vm.name).map_err(|e| Error::BadRequest(e.message))?;
    if let Some(r) = d.store.vm(&vm.name)? {
        if r.status != VmStatus::Moved {
            return Err(Error::Conflict(format!(
                "a VM named '{}' is {} on this host",
                vm.name,
                if r.status == VmStatus::Running {
                    "running"
                } else {
                    "defined"
                }
            )));
        }
        if r.generation > vm.generation {
            return Err(Error::Conflict(format!(
                "stale source: this host saw '{}' at generation {}, the offer is generation {}",
                vm.name, r.generation, vm.generation
            )));
        }
    }
    check_file(&vm.kernel)?;
    check_file(&vm.initrd)?;
    let free = free_bytes(&d.paths.state)?;
    // Keep a margin: the disk is sparse, and other files live here too.
    let need = vm.disk_allocated_bytes + (64 << 20);
    if free < need {
        return Err(Error::Disk(format!(
            "destination disk full: the VM needs {} MiB, {} MiB free in {}",
            need >> 20,
            free >> 20,
            d.paths.state.display()
        )));
    }
    d.claim(&vm.name)
}

fn check_file(f: &FileRef) -> Result<()> {
    let here = super::file_ref(&f.path).map_err(|e| {
        Error::BadRequest(format!("guest file {} is not on this host: {e}", f.path))
    })?;
    if here.blake3 != f.blake3 {
        return Err(Error::BadRequest(format!(
            "guest file {} differs from the source's",
            f.path
        )));
    }
    Ok(())
}

fn free_bytes(path: &std::path::Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

struct Dest {
    d: Arc<Daemon>,
    conn: Connection,
    vm: VmManifest,
    /// The migration protocol version the source speaks.
    version: u16,
    rt: Option<Arc<RunningVm>>,
    /// The incoming disk is a disk of this host lent in place (its replica, or the copy
    /// kept when the VM left): kept at commit, given back on failure.
    lent: Option<Lent>,
    /// The guest runs here and this host recorded itself as its owner.
    owned: bool,
    _guard: BusyGuard,
    /// Post-copy storage: the guest runs here before the disk is complete.
    postcopy: Option<postcopy::DestPostcopy>,
}

impl Dest {
    async fn run(&mut self, ctl_tx: &mut SendStream, ctl_rx: &mut RecvStream) -> Result<()> {
        let d = self.d.clone();
        let dir = d.paths.incoming_dir(&self.vm.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let disk_path = dir.join("disk.raw");
        // A VM coming back: start from the replica or the copy this host kept when it
        // left, so that only what changed since has to cross the WAN. That file is lent in
        // place, not copied: if the move fails it is given back exactly as it was.
        // (Post-copy starts empty: the source names every chunk it holds as pending.)
        let t_seed = Instant::now();
        let (seeded, base_replica) = if self.postcopy.is_none() {
            self.seed_from_old_copy(&disk_path).await?
        } else {
            (false, None)
        };
        if seeded {
            info!(vm = %self.vm.name, ms = t_seed.elapsed().as_millis() as u64,
                in_place = self.lent.is_some(), "incoming disk seeded");
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&disk_path)
            .map_err(|e| Error::io(format!("create {}", disk_path.display()), e))?;
        file.set_len(self.vm.disk_bytes)
            .map_err(|e| Error::io("size incoming disk", e))?;
        let base = if seeded {
            super::disk::allocated_chunks(&file, self.vm.disk_bytes, self.vm.chunk_size)
                .map_err(|e| Error::io("map the old copy", e))?
        } else {
            Vec::new()
        };
        let base_chunks = base.len() as u64;
        if seeded {
            info!(vm = %self.vm.name, base_chunks, "starting from this host's older copy");
        }
        let file = Arc::new(file);
        let rec = self.record(disk_path.display().to_string(), VmStatus::Stopped);
        let layer = self.postcopy.as_ref().map(|p| p.layer(self.vm.chunk_size));
        let rt = RunningVm::start_with_layer(&d, &rec, disk_path.clone(), true, layer.as_deref())
            .await?;
        self.rt = Some(rt.clone());
        let incoming_sock = rt.config.run_dir.join("migrate-in.sock");

        // Streams the source opens: one disk stream, then the QEMU stream(s).
        let (disk_tx, disk_rx) = oneshot::channel::<Result<SealOutcome>>();
        let dedup = d.dedup.clone();
        let vm_name = self.vm.name.clone();
        // Pre-copy: at the seal the disk is exactly what the hashes say, and nothing
        // writes it until the guest runs; the next move out starts from them. (In
        // post-copy the guest writes before the seal, over chunks the hashes name.)
        let cache_for = self.postcopy.is_none().then(|| rt.clone());
        let (disk_bytes, chunk_size) = (self.vm.disk_bytes, self.vm.chunk_size);
        let mut receiver = DiskReceiver::new(file, self.vm.disk_bytes, self.vm.chunk_size)
            .with_base(base)
            .with_index(d.dedup.index())
            .on_sealed(Box::new(move |rows| {
                if let Some(rt) = cache_for {
                    let mut hashes = roam_migrate::ChunkHashes::new_zero(disk_bytes, chunk_size);
                    for &(i, h) in &rows {
                        hashes.set(i, h);
                    }
                    let since = rt.tracker.subscribe(roam_nbd::InitialState::Clean);
                    *rt.hash_cache.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(crate::runtime::HashCache { hashes, since });
                }
                dedup.hold_received(&vm_name, rows)
            }));
        if let Some(l) = &self.lent {
            receiver = receiver.with_undo(l.disk.clone());
        }
        let mut demand = None;
        if let Some(p) = self.postcopy.as_mut() {
            let (r, dem) = p.attach(receiver, &self.conn, &rt)?;
            receiver = r;
            demand = Some(dem);
        }
        let conn = self.conn.clone();
        let sock = incoming_sock.clone();
        let dispatcher = tokio::spawn(async move {
            let mut receiver = Some(receiver);
            let mut disk_tx = Some(disk_tx);
            loop {
                let (kind, tx, mut rx) = match conn.accept_stream().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                match kind {
                    StreamKind::Disk => {
                        if let (Some(r), Some(done)) = (receiver.take(), disk_tx.take()) {
                            tokio::spawn(async move {
                                let _ = done.send(r.run(&mut rx, tx).await);
                            });
                        }
                    }
                    StreamKind::DiskDemand => {
                        if let Some((wants, od)) = demand.take() {
                            tokio::spawn(postcopy::demand_client(tx, rx, wants, od));
                        }
                    }
                    StreamKind::MigrationStream => {
                        let sock = sock.clone();
                        tokio::spawn(async move {
                            if let Err(e) = relay::deliver(&sock, (tx, rx)).await {
                                warn!("incoming migration stream: {e}");
                            }
                        });
                    }
                    StreamKind::Control => {
                        // A second control stream only ever carries an abort.
                        if let Ok(Msg::Abort(r)) = recv_ctl(&mut rx, STEP_TIMEOUT).await {
                            warn!("source aborted: {}", r.message);
                            conn.close(1, "source aborted");
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        let _dispatcher = AbortOnDrop(dispatcher);
        send_ctl(
            ctl_tx,
            &Msg::Accept {
                version: roam_migrate::PROTOCOL_VERSION,
                free_bytes: free_bytes(&d.paths.state)?,
                base_chunks,
                indexed_chunks: d.dedup.indexed_chunks(),
                base_replica: base_replica.map(|v| roam_migrate::protocol::ReplicaBatch {
                    generation: v.generation,
                    seq: v.seq,
                }),
                link_rate_hint: self.conn.peer_name().map_or(0, |p| d.link_rates.get(p)),
            },
        )
        .await?;

        // StartMemory arrives while the disk is still coming.
        let tuning = match recv_ctl(ctl_rx, Duration::from_secs(24 * 3600)).await? {
            Msg::StartMemory { tuning } => tuning,
            Msg::Abort(r) => {
                return Err(Error::Migration(format!("source aborted: {}", r.message)))
            }
            other => return Err(Error::Migration(format!("protocol: got {}", other.name()))),
        };
        let tuning: MigrationTuning = serde_json::from_value(tuning)
            .map_err(|e| Error::Migration(format!("bad tuning from source: {e}")))?;
        rt.vm()
            .await?
            .apply_tuning(&tuning)
            .await
            .map_err(|e| Error::Vm(format!("set migration parameters: {e}")))?;
        rt.vm()
            .await?
            .migrate_incoming(&format!("unix:{}", incoming_sock.display()))
            .await
            .map_err(|e| Error::Vm(format!("migrate-incoming: {e}")))?;
        send_ctl(ctl_tx, &Msg::MemoryReady).await?;

        // A VM with a network: its associations come first once the guest is paused at
        // the source; take them over while the disk is sealed (see `take_associations`).
        // Until then the pre-copy runs, as long as it takes: no timeout, a broken
        // channel or a failed disk stream ends the wait. A version-2 source seals the
        // disk before it sends them.
        let never = || Error::Migration("the disk stream never arrived".into());
        let mut disk_rx = disk_rx;
        let mut sealed = None;
        if rt.net.is_some() && self.vm.net.is_some() {
            let first = tokio::select! {
                m = roam_channel::recv_msg::<Msg>(ctl_rx) => {
                    m.map_err(|e| Error::Migration(format!("control stream: {e}")))?
                }
                s = &mut disk_rx => {
                    sealed = Some(s.map_err(|_| never())??);
                    recv_ctl(ctl_rx, STEP_TIMEOUT).await?
                }
            };
            self.take_associations(&rt, ctl_tx, first).await?;
        }

        // Post-copy: the guest may run once the back end knows what is still missing.
        let mut disk_rx = sealed.is_none().then_some(disk_rx);
        if let Some(p) = self.postcopy.as_mut() {
            p.await_switch(&mut disk_rx).await?;
        }
        // The seal: the disk must be whole and equal before the source switches.
        let seal = match (sealed, disk_rx.take()) {
            (Some(s), _) => s,
            (None, Some(rx)) => rx.await.map_err(|_| never())??,
            (None, None) => super::disk::SealOutcome::postcopy_pending(),
        };
        let ok = seal.ok && !crate::fault::active("refuse-handover");
        send_ctl(
            ctl_tx,
            &Msg::DiskVerified {
                ok,
                root: seal.dest_root.clone(),
                chunks_written: seal.frames_received,
                detail: (!ok).then(|| {
                    format!(
                        "{} of {} frames received",
                        seal.frames_received, seal.frames_expected
                    )
                }),
            },
        )
        .await?;
        if !ok {
            return Err(Error::Migration("disk digest mismatch".into()));
        }
        // QEMU finishes loading the device state; the guest stays held (-S).
        let t_load = Instant::now();
        let st = rt
            .vm()
            .await?
            .wait_migration_status(
                &[
                    MigrationStatus::Completed,
                    MigrationStatus::PostcopyActive,
                    MigrationStatus::Failed,
                    MigrationStatus::Cancelled,
                ],
                STEP_TIMEOUT,
            )
            .await
            .map_err(|e| Error::Vm(format!("incoming migration: {e}")))?;
        let st = if st.status == MigrationStatus::PostcopyActive {
            if let Some(p) = &self.postcopy {
                p.note_ram_postcopy();
            }
            postcopy::await_ram_postcopy_run(&rt).await?
        } else {
            st
        };
        if !matches!(
            st.status,
            MigrationStatus::Completed | MigrationStatus::PostcopyActive
        ) {
            return Err(Error::Migration(format!(
                "incoming QEMU migration ended {:?}: {}",
                st.status,
                st.error_desc.unwrap_or_default()
            )));
        }
        // The disk is proven equal and the device state loaded; the guest is still held
        // (-S). Record this host as the owner first — everything that can fail here fails
        // before the guest runs, so a refusal still leaves the source free to resume —
        // then let it run.
        let t_own = Instant::now();
        self.take_ownership(&rt).await?;
        let t_cont = Instant::now();
        let status = rt
            .vm()
            .await?
            .query_status()
            .await
            .map_err(|e| Error::Vm(format!("query-status: {e}")))?;
        if status != roam_vm::RunState::Running {
            if let Err(e) = rt.vm().await?.cont().await {
                // Owned but not running: better a paused VM here than two copies; the
                // source stays paused too (it saw no `Running`). Say it loudly.
                warn!(vm = %self.vm.name, "cont after migration failed: {e}; VM held paused here");
                return Ok(());
            }
        }
        let resumed_unix_ms = crate::daemon::now_ms();
        info!(
            vm = %self.vm.name,
            load_ms = t_own.duration_since(t_load).as_millis() as u64,
            own_ms = t_cont.duration_since(t_own).as_millis() as u64,
            cont_ms = t_cont.elapsed().as_millis() as u64,
            "the guest runs here"
        );
        if self.postcopy.is_some() && crate::fault::active("lose-link-after-cont") {
            self.conn.close(9, "fault: lose-link-after-cont");
            return Ok(());
        }
        let hb = rt
            .agent
            .wait_heartbeat_after(0, Duration::from_secs(30))
            .await;
        let snap = rt.agent.snapshot();
        send_ctl(
            ctl_tx,
            &Msg::Running {
                first_heartbeat_unix_ms: hb.unwrap_or(0),
                boot_id: snap.boot_id.clone(),
                resumed_unix_ms: Some(resumed_unix_ms),
            },
        )
        .await?;

        // Verify, then commit.
        loop {
            match recv_ctl(ctl_rx, STEP_TIMEOUT).await {
                Ok(Msg::Verify { upto_seq, .. }) => {
                    let rep = rt.agent.verify(upto_seq, Duration::from_secs(90)).await;
                    let msg = match rep {
                        Ok(r) => Msg::VerifyReport {
                            checked: r.checked,
                            ok: r.ok,
                            bad: r.bad,
                            missing: r.missing,
                            boot_id: rt.agent.snapshot().boot_id,
                            detail: r.detail,
                        },
                        Err(e) => Msg::VerifyReport {
                            checked: 0,
                            ok: 0,
                            bad: 0,
                            missing: upto_seq,
                            boot_id: None,
                            detail: Some(format!("verify failed: {e}")),
                        },
                    };
                    send_ctl(ctl_tx, &msg).await?;
                    if let Some(p) = self.postcopy.as_mut() {
                        p.complete(ctl_tx).await?;
                    }
                }
                Ok(Msg::Commit {
                    generation,
                    replicas,
                }) => {
                    if let Some(p) = &self.postcopy {
                        p.committed();
                    }
                    let mut r = d.vm_record(&self.vm.name)?;
                    r.generation = r.generation.max(generation);
                    d.store.put_vm(&r)?;
                    let _ = send_ctl(ctl_tx, &Msg::Committed).await;
                    // Index the received disk only now: recording ~16 k rows competes for
                    // the CPU with the guest's first steps here (and its write check).
                    d.dedup
                        .adopt_received(&self.vm.name, &d.paths.vm_disk(&self.vm.name));
                    // Only the source's name comes from the source; each entry must still be a
                    // peer pinned here, which `adopt` checks.
                    let (d2, vm) = (d.clone(), self.vm.name.clone());
                    tokio::spawn(async move {
                        crate::replication::adopt(&d2, &vm, &replicas).await;
                    });
                    info!(vm = %self.vm.name, generation, "migration committed");
                    return Ok(());
                }
                Ok(other) => {
                    warn!("after running: unexpected {}", other.name());
                }
                Err(e) => {
                    // We own and run the VM; a lost source is not our failure.
                    warn!(vm = %self.vm.name, "source gone after switchover: {e}");
                    d.dedup
                        .adopt_received(&self.vm.name, &d.paths.vm_disk(&self.vm.name));
                    return Ok(());
                }
            }
        }
    }

    /// Takes over the VM's HIP associations, paused at the source, and announces this
    /// host's locator at once: peers switch while the disk is sealed and QEMU loads the
    /// device state, so their packets are here, held in the LAN, when the guest runs.
    /// Should the handover fail after all, the source takes the identity back and
    /// announces itself again.
    async fn take_associations(
        &mut self,
        rt: &Arc<RunningVm>,
        ctl_tx: &mut SendStream,
        msg: Msg,
    ) -> Result<()> {
        let d = &self.d;
        let Some(net) = &rt.net else {
            return Ok(());
        };
        let state = match msg {
            Msg::Associations { state } => state,
            Msg::Abort(r) => {
                return Err(Error::Migration(format!("source aborted: {}", r.message)))
            }
            other => {
                return Err(Error::Migration(format!(
                    "protocol: expected associations, got {}",
                    other.name()
                )))
            }
        };
        // A state we cannot use is no reason to refuse the VM: a guest without its
        // connections is the lesser harm. Say so loudly.
        let import = if state.len() > 2 * roam_migrate::protocol::MAX_ASSOCIATIONS_BYTES {
            warn!(vm = %self.vm.name, len = state.len(), "association state exceeds the cap; dropped");
            None
        } else {
            match hex::decode(&state) {
                Ok(b) => (!b.is_empty()).then_some(b),
                Err(e) => {
                    warn!(vm = %self.vm.name, "association state unreadable ({e}); dropped");
                    None
                }
            }
        };
        if let Err(e) = net.start_endpoint(d.cfg.listen.ip(), import).await {
            warn!(vm = %self.vm.name, "HIP endpoint not started; the VM runs without its associations: {e}");
        } else {
            // Announce the new locator now, while QEMU still loads the device state,
            // not after `cont`: a peer's packets then reach this host by the time the
            // guest runs (held in the LAN until then), so its TCP sees a pause, not
            // a loss and a retransmission timeout. Should the handover still fail,
            // the source takes the identity back and announces itself again.
            match net.set_locator(d.cfg.listen.ip()).await {
                Ok(n) => info!(vm = %self.vm.name, peers = n, "HIP: UPDATE with our locator sent"),
                Err(e) => warn!(vm = %self.vm.name, "HIP locator update: {e}"),
            }
            if let (Some(addr), true) = (net.listen(), self.version >= 3) {
                send_ctl(
                    ctl_tx,
                    &Msg::EndpointAt {
                        addr: addr.to_string(),
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Start from a disk this host holds of the VM, lent in place (renamed to `to`, first
    /// overwrites saved in an undo log; see `roam_store::promote`), so that only what
    /// changed since has to cross the WAN and nothing is copied. A committed background
    /// replica held here is preferred: it is fresher, and its batch is named to the source
    /// (which, if it knows what changed since, offers only those chunks). Otherwise the
    /// disk kept when the VM left (status `moved`), if it has the right size.
    async fn seed_from_old_copy(
        &mut self,
        to: &std::path::Path,
    ) -> Result<(bool, Option<roam_store::Version>)> {
        let (d, name, bytes, cs, to2) = (
            self.d.clone(),
            self.vm.name.clone(),
            self.vm.disk_bytes,
            self.vm.chunk_size,
            to.to_path_buf(),
        );
        let lent = tokio::task::spawn_blocking(
            move || -> Result<Option<(Lent, Option<roam_store::Version>)>> {
                if let Some((p, v)) =
                    crate::replication::replica::promote(&d, &name, (bytes, cs), &to2)?
                {
                    return Ok(Some((Lent::new(LentFrom::Replica, p), Some(v))));
                }
                let Some(old) = crate::daemon::kept_disk(&d, &name, bytes) else {
                    return Ok(None);
                };
                // The marker must be where startup looks for it: beside the kept disk, in
                // the VM's directory.
                let dir = d.paths.vm_dir(&name);
                if old.parent() != Some(dir.as_path()) {
                    crate::daemon::copy_sparse(&old, &to2)?;
                    return Ok(Some((Lent::copied(), None)));
                }
                let paths = roam_store::PromotePaths {
                    home: old,
                    at: to2,
                    marker: dir.join(LENT_MARKER),
                    log: dir.join("undo"),
                };
                let p = roam_store::Promoted::promote(
                    paths,
                    bytes,
                    cs,
                    Box::new(roam_store::replica::NoFaults),
                )
                .map_err(|e| Error::Disk(format!("lend the kept disk: {e}")))?;
                info!(vm = %name, "incoming migration starts from the disk kept here, in place");
                Ok(Some((Lent::new(LentFrom::Kept, p), None)))
            },
        )
        .await
        .map_err(|e| Error::Disk(format!("seed the incoming disk: {e}")))??;
        Ok(match lent {
            None => (false, None),
            Some((l, v)) => {
                self.lent = l.disk_is_lent().then_some(l);
                (true, v)
            }
        })
    }

    fn record(&self, disk_path: String, status: VmStatus) -> VmRecord {
        VmRecord {
            name: self.vm.name.clone(),
            memory_mib: self.vm.memory_mib,
            vcpus: self.vm.vcpus,
            disk_bytes: self.vm.disk_bytes,
            disk_path,
            kernel: self.vm.kernel.path.clone(),
            initrd: self.vm.initrd.path.clone(),
            cmdline: self.vm.cmdline.clone(),
            status,
            generation: self.vm.generation + 1,
            moved_to: None,
            created_at: self.vm.created_at.parse().unwrap_or(0),
            net: self.vm.net.as_deref().cloned(),
            free_page_hint: self.vm.free_page_hint,
            free_page_reporting: self.vm.free_page_reporting,
        }
    }

    /// Move the received disk to its permanent place (QEMU keeps its open descriptor)
    /// and record this host as the VM's owner, in one store transaction.
    async fn take_ownership(&mut self, rt: &Arc<RunningVm>) -> Result<()> {
        let d = &self.d;
        let final_dir = d.paths.vm_dir(&self.vm.name);
        let final_disk = d.paths.vm_disk(&self.vm.name);
        std::fs::create_dir_all(&final_dir)
            .map_err(|e| Error::io(format!("create {}", final_dir.display()), e))?;
        // A lent disk becomes the VM's: drop its undo log (the commit point of the
        // promotion) before the file moves to where a kept disk's roll back would look.
        if let Some(l) = self.lent.take() {
            let taken = l.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(p) = taken {
                let kept = tokio::task::spawn_blocking(move || p.keep())
                    .await
                    .map_err(|e| Error::Disk(format!("keep the lent disk: {e}")))?;
                if let Err(e) = kept {
                    self.lent = Some(l); // cleanup finishes the roll back from the marker
                    return Err(Error::Disk(format!("keep the lent disk: {e}")));
                }
            }
        }
        rt.move_disk(&final_disk)?;
        let _ = std::fs::remove_dir_all(d.paths.incoming_dir(&self.vm.name));
        let rec = self.record(final_disk.display().to_string(), VmStatus::Running);
        d.store.put_vm(&rec)?;
        d.store.log(&serde_json::json!({
            "event": "migrated_in", "vm": rec.name, "generation": rec.generation,
            "unix_ms": now_ms(),
        }))?;
        d.vms.lock().await.insert(self.vm.name.clone(), rt.clone());
        self.owned = true;
        crate::replication::replica::drop_held(d, &self.vm.name).await;
        Ok(())
    }

    async fn cleanup(&mut self) {
        if self.owned {
            return; // the guest runs here: nothing to undo
        }
        if let Some(p) = &self.postcopy {
            p.abandon();
        }
        if let Some(rt) = self.rt.take() {
            // The associations we imported are the source's again: drop them without
            // the CLOSE a stopping endpoint sends, or the peers would tear them down.
            if let Some(net) = &rt.net {
                let _ = net.export_and_stop().await;
            }
            if let Err(e) = rt.stop(&self.d.nbd).await {
                warn!("cleanup of incoming VM: {e}");
            }
            let _ = std::fs::remove_dir_all(&rt.config.run_dir);
        }
        // Nothing writes the lent disk any more (QEMU and its export are gone; the
        // receiver finds it taken): give it back before its directory goes.
        if let Some(l) = self.lent.take() {
            let (d, vm) = (self.d.clone(), self.vm.name.clone());
            let _ = tokio::task::spawn_blocking(move || l.give_back(&d, &vm)).await;
        }
        let _ = std::fs::remove_dir_all(self.d.paths.incoming_dir(&self.vm.name));
    }
}

/// The marker of a kept disk lent to a migration, in the VM's directory.
const LENT_MARKER: &str = "promoted";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LentFrom {
    Replica,
    Kept,
    /// Not lent: copied (a kept disk outside the VM's directory).
    Copied,
}

/// A disk of this host lent to the incoming migration.
struct Lent {
    from: LentFrom,
    disk: super::disk::SharedPromoted,
}

impl Lent {
    fn new(from: LentFrom, p: roam_store::Promoted) -> Lent {
        Lent {
            from,
            disk: Arc::new(std::sync::Mutex::new(Some(p))),
        }
    }

    fn copied() -> Lent {
        Lent {
            from: LentFrom::Copied,
            disk: Arc::default(),
        }
    }

    fn disk_is_lent(&self) -> bool {
        self.from != LentFrom::Copied
    }

    /// Roll the disk back and return it home (blocking). Taking it out of the shared slot
    /// waits for a write in progress and makes the receiver's next write fail.
    fn give_back(self, d: &Daemon, vm: &str) {
        let p = self.disk.lock().unwrap_or_else(|e| e.into_inner()).take();
        match self.from {
            LentFrom::Replica => crate::replication::replica::give_back(d, vm, p),
            LentFrom::Kept => {
                let marker = d.paths.vm_dir(vm).join(LENT_MARKER);
                let r = match p {
                    Some(p) => p.roll_back().map(Some).or_else(|e| {
                        warn!(
                            vm,
                            "kept disk roll back failed ({e}); retrying from its marker"
                        );
                        roam_store::promote::recover(
                            &marker,
                            Box::new(roam_store::replica::NoFaults),
                        )
                    }),
                    None => roam_store::promote::recover(
                        &marker,
                        Box::new(roam_store::replica::NoFaults),
                    ),
                };
                match r {
                    Ok(Some(rb)) => info!(vm, restored = rb.restored, "kept disk given back"),
                    Ok(None) => {}
                    Err(e) => warn!(
                        vm,
                        "kept disk could not be given back (a restart retries): {e}"
                    ),
                }
            }
            LentFrom::Copied => {}
        }
    }
}

/// At startup, before anything serves: give back every disk a migration had borrowed
/// when roamd stopped (replicas under `STATE/replicas/*`, kept disks under
/// `STATE/vms/*`). Must run before the incoming directory is cleared.
pub fn give_back_after_restart(state: &std::path::Path) {
    for sub in ["replicas", "vms"] {
        let Ok(dirs) = std::fs::read_dir(state.join(sub)) else {
            continue;
        };
        for e in dirs.flatten() {
            let marker = e.path().join(LENT_MARKER);
            match roam_store::promote::recover(&marker, Box::new(roam_store::replica::NoFaults)) {
                Ok(Some(rb)) => info!(dir = %e.path().display(), restored = rb.restored,
                    torn = rb.torn_bytes, "disk lent to an interrupted migration given back"),
                Ok(None) => {}
                Err(e2) => warn!(dir = %e.path().display(),
                    "disk lent to an interrupted migration could not be given back: {e2}"),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
