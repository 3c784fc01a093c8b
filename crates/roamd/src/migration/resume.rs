//! Post-copy after a lost link: the destination asks again, the source sends the rest.
//!
//! Once the guest ran at the destination, neither host may run it from an older state:
//! the destination owns it (its disk file holds every write the guest made there), the
//! source holds the only copy of the chunks that never crossed (its disk is final as of
//! the switchover). When the link dies before the disk is complete, the destination
//! pauses the guest and keeps asking the source, with backoff, on a new connection:
//!
//! ```text
//!  destination (owner, guest paused)                     source (VM recorded `moved`)
//!   Control:  ResumeDisk{vm, generation} ═══════════════▶ moved to this peer, same generation?
//!             ◀═══════════════════════ ResumeAccepted ── (else Refuse{reason}: try again later)
//!   Disk:     Pending{what is missing} … Switch ════════▶
//!             ◀════ Pending … Switch, chunk frames … Seal ── (as after a post-copy switch)
//!   guest runs again as soon as the answer's Switch is in; DiskDemand serves its reads
//!   Control:  DiskComplete{ok, root} ═══════════════════▶ hand the replicas over
//!             ◀═════════════════ Commit{generation, replicas}
//!             Committed ════════════════════════════════▶
//! ```
//!
//! The source answers only for a VM it recorded as moved to the asking peer at the
//! asked generation (`Source::let_go`): what it sends is then that VM's disk as of the
//! switchover. Chunks the guest rewrote at the destination in the meantime are never
//! overwritten (`OnDemandBackend::install`), as during the first copy. A link that dies
//! again pauses the guest again, and the destination asks again.
//!
//! A cut between the destination's `cont` and the source hearing `Running` leaves the
//! source unsure: it keeps its QEMU paused and notes the move (`unknown_handovers`); the
//! destination's request settles it, and the source lets go then.
//!
//! With RAM post-copy (`ram: true`) the source's QEMU, `postcopy-paused`, still holds
//! pages the destination lacks: the destination's QEMU listens again (`migrate-recover`,
//! out of band, `roam_vm::oob`), the source resumes its stream over the new connection
//! (`migrate … resume=true`), and lets go only once QEMU reports every page sent.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roam_channel::{Connection, StreamKind};
use roam_migrate::frame::{decode_pending, pending_frames, DiskFrame, Kind};
use roam_migrate::Msg;
use roam_nbd::OnDemandBackend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::disk::{DiskReceiver, DiskSender};
use super::postcopy::{background_copy, demand_client, serve_demands, DemandGate, SharedWants};
use super::{recv_ctl, send_ctl, send_last};
use crate::daemon::{now_ms, Daemon};
use crate::error::{Error, Result};
use crate::runtime::{RunningVm, CHUNK_SIZE};
use crate::state::VmStatus;

/// Longest wait between two requests to the source.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// zstd level of the resumed background copy (the link's speed is unknown again).
const RESUME_LEVEL: i32 = 3;

/// A post-copy move out whose outcome the source does not know (see
/// `Daemon::unknown_handovers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub to: String,
    /// The generation the destination owns the VM at, should it run it.
    pub generation: u64,
    /// RAM post-copy was under way: this host's QEMU holds pages the destination
    /// lacks and waits, `postcopy-paused`, to resume its stream.
    pub ram: bool,
}

/// What the destination needs to ask for the rest of a post-copy disk.
#[derive(Clone)]
pub struct DestCtx {
    pub d: Arc<Daemon>,
    /// The source host, as pinned here.
    pub source: String,
    pub vm: String,
    /// The generation this host owns the VM at.
    pub generation: u64,
    pub disk_bytes: u64,
    /// RAM post-copy is under way too (set when the destination sees it).
    pub ram: Arc<AtomicBool>,
}

