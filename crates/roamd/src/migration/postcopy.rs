//! Post-copy storage (`roam migrate --postcopy`): the guest resumes at the destination
//! right after the memory switchover; the disk follows.
//!
//! ```text
//!  source                                              destination
//!   guest paused (pre-switchover)
//!   Disk:   Pending{runs} … Switch ═══════════════════▶ OnDemandBackend::activate
//!   migrate-continue ══ device state ════════════════▶ cont: the guest runs here
//!   Disk:   Data/Raw/Zero for every pending chunk ═══▶ install (never over a guest write)
//!           … Seal{digest} ══════════════════════════▶ compare → DiskComplete
//!   DiskDemand: ◀═══ Want(chunk) ════════════════════ a guest read waits for `chunk`
//!               ═══ Data/Raw/Zero(chunk) ════════════▶ install, wake the read
//! ```
//!
//! The demand stream has a higher QUIC priority than the background copy (which sits
//! below QEMU's stream too), so a demanded chunk overtakes everything queued behind
//! it: its latency is about one round trip plus its own transfer time.
//!
//! The source's disk is final once the guest is paused there, so every chunk it sends
//! after `Switch` is the chunk's last content; a chunk sent both on demand and in the
//! background arrives twice with the same bytes, and the destination's back end keeps
//! whichever came first (or the guest's write, if the guest wrote it since).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roam_channel::{Connection, SendStream};
use roam_migrate::frame::{pending_frames, DiskFrame, Kind, HEADER_LEN};
use roam_migrate::Msg;
use roam_nbd::{Backend, Fetcher, OnDemandBackend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};

use super::disk::{allocated_chunks, DiskReceiver, DiskSender, SealOutcome};
use crate::error::{Error, Result};
use crate::runtime::RunningVm;

/// A spawned task that is aborted when dropped (a failed migration leaves none behind).
pub struct Task<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// zstd level for demanded chunks: a guest waits for them, so speed over ratio.
const DEMAND_LEVEL: i32 = 1;

/// The on-demand back end's requests, taken by one demand stream at a time.
pub type SharedWants = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<u64>>>;

/// Hands the on-demand back end's requests (NBD threads, must not block) to the
/// demand stream's task.
pub struct ChanFetcher(pub mpsc::UnboundedSender<u64>);

impl Fetcher for ChanFetcher {
    fn request(&self, chunks: &[u64]) {
        for &c in chunks {
            // A closed channel: the migration ended; the request then waits until
            // the back end is abandoned.
            let _ = self.0.send(c);
        }
    }
}

/// The chunks the destination lacks at the switch: allocated here and never sent, or
/// written since they were sent (`dirty`, from a subscription taken before the first
/// chunk was read). Every other chunk the destination holds is final: either sent and
/// not written since, or a hole on both sides (its disk started empty). Sorted.
pub fn pending_at_switch(chunks: u64, allocated: &[u64], sent: &[u64], dirty: &[u64]) -> Vec<u64> {
    let mut need = vec![false; chunks as usize];
    for &c in allocated {
        if let Some(n) = need.get_mut(c as usize) {
            *n = true;
        }
    }
    for &c in sent {
        if let Some(n) = need.get_mut(c as usize) {
            *n = false;
        }
    }
    for &c in dirty {
        if let Some(n) = need.get_mut(c as usize) {
            *n = true;
        }
    }
    (0..chunks).filter(|&c| need[c as usize]).collect()
}

/// Source, guest paused: name every chunk the destination does not hold
/// ([`pending_at_switch`]), then `Switch`. Returns the pending chunks.
pub async fn send_switch<W: AsyncWrite + Unpin>(
    w: &mut W,
    file: &File,
    disk_bytes: u64,
    chunk_size: u32,
    sent: &[u64],
    dirty: Vec<u64>,
) -> Result<Vec<u64>> {
    let allocated = allocated_chunks(file, disk_bytes, chunk_size)
        .map_err(|e| Error::io("map allocated disk ranges", e))?;
    let chunks = roam_migrate::digest::chunk_count(disk_bytes, chunk_size);
    let pending = pending_at_switch(chunks, &allocated, sent, &dirty);
    for (f, body) in pending_frames(&pending) {
        w.write_all(&f.encode_header())
            .await
            .map_err(|e| Error::io("send pending chunks", e))?;
        w.write_all(&body)
            .await
            .map_err(|e| Error::io("send pending chunks", e))?;
    }
    w.write_all(&DiskFrame::control(Kind::Switch, 0).encode_header())
        .await
        .map_err(|e| Error::io("send switch", e))?;
    w.flush().await.map_err(|e| Error::io("send switch", e))?;
    Ok(pending)
}

