use super::*;
use proptest::prelude::*;
use std::sync::{mpsc, Weak};

/// An in-memory back end (tests only).
struct Mem(Mutex<Vec<u8>>);

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _o: u64, _l: u64, _f: bool) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _t: bool, _f: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Answers a request at once, from the source image (a zero-RTT source).
struct SyncFetcher {
    od: Mutex<Weak<OnDemandBackend>>,
    source: Vec<u8>,
    chunk: u64,
    asked: Mutex<Vec<u64>>,
}

impl Fetcher for Arc<SyncFetcher> {
    fn request(&self, chunks: &[u64]) {
        self.asked.lock().unwrap().extend_from_slice(chunks);
        let Some(od) = self.od.lock().unwrap().upgrade() else {
            return;
        };
        for &c in chunks {
            let o = (c * self.chunk) as usize;
            let e = (o + self.chunk as usize).min(self.source.len());
            od.install(c, &self.source[o..e]).unwrap();
        }
    }
}

fn sync_backend(source: &[u8], chunk: u64) -> (Arc<OnDemandBackend>, Arc<SyncFetcher>) {
    let mem = Arc::new(Mem(Mutex::new(vec![0xEE; source.len()])));
    let f = Arc::new(SyncFetcher {
        od: Mutex::new(Weak::new()),
        source: source.to_vec(),
        chunk,
        asked: Mutex::new(Vec::new()),
    });
    let od = Arc::new(OnDemandBackend::new(mem, chunk, Box::new(f.clone())));
    *f.od.lock().unwrap() = Arc::downgrade(&od);
    (od, f)
}

#[test]
fn a_chunk_from_the_source_never_overwrites_a_guest_write() {
    let mut p = Presence::new(4 * 16, 16);
    p.activate(0..4);
    assert_eq!(
        p.plan_write(16, 16),
        WritePlan::Fill { mark: vec![1] },
        "a whole missing chunk needs nothing from the source"
    );
    p.mark_written(&[1]);
    assert!(
        !p.may_install(1),
        "the guest's bytes are newer than the source's"
    );
    assert!(p.may_install(2));
    p.installed(1);
    assert_eq!(p.state(1), Some(ChunkState::Written));
    assert_eq!(p.missing(), 3);
}

#[test]
fn a_resumed_switch_never_demotes_a_chunk_that_arrived_and_was_written() {
    let mut p = Presence::new(4 * 16, 16);
    p.activate(0..4);
    // The link dies. The destination lists what is missing: all four chunks.
    let listed = p.missing_chunks();
    assert_eq!(listed, vec![0, 1, 2, 3]);
    // The resumed demand stream delivers chunk 2 (a partial write waited for it), and
    // the guest's write then completes into it: a plain write to a present chunk.
    assert_eq!(p.plan_write(34, 4), WritePlan::Fetch { request: vec![2] });
    p.installed(2);
    assert_eq!(p.plan_write(34, 4), WritePlan::Direct);
    // The resumed switch names the list made before that.
    p.activate(listed);
    assert_eq!(p.state(2), Some(ChunkState::Fetched));
    assert!(
        !p.may_install(2),
        "the source's older bytes would overwrite an acknowledged write"
    );
    assert_eq!(p.missing(), 3);
    assert_eq!(p.plan_read(32, 16), (vec![], false));
}

#[test]
fn a_partial_write_fetches_the_chunk_first_and_asks_once() {
    let mut p = Presence::new(4 * 16, 16);
    p.activate([2]);
    assert_eq!(p.missing(), 1);
    assert_eq!(p.plan_write(34, 4), WritePlan::Fetch { request: vec![2] });
    // A second writer (or a read) of the same chunk waits without asking again.
    assert_eq!(p.plan_write(40, 2), WritePlan::Fetch { request: vec![] });
    assert_eq!(p.plan_read(32, 16), (vec![], true));
    p.installed(2);
    assert_eq!(p.plan_write(34, 4), WritePlan::Direct);
    assert_eq!(p.plan_read(0, 64), (vec![], false));
    assert_eq!(p.missing(), 0);
}

