//! `roam-lab bench`: roam's figures side by side with their baselines, measured in the
//! same run, and checked against the promises in SPECIFICATION.md.
//!
//! * NBD: roam's server against qemu-nbd on the same file (`roam-nbd-bench`, which
//!   drives both with `qemu-img bench`).
//! * Migration: the demo's busy VM moved over the emulated WAN at 100 Mbit/s / 40 ms and
//!   at 1 Gbit/s / 10 ms; downtime and bytes on the wire against the bytes QEMU and the
//!   disk copy really had to send.
//! * Post-copy (issue #3, benchmark 3): time from the command to the VM running at the
//!   destination, and how long a guest request waited for a missing chunk (measured in
//!   the destination's NBD back end), against 2 × RTT + one chunk's transfer time.

use std::process::Command;
use std::time::Duration;

use roam_control::api::{MigrateRequest, MigrationResult, Outcome};
use serde::Serialize;
use serde_json::Value;

use crate::bins;
use crate::lab::{Lab, LabConfig, LabError};

/// One promise, its measured value and whether it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub measured: f64,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationFigures {
    pub label: String,
    pub bandwidth_mbit: f64,
    pub rtt_ms: f64,
    pub loss_pct: f64,
    pub result: MigrationResult,
    /// wire / (memory + disk): what the channel added on top of the payload.
    pub wire_overhead: f64,
}

/// One post-copy move: when the guest ran at the destination, what a missing chunk
/// cost a guest request there.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyFigures {
    pub label: String,
    pub bandwidth_mbit: f64,
    pub rtt_ms: f64,
    pub loss_pct: f64,
    /// Command to guest running at the destination.
    pub time_to_running_ms: u64,
    /// Command to the destination holding every chunk.
    pub disk_complete_ms: u64,
    pub chunks_pending_at_resume: u64,
    pub demand_fetches: u64,
    pub demand_wait_p50_ms: f64,
    pub demand_wait_max_ms: f64,
    /// Per demanded chunk, request to arrival. Most guest reads need several chunks
    /// (readahead, large reads), so this includes the transfer of the chunks asked
    /// for with it.
    pub block_fetch_p50_ms: f64,
    pub block_fetch_max_ms: f64,
    /// Guest reads of one missing block (the agent's probe reads): how many, median,
    /// longest. The benchmark's figure.
    pub single_reads: u64,
    pub single_read_p50_ms: f64,
    pub single_read_max_ms: f64,
    /// 2 × RTT + one 64 KiB chunk at the link rate.
    pub target_ms: f64,
    pub result: MigrationResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub nbd: Value,
    /// HIP base exchange at 40 ms RTT, direct and through a rendezvous server.
    pub hip: Option<crate::hipbench::HipFigures>,
    pub migrations: Vec<MigrationFigures>,
    pub postcopy: Vec<PostcopyFigures>,
    /// HIP handover gap, ESP and base exchange ([`crate::bench_net`]).
    pub net: Option<crate::bench_net::NetFigures>,
    pub checks: Vec<Check>,
    /// Benchmarks 1, 2 and 4 of the replication issue (dedup, replicas, QEMU baseline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::bench_storage::StorageReport>,
}

/// Probe reads per second in the post-copy benchmark's guest.
pub const PROBE_READS_PER_S: u32 = 20;

/// The demo VM moved with `--postcopy` over `cfg.link`.
pub async fn postcopy_migration(
    label: &str,
    mut cfg: LabConfig,
) -> Result<PostcopyFigures, LabError> {
    let link = cfg.link;
    // Single-block reads at random places of the guest's files: after the switch,
    // some land on chunks that have not arrived (the figure the benchmark asks for).
    cfg.workload.probe_reads_per_s = PROBE_READS_PER_S;
    let lab = Lab::start(cfg).await?;
    lab.create_vm("office", "desk").await?;
    lab.start_workload("office", "desk").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let req = MigrateRequest {
        vm: "desk".into(),
        to: "home".into(),
        postcopy: true,
        bandwidth_limit_mbit: None,
    };
    let result = lab.host("office").client.migrate(&req, |_| {}).await;
    lab.shutdown().await;
    let result = result?;
    let pc = result.postcopy.clone().unwrap_or_default();
    let chunk_ms = 65536.0 * 8.0 / (link.bandwidth_mbit * 1e6) * 1000.0;
    Ok(PostcopyFigures {
        label: label.to_string(),
        bandwidth_mbit: link.bandwidth_mbit,
        rtt_ms: link.rtt_ms,
        loss_pct: link.loss_pct,
        time_to_running_ms: pc.time_to_running_ms,
        disk_complete_ms: pc.disk_complete_ms,
        chunks_pending_at_resume: pc.chunks_pending_at_resume,
        demand_fetches: pc.demand_fetches,
        demand_wait_p50_ms: pc.demand_fetch_p50_ms,
        demand_wait_max_ms: pc.demand_fetch_max_ms,
        block_fetch_p50_ms: pc.block_fetch_p50_ms,
        block_fetch_max_ms: pc.block_fetch_max_ms,
        single_reads: pc.single_reads,
        single_read_p50_ms: pc.single_read_p50_ms,
        single_read_max_ms: pc.single_read_max_ms,
        target_ms: 2.0 * link.rtt_ms + chunk_ms,
        result,
    })
}

