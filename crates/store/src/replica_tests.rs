//! Crash tests of the replica writer: a crash injected before every durable step (and a
//! second one during recovery) must leave, after `open`, a disk equal to a state of the
//! source's history — and replication must then resume and finish.

use super::*;
use proptest::prelude::*;

const CS: u32 = 512;

/// Batches of chunk writes (None = zeroes) and the disk after each.
struct History {
    disk_bytes: u64,
    batches: Vec<Vec<(u64, Option<u8>)>>,
    states: Vec<Vec<u8>>,
}

fn content(chunk: u64, v: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| v ^ (chunk as u8) ^ (i as u8 & 3))
        .collect()
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "History({} bytes, {:?})", self.disk_bytes, self.batches)
    }
}

impl History {
    fn new(disk_bytes: u64, batches: Vec<Vec<(u64, Option<u8>)>>) -> History {
        let mut states = vec![vec![0u8; disk_bytes as usize]];
        for b in &batches {
            let mut s = states[states.len() - 1].clone();
            for (c, v) in b {
                let off = (*c * u64::from(CS)) as usize;
                let len = (disk_bytes as usize - off).min(CS as usize);
                let data = match v {
                    Some(v) => content(*c, *v, len),
                    None => vec![0; len],
                };
                s[off..off + len].copy_from_slice(&data);
            }
            states.push(s);
        }
        History {
            disk_bytes,
            batches,
            states,
        }
    }

    fn batch_id(seq: u64) -> BatchId {
        BatchId {
            version: Version { generation: 1, seq },
            primary: "office".into(),
            flush_epoch: seq * 10,
        }
    }

    /// Apply batches after `from`; returns the last seq whose commit returned Ok.
    fn replicate(&self, w: &mut ReplicaWriter, from: u64) -> (u64, Result<()>) {
        let mut done = from;
        for seq in from + 1..=self.batches.len() as u64 {
            let r = (|| {
                w.begin(Self::batch_id(seq))?;
                for (c, v) in &self.batches[seq as usize - 1] {
                    let off = *c * u64::from(CS);
                    let len = (self.disk_bytes - off).min(u64::from(CS)) as usize;
                    let data = v.map_or_else(|| vec![0; len], |v| content(*c, v, len));
                    w.stage(*c, &data)?;
                }
                w.commit().map(|_| ())
            })();
            if let Err(e) = r {
                return (done, Err(e));
            }
            done = seq;
        }
        (done, Ok(()))
    }
}

/// Crashes after which the raw disk, before `open`, was *not* a history state: proof that
/// recovery does real work and that the check below can fail.
static MIXED_BEFORE_RECOVERY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn disk_of(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("disk")).unwrap()
}