/// Source, after `Switch`: every pending chunk in the background, then the seal.
/// Returns the source's digest (hex).
pub async fn background_copy<W: AsyncWrite + Unpin>(
    mut sender: DiskSender,
    mut w: W,
    chunks: Vec<u64>,
) -> Result<String> {
    // Zero chunks go as `Zero` frames, unchanged ones too: the destination waits for a
    // frame for every pending chunk.
    sender.undeliver(&chunks);
    sender.send(&mut w, chunks, false).await?;
    let root = sender.seal(&mut w).await?;
    Ok(root)
}

/// Demanded chunks the source is serving. While any is, the background copy writes
/// nothing: QUIC's stream priority orders only what is already buffered, and the
/// connection's send window (about a bandwidth-delay product) is always full of
/// background data, so without the gate a demanded chunk's write would queue for
/// window space behind the background writer, which wakes on the same acks.
#[derive(Default)]
pub struct DemandGate {
    busy: AtomicUsize,
    /// The demand server ended: nobody will `leave` any more.
    closed: AtomicBool,
    idle: Notify,
}

impl DemandGate {
    fn enter(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle.notify_waiters();
    }

    /// Returns once no demanded chunk is being served.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.busy.load(Ordering::Acquire) == 0 || self.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Opens the gate for good when the demand server ends, however it ends.
struct CloseOnDrop(Arc<DemandGate>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

type Answer = Result<(DiskFrame, Vec<u8>)>;

/// Reads and compresses demanded chunks in order, on a thread of its own at a raised
/// priority: as a blocking-pool task under load (a TCG guest, the background copy's
/// compression) it waited 5-25 ms for a CPU before each 64 KiB read, a third of the
/// round trip the guest's read waits for.
fn spawn_demand_reader(
    file: Arc<File>,
    disk_bytes: u64,
    chunk_size: u32,
    wants: std::sync::mpsc::Receiver<u64>,
    answers: mpsc::UnboundedSender<Answer>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("demand-reader".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions; setpriority on our own tid affects
            // only this thread. Without root it fails and the thread keeps nice 0.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10);
            }
            let mut buf = vec![0u8; chunk_size as usize];
            for idx in wants {
                let off = idx * chunk_size as u64;
                let len = (chunk_size as u64).min(disk_bytes - off) as usize;
                let answer = super::disk::read_full(&file, &mut buf[..len], off)
                    .map_err(|e| Error::io(format!("read chunk {idx}"), e))
                    .map(|()| {
                        let (frame, body, _) = DiskFrame::for_chunk(idx, &buf[..len], DEMAND_LEVEL);
                        (frame, body)
                    });
                if answers.send(answer).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::io("start the demand reader", e))
}

/// Source: answer `Want` frames on the demand stream with the chunk, until the
/// destination closes it. `bytes` counts frame bytes sent. Reading the next chunk
/// overlaps sending the previous one; `gate` holds the background copy meanwhile.
pub async fn serve_demands<W, R>(
    file: Arc<File>,
    disk_bytes: u64,
    chunk_size: u32,
    mut tx: W,
    mut rx: R,
    bytes: Arc<AtomicU64>,
    gate: Arc<DemandGate>,
) -> Result<u64>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let _open = CloseOnDrop(gate.clone());
    let chunks = roam_migrate::digest::chunk_count(disk_bytes, chunk_size);
    let (want_tx, want_rx) = std::sync::mpsc::channel();
    let (answer_tx, mut answer_rx) = mpsc::unbounded_channel();
    spawn_demand_reader(file, disk_bytes, chunk_size, want_rx, answer_tx)?;
    let gate2 = gate.clone();
    let wants = async move {
        loop {
            let mut h = [0u8; HEADER_LEN];
            if rx.read_exact(&mut h).await.is_err() {
                return Ok(()); // the destination is done (or gone)
            }
            let f = DiskFrame::decode_header(&h).map_err(|e| Error::Disk(e.to_string()))?;
            if f.kind != Kind::Want || f.index >= chunks {
                return Err(Error::Disk(format!(
                    "demand stream: unexpected {:?} {}",
                    f.kind, f.index
                )));
            }
            gate2.enter();
            if want_tx.send(f.index).is_err() {
                return Err(Error::Disk("the demand reader stopped".into()));
            }
        }
    };
    let answers = async move {
        let mut served = 0u64;
        while let Some(answer) = answer_rx.recv().await {
            let (frame, body) = answer?;
            let sent = async {
                tx.write_all(&frame.encode_header()).await?;
                if !body.is_empty() {
                    tx.write_all(&body).await?;
                }
                tx.flush().await
            };
            sent.await
                .map_err(|e| Error::io("send demanded chunk", e))?;
            gate.leave();
            bytes.fetch_add((HEADER_LEN + body.len()) as u64, Ordering::Relaxed);
            served += 1;
        }
        Ok::<u64, Error>(served)
    };
    tokio::pin!(wants, answers);
    tokio::select! {
        // The destination closed the stream: send what is still queued, then stop.
        w = &mut wants => {
            w?;
            answers.await
        }
        a = &mut answers => a,
    }
}

/// Destination: carry the back end's requests to the source as `Want` frames, and
/// install the answers at once (waking the waiting reads). They do not queue behind the
/// background copy's writer: the background copy carries every pending chunk too, and
/// its frames are the ones the seal's digest counts, so a demanded chunk needs no
/// bookkeeping beyond its own hash check. The back end's requests are shared: after a
/// lost link, the resumed copy's client takes over what the dead one left queued.
pub async fn demand_client<W, R>(mut tx: W, mut rx: R, wants: SharedWants, od: Arc<OnDemandBackend>)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let ask = async move {
        let mut wants = wants.lock_owned().await;
        while let Some(c) = wants.recv().await {
            let mut batch = vec![c];
            while let Ok(c) = wants.try_recv() {
                batch.push(c);
            }
            for c in batch {
                if tx
                    .write_all(&DiskFrame::control(Kind::Want, c).encode_header())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tx.flush().await.is_err() {
                return;
            }
        }
    };
    let answers = async move {
        loop {
            let mut h = [0u8; HEADER_LEN];
            if rx.read_exact(&mut h).await.is_err() {
                return;
            }
            let f = match DiskFrame::decode_header(&h) {
                Ok(f) if matches!(f.kind, Kind::Data | Kind::Raw | Kind::Zero) => f,
                Ok(f) => {
                    warn!("demand stream: unexpected {:?} frame; closing it", f.kind);
                    return;
                }
                Err(e) => {
                    warn!("demand stream: {e}; closing it");
                    return;
                }
            };
            // Bounded by the header check (MAX_CHUNK) before this allocation.
            let mut body = vec![0u8; f.body_len as usize];
            if rx.read_exact(&mut body).await.is_err() {
                return;
            }
            let od = od.clone();
            let installed = tokio::task::spawn_blocking(move || -> Result<()> {
                if f.kind == Kind::Zero {
                    od.install_zero(f.index)
                        .map_err(|e| Error::io("install demanded chunk", e))?;
                } else {
                    let data = f
                        .decode_body(&body)
                        .map_err(|e| Error::Disk(e.to_string()))?;
                    od.install(f.index, &data)
                        .map_err(|e| Error::io("install demanded chunk", e))?;
                }
                Ok(())
            })
            .await;
            match installed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!("demand stream: {e}; closing it");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = ask => {}
        _ = answers => {}
    }
}

/// Destination, once the guest may run here with chunks missing: if the link to the
/// source dies before the move committed, ask the source again for the rest (pausing the
/// guest meanwhile when chunks are missing; `super::resume`).
fn watch_link(
    conn: Connection,
    od: Arc<OnDemandBackend>,
    rt: Arc<RunningVm>,
    ctx: super::resume::DestCtx,
    wants: SharedWants,
    committed: Arc<AtomicBool>,
) {
    tokio::spawn(async move {
        let why = conn.closed().await;
        // Give a disk that is completing its last chunks, or a commit, a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if committed.load(Ordering::Acquire) {
            return;
        }
        warn!(vm = %rt.name, missing = od.stats().missing, "post-copy link to the source lost before the commit ({why})");
        super::resume::after_link_loss(ctx, od, rt, wants);
    });
}

type SealRx = oneshot::Receiver<Result<SealOutcome>>;
type Layer = Box<crate::runtime::BackendLayer>;

/// The destination's post-copy state for one incoming migration.
pub struct DestPostcopy {
    /// Set when the VM's disk is served (the layer builds the back end).
    od: Arc<std::sync::Mutex<Option<Arc<OnDemandBackend>>>>,
    fetch_tx: mpsc::UnboundedSender<u64>,
    wants: SharedWants,
    switched: Option<oneshot::Receiver<u64>>,
    seal: Option<SealRx>,
    conn: Option<Connection>,
    rt: Option<Arc<RunningVm>>,
    /// Who to ask for the rest should the link die (set by the destination).
    resume: Option<super::resume::DestCtx>,
    /// The source's `Commit` arrived: a closed link is the end, not a loss.
    committed: Arc<AtomicBool>,
}

impl Default for DestPostcopy {
    fn default() -> Self {
        Self::new()
    }
}

impl DestPostcopy {
    pub fn new() -> DestPostcopy {
        let (fetch_tx, wants) = mpsc::unbounded_channel();
        DestPostcopy {
            od: Default::default(),
            fetch_tx,
            wants: Arc::new(tokio::sync::Mutex::new(wants)),
            switched: None,
            seal: None,
            conn: None,
            rt: None,
            resume: None,
            committed: Arc::default(),
        }
    }

