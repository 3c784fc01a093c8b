//! Which chunks of a disk changed, seen independently by several consumers.
//!
//! A [`DirtyTracker`] covers one disk. Each consumer (a migration, a replica
//! link to one host) holds its own [`DirtySubscription`]: a lock-free atomic
//! bitset with one bit per chunk. [`TrackedBackend`] wraps the real backend
//! and marks chunks in every live subscription after each write.
//!
//! # Why a consumer can never miss a write
//!
//! The writer does, in program order:
//!
//! 1. `W`: the data write (`pwrite`/`fallocate`) returns;
//! 2. `M`: `fetch_or(bit, Release)` on each subscription's word;
//! 3. the reply goes to the client (the write is now acknowledged).
//!
//! The consumer does `T`: `swap(word, 0, AcqRel)` in [`DirtySubscription::take`],
//! then `R`: reads the chunk from the backend.
//!
//! Each word's atomic operations are totally ordered. Either
//!
//! * `T` comes after `M` in that order: `T` sees the bit, and by
//!   release/acquire `W` happens-before `R`, so `R` reads the new data (the
//!   kernel makes a completed `pwrite` visible to every later `pread`); or
//! * `T` comes before `M`: the bit is set again after `T` and stays set, so
//!   the next `take()` reports the chunk.
//!
//! Either way, every acknowledged write is read by some later round, which is
//! what a copy loop that ends with "take() returned nothing while the guest
//! was paused" needs. A chunk may be reported when its data was already
//! copied (the write landed between `T`'s predecessor and `R`); copying it
//! twice is harmless.
//!
//! Subscribing: writes whose `M` precedes [`DirtyTracker::subscribe`] are not
//! seen by the new subscription, so a consumer must subscribe *before* it
//! reads its baseline (or subscribe all-dirty, which makes the whole disk the
//! first round).
//!
//! The bit operations are lock-free. The list of subscriptions sits behind an
//! `RwLock` that writers only read-lock (uncontended: one atomic op) and that
//! is write-locked only to subscribe or unsubscribe.
//!
//! # Bits that survive a crash
//!
//! A subscription made with [`DirtyTracker::subscribe_in`] keeps its bits in memory the
//! caller provides ([`BitStore`]: roamd maps a file `MAP_SHARED`, whose pages the kernel
//! keeps when the process dies). Such a subscription is also marked *before* the data
//! write (`M0 W M`), so that a crash between `W` and `M` still leaves the chunk marked;
//! [`DirtySubscription::take_keeping`] sets each taken bit in the consumer's own durable
//! set before clearing it here. Heap subscriptions are not pre-marked: a migration's
//! round would only copy the chunk twice.
//!
//! The tracker also counts completed FLUSHes ([`DirtyTracker::flush_epoch`]):
//! everything acknowledged before epoch `n` was bumped is durable, the seam
//! for crash-consistent replication.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Longest a FLUSH reply is held by [`DirtyTracker::hold_flushes`]: a replication pass
/// stuck on a dead link must not stall the guest's fsyncs for longer. The FLUSH then
/// completes anyway, and the pass sees the epoch move and simply tries again.
pub const MAX_FLUSH_HOLD: Duration = Duration::from_millis(500);

use crate::backend::Backend;

/// Default chunk size: 64 KiB, a tradeoff between bitmap size (16 KiB per
/// 8 GiB disk per subscriber) and bytes re-sent per 4 KiB guest write.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024;

/// Bad tracker parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyError {
    #[error("chunk size {0} is not a power of two of at least 512 bytes")]
    BadChunkSize(u64),
    #[error("disk of {0} bytes needs too many chunks")]
    TooManyChunks(u64),
    #[error("a bit store of {words} words cannot hold {chunks} chunks")]
    StoreSize { words: usize, chunks: u64 },
    #[error("tracker covers {tracker} bytes but the backend has {backend}")]
    SizeMismatch { tracker: u64, backend: u64 },
}

/// Whether a new subscription starts with every chunk dirty or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    Clean,
    Dirty,
}

