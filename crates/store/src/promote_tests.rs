//! Tests of the undo log: reads see every write; `keep` keeps them; a roll back, or a
//! recovery after a crash before any durable step (and a second crash inside recovery,
//! and a torn unsynced tail), gives the file back byte for byte as lent.

use super::*;
use crate::replica::{BatchId, CrashAt, NoFaults, ReplicaWriter, Version};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const CS: u32 = 512;

#[derive(Debug, Clone)]
enum Op {
    /// Write chunk (None = zeroes).
    Write(u64, Option<u8>),
    Read(u64),
    Flush,
}

#[derive(Debug, Clone)]
struct Case {
    disk_bytes: u64,
    /// The lent file: chunks written (the rest are holes).
    original: Vec<(u64, u8)>,
    ops: Vec<Op>,
    queue_bytes: usize,
}

fn content(chunk: u64, v: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| v ^ (chunk as u8).wrapping_mul(7) ^ (i as u8 & 5))
        .collect()
}

impl Case {
    fn chunk_len(&self, c: u64) -> usize {
        (self.disk_bytes - c * u64::from(CS)).min(u64::from(CS)) as usize
    }

    fn original_bytes(&self) -> Vec<u8> {
        let mut s = vec![0u8; self.disk_bytes as usize];
        for &(c, v) in &self.original {
            let off = (c * u64::from(CS)) as usize;
            let len = self.chunk_len(c);
            s[off..off + len].copy_from_slice(&content(c, v, len));
        }
        s
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    paths: PromotePaths,
}

fn setup(case: &Case) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("replica");
    let inc = tmp.path().join("incoming");
    std::fs::create_dir_all(&r).unwrap();
    std::fs::create_dir_all(&inc).unwrap();
    let paths = PromotePaths {
        home: r.join("disk"),
        at: inc.join("disk.raw"),
        marker: r.join("promoted"),
        log: r.join("undo"),
    };
    let f = File::create(&paths.home).unwrap();
    f.set_len(case.disk_bytes).unwrap();
    for &(c, v) in &case.original {
        let len = case.chunk_len(c);
        f.write_all_at(&content(c, v, len), c * u64::from(CS))
            .unwrap();
    }
    Env { _tmp: tmp, paths }
}

/// Promote, run the ops (checking every read against the model), then `sync`.
/// Returns the writer if promotion got that far, the model, and the first error.
fn run(
    case: &Case,
    paths: &PromotePaths,
    hook: Box<dyn FaultHook>,
) -> (Option<Promoted>, Vec<u8>, Result<()>) {
    let mut model = case.original_bytes();
    let mut p = match Promoted::promote(paths.clone(), case.disk_bytes, CS, hook) {
        Ok(p) => p.with_queue_bytes(case.queue_bytes),
        Err(e) => return (None, model, Err(e)),
    };
    let r = (|| -> Result<()> {
        for op in &case.ops {
            match *op {
                Op::Write(c, v) => {
                    let len = case.chunk_len(c);
                    let data = v.map_or_else(|| vec![0; len], |v| content(c, v, len));
                    if v.is_none() && c.is_multiple_of(2) {
                        p.zero(c)?;
                    } else {
                        p.write(c, &data)?;
                    }
                    let off = (c * u64::from(CS)) as usize;
                    model[off..off + len].copy_from_slice(&data);
                }
                Op::Read(c) => {
                    let len = case.chunk_len(c);
                    let mut buf = vec![0xEE; len];
                    p.read(c, &mut buf)?;
                    let off = (c * u64::from(CS)) as usize;
                    assert!(buf == model[off..off + len], "read of chunk {c} is stale");
                }
                Op::Flush => p.flush()?,
            }
        }
        p.sync()
    })();
    (Some(p), model, r)
}

fn read_padded(path: &Path, len: u64) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    assert!(b.len() as u64 <= len, "{} grew", path.display());
    b.resize(len as usize, 0);
    b
}

/// The file is home, exactly as lent, and nothing of the promotion is left.
fn assert_given_back(case: &Case, paths: &PromotePaths, what: &str) {
    assert!(!paths.at.exists(), "{what}: file left at `at`");
    assert!(!paths.marker.exists(), "{what}: marker left");
    assert!(!paths.log.exists(), "{what}: undo log left");
    assert_eq!(
        std::fs::metadata(&paths.home).unwrap().len(),
        case.disk_bytes,
        "{what}: size"
    );
    assert!(
        read_padded(&paths.home, case.disk_bytes) == case.original_bytes(),
        "{what}: the file is not as lent"
    );
}

