//! The storage benchmarks (issue "decentralised disk replication"), roam beside QEMU's own
//! `--copy-storage-all` method (`baseline.rs`) over the same emulated WAN, in one lab:
//!
//! 1. First move of a VM (its disk: base image + its own data) to a host that already
//!    holds another VM made from the same base image: WAN bytes, roam against QEMU.
//! 2. Return move after 100 MiB were written to the disk (half random, half text):
//!    total time, roam against QEMU. roam's old copy is a replica kept fresh in the
//!    background meanwhile; the time that replication took is reported beside it.
//! 4. roam's disk bytes against the least possible (each content the destination lacked,
//!    zstd-compressed once).
//!
//! ```text
//!  home: "base" (base image)      office: "desk" (base image + own data), running
//!        (desk's disk is base's image block for block, plus its own data written into
//!         blocks the file system leaves free: half random, half text)
//!  1  desk office → home   roam: only its own data crosses   QEMU: the whole disk
//!  2  write N MiB into desk's disk on home (through its NBD export, like the guest)
//!     replica on office catches up; desk home → office   roam ⟷ QEMU: time
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use roam_control::api::{MigrationResult, Outcome, Phase, ReplicaState, VmCreate, Workload};
use roam_wan::LinkParams;
use serde::Serialize;

use crate::baseline::{copy_storage_all, BaselineMove};
use crate::bench::Check;
use crate::lab::{Lab, LabConfig, LabError};

/// Sizes of one run.
#[derive(Debug, Clone, Serialize)]
pub struct StorageSizes {
    pub disk_bytes: u64,
    pub base_mib: u64,
    pub own_mib: u64,
    pub write_mib: u64,
    pub memory_mib: u64,
}

impl StorageSizes {
    /// The issue's sizes: 4 GiB disk, 1 GiB of data of which 600 MiB a shared base image,
    /// 100 MiB written before the return move.
    pub fn full() -> Self {
        StorageSizes {
            disk_bytes: 4 << 30,
            base_mib: 600,
            own_mib: 424,
            write_mib: 100,
            memory_mib: 256,
        }
    }

    /// A smoke test of the same steps (about 2 minutes).
    pub fn quick() -> Self {
        StorageSizes {
            disk_bytes: 1 << 30,
            base_mib: 48,
            own_mib: 32,
            write_mib: 16,
            memory_mib: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageReport {
    pub bandwidth_mbit: f64,
    pub rtt_ms: f64,
    pub loss_pct: f64,
    pub sizes: StorageSizes,
    /// 1: roam's first move (its WAN bytes measured by the WAN, as the baseline's).
    pub first_roam: MigrationResult,
    pub first_roam_wan_bytes: u64,
    pub first_qemu: BaselineMove,
    /// 2: background replication of the writes before the return move, seconds.
    pub replica_catch_up_s: f64,
    pub back_roam: MigrationResult,
    pub back_roam_wan_bytes: u64,
    pub back_qemu: BaselineMove,
    pub checks: Vec<Check>,
}

fn text(rng: &mut u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "replica", "chunk", "office", "home", "the", "disk", "moves", "while", "guest", "writes",
        "and", "link", "stays", "open", "data", "hash", "zstd", "index",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        let r = next(rng);
        v.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
        v.push(if r >> 59 == 0 { b'\n' } else { b' ' });
    }
    v.truncate(len);
    v
}

fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const PIECE: u64 = 4 << 20;

/// Piece `i` of generated data: even pieces random, odd ones text (half compressible).
fn piece(rng: &mut u64, i: u64) -> Vec<u8> {
    if i.is_multiple_of(2) {
        (0..PIECE / 8)
            .flat_map(|_| next(rng).to_le_bytes())
            .collect()
    } else {
        text(rng, PIECE as usize)
    }
}

/// The part of a demo disk below the agent's log region (the last 256 MiB).
fn fs_bytes(disk_bytes: u64) -> u64 {
    disk_bytes - (256 << 20).min(disk_bytes / 2)
}

/// The VM's own data: `mib` MiB written into the image at `at`, in blocks the base
/// image's file system leaves free (as if the guest had written them).
fn add_own_data(image: &Path, mib: u64, at: u64) -> Result<(), LabError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| LabError::Io(e.to_string()))?;
    let mut rng = 0x0_77a1_u64;
    for i in 0..mib.div_ceil(4) {
        f.write_all_at(&piece(&mut rng, i), at + i * PIECE)
            .map_err(|e| LabError::Io(e.to_string()))?;
    }
    Ok(())
}

