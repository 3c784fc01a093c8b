//! Crash campaign of the replication *source*: a process that writes a disk through
//! roam-nbd's tracker and replicates it with a `roam_store::LiveMap` (`roam-lab-primary`,
//! the parts of roamd a crash can cut) is SIGKILLed at 50 random instants while its guest
//! threads write. This test plays the replica: it applies a batch only once the whole
//! batch arrived, and acknowledges it. After each kill, what the live map left must be
//! exactly enough: the replica (at the batch it committed, which may be one later than
//! the map's, when the kill fell between the commit and its anchor) with the chunks the
//! map names copied from the disk must equal the disk, byte for byte, including writes
//! the kill cut short. A map that was not anchored at the instant (the first moment, or
//! inside a commit's few stores) may say nothing; that costs a hash comparison, never a
//! chunk, and must be rare.
//!
//! `ROAM_CRASH_SEED=N` replays the choices (kill delays, writers' seeds).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roam_lab::rng::Rng;
use roam_store::live::{self, Unusable};

const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = 256;
const POINTS: usize = 50;

/// The replica as this test keeps it: its disk and its last committed batch.
struct Replica {
    disk: Vec<u8>,
    seq: u64,
    batches: u64,
}

/// Reads batches from the source until it dies; applies each complete one and
/// acknowledges it. A batch cut short by the kill is dropped whole (a real replica's
/// journal does the same).
fn serve(mut from: impl Read, mut to: impl Write, replica: &Mutex<Replica>) {
    let mut chunk = vec![0u8; CHUNK as usize];
    loop {
        let mut head = [0u8; 17];
        if from.read_exact(&mut head).is_err() || head[0] != b'B' {
            return;
        }
        let seq = u64::from_le_bytes(head[1..9].try_into().unwrap());
        let count = u64::from_le_bytes(head[9..17].try_into().unwrap());
        let mut staged = Vec::new();
        for _ in 0..count {
            let mut c = [0u8; 8];
            if from.read_exact(&mut c).is_err() || from.read_exact(&mut chunk).is_err() {
                return;
            }
            staged.push((u64::from_le_bytes(c), chunk.clone()));
        }
        let mut end = [0u8; 1];
        if from.read_exact(&mut end).is_err() || end[0] != b'C' {
            return;
        }
        {
            let mut r = replica.lock().unwrap();
            assert_eq!(seq, r.seq + 1, "batches out of order");
            for (c, data) in staged {
                let at = (c * CHUNK) as usize;
                r.disk[at..at + CHUNK as usize].copy_from_slice(&data);
            }
            r.seq = seq;
            r.batches += 1;
        }
        if to.write_all(&seq.to_le_bytes()).is_err() || to.flush().is_err() {
            return;
        }
    }
}

fn differing(a: &[u8], b: &[u8]) -> Vec<u64> {
    (0..CHUNKS)
        .filter(|&c| {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            a[r.clone()] != b[r]
        })
        .collect()
}

#[test]
fn a_killed_source_leaves_exactly_what_its_replica_lacks_at_50_random_instants() {
    let seed: u64 = std::env::var("ROAM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("primary crash campaign: ROAM_CRASH_SEED={seed} replays the choices");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk");
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(CHUNKS * CHUNK)
        .unwrap();
    let replica = Arc::new(Mutex::new(Replica {
        disk: vec![0u8; (CHUNKS * CHUNK) as usize],
        seq: 0,
        batches: 0,
    }));

    let (mut recovered, mut unanchored, mut one_later, mut cut_writes) = (0, 0, 0, 0usize);
    let mut failures = Vec::new();
    for point in 0..POINTS {
        let start_seq = replica.lock().unwrap().seq;
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam-lab-primary"))
            .arg(dir.path())
            .arg(start_seq.to_string())
            .arg(rng.next_u64().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (from, to) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
        let server = {
            let replica = replica.clone();
            std::thread::spawn(move || serve(from, to, &replica))
        };
        std::thread::sleep(Duration::from_millis(20 + rng.next_u64() % 300));
        child.kill().unwrap();
        child.wait().unwrap();
        server.join().unwrap();

        let mut disk = vec![0u8; (CHUNKS * CHUNK) as usize];
        std::fs::File::open(&disk_path)
            .unwrap()
            .read_exact_at(&mut disk, 0)
            .unwrap();
        let mut r = replica.lock().unwrap();
        match live::recover(&dir.path().join("live"), "disk@replica") {
            Ok(Some(found)) => {
                recovered += 1;
                let (map, rep) = (found.synced_to.seq, r.seq);
                if rep == map + 1 {
                    one_later += 1;
                } else if rep != map {
                    failures.push(format!(
                        "point {point}: the map says batch {map}, the replica has {rep}"
                    ));
                }
                let mut fixed = r.disk.clone();
                for &c in &found.pending {
                    let at = (c * CHUNK) as usize;
                    fixed[at..at + CHUNK as usize].copy_from_slice(&disk[at..at + CHUNK as usize]);
                }
                let missed = differing(&fixed, &disk);
                if !missed.is_empty() {
                    failures.push(format!(
                        "point {point}: chunks {missed:?} differ from the replica and the map \
                         does not name them (it names {:?})",
                        found.pending
                    ));
                }
                // Writes the kill interrupted, or made since the last batch: named.
                let behind: BTreeSet<u64> = differing(&r.disk, &disk).into_iter().collect();
                cut_writes += behind.len();
            }
            Err(Unusable::NotAnchored) => unanchored += 1,
            other => failures.push(format!("point {point}: recovery gave {other:?}")),
        }
        // A hash comparison (or the batch the map named) brings the replica level.
        r.disk = disk;
    }
    let batches = replica.lock().unwrap().batches;
    eprintln!(
        "{POINTS} kills: {recovered} maps recovered ({one_later} with the replica one batch \
         later), {unanchored} not anchored; {batches} batches committed; {cut_writes} chunks \
         behind the replica at the kills, all named"
    );
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    assert!(
        recovered >= POINTS * 9 / 10,
        "only {recovered} of {POINTS} kills left a usable map (seed {seed})"
    );
    assert!(batches >= POINTS as u64, "the source hardly replicated");
    assert!(
        cut_writes > 0,
        "no kill found the replica behind: the campaign tested nothing"
    );
}
