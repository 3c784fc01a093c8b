//! A replication source reduced to what a crash of roamd can cut: guest writes through
//! roam-nbd's `TrackedBackend` into a disk file, a dirty subscription whose bits live in
//! a `roam_store::LiveMap`, and batches taken with `take_keeping`, sent, acknowledged and
//! anchored as roamd's replication link does. The crash campaign
//! (`crates/lab/tests/primary_crash.rs`) plays the replica and SIGKILLs this process at
//! random instants; it is not meant to be run by hand.
//!
//! ```text
//! roam-lab-primary DIR SEQ SEED     DIR/disk exists and equals the replica at batch SEQ
//!   stdout: per batch  'B' seq:u64 count:u64 (chunk:u64 data[CHUNK])*count 'C'
//!   stdin:  per batch  seq:u64 (the replica committed it)
//! ```

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use roam_lab::rng::Rng;
use roam_nbd::{Backend, BitStore, DirtyTracker, FileBackend, TrackedBackend};
use roam_store::live::{self, LiveMap};
use roam_store::Version;

/// The campaign's chunk size (roamd's is the same).
pub const CHUNK: u64 = 64 << 10;
const KEY: &str = "disk@replica";
const WRITERS: usize = 2;

#[derive(Debug)]
struct Bits(Arc<LiveMap>);

impl BitStore for Bits {
    fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        self.0.dirty()
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, seq, seed] = args.as_slice() else {
        bail!("usage: roam-lab-primary DIR SEQ SEED");
    };
    let dir = PathBuf::from(dir);
    let mut seq: u64 = seq.parse().context("SEQ")?;
    let seed: u64 = seed.parse().context("SEED")?;

    let file: Arc<dyn Backend> =
        Arc::new(FileBackend::open(&dir.join("disk"), false).context("open DIR/disk")?);
    let tracker = DirtyTracker::new(file.size(), CHUNK)?;
    let map = Arc::new(LiveMap::create(
        &dir.join("live"),
        KEY,
        tracker.chunk_count(),
        1,
        live::boot_id()?,
    )?);
    let sub = tracker.subscribe_in(Arc::new(Bits(map.clone())))?;
    // The disk equals the replica at SEQ: nothing is pending yet.
    map.anchor(Version { generation: 1, seq }, &BTreeSet::new());
    let disk = Arc::new(TrackedBackend::new(file.clone(), tracker)?);

    for w in 0..WRITERS {
        let disk = disk.clone();
        let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
        std::thread::spawn(move || guest(&disk, &mut rng));
    }

    let mut stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut rng = Rng(seed);
    let mut pending = BTreeSet::new();
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 20));
        pending.extend(sub.take_keeping(map.pending()));
        let next = seq + 1;
        out.write_all(b"B")?;
        out.write_all(&next.to_le_bytes())?;
        out.write_all(&(pending.len() as u64).to_le_bytes())?;
        for &c in &pending {
            file.read_at(&mut buf, c * CHUNK)?;
            out.write_all(&c.to_le_bytes())?;
            out.write_all(&buf)?;
        }
        out.write_all(b"C")?;
        out.flush()?;
        let mut ack = [0u8; 8];
        stdin.read_exact(&mut ack)?;
        if u64::from_le_bytes(ack) != next {
            bail!("acknowledged {} for batch {next}", u64::from_le_bytes(ack));
        }
        // As roamd's `record_commit`: the replica holds everything taken so far.
        pending.clear();
        seq = next;
        map.anchor(Version { generation: 1, seq }, &pending);
    }
}

/// Random writes, zeroings and trims of 512 B to 128 KiB, many across a chunk boundary.
fn guest(disk: &TrackedBackend, rng: &mut Rng) {
    let size = disk.size();
    let mut n = 0u64;
    loop {
        n += 1;
        let len = (1 + rng.next_u64() % 256) * 512;
        let off = (rng.next_u64() % (size - len)) & !511;
        let r = match rng.next_u64() % 10 {
            0 => disk.write_zeroes(off, len, false, false),
            1 => disk.trim(off, len, false),
            _ => {
                let stamp = rng.next_u64() ^ n;
                let data: Vec<u8> = (0..len).map(|i| (stamp >> (i % 8 * 8)) as u8).collect();
                disk.write_at(&data, off, false)
            }
        };
        if r.is_err() {
            return;
        }
    }
}