    /// Where to ask for the rest of the disk if the link dies after the switch.
    pub fn set_resume(&mut self, ctx: super::resume::DestCtx) {
        self.resume = Some(ctx);
    }

    /// RAM post-copy is under way too: a resume must recover QEMU's stream as well.
    pub fn note_ram_postcopy(&self) {
        if let Some(r) = &self.resume {
            r.ram.store(true, Ordering::Release);
        }
    }

    /// The move committed: the link's end is no loss any more.
    pub fn committed(&self) {
        self.committed.store(true, Ordering::Release);
    }

    fn od(&self) -> Option<Arc<OnDemandBackend>> {
        self.od.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The back-end layer for the incoming VM's disk: the on-demand back end.
    pub fn layer(&self, chunk_size: u32) -> Layer {
        let (slot, tx) = (self.od.clone(), self.fetch_tx.clone());
        Box::new(move |inner: Arc<dyn Backend>| -> Arc<dyn Backend> {
            let od = Arc::new(OnDemandBackend::new(
                inner,
                chunk_size as u64,
                Box::new(ChanFetcher(tx.clone())),
            ));
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(od.clone());
            od
        })
    }

    /// Route the receiver's chunks through the back end; returns the receiver and what
    /// the demand stream's task needs (the back end's requests, the writer's queue).
    #[allow(clippy::type_complexity)]
    pub fn attach(
        &mut self,
        receiver: DiskReceiver,
        conn: &Connection,
        rt: &Arc<RunningVm>,
    ) -> Result<(DiskReceiver, (SharedWants, Arc<OnDemandBackend>))> {
        let od = self.od().ok_or_else(|| {
            Error::Disk("post-copy: the on-demand back end is not serving".into())
        })?;
        if self.switched.is_some() || self.conn.is_some() {
            return Err(Error::Disk("post-copy: attached twice".into()));
        }
        let _ = rt.ondemand.set(od.clone());
        let wants = self.wants.clone();
        let (tx, rx) = oneshot::channel();
        self.switched = Some(rx);
        self.conn = Some(conn.clone());
        self.rt = Some(rt.clone());
        let receiver = receiver.with_ondemand(od.clone(), tx);
        Ok((receiver, (wants, od)))
    }

    /// Wait for the source's `Switch` (the guest is paused there and the back end knows
    /// what is missing). Keeps the seal's receiver for [`complete`](Self::complete).
    pub async fn await_switch(&mut self, disk_rx: &mut Option<SealRx>) -> Result<()> {
        self.seal = disk_rx.take();
        let switched = self
            .switched
            .take()
            .ok_or_else(|| Error::Disk("post-copy: not attached".into()))?;
        let pending = match switched.await {
            Ok(n) => n,
            Err(_) => {
                // The writer stopped before the switch: its error says why.
                let why = match self.seal.take() {
                    Some(rx) => match rx.await {
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(_)) => "sealed without a switch".into(),
                        Err(_) => "the disk stream never arrived".into(),
                    },
                    None => "no disk stream".into(),
                };
                return Err(Error::Migration(format!("post-copy switch: {why}")));
            }
        };
        info!(
            pending,
            "post-copy: switch received; the guest may run with chunks missing"
        );
        if let (Some(conn), Some(od), Some(rt), Some(ctx)) =
            (&self.conn, self.od(), &self.rt, &self.resume)
        {
            watch_link(
                conn.clone(),
                od,
                rt.clone(),
                ctx.clone(),
                self.wants.clone(),
                self.committed.clone(),
            );
        }
        Ok(())
    }

