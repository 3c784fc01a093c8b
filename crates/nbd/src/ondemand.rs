//! A back end whose chunks arrive after the guest already runs (post-copy storage).
//!
//! [`OnDemandBackend`] wraps the destination's disk file during a post-copy migration.
//! It knows, per chunk (64 KiB, the migration's chunking), whether the file holds the
//! chunk's current content. A guest read that touches a missing chunk asks a
//! [`Fetcher`] for it and waits only for the chunks it needs; the background copy
//! delivers everything else through [`OnDemandBackend::install`].
//!
//! ```text
//!  guest I/O ─▶ read_at/write_at ─┬─ every touched chunk present ─▶ inner (no wait)
//!                                 └─ some missing ─▶ Fetcher::request ─▶ (network)
//!                                        wait ◀── install(chunk, bytes) ◀─ demand/background
//! ```
//!
//! # Chunk states and the one rule that matters
//!
//! ```text
//!   Missing ──request──▶ Requested ──install──▶ Fetched
//!      │                     │
//!      └──── guest write covering the whole chunk ──▶ Written
//! ```
//!
//! **A chunk the guest wrote is never overwritten by a chunk from the source.** The
//! source's copy of a chunk is older than any write the guest made here, so an
//! `install` that finds a chunk `Written` (or, once active, `Fetched`) drops its bytes.
//! All state changes happen under one mutex, and `install` does its `pwrite` while
//! holding it, so "check the state, then write" cannot interleave with a guest write
//! to the same chunk. A guest write that only partly covers a missing chunk first
//! fetches the chunk (the rest of it must be the source's bytes), then writes; a write
//! covering a whole missing chunk needs nothing from the source and marks it `Written`.
//!
//! I/O to chunks that are present goes to the inner back end without the lock: after
//! activation no `install` ever writes a present chunk, so nothing can race it.
//!
//! # Activation
//!
//! Before [`OnDemandBackend::activate`] the guest does not run here (its QEMU is held)
//! and `install` may overwrite earlier installs (a chunk sent twice while the source's
//! guest still ran). `activate(pending)` is the switchover: every chunk not in
//! `pending` holds its final content; the pending ones become `Missing`. I/O before
//! activation is not the guest's (its QEMU is held, `-S`) but QEMU's own, e.g. reading
//! sector 0 while it realizes the disk device: it passes straight to the file, as it
//! would on a pre-copy destination, and must not wait (QEMU's main loop would block on
//! it, and the migration with it).
//!
//! When every chunk is present the back end is a pass-through (one atomic load).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// Asks the source for chunks. Called from the NBD connection threads: it must not
/// block (queue the request and return).
pub trait Fetcher: Send + Sync + 'static {
    /// Fetch these chunks (each asked for at most once per back end).
    fn request(&self, chunks: &[u64]);
}

/// Where one chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Not here yet, nobody asked for it.
    Missing,
    /// Asked for; waiting for it to arrive.
    Requested,
    /// Holds the source's content.
    Fetched,
    /// The guest wrote the whole chunk here (or filled it after a fetch): the source's
    /// content must never replace it.
    Written,
}

impl ChunkState {
    pub fn present(self) -> bool {
        matches!(self, ChunkState::Fetched | ChunkState::Written)
    }
}

/// What a guest write has to do first (pure decision, see [`Presence::plan_write`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritePlan {
    /// Every touched chunk is present: write without the lock.
    Direct,
    /// Wait for these partly covered chunks first (`request` lists the ones to ask
    /// for now; the others are already on their way), then plan again.
    Fetch { request: Vec<u64> },
    /// Write under the lock and mark these fully covered missing chunks `Written`.
    Fill { mark: Vec<u64> },
}

/// The pure state of an on-demand disk: one [`ChunkState`] per chunk. No I/O, so the
/// rules can be tested on their own.
#[derive(Debug, Clone)]
pub struct Presence {
    states: Vec<ChunkState>,
    chunk: u64,
    size: u64,
    active: bool,
    missing: u64,
}

impl Presence {
    /// A disk of `size` bytes in chunks of `chunk` bytes, nothing present, not active.
    pub fn new(size: u64, chunk: u64) -> Presence {
        let n = size.div_ceil(chunk.max(1));
        Presence {
            states: vec![ChunkState::Missing; n as usize],
            chunk: chunk.max(1),
            size,
            active: false,
            missing: n,
        }
    }

