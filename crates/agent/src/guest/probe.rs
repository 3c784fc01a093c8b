//! Read probe: single-block reads of random places in the data file system's files,
//! with O_DIRECT so each one reaches the disk (no page cache, no readahead).
//!
//! What it is for: right after a post-copy migration most of the disk has not arrived
//! at the destination yet, and what the person feels is the latency of a read of one
//! missing block. The guest's own reads come in bursts (readahead, large files), whose
//! latency is mostly the burst's transfer time; these 4 KiB reads, one chunk each, are
//! the figure the host measures for "a read of a missing block" (benchmark 3).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sys::{self, AlignedBuf};
use super::Shared;
use crate::manifest::{self, Entry, MANIFEST_NAME, MAX_MANIFEST_BYTES};

const BLOCK: u64 = 4096;

/// Picks a file with probability proportional to its size, then a block in it.
fn pick(entries: &[Entry], total_blocks: u64, r: u64) -> Option<(&Entry, u64)> {
    let mut n = r % total_blocks.max(1);
    for e in entries {
        let blocks = e.size / BLOCK;
        if n < blocks {
            return Some((e, n * BLOCK));
        }
        n -= blocks;
    }
    None
}

fn load(sh: &Shared) -> Vec<Entry> {
    let path = sh.paths.data_dir.join(MANIFEST_NAME);
    let text = match std::fs::metadata(&path) {
        Ok(m) if m.len() <= MAX_MANIFEST_BYTES => std::fs::read_to_string(&path).ok(),
        _ => None,
    };
    text.and_then(|t| manifest::parse(&t).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.size >= BLOCK)
        .collect()
}

pub fn probe_loop(sh: Arc<Shared>) {
    let entries = load(&sh);
    let total_blocks: u64 = entries.iter().map(|e| e.size / BLOCK).sum();
    if total_blocks == 0 {
        return;
    }
    let mut buf = AlignedBuf::new(BLOCK as usize);
    let mut reported = false;
    let mut next = Instant::now();
    loop {
        let rate = sh.config().probe_reads_per_s;
        if rate == 0 {
            std::thread::sleep(Duration::from_millis(10));
            next = Instant::now();
            continue;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep((next - now).min(Duration::from_millis(10)));
            continue;
        }
        next = now + Duration::from_secs(1) / rate;
        let Some((e, off)) = pick(&entries, total_blocks, sys::random_u128() as u64) else {
            continue;
        };
        let path = sh.paths.data_dir.join(&e.path);
        let r =
            sys::open_direct(&path, false).and_then(|f| f.read_at(&mut buf[..BLOCK as usize], off));
        if let Err(err) = r {
            if !reported {
                reported = true;
                sh.send_error("probe_read", format!("{}: {err}", path.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: u64) -> Entry {
        Entry {
            hash: [0; 32],
            size,
            path: path.into(),
        }
    }

    #[test]
    fn every_block_of_every_file_can_be_picked_and_none_beyond() {
        let es = [entry("a", 2 * BLOCK), entry("b", 3 * BLOCK + 100)];
        let total = 5;
        let picked: Vec<(String, u64)> = (0..total)
            .map(|r| {
                let (e, off) = pick(&es, total, r).unwrap();
                (e.path.clone(), off)
            })
            .collect();
        assert_eq!(
            picked,
            [
                ("a".into(), 0),
                ("a".into(), BLOCK),
                ("b".into(), 0),
                ("b".into(), BLOCK),
                ("b".into(), 2 * BLOCK)
            ]
        );
        assert_eq!(pick(&es, total, total), pick(&es, total, 0), "wraps");
        assert!(pick(&[], 0, 7).is_none());
    }
}
