//! DirtyTracker against a simple model, plus a concurrent no-lost-write check.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use roam_nbd::{
    Backend, BitStore, DirtyError, DirtyTracker, FileBackend, InitialState, TrackedBackend,
};

#[derive(Debug, Clone)]
enum Op {
    Mark(u64, u64),
    Take(usize),
    MarkAll(usize),
    Count(usize),
    Resubscribe(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..70_000, 0u64..20_000).prop_map(|(o, l)| Op::Mark(o, l)),
        2 => (0usize..2).prop_map(Op::Take),
        1 => (0usize..2).prop_map(Op::MarkAll),
        1 => (0usize..2).prop_map(Op::Count),
        1 => ((0usize..2), any::<bool>()).prop_map(|(i, d)| Op::Resubscribe(i, d)),
    ]
}

fn chunks_of(off: u64, len: u64, chunk: u64, size: u64) -> BTreeSet<u64> {
    if len == 0 || off >= size {
        return BTreeSet::new();
    }
    let last = (off + len - 1).min(size - 1);
    (off / chunk..=last / chunk).collect()
}

proptest! {
    #[test]
    fn matches_model(size in 1u64..66_000, chunk_pow in 9u32..13, first_dirty: bool, ops in proptest::collection::vec(op(), 1..60)) {
        let chunk = 1u64 << chunk_pow;
        let t = DirtyTracker::new(size, chunk).unwrap();
        let n = size.div_ceil(chunk);
        let all: BTreeSet<u64> = (0..n).collect();
        let init = |d: bool| if d { InitialState::Dirty } else { InitialState::Clean };
        let mut subs = [t.subscribe(init(first_dirty)), t.subscribe(InitialState::Clean)];
        let mut model = [if first_dirty { all.clone() } else { BTreeSet::new() }, BTreeSet::new()];
        for op in ops {
            match op {
                Op::Mark(o, l) => {
                    t.mark(o, l);
                    let c = chunks_of(o, l, chunk, size);
                    for m in model.iter_mut() { m.extend(c.iter().copied()); }
                }
                Op::Take(i) => {
                    let got = subs[i].take();
                    let want: Vec<u64> = std::mem::take(&mut model[i]).into_iter().collect();
                    prop_assert_eq!(got, want);
                }
                Op::MarkAll(i) => { subs[i].mark_all(); model[i] = all.clone(); }
                Op::Count(i) => prop_assert_eq!(subs[i].count(), model[i].len() as u64),
                Op::Resubscribe(i, d) => {
                    subs[i] = t.subscribe(init(d));
                    model[i] = if d { all.clone() } else { BTreeSet::new() };
                }
            }
            prop_assert_eq!(t.subscriber_count(), 2);
        }
        drop(subs);
        prop_assert_eq!(t.subscriber_count(), 0);
    }
}

#[test]
fn tracked_backend_refuses_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FileBackend::create(&dir.path().join("d"), 1 << 20).unwrap();
    let t = DirtyTracker::new(1 << 19, 65536).unwrap();
    assert!(TrackedBackend::new(Arc::new(fb), t).is_err());
}

#[test]
fn bad_chunk_sizes_rejected() {
    assert!(DirtyTracker::new(1 << 20, 1000).is_err());
    assert!(DirtyTracker::new(1 << 20, 256).is_err());
    let t = DirtyTracker::new(100_000, 65536).unwrap();
    assert_eq!(t.chunk_count(), 2);
    assert_eq!(t.chunk_range(1), (65536, 100_000 - 65536));
}

#[test]
fn tracked_backend_marks_and_counts_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FileBackend::create(&dir.path().join("d"), 1 << 20).unwrap();
    let t = DirtyTracker::new(1 << 20, 65536).unwrap();
    let b = TrackedBackend::new(Arc::new(fb), t.clone()).unwrap();
    let s = t.subscribe(InitialState::Clean);
    b.write_at(&[1u8; 10], 65536 * 3 + 5, false).unwrap();
    b.write_zeroes(65536 * 5, 65537, true, false).unwrap();
    b.trim(0, 1, false).unwrap();
    b.flush().unwrap();
    b.flush().unwrap();
    assert_eq!(s.take(), vec![0, 3, 5, 6]);
    assert_eq!(t.flush_epoch(), 2);
    let mut buf = [9u8; 10];
    b.read_at(&mut buf, 65536 * 3 + 5).unwrap();
    assert_eq!(buf, [1u8; 10]);
    assert!(s.take().is_empty());
}