#[test]
fn a_write_spanning_a_partial_and_a_whole_chunk_waits_for_the_partial_one() {
    let mut p = Presence::new(4 * 16, 16);
    p.activate(0..4);
    // bytes 8..48: chunk 0 partly, 1 and 2 wholly
    assert_eq!(p.plan_write(8, 40), WritePlan::Fetch { request: vec![0] });
    p.installed(0);
    assert_eq!(p.plan_write(8, 40), WritePlan::Fill { mark: vec![1, 2] });
}

#[test]
fn before_activation_installs_overwrite_and_qemu_io_passes_through() {
    let mut p = Presence::new(3 * 16 - 4, 16);
    assert_eq!(p.range(2), (32, 12), "the last chunk is short");
    assert_eq!(
        p.plan_read(0, 1),
        (vec![], false),
        "QEMU probing at start must not wait"
    );
    assert_eq!(p.plan_write(0, 16), WritePlan::Direct);
    assert_eq!(p.state(0), Some(ChunkState::Missing), "and changes nothing");
    p.installed(0);
    assert!(
        p.may_install(0),
        "the source's guest still runs: a newer copy may come"
    );
    p.activate([0]);
    assert_eq!(p.state(0), Some(ChunkState::Missing));
    assert_eq!(p.state(1), Some(ChunkState::Fetched));
    p.installed(0);
    assert!(
        !p.may_install(0),
        "after the switch the first copy is final"
    );
    assert_eq!(p.missing(), 0);
}

#[test]
fn present_ranges_merge_and_clip() {
    let mut p = Presence::new(4 * 16, 16);
    p.activate([2]);
    assert_eq!(p.present_ranges(4, 56), vec![(4, 28), (48, 12)]);
}

#[test]
fn backend_reads_fetch_only_what_they_touch_and_record_waits() {
    let source: Vec<u8> = (0..64u32).map(|i| i as u8).collect();
    let (od, f) = sync_backend(&source, 16);
    od.activate(0..4);
    let mut b = [0u8; 8];
    od.read_at(&mut b, 20).unwrap();
    assert_eq!(&b, &source[20..28]);
    assert_eq!(*f.asked.lock().unwrap(), vec![1]);
    od.read_at(&mut b, 20).unwrap();
    assert_eq!(
        f.asked.lock().unwrap().len(),
        1,
        "a present chunk is not fetched again"
    );
    let st = od.stats();
    assert_eq!((st.demand_fetches, st.waits, st.missing), (1, 1, 3));
    assert_eq!(st.fetches_timed, 1, "the demanded chunk's fetch was timed");
    let mut b2 = [0u8; 20];
    od.read_at(&mut b2, 40).unwrap();
    assert_eq!(&b2, &source[40..60]);
    let st = od.stats();
    assert_eq!((st.waits, st.fetches_timed), (2, 3));
    assert!(!od.is_complete());
    for c in [0, 2, 3] {
        od.install(c, &source[c as usize * 16..c as usize * 16 + 16])
            .unwrap();
    }
    assert!(od.is_complete());
}

#[test]
fn abandon_fails_waiting_io_instead_of_hanging() {
    let mem = Arc::new(Mem(Mutex::new(vec![0; 64])));
    struct Nobody;
    impl Fetcher for Nobody {
        fn request(&self, _: &[u64]) {}
    }
    let od = Arc::new(OnDemandBackend::new(mem, 16, Box::new(Nobody)));
    od.activate([1]);
    let od2 = od.clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        od2.read_at(&mut b, 16)
    });
    std::thread::sleep(Duration::from_millis(50));
    od.abandon();
    assert!(t.join().unwrap().is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Background { chunk: u64 },
}