/// Memory for a subscription's bits that outlives the process: a `MAP_SHARED` mapping
/// of a file stays in the page cache when the daemon dies, so the next one reads every
/// bit that was set (see [`DirtyTracker::subscribe_in`]). The words must stay valid and
/// at the same place for the store's whole life.
pub trait BitStore: Send + Sync + std::fmt::Debug {
    fn words(&self) -> &[AtomicU64];
}

#[derive(Debug)]
enum Words {
    Heap(Box<[AtomicU64]>),
    /// Bits that survive a crash; writes also mark them *before* the data is written.
    Durable(Arc<dyn BitStore>),
}

#[derive(Debug)]
struct Bitmap {
    words: Words,
    chunks: u64,
}

impl Bitmap {
    fn new(chunks: u64, initial: InitialState) -> Self {
        let n = chunks.div_ceil(64) as usize;
        let words = (0..n).map(|_| AtomicU64::new(0)).collect();
        let b = Bitmap {
            words: Words::Heap(words),
            chunks,
        };
        if initial == InitialState::Dirty {
            b.set_all();
        }
        b
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Heap(w) => w,
            Words::Durable(s) => s.words(),
        }
    }

    fn durable(&self) -> bool {
        matches!(self.words, Words::Durable(_))
    }

    fn set_all(&self) {
        for (i, w) in self.words().iter().enumerate() {
            w.fetch_or(self.word_mask(i), Ordering::Release);
        }
    }

    /// Bits of word `i` that correspond to real chunks (the last word may
    /// be partly past the end).
    fn word_mask(&self, i: usize) -> u64 {
        let first = i as u64 * 64;
        let valid = self.chunks.saturating_sub(first).min(64);
        if valid == 64 {
            u64::MAX
        } else {
            (1u64 << valid) - 1
        }
    }

    /// Sets chunks `first..=last`.
    fn set_range(&self, first: u64, last: u64) {
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            if let Some(word) = self.words().get(w) {
                word.fetch_or(mask, Ordering::Release);
            }
        }
    }
}

/// Dirty state of one disk, shared by the write path and every consumer.
#[derive(Debug)]
pub struct DirtyTracker {
    chunk_shift: u32,
    chunks: u64,
    disk_size: u64,
    subs: RwLock<Vec<Arc<Bitmap>>>,
    flush_epoch: AtomicU64,
    /// Holders of [`FlushHold`]s; FLUSH replies wait while it is non-zero.
    flush_holds: Mutex<u32>,
    flush_released: Condvar,
}

/// While it lives, FLUSH replies wait (see [`DirtyTracker::hold_flushes`]).
#[derive(Debug)]
pub struct FlushHold(Arc<DirtyTracker>);

impl Drop for FlushHold {
    fn drop(&mut self) {
        let mut n = self.0.lock_holds();
        *n = n.saturating_sub(1);
        drop(n);
        self.0.flush_released.notify_all();
    }
}