/// Destination: the link to the source died. Unless the disk is complete, pause the
/// guest (its reads of missing chunks could not complete), then ask the source for the
/// rest until it is here and the move is committed.
pub fn after_link_loss(
    ctx: DestCtx,
    od: Arc<OnDemandBackend>,
    rt: Arc<RunningVm>,
    wants: SharedWants,
) {
    tokio::spawn(async move {
        // With RAM post-copy the guest is not paused: `stop` would wait for vCPUs that
        // wait for pages, and hold the main loop meanwhile. QEMU's own pause
        // (`postcopy-paused`) blocks just the vCPUs that fault.
        let must_pause = |paused: &Option<Paused>| {
            !ctx.ram.load(Ordering::Acquire) && !od.is_complete() && paused.is_none()
        };
        let mut paused = None;
        if must_pause(&paused) {
            paused = Some(pause(rt.clone(), od.stats().missing));
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if !owned(&ctx, &rt).await {
                info!(vm = %ctx.vm, "post-copy resume: the VM is no longer owned here; giving up");
                return;
            }
            match attempt(&ctx, &od, &rt, &wants, &mut paused).await {
                Ok(Attempt::Done) => return,
                Ok(Attempt::LostAgain) => {
                    warn!(vm = %ctx.vm, "post-copy resume: the link died again");
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    info!(vm = %ctx.vm, source = %ctx.source, "post-copy resume: {e}; asking again in {} s", backoff.as_secs())
                }
            }
            // The guest may have run again during the attempt.
            if must_pause(&paused) {
                paused = Some(pause(rt.clone(), od.stats().missing));
            }
        }
    });
}

enum Attempt {
    Done,
    LostAgain,
}

type Paused = tokio::task::JoinHandle<bool>;

/// Pause the guest. QEMU drains the guest's requests first, so this completes only
/// once those waiting for missing chunks got them (from the resumed copy).
fn pause(rt: Arc<RunningVm>, missing: u64) -> Paused {
    tokio::spawn(async move {
        warn!(vm = %rt.name, missing, "post-copy link to the source lost; pausing the VM here");
        let vm = match rt.vm().await {
            Ok(vm) => vm,
            Err(e) => {
                warn!(vm = %rt.name, "pause after post-copy link loss: {e}");
                return false;
            }
        };
        match vm.stop().await {
            Ok(()) => {
                info!(vm = %rt.name, "VM paused: {missing} chunks missing");
                true
            }
            Err(e) => {
                warn!(vm = %rt.name, "pause after post-copy link loss: {e}");
                false
            }
        }
    })
}

async fn owned(ctx: &DestCtx, rt: &Arc<RunningVm>) -> bool {
    ctx.d
        .running(&ctx.vm)
        .await
        .is_some_and(|r| Arc::ptr_eq(&r, rt))
}

