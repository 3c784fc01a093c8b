//! The dedup index against real files: lookups across disks, verification on use,
//! restarts, and rebuild after loss or corruption.

#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use roam_store::index::Opened;
use roam_store::{ChunkIndex, ChunkState, FileId, Location};

const CS: u32 = 4096;
const CACHE: usize = 1 << 20;

fn chunk(v: u8) -> Vec<u8> {
    (0..CS as usize)
        .map(|i| v.wrapping_add((i % 7) as u8))
        .collect()
}

fn hash(v: u8) -> [u8; 32] {
    *blake3::hash(&chunk(v)).as_bytes()
}

/// A disk file whose chunk i holds `chunk(vals[i])` (0 = zeroes).
fn disk(dir: &Path, name: &str, vals: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(vals.len() as u64 * u64::from(CS)).unwrap();
    for (i, v) in vals.iter().enumerate() {
        if *v != 0 {
            f.write_all_at(&chunk(*v), i as u64 * u64::from(CS))
                .unwrap();
        }
    }
    p
}

fn overwrite(p: &Path, i: u64, v: u8) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&chunk(v), i * u64::from(CS)).unwrap();
}

#[test]
fn finds_copies_across_disks_and_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2, 3, 0]);
    let b = disk(tmp.path(), "b", &[0, 0, 3, 1, 9]);
    let files = [(FileId(1), a), (FileId(2), b)];
    let (idx, o) = ChunkIndex::open(&tmp.path().join("idx"), CS, &files, CACHE).unwrap();
    assert!(
        matches!(o, Opened::Rebuilt { .. }),
        "first open builds: {o:?}"
    );
    assert_eq!(idx.len().unwrap(), 6, "zero chunks are not indexed");
    let mut l = idx.lookup(&hash(1)).unwrap();
    l.sort();
    assert_eq!(
        l,
        vec![
            Location {
                file: FileId(1),
                chunk: 0
            },
            Location {
                file: FileId(2),
                chunk: 3
            }
        ]
    );
    let mut buf = vec![0u8; CS as usize];
    let got = idx.read_verified(&hash(9), &mut buf).unwrap();
    assert_eq!(
        got,
        Some(Location {
            file: FileId(2),
            chunk: 4
        })
    );
    assert_eq!(buf, chunk(9));
    assert_eq!(idx.read_verified(&hash(42), &mut buf).unwrap(), None);
}

#[test]
fn a_hit_is_trusted_only_after_rehashing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[5, 6]);
    let b = disk(tmp.path(), "b", &[7, 5]);
    let files = [(FileId(1), a.clone()), (FileId(2), b.clone())];
    let (idx, _) = ChunkIndex::open(&tmp.path().join("idx"), CS, &files, CACHE).unwrap();
    // Both copies of 5 change behind the index's back (a crash before `record`).
    overwrite(&a, 0, 8);
    overwrite(&b, 1, 8);
    let mut buf = vec![0u8; CS as usize];
    assert_eq!(idx.read_verified(&hash(5), &mut buf).unwrap(), None);
    // The stale rows are gone and the real content is now indexed.
    assert!(idx.lookup(&hash(5)).unwrap().is_empty());
    assert_eq!(idx.lookup(&hash(8)).unwrap().len(), 2);
    // One stale copy and one good: the good one is used.
    overwrite(&a, 1, 7);
    idx.record(
        Location {
            file: FileId(1),
            chunk: 1,
        },
        ChunkState::Data(hash(7)),
    )
    .unwrap();
    overwrite(&b, 0, 1);
    let got = idx.read_verified(&hash(7), &mut buf).unwrap();
    assert_eq!(
        got,
        Some(Location {
            file: FileId(1),
            chunk: 1
        })
    );
    assert_eq!(buf, chunk(7));
}