/// A writer stamps increasing sequence numbers into chunks through the
/// tracked backend; a consumer take()s and copies dirty chunks into a
/// replica. After the writer stops and a final take(), the replica must
/// equal the file: no acknowledged write was missed.
#[test]
fn concurrent_consumer_never_misses_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 4096u64;
    let chunks = 256u64;
    let size = chunk * chunks;
    let fb: Arc<dyn Backend> = Arc::new(FileBackend::create(&dir.path().join("d"), size).unwrap());
    let t = DirtyTracker::new(size, chunk).unwrap();
    let tb = Arc::new(TrackedBackend::new(fb.clone(), t.clone()).unwrap());
    let sub = t.subscribe(InitialState::Dirty);
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));

    let writer = {
        let (tb, stop, seq) = (tb.clone(), stop.clone(), seq.clone());
        std::thread::spawn(move || {
            let mut x = 12345u64;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let c = (x >> 33) % chunks;
                let v = seq.fetch_add(1, Ordering::Relaxed) + 1;
                tb.write_at(&v.to_le_bytes(), c * chunk + (x >> 20) % (chunk - 8), false)
                    .unwrap();
            }
        })
    };
    let mut replica = vec![0u8; size as usize];
    let mut rounds = 0;
    let copy = |replica: &mut Vec<u8>, ids: Vec<u64>| {
        for c in ids {
            let s = (c * chunk) as usize;
            fb.read_at(&mut replica[s..s + chunk as usize], c * chunk)
                .unwrap();
        }
    };
    while rounds < 200 || seq.load(Ordering::Relaxed) < 20_000 {
        copy(&mut replica, sub.take());
        rounds += 1;
        if rounds > 1_000_000 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    copy(&mut replica, sub.take());
    let mut file = vec![0u8; size as usize];
    fb.read_at(&mut file, 0).unwrap();
    assert!(seq.load(Ordering::Relaxed) >= 20_000);
    assert!(replica == file, "replica diverged from the file");
}

/// A held FLUSH runs but its reply waits for the hold to end, and the epoch moves only
/// then; a hold that outlasts `MAX_FLUSH_HOLD` does not stall the FLUSH for longer.
#[test]
fn a_flush_hold_delays_the_reply_not_the_flush_and_is_bounded() {
    use std::time::{Duration, Instant};
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1 << 20).unwrap();
    let tracker = DirtyTracker::new(1 << 20, 65536).unwrap();
    let be = Arc::new(
        TrackedBackend::new(
            Arc::new(FileBackend::open(f.path(), false).unwrap()),
            tracker.clone(),
        )
        .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let hold = tracker.hold_flushes();
    let (b, d) = (be.clone(), done.clone());
    let t = std::thread::spawn(move || {
        b.flush().unwrap();
        d.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "the reply went out during the hold"
    );
    assert_eq!(
        tracker.flush_epoch(),
        0,
        "a held FLUSH counted as completed"
    );
    drop(hold);
    t.join().unwrap();
    assert_eq!(tracker.flush_epoch(), 1);

    // Held for good (a pass stuck on a dead link): the FLUSH completes after the bound.
    let _stuck = tracker.hold_flushes();
    let t0 = Instant::now();
    be.flush().unwrap();
    let waited = t0.elapsed();
    assert!(waited >= roam_nbd::MAX_FLUSH_HOLD, "{waited:?}");
    assert!(waited < roam_nbd::MAX_FLUSH_HOLD * 4, "{waited:?}");
    assert_eq!(tracker.flush_epoch(), 2);
}

/// Bits in memory the test keeps: stands in for a file mapping that outlives a process.
#[derive(Debug)]
struct Kept(Vec<AtomicU64>);

impl Kept {
    fn new(words: usize) -> Arc<Kept> {
        Arc::new(Kept((0..words).map(|_| AtomicU64::new(0)).collect()))
    }
}

impl BitStore for Kept {
    fn words(&self) -> &[AtomicU64] {
        &self.0
    }
}

/// A backend that records, at the moment each write reaches it, whether the durable
/// bits already named the chunk.
struct Observer {
    inner: FileBackend,
    kept: Arc<Kept>,
    marked_before: std::sync::Mutex<Vec<bool>>,
}

impl Backend for Observer {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let c = offset / 65536;
        let bit = self.kept.0[(c / 64) as usize].load(Ordering::Acquire) & (1 << (c % 64));
        self.marked_before.lock().unwrap().push(bit != 0);
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, fua: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, t, fua)
    }
}

