//! Choosing QEMU's migration knobs from the measured link.
//!
//! A pure function ([`choose_tuning`]) so the rules can be read, tested and argued
//! about without a VM. The figures come from roamd's link probe (bandwidth, RTT) and
//! the host (CPUs, accelerator); the dirty rate is optional (QEMU's `calc-dirty-rate`
//! or a previous attempt).

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::migration::{Compression, MigrationTuning, RamStats};

/// The downtime a person or a TCP peer should not notice; everything roam adds to
/// QEMU's own stop-and-copy time has to fit in it too.
pub const DOWNTIME_BUDGET_MS: u64 = 300;

/// QEMU's downtime limit is never set below this: lower values barely shorten the
/// pause but make pre-copy converge much later (or never) on a slow link.
pub const MIN_DOWNTIME_LIMIT_MS: u64 = 50;

/// Fixed switchover work outside QEMU's stop-and-copy: final disk sync bookkeeping,
/// destination device load and activation, the locator update on the wire.
pub const SWITCHOVER_OVERHEAD_MS: u64 = 30;

/// Conservative zstd input rate per multifd channel (one core, level 1-3, on guest
/// RAM pages). Real cores do more; being low only makes roam add a channel.
pub const ZSTD_BYTES_PER_S_PER_CHANNEL: u64 = 200_000_000;

/// Rate one uncompressed migration stream sustains before multifd helps.
pub const SINGLE_STREAM_BYTES_PER_S: u64 = 300_000_000;

/// Upper bound on multifd channels (each is one more relayed connection).
pub const MAX_MULTIFD_CHANNELS: u8 = 8;

/// What roam measured about the path and the host before migrating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkFigures {
    /// Measured goodput of the host-to-host channel, bytes/s.
    pub bandwidth_bytes_per_s: u64,
    /// Round-trip time, ms.
    pub rtt_ms: u64,
    /// CPUs of the source host.
    pub host_cpus: u16,
    /// Accelerator the guest runs with (TCG vCPUs eat host CPU).
    pub accel: Accel,
    /// Guest dirty rate, bytes/s, if known.
    pub dirty_bytes_per_s: Option<u64>,
    /// Compressed over raw size of what the guest writes ([`crate::DirtyEstimate`]), if
    /// known: a zstd pre-copy re-sends `dirty × ratio` bytes per second.
    #[serde(default)]
    pub dirty_zstd_ratio: Option<f64>,
}