/// The post-copy promises: completed without loss, the guest ran before the disk was
/// complete, a missing chunk costs about a round trip.
pub fn postcopy_checks(p: &[PostcopyFigures]) -> Vec<Check> {
    let mut out = Vec::new();
    for f in p {
        let completed = f.result.outcome == Outcome::Completed;
        out.push(Check {
            name: format!("post-copy {}: 0 acknowledged writes lost", f.label),
            measured: f.result.acked_writes_lost as f64,
            target: "== 0".into(),
            met: completed && f.result.acked_writes_lost == 0,
        });
        out.push(Check {
            name: format!("post-copy {}: running before disk complete, ms", f.label),
            measured: f.time_to_running_ms as f64,
            target: format!("< {} (disk complete)", f.disk_complete_ms),
            met: completed && f.time_to_running_ms < f.disk_complete_ms,
        });
        out.push(Check {
            name: format!(
                "post-copy {}: guest read of a missing block p50, ms",
                f.label
            ),
            measured: f.single_read_p50_ms,
            target: format!("<= {:.1} (2 RTT + chunk)", f.target_ms),
            met: completed
                && f.single_reads > 0
                && f.single_read_p50_ms > 0.0
                && f.single_read_p50_ms <= f.target_ms,
        });
    }
    out
}

