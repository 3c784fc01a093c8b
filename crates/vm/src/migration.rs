//! Migration through QMP: roam's typed view of QEMU's migration state and knobs.
//!
//! QEMU does the copying (pre-copy, post-copy, multifd, zstd); this module only sets
//! the capabilities/parameters, starts and steers the migration, and reports its
//! figures in a stable, serde-friendly shape for the dashboard and the benchmark.
//!
//! The flow roam drives (see docs/vm.md):
//!
//! ```text
//!  source QEMU                                   destination QEMU (-incoming defer)
//!  apply_tuning(t)                               apply_tuning(t)   (same t: multifd
//!                                                                   channels/compression
//!                                                                   must match)
//!                                                migrate_incoming("unix:…")
//!  migrate("unix:…")  ── RAM stream (relayed by roamd over the WAN) ──▶
//!  wait_migration_status([PreSwitchover])   guest is paused here
//!  … roamd syncs the disk …
//!  migrate_continue_pre_switchover()  ── device state ─▶  status completed, running
//!  wait_migration_status([Completed])  → runstate postmigrate → quit (never cont)
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use qapi::qmp;

use crate::error::{Error, Result};
use crate::qmp::VmEvent;
use crate::vm::Vm;

/// QEMU's migration state (`MigrationStatus` in the QAPI schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has been started.
    None,
    Setup,
    Cancelling,
    Cancelled,
    /// Pre-copy in progress.
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    /// Source paused before switchover (capability `pause-before-switchover`): the
    /// guest is stopped, waiting for `migrate-continue`.
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A state this version of roam does not know.
    Unknown,
}

impl MigrationStatus {
    /// Parses QEMU's name for a state.
    pub fn from_qemu(s: &str) -> Self {
        use MigrationStatus::*;
        match s {
            "none" => None,
            "setup" => Setup,
            "cancelling" => Cancelling,
            "cancelled" => Cancelled,
            "active" => Active,
            "postcopy-active" => PostcopyActive,
            "postcopy-paused" => PostcopyPaused,
            "postcopy-recover-setup" => PostcopyRecoverSetup,
            "postcopy-recover" => PostcopyRecover,
            "completed" => Completed,
            "failed" => Failed,
            "colo" => Colo,
            "pre-switchover" => PreSwitchover,
            "device" => Device,
            "wait-unplug" => WaitUnplug,
            _ => Unknown,
        }
    }

    /// States from which the migration will not move on by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    pub(crate) fn from_qapi(s: qmp::MigrationStatus) -> Self {
        match serde_json::to_value(s) {
            Ok(serde_json::Value::String(name)) => Self::from_qemu(&name),
            _ => MigrationStatus::Unknown,
        }
    }
}

/// Figures of one migration, as `query-migrate` reports them. Times in ms, sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub status: MigrationStatus,
    pub total_time_ms: Option<u64>,
    /// Real downtime (known once completed).
    pub downtime_ms: Option<u64>,
    /// QEMU's running estimate of the downtime.
    pub expected_downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub cpu_throttle_percentage: Option<u64>,
    pub error_desc: Option<String>,
    /// Total time vCPUs waited for post-copy page faults.
    pub postcopy_blocktime_ms: Option<u64>,
    pub ram: Option<RamStats>,
}

/// RAM figures of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RamStats {
    /// Bytes written to the migration stream (after compression, incl. multifd).
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Pages found to be zero (sent as a flag only).
    pub duplicate_pages: u64,
    pub normal_pages: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second in the last iteration.
    pub dirty_pages_rate: u64,
    /// Throughput of the last iteration, Mbit/s.
    pub mbps: f64,
    /// Number of dirty-bitmap syncs = pre-copy iterations.
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
}