/// Crashes whose file, before recovery, differed from the original (proof the oracle can
/// fail and recovery does work).
static CHANGED_BEFORE_RECOVERY: AtomicU64 = AtomicU64::new(0);

/// Crash at step `at` (of promote, the ops, the sync, then the roll back), optionally tear
/// the unsynced tail of the log, recover (crashing once more at `again`), and check.
/// Returns whether the first crash fired.
fn crash_case(case: &Case, at: u64, again: Option<u64>, tear: Option<u64>) -> bool {
    let env = setup(case);
    let paths = &env.paths;
    let hook = Box::new(CrashAt {
        at: Some(at),
        seen: 0,
    });
    let (p, _, r) = run(case, paths, hook);
    let mut crashed = matches!(r, Err(StoreError::InjectedCrash(_)));
    assert!(r.is_ok() || crashed, "unexpected error {r:?}");
    if let Some(p) = p {
        if crashed {
            if let Some(t) = tear {
                tear_tail(&paths.log, p.synced_log_len(), t);
            }
            drop(p); // the process died: nothing more is written
        } else {
            // The migration failed: roll back (its hook still counts steps).
            match p.roll_back() {
                Ok(_) => {}
                Err(StoreError::InjectedCrash(_)) => crashed = true,
                Err(e) => panic!("roll back: {e}"),
            }
        }
    }
    let disk = [&paths.at, &paths.home].into_iter().find(|p| p.exists());
    if disk.is_some_and(|d| read_padded(d, case.disk_bytes) != case.original_bytes()) {
        CHANGED_BEFORE_RECOVERY.fetch_add(1, Ordering::Relaxed);
    }
    match recover(&paths.marker, Box::new(CrashAt { at: again, seen: 0 })) {
        Ok(_) => {}
        Err(StoreError::InjectedCrash(_)) => {
            recover(&paths.marker, Box::new(NoFaults)).unwrap();
        }
        Err(e) => panic!("recovery after a crash at {at} (then {again:?}): {e}"),
    }
    if paths.log.exists() && !paths.marker.exists() {
        // A crash before the marker (promote's first step) leaves only this debris.
        std::fs::remove_file(&paths.log).unwrap();
    }
    assert_given_back(
        case,
        paths,
        &format!("crash at {at}, then {again:?}, tear {tear:?}"),
    );
    assert!(recover(&paths.marker, Box::new(NoFaults))
        .unwrap()
        .is_none());
    crashed
}

/// Damage the log past what was made durable: cut it, or garble a byte, or both.
fn tear_tail(log: &Path, synced: u64, t: u64) {
    let len = std::fs::metadata(log).unwrap().len();
    if len <= synced {
        // Nothing unsynced: a torn tail can only be garbage appended by the crash.
        let f = OpenOptions::new().write(true).open(log).unwrap();
        f.write_all_at(&vec![(t as u8) | 1; (t % 40) as usize + 1], len)
            .unwrap();
        return;
    }
    let span = len - synced;
    let f = OpenOptions::new().read(true).write(true).open(log).unwrap();
    if t.is_multiple_of(2) {
        f.set_len(synced + t % span).unwrap();
    } else {
        let pos = synced + t % span;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], pos).unwrap();
    }
}

fn fixed_case() -> Case {
    Case {
        disk_bytes: 7 * u64::from(CS) - 77,
        original: vec![(0, 1), (2, 2), (3, 3), (6, 4)],
        ops: vec![
            Op::Write(0, Some(9)),
            Op::Write(1, Some(8)),
            Op::Read(0),
            Op::Write(0, Some(7)), // rewritten while queued
            Op::Write(3, None),
            Op::Flush,
            Op::Write(0, Some(6)), // pre-image saved already: written at once
            Op::Read(3),
            Op::Write(6, Some(5)), // the short tail chunk
            Op::Write(4, None),    // a hole stays a hole
            Op::Read(6),
            Op::Write(2, Some(3)),
            Op::Write(5, Some(2)),
        ],
        queue_bytes: 3 * CS as usize,
    }
}

