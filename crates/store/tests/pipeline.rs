//! The pieces together on real files, as roamd will use them: seed a replica of a disk
//! made from a base image the destination already holds (another VM), then replicate a
//! round of changes (as a crashed source's live map left them). Nothing the destination holds crosses the "wire", and the replica
//! ends byte-identical to the source.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use roam_store::replica::NoFaults;
use roam_store::{
    live, plan, Action, BatchId, ChunkIndex, ChunkMap, ChunkState, FileId, LiveMap, Location,
    ReplicaWriter, Version,
};

const CS: u32 = 4096;

fn block(v: u32) -> Vec<u8> {
    (0..CS)
        .map(|i| (v.wrapping_mul(31).wrapping_add(i / 4)) as u8)
        .collect()
}

fn write_blocks(p: &Path, n: u64, blocks: &[(u64, u32)]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .unwrap();
    f.set_len(n * u64::from(CS)).unwrap();
    for (i, v) in blocks {
        f.write_all_at(&block(*v), i * u64::from(CS)).unwrap();
    }
}

/// One replication round: plan against the destination index (and the replica's map),
/// stage local copies / "received" chunks, commit. Returns the chunks "sent".
fn round(
    src: &File,
    src_map: &ChunkMap,
    dst_map: Option<&ChunkMap>,
    candidates: Vec<u64>,
    index: &ChunkIndex,
    replica: &mut ReplicaWriter,
    seq: u64,
) -> Vec<u64> {
    let p = plan(src_map, dst_map, candidates, index).unwrap();
    replica
        .begin(BatchId {
            version: Version { generation: 1, seq },
            primary: "office".into(),
            flush_epoch: seq,
        })
        .unwrap();
    let mut sent = Vec::new();
    for (c, a) in &p.actions {
        let (off, len) = src_map.range(*c).unwrap();
        let mut buf = vec![0u8; len];
        match a {
            Action::Zero => {}
            Action::CopyLocal(h) => {
                assert!(
                    index.read_verified(h, &mut buf).unwrap().is_some(),
                    "chunk {c}"
                );
            }
            Action::Send(_) => {
                src.read_exact_at(&mut buf, off).unwrap(); // what the wire would carry
                sent.push(*c);
            }
            Action::CopySent { from, .. } => {
                assert!(replica.read_staged(*from, &mut buf).unwrap());
            }
        }
        replica.stage(*c, &buf).unwrap();
    }
    replica.commit().unwrap();
    // The replica's disk is a local disk like any other: index what it now holds.
    let updates: Vec<(Location, ChunkState)> = p
        .actions
        .iter()
        .map(|(c, _)| {
            (
                Location {
                    file: FileId(2),
                    chunk: *c,
                },
                src_map.get(*c).unwrap(),
            )
        })
        .collect();
    index.record_many(&updates).unwrap();
    sent
}

#[test]
fn seed_then_delta_moves_only_what_the_destination_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 64u64;
    // Destination: another VM made from the base image (blocks 100..140 at 0..40).
    let other = tmp.path().join("other-vm.raw");
    let base: Vec<(u64, u32)> = (0..40).map(|i| (i, 100 + i as u32)).collect();
    write_blocks(&other, n, &base);
    // Source: the same base image at an offset of 8 chunks, private data (one block
    // three times), and holes.
    let source = tmp.path().join("desk.raw");
    let mut src_blocks: Vec<(u64, u32)> = base.iter().map(|(i, v)| (i + 8, *v)).collect();
    src_blocks.extend([(50, 7), (51, 7), (52, 7), (53, 8)]);
    write_blocks(&source, n, &src_blocks);

    let rdir = tmp.path().join("replica");
    ReplicaWriter::create(&rdir, n * u64::from(CS), CS).unwrap();
    let (mut replica, _) = ReplicaWriter::open(&rdir, Box::new(NoFaults)).unwrap();
    let files = [(FileId(1), other), (FileId(2), replica.disk_path())];
    let (index, _) = ChunkIndex::open(&tmp.path().join("index"), CS, &files, 1 << 20).unwrap();

    // Seed: every chunk. The source's live map then says "the replica is at batch 1".
    let src = File::open(&source).unwrap();
    let live_dir = tmp.path().join("live");
    let boot = live::boot_id().unwrap();
    let tracking = LiveMap::create(&live_dir, "desk@home", n, 1, boot).unwrap();
    let seq = 1;
    let chunks: Vec<u64> = (0..n).collect();
    let src_map = ChunkMap::scan(&src, n * u64::from(CS), CS).unwrap();
    let sent = round(&src, &src_map, None, chunks, &index, &mut replica, seq);
    let batch1 = Version { generation: 1, seq };
    tracking.anchor(batch1, &BTreeSet::new());
    assert_eq!(sent, vec![50, 53], "only the private contents, once each");
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(replica.disk_path()).unwrap()
    );

    // The guest writes: new data, a copy of a base block elsewhere, a zeroed block.
    write_blocks(&source, n, &[(60, 9), (61, 120), (10, 0)]);
    OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap()
        .write_all_at(&vec![0u8; CS as usize], 10 * u64::from(CS))
        .unwrap();
    for c in [60u64, 61, 10] {
        tracking.dirty()[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Release);
    }
    // The source's process dies here; what its map left is the next batch.
    let left = live::recover(&live_dir, "desk@home").unwrap().unwrap();
    assert_eq!(left.synced_to, batch1);
    let chunks: Vec<u64> = left.pending.into_iter().collect();
    assert_eq!(chunks, vec![10, 60, 61]);
    let seq = 2;
    let src_map2 = ChunkMap::scan(&src, n * u64::from(CS), CS).unwrap();
    let dst_map = ChunkMap::scan(
        &File::open(replica.disk_path()).unwrap(),
        n * u64::from(CS),
        CS,
    )
    .unwrap();
    assert_eq!(src_map2.diff(&dst_map).unwrap(), vec![10, 60, 61]);
    let sent = round(
        &src,
        &src_map2,
        Some(&dst_map),
        chunks,
        &index,
        &mut replica,
        seq,
    );
    assert_eq!(sent, vec![60], "block 120 is local, zeroes never travel");
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(replica.disk_path()).unwrap()
    );
    let after = ChunkMap::scan(
        &File::open(replica.disk_path()).unwrap(),
        n * u64::from(CS),
        CS,
    )
    .unwrap();
    assert_eq!(after.root(), src_map2.root());
}