/// Run `roam-nbd-bench --json` and return its object.
pub fn nbd_bench(quick: bool) -> Result<Value, LabError> {
    let b = bins::find("roam-nbd-bench")
        .ok_or_else(|| LabError::MissingBinary("roam-nbd-bench".into()))?;
    let mut cmd = Command::new(&b);
    cmd.arg("--json");
    if quick {
        cmd.args([
            "--rounds",
            "2",
            "--size-mib",
            "256",
            "--write-count",
            "20000",
        ]);
    }
    let out = cmd
        .output()
        .map_err(|e| LabError::Io(format!("run {}: {e}", b.display())))?;
    if !out.status.success() {
        return Err(LabError::Io(format!(
            "roam-nbd-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| LabError::Io(format!("roam-nbd-bench output: {e}")))
}

/// Boot the demo VM on office, run its workload, move it to home over `cfg.link`.
pub async fn migration(label: &str, cfg: LabConfig) -> Result<MigrationFigures, LabError> {
    let link = cfg.link;
    let lab = Lab::start(cfg).await?;
    lab.create_vm("office", "desk").await?;
    lab.start_workload("office", "desk").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let result = lab.migrate("desk", "office", "home", |_| {}).await?;
    lab.shutdown().await;
    let payload = (result.bytes.memory + result.bytes.disk).max(1);
    Ok(MigrationFigures {
        label: label.to_string(),
        bandwidth_mbit: link.bandwidth_mbit,
        rtt_ms: link.rtt_ms,
        loss_pct: link.loss_pct,
        wire_overhead: result.bytes.wire as f64 / payload as f64,
        result,
    })
}

/// Compare the figures with SPECIFICATION.md's promises.
pub fn checks(nbd: &Value, migrations: &[MigrationFigures]) -> Vec<Check> {
    let mut out = Vec::new();
    // roam-nbd-bench: one object per workload, each with roam / qemu-nbd as "ratio".
    if let Value::Object(map) = nbd {
        for (workload, v) in map {
            if let Some(ratio) = v.get("ratio").and_then(Value::as_f64) {
                out.push(Check {
                    name: format!("NBD {workload}: roam / qemu-nbd"),
                    measured: ratio,
                    target: ">= 0.90".into(),
                    met: ratio >= 0.9,
                });
            }
            // The hot path of a running VM: change tracking with a migration and a
            // replica subscribed, against the same server without it.
            if let Some(ratio) = v.get("tracked_ratio").and_then(Value::as_f64) {
                out.push(Check {
                    name: format!("NBD {workload}: tracked / plain roam"),
                    measured: ratio,
                    target: ">= 0.90".into(),
                    met: ratio >= 0.9,
                });
            }
        }
    }
    for m in migrations {
        let completed = m.result.outcome == Outcome::Completed;
        out.push(Check {
            name: format!("{}: completed with 0 acknowledged writes lost", m.label),
            measured: m.result.acked_writes_lost as f64,
            target: "== 0".into(),
            met: completed && m.result.acked_writes_lost == 0,
        });
        if (m.rtt_ms - 40.0).abs() < 1.0 {
            let d = m.result.downtime_ms.unwrap_or(u64::MAX) as f64;
            out.push(Check {
                name: format!("{}: QEMU downtime, ms", m.label),
                measured: d,
                target: "<= 300".into(),
                met: completed && d <= 300.0,
            });
        }
        out.push(Check {
            name: format!("{}: wire / (memory + disk)", m.label),
            measured: m.wire_overhead,
            target: "<= 1.05".into(),
            met: completed && m.wire_overhead <= 1.05,
        });
    }
    out
}

/// The HIP base exchange's promise: at most 2 × RTT + 20 ms (RTT measured in the run).
pub fn hip_checks(h: &crate::hipbench::HipFigures) -> Vec<Check> {
    let d = crate::hipbench::median(&h.direct_ms);
    vec![Check {
        name: format!("HIP base exchange at {} ms RTT, median ms", h.link_rtt_ms),
        measured: d,
        target: format!("<= {:.1} (2 x RTT + 20)", h.target_ms()),
        met: d <= h.target_ms(),
    }]
}

/// The table a person reads.
pub fn render(r: &BenchReport) -> String {
    let mut s = String::new();
    if !r.nbd.is_null() {
        s.push_str("NBD (qemu-img bench, same file, same run)\n");
        s.push_str(&format!(
            "  {}\n\n",
            serde_json::to_string(&r.nbd).unwrap_or_default()
        ));
    }
    if !r.migrations.is_empty() {
        s.push_str(&migration_table(&r.migrations));
    }
    if !r.postcopy.is_empty() {
        s.push_str(&format!(
            "\n{:<22} {:>12} {:>13} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10} {:>10} {:>10}\n",
            "post-copy",
            "to running",
            "disk complete",
            "pending",
            "demands",
            "wait p50",
            "wait max",
            "fetch p50",
            "fetch max",
            "1-block",
            "read p50",
            "read max",
            "target"
        ));
        for p in &r.postcopy {
            s.push_str(&format!(
                "{:<22} {:>9} ms {:>10} ms {:>8} {:>8} {:>7.1} ms {:>7.1} ms {:>7.1} ms {:>7.1} ms {:>7} {:>7.1} ms {:>7.1} ms {:>7.1} ms\n",
                p.label,
                p.time_to_running_ms,
                p.disk_complete_ms,
                p.chunks_pending_at_resume,
                p.demand_fetches,
                p.demand_wait_p50_ms,
                p.demand_wait_max_ms,
                p.block_fetch_p50_ms,
                p.block_fetch_max_ms,
                p.single_reads,
                p.single_read_p50_ms,
                p.single_read_max_ms,
                p.target_ms
            ));
        }
    }
    if let Some(n) = &r.net {
        s.push('\n');
        s.push_str(&crate::bench_net::render(n));
    }
    if let Some(st) = &r.storage {
        s.push('\n');
        s.push_str(&crate::bench_storage::render(st));
    }
    if let Some(h) = &r.hip {
        s.push('\n');
        s.push_str(&h.render());
    }
    s.push_str("\nchecks (SPECIFICATION.md)\n");
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

fn migration_table(migrations: &[MigrationFigures]) -> String {
    let ms = |v: Option<u64>| v.map_or("-".into(), |d| format!("{d} ms"));
    let mut s = format!(
        "{:<22} {:>9} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>6}\n",
        "migration",
        "total s",
        "paused",
        "QEMU dt",
        "hb gap",
        "memory MB",
        "disk MB",
        "wire MB",
        "wire/pay",
        "lost"
    );
    for m in migrations {
        let x = &m.result;
        s.push_str(&format!(
            "{:<22} {:>9.2} {:>10} {:>10} {:>10} {:>11.1} {:>9.1} {:>9.1} {:>9.3} {:>6}\n",
            m.label,
            x.total_ms as f64 / 1000.0,
            ms(x.pause_ms),
            ms(x.downtime_ms),
            ms(x.guest_downtime_ms),
            x.bytes.memory as f64 / 1e6,
            x.bytes.disk as f64 / 1e6,
            x.bytes.wire as f64 / 1e6,
            m.wire_overhead,
            x.acked_writes_lost,
        ));
    }
    s
}