/// Crash at step `at` of the replication, then (optionally) at step `again` of the
/// recovery; check the state, resume, check the end. Returns whether the crash fired.
fn crash_case(h: &History, at: u64, again: Option<u64>) -> bool {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    ReplicaWriter::create(&dir, h.disk_bytes, CS).unwrap();
    // Step 0 is the first open's own recovery; a crash there is a crash before anything.
    let (committed, r) = match ReplicaWriter::open(
        &dir,
        Box::new(CrashAt {
            at: Some(at),
            seen: 0,
        }),
    ) {
        Ok((mut w, _)) => h.replicate(&mut w, 0), // `w` dies here: nothing more is written
        Err(e) => (0, Err(e)),
    };
    let crashed = matches!(r, Err(StoreError::InjectedCrash(_)));
    let raw = disk_of(&dir);
    if !h.states.contains(&raw) {
        MIXED_BEFORE_RECOVERY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    assert!(r.is_ok() || crashed, "unexpected error {r:?}");
    let (mut w, rec) = match ReplicaWriter::open(&dir, Box::new(CrashAt { at: again, seen: 0 })) {
        Ok(x) => x,
        Err(StoreError::InjectedCrash(_)) => ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap(),
        Err(e) => panic!("recovery failed: {e}"),
    };
    let a = rec.applied.version.seq;
    assert!(
        a == committed || a == committed + 1,
        "applied {a}, last acknowledged commit {committed}"
    );
    assert!(
        disk_of(&dir) == h.states[a as usize],
        "crash at step {at} (then {again:?}): disk is not state {a} of the history"
    );
    // Resume where the replica stands; the end state is the source's last state.
    w.hook = Box::new(NoFaults);
    let (end, r) = h.replicate(&mut w, a);
    r.unwrap();
    assert_eq!(end, h.batches.len() as u64);
    assert!(disk_of(&dir) == h.states[h.batches.len()]);
    crashed
}

fn fixed_history() -> History {
    History::new(
        6 * u64::from(CS) - 100,
        vec![
            vec![(0, Some(1)), (2, Some(2)), (5, Some(3))],
            vec![(0, Some(4)), (0, Some(5)), (1, Some(6)), (5, None)],
            vec![(2, None), (3, Some(7)), (4, Some(8)), (5, Some(9))],
        ],
    )
}

/// Counts steps into a shared counter (the writer owns its hook).
struct Counting(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl FaultHook for Counting {
    fn before(&mut self, _: Step) -> Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn crash_before_every_step_leaves_a_history_state() {
    let h = fixed_history();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        ReplicaWriter::create(&dir, h.disk_bytes, CS).unwrap();
        let (mut w, _) = ReplicaWriter::open(&dir, Box::new(Counting(counter.clone()))).unwrap();
        h.replicate(&mut w, 0).1.unwrap();
    }
    // Steps of a full run: 1 (initial journal reset in open) + per batch: records,
    // journal sync, commit record, one apply per record, disk sync, applied record, reset.
    let total: u64 = 1 + h
        .batches
        .iter()
        .map(|b| 2 * b.len() as u64 + 5)
        .sum::<u64>();
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), total);
    let mut fired = 0;
    for at in 0..total {
        if crash_case(&h, at, None) {
            fired += 1;
        }
    }
    assert_eq!(fired, total, "every step is a crash point");
    assert!(
        MIXED_BEFORE_RECOVERY.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "some crash must interrupt an apply half-way (else the oracle is untested)"
    );
    assert!(
        !crash_case(&h, total + 5, None),
        "past the end nothing fires"
    );
    // A second crash during recovery, at each of its first steps.
    for at in (0..total).step_by(3) {
        for again in 0..6 {
            crash_case(&h, at, Some(again));
        }
    }
}

fn arb_history() -> impl Strategy<Value = History> {
    (2u64..10, 1u64..512).prop_flat_map(|(n, tail)| {
        let disk_bytes = (n - 1) * u64::from(CS) + tail;
        let write = (0..n, proptest::option::weighted(0.8, 1u8..255));
        proptest::collection::vec(proptest::collection::vec(write, 1..6), 1..5)
            .prop_map(move |b| History::new(disk_bytes, b))
    })
}

proptest! {
    #[test]
    fn record_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Record::decode(&bytes);
    }

    #[test]
    fn record_round_trips(g in any::<u64>(), s in any::<u64>(), e in any::<u64>(), p in "[a-z0-9.-]{0,40}",
                          commit in proptest::option::of((any::<u64>(), any::<[u8; 32]>()))) {
        let b = BatchId { version: Version { generation: g, seq: s }, primary: p, flush_epoch: e };
        let r = Record {
            disk_bytes: 1 << 20,
            chunk_size: 4096,
            applied: b.clone(),
            committing: commit.map(|(l, h)| Committing { batch: b.clone(), journal_len: l, journal_sum: h }),
        };
        prop_assert_eq!(Record::decode(&r.encode()).unwrap(), r);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_random_crashes(h in arb_history(), at in 0u64..60, again in proptest::option::of(0u64..8)) {
        crash_case(&h, at, again);
    }
}