    /// After the agent's verification: wait for the background copy's seal and tell the
    /// source (`DiskComplete`), with the on-demand figures.
    pub async fn complete(&mut self, ctl_tx: &mut SendStream) -> Result<()> {
        let Some(rx) = self.seal.take() else {
            return Ok(()); // already reported
        };
        let seal = rx
            .await
            .map_err(|_| Error::Migration("post-copy: the disk writer vanished".into()))??;
        let st = self.od().map(|od| od.stats()).unwrap_or_default();
        info!(
            ok = seal.ok,
            demand_fetches = st.demand_fetches,
            waits = st.waits,
            p50_ms = st.wait_p50_ms,
            max_ms = st.wait_max_ms,
            superseded = st.superseded,
            "post-copy: disk complete"
        );
        let detail = (!seal.ok).then(|| {
            format!(
                "{} of {} frames received, {} chunks missing",
                seal.frames_received, seal.frames_expected, st.missing
            )
        });
        super::send_ctl(
            ctl_tx,
            &disk_complete(seal.ok, &seal.dest_root, &st, detail),
        )
        .await
    }

    /// The VM is being torn down: no request may wait for a chunk any more.
    pub fn abandon(&self) {
        if let Some(od) = self.od() {
            od.abandon();
        }
    }
}

/// `DiskComplete` with the on-demand back end's figures.
pub fn disk_complete(
    ok: bool,
    root: &str,
    st: &roam_nbd::OnDemandStats,
    detail: Option<String>,
) -> Msg {
    Msg::DiskComplete {
        ok,
        root: root.to_string(),
        demand_fetches: st.demand_fetches,
        waits: st.waits,
        wait_p50_ms: st.wait_p50_ms,
        wait_max_ms: st.wait_max_ms,
        fetch_p50_ms: st.fetch_p50_ms,
        fetch_max_ms: st.fetch_max_ms,
        single_reads: st.single_reads,
        single_read_p50_ms: st.single_read_p50_ms,
        single_read_max_ms: st.single_read_max_ms,
        superseded: st.superseded,
        detail,
    }
}

/// RAM post-copy at the destination: QEMU reports `postcopy-active` from the source's
/// `listen` command on, before the device state is loaded. Started with -S (autostart
/// off), QEMU leaves run state `inmigrate` for `paused` once it processed the source's
/// `run`: only then is the device state in, and `cont` may follow (after roamd took
/// ownership). Waits for that, or for a final or paused migration state.
pub(crate) async fn await_ram_postcopy_run(rt: &RunningVm) -> Result<roam_vm::MigrationStats> {
    use roam_vm::{MigrationStatus, RunState};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let vm = rt.vm().await?;
        let st = vm
            .query_migrate()
            .await
            .map_err(|e| Error::Vm(format!("query-migrate: {e}")))?;
        if st.status != MigrationStatus::PostcopyActive {
            return Ok(st);
        }
        let run = vm
            .query_status()
            .await
            .map_err(|e| Error::Vm(format!("query-status: {e}")))?;
        if run != RunState::Inmigrate {
            return Ok(st);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Migration(
                "RAM post-copy: the device state never finished loading".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fixtures shared by the post-copy tests of this module and of `resume`.
#[cfg(test)]
pub(crate) mod test_support {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    /// A source disk of `n` chunks where each chunk `c` of `filled` holds the byte
    /// `c + 1` (the rest zero), and an empty destination disk of the same size.
    pub fn disks(
        cs: u32,
        n: u64,
        filled: impl IntoIterator<Item = u64>,
    ) -> (tempfile::NamedTempFile, Arc<File>, tempfile::NamedTempFile) {
        let size = n * cs as u64;
        let src = tempfile::NamedTempFile::new().unwrap();
        src.as_file().set_len(size).unwrap();
        for c in filled {
            src.as_file()
                .write_all_at(&vec![c as u8 + 1; cs as usize], c * cs as u64)
                .unwrap();
        }
        let sfile = Arc::new(src.reopen().unwrap());
        let dst = tempfile::NamedTempFile::new().unwrap();
        dst.as_file().set_len(size).unwrap();
        (src, sfile, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roam_nbd::{ChunkState, FileBackend};
    use std::os::unix::fs::FileExt;

    #[test]
    fn pending_is_unsent_allocated_plus_rewritten() {
        // allocated 1,2,5,7; sent 1,2,9 (9 since discarded: dirty); 2 rewritten
        let p = pending_at_switch(10, &[1, 2, 5, 7], &[1, 2, 9], &[2, 9]);
        assert_eq!(p, vec![2, 5, 7, 9]);
    }

    /// The wire and the back end together, without QEMU: switch, a guest write to a
    /// pending chunk, a guest read served on demand, the background copy, the seal.
    #[tokio::test]
    async fn switch_demand_background_and_seal_keep_the_guests_write() {
        let cs = 65536u32;
        let n = 32u64;
        let size = n * cs as u64;
        let (_src, sfile, dst) = super::test_support::disks(cs, n, [1u64, 2, 3, 10, 20, 31]);
        let dfile = Arc::new(dst.reopen().unwrap());

        let (fetch_tx, wants) = mpsc::unbounded_channel();
        let inner: Arc<dyn Backend> = Arc::new(FileBackend::open(dst.path(), false).unwrap());
        let od = Arc::new(OnDemandBackend::new(
            inner,
            cs as u64,
            Box::new(ChanFetcher(fetch_tx)),
        ));
        let (sw_tx, sw_rx) = oneshot::channel();
        let receiver = DiskReceiver::new(dfile.clone(), size, cs).with_ondemand(od.clone(), sw_tx);

        // Background stream and demand stream, each a pair of pipes.
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_ar, mut aw) = tokio::io::split(a);
        let (mut br, bw) = tokio::io::split(b);
        let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
        let (d_src, d_dst) = tokio::io::duplex(1 << 20);
        let (d_src_r, d_src_w) = tokio::io::split(d_src);
        let (d_dst_r, d_dst_w) = tokio::io::split(d_dst);
        let server = tokio::spawn(serve_demands(
            sfile.clone(),
            size,
            cs,
            d_src_w,
            d_src_r,
            Arc::default(),
            Arc::default(),
        ));
        tokio::spawn(demand_client(
            d_dst_w,
            d_dst_r,
            Arc::new(tokio::sync::Mutex::new(wants)),
            od.clone(),
        ));

        // Before the switch chunk 3 was sent (final) and chunk 10 sent, then rewritten.
        let mut sender = DiskSender::new(sfile.clone(), size, cs, 3);
        sender.send(&mut aw, vec![3, 10], true).await.unwrap();
        let pending = send_switch(&mut aw, &sfile, size, cs, &[3, 10], vec![10])
            .await
            .unwrap();
        assert_eq!(pending, vec![1, 2, 10, 20, 31]);
        assert_eq!(sw_rx.await.unwrap(), 5);
        assert_eq!(
            od.state(3),
            Some(ChunkState::Fetched),
            "sent before the switch"
        );
        assert_eq!(
            od.state(5),
            Some(ChunkState::Fetched),
            "zero at the source: present"
        );
        assert_eq!(od.state(10), Some(ChunkState::Missing));

        // The guest rewrites chunk 2 entirely and reads chunk 20 (fetched on demand).
        let g = od.clone();
        let read20 = tokio::task::spawn_blocking(move || {
            g.write_at(&vec![0xAA; cs as usize], 2 * cs as u64, false)
                .unwrap();
            let mut b = vec![0u8; 4096];
            g.read_at(&mut b, 20 * cs as u64 + 100).unwrap();
            b
        })
        .await
        .unwrap();
        assert!(read20.iter().all(|&x| x == 21));
        assert_eq!(od.stats().demand_fetches, 1);

        // The background copy sends everything, chunk 2 included: it must not land.
        let root = background_copy(sender, aw, pending).await.unwrap();
        let out = recv.await.unwrap().unwrap();
        assert!(out.ok, "{out:?}");
        assert_eq!(out.source_root, root);
        assert!(od.is_complete());
        assert_eq!(od.stats().superseded, 1);
        let mut b = vec![0u8; cs as usize];
        dfile.read_exact_at(&mut b, 2 * cs as u64).unwrap();
        assert!(
            b.iter().all(|&x| x == 0xAA),
            "the guest's write was overwritten"
        );
        for c in [1u64, 3, 10, 20, 31] {
            dfile.read_exact_at(&mut b, c * cs as u64).unwrap();
            assert!(b.iter().all(|&x| x == c as u8 + 1), "chunk {c}");
        }
        server.abort();
    }
}
