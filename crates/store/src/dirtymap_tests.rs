//! Model-based tests of the persistent dirty map: whatever the sequence of marks, cuts,
//! acks, persists, crashes and clean restarts, no chunk whose latest write the replica
//! has not acknowledged is ever forgotten.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const CS: u32 = 512;

#[derive(Debug, Clone)]
enum Op {
    Mark(u64),
    Cut,
    /// The replica commits the oldest outstanding batch and its ack arrives.
    Deliver,
    /// The replica commits the oldest batch but the ack is lost (link cut).
    DeliverNoAck,
    Persist,
    /// The consumer's process dies: reopen from the file, then resume from the replica.
    Crash,
    /// Clean close and reopen.
    Restart,
}

fn op(chunks: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..chunks).prop_map(Op::Mark),
        2 => Just(Op::Cut),
        2 => Just(Op::Deliver),
        1 => Just(Op::DeliverNoAck),
        1 => Just(Op::Persist),
        1 => Just(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn never_forgets_an_unacknowledged_write(
        chunks in 1u64..300,
        ops in proptest::collection::vec(op(300), 1..80),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty");
        let bytes = chunks * u64::from(CS) - 7;
        let mut m = PersistentDirtyMap::create(&path, bytes, CS, false).unwrap();
        let mut clock = 0u64;
        // Model: time of each chunk's last write; the chunks and cut time of each batch
        // the consumer sent; the replica's last committed batch.
        let mut last_write: BTreeMap<u64, u64> = BTreeMap::new();
        let mut sent: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
        let mut replica_applied = 0u64;
        let mut replica_has: BTreeMap<u64, u64> = BTreeMap::new(); // chunk -> write time it reflects
        for op in ops {
            clock += 1;
            match op {
                Op::Mark(c) => {
                    let c = c % chunks;
                    last_write.insert(c, clock);
                    // The write path's gate: persist before acknowledging a write to a
                    // cold extent.
                    if m.mark(c) { m.persist().unwrap(); }
                }
                Op::Cut => {
                    if let Ok(Some(seq)) = m.cut() {
                        prop_assert!(seq > replica_applied, "batch numbers never reused");
                        let cs: Vec<u64> = m.batch(seq).unwrap().collect();
                        sent.insert(seq, (clock, cs));
                    }
                    prop_assert!(m.inflight().len() <= MAX_INFLIGHT);
                }
                Op::Deliver | Op::DeliverNoAck => {
                    // The replica applies the oldest batch the consumer still has in flight.
                    if let Some(&seq) = m.inflight().first() {
                        let (t, cs) = sent[&seq].clone();
                        for c in cs { replica_has.insert(c, t); }
                        replica_applied = seq;
                        if matches!(op, Op::Deliver) { m.ack(seq); }
                    }
                }
                Op::Persist => m.persist().unwrap(),
                Op::Crash => {
                    drop(m);
                    let (mut n, _) = PersistentDirtyMap::open(&path, bytes, CS).unwrap();
                    n.resume(replica_applied);
                    m = n;
                }
                Op::Restart => {
                    let before = m.pending();
                    let applied_before = m.acked_seq();
                    m.close().unwrap();
                    let (n, r) = PersistentDirtyMap::open(&path, bytes, CS).unwrap();
                    prop_assert_eq!(r, Resume::Clean);
                    prop_assert_eq!(n.pending(), before, "a clean restart resends nothing extra");
                    prop_assert_eq!(n.acked_seq(), applied_before);
                    m = n;
                }
            }
            // The invariant: every chunk whose last write the replica does not reflect is
            // pending at the consumer.
            for (c, t) in &last_write {
                let covered = replica_has.get(c).is_some_and(|r| r >= t);
                if !covered {
                    prop_assert!(m.is_pending(*c), "chunk {} written at {} is lost", c, t);
                }
            }
        }
    }

    #[test]
    fn memory_and_file_bounded_by_disk_size(marks in proptest::collection::vec(0u64..4096, 0..2000)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty");
        let mut m = PersistentDirtyMap::create(&path, 4096 * 512, CS, false).unwrap();
        // A long outage: marks and cuts but no acks.
        for (i, c) in marks.iter().enumerate() {
            m.mark(*c);
            if i % 100 == 0 { let _ = m.cut(); }
        }
        m.persist().unwrap();
        let max = (2 + MAX_INFLIGHT as u64) * (4096 / 64) * 16 + 200;
        prop_assert!(std::fs::metadata(&path).unwrap().len() <= max);
        prop_assert!(m.inflight().len() <= MAX_INFLIGHT);
        let set: BTreeSet<u64> = marks.iter().copied().collect();
        prop_assert_eq!(m.pending(), set.into_iter().collect::<Vec<_>>());
    }
}

proptest! {
    #[test]
    fn garbage_payloads_never_panic(words in proptest::collection::vec(any::<u64>(), 0..40), small in any::<bool>()) {
        let mut p = Vec::new();
        for (i, w) in words.iter().enumerate() {
            // Keep the geometry plausible half of the time so the bitmap parsers run.
            let w = match (small, i) { (true, 0) => 512, (true, 1) => 100, (true, 4) => w % 2, (true, _) => w % 200, _ => *w };
            p.extend_from_slice(&w.to_be_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty");
        envelope::write_file(&KIND, &path, &p).unwrap();
        let _ = PersistentDirtyMap::open(&path, 100 * 512, CS);
    }
}

#[test]
fn unclean_open_marks_hot_extents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty");
    let mut m = PersistentDirtyMap::create(&path, 1000 * 512, CS, false).unwrap();
    assert!(m.mark(130), "a cold extent needs a persist first");
    m.persist().unwrap();
    assert!(!m.mark(131), "extent 2 is hot now");
    // Chunk 131's mark was never persisted; the crash loses it but extent 2 is hot.
    drop(m);
    let (m, r) = PersistentDirtyMap::open(&path, 1000 * 512, CS).unwrap();
    assert_eq!(r, Resume::Unclean { hot_chunks: 63 });
    assert!(m.is_pending(131) && m.is_pending(128) && m.is_pending(191));
    assert!(!m.is_pending(192) && !m.is_pending(127));
}

#[test]
fn corrupt_or_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty");
    let mut m = PersistentDirtyMap::create(&path, 100 * 512, CS, true).unwrap();
    m.persist().unwrap();
    assert!(
        PersistentDirtyMap::open(&path, 101 * 512, CS).is_err(),
        "other geometry"
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        PersistentDirtyMap::open(&path, 100 * 512, CS),
        Err(StoreError::Checksum { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(PersistentDirtyMap::open(&path, 100 * 512, CS).is_err());
}

#[test]
fn payload_with_phantom_bits_is_refused() {
    let mut p = Vec::new();
    for v in [512u64, 10, 1, 0, 1] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    Bits::new(1).encode(&mut p); // hot
                                 // dirty: one word with bit 20 set, past chunk 10.
    p.extend_from_slice(&1u64.to_be_bytes());
    p.extend_from_slice(&0u64.to_be_bytes());
    p.extend_from_slice(&(1u64 << 20).to_be_bytes());
    p.extend_from_slice(&0u64.to_be_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty");
    envelope::write_file(&KIND, &path, &p).unwrap();
    assert!(matches!(
        PersistentDirtyMap::open(&path, 10 * 512, CS),
        Err(StoreError::Malformed { .. })
    ));
}