#[test]
fn survives_restart_and_tracks_file_set() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2]);
    let b = disk(tmp.path(), "b", &[3]);
    let p = tmp.path().join("idx");
    let (idx, _) = ChunkIndex::open(&p, CS, &[(FileId(1), a.clone())], CACHE).unwrap();
    idx.close().unwrap();
    let (idx, o) = ChunkIndex::open(
        &p,
        CS,
        &[(FileId(1), a.clone()), (FileId(2), b.clone())],
        CACHE,
    )
    .unwrap();
    assert_eq!(
        o,
        Opened::Intact {
            was_unclean: false,
            added: 1,
            removed: 0
        }
    );
    assert_eq!(idx.len().unwrap(), 3);
    drop(idx); // no close: a crash
    let (idx, o) = ChunkIndex::open(&p, CS, &[(FileId(2), b)], CACHE).unwrap();
    assert_eq!(
        o,
        Opened::Intact {
            was_unclean: true,
            added: 0,
            removed: 1
        }
    );
    assert_eq!(idx.len().unwrap(), 1);
    assert!(idx.lookup(&hash(1)).unwrap().is_empty());
}

#[test]
fn corrupt_truncated_or_foreign_index_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2, 3, 4, 5, 6, 7, 8]);
    let files = [(FileId(1), a)];
    let p = tmp.path().join("idx");
    let (idx, _) = ChunkIndex::open(&p, CS, &files, CACHE).unwrap();
    idx.close().unwrap();
    let pristine = std::fs::read(&p).unwrap();

    let check = |what: &str, bytes: Vec<u8>| {
        std::fs::write(&p, bytes).unwrap();
        let (idx, o) = ChunkIndex::open(&p, CS, &files, CACHE).unwrap();
        assert!(matches!(o, Opened::Rebuilt { .. }), "{what}: {o:?}");
        assert_eq!(idx.len().unwrap(), 8, "{what}");
        assert_eq!(
            idx.lookup(&hash(4)).unwrap(),
            vec![Location {
                file: FileId(1),
                chunk: 3
            }]
        );
        idx.close().unwrap();
    };
    check("garbage", vec![0xa5; pristine.len()]);
    check("truncated", pristine[..pristine.len() / 3].to_vec());
    check("empty", Vec::new());
    // Flip bytes inside every page after the header: redb's page checksums catch it.
    let mut flipped = pristine.clone();
    for i in (4096..flipped.len()).step_by(512) {
        flipped[i] ^= 0x5a;
    }
    check("flipped pages", flipped);
    // Another chunk size is another index.
    let (_, o) = ChunkIndex::open(&p, 2 * CS, &files, CACHE).unwrap();
    assert!(matches!(o, Opened::Rebuilt { .. }));
    // Lost altogether.
    std::fs::remove_file(&p).unwrap();
    let (idx, o) = ChunkIndex::open(&p, CS, &files, CACHE).unwrap();
    assert!(matches!(o, Opened::Rebuilt { .. }));
    assert_eq!(idx.len().unwrap(), 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever writes happen, recorded or not: a verified read never returns bytes with
    /// another hash, and every content present in a recorded location is found.
    #[test]
    fn verified_reads_are_sound_and_recorded_content_is_found(
        init in proptest::collection::vec(0u8..6, 1..12),
        writes in proptest::collection::vec((0usize..12, 0u8..6, any::<bool>()), 0..20),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let a = disk(tmp.path(), "a", &init);
        let files = [(FileId(7), a.clone())];
        let (idx, _) = ChunkIndex::open(&tmp.path().join("idx"), CS, &files, CACHE).unwrap();
        let mut model = init.clone();
        for (i, v, recorded) in writes {
            let i = i % model.len();
            let f = OpenOptions::new().write(true).open(&a).unwrap();
            let bytes = if v == 0 { vec![0u8; CS as usize] } else { chunk(v) };
            f.write_all_at(&bytes, (i as u64) * u64::from(CS)).unwrap();
            model[i] = v;
            if recorded {
                idx.record(Location { file: FileId(7), chunk: i as u64 }, ChunkState::of(&bytes)).unwrap();
            }
        }
        let mut buf = vec![0u8; CS as usize];
        for v in 1u8..6 {
            match idx.read_verified(&hash(v), &mut buf).unwrap() {
                Some(loc) => {
                    prop_assert_eq!(&buf, &chunk(v));
                    prop_assert_eq!(model[loc.chunk as usize], v);
                }
                None => {
                    // Missing is allowed only for unrecorded writes: after a reindex the
                    // content must be found if present.
                    idx.index_file(FileId(7)).unwrap();
                    let again = idx.read_verified(&hash(v), &mut buf).unwrap();
                    prop_assert_eq!(again.is_some(), model.contains(&v));
                }
            }
        }
    }
}