async fn attempt(
    ctx: &DestCtx,
    od: &Arc<OnDemandBackend>,
    rt: &Arc<RunningVm>,
    wants: &SharedWants,
    paused: &mut Option<Paused>,
) -> Result<Attempt> {
    let conn = ctx.d.connect_peer(&ctx.source).await?;
    let chan = |e: roam_channel::ChannelError| Error::Migration(e.to_string());
    let mut ram = ctx.ram.load(Ordering::Acquire);
    let mut _ram_in = None;
    if ram {
        match listen_for_ram(rt, &conn).await {
            Ok(t) => _ram_in = Some(t),
            // An earlier attempt recovered RAM but not the disk: the rest is disk only.
            Err(e) if ram_complete(rt).await => {
                info!(vm = %ctx.vm, "RAM post-copy already complete ({e})");
                ctx.ram.store(false, Ordering::Release);
                ram = false;
            }
            Err(e) => return Err(e),
        }
    }
    let (mut ctl_tx, mut ctl_rx) = conn.open_stream(StreamKind::Control).await.map_err(chan)?;
    send_ctl(
        &mut ctl_tx,
        &Msg::ResumeDisk {
            version: roam_migrate::PROTOCOL_VERSION,
            vm: ctx.vm.clone(),
            generation: ctx.generation,
            ram,
        },
    )
    .await?;
    match recv_ctl(&mut ctl_rx, Duration::from_secs(30)).await? {
        Msg::ResumeAccepted => {}
        Msg::Refuse { reason } => {
            return Err(Error::Migration(format!(
                "'{}' refused: {reason}",
                ctx.source
            )))
        }
        other => {
            return Err(Error::Migration(format!(
                "expected resume_accepted, got {}",
                other.name()
            )))
        }
    }
    let missing = od.missing_chunks();
    info!(vm = %ctx.vm, source = %ctx.source, missing = missing.len(), "post-copy resume accepted");
    let (mut disk_tx, disk_rx) = conn.open_stream(StreamKind::Disk).await.map_err(chan)?;
    write_list(&mut disk_tx, &missing).await?;
    let (dem_tx, dem_rx) = conn
        .open_stream(StreamKind::DiskDemand)
        .await
        .map_err(chan)?;
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(rt.disk_path())
            .map_err(|e| Error::io("open the VM's disk", e))?,
    );
    let (sw_tx, sw_rx) = oneshot::channel();
    let receiver =
        DiskReceiver::new(file, ctx.disk_bytes, CHUNK_SIZE).with_ondemand(od.clone(), sw_tx);
    let mut seal = tokio::spawn(async move {
        let mut rx = disk_rx;
        receiver.run(&mut rx, disk_tx).await
    });
    let demand = tokio::spawn(demand_client(dem_tx, dem_rx, wants.clone(), od.clone()));
    let _demand = super::postcopy::Task(demand);

    // The source named what it sends: the guest may run again (once our pause landed:
    // it completes when the requests it drained got their chunks).
    tokio::select! {
        s = sw_rx => { s.map_err(|_| Error::Migration("the resumed copy ended before its switch".into()))?; }
        _ = conn.closed() => return Ok(Attempt::LostAgain),
    }
    if let Some(p) = paused.take() {
        if p.await.unwrap_or(false) {
            let vm = rt.vm().await?;
            if vm.query_status().await.ok() == Some(roam_vm::RunState::Paused) {
                vm.cont()
                    .await
                    .map_err(|e| Error::Vm(format!("cont after the resumed switch: {e}")))?;
                info!(vm = %ctx.vm, "the guest runs again; the rest of its disk follows");
            }
        }
    }
    let outcome = tokio::select! {
        s = &mut seal => s.map_err(|e| Error::Migration(format!("resumed copy: {e}")))??,
        _ = conn.closed() => return Ok(Attempt::LostAgain),
    };
    let st = od.stats();
    let ok = outcome.ok && od.is_complete();
    let detail = (!ok).then(|| format!("{} chunks still missing", st.missing));
    send_ctl(
        &mut ctl_tx,
        &super::postcopy::disk_complete(ok, &outcome.dest_root, &st, detail),
    )
    .await?;
    if !ok {
        return Err(Error::Migration(format!(
            "the resumed copy did not complete the disk ({} chunks missing, digest {})",
            st.missing,
            if outcome.ok { "equal" } else { "different" }
        )));
    }
    // With RAM post-copy the source commits only once QEMU sent every page; a lost
    // link ends the wait sooner (the stream breaks).
    match recv_ctl(&mut ctl_rx, Duration::from_secs(24 * 3600)).await? {
        Msg::Commit {
            generation,
            replicas,
        } => {
            let d = &ctx.d;
            let mut r = d.vm_record(&ctx.vm)?;
            r.generation = r.generation.max(generation);
            d.store.put_vm(&r)?;
            d.store.log(&serde_json::json!({
                "event": "postcopy_resumed", "vm": ctx.vm, "from": ctx.source,
                "generation": r.generation, "unix_ms": now_ms(),
            }))?;
            let _ = send_ctl(&mut ctl_tx, &Msg::Committed).await;
            // No receiver saw the whole disk (it came in two copies): hash it here, in
            // the background, so that later moves to this host find its content.
            d.dedup.scan_disk(std::path::Path::new(&r.disk_path));
            crate::replication::adopt(d, &ctx.vm, &replicas).await;
            info!(vm = %ctx.vm, generation, "post-copy resumed and committed: the whole disk is here");
            conn.close(0, "done");
            Ok(Attempt::Done)
        }
        other => Err(Error::Migration(format!(
            "expected commit, got {}",
            other.name()
        ))),
    }
}

