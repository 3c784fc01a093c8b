//! A return move to a host whose replica is in a state the source knows: only the chunks
//! written since that state are offered, the rest is assumed held; a wrong assumption
//! makes the seal fail (the move aborts), it never passes unnoticed.

use std::io::Write;
use std::os::unix::fs::FileExt;

use super::*;

const CS: usize = 4096;
const N: u64 = 64;

fn disk(chunks: &[(u64, u8)]) -> (tempfile::NamedTempFile, Arc<File>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.as_file_mut().set_len(N * CS as u64).unwrap();
    for (i, v) in chunks {
        f.as_file()
            .write_all_at(&vec![*v; CS], i * CS as u64)
            .unwrap();
    }
    f.flush().unwrap();
    let file = Arc::new(f.reopen().unwrap());
    (f, file)
}

/// A replica disk holding `chunks` under `dir`, lent in place to `dir/disk.raw` with an
/// undo log that flushes every `queue_bytes`: (the replica's path, the lent path, the
/// replica's bytes, the lent disk as the receiver shares it).
fn lend(
    dir: &std::path::Path,
    chunks: &[(u64, u8)],
    queue_bytes: usize,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<u8>,
    SharedPromoted,
) {
    let home = dir.join("replica-disk");
    let at = dir.join("disk.raw");
    {
        let f = File::create(&home).unwrap();
        f.set_len(N * CS as u64).unwrap();
        for (i, v) in chunks {
            f.write_all_at(&vec![*v; CS], i * CS as u64).unwrap();
        }
    }
    let lent = std::fs::read(&home).unwrap();
    let paths = roam_store::PromotePaths {
        home: home.clone(),
        at: at.clone(),
        marker: dir.join("promoted"),
        log: dir.join("undo"),
    };
    let p = roam_store::Promoted::promote(
        paths,
        N * CS as u64,
        CS as u32,
        Box::new(roam_store::replica::NoFaults),
    )
    .unwrap()
    .with_queue_bytes(queue_bytes);
    (home, at, lent, Arc::new(std::sync::Mutex::new(Some(p))))
}

fn whole(f: &File) -> Vec<u8> {
    let mut b = vec![0u8; N as usize * CS];
    f.read_exact_at(&mut b, 0).unwrap();
    b
}

struct Run {
    neg: Negotiated,
    offered: u64,
    cached: u64,
    out: SealOutcome,
    sfile: Arc<File>,
    dfile: Arc<File>,
    _files: [tempfile::NamedTempFile; 2],
}

/// The replica (chunks 1..=10) at the destination; the source's disk `now`; the source
/// believes `changed` were written since the replica's batch.
async fn run(now: &[(u64, u8)], changed: &[u64]) -> Run {
    run_known(now, changed, None).await
}

/// As [`run`], the source knowing chunk hashes from a hash cache (`DiskSender::know`).
async fn run_known(
    now: &[(u64, u8)],
    changed: &[u64],
    known: Option<(ChunkHashes, Vec<bool>)>,
) -> Run {
    let replica: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
    let (d, dfile) = disk(&replica);
    let (s, sfile) = disk(now);
    let base = allocated_chunks(&dfile, N * CS as u64, CS as u32).unwrap();
    let mut sender = DiskSender::new(sfile.clone(), N * CS as u64, CS as u32, 3);
    if let Some((h, stale)) = known {
        sender.know(h, stale);
    }
    let receiver = DiskReceiver::new(dfile.clone(), N * CS as u64, CS as u32).with_base(base);
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut ar, mut a) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
    let all = allocated_chunks(&sfile, N * CS as u64, CS as u32).unwrap();
    let changed: BTreeSet<u64> = changed.iter().copied().collect();
    let neg = sender
        .negotiate_changed(&mut a, &mut ar, all, &changed)
        .await
        .unwrap();
    sender
        .send(&mut a, neg.wanted.clone(), false)
        .await
        .unwrap();
    sender.sync(&mut a, &mut ar).await.unwrap();
    sender.seal(&mut a).await.unwrap();
    let out = recv.await.unwrap().unwrap();
    let offered = sender.counters.offered_chunks.load(Ordering::Relaxed);
    let cached = sender.counters.cached_hashes.load(Ordering::Relaxed);
    Run {
        neg,
        offered,
        cached,
        out,
        sfile,
        dfile,
        _files: [d, s],
    }
}