    pub fn chunks(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn state(&self, idx: u64) -> Option<ChunkState> {
        self.states.get(idx as usize).copied()
    }

    /// Chunks not present yet.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// The chunks not present yet, ascending (a resumed copy asks for exactly these).
    pub fn missing_chunks(&self) -> Vec<u64> {
        (0..self.chunks())
            .filter(|&c| !self.states[c as usize].present())
            .collect()
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Byte range of chunk `idx` (the last one may be short).
    pub fn range(&self, idx: u64) -> (u64, u64) {
        let off = idx * self.chunk;
        (off, self.chunk.min(self.size.saturating_sub(off)))
    }

    fn touched(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let last = (offset + len - 1) / self.chunk;
        (offset / self.chunk)..(last + 1).min(self.chunks())
    }

    fn set(&mut self, idx: u64, s: ChunkState) {
        if let Some(slot) = self.states.get_mut(idx as usize) {
            if slot.present() != s.present() {
                if s.present() {
                    self.missing -= 1;
                } else {
                    self.missing += 1;
                }
            }
            *slot = s;
        }
    }

    /// The switchover: chunks in `pending` are not final here yet; all others are.
    /// Requests made before activation are forgotten (none are sent before it).
    ///
    /// Activating again (a post-copy resumed after a lost link) never demotes a chunk
    /// that is present here: `pending` was listed before the resumed demand stream
    /// delivered what blocked reads and partial writes waited for, and a guest write
    /// that then completed into such a chunk leaves it `Fetched`, not `Written`. Marking
    /// it missing again would let the source's older bytes overwrite an acknowledged
    /// write.
    pub fn activate(&mut self, pending: impl IntoIterator<Item = u64>) {
        let again = self.active;
        let n = self.chunks();
        let mut is_pending = vec![false; n as usize];
        for c in pending {
            if let Some(p) = is_pending.get_mut(c as usize) {
                *p = true;
            }
        }
        for (i, p) in is_pending.into_iter().enumerate() {
            let i = i as u64;
            match (self.state(i), p) {
                (Some(ChunkState::Written), _) => {}
                (Some(s), true) if again && s.present() => {}
                (_, true) => self.set(i, ChunkState::Missing),
                (_, false) => self.set(i, ChunkState::Fetched),
            }
        }
        self.active = true;
    }

    /// How many chunks of `[offset, offset+len)` are not present.
    pub fn absent(&self, offset: u64, len: u64) -> u64 {
        if !self.active {
            return 0;
        }
        self.touched(offset, len)
            .filter(|&c| !self.states[c as usize].present())
            .count() as u64
    }

    /// A read of `[offset, offset+len)`: the chunks to ask for now (moved to
    /// `Requested`), and whether the read must wait. Before activation it neither asks
    /// nor waits (see the module doc).
    pub fn plan_read(&mut self, offset: u64, len: u64) -> (Vec<u64>, bool) {
        if !self.active {
            return (Vec::new(), false);
        }
        let mut request = Vec::new();
        let mut wait = false;
        for c in self.touched(offset, len) {
            match self.states[c as usize] {
                ChunkState::Missing => {
                    self.states[c as usize] = ChunkState::Requested;
                    request.push(c);
                    wait = true;
                }
                ChunkState::Requested => wait = true,
                _ => {}
            }
        }
        (request, wait)
    }

    /// A write (or zeroing) of `[offset, offset+len)`. Before activation: `Direct`
    /// (not the guest's; see the module doc).
    pub fn plan_write(&mut self, offset: u64, len: u64) -> WritePlan {
        if !self.active {
            return WritePlan::Direct;
        }
        let end = offset + len;
        let mut request = Vec::new();
        let mut partial_waiting = false;
        let mut mark = Vec::new();
        for c in self.touched(offset, len) {
            let st = self.states[c as usize];
            if st.present() {
                continue;
            }
            let (co, cl) = self.range(c);
            let whole = offset <= co && end >= co + cl;
            if whole {
                mark.push(c);
            } else {
                partial_waiting = true;
                if st == ChunkState::Missing {
                    self.states[c as usize] = ChunkState::Requested;
                    request.push(c);
                }
            }
        }
        if partial_waiting {
            WritePlan::Fetch { request }
        } else if mark.is_empty() {
            WritePlan::Direct
        } else {
            WritePlan::Fill { mark }
        }
    }

    /// The guest's write to these (whole, previously missing) chunks completed.
    pub fn mark_written(&mut self, chunks: &[u64]) {
        for &c in chunks {
            self.set(c, ChunkState::Written);
        }
    }

    /// May the source's bytes for chunk `idx` be written now? Never over a guest
    /// write; after activation, never over anything present.
    pub fn may_install(&self, idx: u64) -> bool {
        match self.state(idx) {
            None | Some(ChunkState::Written) => false,
            Some(ChunkState::Fetched) => !self.active,
            Some(_) => true,
        }
    }

    /// The source's bytes for chunk `idx` were written.
    pub fn installed(&mut self, idx: u64) {
        if self.state(idx).is_some_and(|s| s != ChunkState::Written) {
            self.set(idx, ChunkState::Fetched);
        }
    }

    /// Chunks of `[offset, offset+len)` that are present, as byte ranges clipped to
    /// the request (consecutive chunks merged): what a trim may pass down.
    pub fn present_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset + len;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in self.touched(offset, len) {
            if !self.states[c as usize].present() {
                continue;
            }
            let (co, cl) = self.range(c);
            let (s, e) = (co.max(offset), (co + cl).min(end));
            match out.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += e - s,
                _ => out.push((s, e - s)),
            }
        }
        out
    }
}