/// What settling an unconfirmed move found.
enum Settled {
    /// Post-copy storage only: this host let go; the VM's record as it is now.
    LetGo(Box<crate::state::VmRecord>),
    /// RAM post-copy: this QEMU waits, `postcopy-paused`, to resume its stream.
    RamPaused(Arc<RunningVm>),
}

/// The VM runs here on paper but its move to the asking destination was not confirmed
/// (`unknown_handovers`): the link died between this host's switch and the
/// destination's `Running`, or during a RAM post-copy. A destination that asks for the
/// rest at the generation it would own the VM at took the VM over (it asks only once it
/// recorded itself as the owner). With storage post-copy alone this QEMU is done
/// (`postmigrate`) and this host lets go now; with RAM post-copy it must first send the
/// pages it still holds.
async fn settle_unknown_handover(
    d: &Arc<Daemon>,
    asked: Asked<'_>,
) -> std::result::Result<Settled, String> {
    let Asked {
        peer,
        vm,
        generation,
        ram,
    } = asked;
    let known = d
        .unknown_handovers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(vm)
        .cloned();
    let Some(known) = known.filter(|k| k.to == peer && k.generation == generation) else {
        return Err(format!(
            "VM '{vm}' runs here; no move of it to '{peer}' at generation {generation} is pending"
        ));
    };
    let rt = d
        .running(vm)
        .await
        .ok_or_else(|| format!("VM '{vm}' has no QEMU here"))?;
    let qemu = rt.vm().await.map_err(|e| e.to_string())?;
    if known.ram {
        // QEMU's state decides: still paused (resume it), or complete after an earlier
        // request whose disk part failed (then only the disk's rest is left).
        let st = qemu
            .query_migrate()
            .await
            .map_err(|e| format!("query-migrate: {e}"))?;
        match st.status {
            roam_vm::MigrationStatus::PostcopyPaused if ram => {
                drop(qemu);
                info!(
                    vm,
                    peer, generation, "the destination asks for the rest of a RAM post-copy"
                );
                return Ok(Settled::RamPaused(rt));
            }
            roam_vm::MigrationStatus::PostcopyPaused => {
                return Err(format!(
                    "VM '{vm}': its RAM post-copy is paused here, and '{peer}' does not \
                     listen for it"
                ))
            }
            roam_vm::MigrationStatus::Completed => {}
            other => {
                return Err(format!(
                    "VM '{vm}': its RAM post-copy is {other:?} here, neither paused nor complete"
                ))
            }
        }
    }
    let state = qemu
        .query_status()
        .await
        .map_err(|e| format!("query-status: {e}"))?;
    drop(qemu);
    if state != roam_vm::RunState::Postmigrate {
        return Err(format!(
            "VM '{vm}' is {state:?} here, not done migrating; not letting go"
        ));
    }
    info!(
        vm,
        peer,
        generation,
        "the destination owns the VM (it asks for the rest of the disk): letting go"
    );
    let r = super::source::let_go(d, &rt, vm, peer)
        .await
        .map_err(|e| e.to_string())?;
    d.unknown_handovers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(vm);
    Ok(Settled::LetGo(Box::new(r)))
}