/// Counts steps into a shared counter.
struct Counting(Arc<AtomicU64>);

impl FaultHook for Counting {
    fn before(&mut self, _: Step) -> Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn steps_of_a_full_run(case: &Case) -> u64 {
    let env = setup(case);
    let n = Arc::new(AtomicU64::new(0));
    let (p, _, r) = run(case, &env.paths, Box::new(Counting(n.clone())));
    r.unwrap();
    p.unwrap().roll_back().unwrap();
    assert_given_back(case, &env.paths, "roll back");
    n.load(Ordering::Relaxed)
}

#[test]
fn roll_back_after_a_crash_before_every_step_gives_the_file_back() {
    let case = fixed_case();
    let total = steps_of_a_full_run(&case);
    assert!(total > 20, "{total} steps");
    for at in 0..total {
        assert!(
            crash_case(&case, at, None, None),
            "step {at} is a crash point"
        );
    }
    assert!(
        CHANGED_BEFORE_RECOVERY.load(Ordering::Relaxed) > 0,
        "some crash must leave the file changed (else the check is vacuous)"
    );
    // A second crash inside recovery, at each of its first steps; a torn tail.
    for at in (0..total).step_by(2) {
        for again in 0..8 {
            crash_case(&case, at, Some(again), None);
        }
        for t in 0..6 {
            crash_case(&case, at, None, Some(t * 37));
        }
    }
}

#[test]
fn keep_leaves_every_write_and_no_trace() {
    let case = fixed_case();
    let env = setup(&case);
    let (p, model, r) = run(&case, &env.paths, Box::new(NoFaults));
    r.unwrap();
    let p = p.unwrap();
    assert!(p.saved_chunks() > 0);
    let at = p.keep().unwrap();
    assert_eq!(at, env.paths.at);
    assert!(read_padded(&at, case.disk_bytes) == model);
    assert!(!env.paths.home.exists() && !env.paths.marker.exists() && !env.paths.log.exists());
    assert!(recover(&env.paths.marker, Box::new(NoFaults))
        .unwrap()
        .is_none());
}

#[test]
fn a_crash_inside_keep_rolls_back_until_the_marker_is_gone() {
    let case = fixed_case();
    let env0 = setup(&case);
    let n = Arc::new(AtomicU64::new(0));
    let (p, _, r) = run(&case, &env0.paths, Box::new(Counting(n.clone())));
    r.unwrap();
    let before_keep = n.load(Ordering::Relaxed);
    p.unwrap().keep().unwrap();
    let total = n.load(Ordering::Relaxed);
    for at in before_keep..total {
        let env = setup(&case);
        let hook = Box::new(CrashAt {
            at: Some(at),
            seen: 0,
        });
        let (p, _, r) = run(&case, &env.paths, hook);
        r.unwrap();
        assert!(matches!(
            p.unwrap().keep(),
            Err(StoreError::InjectedCrash(_))
        ));
        recover(&env.paths.marker, Box::new(NoFaults)).unwrap();
        assert_given_back(&case, &env.paths, &format!("crash in keep at {at}"));
    }
}

#[test]
fn promote_refuses_twice_and_a_bad_target() {
    let case = fixed_case();
    let env = setup(&case);
    let p = Promoted::promote(env.paths.clone(), case.disk_bytes, CS, Box::new(NoFaults)).unwrap();
    let again = PromotePaths {
        at: env.paths.at.with_extension("other"),
        ..env.paths.clone()
    };
    assert!(matches!(
        Promoted::promote(again, case.disk_bytes, CS, Box::new(NoFaults)),
        Err(StoreError::Promoted(_))
    ));
    p.roll_back().unwrap();
    std::fs::write(&env.paths.at, b"x").unwrap();
    assert!(Promoted::promote(env.paths.clone(), case.disk_bytes, CS, Box::new(NoFaults)).is_err());
    assert!(!env.paths.marker.exists());
    assert!(Promoted::promote(env.paths.clone(), CS as u64, CS, Box::new(NoFaults)).is_err());
}

#[test]
fn a_damaged_log_header_is_refused_not_guessed() {
    let case = fixed_case();
    let env = setup(&case);
    let (p, _, r) = run(&case, &env.paths, Box::new(NoFaults));
    r.unwrap();
    drop(p);
    let f = OpenOptions::new().write(true).open(&env.paths.log).unwrap();
    f.write_all_at(&[0xFF], 5).unwrap();
    assert!(matches!(
        recover(&env.paths.marker, Box::new(NoFaults)),
        Err(StoreError::Malformed { .. })
    ));
    assert!(
        env.paths.marker.exists(),
        "the marker stays until it is resolved"
    );
}

/// A replica lent to a migration: `open` refuses it until it is given back; then it is its
/// committed batch and takes the next one.
#[test]
fn replica_promoted_then_recovered_is_its_committed_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let at = tmp.path().join("disk.raw");
    let bytes = 6 * u64::from(CS);
    ReplicaWriter::create(&dir, bytes, CS).unwrap();
    let b = |seq| BatchId {
        version: Version { generation: 2, seq },
        primary: "office".into(),
        flush_epoch: 0,
    };
    let (mut w, _) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    w.begin(b(1)).unwrap();
    w.stage(1, &[3u8; CS as usize]).unwrap();
    w.stage(4, &[4u8; CS as usize]).unwrap();
    w.commit().unwrap();
    // A batch half staged when the migration arrives is dropped.
    w.begin(b(2)).unwrap();
    w.stage(2, &[5u8; CS as usize]).unwrap();
    let committed = std::fs::read(dir.join("disk")).unwrap();
    let mut p = w.promote(&at, Box::new(NoFaults)).unwrap();
    p.write(1, &[9u8; CS as usize]).unwrap();
    p.zero(4).unwrap();
    p.write(5, &[7u8; CS as usize]).unwrap();
    p.sync().unwrap();
    drop(p); // roamd died mid-migration
    assert!(matches!(
        ReplicaWriter::open(&dir, Box::new(NoFaults)),
        Err(StoreError::Promoted(_))
    ));
    let rb = crate::replica::recover_promotion(&dir, Box::new(NoFaults))
        .unwrap()
        .unwrap();
    assert_eq!(rb.restored, 3);
    assert_eq!(std::fs::read(dir.join("disk")).unwrap(), committed);
    let (mut w, rec) = ReplicaWriter::open(&dir, Box::new(NoFaults)).unwrap();
    assert_eq!(rec.applied, b(1));
    w.begin(b(2)).unwrap();
    w.stage(0, &[1u8; CS as usize]).unwrap();
    w.commit().unwrap();
    assert_eq!(
        &std::fs::read(dir.join("disk")).unwrap()[..4],
        &[1, 1, 1, 1]
    );
}