fn nn(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn nno(v: Option<i64>) -> Option<u64> {
    v.map(nn)
}

impl From<qmp::MigrationInfo> for MigrationStats {
    fn from(i: qmp::MigrationInfo) -> Self {
        MigrationStats {
            status: i
                .status
                .map(MigrationStatus::from_qapi)
                .unwrap_or(MigrationStatus::None),
            total_time_ms: nno(i.total_time),
            downtime_ms: nno(i.downtime),
            expected_downtime_ms: nno(i.expected_downtime),
            setup_time_ms: nno(i.setup_time),
            cpu_throttle_percentage: nno(i.cpu_throttle_percentage),
            error_desc: i.error_desc,
            postcopy_blocktime_ms: i.postcopy_blocktime.map(u64::from),
            ram: i.ram.map(|r| RamStats {
                transferred: nn(r.transferred),
                remaining: nn(r.remaining),
                total: nn(r.total),
                duplicate_pages: nn(r.duplicate),
                normal_pages: nn(r.normal),
                normal_bytes: nn(r.normal_bytes),
                dirty_pages_rate: nn(r.dirty_pages_rate),
                mbps: r.mbps,
                dirty_sync_count: nn(r.dirty_sync_count),
                postcopy_requests: nn(r.postcopy_requests),
                page_size: nn(r.page_size),
                multifd_bytes: r.multifd_bytes,
                pages_per_second: r.pages_per_second,
                precopy_bytes: r.precopy_bytes,
                downtime_bytes: r.downtime_bytes,
                postcopy_bytes: r.postcopy_bytes,
            }),
        }
    }
}

/// Compression of the migration stream. QEMU 10 compresses only multifd channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    /// zstd at `level` (1..=20; 1 is fast, 3 is zstd's default).
    Zstd {
        level: u8,
    },
}

/// The migration knobs roam sets, on BOTH QEMUs (the destination needs the same
/// multifd channel count and compression to decode the stream). Chosen by
/// [`crate::choose_tuning`] from the measured link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTuning {
    /// `Some(n)`: capability `multifd` with `n` channels (n parallel connections to
    /// the migration socket). `None`: a single stream.
    pub multifd_channels: Option<u8>,
    /// Needs multifd.
    pub compression: Compression,
    /// `downtime-limit`: QEMU switches over once it expects the rest to fit in this.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth`; `None` leaves QEMU's default (128 MiB/s).
    pub max_bandwidth_bytes_per_s: Option<u64>,
    /// `avail-switchover-bandwidth`: the rate QEMU assumes for the final copy instead
    /// of its own measurement (which sees the local relay socket, not the WAN).
    pub switchover_bandwidth_bytes_per_s: Option<u64>,
    /// Capability `postcopy-ram`: allows `migrate-start-postcopy` later. QEMU 10.0
    /// refuses it together with multifd.
    pub postcopy: bool,
    /// Capability `pause-before-switchover`; always true for roam, so storage is synced
    /// while the guest is stopped and before the destination may run.
    pub pause_before_switchover: bool,
    /// Capability `xbzrle` (delta-encodes re-sent pages); incompatible with multifd.
    pub xbzrle: bool,
}

impl Default for MigrationTuning {
    fn default() -> Self {
        MigrationTuning {
            multifd_channels: None,
            compression: Compression::None,
            downtime_limit_ms: 300,
            max_bandwidth_bytes_per_s: None,
            switchover_bandwidth_bytes_per_s: None,
            postcopy: false,
            pause_before_switchover: true,
            xbzrle: false,
        }
    }
}

impl MigrationTuning {
    /// Rejects combinations QEMU 10.0 refuses (checked against QEMU 10.0.2:
    /// "Postcopy is not yet compatible with multifd", "Multifd is not compatible with
    /// xbzrle") or that make no sense, before any QMP command is sent.
    pub fn validate(&self) -> Result<()> {
        let multifd = self.multifd_channels.is_some();
        if multifd && self.postcopy {
            return Err(Error::Tuning(
                "postcopy-ram cannot be combined with multifd",
            ));
        }
        if multifd && self.xbzrle {
            return Err(Error::Tuning("xbzrle cannot be combined with multifd"));
        }
        if self.multifd_channels == Some(0) {
            return Err(Error::Tuning("multifd needs at least one channel"));
        }
        match self.compression {
            Compression::Zstd { .. } if !multifd => {
                return Err(Error::Tuning("compression needs multifd"));
            }
            Compression::Zstd { level } if !(1..=20).contains(&level) => {
                return Err(Error::Tuning("zstd level must be 1..=20"));
            }
            _ => {}
        }
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > 2_000_000 {
            return Err(Error::Tuning("downtime limit must be 1..=2000000 ms"));
        }
        Ok(())
    }