/// Figures of one on-demand back end, for the migration's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OnDemandStats {
    /// Chunks asked for on demand (ahead of the background copy).
    pub demand_fetches: u64,
    /// Guest requests that had to wait for a chunk.
    pub waits: u64,
    /// Median and longest wait, milliseconds.
    pub wait_p50_ms: f64,
    pub wait_max_ms: f64,
    /// Per demanded chunk, from the request to its arrival (whichever stream brought
    /// it): what a guest read of that one missing block waits (benchmark 3).
    pub fetches_timed: u64,
    pub fetch_p50_ms: f64,
    pub fetch_max_ms: f64,
    /// Guest reads that needed exactly one missing chunk (a read of one missing
    /// block: benchmark 3's figure), from the request to its data, milliseconds.
    pub single_reads: u64,
    pub single_read_p50_ms: f64,
    pub single_read_max_ms: f64,
    /// Chunks still missing.
    pub missing: u64,
    /// Source chunks dropped because the guest had written the chunk already.
    pub superseded: u64,
}

/// Most waits kept for the percentiles (older ones are dropped).
const MAX_WAIT_SAMPLES: usize = 65_536;

struct Shared {
    p: Presence,
    waits_us: Vec<u64>,
    fetch_us: Vec<u64>,
    single_us: Vec<u64>,
    requested_at: std::collections::HashMap<u64, Instant>,
    abandoned: bool,
}

/// The on-demand back end (see the module doc).
pub struct OnDemandBackend {
    inner: Arc<dyn Backend>,
    fetcher: Box<dyn Fetcher>,
    state: Mutex<Shared>,
    arrived: Condvar,
    /// Every chunk present and active: the pass-through fast path.
    complete: AtomicBool,
    demand_fetches: AtomicU64,
    superseded: AtomicU64,
}