/// Write `mib` MiB (half random, half text, 4 MiB pieces) into `vm`'s disk through the
/// host's NBD export, the path the guest's own writes take (so they are tracked).
fn write_through_nbd(lab: &Lab, host: &str, vm: &str, mib: u64, at: u64) -> Result<(), LabError> {
    let sock = lab.host(host).run_dir().join("nbd.sock");
    let dir = lab.root.join("writes");
    std::fs::create_dir_all(&dir).map_err(|e| LabError::Io(e.to_string()))?;
    let mut rng = 0x5eed_u64 ^ at;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"])
        .arg(format!("nbd+unix:///{vm}?socket={}", sock.display()));
    let piece_len = PIECE;
    for i in 0..mib.div_ceil(4) {
        let bytes = piece(&mut rng, i);
        let f = dir.join(format!("piece-{i}"));
        std::fs::write(&f, &bytes).map_err(|e| LabError::Io(e.to_string()))?;
        cmd.arg("-c").arg(format!(
            "write -s {} {} {}",
            f.display(),
            at + i * piece_len,
            piece_len
        ));
    }
    cmd.arg("-c").arg("flush");
    let out = cmd
        .output()
        .map_err(|e| LabError::Io(format!("qemu-io: {e}")))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(LabError::Io(format!(
            "qemu-io: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The baseline, tried twice: QEMU's NBD client has no reconnect by default (nor in
/// libvirt's flow), so one failed connection over the emulated WAN ends its mirror job.
async fn baseline(
    lab: &Lab,
    from: &str,
    to: &str,
    disk: &Path,
    memory_mib: u64,
) -> Result<BaselineMove, LabError> {
    match copy_storage_all(lab, from, to, disk, memory_mib).await {
        Ok(m) => Ok(m),
        Err(e) => {
            eprintln!("roam-lab bench (storage): baseline failed ({e}); once more");
            copy_storage_all(lab, from, to, disk, memory_mib).await
        }
    }
}

/// A move's time as the baseline's is measured (request to the VM running at the
/// destination and the source let go), seconds: without roam's `Verify` phase, in which
/// the guest agent re-reads every write it acknowledged and every file of its data set
/// — a test instrument the baseline has no counterpart of (reported beside it).
pub fn move_s(r: &MigrationResult) -> f64 {
    let verify = r.phases.get(&Phase::Verify).copied().unwrap_or(0);
    r.total_ms.saturating_sub(verify) as f64 / 1000.0
}

fn wan_bytes(lab: &Lab) -> u64 {
    lab.wan().stats().links.iter().map(|l| l.fwd_bytes).sum()
}

/// Wait until `vm`'s replica (listed on its primary `host`) is in sync.
async fn replica_in_sync(
    lab: &Lab,
    host: &str,
    vm: &str,
    within: Duration,
) -> Result<(), LabError> {
    let end = Instant::now() + within;
    loop {
        let list = lab.host(host).client.replica_list(Some(vm)).await?;
        if !list.is_empty() && list.iter().all(|r| r.state == ReplicaState::InSync) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(LabError::Io(format!(
                "replica of {vm} never in sync: {list:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn roam_move(
    lab: &Lab,
    vm: &str,
    from: &str,
    to: &str,
) -> Result<(MigrationResult, u64), LabError> {
    let b0 = wan_bytes(lab);
    let r = lab.migrate(vm, from, to, |_| {}).await?;
    let wire = wan_bytes(lab).saturating_sub(b0);
    if r.outcome != Outcome::Completed {
        return Err(LabError::Io(format!(
            "roam move {from} → {to}: {:?}\n--- {from} ---\n{}\n--- {to} ---\n{}",
            r.error,
            lab.host(from).log_tail(30),
            lab.host(to).log_tail(30)
        )));
    }
    Ok((r, wire))
}

/// Run benchmarks 1, 2 and 4 over `link`.
pub async fn run(link: LinkParams, sizes: StorageSizes) -> Result<StorageReport, LabError> {
    let say = |s: &str| eprintln!("roam-lab bench (storage): {s}");
    let cfg = LabConfig {
        link,
        memory_mib: sizes.memory_mib,
        disk_bytes: sizes.disk_bytes,
        data_mib: sizes.base_mib,
        workload: Workload {
            mem_dirty_mib_s: 0,
            mem_working_set_mib: 0,
            // Few records: the agent re-reads all of them after each move (slow under TCG),
            // and the figures here are about the disk copy.
            disk_writes_per_s: 2,
            ..Workload::default()
        },
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    };
    let lab = Lab::start(cfg).await?;
    say(&format!(
        "images: base {} MiB, desk {} MiB ({} MiB own) on a {} MiB disk",
        sizes.base_mib,
        sizes.base_mib + sizes.own_mib,
        sizes.own_mib,
        sizes.disk_bytes >> 20
    ));
    // Both disks are the base image (the same file system, block for block); desk then
    // holds data of its own in blocks the file system leaves free.
    let base_img = lab.make_image("base", sizes.base_mib)?;
    let desk_img = lab.root.join("desk-image.raw");
    crate::baseline::sparse_copy(&base_img, &desk_img)?;
    add_own_data(&desk_img, sizes.own_mib, fs_bytes(sizes.disk_bytes) / 2)?;
    let create = |name: &str, img: &Path| VmCreate {
        name: name.to_string(),
        memory_mib: sizes.memory_mib,
        disk_bytes: sizes.disk_bytes,
        vcpus: 1,
        disk_image: Some(img.to_path_buf()),
        hip_peers: Vec::new(),
        hip_rvs: None,
    };
    // "base" only has to exist on home (its disk is what home holds); it need not run.
    lab.host("home")
        .client
        .vm_create(&create("base", &base_img))
        .await?;
    let _ = std::fs::remove_file(&base_img);
    lab.host("office")
        .client
        .vm_create(&create("desk", &desk_img))
        .await?;
    lab.host("office").client.vm_start("desk").await?;
    lab.start_workload("office", "desk").await?;
    // home hashes base's disk into its index in the background meanwhile.

    say("1: QEMU's copy-storage-all, office → home (baseline)");
    let first_qemu = baseline(&lab, "office", "home", &desk_img, sizes.memory_mib).await?;
    let _ = std::fs::remove_file(&desk_img);
    say(&format!(
        "   {:.1} MB in {:.1} s",
        first_qemu.wire_bytes as f64 / 1e6,
        first_qemu.seconds
    ));
    say("1: roam, office → home");
    let (first_roam, first_roam_wan_bytes) = roam_move(&lab, "desk", "office", "home").await?;
    say(&format!(
        "   {:.1} MB in {:.1} s ({:?} chunks found on home), phases {:?}, memory {:.1} MB",
        first_roam_wan_bytes as f64 / 1e6,
        first_roam.total_ms as f64 / 1000.0,
        first_roam.chunks_deduped,
        first_roam.phases,
        first_roam.bytes.memory as f64 / 1e6
    ));

    // 2: office's old copy becomes a replica; writes on home reach it in the background.
    replica_in_sync(&lab, "home", "desk", Duration::from_secs(300)).await?;
    say(&format!(
        "2: writing {} MiB into desk's disk on home",
        sizes.write_mib
    ));
    let at = fs_bytes(sizes.disk_bytes) / 4 * 3;
    write_through_nbd(&lab, "home", "desk", sizes.write_mib, at)?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    replica_in_sync(&lab, "home", "desk", Duration::from_secs(600)).await?;
    let replica_catch_up_s = t.elapsed().as_secs_f64();
    say(&format!(
        "   replica on office caught up in {replica_catch_up_s:.1} s"
    ));
    say("2: roam, home → office");
    let (back_roam, back_roam_wan_bytes) = roam_move(&lab, "desk", "home", "office").await?;
    say(&format!(
        "   {:.2} s ({:.2} s without the agent's check), phases {:?}, memory {:.1} MB, disk {:.1} MB",
        back_roam.total_ms as f64 / 1000.0,
        move_s(&back_roam),
        back_roam.phases,
        back_roam.bytes.memory as f64 / 1e6,
        back_roam.bytes.disk as f64 / 1e6
    ));
    say("2: QEMU's copy-storage-all, home → office (baseline, the same disk)");
    let kept: PathBuf = lab
        .host("home")
        .state
        .join("vms")
        .join("desk")
        .join("disk.raw");
    let back_qemu = baseline(&lab, "home", "office", &kept, sizes.memory_mib).await?;
    say(&format!("   {:.1} s", back_qemu.seconds));
    lab.shutdown().await;

    let mut checks = Vec::new();
    let ratio1 = first_roam_wan_bytes as f64 / first_qemu.wire_bytes.max(1) as f64;
    checks.push(Check {
        name: "1 first move: roam / QEMU WAN bytes".into(),
        measured: ratio1,
        target: "<= 0.35".into(),
        met: ratio1 <= 0.35,
    });
    let speedup = back_qemu.seconds / move_s(&back_roam).max(0.001);
    checks.push(Check {
        name: "2 return move: QEMU time / roam time".into(),
        measured: speedup,
        target: ">= 20".into(),
        met: speedup >= 20.0,
    });
    for (label, r) in [("first", &first_roam), ("return", &back_roam)] {
        if let Some(least) = r.least_bytes.filter(|l| *l > 0) {
            let x = r.bytes.disk as f64 / least as f64;
            checks.push(Check {
                name: format!("4 {label} move: disk bytes / least possible"),
                measured: x,
                target: "<= 1.1".into(),
                met: x <= 1.1,
            });
        }
    }
    for (label, r) in [("first", &first_roam), ("return", &back_roam)] {
        checks.push(Check {
            name: format!("{label} move: acknowledged writes lost"),
            measured: r.acked_writes_lost as f64,
            target: "== 0".into(),
            met: r.acked_writes_lost == 0 && r.acked_writes > 0,
        });
    }
    Ok(StorageReport {
        bandwidth_mbit: link.bandwidth_mbit,
        rtt_ms: link.rtt_ms,
        loss_pct: link.loss_pct,
        sizes,
        first_roam,
        first_roam_wan_bytes,
        first_qemu,
        replica_catch_up_s,
        back_roam,
        back_roam_wan_bytes,
        back_qemu,
        checks,
    })
}

/// The table a person reads.
pub fn render(r: &StorageReport) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut s = format!(
        "storage: link {} Mbit/s, {} ms RTT, {}% loss; disk {} MiB, data {} MiB ({} MiB \
         shared base image), {} MiB written before the return move, guest {} MiB\n",
        r.bandwidth_mbit,
        r.rtt_ms,
        r.loss_pct,
        r.sizes.disk_bytes >> 20,
        r.sizes.base_mib + r.sizes.own_mib,
        r.sizes.base_mib,
        r.sizes.write_mib,
        r.sizes.memory_mib
    );
    s.push_str(&format!(
        "  {:<34} {:>12} {:>12} {:>9} {:>12} {:>12}\n",
        "move", "WAN MB", "disk MB", "time s", "least MB", "deduped"
    ));
    let row = |name: &str, wan: u64, r: &MigrationResult| {
        format!(
            "  {:<34} {:>12.1} {:>12.1} {:>9.2} {:>12.1} {:>12}\n",
            name,
            mb(wan),
            mb(r.bytes.disk),
            move_s(r),
            mb(r.least_bytes.unwrap_or(0)),
            r.chunks_deduped.unwrap_or(0)
        )
    };
    s.push_str(&row(
        "1 roam first move",
        r.first_roam_wan_bytes,
        &r.first_roam,
    ));
    s.push_str(&format!(
        "  {:<34} {:>12.1} {:>12} {:>9.2}\n",
        "1 QEMU copy-storage-all",
        mb(r.first_qemu.wire_bytes),
        "-",
        r.first_qemu.seconds
    ));
    s.push_str(&row(
        "2 roam return move",
        r.back_roam_wan_bytes,
        &r.back_roam,
    ));
    s.push_str(&format!(
        "  {:<34} {:>12.1} {:>12} {:>9.2}\n",
        "2 QEMU copy-storage-all",
        mb(r.back_qemu.wire_bytes),
        "-",
        r.back_qemu.seconds
    ));
    s.push_str(&format!(
        "  (before the return move, the replica caught up with the writes in {:.1} s; roam's \
         times leave out the guest agent's check of every acknowledged write and file \
         afterwards, {:.1} s and {:.1} s, which the baseline does not do)\n",
        r.replica_catch_up_s,
        r.first_roam.total_ms as f64 / 1000.0 - move_s(&r.first_roam),
        r.back_roam.total_ms as f64 / 1000.0 - move_s(&r.back_roam),
    ));
    for c in &r.checks {
        s.push_str(&format!(
            "  [{}] {:<52} {:>10.3}  target {}\n",
            if c.met { "ok" } else { "MISS" },
            c.name,
            c.measured,
            c.target
        ));
    }
    s
}