    /// The same tuning with `postcopy-ram` on, so roamd can switch a stalled pre-copy to
    /// post-copy. QEMU 10.0 refuses post-copy with multifd, so the stream becomes a single
    /// uncompressed one (compression needs multifd); the rest (bandwidth cap, downtime
    /// limit, pause-before-switchover) stays.
    pub fn with_postcopy_ram(mut self) -> Self {
        self.postcopy = true;
        self.multifd_channels = None;
        self.compression = Compression::None;
        self.xbzrle = false;
        self
    }

    /// The `migrate-set-capabilities` list for this tuning.
    pub fn capabilities(&self) -> Vec<(qmp::MigrationCapability, bool)> {
        use qmp::MigrationCapability as C;
        vec![
            (C::events, true),
            (C::pause_before_switchover, self.pause_before_switchover),
            (C::multifd, self.multifd_channels.is_some()),
            (C::postcopy_ram, self.postcopy),
            (C::xbzrle, self.xbzrle),
        ]
    }

    /// The `migrate-set-parameters` arguments for this tuning.
    pub fn parameters(&self) -> qmp::MigrateSetParameters {
        let mut p = qmp::MigrateSetParameters {
            downtime_limit: Some(self.downtime_limit_ms),
            max_bandwidth: self.max_bandwidth_bytes_per_s,
            avail_switchover_bandwidth: self.switchover_bandwidth_bytes_per_s,
            ..Default::default()
        };
        if let Some(n) = self.multifd_channels {
            p.multifd_channels = Some(n);
            match self.compression {
                Compression::None => {
                    p.multifd_compression = Some(qmp::MultiFDCompression::none);
                }
                Compression::Zstd { level } => {
                    p.multifd_compression = Some(qmp::MultiFDCompression::zstd);
                    p.multifd_zstd_level = Some(level);
                }
            }
        }
        p
    }
}

/// How often `wait_migration_status` re-reads the state when no event arrives.
const POLL: Duration = Duration::from_millis(100);

impl Vm {
    /// Sets capabilities and parameters for `t`. Call it on both QEMUs before
    /// `migrate` / `migrate_incoming`.
    pub async fn apply_tuning(&self, t: &MigrationTuning) -> Result<()> {
        t.validate()?;
        let capabilities = t
            .capabilities()
            .into_iter()
            .map(|(capability, state)| qmp::MigrationCapabilityStatus { capability, state })
            .collect();
        self.qmp()
            .execute(qmp::migrate_set_capabilities { capabilities })
            .await?;
        self.qmp()
            .execute(qmp::migrate_set_parameters(t.parameters()))
            .await?;
        Ok(())
    }