#[tokio::test]
async fn only_chunks_changed_since_the_replica_are_offered() {
    // Since the replica's batch: chunk 3 rewritten, chunk 5 zeroed (a discard), chunk 20
    // new. Everything else is as the replica has it.
    let mut now: Vec<(u64, u8)> = (1..=10).filter(|&i| i != 5).map(|i| (i, i as u8)).collect();
    now[2].1 = 33;
    now.push((20, 20));
    let r = run(&now, &[3, 5, 20]).await;
    // Two hashes cross (3 and 20; a zero chunk is not offered) instead of ten.
    assert_eq!(r.offered, 2);
    // 5 goes as a Zero frame: the replica still holds data there.
    assert_eq!(r.neg.wanted, vec![3, 5, 20]);
    // The 9 unoffered chunks of the replica were kept (and hashed) there; chunk 5 only
    // until its Zero frame arrived.
    assert_eq!(r.neg.held, 9);
    assert!(r.out.ok, "{:?}", r.out);
    assert_eq!(r.out.frames_received, 3);
    assert!(whole(&r.sfile) == whole(&r.dfile), "disks differ");
}

/// Hashes of `chunks` (the rest zero), as a hash cache would hold them.
fn hashes_of(chunks: &[(u64, u8)]) -> ChunkHashes {
    let mut h = ChunkHashes::new_zero(N * CS as u64, CS as u32);
    for (i, v) in chunks {
        h.set(*i, *blake3::hash(&vec![*v; CS]).as_bytes());
    }
    h
}

#[tokio::test]
async fn cached_hashes_spare_reading_unoffered_chunks_and_a_wrong_one_fails_the_seal() {
    let mut now: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
    now[2].1 = 33;
    // Right, nothing stale: the 9 unoffered chunks are not read.
    let r = run_known(&now, &[3], Some((hashes_of(&now), vec![false; N as usize]))).await;
    assert_eq!((r.offered, r.cached), (1, 9));
    assert!(r.out.ok, "{:?}", r.out);
    assert!(whole(&r.sfile) == whole(&r.dfile), "disks differ");
    // Wrong for chunk 7 (a write the cache missed): the destination hashes what it
    // holds, so the seal fails and the move aborts.
    let mut wrong = now.clone();
    wrong[6].1 = 77;
    let r = run_known(
        &now,
        &[3],
        Some((hashes_of(&wrong), vec![false; N as usize])),
    )
    .await;
    assert!(!r.out.ok, "a wrong cached hash must abort: {:?}", r.out);
    // The same wrong hash marked stale (the guest wrote chunk 7 since): read, not cached.
    let mut stale = vec![false; N as usize];
    stale[7] = true;
    let r = run_known(&now, &[3], Some((hashes_of(&wrong), stale))).await;
    assert_eq!(r.cached, 8);
    assert!(r.out.ok, "{:?}", r.out);
}

#[tokio::test]
async fn a_change_the_source_did_not_know_of_fails_the_seal() {
    // Chunk 7 was rewritten but the source's record misses it: it is neither offered nor
    // sent, the destination keeps its old chunk 7, and the digests differ.
    let mut now: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
    now[6].1 = 77;
    let r = run(&now, &[]).await;
    assert_eq!(r.offered, 0);
    assert!(r.neg.wanted.is_empty());
    assert!(!r.out.ok, "a wrong assumption must abort: {:?}", r.out);
    assert_ne!(r.out.source_root, r.out.dest_root);
}

#[tokio::test]
async fn a_chunk_removed_at_the_source_but_unknown_fails_the_seal() {
    // Chunk 9 is a hole at the source now, the record misses it: the replica's chunk 9
    // is kept and hashed there, so the digests differ.
    let now: Vec<(u64, u8)> = (1..=10).filter(|&i| i != 9).map(|i| (i, i as u8)).collect();
    let r = run(&now, &[]).await;
    assert!(!r.out.ok, "{:?}", r.out);
}

#[tokio::test]
async fn without_a_known_replica_state_every_chunk_is_offered() {
    // The fallback (`negotiate`): all ten allocated chunks are offered, unoffered base
    // chunks are cleared, and the result is the same disk.
    let replica: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
    let (_d, dfile) = disk(&replica);
    let mut now = replica.clone();
    now[2].1 = 33;
    now.remove(4); // chunk 5 discarded: not offered, so cleared there
    let (_s, sfile) = disk(&now);
    let base = allocated_chunks(&dfile, N * CS as u64, CS as u32).unwrap();
    let mut sender = DiskSender::new(sfile.clone(), N * CS as u64, CS as u32, 3);
    let receiver = DiskReceiver::new(dfile.clone(), N * CS as u64, CS as u32).with_base(base);
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut ar, mut a) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
    let all = allocated_chunks(&sfile, N * CS as u64, CS as u32).unwrap();
    let neg = sender.negotiate(&mut a, &mut ar, all).await.unwrap();
    assert_eq!(sender.counters.offered_chunks.load(Ordering::Relaxed), 9);
    assert_eq!(neg.wanted, vec![3]);
    sender.send(&mut a, neg.wanted, false).await.unwrap();
    sender.sync(&mut a, &mut ar).await.unwrap();
    sender.seal(&mut a).await.unwrap();
    let out = recv.await.unwrap().unwrap();
    assert!(out.ok, "{out:?}");
    assert!(whole(&sfile) == whole(&dfile), "disks differ");
}

