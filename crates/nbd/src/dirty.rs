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
    #[error("tracker covers {tracker} bytes but the backend has {backend}")]
    SizeMismatch { tracker: u64, backend: u64 },
}

/// Whether a new subscription starts with every chunk dirty or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    Clean,
    Dirty,
}

#[derive(Debug)]
struct Bitmap {
    words: Box<[AtomicU64]>,
    chunks: u64,
}

impl Bitmap {
    fn new(chunks: u64, initial: InitialState) -> Self {
        let n = chunks.div_ceil(64) as usize;
        let words = (0..n).map(|_| AtomicU64::new(0)).collect();
        let b = Bitmap { words, chunks };
        if initial == InitialState::Dirty {
            b.set_all();
        }
        b
    }

    fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
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
            if let Some(word) = self.words.get(w) {
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

    pub fn subscriber_count(&self) -> usize {
        self.subs_read().len()
    }

    /// Records that `offset..offset+len` changed. Call after the data is
    /// written and before the write is acknowledged.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.disk_size - 1);
        let (first, last) = (offset >> self.chunk_shift, last_byte >> self.chunk_shift);
        for b in self.subs_read().iter() {
            b.set_range(first, last);
        }
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
        for (i, w) in self.bits.words.iter().enumerate() {
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

    /// Number of dirty chunks right now (a snapshot; may be stale at once).
    pub fn count(&self) -> u64 {
        self.bits
            .words
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
            .words
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
        let r = self.inner.trim(offset, len, fua);
        self.tracker.mark(offset, len);
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let r = self.inner.write_zeroes(offset, len, may_trim, fua);
        self.tracker.mark(offset, len);
        r
    }
}