impl std::fmt::Debug for OnDemandBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemandBackend")
            .field("complete", &self.complete.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn push_sample(v: &mut Vec<u64>, since: Instant) {
    if v.len() >= MAX_WAIT_SAMPLES {
        v.remove(0);
    }
    v.push(since.elapsed().as_micros() as u64);
}

fn note_requested(s: &mut Shared, chunks: &[u64]) {
    let now = Instant::now();
    for &c in chunks {
        s.requested_at.insert(c, now);
    }
}

/// A requested chunk arrived: time its fetch.
fn note_arrived(s: &mut Shared, idx: u64) {
    if let Some(t) = s.requested_at.remove(&idx) {
        push_sample(&mut s.fetch_us, t);
    }
}

fn abandoned_err() -> io::Error {
    io::Error::other("post-copy disk abandoned: the missing chunk will not arrive")
}

impl OnDemandBackend {
    /// Wraps `inner`, with chunks of `chunk` bytes, every chunk missing until
    /// [`activate`](Self::activate).
    pub fn new(inner: Arc<dyn Backend>, chunk: u64, fetcher: Box<dyn Fetcher>) -> Self {
        let p = Presence::new(inner.size(), chunk);
        OnDemandBackend {
            inner,
            fetcher,
            state: Mutex::new(Shared {
                p,
                waits_us: Vec::new(),
                fetch_us: Vec::new(),
                single_us: Vec::new(),
                requested_at: Default::default(),
                abandoned: false,
            }),
            arrived: Condvar::new(),
            complete: AtomicBool::new(false),
            demand_fetches: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_complete(&self, s: &Shared) {
        if s.p.active && s.p.missing == 0 {
            self.complete.store(true, Ordering::Release);
        }
    }

    /// The switchover (see the module doc). Wakes every waiting request.
    pub fn activate(&self, pending: impl IntoIterator<Item = u64>) {
        let mut s = self.lock();
        s.p.activate(pending);
        self.update_complete(&s);
        drop(s);
        self.arrived.notify_all();
    }

    /// Writes the source's `data` for chunk `idx` unless the guest already wrote that
    /// chunk here. Returns whether it was written.
    pub fn install(&self, idx: u64, data: &[u8]) -> io::Result<bool> {
        let mut s = self.lock();
        if !s.p.may_install(idx) {
            if s.p.state(idx) == Some(ChunkState::Written) {
                self.superseded.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(false);
        }
        let (off, len) = s.p.range(idx);
        if data.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk {idx} is {len} bytes, got {}", data.len()),
            ));
        }
        // Written while holding the lock: a guest write to this chunk waits for us.
        self.inner.write_at(data, off, false)?;
        s.p.installed(idx);
        note_arrived(&mut s, idx);
        self.update_complete(&s);
        drop(s);
        self.arrived.notify_all();
        Ok(true)
    }

    /// As [`install`](Self::install) for an all-zero chunk.
    pub fn install_zero(&self, idx: u64) -> io::Result<bool> {
        let mut s = self.lock();
        if !s.p.may_install(idx) {
            if s.p.state(idx) == Some(ChunkState::Written) {
                self.superseded.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(false);
        }
        let (off, len) = s.p.range(idx);
        self.inner.write_zeroes(off, len, true, false)?;
        s.p.installed(idx);
        note_arrived(&mut s, idx);
        self.update_complete(&s);
        drop(s);
        self.arrived.notify_all();
        Ok(true)
    }

    /// Every waiting and future request that needs a missing chunk fails with EIO
    /// instead of waiting: the VM is being torn down.
    pub fn abandon(&self) {
        self.lock().abandoned = true;
        self.arrived.notify_all();
    }

    /// True once every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    pub fn state(&self, idx: u64) -> Option<ChunkState> {
        self.lock().p.state(idx)
    }

    /// The chunks not present yet, ascending (after a lost link: what to ask for again).
    pub fn missing_chunks(&self) -> Vec<u64> {
        self.lock().p.missing_chunks()
    }

    pub fn stats(&self) -> OnDemandStats {
        let s = self.lock();
        let sorted = |v: &Vec<u64>| {
            let mut v = v.clone();
            v.sort_unstable();
            v
        };
        let (w, one, single) = (
            sorted(&s.waits_us),
            sorted(&s.fetch_us),
            sorted(&s.single_us),
        );
        let ms = |us: u64| us as f64 / 1000.0;
        let p50 = |v: &Vec<u64>| v.get(v.len() / 2).copied().map(ms).unwrap_or(0.0);
        let max = |v: &Vec<u64>| v.last().copied().map(ms).unwrap_or(0.0);
        OnDemandStats {
            demand_fetches: self.demand_fetches.load(Ordering::Relaxed),
            waits: w.len() as u64,
            wait_p50_ms: p50(&w),
            wait_max_ms: max(&w),
            fetches_timed: one.len() as u64,
            fetch_p50_ms: p50(&one),
            fetch_max_ms: max(&one),
            single_reads: single.len() as u64,
            single_read_p50_ms: p50(&single),
            single_read_max_ms: max(&single),
            missing: s.p.missing,
            superseded: self.superseded.load(Ordering::Relaxed),
        }
    }

    fn request(&self, chunks: &[u64]) {
        if !chunks.is_empty() {
            self.demand_fetches
                .fetch_add(chunks.len() as u64, Ordering::Relaxed);
            self.fetcher.request(chunks);
        }
    }

    fn wait<'a>(&self, s: MutexGuard<'a, Shared>) -> io::Result<MutexGuard<'a, Shared>> {
        if s.abandoned {
            return Err(abandoned_err());
        }
        // Timed, so a lost wake-up can only cost a second, never a hang.
        let (s, _) = self
            .arrived
            .wait_timeout(s, Duration::from_secs(1))
            .unwrap_or_else(|p| p.into_inner());
        Ok(s)
    }

    fn record_wait(&self, s: &mut Shared, since: Option<Instant>) {
        if let Some(t) = since {
            push_sample(&mut s.waits_us, t);
        }
    }

    /// Runs a write-like operation over `[offset, offset+len)` with the rules above.
    fn write_like(&self, offset: u64, len: u64, op: impl Fn() -> io::Result<()>) -> io::Result<()> {
        if self.complete.load(Ordering::Acquire) {
            return op();
        }
        let mut s = self.lock();
        let mut since = None;
        loop {
            match s.p.plan_write(offset, len) {
                WritePlan::Direct => {
                    self.record_wait(&mut s, since);
                    drop(s);
                    return op();
                }
                WritePlan::Fill { mark } => {
                    self.record_wait(&mut s, since);
                    // Under the lock: an install of these chunks cannot slip in
                    // between our write and the mark.
                    op()?;
                    s.p.mark_written(&mark);
                    for c in &mark {
                        s.requested_at.remove(c);
                    }
                    self.update_complete(&s);
                    drop(s);
                    self.arrived.notify_all();
                    return Ok(());
                }
                WritePlan::Fetch { request } => {
                    note_requested(&mut s, &request);
                    since.get_or_insert_with(Instant::now);
                    if !request.is_empty() {
                        // Never call out with the lock held; plan again after, since
                        // the chunks may have arrived meanwhile.
                        drop(s);
                        self.request(&request);
                        s = self.lock();
                        continue;
                    }
                    s = self.wait(s)?;
                }
            }
        }
    }
}

