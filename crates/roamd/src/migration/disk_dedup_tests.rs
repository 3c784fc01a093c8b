//! Dedup on the disk stream: content the destination holds on another disk or at another
//! offset is copied there, not sent; the same content twice in one transfer crosses once;
//! a stale index row or a chunk rewritten between offer and send never yields wrong data.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use roam_store::{ChunkIndex, FileId};

use super::*;

const CS: usize = 4096;

/// Chunk content from a seed: distinct seeds give distinct, incompressible-ish chunks.
fn content(seed: u8) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..CS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn disk(chunks: &[(u64, u8)], n: u64) -> (tempfile::NamedTempFile, Arc<File>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.as_file_mut().set_len(n * CS as u64).unwrap();
    for (i, v) in chunks {
        f.as_file()
            .write_all_at(&content(*v), i * CS as u64)
            .unwrap();
    }
    f.flush().unwrap();
    let file = Arc::new(f.reopen().unwrap());
    (f, file)
}

fn read_all(f: &File, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize * CS];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

struct Run {
    negotiated: Negotiated,
    outcome: SealOutcome,
    sent: Arc<DiskCounters>,
    sealed_rows: Vec<(u64, Digest)>,
}

/// Offer every allocated chunk of `src`, send what is wanted (after `between` ran), seal.
async fn transfer(
    src: Arc<File>,
    dst: Arc<File>,
    n: u64,
    index: Option<SharedIndex>,
    between: impl FnOnce(),
) -> Run {
    let bytes = n * CS as u64;
    let mut sender = DiskSender::new(src.clone(), bytes, CS as u32, 3);
    let rows = Arc::new(Mutex::new(Vec::new()));
    let sink = rows.clone();
    let receiver = DiskReceiver::new(dst, bytes, CS as u32)
        .with_index(index)
        .on_sealed(Box::new(move |r| *sink.lock().unwrap() = r));
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut ar, mut a) = tokio::io::split(a);
    let (mut br, bw) = tokio::io::split(b);
    let recv = tokio::spawn(async move { receiver.run(&mut br, bw).await });
    let all = allocated_chunks(&src, bytes, CS as u32).unwrap();
    let negotiated = sender.negotiate(&mut a, &mut ar, all).await.unwrap();
    between();
    sender
        .send(&mut a, negotiated.wanted.clone(), false)
        .await
        .unwrap();
    sender.sync(&mut a, &mut ar).await.unwrap();
    sender.seal(&mut a).await.unwrap();
    let outcome = recv.await.unwrap().unwrap();
    let sealed_rows = rows.lock().unwrap().clone();
    Run {
        negotiated,
        outcome,
        sent: sender.counters.clone(),
        sealed_rows,
    }
}

fn index_of(dir: &std::path::Path, files: &[(u32, std::path::PathBuf)]) -> SharedIndex {
    let files: Vec<(FileId, std::path::PathBuf)> =
        files.iter().map(|(i, p)| (FileId(*i), p.clone())).collect();
    let (ix, _) = ChunkIndex::open(&dir.join("idx"), CS as u32, &files, 1 << 20).unwrap();
    Arc::new(std::sync::RwLock::new(ix))
}

#[tokio::test]
async fn content_held_on_another_disk_is_copied_not_sent() {
    let n = 32;
    // Another VM on the destination, from the same base image (chunks 1..=8), at
    // different offsets, and one chunk of its own.
    let (other_t, _other) = disk(
        &[
            (10, 1),
            (11, 2),
            (12, 3),
            (13, 4),
            (14, 5),
            (15, 6),
            (16, 7),
            (17, 8),
            (20, 99),
        ],
        n,
    );
    let tmp = tempfile::tempdir().unwrap();
    let ix = index_of(tmp.path(), &[(1, other_t.path().to_path_buf())]);
    // The source: the base image at 0..8 plus 3 chunks of its own.
    let mut mine: Vec<(u64, u8)> = (0..8).map(|i| (i, i as u8 + 1)).collect();
    mine.extend([(8, 50), (9, 51), (30, 52)]);
    let (_s, src) = disk(&mine, n);
    let dtmp = tempfile::NamedTempFile::new().unwrap();
    dtmp.as_file().set_len(n * CS as u64).unwrap();
    let dst = Arc::new(dtmp.reopen().unwrap());
    let r = transfer(src.clone(), dst.clone(), n, Some(ix), || {}).await;
    assert!(r.outcome.ok, "{:?}", r.outcome);
    assert_eq!(r.negotiated.wanted, vec![8, 9, 30]);
    assert_eq!(
        (r.negotiated.held, r.negotiated.deduped, r.negotiated.copied),
        (0, 8, 0)
    );
    assert_eq!(r.sent.chunks.load(Ordering::Relaxed), 3);
    assert_eq!(r.sent.deduped_chunks.load(Ordering::Relaxed), 8);
    assert!(read_all(&src, n) == read_all(&dst, n), "disks differ");
    // Least possible: the three chunks it lacked, compressed once each.
    let least = r.sent.least_bytes.load(Ordering::Relaxed);
    assert!(least > 0 && least <= 3 * CS as u64 + 64, "{least}");
    // The sealed disk's rows for the index: its 11 data chunks.
    assert_eq!(r.sealed_rows.len(), 11);
}