impl DirtyTracker {
    /// A tracker for a disk of `disk_size` bytes split in `chunk_size` chunks.
    pub fn new(disk_size: u64, chunk_size: u64) -> Result<Arc<Self>, DirtyError> {
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(DirtyError::BadChunkSize(chunk_size));
        }
        let chunks = disk_size.div_ceil(chunk_size);
        // A bitmap for 2^36 chunks would be 8 GiB: refuse nonsense early.
        if chunks > 1 << 36 {
            return Err(DirtyError::TooManyChunks(disk_size));
        }
        Ok(Arc::new(DirtyTracker {
            chunk_shift: chunk_size.trailing_zeros(),
            chunks,
            disk_size,
            subs: RwLock::new(Vec::new()),
            flush_epoch: AtomicU64::new(0),
            flush_holds: Mutex::new(0),
            flush_released: Condvar::new(),
        }))
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Byte range `(offset, len)` of a chunk; the last one may be short.
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let off = chunk << self.chunk_shift;
        (
            off,
            self.chunk_size().min(self.disk_size.saturating_sub(off)),
        )
    }

    /// Starts an independent view. See the module doc for why a consumer
    /// must subscribe before reading its baseline.
    pub fn subscribe(self: &Arc<Self>, initial: InitialState) -> DirtySubscription {
        let bits = Arc::new(Bitmap::new(self.chunks, initial));
        self.subs_write().push(bits.clone());
        DirtySubscription {
            tracker: self.clone(),
            bits,
        }
    }

    /// A subscription whose bits live in `store` (one bit per chunk, `chunk_count()`
    /// bits, kept as they are: a store may come back holding bits). Writes mark such a
    /// subscription both before the data is written and after, so that a crash of the
    /// process in the middle of a write leaves the chunk marked: nothing the disk holds
    /// escapes a store that survives the crash, written and acknowledged or not.
    pub fn subscribe_in(
        self: &Arc<Self>,
        store: Arc<dyn BitStore>,
    ) -> Result<DirtySubscription, DirtyError> {
        let want = self.chunks.div_ceil(64) as usize;
        if store.words().len() != want {
            return Err(DirtyError::StoreSize {
                words: store.words().len(),
                chunks: self.chunks,
            });
        }
        let bits = Arc::new(Bitmap {
            words: Words::Durable(store),
            chunks: self.chunks,
        });
        // Bits past the last chunk would name chunks that do not exist.
        if let Some(last) = bits.words().last() {
            last.fetch_and(bits.word_mask(want - 1), Ordering::AcqRel);
        }
        self.subs_write().push(bits.clone());
        Ok(DirtySubscription {
            tracker: self.clone(),
            bits,
        })
    }

    pub fn subscriber_count(&self) -> usize {
        self.subs_read().len()
    }

    /// Records that `offset..offset+len` changed. Call after the data is
    /// written and before the write is acknowledged.
    pub fn mark(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.chunks_of(offset, len) else {
            return;
        };
        for b in self.subs_read().iter() {
            b.set_range(first, last);
        }
    }

    /// Records that `offset..offset+len` is about to change, in the subscriptions whose
    /// bits survive a crash (see [`subscribe_in`](Self::subscribe_in)). Call before the
    /// data is written; [`mark`](Self::mark) after it is still needed.
    pub fn mark_before(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.chunks_of(offset, len) else {
            return;
        };
        let mut any = false;
        for b in self.subs_read().iter().filter(|b| b.durable()) {
            b.set_range(first, last);
            any = true;
        }
        // The marks must be in memory before the data write starts (a release store
        // orders what precedes it, not the write that follows).
        if any {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
    }

    /// The chunks `first..=last` that bytes `offset..offset+len` touch, if any.
    fn chunks_of(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.disk_size - 1);
        Some((offset >> self.chunk_shift, last_byte >> self.chunk_shift))
    }

    /// Records a completed FLUSH; returns the new epoch.
    pub fn note_flush(&self) -> u64 {
        self.flush_epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Holds FLUSH *replies* (the flushes themselves run) until the guard drops, for at
    /// most [`MAX_FLUSH_HOLD`] each: a replication pass during which no FLUSH completes
    /// is a crash-consistent cut (`roam_store::cut`, `PassEnd::Gate`). Without it a guest
    /// that flushes during every pass would starve its replica. Delaying a reply is
    /// always allowed; it costs that guest a little latency once per batch.
    pub fn hold_flushes(self: &Arc<Self>) -> FlushHold {
        *self.lock_holds() += 1;
        FlushHold(self.clone())
    }

    /// Called by the write path between a FLUSH and its reply.
    fn wait_for_flush_release(&self) {
        let deadline = Instant::now() + MAX_FLUSH_HOLD;
        let mut n = self.lock_holds();
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            n = self
                .flush_released
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock_holds(&self) -> std::sync::MutexGuard<'_, u32> {
        self.flush_holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of FLUSHes completed so far (monotonic).
    pub fn flush_epoch(&self) -> u64 {
        self.flush_epoch.load(Ordering::Acquire)
    }

    // A panic while holding the lock cannot leave the Vec half-updated
    // (push/retain are the only writers), so poisoning is safe to ignore.
    fn subs_read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Bitmap>>> {
        self.subs.read().unwrap_or_else(|e| e.into_inner())
    }

    fn subs_write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Bitmap>>> {
        self.subs.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// One consumer's view; dropping it unregisters it.
#[derive(Debug)]
pub struct DirtySubscription {
    tracker: Arc<DirtyTracker>,
    bits: Arc<Bitmap>,
}

impl DirtySubscription {
    /// Atomically clears and returns the dirty chunk indices, ascending.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.take_into(&mut out);
        out
    }

    /// Like [`take`](Self::take) but appends to a reused vector.
    pub fn take_into(&self, out: &mut Vec<u64>) {
        for (i, w) in self.bits.words().iter().enumerate() {
            // The relaxed peek only skips clean words; a bit set concurrently
            // stays set and is reported by the next take().
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut v = w.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros();
                out.push(i as u64 * 64 + u64::from(b));
                v &= v - 1;
            }
        }
    }

    /// Like [`take`](Self::take), but every bit is first set in `keep` (the same shape:
    /// one bit per chunk) and only then cleared here, so that a crash at any instant
    /// finds each taken chunk in one of the two. `keep` is the consumer's durable "taken,
    /// not yet delivered" set.
    ///
    /// Sound for the same reason as `take`: the `Acquire` load that sees a writer's bit
    /// synchronizes with its `Release` mark, and the clear removes only bits that load
    /// saw, so a bit set again after it stays set for the next round.
    pub fn take_keeping(&self, keep: &[AtomicU64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.bits.words().iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            if v == 0 {
                continue;
            }
            if let Some(k) = keep.get(i) {
                k.fetch_or(v, Ordering::Release);
            }
            w.fetch_and(!v, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros();
                out.push(i as u64 * 64 + u64::from(b));
                v &= v - 1;
            }
        }
        out
    }

    /// Number of dirty chunks right now (a snapshot; may be stale at once).
    pub fn count(&self) -> u64 {
        self.bits
            .words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Marks every chunk dirty (e.g. after losing a replica's state).
    pub fn mark_all(&self) {
        self.bits.set_all();
    }

    pub fn is_dirty(&self, chunk: u64) -> bool {
        let w = (chunk / 64) as usize;
        self.bits
            .words()
            .get(w)
            .is_some_and(|x| x.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }

    pub fn chunk_count(&self) -> u64 {
        self.bits.chunks
    }
}

impl Drop for DirtySubscription {
    fn drop(&mut self) {
        self.tracker
            .subs_write()
            .retain(|b| !Arc::ptr_eq(b, &self.bits));
    }
}

/// A backend wrapper that marks the tracker after every successful change
/// and bumps the flush epoch after every successful flush.
pub struct TrackedBackend {
    inner: Arc<dyn Backend>,
    tracker: Arc<DirtyTracker>,
}

impl TrackedBackend {
    /// The tracker must cover exactly the backend's size, or writes to
    /// the tail would go unrecorded.
    pub fn new(inner: Arc<dyn Backend>, tracker: Arc<DirtyTracker>) -> Result<Self, DirtyError> {
        if inner.size() != tracker.disk_size() {
            return Err(DirtyError::SizeMismatch {
                tracker: tracker.disk_size(),
                backend: inner.size(),
            });
        }
        Ok(TrackedBackend { inner, tracker })
    }

    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }
}

impl Backend for TrackedBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        // Mark even on error: a failed pwrite may have written part of the
        // range, and a spurious dirty bit only costs a re-send.
        self.tracker.mark_before(offset, buf.len() as u64);
        let r = self.inner.write_at(buf, offset, fua);
        self.tracker.mark(offset, buf.len() as u64);
        r
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()?;
        // Completed only once no replication pass holds replies (bounded wait).
        self.tracker.wait_for_flush_release();
        self.tracker.note_flush();
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.tracker.mark_before(offset, len);
        let r = self.inner.trim(offset, len, fua);
        self.tracker.mark(offset, len);
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.tracker.mark_before(offset, len);
        let r = self.inner.write_zeroes(offset, len, may_trim, fua);
        self.tracker.mark(offset, len);
        r
    }
}