impl Backend for OnDemandBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.complete.load(Ordering::Acquire) {
            return self.inner.read_at(buf, offset);
        }
        let mut s = self.lock();
        let mut since = None;
        // Chunks this read found absent when it came (the first plan).
        let mut absent = None;
        loop {
            let (request, wait) = s.p.plan_read(offset, buf.len() as u64);
            absent.get_or_insert_with(|| s.p.absent(offset, buf.len() as u64));
            if !wait {
                self.record_wait(&mut s, since);
                if let (Some(t), Some(1)) = (since, absent) {
                    push_sample(&mut s.single_us, t);
                }
                break;
            }
            note_requested(&mut s, &request);
            since.get_or_insert_with(Instant::now);
            if !request.is_empty() {
                drop(s);
                self.request(&request);
                s = self.lock();
                continue;
            }
            s = self.wait(s)?;
        }
        drop(s);
        // Present chunks are never written by `install` again: no lock needed.
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.write_like(offset, buf.len() as u64, || {
            self.inner.write_at(buf, offset, fua)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.complete.load(Ordering::Acquire) {
            return self.inner.trim(offset, len, fua);
        }
        // A trim is a hint: a missing chunk simply keeps the source's bytes when they
        // arrive (reads after a trim may return the old data). Only present chunks
        // are passed down, under the lock so none becomes present meanwhile.
        let s = self.lock();
        for (o, l) in s.p.present_ranges(offset, len) {
            self.inner.trim(o, l, false)?;
        }
        drop(s);
        if fua {
            self.inner.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.write_like(offset, len, || {
            self.inner.write_zeroes(offset, len, may_trim, fua)
        })
    }
}

#[cfg(test)]
#[path = "ondemand_tests.rs"]
mod tests;