/// Destination, RAM post-copy: QEMU listens for the source's resumed stream again
/// (`migrate-recover`, out of band) and each migration stream the source opens on
/// `conn` is joined to it, as in the first copy (`relay`).
async fn listen_for_ram(
    rt: &Arc<RunningVm>,
    conn: &Connection,
) -> Result<super::postcopy::Task<()>> {
    let sock = rt.config.run_dir.join("migrate-recover.sock");
    let _ = std::fs::remove_file(&sock);
    rt.vm()
        .await?
        .migrate_recover(&format!("unix:{}", sock.display()))
        .await
        .map_err(|e| Error::Vm(format!("migrate-recover: {e}")))?;
    let conn = conn.clone();
    Ok(super::postcopy::Task(tokio::spawn(async move {
        while let Ok((kind, tx, rx)) = conn.accept_stream().await {
            if kind != StreamKind::MigrationStream {
                continue;
            }
            let sock = sock.clone();
            tokio::spawn(async move {
                if let Err(e) = super::relay::deliver(&sock, (tx, rx)).await {
                    warn!("resumed RAM stream: {e}");
                }
            });
        }
    })))
}

/// Whether this QEMU's incoming RAM post-copy completed (asked with a short timeout:
/// with pages missing the main loop may not answer).
async fn ram_complete(rt: &Arc<RunningVm>) -> bool {
    let q = async {
        let vm = rt.vm().await.ok()?;
        vm.query_migrate().await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), q).await,
        Ok(Some(st)) if st.status == roam_vm::MigrationStatus::Completed
    )
}