/// A crash between the data write and the mark after it must not leave the chunk
/// unmarked in a store that survives the crash: durable bits are set before the write
/// reaches the disk; heap bits are not (a migration's rounds would copy it twice).
#[test]
fn durable_subscriptions_are_marked_before_the_write_reaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 65536 * 130;
    let kept = Kept::new(3);
    let obs = Arc::new(Observer {
        inner: FileBackend::create(&dir.path().join("d"), size).unwrap(),
        kept: kept.clone(),
        marked_before: Default::default(),
    });
    let t = DirtyTracker::new(size, 65536).unwrap();
    let b = TrackedBackend::new(obs.clone(), t.clone()).unwrap();
    let heap = t.subscribe(InitialState::Clean);
    let durable = t.subscribe_in(kept.clone()).unwrap();
    b.write_at(&[1u8; 10], 65536 * 129, false).unwrap();
    b.write_at(&[1u8; 10], 65536 * 3, false).unwrap();
    assert_eq!(*obs.marked_before.lock().unwrap(), vec![true, true]);
    assert_eq!(durable.take(), vec![3, 129]);
    assert_eq!(heap.take(), vec![3, 129]);

    // Only the durable subscription sees a write announced but not done.
    t.mark_before(65536 * 7, 1);
    assert_eq!(durable.take(), vec![7]);
    assert!(heap.take().is_empty());
    // Marks made by the old owner of the store are kept when it is subscribed again.
    drop(durable);
    kept.0[0].fetch_or(1 << 9, Ordering::Release);
    let again = t.subscribe_in(kept.clone()).unwrap();
    assert_eq!(again.take(), vec![9]);
}

#[test]
fn a_bit_store_must_fit_the_disk_and_holds_no_chunk_past_its_end() {
    let t = DirtyTracker::new(65536 * 70, 65536).unwrap();
    assert_eq!(
        t.subscribe_in(Kept::new(1)).unwrap_err(),
        DirtyError::StoreSize {
            words: 1,
            chunks: 70
        }
    );
    let kept = Kept::new(2);
    kept.0[1].store(u64::MAX, Ordering::Release);
    let s = t.subscribe_in(kept).unwrap();
    assert_eq!(s.take(), (64..70).collect::<Vec<_>>());
}

/// `take_keeping` hands every bit to the keeper before it clears it here; a writer
/// racing with it is never lost (its bit is in one of the two, or set again here).
#[test]
fn take_keeping_moves_bits_to_the_keeper_and_misses_no_concurrent_write() {
    let chunks = 4096u64;
    let t = DirtyTracker::new(chunks * 512, 512).unwrap();
    let sub = t.subscribe(InitialState::Clean);
    let keep = Kept::new(64);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let writer = {
        let (t, stop, written) = (t.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut x = 7u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 50_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let c = (x >> 33) % chunks;
                written.lock().unwrap().insert(c);
                t.mark(c * 512, 1);
                n += 1;
            }
        })
    };
    let mut taken = BTreeSet::new();
    for _ in 0..2_000 {
        for c in sub.take_keeping(&keep.0) {
            taken.insert(c);
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    taken.extend(sub.take_keeping(&keep.0));
    let written = written.lock().unwrap().clone();
    assert_eq!(taken, written);
    let kept: BTreeSet<u64> = (0..chunks)
        .filter(|&c| keep.0[(c / 64) as usize].load(Ordering::Acquire) & (1 << (c % 64)) != 0)
        .collect();
    assert_eq!(kept, written, "the keeper lacks a taken chunk");
    assert_eq!(sub.count(), 0);
}