#[test]
fn torn_uncommitted_journal_is_discarded() {
    let h = fixed_history();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    ReplicaWriter::create(&dir, h.disk_bytes, CS).unwrap();
    let (mut w, _) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    h.replicate(&mut w, 0).1.unwrap();
    w.begin(History::batch_id(4)).unwrap();
    w.stage(1, &content(1, 77, CS as usize)).unwrap();
    w.stage(2, &content(2, 78, CS as usize)).unwrap();
    drop(w);
    // The crash tore the journal's last record.
    let j = dir.join("journal");
    let len = std::fs::metadata(&j).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&j)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (_, rec) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    assert_eq!(rec.applied.version.seq, 3);
    assert_eq!(rec.discarded, len - 100);
    assert!(disk_of(&dir) == h.states[3]);
    assert_eq!(std::fs::metadata(&j).unwrap().len(), 0);
}

#[test]
fn corrupt_committed_journal_is_refused_not_applied() {
    let h = fixed_history();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    ReplicaWriter::create(&dir, h.disk_bytes, CS).unwrap();
    // Crash right after the commit record of batch 1 (steps: reset, 3 records, sync, commit).
    let (mut w, _) = ReplicaWriter::open(
        &dir,
        Box::new(CrashAt {
            at: Some(6),
            seen: 0,
        }),
    )
    .unwrap();
    assert!(h.replicate(&mut w, 0).1.is_err());
    drop(w);
    let j = dir.join("journal");
    let mut bytes = std::fs::read(&j).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&j, &bytes).unwrap();
    let before = disk_of(&dir);
    assert!(matches!(
        ReplicaWriter::open(&dir, Box::new(NoFaults)),
        Err(StoreError::Checksum { .. })
    ));
    assert_eq!(disk_of(&dir), before, "nothing applied from a bad journal");
}

#[test]
fn generation_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    ReplicaWriter::create(&dir, 4 * u64::from(CS), CS).unwrap();
    let (mut w, _) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    let b = |g, s, p: &str| BatchId {
        version: Version {
            generation: g,
            seq: s,
        },
        primary: p.into(),
        flush_epoch: 0,
    };
    w.begin(b(3, 1, "office")).unwrap();
    w.stage(0, &[5u8; CS as usize]).unwrap();
    w.commit().unwrap();
    assert!(matches!(
        w.begin(b(2, 9, "office")),
        Err(StoreError::StaleGeneration {
            seen: 3,
            offered: 2
        })
    ));
    assert!(matches!(
        w.begin(b(3, 2, "home")),
        Err(StoreError::SplitBrain { generation: 3, .. })
    ));
    assert!(matches!(
        w.begin(b(3, 1, "office")),
        Err(StoreError::NotNewer { .. })
    ));
    // The VM moved: generation 4 at "home" restarts its batch numbers.
    w.begin(b(4, 1, "home")).unwrap();
    w.stage(1, &[6u8; CS as usize]).unwrap();
    w.commit().unwrap();
    assert!(matches!(
        w.begin(b(3, 50, "office")),
        Err(StoreError::StaleGeneration { .. })
    ));
    drop(w);
    let (w, rec) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    assert_eq!(rec.applied, b(4, 1, "home"));
    assert!(w.admits(&b(4, 2, "home")).is_ok());
}

#[test]
fn staged_chunks_are_invisible_until_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    ReplicaWriter::create(&dir, 4 * u64::from(CS), CS).unwrap();
    let (mut w, _) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    w.begin(History::batch_id(1)).unwrap();
    w.stage(2, &[9u8; CS as usize]).unwrap();
    w.stage(3, &[0u8; CS as usize]).unwrap();
    let mut buf = vec![1u8; CS as usize];
    w.read_chunk(2, &mut buf).unwrap();
    assert_eq!(
        buf,
        vec![0u8; CS as usize],
        "the committed state is untouched"
    );
    assert!(w.read_staged(2, &mut buf).unwrap());
    assert_eq!(buf, vec![9u8; CS as usize]);
    assert!(w.read_staged(3, &mut buf).unwrap());
    assert_eq!(buf, vec![0u8; CS as usize]);
    assert!(!w.read_staged(1, &mut buf).unwrap());
    assert!(w.stage(4, &buf).is_err(), "out of range");
    assert!(w.stage(1, &buf[..10]).is_err(), "wrong length");
    w.commit().unwrap();
    w.read_chunk(2, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; CS as usize]);
}