/// Source, RAM post-copy: resume QEMU's paused stream towards the destination over
/// `conn` and wait until every page went out.
async fn resume_ram(rt: Arc<RunningVm>, conn: Connection) -> Result<()> {
    use roam_vm::MigrationStatus as S;
    let sock = rt.config.run_dir.join("migrate-resume.sock");
    let _relay = super::relay::Relay::listen(sock.clone(), conn)?;
    let vm = rt.vm().await?;
    vm.migrate_resume(&format!("unix:{}", sock.display()))
        .await
        .map_err(|e| Error::Vm(format!("migrate resume: {e}")))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut moving = false;
    loop {
        let st = vm
            .query_migrate()
            .await
            .map_err(|e| Error::Vm(format!("query-migrate: {e}")))?;
        match st.status {
            S::Completed => return Ok(()),
            S::PostcopyActive | S::PostcopyRecover | S::PostcopyRecoverSetup => moving = true,
            S::PostcopyPaused if moving => {
                return Err(Error::Migration(
                    "the resumed RAM stream broke again".into(),
                ))
            }
            S::Failed | S::Cancelled => {
                return Err(Error::Migration(format!(
                    "the resumed RAM stream ended {:?}: {}",
                    st.status,
                    st.error_desc.unwrap_or_default()
                )))
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Migration(
                "the resumed RAM stream did not complete within an hour".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `chunks` as `Pending` frames, then `Switch` (the end of the list).
async fn write_list<W: AsyncWrite + Unpin>(w: &mut W, chunks: &[u64]) -> Result<()> {
    let io = |e| Error::io("send the list of missing chunks", e);
    for (f, body) in pending_frames(chunks) {
        w.write_all(&f.encode_header()).await.map_err(io)?;
        w.write_all(&body).await.map_err(io)?;
    }
    w.write_all(&DiskFrame::control(Kind::Switch, 0).encode_header())
        .await
        .map_err(io)?;
    w.flush().await.map_err(io)
}

/// Reads what [`write_list`] wrote; every chunk must be below `chunks`.
async fn read_list<R: AsyncRead + Unpin>(r: &mut R, chunks: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    loop {
        let (f, body) = super::disk::read_frame(r, "the list of missing chunks").await?;
        match f.kind {
            Kind::Switch => return Ok(out),
            Kind::Pending => {
                for (first, n) in
                    decode_pending(&body, chunks).map_err(|e| Error::Disk(e.to_string()))?
                {
                    out.extend(first..first + n);
                }
                if out.len() as u64 > chunks {
                    return Err(Error::Disk(
                        "the missing list is longer than the disk".into(),
                    ));
                }
            }
            other => {
                return Err(Error::Disk(format!(
                    "missing list: unexpected {other:?} frame"
                )))
            }
        }
    }
}

/// Source: a destination asks for the rest of a post-copy disk (`ResumeDisk`, just read
/// from `ctl_rx`).
pub async fn serve(
    d: Arc<Daemon>,
    conn: Connection,
    mut ctl_tx: roam_channel::SendStream,
    mut ctl_rx: roam_channel::RecvStream,
    vm: String,
    generation: u64,
    ram: bool,
) {
    let peer = conn.peer_name().unwrap_or("?").to_string();
    let asked = Asked {
        peer: &peer,
        vm: &vm,
        generation,
        ram,
    };
    match serve_inner(&d, &conn, &mut ctl_tx, &mut ctl_rx, asked).await {
        Ok(()) => conn.close(0, "done"),
        Err(Refusal::Before(reason)) => {
            info!(vm = %vm, peer = %peer, "refused to resume a post-copy disk: {reason}");
            send_last(&mut ctl_tx, &Msg::Refuse { reason }).await;
            conn.close(2, "refused");
        }
        Err(Refusal::During(e)) => {
            warn!(vm = %vm, peer = %peer, "resumed post-copy disk copy failed: {e}");
            send_last(&mut ctl_tx, &Msg::abort(e.to_string())).await;
            conn.close(2, "failed");
        }
    }
}

enum Refusal {
    /// Nothing was sent: the destination should ask again later (or never).
    Before(String),
    During(Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::During(e)
    }
}

/// What a destination asked for.
#[derive(Clone, Copy)]
struct Asked<'a> {
    peer: &'a str,
    vm: &'a str,
    generation: u64,
    ram: bool,
}

async fn serve_inner(
    d: &Arc<Daemon>,
    conn: &Connection,
    ctl_tx: &mut roam_channel::SendStream,
    ctl_rx: &mut roam_channel::RecvStream,
    asked: Asked<'_>,
) -> std::result::Result<(), Refusal> {
    let Asked {
        peer,
        vm,
        generation,
        ..
    } = asked;
    let before = |s: String| Refusal::Before(s);
    let _guard = d.claim(vm).map_err(|e| before(e.to_string()))?;
    let mut r = d.vm_record(vm).map_err(|e| before(e.to_string()))?;
    // RAM post-copy: this QEMU, paused, still holds pages; it lets go once they went.
    let mut ram_from = None;
    // (A VM recorded as moved sent all its RAM before this host let go: a `ram` in the
    // request then only means the destination listens in vain.)
    if r.status == VmStatus::Running {
        match settle_unknown_handover(d, asked).await.map_err(before)? {
            Settled::LetGo(rec) => r = *rec,
            Settled::RamPaused(rt) => ram_from = Some(rt),
        }
    }
    if ram_from.is_none() {
        if r.status != VmStatus::Moved || r.moved_to.as_deref() != Some(peer) {
            return Err(before(format!(
                "VM '{vm}' is not recorded here as moved to '{peer}' (status {:?}, moved to {:?})",
                r.status, r.moved_to
            )));
        }
        if r.generation != generation {
            return Err(before(format!(
                "VM '{vm}' moved to '{peer}' at generation {}, not {generation}",
                r.generation
            )));
        }
    }
    let file = File::open(&r.disk_path)
        .map_err(|e| before(format!("the disk kept at {}: {e}", r.disk_path)))?;
    let len = file
        .metadata()
        .map_err(|e| before(format!("the disk kept at {}: {e}", r.disk_path)))?
        .len();
    if len != r.disk_bytes {
        return Err(before(format!(
            "the disk kept at {} is {len} bytes, the VM's is {}",
            r.disk_path, r.disk_bytes
        )));
    }
    send_ctl(ctl_tx, &Msg::ResumeAccepted).await?;
    info!(vm, peer, ram = ram_from.is_some(), "resuming a post-copy");
    let ram_done = ram_from
        .clone()
        .map(|rt| super::postcopy::Task(tokio::spawn(resume_ram(rt, conn.clone()))));

    let (mut disk, mut demand) = (None, None);
    while disk.is_none() || demand.is_none() {
        let s = tokio::time::timeout(Duration::from_secs(30), conn.accept_stream())
            .await
            .map_err(|_| Error::Migration("the destination opened no disk streams".into()))?
            .map_err(|e| Error::Migration(e.to_string()))?;
        match s.0 {
            StreamKind::Disk => disk = Some((s.1, s.2)),
            StreamKind::DiskDemand => demand = Some((s.1, s.2)),
            other => warn!(vm, ?other, "resume: unexpected stream; ignored"),
        }
    }
    let (Some((mut disk_tx, mut disk_rx)), Some((dem_tx, dem_rx))) = (disk, demand) else {
        return Err(Error::Migration("resume: no disk streams".into()).into());
    };
    let chunks = roam_migrate::digest::chunk_count(r.disk_bytes, CHUNK_SIZE);
    let missing = read_list(&mut disk_rx, chunks).await?;
    let file = Arc::new(file);
    let gate = Arc::new(DemandGate::default());
    let _server = super::postcopy::Task(tokio::spawn(serve_demands(
        file.clone(),
        r.disk_bytes,
        CHUNK_SIZE,
        dem_tx,
        dem_rx,
        Arc::default(),
        gate.clone(),
    )));
    // The answer opens like a post-copy switch: the chunks that follow, then `Switch`,
    // which re-activates the destination's back end with exactly that list.
    write_list(&mut disk_tx, &missing).await?;
    let mut sender = DiskSender::new(file, r.disk_bytes, CHUNK_SIZE, RESUME_LEVEL);
    sender.yield_to(gate);
    let n = missing.len();
    let root = background_copy(sender, disk_tx, missing).await?;
    match recv_ctl(ctl_rx, Duration::from_secs(24 * 3600)).await? {
        Msg::DiskComplete {
            ok: true,
            root: theirs,
            ..
        } if theirs == root => {}
        Msg::DiskComplete {
            root: theirs,
            detail,
            ..
        } => {
            return Err(Error::Migration(format!(
                "the destination's resumed disk does not match (ours {root}, theirs {theirs}{})",
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            ))
            .into())
        }
        other => {
            return Err(
                Error::Migration(format!("expected disk_complete, got {}", other.name())).into(),
            )
        }
    }
    if let (Some(mut t), Some(rt)) = (ram_done, ram_from) {
        (&mut t.0)
            .await
            .map_err(|e| Error::Migration(format!("resumed RAM stream: {e}")))??;
        info!(vm, peer, "resumed RAM post-copy complete: letting go");
        let rec = super::source::let_go(d, &rt, vm, peer).await?;
        d.unknown_handovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
        if rec.generation != generation {
            warn!(
                vm,
                "moved at generation {}, the destination owns {generation}", rec.generation
            );
        }
    }
    // As at the end of a move: this host's links stop, the owner takes them over, and
    // the disk kept here becomes one of its replicas.
    let mut replicas = crate::replication::hand_over(d, vm).await;
    replicas.retain(|h| h != peer);
    replicas.push(d.cfg.name.clone());
    send_ctl(
        ctl_tx,
        &Msg::Commit {
            generation,
            replicas,
        },
    )
    .await?;
    match recv_ctl(ctl_rx, Duration::from_secs(60)).await {
        Ok(Msg::Committed) => {}
        Ok(other) => warn!(vm, "after the resumed commit: unexpected {}", other.name()),
        Err(e) => warn!(vm, "after the resumed commit: {e}"),
    }
    d.store.log(&serde_json::json!({
        "event": "postcopy_resumed_out", "vm": vm, "to": peer, "chunks": n,
        "generation": generation, "unix_ms": now_ms(),
    }))?;
    info!(vm, peer, chunks = n, "resumed post-copy disk copy complete");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use roam_nbd::{Backend, ChunkState, FileBackend};
    use std::os::unix::fs::FileExt;

    /// The wire of a resumed copy without sockets: a back end already switched once
    /// (the guest ran, wrote one pending chunk, then the link died) gets exactly the
    /// chunks it still lacks, never over the guest's write, and the digests agree.
    #[tokio::test]
    async fn a_resumed_copy_completes_the_disk_and_keeps_the_guests_writes() {
        let cs = CHUNK_SIZE;
        let n = 16u64;
        let size = n * cs as u64;
        let (_src, sfile, dst) = super::super::postcopy::test_support::disks(cs, n, 0..n);
        let inner: Arc<dyn Backend> = Arc::new(FileBackend::open(dst.path(), false).unwrap());
        let (fetch_tx, _wants) = tokio::sync::mpsc::unbounded_channel();
        let od = Arc::new(OnDemandBackend::new(
            inner,
            cs as u64,
            Box::new(super::super::postcopy::ChanFetcher(fetch_tx)),
        ));
        // The first copy delivered everything but 3, 5, 6 and 9 before the link died
        // (this file never saw it: those chunks stay zero here, and must stay so);
        // the guest then rewrote chunk 5 entirely.
        od.activate([3u64, 5, 6, 9]);
        od.write_at(&vec![0xAA; cs as usize], 5 * cs as u64, false)
            .unwrap();
        let missing = od.missing_chunks();
        assert_eq!(missing, vec![3, 6, 9]);

        // Destination → source: the list; source → destination: the answer.
        let (mut list_w, mut list_r) = tokio::io::duplex(1 << 16);
        write_list(&mut list_w, &missing).await.unwrap();
        let asked = read_list(&mut list_r, n).await.unwrap();
        // A stale list (5 was written since) must not matter either.
        let mut sent = asked.clone();
        sent.push(5);
        sent.sort_unstable();
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_ar, mut aw) = tokio::io::split(a);
        let (mut br, bw) = tokio::io::split(b);
        let (sw_tx, sw_rx) = oneshot::channel();
        let dfile = Arc::new(dst.reopen().unwrap());
        let receiver = DiskReceiver::new(dfile.clone(), size, cs).with_ondemand(od.clone(), sw_tx);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        write_list(&mut aw, &sent).await.unwrap();
        assert_eq!(sw_rx.await.unwrap(), 4);
        let sender = DiskSender::new(sfile, size, cs, RESUME_LEVEL);
        let root = background_copy(sender, aw, sent).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(out.ok, "{out:?}");
        assert_eq!(out.source_root, root);
        assert!(od.is_complete());
        assert_eq!(od.state(5), Some(ChunkState::Written));
        let mut buf = vec![0u8; cs as usize];
        for c in 0..n {
            dfile.read_exact_at(&mut buf, c * cs as u64).unwrap();
            let want = if c == 5 {
                0xAA
            } else if [3, 6, 9].contains(&c) {
                c as u8 + 1
            } else {
                0
            };
            assert!(buf.iter().all(|&x| x == want), "chunk {c}");
        }
    }

    #[tokio::test]
    async fn a_missing_list_round_trips_and_bad_ones_are_refused() {
        let chunks = vec![0u64, 1, 2, 7, 9, 10, 11, 4095];
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_list(&mut a, &chunks).await.unwrap();
        assert_eq!(read_list(&mut b, 4096).await.unwrap(), chunks);
        // Beyond the disk.
        write_list(&mut a, &[4096]).await.unwrap();
        assert!(read_list(&mut b, 4096).await.is_err());
        // An empty list is a list.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_list(&mut a, &[]).await.unwrap();
        assert!(read_list(&mut b, 16).await.unwrap().is_empty());
        // Not a list.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&DiskFrame::seal(0, [0; 32]).encode_header())
            .await
            .unwrap();
        assert!(read_list(&mut b, 16).await.is_err());
    }
}
