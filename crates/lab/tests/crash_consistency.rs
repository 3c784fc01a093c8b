//! Crash-consistency campaign: replication is interrupted at 50+ random points, by
//! SIGKILL of the receiving roamd or by cutting the WAN, while the guest churns files on
//! its ext4 file system with fsync. After each interruption the replica, as the replica
//! host would find it after a crash (`ReplicaWriter::open` recovery on a copy), must hash
//! to one of the states the primary proposed (its cut log, `ROAM_TEST_CUT_LOG`), never
//! go back in time, and hold an ext4 file system that `e2fsck -fn` accepts once its
//! journal is replayed (as the kernel does at mount). At the end, with the workload
//! stopped, the replica catches up (in sync, lag 0) and equals the source's disk.
//!
//! `ROAM_CRASH_SEED=N` replays a run's choices (kinds and delays; the timing of the
//! guest is not reproducible). `ROAM_CRASH_POINTS=N` changes the number of points.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use roam_control::api::{ReplicaInfo, ReplicaState, Workload};
use roam_control::Client;
use roam_lab::rng::Rng;
use roam_lab::{Lab, LabConfig};
use roam_migrate::digest::{to_hex, ChunkHashes};
use roam_store::replica::NoFaults;
use roam_store::ReplicaWriter;
use roam_wan::LinkParams;

const CHUNK: u32 = 64 << 10;
const DISK_BYTES: u64 = 128 << 20;
const DEFAULT_POINTS: usize = 52;
/// The channel's idle timeout in this test (roamd's test hook): a dead peer is noticed
/// in about a second, so each point costs a few seconds, not ten.
const IDLE_TIMEOUT_MS: u64 = 1000;

fn workload() -> Workload {
    Workload {
        mem_dirty_mib_s: 2,
        mem_working_set_mib: 8,
        disk_writes_per_s: 20,
        file_writes_per_s: 25,
        probe_reads_per_s: 0,
        mem_incompressible: false,
    }
}

