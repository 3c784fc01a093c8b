//! Background replicas end to end: real roamd hosts in namespaces, a real guest that keeps
//! writing, the emulated WAN (with an outage), then a migration to the replica host that
//! starts from the replica, and the replica's removal; and resuming after either roamd
//! restarts without resending what the replica already holds.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use roam_control::api::{Outcome, ReplicaInfo, ReplicaState, Workload};
use roam_control::Client;
use roam_lab::{Lab, LabConfig};
use roam_migrate::digest::{to_hex, ChunkHashes};
use roam_store::replica::NoFaults;
use roam_store::ReplicaWriter;
use roam_wan::LinkParams;

const DISK_BYTES: u64 = 1 << 30;
const CHUNK: u32 = 64 << 10;

fn config() -> LabConfig {
    LabConfig {
        link: LinkParams {
            bandwidth_mbit: 100.0,
            rtt_ms: 20.0,
            loss_pct: 0.0,
            ..LinkParams::default()
        },
        memory_mib: 256,
        disk_bytes: DISK_BYTES,
        data_mib: 64,
        workload: Workload {
            mem_dirty_mib_s: 8,
            mem_working_set_mib: 16,
            disk_writes_per_s: 40,
            ..Default::default()
        },
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    }
}

/// A scratch directory of this test's own (the tests of this file run at once), its cut
/// log, and the lab configuration whose daemons write to it: the primary logs the state
/// each batch it proposes leaves (`ROAM_TEST_CUT_LOG`).
fn with_cut_log(test: &str) -> (std::path::PathBuf, std::path::PathBuf, LabConfig) {
    let scratch = std::env::temp_dir().join(format!("roam-repl-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let cut_log = scratch.join("cuts.jsonl");
    let mut cfg = config();
    cfg.host_env
        .push(("ROAM_TEST_CUT_LOG".into(), cut_log.display().to_string()));
    (scratch, cut_log, cfg)
}

async fn replica(c: &Client) -> ReplicaInfo {
    let list = c.replica_list(Some("desk")).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    list.into_iter().next().unwrap()
}

/// Poll until `ok` holds for the replica (or time out with the last state seen).
async fn wait_for(
    lab: &Lab,
    within: Duration,
    what: &str,
    ok: impl Fn(&ReplicaInfo) -> bool,
) -> ReplicaInfo {
    let c = &lab.host("office").client;
    let end = Instant::now() + within;
    loop {
        let r = replica(c).await;
        if ok(&r) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "replica never {what}: {r:?}\n--- office log ---\n{}\n--- home log ---\n{}",
            lab.host("office").log_tail(40),
            lab.host("home").log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Caught up: in sync, or at most a few chunks behind a commit made after `since_ms`
/// (the guest writes 40 times a second, so "exactly 0" is a matter of luck).
fn caught_up(r: &ReplicaInfo, since_ms: u64) -> bool {
    r.last_sync_unix_ms.is_some_and(|t| t > since_ms)
        && (r.state == ReplicaState::InSync
            || (r.state == ReplicaState::Lagging && r.lag_bytes <= 8 << 16 && r.lag_ms < 2000))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn heartbeats_flow(lab: &Lab, host: &str) -> bool {
    let c = &lab.host(host).client;
    let Ok(a) = c.vm_agent("desk").await else {
        return false;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Ok(b) = c.vm_agent("desk").await else {
        return false;
    };
    b.heartbeats > a.heartbeats + 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_follows_the_guest_survives_an_outage_and_seeds_the_move() {
    let (scratch, cut_log, cfg) = with_cut_log("follows");
    let mut lab = Lab::start(cfg).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let office = lab.host("office").client.clone();
    let office = &office;
    let home_dir = lab.host("home").state.join("replicas").join("desk");

    // Add: the seed copies the 64 MiB of data; then in sync.
    let t0 = now_ms();
    let r = office.replica_add("desk", "home").await.unwrap();
    assert_eq!((r.vm.as_str(), r.host.as_str()), ("desk", "home"));
    let r = wait_for(&lab, Duration::from_secs(90), "in sync", |r| {
        r.state == ReplicaState::InSync
    })
    .await;
    assert!(r.last_sync_unix_ms.unwrap_or(0) >= t0, "{r:?}");
    assert_eq!(r.lag_bytes, 0);
    for f in ["disk", "journal", "record"] {
        assert!(home_dir.join(f).exists(), "replica file {f} missing");
    }
    let allocated = std::fs::metadata(home_dir.join("disk")).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&allocated) * 512 >= 32 << 20,
        "the replica holds less than half of the guest's data"
    );

    // The guest writes: lag shows, then comes back to ~0 by itself.
    lab.start_workload("office", "desk").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t1 = now_ms();
    wait_for(
        &lab,
        Duration::from_secs(30),
        "caught up with the writes",
        |r| caught_up(r, t1),
    )
    .await;

    // The WAN goes down: replication notices and pauses; the VM does not care.
    lab.wan().set_outage(true);
    let r = wait_for(&lab, Duration::from_secs(30), "paused by the outage", |r| {
        r.state == ReplicaState::Paused
    })
    .await;
    assert!(r.error.is_some(), "{r:?}");
    assert!(
        heartbeats_flow(&lab, "office").await,
        "guest stalled during the outage"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = replica(office).await;
    eprintln!("during the outage: {during:?}");
    assert!(
        matches!(during.state, ReplicaState::Paused | ReplicaState::Lagging),
        "{during:?}"
    );
    assert!(
        during.lag_bytes > 65536 && during.lag_ms >= 3000,
        "writes during the outage not counted: {during:?}"
    );
    lab.wan().set_outage(false);
    let t2 = now_ms();
    wait_for(
        &lab,
        Duration::from_secs(45),
        "caught up after the outage",
        |r| caught_up(r, t2),
    )
    .await;
    // Resumed without resending what the replica held: the first seed carried the data;
    // any later one (a batch whose commit reply the outage swallowed) only the changes.
    let s = seeds(&lab.host("office").log);
    assert!(!s.is_empty() && s[0].1 >= 500, "{s:?}");
    assert!(
        s[1..]
            .iter()
            .all(|&(offered, sent)| sent < 100 && sent * 10 < offered),
        "a seed after the outage resent what the replica held: {s:?}"
    );

    // `roam replica list --json`, as a person runs it.
    let roam = roam_lab::bins::find("roam").expect("roam binary built");
    let out = std::process::Command::new(&roam)
        .arg("--socket")
        .arg(&lab.host("office").socket)
        .args(["--json", "replica", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["vm"], "desk");
    assert_eq!(v[0]["host"], "home");
    assert!(
        ["in_sync", "lagging"].contains(&v[0]["state"].as_str().unwrap_or("")),
        "{v}"
    );
    assert!(v[0]["lag_bytes"].is_u64() && v[0]["generation"].as_u64() >= Some(1));

    aborted_move_gives_the_replica_back(&mut lab, &cut_log).await;

    // Move to the replica host: the disk starts from the replica.
    let m = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    eprintln!(
        "migration to the replica host: disk {} B, wire {} B, chunks skipped {:?}, offered {:?}, total {} ms, phases {:?}",
        m.bytes.disk, m.bytes.wire, m.chunks_skipped, m.chunks_offered, m.total_ms, m.phases
    );
    assert_eq!(m.outcome, Outcome::Completed, "{:?}", m.error);
    assert_eq!(m.acked_writes_lost, 0);
    assert!(
        m.chunks_skipped.unwrap_or(0) > 500,
        "the replica was not used: {m:?}"
    );
    // The source knew the replica's batch: it offered only what changed since, not a
    // hash for every allocated chunk.
    let offered = m.chunks_offered.unwrap_or(u64::MAX);
    assert!(
        offered.saturating_mul(10) < m.chunks_skipped.unwrap_or(0),
        "{offered} offers for {:?} chunks held: every chunk was offered",
        m.chunks_skipped
    );
    assert!(
        m.bytes.disk < 8 << 20,
        "{} disk bytes crossed for 64 MiB of replicated data",
        m.bytes.disk
    );
    assert!(
        heartbeats_flow(&lab, "home").await,
        "guest not alive at home"
    );
    // Replication followed the VM: office's link was handed over, home (the new primary)
    // dropped the replica it held (its own disk is the VM's now) and replicates to
    // office, whose kept disk became the replica.
    assert!(office.replica_list(None).await.unwrap().is_empty());
    assert!(!home_dir.exists(), "superseded replica left at home");
    let home = &lab.host("home").client;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let l = home.replica_list(Some("desk")).await.unwrap();
        if l.iter().any(|r| {
            r.host == "office"
                && matches!(r.state, ReplicaState::InSync | ReplicaState::Lagging)
                && r.last_sync_unix_ms.is_some()
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "office never caught up: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Remove: the replica's files are gone at office, the link is gone at home.
    let office_dir = lab.host("office").state.join("replicas").join("desk");
    assert!(office_dir.exists());
    home.replica_remove("desk", "office").await.unwrap();
    assert!(!office_dir.exists(), "replica files left at office");
    assert!(home.replica_list(None).await.unwrap().is_empty());
    // The VM at home runs from its own disk, untouched by the removal.
    assert!(heartbeats_flow(&lab, "home").await);
    lab.shutdown().await;
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A move to the replica host that fails after the replica's disk was lent to it in place
/// (home refuses at the seal, once the chunks that changed were written into it): the
/// replica must be given back exactly at a committed batch the primary proposed, and
/// replication must go on from there.
async fn aborted_move_gives_the_replica_back(lab: &mut Lab, cut_log: &Path) {
    let home_dir = lab.host("home").state.join("replicas").join("desk");
    let home = lab.host_mut("home");
    home.env
        .push(("ROAM_FAULTS".into(), "refuse-handover".into()));
    home.spawn().await.unwrap();
    let t = now_ms();
    wait_for(
        lab,
        Duration::from_secs(60),
        "caught up before the refused move",
        |r| caught_up(r, t),
    )
    .await;
    let m = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(
        m.outcome,
        Outcome::Aborted,
        "the fault must abort the move: {m:?}"
    );
    let log = lab.host("home").log.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("replica given back at its committed batch")
    {
        assert!(
            Instant::now() < deadline,
            "home never gave the replica back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("incoming migration starts from the replica, in place"),
        "the replica was not lent in place"
    );
    for f in ["promoted", "undo"] {
        assert!(!home_dir.join(f).exists(), "{f} left in the replica");
    }
    // The clean-up removes the incoming directory just after the give-back.
    let incoming = lab.host("home").state.join("incoming").join("desk");
    let deadline = Instant::now() + Duration::from_secs(15);
    while incoming.exists() {
        assert!(Instant::now() < deadline, "incoming disk left at home");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (seq, root) = committed_state(&home_dir, &scratch_of(cut_log));
    let cuts = cut_roots(cut_log);
    assert!(
        cuts.iter().any(|(s, r)| *s == seq && *r == root),
        "the replica given back (batch {seq}, root {root}) is no state the primary proposed"
    );
    eprintln!("refused move: replica given back at batch {seq}");
    // Replication goes on from there (home without the fault, for the real move).
    let home = lab.host_mut("home");
    home.env.retain(|(k, _)| k != "ROAM_FAULTS");
    home.spawn().await.unwrap();
    let t = now_ms();
    wait_for(
        lab,
        Duration::from_secs(60),
        "caught up after the refused move",
        |r| caught_up(r, t),
    )
    .await;
    let (after, _) = committed_state(&home_dir, &scratch_of(cut_log));
    assert!(
        after > seq,
        "no batch committed after the refused move ({after} <= {seq})"
    );
}

fn scratch_of(cut_log: &Path) -> std::path::PathBuf {
    cut_log.with_file_name("snapshot")
}

/// `(seq, root)` of every batch office proposed to home.
fn cut_roots(log: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["source"] == "office" && v["vm"] == "desk" && v["host"] == "home")
        .map(|v| {
            (
                v["seq"].as_u64().unwrap(),
                v["root"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The replica's committed batch and the digest root of its disk, read while roamd runs:
/// the disk is copied between two reads of the record that find the same file (a commit
/// replaces the record twice) naming no commit in progress; else it tries again.
fn committed_state(replica: &Path, scratch: &Path) -> (u64, String) {
    for _ in 0..50 {
        let _ = std::fs::remove_dir_all(scratch);
        std::fs::create_dir_all(scratch).unwrap();
        let rec = replica.join("record");
        let (Ok(m1), Ok(r1)) = (std::fs::metadata(&rec), std::fs::read(&rec)) else {
            continue;
        };
        let st = std::process::Command::new("cp")
            .args(["--sparse=always"])
            .arg(replica.join("disk"))
            .arg(scratch.join("disk"))
            .status()
            .unwrap();
        let (Ok(m2), Ok(r2)) = (std::fs::metadata(&rec), std::fs::read(&rec)) else {
            continue;
        };
        if !st.success() || m1.ino() != m2.ino() || r1 != r2 {
            continue;
        }
        std::fs::write(scratch.join("record"), &r1).unwrap();
        std::fs::write(scratch.join("journal"), b"").unwrap();
        // A record naming a commit in progress wants its journal: not a quiet moment.
        let Ok((w, _)) = ReplicaWriter::open(scratch, Box::new(NoFaults)) else {
            continue;
        };
        let seq = w.applied().version.seq;
        drop(w);
        return (seq, disk_root(&scratch.join("disk")));
    }
    panic!("the replica was never quiet long enough to read its committed state");
}

/// The digest root of a raw disk file, as `ChunkHashes::root` (the cut log's `root`).
fn disk_root(path: &Path) -> String {
    to_hex(
        &ChunkHashes::of_file(path, DISK_BYTES, CHUNK)
            .unwrap()
            .root(),
    )
}

/// The lines of a roamd log holding `what`, without terminal colours.
fn log_lines(log: &std::path::Path, what: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut plain = String::with_capacity(text.len());
    let mut in_escape = false;
    for ch in text.chars() {
        match (in_escape, ch) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .lines()
        .filter(|l| l.contains(what))
        .map(String::from)
        .collect()
}

/// The number after `key` in a log line (`u64::MAX` if there is none).
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The field `key` of every line holding `what` in a roamd log.
fn log_field(log: &std::path::Path, what: &str, key: &str) -> Vec<u64> {
    log_lines(log, what).iter().map(|l| field(l, key)).collect()
}

/// `(offered, sent)` of every "replica seeded" line in a roamd log.
fn seeds(log: &std::path::Path) -> Vec<(u64, u64)> {
    log_lines(log, "replica seeded")
        .iter()
        .map(|l| (field(l, "offered="), field(l, "sent=")))
        .collect()
}

/// Start desk on office with its workload, and wait until the replica on home has caught
/// up with everything written from now on.
async fn start_and_catch_up(lab: &Lab, what: &str) {
    lab.host("office").client.vm_start("desk").await.unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    let t = now_ms();
    wait_for(lab, Duration::from_secs(60), what, |r| caught_up(r, t)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_resumes_after_either_roamd_restarts_without_resending() {
    let (scratch, cut_log, cfg) = with_cut_log("resumes");
    let mut lab = Lab::start(cfg).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    lab.host("office")
        .client
        .replica_add("desk", "home")
        .await
        .unwrap();
    wait_for(&lab, Duration::from_secs(90), "in sync", |r| {
        r.state == ReplicaState::InSync
    })
    .await;
    lab.start_workload("office", "desk").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The replica host dies in the middle of the stream of batches, then comes back: its
    // replica reopens at its last committed batch and the primary carries on from there.
    lab.host_mut("home").kill();
    wait_for(&lab, Duration::from_secs(30), "paused", |r| {
        r.state == ReplicaState::Paused
    })
    .await;
    assert!(heartbeats_flow(&lab, "office").await, "guest stalled");
    lab.host_mut("home").spawn().await.unwrap();
    let t = now_ms();
    wait_for(
        &lab,
        Duration::from_secs(45),
        "caught up after home restarted",
        |r| caught_up(r, t),
    )
    .await;

    // The primary's roamd crashes while its VM runs and writes (QEMU dies with it): the
    // link's live map (mapped shared, kept by the page cache) says what the replica
    // lacked, and the VM's next start sends only that: no hash comparison.
    lab.host_mut("office").kill();
    lab.host_mut("office").spawn().await.unwrap();
    let recovered = log_field(
        &lab.host("office").log,
        "replication state recovered after roamd's crash",
        "pending=",
    );
    assert_eq!(recovered.len(), 1, "no state recovered after the crash");
    start_and_catch_up(&lab, "caught up after office restarted").await;

    let seen = seeds(&lab.host("office").log);
    eprintln!("seeds (offered, sent): {seen:?}");
    assert_eq!(seen.len(), 1, "a hash comparison after the crash: {seen:?}");
    assert!(
        seen[0].1 >= 500,
        "the first seed did not carry the data: {seen:?}"
    );

    // A move to the replica host whose roamd dies once the replica is lent to it (the
    // memory phase: the disk's changes are written into the lent file): at its restart,
    // before it serves anything, home gives the replica back at its committed batch, and
    // replication goes on from there.
    let home_pid = lab.host_mut("home").pid().expect("home roamd runs");
    let killed = std::sync::atomic::AtomicBool::new(false);
    let r = lab
        .migrate("desk", "office", "home", |p| {
            if p.phase == roam_control::api::Phase::Memory
                && !killed.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                // SAFETY: kill(2) on a pid the lab spawned and has not reaped.
                unsafe { libc::kill(home_pid as i32, libc::SIGKILL) };
            }
        })
        .await
        .unwrap();
    assert!(killed.into_inner(), "home was never killed");
    assert_eq!(r.outcome, Outcome::Aborted, "{r:?}");
    let home_dir = lab.host("home").state.join("replicas").join("desk");
    assert!(
        home_dir.join("promoted").exists(),
        "the replica was not lent when home died"
    );
    lab.host_mut("home").spawn().await.unwrap();
    let text = std::fs::read_to_string(&lab.host("home").log).unwrap();
    assert!(
        text.contains("disk lent to an interrupted migration given back"),
        "home did not give the replica back at its start"
    );
    for f in ["promoted", "undo"] {
        assert!(!home_dir.join(f).exists(), "{f} left in the replica");
    }
    let (seq, root) = committed_state(&home_dir, &scratch_of(&cut_log));
    assert!(
        cut_roots(&cut_log)
            .iter()
            .any(|(s, r)| *s == seq && *r == root),
        "the replica given back (batch {seq}, root {root}) is no state the primary proposed"
    );
    let t = now_ms();
    wait_for(
        &lab,
        Duration::from_secs(60),
        "caught up after the interrupted move",
        |r| caught_up(r, t),
    )
    .await;
    let (after, _) = committed_state(&home_dir, &scratch_of(&cut_log));
    assert!(after > seq, "no batch committed after the interrupted move");

    // Stops keep what the replica lacks: the VM stopped and started again, the primary's
    // roamd stopped (VMs first) and started again, the VM stopped and roamd crashed. Each
    // time (as after the crash with the VM running, above) the link goes on from where it
    // was: no hash comparison of the whole disk.
    let office_log = lab.host("office").log.clone();
    let seeds_before = seeds(&office_log).len();
    let c = &lab.host("office").client;
    c.vm_stop("desk").await.unwrap();
    start_and_catch_up(&lab, "caught up after the VM restarted").await;
    // A disk written behind roamd's back while the VM is stopped (here: its last chunk,
    // free space to the guest) voids that state: the next start compares by hash, and the
    // foreign write travels.
    let c = &lab.host("office").client;
    let info = c.vm_stop("desk").await.unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&info.disk_path)
            .unwrap();
        f.write_all_at(b"written while the VM was stopped", info.disk_bytes - 65536)
            .unwrap();
        f.sync_all().unwrap();
    }
    start_and_catch_up(&lab, "caught up after a foreign write").await;
    let refused = log_lines(&office_log, "replication state of the last stop not used");
    assert!(
        refused.len() == 1 && refused[0].contains("the disk file changed"),
        "a foreign write did not void the stop's state: {refused:?}"
    );
    let after_foreign = seeds(&office_log);
    assert_eq!(after_foreign.len(), seeds_before + 1, "{after_foreign:?}");
    let (_, sent) = after_foreign[seeds_before];
    assert!(
        (1..100).contains(&sent),
        "the hash comparison after a foreign write sent {sent} chunks"
    );
    lab.host_mut("office").stop().await;
    lab.host_mut("office").spawn().await.unwrap();
    start_and_catch_up(&lab, "caught up after an orderly restart of office").await;
    // The VM stopped, then roamd crashed: the state written at the VM's stop is used.
    lab.host("office").client.vm_stop("desk").await.unwrap();
    lab.host_mut("office").kill();
    lab.host_mut("office").spawn().await.unwrap();
    start_and_catch_up(&lab, "caught up after office crashed with the VM stopped").await;
    // Each stop re-hashed what the VM wrote into the dedup index.
    let rehashed = log_field(
        &office_log,
        "chunks the stopped VM wrote re-hashed",
        "chunks=",
    );
    assert!(
        rehashed.len() >= 2 && rehashed.iter().all(|&n| n > 0 && n != u64::MAX),
        "the dedup index was not refreshed at the VM's stops: {rehashed:?}"
    );
    let carried = log_field(
        &office_log,
        "replication goes on from where it was",
        "pending=",
    );
    eprintln!("carried over (pending chunks): {carried:?}");
    assert_eq!(
        carried.len(),
        4,
        "the state of a crash or of a stop was not used"
    );
    assert!(
        carried.iter().all(|&n| n < 600),
        "the carried pending set is not just what the guest wrote: {carried:?}"
    );
    assert_eq!(
        seeds(&office_log).len(),
        seeds_before + 1,
        "a stop was followed by a hash comparison of the whole disk"
    );
    // The replica the carried state kept fresh is the disk: a move to it completes (its
    // seal proves every chunk at the destination).
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
    assert!(heartbeats_flow(&lab, "home").await, "guest stalled at home");
    lab.shutdown().await;
    let _ = std::fs::remove_dir_all(&scratch);
}