#[test]
fn an_index_open_elsewhere_is_not_rebuilt_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1]);
    let files = [(FileId(1), a)];
    let p = tmp.path().join("idx");
    let (first, _) = ChunkIndex::open(&p, CS, &files, CACHE).unwrap();
    assert!(ChunkIndex::open(&p, CS, &files, CACHE).is_err());
    assert_eq!(first.len().unwrap(), 1, "the first user's index is intact");
    first.close().unwrap();
    let (_, o) = ChunkIndex::open(&p, CS, &files, CACHE).unwrap();
    assert_eq!(
        o,
        Opened::Intact {
            was_unclean: false,
            added: 0,
            removed: 0
        },
        "not deleted"
    );
}

#[test]
fn a_missing_disk_file_holds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2]);
    let files = [(FileId(1), a), (FileId(2), tmp.path().join("gone"))];
    let (idx, _) = ChunkIndex::open(&tmp.path().join("idx"), CS, &files, CACHE).unwrap();
    assert_eq!(idx.len().unwrap(), 2);
    let mut buf = vec![0u8; CS as usize];
    assert!(idx.read_verified(&hash(2), &mut buf).unwrap().is_some());
}

/// Disks that appear after `open` (a VM received, a replica) are tracked with rows the
/// caller knows; forgetting a file drops its rows; both survive a restart.
#[test]
fn files_tracked_and_forgotten_at_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2]);
    let b = disk(tmp.path(), "b", &[0, 3, 1]);
    let ip = tmp.path().join("idx");
    let (mut idx, _) = ChunkIndex::open(&ip, CS, &[(FileId(1), a.clone())], CACHE).unwrap();
    assert!(idx.lookup(&hash(3)).unwrap().is_empty());
    idx.track_file(FileId(2), b.clone()).unwrap();
    // Tracking alone hashes nothing: the caller records what it knows.
    assert!(idx.lookup(&hash(3)).unwrap().is_empty());
    idx.record(
        Location {
            file: FileId(2),
            chunk: 1,
        },
        ChunkState::Data(hash(3)),
    )
    .unwrap();
    let mut buf = vec![0u8; CS as usize];
    let at = idx.read_verified(&hash(3), &mut buf).unwrap();
    assert_eq!(
        at,
        Some(Location {
            file: FileId(2),
            chunk: 1
        })
    );
    assert_eq!(buf, chunk(3));
    idx.close().unwrap();
    // Reopened with the caller's view of the files: the tracked file's rows are kept.
    let files = [(FileId(1), a.clone()), (FileId(2), b.clone())];
    let (mut idx, o) = ChunkIndex::open(&ip, CS, &files, CACHE).unwrap();
    assert_eq!(
        o,
        Opened::Intact {
            was_unclean: false,
            added: 0,
            removed: 0
        }
    );
    assert_eq!(idx.lookup(&hash(3)).unwrap().len(), 1);
    idx.forget_file(FileId(2)).unwrap();
    assert!(idx.lookup(&hash(3)).unwrap().is_empty());
    assert_eq!(idx.lookup(&hash(1)).unwrap().len(), 1, "file 1's rows stay");
    assert_eq!(idx.files().len(), 1);
}

#[test]
fn index_chunks_refreshes_only_the_chunks_named() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", &[1, 2, 3, 0]);
    let files = [(FileId(1), a.clone())];
    let (idx, _) = ChunkIndex::open(&tmp.path().join("idx"), CS, &files, CACHE).unwrap();
    // A running VM rewrote chunks 0 and 3 (and, unnamed, 1).
    overwrite(&a, 0, 5);
    overwrite(&a, 1, 6);
    overwrite(&a, 3, 7);
    let s = idx.index_chunks(FileId(1), &[0, 3, 99]).unwrap();
    assert_eq!((s.chunks, s.data_chunks), (2, 2), "past the end is skipped");
    let at = |h| idx.lookup(&hash(h)).unwrap();
    assert_eq!(at(5).len(), 1);
    assert_eq!(at(7).len(), 1);
    assert!(at(1).is_empty(), "chunk 0's old row is replaced");
    // Not named: its row is stale (2) and the new content unknown (6) until a scan.
    assert_eq!(at(2).len(), 1);
    assert!(at(6).is_empty());
    assert_eq!(at(3).len(), 1);
}