const CH: u64 = 16;
const SIZE: u64 = 8 * CH - 5;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(3 * CH)));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        range.prop_map(|(off, len)| Op::Read { off, len }),
        (0..SIZE.div_ceil(CH)).prop_map(|chunk| Op::Background { chunk }),
        (0..SIZE.div_ceil(CH)).prop_map(|chunk| Op::Background { chunk }),
    ]
}

proptest! {
    /// Any interleaving of guest writes, zeroing, reads and background chunks: every
    /// read sees the source's image overlaid with the guest's writes in order, and so
    /// does the whole disk once the background copy has delivered every chunk.
    #[test]
    fn guest_view_is_source_plus_guest_writes(
        source in proptest::collection::vec(any::<u8>(), SIZE as usize),
        pre in proptest::collection::vec(any::<bool>(), SIZE.div_ceil(CH) as usize),
        ops in proptest::collection::vec(op(), 0..60),
    ) {
        let (od, _f) = sync_backend(&source, CH);
        // Before the switch: some chunks arrive (final content), others are stale
        // copies the source will send again, so they are pending.
        let mut pending = Vec::new();
        for (c, &final_copy) in pre.iter().enumerate() {
            let (o, l) = (c as u64 * CH, CH.min(SIZE - c as u64 * CH));
            if final_copy {
                od.install(c as u64, &source[o as usize..(o + l) as usize]).unwrap();
            } else {
                od.install(c as u64, &vec![0xAB; l as usize]).unwrap();
                pending.push(c as u64);
            }
        }
        od.activate(pending);
        let mut model = source.clone();
        for op in ops {
            match op {
                Op::Write { off, len, byte } => {
                    od.write_at(&vec![byte; len as usize], off, false).unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Zero { off, len } => {
                    od.write_zeroes(off, len, true, false).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Read { off, len } => {
                    let mut b = vec![0u8; len as usize];
                    od.read_at(&mut b, off).unwrap();
                    prop_assert_eq!(&b[..], &model[off as usize..(off + len) as usize]);
                }
                Op::Background { chunk } => {
                    let (o, l) = (chunk * CH, CH.min(SIZE - chunk * CH));
                    od.install(chunk, &source[o as usize..(o + l) as usize]).unwrap();
                }
            }
        }
        for c in 0..SIZE.div_ceil(CH) {
            let (o, l) = (c * CH, CH.min(SIZE - c * CH));
            od.install(c, &source[o as usize..(o + l) as usize]).unwrap();
        }
        prop_assert!(od.is_complete());
        let mut all = vec![0u8; SIZE as usize];
        od.read_at(&mut all, 0).unwrap();
        prop_assert_eq!(all, model);
    }
}

/// Real threads on a real file: guest threads write (whole and partial chunks) and
/// read back while a background thread installs every chunk in random order and a
/// fetcher answers demands after a delay. No guest write may be lost to a late chunk.
#[test]
fn concurrent_guest_and_background_copy_on_a_file() {
    use crate::backend::FileBackend;
    const CHUNK: u64 = 4096;
    const CHUNKS: u64 = 64;
    const THREADS: u64 = 4;
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let file = Arc::new(FileBackend::create(tmp.path(), CHUNK * CHUNKS).unwrap());
    let source: Arc<Vec<u8>> = Arc::new(
        (0..CHUNK * CHUNKS)
            .map(|i| (i / 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let (tx, rx) = mpsc::channel::<u64>();
    struct Chan(Mutex<mpsc::Sender<u64>>);
    impl Fetcher for Chan {
        fn request(&self, chunks: &[u64]) {
            let tx = self.0.lock().unwrap();
            for &c in chunks {
                let _ = tx.send(c);
            }
        }
    }
    let od = Arc::new(OnDemandBackend::new(
        file,
        CHUNK,
        Box::new(Chan(Mutex::new(tx))),
    ));
    od.activate(0..CHUNKS);
    let chunk_of =
        |c: u64, src: &[u8]| src[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].to_vec();
    // Demand server: answers after 2 ms, like a short round trip.
    let (od_f, src_f) = (od.clone(), source.clone());
    let fetcher = std::thread::spawn(move || {
        while let Ok(c) = rx.recv_timeout(Duration::from_secs(2)) {
            std::thread::sleep(Duration::from_millis(2));
            od_f.install(c, &chunk_of(c, &src_f)).unwrap();
        }
    });
    // Background copy: every chunk, in a scrambled order, a little at a time.
    let (od_b, src_b) = (od.clone(), source.clone());
    let background = std::thread::spawn(move || {
        for i in 0..CHUNKS {
            let c = (i * 37) % CHUNKS;
            od_b.install(c, &chunk_of(c, &src_b)).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    let mut guests = Vec::new();
    for t in 0..THREADS {
        let (od, src) = (od.clone(), source.clone());
        guests.push(std::thread::spawn(move || {
            // This thread owns chunks t, t+THREADS, ...: its own model is exact.
            let mine: Vec<u64> = (0..CHUNKS).filter(|c| c % THREADS == t).collect();
            let mut model: Vec<Vec<u8>> = mine.iter().map(|&c| chunk_of(c, &src)).collect();
            let mut x = t * 7919 + 1;
            for step in 0..200u64 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = (x >> 33) as usize % mine.len();
                let c = mine[k];
                let byte = (step as u8).wrapping_add(t as u8 * 50);
                match (x >> 20) % 3 {
                    0 => {
                        od.write_at(&vec![byte; CHUNK as usize], c * CHUNK, false)
                            .unwrap();
                        model[k].fill(byte);
                    }
                    1 => {
                        let (o, l) = ((x >> 40) % 2048, 1 + (x >> 8) % 2000);
                        od.write_at(&vec![byte; l as usize], c * CHUNK + o, false)
                            .unwrap();
                        model[k][o as usize..(o + l) as usize].fill(byte);
                    }
                    _ => {
                        let mut b = vec![0u8; CHUNK as usize];
                        od.read_at(&mut b, c * CHUNK).unwrap();
                        assert!(b == model[k], "thread {t} chunk {c} step {step}");
                    }
                }
            }
            (mine, model)
        }));
    }
    let results: Vec<_> = guests.into_iter().map(|g| g.join().unwrap()).collect();
    background.join().unwrap();
    fetcher.join().unwrap();
    assert!(od.is_complete());
    for (mine, model) in results {
        for (c, want) in mine.iter().zip(model) {
            let mut b = vec![0u8; CHUNK as usize];
            od.read_at(&mut b, c * CHUNK).unwrap();
            assert!(b == want, "chunk {c} lost a guest write");
        }
    }
    let st = od.stats();
    assert!(st.superseded > 0, "the race under test happened: {st:?}");
}

#[test]
fn only_reads_of_exactly_one_missing_chunk_count_as_single_block_reads() {
    let source: Vec<u8> = (0..8 * 16).map(|i| i as u8).collect();
    let (od, _f) = sync_backend(&source, 16);
    od.activate(0..6); // chunks 6 and 7 are present
    let mut buf = [0u8; 4];
    od.read_at(&mut buf, 20).unwrap(); // one missing chunk (1)
    let mut two = [0u8; 32];
    od.read_at(&mut two, 40).unwrap(); // chunks 2 and 3: two missing
    let mut present = [0u8; 8];
    od.read_at(&mut present, 100).unwrap(); // chunk 6: no wait
    od.read_at(&mut buf, 48).unwrap(); // chunk 3 again: present now
    let st = od.stats();
    assert_eq!(st.waits, 2, "two reads waited");
    assert_eq!(st.single_reads, 1, "one of them for exactly one chunk");
    assert!(st.single_read_p50_ms >= 0.0 && st.single_read_max_ms >= st.single_read_p50_ms);
    assert_eq!(&buf, &source[48..52]);
}