#[tokio::test]
async fn a_stale_index_row_is_not_trusted() {
    let n = 8;
    let (other_t, other) = disk(&[(3, 1), (4, 2)], n);
    let tmp = tempfile::tempdir().unwrap();
    let ix = index_of(tmp.path(), &[(1, other_t.path().to_path_buf())]);
    // The other disk changes behind the index's back: its row for content 1 is stale.
    other.write_all_at(&content(77), 3 * CS as u64).unwrap();
    let (_s, src) = disk(&[(0, 1), (1, 2)], n);
    let dtmp = tempfile::NamedTempFile::new().unwrap();
    dtmp.as_file().set_len(n * CS as u64).unwrap();
    let dst = Arc::new(dtmp.reopen().unwrap());
    let r = transfer(src.clone(), dst.clone(), n, Some(ix.clone()), || {}).await;
    assert!(r.outcome.ok, "{:?}", r.outcome);
    assert_eq!(r.negotiated.wanted, vec![0], "content 1 must be sent");
    assert_eq!(r.negotiated.deduped, 1);
    assert!(read_all(&src, n) == read_all(&dst, n), "disks differ");
    // The stale row was corrected to what the chunk really holds.
    let h77 = *blake3::hash(&content(77)).as_bytes();
    assert_eq!(ix.read().unwrap().lookup(&h77).unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_content_twice_crosses_once() {
    let n = 16;
    let (_s, src) = disk(&[(1, 5), (4, 5), (9, 5), (12, 6)], n);
    let dtmp = tempfile::NamedTempFile::new().unwrap();
    dtmp.as_file().set_len(n * CS as u64).unwrap();
    let dst = Arc::new(dtmp.reopen().unwrap());
    let r = transfer(src.clone(), dst.clone(), n, None, || {}).await;
    assert!(r.outcome.ok, "{:?}", r.outcome);
    assert_eq!(r.negotiated.wanted, vec![1, 12]);
    assert_eq!(r.negotiated.copied, 2);
    assert_eq!(r.outcome.frames_received, 2);
    assert!(read_all(&src, n) == read_all(&dst, n), "disks differ");
}

#[tokio::test]
async fn a_chunk_rewritten_between_offer_and_send_still_ends_equal() {
    let n = 16;
    let (_s, src) = disk(&[(1, 5), (4, 5), (9, 5), (12, 6)], n);
    let dtmp = tempfile::NamedTempFile::new().unwrap();
    dtmp.as_file().set_len(n * CS as u64).unwrap();
    let dst = Arc::new(dtmp.reopen().unwrap());
    // Chunk 1, the one the destination asked for content 5, changes before it is sent;
    // chunks 4 and 9 still hold content 5 and must get it.
    let s2 = src.clone();
    let r = transfer(src.clone(), dst.clone(), n, None, move || {
        s2.write_all_at(&content(40), CS as u64).unwrap();
    })
    .await;
    assert!(r.outcome.ok, "{:?}", r.outcome);
    assert_eq!(
        r.outcome.frames_received, 4,
        "1 and 12 wanted, 4 and 9 resent"
    );
    assert!(read_all(&src, n) == read_all(&dst, n), "disks differ");
}

#[test]
fn offer_state_never_copies_over_a_direct_write() {
    let mut o = OfferState::default();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    o.want_or_wait(1, a);
    o.want_or_wait(2, a);
    o.want_or_wait(3, a);
    o.want_or_wait(4, b);
    assert_eq!(o.wants, vec![1, 4]);
    assert_eq!(o.copied, 2);
    // Chunk 2 was written directly (its own frame) before content `a` arrived.
    o.pending.remove(&2);
    assert_eq!(o.resolve(&a), vec![3]);
    assert!(o.resolve(&a).is_empty(), "resolved once");
    assert!(o.resolve(&b).is_empty());
}
