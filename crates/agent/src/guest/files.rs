//! File workload: small files under `/data/churn` on the guest's ext4 file system,
//! rewritten (write a temporary file, fsync, rename over, fsync the directory), appended
//! (+ fsync) and deleted, at `file_writes_per_s` operations per second.
//!
//! The log workload ([`super::disk`]) writes raw blocks past the end of the file system;
//! this one makes the disk see what a real guest's file system does: journal commits,
//! inode and block bitmaps, extent and directory blocks, each made durable by a FLUSH.
//! Replication's crash-consistency test relies on it (a replica cut between two FLUSHes
//! must still be a file system that `e2fsck` accepts). Nothing is acked to the host: the
//! content is not checked, only the file system's consistency is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::disk::next_due;
use super::Shared;

/// Directory (under the data mount) the workload owns.
pub const CHURN_DIR: &str = "churn";
/// Files in the set; bounds the space used to `FILES × MAX_FILE` (12 MiB).
const FILES: u64 = 48;
const MAX_FILE: usize = 256 << 10;

/// xorshift64*: enough to vary sizes and choices; the content does not matter.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Half PRNG bytes, half text, so compression has something to do.
    fn fill(&mut self, buf: &mut [u8]) {
        let text = self.next() & 1 == 0;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = if text {
                b"roam file workload line\n"[i % 24]
            } else {
                self.next() as u8
            };
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One operation on the set; returns what it did (for error messages).
fn step(dir: &Path, rng: &mut Rng, buf: &mut Vec<u8>) -> Result<(), (String, std::io::Error)> {
    let n = rng.below(FILES);
    let path = dir.join(format!("f{n:02}"));
    let len = 4096 + rng.below((MAX_FILE - 4096) as u64) as usize;
    match rng.below(8) {
        0 => match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(dir).map_err(|e| ("fsync dir".into(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err((format!("delete {}", path.display()), e)),
        },
        1 | 2 => {
            buf.resize(len / 8, 0);
            rng.fill(buf);
            let what = || format!("append {}", path.display());
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| (what(), e))?;
            // Bounded: an over-long file starts again.
            if f.metadata().map_err(|e| (what(), e))?.len() > MAX_FILE as u64 {
                f.set_len(0).map_err(|e| (what(), e))?;
            }
            f.write_all(buf).map_err(|e| (what(), e))?;
            f.sync_all().map_err(|e| (what(), e))
        }
        _ => {
            buf.resize(len, 0);
            rng.fill(buf);
            let tmp = dir.join(format!(".f{n:02}.tmp"));
            let what = || format!("rewrite {}", path.display());
            let mut f = File::create(&tmp).map_err(|e| (what(), e))?;
            f.write_all(buf).map_err(|e| (what(), e))?;
            f.sync_all().map_err(|e| (what(), e))?;
            std::fs::rename(&tmp, &path).map_err(|e| (what(), e))?;
            sync_dir(dir).map_err(|e| (what(), e))
        }
    }
}

pub fn file_loop(sh: Arc<Shared>) {
    if !sh.data_mounted {
        return;
    }
    let dir = sh.paths.data_dir.join(CHURN_DIR);
    let mut rng = Rng((sh.boot_id.0 as u64 ^ (sh.boot_id.0 >> 64) as u64) | 1);
    let mut buf = Vec::with_capacity(MAX_FILE);
    let mut due: Option<Instant> = None;
    let mut last_error: Option<Instant> = None;
    let mut ready = false;
    loop {
        let rate = sh.config().file_writes_per_s;
        if rate == 0 {
            due = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let now = Instant::now();
        let this_due = due.unwrap_or(now);
        if this_due > now {
            std::thread::sleep((this_due - now).min(Duration::from_millis(10)));
            continue;
        }
        let r = if ready {
            step(&dir, &mut rng, &mut buf)
        } else {
            std::fs::create_dir_all(&dir)
                .and_then(|()| sync_dir(&sh.paths.data_dir))
                .map(|()| ready = true)
                .map_err(|e| (format!("create {}", dir.display()), e))
        };
        if let Err((what, e)) = r {
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                eprintln!("roam-agent: file workload: {what}: {e}");
                sh.send_error("disk_write", format!("file workload: {what}: {e}"));
                last_error = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        due = Some(next_due(this_due, interval, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn steps_keep_the_set_bounded_and_leave_no_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let mut rng = Rng(7);
        let mut buf = Vec::new();
        let mut ops = 0;
        for _ in 0..400 {
            step(d.path(), &mut rng, &mut buf).unwrap();
            ops += 1;
        }
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names.is_empty() && names.len() as u64 <= FILES,
            "{names:?}"
        );
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        let total: u64 = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= FILES * (MAX_FILE as u64 + MAX_FILE as u64 / 8));
        assert_eq!(ops, 400);
    }
}