fn config() -> LabConfig {
    LabConfig {
        link: LinkParams {
            bandwidth_mbit: 100.0,
            rtt_ms: 10.0,
            loss_pct: 0.0,
            ..LinkParams::default()
        },
        memory_mib: 256,
        disk_bytes: DISK_BYTES,
        data_mib: 8,
        workload: workload(),
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    KillReceiver,
    CutLink,
}

/// One proposed state from the primary's cut log.
#[derive(Debug, Clone)]
struct Cut {
    seq: u64,
    flush_epoch: u64,
    seed: bool,
    root: String,
}

fn cut_history(log: &Path) -> Vec<Cut> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["source"] == "office" && v["vm"] == "desk" && v["host"] == "home")
        .map(|v| Cut {
            seq: v["seq"].as_u64().unwrap(),
            flush_epoch: v["flush_epoch"].as_u64().unwrap(),
            seed: v["seed"].as_bool().unwrap(),
            root: v["root"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The digest root of a raw disk file, as `ChunkHashes::root` (the cut log's `root`).
fn disk_root(path: &Path) -> String {
    to_hex(
        &ChunkHashes::of_file(path, DISK_BYTES, CHUNK)
            .unwrap()
            .root(),
    )
}

fn sparse_copy(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

/// Copy the replica's files (disk, journal, record) as they are at this instant.
fn snapshot(replica: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["record", "journal", "disk"] {
        sparse_copy(&replica.join(f), &to.join(f));
    }
}

/// A point's checks, running on a blocking thread.
type Pending = tokio::task::JoinHandle<Result<Checked, String>>;

/// What one point found.
struct Checked {
    /// Index in the cut history of the state the replica holds.
    matched: usize,
    recovered: String,
    /// The interruption hit a batch in flight (staged bytes thrown away or a commit
    /// redone by recovery).
    mid_batch: bool,
    /// `e2fsck -fn` without replaying the journal first also passed (for information:
    /// a crash may legitimately leave metadata that only the journal makes whole).
    raw_fsck_ok: bool,
    /// What `e2fsck -fn` said before the replay, when it did not pass.
    raw_fsck_said: Option<String>,
}

fn fsck_n(disk: &Path) -> Result<std::process::Output, String> {
    Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .map_err(|e| format!("run e2fsck (package e2fsprogs): {e}"))
}

/// Replay the ext4 journal into `disk`, as the kernel does when it mounts it.
fn replay_journal(disk: &Path) -> Result<(), String> {
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(disk)
        .output()
        .map_err(|e| format!("run e2fsck (package e2fsprogs): {e}"))?;
    if matches!(replay.status.code(), Some(0 | 1)) {
        Ok(())
    } else {
        Err(format!(
            "e2fsck journal replay failed ({}): {}{}",
            replay.status,
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        ))
    }
}

/// The checks of one point, on a snapshot the test owns: recovery, the history, e2fsck.
fn check_snapshot(dir: &Path, history_log: &Path) -> Result<Checked, String> {
    let (w, rec) = ReplicaWriter::open(dir, Box::new(NoFaults))
        .map_err(|e| format!("ReplicaWriter::open of the snapshot failed: {e}"))?;
    let recovered = format!(
        "batch {}, redone {}, {} B discarded",
        rec.applied.version.seq, rec.redone, rec.discarded
    );
    let applied = w.applied().clone();
    drop(w);
    let disk = dir.join("disk");
    let root = disk_root(&disk);
    let history = cut_history(history_log);
    let seq = applied.version.seq;
    let same = |c: &Cut| c.root == root;
    let matched = history.iter().rposition(|c| same(c) && c.seq == seq);
    if let (None, Some(i)) = (matched, history.iter().rposition(same)) {
        return Err(format!(
            "replica holds the state of batch {} but its record says {:?}",
            history[i].seq, applied.version
        ));
    }
    let Some(matched) = matched else {
        let tail: Vec<String> = history
            .iter()
            .rev()
            .take(5)
            .map(|c| {
                format!(
                    "seq {} epoch {} root {}",
                    c.seq,
                    c.flush_epoch,
                    &c.root[..16]
                )
            })
            .collect();
        return Err(format!(
            "replica state {root} (applied {applied:?}, recovery {recovered}) is none of the \
             {} states the primary proposed; newest: {tail:?}",
            history.len()
        ));
    };
    let raw = fsck_n(&disk)?;
    let raw_fsck_ok = raw.status.success();
    let raw_fsck_said = (!raw_fsck_ok).then(|| {
        let out = String::from_utf8_lossy(&raw.stdout);
        let problems: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("Pass ") && !l.trim().is_empty())
            .take(6)
            .collect();
        format!("{}: {}", raw.status, problems.join(" | "))
    });
    // The kernel replays the ext4 journal at mount; so does this, on our copy. Then the
    // check proper, read-only.
    replay_journal(&disk)?;
    let fsck = fsck_n(&disk)?;
    if !fsck.status.success() {
        return Err(format!(
            "e2fsck -fn on the replica of batch {}: {}\n{}{}",
            history[matched].seq,
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        ));
    }
    Ok(Checked {
        matched,
        recovered,
        mid_batch: rec.redone || rec.discarded > 0,
        raw_fsck_ok,
        raw_fsck_said,
    })
}

async fn replica(c: &Client) -> ReplicaInfo {
    let list = c.replica_list(Some("desk")).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    list.into_iter().next().unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn wait_for(
    lab: &Lab,
    within: Duration,
    what: &str,
    ok: impl Fn(&ReplicaInfo) -> bool,
) -> Result<ReplicaInfo, String> {
    let c = &lab.host("office").client;
    let end = Instant::now() + within;
    loop {
        let r = replica(c).await;
        if ok(&r) {
            return Ok(r);
        }
        if Instant::now() > end {
            return Err(format!(
                "replica never {what} within {within:?}: {r:?}\n--- office log ---\n{}\n--- home log ---\n{}",
                lab.host("office").log_tail(30),
                lab.host("home").log_tail(30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes the campaign's own directory (snapshots, cut log) unless asked to keep it.
struct Scratch(PathBuf, bool);

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_is_always_a_flushed_state_with_a_clean_ext4_across_50_interruptions() {
    let started = Instant::now();
    let seed: u64 = std::env::var("ROAM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() ^ u64::from(std::process::id()) << 32);
    let points: usize = std::env::var("ROAM_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_POINTS);
    eprintln!(
        "crash campaign: seed {seed} (ROAM_CRASH_SEED={seed} replays the choices), {points} points"
    );
    let mut rng = Rng(seed);

    let keep = std::env::var_os("ROAM_LAB_KEEP").is_some();
    let scratch = std::env::temp_dir().join(format!("roam-crash-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let _scratch = Scratch(scratch.clone(), keep);
    let cut_log = scratch.join("cuts.jsonl");
    // Both roamds get these (only the primary proposes cuts).
    let mut cfg = config();
    cfg.host_env = vec![
        ("ROAM_TEST_CUT_LOG".into(), cut_log.display().to_string()),
        (
            "ROAM_TEST_IDLE_TIMEOUT_MS".into(),
            IDLE_TIMEOUT_MS.to_string(),
        ),
    ];
    let mut lab = Lab::start(cfg).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let office = lab.host("office").client.clone();
    office.replica_add("desk", "home").await.unwrap();
    wait_for(&lab, Duration::from_secs(60), "in sync", |r| {
        r.state == ReplicaState::InSync
    })
    .await
    .unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    let replica_dir = lab.host("home").state.join("replicas").join("desk");
    eprintln!("seeded after {:?}; interrupting", started.elapsed());

    let mut failures: Vec<String> = Vec::new();
    let mut checks: Vec<(usize, Kind, Pending)> = Vec::new();
    let mut kinds = [0usize; 2];
    let mut resumed_at = now_ms();
    for point in 0..points {
        // Interrupt a live stream: after the link committed a batch in this session, at a
        // random moment (mid-batch, mid-commit or idle).
        if let Err(e) = wait_for(&lab, Duration::from_secs(30), "resumed", |r| {
            r.last_sync_unix_ms.is_some_and(|t| t > resumed_at)
        })
        .await
        {
            failures.push(format!("point {point} (seed {seed}): {e}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(600))).await;
        let kind = if rng.below(100) < 60 {
            Kind::KillReceiver
        } else {
            Kind::CutLink
        };
        kinds[kind as usize] += 1;
        let snap = scratch.join(format!("p{point:03}"));
        match kind {
            Kind::KillReceiver => {
                lab.host_mut("home").kill();
                snapshot(&replica_dir, &snap);
                lab.host_mut("home").spawn().await.unwrap();
            }
            Kind::CutLink => {
                lab.wan().set_outage(true);
                // Hold the cut until the primary gave the session up (idle timeout): by
                // then nothing is in flight and the replica host is quiescent.
                let r = wait_for(&lab, Duration::from_secs(15), "paused by the cut", |r| {
                    r.state == ReplicaState::Paused
                })
                .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                snapshot(&replica_dir, &snap);
                lab.wan().set_outage(false);
                if let Err(e) = r {
                    failures.push(format!("point {point} (seed {seed}, link cut): {e}"));
                    break;
                }
            }
        }
        resumed_at = now_ms();
        let log = cut_log.clone();
        let h = tokio::task::spawn_blocking(move || {
            let r = check_snapshot(&snap, &log);
            let _ = std::fs::remove_dir_all(&snap);
            r
        });
        checks.push((point, kind, h));
    }

    // The guest stops writing; the replica catches up and equals the source disk.
    office
        .vm_workload("desk", &Workload::default())
        .await
        .unwrap();
    let settle = now_ms();
    let caught_up = wait_for(&lab, Duration::from_secs(60), "caught up (lag 0)", |r| {
        r.state == ReplicaState::InSync
            && r.lag_bytes == 0
            && r.last_sync_unix_ms.is_some_and(|t| t > settle)
    })
    .await;
    let source_disk = lab.host("office").state.join("vms/desk/disk.raw");
    let mut equal = false;
    let mut last = (String::new(), String::new());
    if caught_up.is_ok() {
        // The guest's kernel may still write (a journal commit): retry briefly.
        for _ in 0..20 {
            let d = replica_dir.join("disk");
            let (s, r) = tokio::task::spawn_blocking({
                let src = source_disk.clone();
                move || (disk_root(&src), disk_root(&d))
            })
            .await
            .unwrap();
            if s == r && replica(&office).await.lag_bytes == 0 {
                equal = true;
                break;
            }
            last = (s, r);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // The churn really happened on ext4: the replica's file system, as a mount would
    // see it (journal replayed: recent directory changes may live only in the journal
    // until ext4 checkpoints them), lists its files.
    let control = scratch.join("control.img");
    sparse_copy(&replica_dir.join("disk"), &control);
    replay_journal(&control).unwrap();
    let ls = Command::new("debugfs")
        .args(["-R", "ls /churn"])
        .arg(&control)
        .output()
        .unwrap();
    let churn = String::from_utf8_lossy(&ls.stdout).to_string();
    // Control: the same check does see damage. Zero the (replayed) churn directory's
    // block in that copy of the final replica: `e2fsck -fn` must fail.
    let bmap = Command::new("debugfs")
        .args(["-R", "bmap /churn 0"])
        .arg(&control)
        .output()
        .unwrap();
    let block: u64 = String::from_utf8_lossy(&bmap.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&control)
            .unwrap();
        f.write_all_at(&[0u8; 4096], block * 4096).unwrap();
    }
    let damaged_fsck_fails = block > 0 && !fsck_n(&control).unwrap().status.success();

    let mut matched = Vec::new();
    let (mut mid_batch, mut raw_ok) = (0, 0);
    let mut raw_example: Option<String> = None;
    for (point, kind, h) in checks {
        match h.await.unwrap() {
            Ok(c) => {
                eprintln!(
                    "point {point:>2} {kind:?}: replica = proposed state #{} ({}){}",
                    c.matched,
                    c.recovered,
                    if c.raw_fsck_ok {
                        ""
                    } else {
                        "; clean only after journal replay"
                    }
                );
                matched.push(c.matched);
                mid_batch += usize::from(c.mid_batch);
                raw_ok += usize::from(c.raw_fsck_ok);
                if let (None, Some(said)) = (&raw_example, c.raw_fsck_said) {
                    raw_example = Some(format!("point {point}: {said}"));
                }
            }
            Err(e) => failures.push(format!("point {point} ({kind:?}, seed {seed}): {e}")),
        }
    }
    let history = cut_history(&cut_log);
    eprintln!(
        "crash campaign: {} points checked ({} receiver kills, {} link cuts; {} hit a batch \
         in flight; e2fsck -fn clean before journal replay at {}), {} states proposed ({} \
         seeds), {:?} in all",
        matched.len(),
        kinds[0],
        kinds[1],
        mid_batch,
        raw_ok,
        history.len(),
        history.iter().filter(|c| c.seed).count(),
        started.elapsed()
    );
    if let Some(e) = &raw_example {
        eprintln!("e2fsck -fn before the journal replay, e.g. {e}");
    }
    lab.shutdown().await;

    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(matched.len() >= 50, "only {} points checked", matched.len());
    assert!(
        kinds[0] >= 10 && kinds[1] >= 10,
        "kinds {kinds:?} (seed {seed})"
    );
    assert!(
        mid_batch > 0,
        "no interruption hit a batch in flight (seed {seed})"
    );
    assert!(
        damaged_fsck_fails,
        "control: e2fsck -fn accepted a replica with a zeroed directory block (block {block})"
    );
    // Never back in time, and the points were not all at the same state.
    assert!(
        matched.windows(2).all(|w| w[0] <= w[1]),
        "the replica went back to an older state (seed {seed}): {matched:?}"
    );
    let mut distinct = matched.clone();
    distinct.dedup();
    assert!(
        distinct.len() * 2 >= matched.len(),
        "replication hardly moved between points: {matched:?}"
    );
    caught_up.unwrap();
    assert!(
        equal,
        "replica never equal to the source after catching up: {last:?}"
    );
    assert!(
        churn.contains("f0") || churn.contains("f1") || churn.contains("f2"),
        "no churn files on the replica's ext4 (a guest image older than the agent's file \
         workload? scripts/setup.sh rebuilds it): {churn}"
    );
}
