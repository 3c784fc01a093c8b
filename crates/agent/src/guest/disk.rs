//! Disk workload and verification: 4 KiB records written with O_DIRECT|O_DSYNC
//! into the raw log region at the end of the disk, acked only once durable.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sys::{self, AlignedBuf};
use super::{DiskInfo, Shared};
use crate::manifest;
use crate::proto::{Ack, AgentMsg, LogRegion, VerifyReport, MAX_REPORTED_BAD};
use crate::record::{self, RecordState, RECORD_SIZE};

/// Records read per O_DIRECT read while verifying.
const VERIFY_BATCH: u64 = 64;

/// Looks at the disk; `None` if there is none or it is too small for a log.
pub fn probe(path: &Path) -> Option<DiskInfo> {
    let f = sys::open_direct(path, false).ok()?;
    let size = sys::device_size(&f).ok()?;
    let log = LogRegion::for_disk(size)?;
    Some(DiskInfo {
        path: path.to_path_buf(),
        size,
        log,
    })
}

/// Next seq saved by a previous incarnation of the agent in this boot.
pub fn load_next_seq(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join("next_seq"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn save_next_seq(f: &std::fs::File, seq: u64) {
    // Fixed width so each save overwrites the whole previous value.
    let _ = f.write_all_at(format!("{seq:020}\n").as_bytes(), 0);
}

/// When the next write is due: one `interval` after the previous one, but
/// never more than 100 ms of backlog (a paused guest must not burst).
pub fn next_due(prev_due: Instant, interval: Duration, now: Instant) -> Instant {
    let due = prev_due + interval;
    if now.saturating_duration_since(due) > Duration::from_millis(100) {
        now
    } else {
        due
    }
}

pub fn write_loop(sh: Arc<Shared>) {
    let Some(disk) = sh.disk.clone() else { return };
    let dev = match sys::open_direct(&disk.path, true) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "roam-agent: cannot open {} for writing: {e}",
                disk.path.display()
            );
            return;
        }
    };
    let seq_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sh.paths.state_dir.join("next_seq"));
    let mut buf = AlignedBuf::new(RECORD_SIZE);
    let mut due: Option<Instant> = None;
    let mut last_error: Option<Instant> = None;
    loop {
        let rate = sh.config().disk_writes_per_s;
        if rate == 0 {
            due = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let now = Instant::now();
        let this_due = due.unwrap_or(now);
        if this_due > now {
            // Short sleeps so a new rate takes effect quickly.
            std::thread::sleep((this_due - now).min(Duration::from_millis(10)));
            continue;
        }
        let seq = sh.next_seq.load(Ordering::Acquire);
        let sum = record::encode_record(sh.boot_id, seq, &mut buf);
        match dev.write_all_at(&buf[..RECORD_SIZE], record::slot_offset(&disk.log, seq)) {
            Ok(()) => {
                // O_DSYNC: the write (and a cache flush) completed, so it is durable.
                sh.next_seq.store(seq + 1, Ordering::Release);
                if let Ok(f) = &seq_file {
                    save_next_seq(f, seq + 1);
                }
                sh.send(&AgentMsg::Ack(Ack { seq, sum }));
            }
            Err(e) => {
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    eprintln!("roam-agent: log write seq {seq}: {e}");
                    sh.send_error("disk_write", format!("seq {seq}: {e}"));
                    last_error = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        due = Some(next_due(this_due, interval, Instant::now()));
    }
}

/// Seqs `verify` can check: at most `upto`, written already, and not yet
/// overwritten by wrap-around (keeping `margin` slots clear of the writer).
pub fn verify_range(upto: u64, next_seq: u64, slots: u64, margin: u64) -> Option<(u64, u64)> {
    if next_seq == 0 || slots == 0 {
        return None;
    }
    let hi = upto.min(next_seq - 1);
    let lo = (next_seq + margin.min(slots)).saturating_sub(slots);
    (lo <= hi).then_some((lo, hi))
}

fn verify_records(sh: &Shared, disk: &DiskInfo, lo: u64, hi: u64, out: &mut VerifyReport) {
    let dev = match sys::open_direct(&disk.path, false) {
        Ok(f) => f,
        Err(e) => {
            sh.send_error("disk_read", format!("{}: {e}", disk.path.display()));
            return;
        }
    };
    let slots = disk.log.slots();
    let mut buf = AlignedBuf::new(VERIFY_BATCH as usize * RECORD_SIZE);
    let mut seq = lo;
    while seq <= hi {
        // A batch of consecutive slots, not crossing the end of the region.
        let n = (hi - seq + 1).min(VERIFY_BATCH).min(slots - seq % slots);
        let len = n as usize * RECORD_SIZE;
        let read = dev.read_exact_at(&mut buf[..len], record::slot_offset(&disk.log, seq));
        for i in 0..n {
            let s = seq + i;
            out.checked += 1;
            let state = match &read {
                Ok(()) => {
                    let at = i as usize * RECORD_SIZE;
                    record::check_record(&buf[at..at + RECORD_SIZE], sh.boot_id, s)
                }
                Err(_) => RecordState::Bad(record::BadRecord::Checksum),
            };
            match state {
                RecordState::Ok => out.ok += 1,
                RecordState::Missing => out.missing += 1,
                RecordState::Bad(_) => out.bad += 1,
            }
            if state != RecordState::Ok && out.first_bad_seqs.len() < MAX_REPORTED_BAD {
                out.first_bad_seqs.push(s);
            }
        }
        seq += n;
    }
}

/// Re-reads the log up to `upto` and the data files against /data/MANIFEST.
pub fn verify(sh: &Shared, upto: u64) -> VerifyReport {
    let start = Instant::now();
    let mut out = VerifyReport {
        upto_seq: upto,
        ..Default::default()
    };
    if let Some(disk) = &sh.disk {
        let writing = sh.config().disk_writes_per_s > 0;
        // While writing, stay well clear of the slots about to be overwritten.
        let margin = if writing {
            (disk.log.slots() / 4).min(4096)
        } else {
            0
        };
        out.range = verify_range(
            upto,
            sh.next_seq.load(Ordering::Acquire),
            disk.log.slots(),
            margin,
        );
        if let Some((lo, hi)) = out.range {
            verify_records(sh, disk, lo, hi, &mut out);
        }
    }
    if sh.data_mounted {
        match manifest::check_tree(&sh.paths.data_dir, MAX_REPORTED_BAD) {
            Ok(t) => {
                out.files = t.counts;
                out.first_bad_files = t.first_bad;
            }
            Err(e) => {
                out.files.bad += 1;
                out.first_bad_files.push(format!("MANIFEST: {e}"));
            }
        }
    }
    out.summarize();
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn verify_range_respects_wrap_and_progress() {
        assert_eq!(verify_range(10, 0, 100, 0), None);
        assert_eq!(verify_range(10, 5, 100, 0), Some((0, 4)));
        assert_eq!(verify_range(3, 5, 100, 0), Some((0, 3)));
        // 250 written into 100 slots: only 150..=249 survive.
        assert_eq!(verify_range(1000, 250, 100, 0), Some((150, 249)));
        assert_eq!(verify_range(1000, 250, 100, 10), Some((160, 249)));
        assert_eq!(verify_range(100, 250, 100, 0), None);
    }

    #[test]
    fn pacing_does_not_burst_after_a_stall() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(10);
        assert_eq!(next_due(t0, iv, t0), t0 + iv);
        let late = t0 + Duration::from_secs(2);
        assert_eq!(next_due(t0, iv, late), late);
    }
}
