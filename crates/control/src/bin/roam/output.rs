//! What `roam` prints on stdout: JSON with `--json`, tables and sentences otherwise.

use std::io::Write;

use roam_control::units::{format_bytes, format_ms, format_unix_utc};
use roam_control::{HostInfo, MigrationResult, Outcome, PeerInfo, ReplicaInfo, VmInfo};
use serde::Serialize;

use crate::{CliError, Done};

/// The JSON printed for commands that return nothing (`peer remove`, `vm delete`).
pub fn ok() -> serde_json::Value {
    serde_json::json!({ "ok": true })
}

/// Prints `value` as one line of JSON, or the human text.
pub fn emit<T: Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce() -> String,
) -> Result<Done, CliError> {
    let text = if json {
        let mut s = serde_json::to_string(value)
            .map_err(|e| CliError::Other(format!("cannot encode JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        human()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Other(format!("writing to stdout: {e}")))?;
    Ok(Done::Ok)
}

/// Left-aligned columns, two spaces apart, header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&width).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn pairs(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn host_info(h: &HostInfo) -> String {
    pairs(&[
        ("name", h.name.clone()),
        ("key", h.key.clone()),
        ("listen", h.listen.clone()),
        ("accel", h.accel.to_string()),
        ("version", h.version.clone()),
        ("vms", h.vms.to_string()),
        ("peers", h.peers.to_string()),
    ])
}

pub fn peer_table(peers: &[PeerInfo]) -> String {
    if peers.is_empty() {
        return "no peers (add one with: roam peer add NAME ADDR KEY)\n".into();
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.addr.clone(),
                p.rate_limit_mbit
                    .map_or_else(|| "-".to_string(), |m| format!("{m} Mbit/s")),
                p.key.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ADDRESS", "LIMIT", "KEY"], &rows)
}

pub fn replica_table(list: &[ReplicaInfo]) -> String {
    if list.is_empty() {
        return "no replicas (add one with: roam replica add VM HOST)\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.vm.clone(),
                r.host.clone(),
                r.state.to_string(),
                format_bytes(r.lag_bytes),
                format_ms(r.lag_ms),
                r.last_sync_unix_ms
                    .map_or_else(|| "-".to_string(), |ms| format_unix_utc(ms / 1000)),
                r.generation.to_string(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "VM",
            "HOST",
            "STATE",
            "LAG",
            "LAG_TIME",
            "LAST_SYNC",
            "GEN",
            "ERROR",
        ],
        &rows,
    )
}

pub fn vm_table(vms: &[VmInfo]) -> String {
    if vms.is_empty() {
        return "no VMs (create one with: roam vm create NAME --memory 1G --disk 8G)\n".into();
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                match &v.conflict {
                    Some(c) => format!("{}/{}", v.state, c.kind()),
                    None => v.state.to_string(),
                },
                v.host.clone(),
                format_bytes(v.memory_mib << 20),
                v.vcpus.to_string(),
                format_bytes(v.disk_bytes),
                opt(v.accel),
                opt(v.pid),
                v.generation.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATE", "HOST", "MEMORY", "VCPUS", "DISK", "ACCEL", "PID", "GEN",
        ],
        &rows,
    )
}

pub fn vm_details(v: &VmInfo) -> String {
    let mut rows = vec![
        ("name", v.name.clone()),
        ("state", v.state.to_string()),
        ("host", v.host.clone()),
        ("memory", format_bytes(v.memory_mib << 20)),
        ("vcpus", v.vcpus.to_string()),
        (
            "disk",
            format!(
                "{} at {}",
                format_bytes(v.disk_bytes),
                v.disk_path.display()
            ),
        ),
        ("accel", opt(v.accel)),
        ("pid", opt(v.pid)),
        ("generation", v.generation.to_string()),
        ("created", format!("{} UTC", format_unix_utc(v.created_at))),
    ];
    if let Some(c) = &v.conflict {
        rows.push(("conflict", conflict_line(c)));
    }
    if let Some(n) = &v.net {
        rows.extend(net_rows(n));
    }
    pairs(&rows)
}

fn conflict_line(c: &roam_control::api::VmConflict) -> String {
    use roam_control::api::VmConflict;
    match c {
        VmConflict::Stale {
            owner,
            owner_generation,
            generation,
            learned_from,
            since_unix_ms,
        } => format!(
            "stale: '{owner}' owns generation {owner_generation} (this copy: {generation}); \
             learnt from '{learned_from}' at {} UTC; this copy will not start \
             (roam vm force-primary overrides)",
            format_unix_utc(since_unix_ms / 1000)
        ),
        VmConflict::SplitBrain {
            other_host,
            other_generation,
            generation,
            since_unix_ms,
        } => format!(
            "split_brain: '{other_host}' is primary too (its generation {other_generation}, \
             this copy {generation}), since {} UTC; replication between them stopped; \
             resolve with roam vm force-primary on the host to keep",
            format_unix_utc(since_unix_ms / 1000)
        ),
    }
}

fn net_rows(n: &roam_control::api::VmNetInfo) -> Vec<(&'static str, String)> {
    vec![
        ("hit", n.hit.clone()),
        ("lsi", n.lsi.clone()),
        ("mac", n.mac.clone()),
        (
            "guest lan",
            format!("{} via {} mtu {}", n.guest_ip, n.gateway, n.mtu),
        ),
        ("hip port", opt(n.hip_port)),
        (
            "hip peers",
            if n.peers.is_empty() {
                "-".into()
            } else {
                n.peers.join(", ")
            },
        ),
        ("hip rvs", n.rvs.clone().unwrap_or_else(|| "-".into())),
    ]
}

pub fn vm_created(v: &VmInfo) -> String {
    format!(
        "created vm {} ({} memory, {} disk, {} vcpu{}) at {}\n",
        v.name,
        format_bytes(v.memory_mib << 20),
        format_bytes(v.disk_bytes),
        v.vcpus,
        if v.vcpus == 1 { "" } else { "s" },
        v.disk_path.display()
    )
}

pub fn vm_line(v: &VmInfo) -> String {
    let mut s = format!("{}: {} on {}", v.name, v.state, v.host);
    match (v.pid, v.accel) {
        (Some(pid), Some(a)) => s.push_str(&format!(" (pid {pid}, {a})")),
        (Some(pid), None) => s.push_str(&format!(" (pid {pid})")),
        _ => {}
    }
    s.push('\n');
    s
}

pub fn migration_summary(r: &MigrationResult) -> String {
    let mut s = match r.outcome {
        Outcome::Completed => format!(
            "{} moved {} → {} in {}: paused {} (QEMU's figure {}), heartbeat gap {}\n",
            r.vm,
            r.from,
            r.to,
            format_ms(r.total_ms),
            opt(r.pause_ms.map(format_ms)),
            opt(r.downtime_ms.map(format_ms)),
            opt(r.guest_downtime_ms.map(format_ms)),
        ),
        Outcome::Aborted => format!(
            "{}: migration {} → {} ABORTED after {}: {}\n  the VM still runs on {}\n",
            r.vm,
            r.from,
            r.to,
            format_ms(r.total_ms),
            r.error.as_deref().unwrap_or("no reason given"),
            r.from
        ),
    };
    s.push_str(&format!(
        "  bytes   memory {}, disk {}, on the wire {}\n",
        format_bytes(r.bytes.memory),
        format_bytes(r.bytes.disk),
        format_bytes(r.bytes.wire)
    ));
    s.push_str(&format!(
        "  link    {:.1} Mbit/s, rtt {:.1} ms, loss {:.2}%\n",
        r.link.bandwidth_mbit, r.link.rtt_ms, r.link.loss_pct
    ));
    s.push_str(&format!(
        "  writes  {} acknowledged, {} lost; guest rebooted: {}; accel {}\n",
        r.acked_writes,
        r.acked_writes_lost,
        if r.guest_rebooted { "YES" } else { "no" },
        r.accel
    ));
    if let Some(p) = &r.postcopy {
        s.push_str(&format!(
            "  postcopy running after {} with {} chunks still to come, disk complete after {}; \
             {} fetched on demand (p50 {:.1} ms, max {:.1} ms); \
             {} reads of one missing block (p50 {:.1} ms, max {:.1} ms)\n",
            format_ms(p.time_to_running_ms),
            p.chunks_pending_at_resume,
            format_ms(p.disk_complete_ms),
            p.demand_fetches,
            p.block_fetch_p50_ms,
            p.block_fetch_max_ms,
            p.single_reads,
            p.single_read_p50_ms,
            p.single_read_max_ms
        ));
        if p.ram {
            s.push_str(&format!(
                "  ram     post-copy from {} (pre-copy stalled after {} passes, {:.1} MB left); \
                 {:.1} MB and {} page requests after the switch, complete after {}\n",
                format_ms(p.ram_started_ms.unwrap_or(0)),
                p.ram_precopy_passes,
                p.ram_remaining_at_switch as f64 / 1e6,
                p.ram_postcopy_bytes as f64 / 1e6,
                p.ram_postcopy_requests,
                p.ram_complete_ms
                    .map_or_else(|| "(not completed)".to_string(), format_ms)
            ));
        }
        if let Some(d) = p.ram_dirty_bytes_per_s {
            s.push_str(&format!(
                "  dirty   guest rewrote {:.1} MB/s of RAM{}: RAM went {}\n",
                d as f64 / 1e6,
                p.ram_dirty_zstd_ratio
                    .map(|r| format!(", {:.1} MB/s compressed", d as f64 * r / 1e6))
                    .unwrap_or_default(),
                if p.ram {
                    "post-copy"
                } else {
                    "pre-copy (multifd, zstd)"
                }
            ));
        }
    }
    if !r.phases.is_empty() {
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|(p, ms)| format!("{p} {}", format_ms(*ms)))
            .collect();
        s.push_str(&format!("  phases  {}\n", phases.join(", ")));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["desk".into(), "running".into()],
                vec!["a-much-longer".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME           STATE\ndesk           running\na-much-longer  stopped\n"
        );
    }
}
