//! Property test of the dedup index across several disk files, reopens and file-set
//! changes: what dedup relies on ("a chunk the destination holds anywhere is not sent").
//!
//! Model: each file is a vector of chunk values (0 = zeroes). Random steps write chunks
//! (recorded in the index or not, as after a roamd crash between a write and its
//! `record`), close and reopen the index, or drop a file from the set. After every run:
//! * a verified read returns exactly the bytes asked for, from a location that holds them;
//! * content present at a location whose last write was recorded (or that was indexed
//!   when its file joined) is found, whichever file or offset holds it;
//! * content held nowhere is never "found", and zero chunks are never indexed;
//! * a dropped file is never returned.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use roam_store::{ChunkIndex, ChunkState, FileId, Location};

const CS: u32 = 4096;
const CACHE: usize = 1 << 20;
const FILES: usize = 3;
const CHUNKS: usize = 6;
const VALUES: u8 = 8;

fn chunk(v: u8) -> Vec<u8> {
    if v == 0 {
        return vec![0; CS as usize];
    }
    (0..CS as usize)
        .map(|i| v.wrapping_mul(31).wrapping_add((i % 13) as u8))
        .collect()
}

fn hash(v: u8) -> [u8; 32] {
    *blake3::hash(&chunk(v)).as_bytes()
}

fn write(p: &Path, i: usize, v: u8) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&chunk(v), i as u64 * u64::from(CS)).unwrap();
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        file: usize,
        chunk: usize,
        value: u8,
        recorded: bool,
    },
    Reopen,
    /// Drop file 0 from the set (then it is gone for the rest of the run).
    DropFirst,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..FILES, 0..CHUNKS, 0..VALUES, any::<bool>()).prop_map(|(file, chunk, value, recorded)| {
            Step::Write { file, chunk, value, recorded }
        }),
        1 => Just(Step::Reopen),
        1 => Just(Step::DropFirst),
    ]
}

proptest! {
    // Each case opens redb a few times (fsyncs): few cases, many steps each.
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn dedup_index_finds_what_any_file_holds_and_never_returns_wrong_bytes(
        init in proptest::collection::vec(proptest::collection::vec(0..VALUES, CHUNKS), FILES),
        steps in proptest::collection::vec(step(), 0..24),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..FILES)
            .map(|f| {
                let p = tmp.path().join(format!("disk{f}"));
                File::create(&p).unwrap().set_len((CHUNKS as u64) * u64::from(CS)).unwrap();
                for (i, v) in init[f].iter().enumerate() {
                    write(&p, i, *v);
                }
                p
            })
            .collect();
        let idx_path = tmp.path().join("idx");
        let mut live: BTreeSet<usize> = (0..FILES).collect();
        let set = |live: &BTreeSet<usize>| -> Vec<(FileId, PathBuf)> {
            live.iter().map(|&f| (FileId(f as u32 + 1), paths[f].clone())).collect()
        };
        let mut model = init.clone();
        // Locations whose current content the index was told about.
        let mut known: Vec<Vec<bool>> = vec![vec![true; CHUNKS]; FILES];
        let (mut idx, _) = ChunkIndex::open(&idx_path, CS, &set(&live), CACHE).unwrap();
        for s in steps {
            match s {
                Step::Write { file, chunk: c, value, recorded } => {
                    if !live.contains(&file) {
                        continue;
                    }
                    write(&paths[file], c, value);
                    model[file][c] = value;
                    known[file][c] = recorded;
                    if recorded {
                        let loc = Location { file: FileId(file as u32 + 1), chunk: c as u64 };
                        idx.record(loc, ChunkState::of(&chunk(value))).unwrap();
                    }
                }
                Step::Reopen => {
                    idx.close().unwrap();
                    idx = ChunkIndex::open(&idx_path, CS, &set(&live), CACHE).unwrap().0;
                }
                Step::DropFirst => {
                    if live.remove(&0) {
                        idx.close().unwrap();
                        idx = ChunkIndex::open(&idx_path, CS, &set(&live), CACHE).unwrap().0;
                    }
                }
            }
        }
        prop_assert!(idx.lookup(&hash(0)).unwrap().is_empty(), "a zero chunk was indexed");
        let mut buf = vec![0u8; CS as usize];
        for v in 1..VALUES {
            let held = live.iter().any(|&f| model[f].contains(&v));
            let known_held = live
                .iter()
                .any(|&f| (0..CHUNKS).any(|c| model[f][c] == v && known[f][c]));
            for loc in idx.lookup(&hash(v)).unwrap() {
                prop_assert!(loc.file != FileId(1) || live.contains(&0), "dropped file returned");
            }
            match idx.read_verified(&hash(v), &mut buf).unwrap() {
                Some(loc) => {
                    prop_assert_eq!(&buf, &chunk(v));
                    let f = loc.file.0 as usize - 1;
                    prop_assert!(live.contains(&f));
                    prop_assert_eq!(model[f][loc.chunk as usize], v);
                }
                None => {
                    prop_assert!(!known_held, "content {} recorded at a live location not found", v);
                    // Unrecorded writes only cost misses; a rescan finds them.
                    for &f in &live {
                        idx.index_file(FileId(f as u32 + 1)).unwrap();
                    }
                    prop_assert_eq!(idx.read_verified(&hash(v), &mut buf).unwrap().is_some(), held);
                }
            }
        }
    }
}