/// Chooses the migration tuning for a link. The rules, and why:
///
/// * **max-bandwidth = measured link rate.** QEMU writes into roamd's local relay
///   socket, not the WAN. Uncapped, it fills the relay's buffers, measures a rate the
///   WAN does not have, and switches over with far more data in flight than its
///   downtime limit allows. Capped at the link rate, the socket stays drained and
///   QEMU's estimate is honest. `avail-switchover-bandwidth` gets the same figure, so
///   the final-copy estimate uses the WAN rate too.
/// * **downtime-limit = budget − 1.5 RTT − overhead**, clamped to
///   [`MIN_DOWNTIME_LIMIT_MS`]..=[`DOWNTIME_BUDGET_MS`]. The guest is already stopped
///   at pre-switchover; roamd then confirms the disk with the destination (one RTT),
///   and the last bytes need half an RTT to arrive. QEMU's limit only bounds the copy
///   time, so the rest is subtracted to keep the *seen* pause under ~300 ms.
/// * **multifd + zstd when the link is slow relative to the CPUs.** If the CPUs can
///   compress faster than about twice the link rate (typical RAM compresses 2-3×),
///   compression cuts the bytes, and so the time, for free. Channels =
///   enough zstd cores to feed twice the link rate, at least 1, at most the spare
///   CPUs (all of them with KVM; half with TCG, whose vCPUs are busy host threads).
///   Level 3 on links under 25 MB/s (ratio matters more than CPU there), else 1.
/// * **Uncompressed multifd** on links faster than one stream carries
///   ([`SINGLE_STREAM_BYTES_PER_S`]) when compression would not keep up.
/// * **Post-copy only where pre-copy cannot converge** (known dirty rate ≥ 80% of
///   the link; with zstd, the dirty rate times its measured compression ratio). QEMU 10.0 cannot combine post-copy with multifd, so that case is a
///   single stream; each post-copy page fault costs an RTT and a link failure during
///   post-copy leaves the guest split between hosts, so it is not the default.
///   Otherwise `postcopy-ram` is still enabled when multifd is off, so roamd can
///   switch to post-copy mid-way if pre-copy stalls. With `--postcopy` roamd forces
///   it on ([`MigrationTuning::with_postcopy_ram`]) and switches when
///   [`PrecopyStall`] says the passes stopped shrinking.
/// * **pause-before-switchover always** (storage sync at switchover); **no xbzrle**
///   (incompatible with multifd, and zstd on multifd already shrinks re-sent pages).
pub fn choose_tuning(l: &LinkFigures) -> MigrationTuning {
    let bw = l.bandwidth_bytes_per_s.max(1_000_000);
    let downtime_limit_ms = DOWNTIME_BUDGET_MS
        .saturating_sub(l.rtt_ms.saturating_mul(3) / 2)
        .saturating_sub(SWITCHOVER_OVERHEAD_MS)
        .clamp(MIN_DOWNTIME_LIMIT_MS, DOWNTIME_BUDGET_MS);

    let spare_cpus = match l.accel {
        Accel::Kvm => u64::from(l.host_cpus),
        Accel::Tcg => u64::from(l.host_cpus) / 2,
    }
    .clamp(1, u64::from(MAX_MULTIFD_CHANNELS));

    let needed_zstd = bw.saturating_mul(2).div_ceil(ZSTD_BYTES_PER_S_PER_CHANNEL);
    let zstd = needed_zstd <= spare_cpus;
    let resent = l.dirty_bytes_per_s.map(|d| match l.dirty_zstd_ratio {
        Some(r) if zstd => (d as f64 * r.clamp(0.0, 1.0)) as u64,
        _ => d,
    });
    let non_converging = resent.is_some_and(|d| d.saturating_mul(10) >= bw.saturating_mul(8));

    let mut t = MigrationTuning {
        downtime_limit_ms,
        max_bandwidth_bytes_per_s: Some(bw),
        switchover_bandwidth_bytes_per_s: Some(bw),
        pause_before_switchover: true,
        ..MigrationTuning::default()
    };

    if non_converging {
        t.postcopy = true;
        return t;
    }

    if zstd {
        let channels = needed_zstd.max(1);
        t.multifd_channels = Some(channels as u8);
        let level = if bw < 25_000_000 { 3 } else { 1 };
        t.compression = Compression::Zstd { level };
    } else if bw > SINGLE_STREAM_BYTES_PER_S {
        let channels = bw
            .div_ceil(SINGLE_STREAM_BYTES_PER_S)
            .clamp(2, spare_cpus.max(2));
        t.multifd_channels = Some(channels.min(u64::from(MAX_MULTIFD_CHANNELS)) as u8);
    } else {
        t.postcopy = true;
    }
    t
}

/// Decides when a running pre-copy has stalled, so that roamd may switch it to
/// post-copy (`migrate-start-postcopy`). Fed every `query-migrate` answer; pure, so the
/// rule is testable without a VM.
///
/// The rule: QEMU's dirty set is re-read once per pass (`dirty_sync_count` steps),
/// and `remaining` right after a sync is what the next pass has to send. Pass 1 is
/// the bulk copy; from pass 2 on, a pass whose `remaining` is not at least 10 %
/// below the best seen so far did not bring the switchover closer. Two such passes
/// in a row, and pre-copy will not converge at this dirty rate over this link:
/// waiting longer only re-sends the same pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrecopyStall {
    last_sync: u64,
    best_remaining: Option<u64>,
    stalled_passes: u32,
}

/// Passes without progress before [`PrecopyStall`] calls the pre-copy stalled.
pub const STALLED_PASSES: u32 = 2;