fn arb_case() -> impl Strategy<Value = Case> {
    (2u64..10, 1u64..=u64::from(CS)).prop_flat_map(|(n, tail)| {
        let disk_bytes = (n - 1) * u64::from(CS) + tail;
        let original = proptest::collection::vec((0..n, 1u8..255), 0..8);
        let op = prop_oneof![
            6 => (0..n, proptest::option::weighted(0.75, 1u8..255)).prop_map(|(c, v)| Op::Write(c, v)),
            2 => (0..n).prop_map(Op::Read),
            1 => Just(Op::Flush),
        ];
        let ops = proptest::collection::vec(op, 0..16);
        (original, ops, 1usize..4).prop_map(move |(original, ops, q)| Case {
            disk_bytes,
            original,
            ops,
            queue_bytes: q * CS as usize,
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_random_crashes_give_the_file_back(
        case in arb_case(),
        at in 0u64..60,
        again in proptest::option::of(0u64..10),
        tear in proptest::option::of(any::<u64>()),
    ) {
        crash_case(&case, at, again, tear);
    }

    #[test]
    fn marker_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = Marker::decode(&bytes);
    }

    #[test]
    fn marker_round_trips(n in 1u64..1 << 36, a in "[a-z/]{1,30}", b in "[a-z/]{1,30}") {
        let m = Marker {
            paths: PromotePaths {
                home: PathBuf::from(&a),
                at: PathBuf::from(&b),
                marker: PathBuf::from(format!("{a}.m")),
                log: PathBuf::from(format!("{b}.l")),
            },
            disk_bytes: n,
            chunk_size: 4096,
        };
        prop_assert_eq!(Marker::decode(&m.encode()).unwrap(), m);
    }
}