/// The replica's own file, lent in place (`roam_store::Promoted`): the move writes it
/// through the undo log — negotiation clears, rewritten and new chunks, a dirty round
/// with zeroes — and proves it equal at the seal; rolling back then gives the replica
/// back byte for byte, as a failed move must.
#[tokio::test]
async fn a_move_into_a_lent_replica_rolls_back_to_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let replica: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).chain([(40, 4)]).collect();
    let (home, at, lent, shared) = lend(tmp.path(), &replica, 3 * CS); // several flushes
    let dfile = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&at)
            .unwrap(),
    );
    // The source: chunks 3 and 7 rewritten, 20 and 21 new, 40 gone.
    let mut now: Vec<(u64, u8)> = (1..=10).map(|i| (i, i as u8)).collect();
    now[2].1 = 33;
    now[6].1 = 77;
    now.extend([(20, 20), (21, 21)]);
    let (_s, sfile) = disk(&now);
    let base = allocated_chunks(&dfile, N * CS as u64, CS as u32).unwrap();
    let mut sender = DiskSender::new(sfile.clone(), N * CS as u64, CS as u32, 3);
    let receiver = DiskReceiver::new(dfile.clone(), N * CS as u64, CS as u32)
        .with_base(base)
        .with_undo(shared.clone());
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut ar, mut a) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
    let all = allocated_chunks(&sfile, N * CS as u64, CS as u32).unwrap();
    let neg = sender.negotiate(&mut a, &mut ar, all).await.unwrap();
    assert_eq!(neg.wanted, vec![3, 7, 20, 21]);
    sender.send(&mut a, neg.wanted, false).await.unwrap();
    sender.sync(&mut a, &mut ar).await.unwrap();
    // A dirty round: chunk 5 zeroed, chunk 21 rewritten (its pre-image is saved already).
    sfile.write_all_at(&vec![0u8; CS], 5 * CS as u64).unwrap();
    sfile.write_all_at(&vec![9u8; CS], 21 * CS as u64).unwrap();
    sender.send(&mut a, vec![5, 21], false).await.unwrap();
    sender.seal(&mut a).await.unwrap();
    let out = recv.await.unwrap().unwrap();
    assert!(out.ok, "{out:?}");
    assert!(
        whole(&sfile) == whole(&dfile),
        "the lent disk is not the source's"
    );
    let p = shared.lock().unwrap().take().unwrap();
    assert!(p.saved_chunks() >= 6, "{p:?}");
    p.roll_back().unwrap();
    assert!(!at.exists());
    assert!(
        std::fs::read(&home).unwrap() == lent,
        "the replica is not as lent"
    );
}

/// A move that dies half-way into a lent replica: the receiver stops once the disk is
/// taken back, and the roll back restores the replica.
#[tokio::test]
async fn a_move_cut_half_way_gives_the_lent_replica_back() {
    let tmp = tempfile::tempdir().unwrap();
    let full: Vec<(u64, u8)> = (0..N).map(|i| (i, i as u8 + 1)).collect();
    let (home, at, lent, shared) = lend(tmp.path(), &full, 4 * CS);
    let dfile = Arc::new(File::open(&at).unwrap());
    let (_s, sfile) = disk(&(0..N).map(|i| (i, 200u8)).collect::<Vec<_>>());
    let mut sender = DiskSender::new(sfile.clone(), N * CS as u64, CS as u32, 3);
    let receiver = DiskReceiver::new(dfile, N * CS as u64, CS as u32).with_undo(shared.clone());
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut ar, mut a) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
    sender
        .send(&mut a, (0..N / 2).collect(), false)
        .await
        .unwrap();
    sender.sync(&mut a, &mut ar).await.unwrap();
    // The migration fails: it takes the disk back while the source still sends.
    let p = shared.lock().unwrap().take().unwrap();
    let _ = sender.send(&mut a, (N / 2..N).collect(), false).await;
    // The connection closes (both halves: the receiver's reader then sees its end).
    drop(a);
    drop(ar);
    let e = recv.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("given back"), "{e}");
    p.roll_back().unwrap();
    assert!(
        std::fs::read(&home).unwrap() == lent,
        "the replica is not as lent"
    );
}