impl PrecopyStall {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one `query-migrate` RAM figure set; true once pre-copy is stalled.
    pub fn observe(&mut self, ram: &RamStats) -> bool {
        if ram.dirty_sync_count != self.last_sync {
            self.last_sync = ram.dirty_sync_count;
            if ram.dirty_sync_count >= 2 {
                match self.best_remaining {
                    Some(best) if ram.remaining.saturating_mul(10) >= best.saturating_mul(9) => {
                        self.stalled_passes += 1;
                    }
                    _ => self.stalled_passes = 0,
                }
                self.best_remaining = Some(
                    self.best_remaining
                        .map_or(ram.remaining, |b| b.min(ram.remaining)),
                );
            }
        }
        self.stalled_passes >= STALLED_PASSES
    }

    /// Passes in a row that did not shrink the remaining bytes.
    pub fn stalled_passes(&self) -> u32 {
        self.stalled_passes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(sync: u64, remaining: u64) -> RamStats {
        RamStats {
            transferred: 0,
            remaining,
            total: 1 << 28,
            duplicate_pages: 0,
            normal_pages: 0,
            normal_bytes: 0,
            dirty_pages_rate: 0,
            mbps: 0.0,
            dirty_sync_count: sync,
            postcopy_requests: 0,
            page_size: 4096,
            multifd_bytes: 0,
            pages_per_second: 0,
            precopy_bytes: 0,
            downtime_bytes: 0,
            postcopy_bytes: 0,
        }
    }

    #[test]
    fn stall_needs_two_passes_without_progress() {
        let mut s = PrecopyStall::new();
        // The bulk pass: remaining falls, never a stall.
        for rem in [200 << 20, 100 << 20, 10 << 20] {
            assert!(!s.observe(&ram(1, rem)));
        }
        assert!(!s.observe(&ram(2, 30 << 20)));
        // Samples within one pass do not count as passes.
        assert!(!s.observe(&ram(2, 29 << 20)));
        assert!(!s.observe(&ram(3, 29 << 20)));
        assert_eq!(s.stalled_passes(), 1);
        assert!(s.observe(&ram(4, 31 << 20)));
    }

    #[test]
    fn converging_precopy_never_stalls() {
        let mut s = PrecopyStall::new();
        let mut rem = 64u64 << 20;
        for sync in 1..20 {
            assert!(!s.observe(&ram(sync, rem)), "pass {sync}");
            rem = rem * 8 / 10;
        }
        // Progress resets the count.
        let mut s = PrecopyStall::new();
        assert!(!s.observe(&ram(2, 30 << 20)));
        assert!(!s.observe(&ram(3, 30 << 20)));
        assert!(!s.observe(&ram(4, 20 << 20)));
        assert!(!s.observe(&ram(5, 20 << 20)));
        assert!(s.observe(&ram(6, 20 << 20)));
    }

    #[test]
    fn postcopy_ram_drops_multifd() {
        let t = choose_tuning(&link(50, 40, 4, Accel::Kvm)).with_postcopy_ram();
        t.validate().unwrap();
        assert!(t.postcopy && t.pause_before_switchover);
        assert_eq!(t.multifd_channels, None);
        assert_eq!(t.compression, Compression::None);
        assert_eq!(t.max_bandwidth_bytes_per_s, Some(6_250_000));
    }

    fn link(mbit: u64, rtt_ms: u64, cpus: u16, accel: Accel) -> LinkFigures {
        LinkFigures {
            bandwidth_bytes_per_s: mbit * 1_000_000 / 8,
            rtt_ms,
            host_cpus: cpus,
            accel,
            dirty_bytes_per_s: None,
            dirty_zstd_ratio: None,
        }
    }

    #[test]
    fn slow_wan_gets_zstd_multifd_and_capped_bandwidth() {
        let t = choose_tuning(&link(50, 40, 4, Accel::Kvm));
        t.validate().unwrap();
        assert_eq!(t.multifd_channels, Some(1));
        assert_eq!(t.compression, Compression::Zstd { level: 3 });
        assert_eq!(t.max_bandwidth_bytes_per_s, Some(6_250_000));
        assert_eq!(t.switchover_bandwidth_bytes_per_s, Some(6_250_000));
        assert_eq!(t.downtime_limit_ms, 300 - 60 - 30);
        assert!(t.pause_before_switchover && !t.postcopy && !t.xbzrle);
    }

    #[test]
    fn gigabit_uses_level_one_and_more_channels() {
        let t = choose_tuning(&link(1000, 10, 8, Accel::Kvm));
        t.validate().unwrap();
        assert_eq!(t.compression, Compression::Zstd { level: 1 });
        // 2 × 125 MB/s over 200 MB/s per channel = 2 channels.
        assert_eq!(t.multifd_channels, Some(2));
        assert_eq!(t.downtime_limit_ms, 255);
    }

    #[test]
    fn fast_link_few_cpus_goes_uncompressed_multifd() {
        // 10 Gbit/s needs 13 zstd channels; a 4-CPU host has not got them.
        let t = choose_tuning(&link(10_000, 1, 4, Accel::Kvm));
        t.validate().unwrap();
        assert_eq!(t.compression, Compression::None);
        assert_eq!(t.multifd_channels, Some(4));
        assert_eq!(t.downtime_limit_ms, 269);
    }

    #[test]
    fn tcg_on_two_cores_still_compresses_slow_links() {
        let t = choose_tuning(&link(20, 100, 2, Accel::Tcg));
        t.validate().unwrap();
        assert_eq!(t.multifd_channels, Some(1));
        assert_eq!(t.compression, Compression::Zstd { level: 3 });
        assert_eq!(t.downtime_limit_ms, 120);
    }

    #[test]
    fn medium_link_without_spare_cpu_is_single_stream_with_postcopy_fallback() {
        // 2 Gbit/s = 250 MB/s needs 3 zstd channels; TCG on 2 CPUs leaves 1.
        let t = choose_tuning(&link(2_000, 5, 2, Accel::Tcg));
        t.validate().unwrap();
        assert_eq!(t.multifd_channels, None);
        assert!(t.postcopy);
    }

    #[test]
    fn long_rtt_clamps_downtime_limit() {
        let t = choose_tuning(&link(100, 200, 4, Accel::Kvm));
        assert_eq!(t.downtime_limit_ms, MIN_DOWNTIME_LIMIT_MS);
        let t = choose_tuning(&link(100, 0, 4, Accel::Kvm));
        assert_eq!(
            t.downtime_limit_ms,
            DOWNTIME_BUDGET_MS - SWITCHOVER_OVERHEAD_MS
        );
    }

    #[test]
    fn dirty_faster_than_link_chooses_postcopy_single_stream() {
        let mut l = link(100, 20, 8, Accel::Kvm);
        l.dirty_bytes_per_s = Some(11_000_000); // 88% of 12.5 MB/s
        let t = choose_tuning(&l);
        t.validate().unwrap();
        assert!(t.postcopy);
        assert_eq!(t.multifd_channels, None);
        assert_eq!(t.compression, Compression::None);
        l.dirty_bytes_per_s = Some(1_000_000);
        assert!(!choose_tuning(&l).postcopy);
        // 30 MB/s of pages that zstd shrinks to a tenth: 3 MB/s crosses, it converges.
        l.dirty_bytes_per_s = Some(30_000_000);
        l.dirty_zstd_ratio = Some(0.1);
        let t = choose_tuning(&l);
        assert!(!t.postcopy, "{t:?}");
        assert!(matches!(t.compression, Compression::Zstd { .. }));
        l.dirty_zstd_ratio = Some(0.5);
        assert!(choose_tuning(&l).postcopy, "15 MB/s does not fit in 12.5");
    }

    #[test]
    fn every_choice_is_valid_for_qemu() {
        for mbit in [1, 10, 50, 100, 400, 1000, 2500, 10_000, 40_000] {
            for rtt in [0, 10, 50, 200, 1000] {
                for cpus in [1, 2, 4, 16, 64] {
                    for accel in [Accel::Kvm, Accel::Tcg] {
                        let t = choose_tuning(&link(mbit, rtt, cpus, accel));
                        t.validate().unwrap();
                        assert!(t.multifd_channels.unwrap_or(1) <= MAX_MULTIFD_CHANNELS);
                        assert!(t.downtime_limit_ms >= MIN_DOWNTIME_LIMIT_MS);
                    }
                }
            }
        }
    }
}