    /// Starts an outgoing migration to `uri` (e.g. `unix:/run/roam/…/mig.sock`).
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.qmp()
            .execute(qmp::migrate {
                uri: Some(uri.to_string()),
                channels: None,
                detach: None,
                resume: None,
            })
            .await?;
        Ok(())
    }

    /// Resumes a paused post-copy towards a destination that listens on `uri` again
    /// (after [`Vm::migrate_recover`] there).
    pub async fn migrate_resume(&self, uri: &str) -> Result<()> {
        self.qmp()
            .execute(qmp::migrate {
                uri: Some(uri.to_string()),
                channels: None,
                detach: None,
                resume: Some(true),
            })
            .await?;
        Ok(())
    }

    /// Destination of a paused post-copy: listen for the source's resumed stream on
    /// `uri`. Out of band (`crate::oob`): the main loop may be blocked on a missing page.
    pub async fn migrate_recover(&self, uri: &str) -> Result<()> {
        crate::oob::exec_oob(
            &self.paths().qmp_oob,
            "migrate-recover",
            serde_json::json!({ "uri": uri }),
        )
        .await?;
        Ok(())
    }

    /// Makes a `-incoming defer` QEMU listen on `uri`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.qmp()
            .execute(qmp::migrate_incoming {
                uri: Some(uri.to_string()),
                channels: None,
                exit_on_error: None,
            })
            .await?;
        Ok(())
    }

    /// Current migration figures.
    pub async fn query_migrate(&self) -> Result<MigrationStats> {
        let info = self.qmp().execute(qmp::query_migrate {}).await?;
        Ok(MigrationStats::from(info))
    }

    /// Waits until the migration state is one of `wanted`. Fails as soon as it reaches
    /// a final state not in `wanted` (so a failed migration is not waited out).
    pub async fn wait_migration_status(
        &self,
        wanted: &[MigrationStatus],
        timeout: Duration,
    ) -> Result<MigrationStats> {
        // Subscribe before the first query so no transition falls in between.
        let mut events = self.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.query_migrate().await?;
            if wanted.contains(&stats.status) {
                return Ok(stats);
            }
            if stats.status.is_final() {
                return Err(Error::MigrationEnded {
                    status: stats.status,
                    error_desc: stats.error_desc,
                });
            }
            let tick = tokio::time::sleep(POLL);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::Timeout {
                        what: format!("migration status {wanted:?} (now {:?})", stats.status),
                        timeout,
                    });
                }
                ev = events.recv() => {
                    if let Ok(VmEvent::QmpClosed) = ev {
                        return Err(Error::QmpIo(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "QMP closed while waiting for migration",
                        )));
                    }
                }
                _ = tick => {}
            }
        }
    }

    /// Releases a migration paused in `pre-switchover`: QEMU sends the device state
    /// and the destination starts the guest.
    pub async fn migrate_continue_pre_switchover(&self) -> Result<()> {
        self.qmp()
            .execute(qmp::migrate_continue {
                state: qmp::MigrationStatus::pre_switchover,
            })
            .await?;
        Ok(())
    }

    /// Cancels an outgoing migration; the source guest keeps (or goes back to) running.
    pub async fn migrate_cancel(&self) -> Result<()> {
        self.qmp().execute(qmp::migrate_cancel {}).await?;
        Ok(())
    }

    /// Measures the guest's dirty rate over `period` (QEMU's `calc-dirty-rate`, page
    /// sampling), in bytes/s: the input [`crate::choose_tuning`] needs to decide
    /// whether pre-copy can converge over a link.
    pub async fn measure_dirty_rate(&self, period: Duration) -> Result<u64> {
        let ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
        self.qmp()
            .execute(qmp::calc_dirty_rate {
                calc_time: ms,
                calc_time_unit: Some(qmp::TimeUnit::millisecond),
                mode: None,
                sample_pages: None,
            })
            .await?;
        let timeout = period + Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        loop {
            tokio::time::sleep(POLL.min(period)).await;
            let info = self
                .qmp()
                .execute(qmp::query_dirty_rate {
                    calc_time_unit: None,
                })
                .await?;
            if matches!(info.status, qmp::DirtyRateStatus::measured) {
                // QEMU reports MiB/s.
                return Ok(nn(info.dirty_rate.unwrap_or(0)).saturating_mul(1 << 20));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "dirty rate measurement".into(),
                    timeout,
                });
            }
        }
    }

    /// Switches a running pre-copy to post-copy (needs `postcopy` in the tuning).
    pub async fn migrate_start_postcopy(&self) -> Result<()> {
        self.qmp().execute(qmp::migrate_start_postcopy {}).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for (name, st) in [
            ("pre-switchover", MigrationStatus::PreSwitchover),
            ("postcopy-active", MigrationStatus::PostcopyActive),
            ("completed", MigrationStatus::Completed),
            ("none", MigrationStatus::None),
            ("something-new", MigrationStatus::Unknown),
        ] {
            assert_eq!(MigrationStatus::from_qemu(name), st);
        }
        assert_eq!(
            MigrationStatus::from_qapi(qmp::MigrationStatus::pre_switchover),
            MigrationStatus::PreSwitchover
        );
        assert_eq!(
            serde_json::to_string(&MigrationStatus::PostcopyActive).unwrap(),
            "\"postcopy-active\""
        );
    }

    #[test]
    fn stats_from_qemu_json() {
        // Shape of a real QEMU 10.0 answer (trimmed).
        let j = r#"{"status":"completed","total-time":671,"downtime":18,"setup-time":2,
            "ram":{"transferred":97000000,"remaining":0,"total":268435456,"duplicate":40000,
            "normal":23000,"normal-bytes":94208000,"dirty-pages-rate":0,"mbps":1180.5,
            "dirty-sync-count":3,"postcopy-requests":0,"page-size":4096,"multifd-bytes":0,
            "pages-per-second":36000,"precopy-bytes":96000000,"downtime-bytes":1000000,
            "postcopy-bytes":0,"dirty-sync-missed-zero-copy":0}}"#;
        let info: qmp::MigrationInfo = serde_json::from_str(j).unwrap();
        let s = MigrationStats::from(info);
        assert_eq!(s.status, MigrationStatus::Completed);
        assert_eq!(s.downtime_ms, Some(18));
        let ram = s.ram.unwrap();
        assert_eq!(ram.total, 268_435_456);
        assert_eq!(ram.dirty_sync_count, 3);
        assert!((ram.mbps - 1180.5).abs() < 1e-9);
    }

    #[test]
    fn tuning_validation() {
        let ok = MigrationTuning::default();
        ok.validate().unwrap();
        let mut t = ok.clone();
        t.multifd_channels = Some(4);
        t.postcopy = true;
        assert!(t.validate().is_err());
        t.postcopy = false;
        t.xbzrle = true;
        assert!(t.validate().is_err());
        let mut t = ok.clone();
        t.compression = Compression::Zstd { level: 1 };
        assert!(t.validate().is_err(), "zstd without multifd");
        t.multifd_channels = Some(2);
        t.validate().unwrap();
        t.compression = Compression::Zstd { level: 0 };
        assert!(t.validate().is_err());
    }

    #[test]
    fn tuning_to_qmp_arguments() {
        let t = MigrationTuning {
            multifd_channels: Some(3),
            compression: Compression::Zstd { level: 2 },
            downtime_limit_ms: 120,
            max_bandwidth_bytes_per_s: Some(10_000_000),
            switchover_bandwidth_bytes_per_s: Some(10_000_000),
            ..Default::default()
        };
        let p = serde_json::to_value(t.parameters()).unwrap();
        assert_eq!(p["multifd-channels"], 3);
        assert_eq!(p["multifd-compression"], "zstd");
        assert_eq!(p["multifd-zstd-level"], 2);
        assert_eq!(p["downtime-limit"], 120);
        assert_eq!(p["max-bandwidth"], 10_000_000);
        assert_eq!(p["avail-switchover-bandwidth"], 10_000_000);
        let caps = t.capabilities();
        assert!(caps.contains(&(qmp::MigrationCapability::multifd, true)));
        assert!(caps.contains(&(qmp::MigrationCapability::pause_before_switchover, true)));
        assert!(caps.contains(&(qmp::MigrationCapability::postcopy_ram, false)));
        // Without multifd no multifd parameter is sent at all.
        let p = serde_json::to_value(MigrationTuning::default().parameters()).unwrap();
        assert!(p.get("multifd-channels").is_none());
        assert!(p.get("max-bandwidth").is_none());
    }
}
