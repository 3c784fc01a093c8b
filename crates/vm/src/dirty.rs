//! How fast the guest rewrites its RAM, and how well what it writes compresses: the
//! figure that decides whether a compressed pre-copy can converge over a link.
//!
//! QEMU's `calc-dirty-rate` counts rewritten pages but says nothing of their content,
//! while multifd+zstd sends each rewritten page compressed: a guest that rewrites
//! 30 MB/s of mostly-zero pages converges easily on a 12 MB/s link, one that rewrites
//! 10 MB/s of random data does not. So roam also reads a sample of guest RAM twice
//! (QMP `pmemsave` of a few 64 KiB ranges, `period` apart) and compresses the pages
//! that changed in between, at the level roam's tuning would use.
//!
//! ```text
//!   t0: pmemsave 64 × 64 KiB ─┐            calc-dirty-rate (QEMU, page sampling)
//!   t0+period: same ranges ───┴─ changed pages ─▶ zstd ─▶ ratio     ─▶ bytes/s
//!                                      DirtyEstimate { dirty_bytes_per_s, zstd_ratio }
//! ```

use std::path::Path;
use std::time::Duration;

use qapi::qmp;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::vm::Vm;

const PAGE: usize = 4096;
/// Sampled ranges and their size: 4 MiB read twice, about 130 QMP round trips.
pub const SAMPLE_RANGES: usize = 64;
pub const RANGE_BYTES: u64 = 64 * 1024;
/// Below this: real-mode memory, VGA and option ROMs, not the guest's working set.
const LOW_SKIP: u64 = 1 << 20;
/// Sampled only below this: under 2 GiB, guest RAM is contiguous from 0 on every
/// machine type roam starts (the PCI hole lies above).
const HIGH_LIMIT: u64 = 2 << 30;

/// The guest's RAM write rate, raw and as a zstd pre-copy would send it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyEstimate {
    /// Guest RAM rewritten per second (QEMU's page sampling).
    pub dirty_bytes_per_s: u64,
    /// Compressed size over raw size of the sampled pages that changed (1.0 =
    /// incompressible); `None` when none of them changed.
    pub zstd_ratio: Option<f64>,
    /// Pages sampled, and how many changed.
    pub sampled_pages: u64,
    pub changed_pages: u64,
}

impl DirtyEstimate {
    /// Bytes per second a compressed pre-copy has to re-send.
    pub fn compressed_bytes_per_s(&self) -> u64 {
        (self.dirty_bytes_per_s as f64 * self.zstd_ratio.unwrap_or(1.0)) as u64
    }
}

/// `n` ranges of [`RANGE_BYTES`], aligned, spread over the guest's low RAM, drawn from
/// `seed`. Pure, so the choice is testable.
pub fn sample_ranges(ram_bytes: u64, n: usize, mut seed: u64) -> Vec<u64> {
    let top = ram_bytes.min(HIGH_LIMIT);
    let slots = top.saturating_sub(LOW_SKIP) / RANGE_BYTES;
    if slots == 0 {
        return Vec::new();
    }
    let mut out: Vec<u64> = (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            LOW_SKIP + (seed % slots) * RANGE_BYTES
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Appends to `changed` every page of `after` that differs from `before`; returns
/// the number of pages compared.
pub fn changed_pages(before: &[u8], after: &[u8], changed: &mut Vec<u8>) -> u64 {
    let mut pages = 0;
    for (b, a) in before.chunks(PAGE).zip(after.chunks(PAGE)) {
        pages += 1;
        if a != b {
            changed.extend_from_slice(a);
        }
    }
    pages
}

/// Compressed over raw size of `data` at zstd `level`, page by page groups of 64 KiB
/// as multifd sends them; `None` for no data.
pub fn zstd_ratio(data: &[u8], level: i32) -> Option<f64> {
    if data.is_empty() {
        return None;
    }
    let packed: usize = data
        .chunks(16 * PAGE)
        .map(|c| zstd::bulk::compress(c, level).map_or(c.len(), |z| z.len().min(c.len())))
        .sum();
    Some(packed as f64 / data.len() as f64)
}

impl Vm {
    /// Reads `RANGE_BYTES` of guest-physical memory at `addr` (QMP `pmemsave` into a
    /// file under `scratch`, read back and removed).
    async fn read_guest(&self, addr: u64, scratch: &Path, tag: &str) -> Result<Vec<u8>> {
        let path = scratch.join(format!("ram-sample-{tag}-{addr:x}"));
        self.qmp()
            .execute(qmp::pmemsave {
                val: addr,
                size: RANGE_BYTES,
                filename: path.display().to_string(),
            })
            .await?;
        let data = tokio::fs::read(&path)
            .await
            .map_err(|source| Error::QemuFile {
                path: path.clone(),
                source,
            });
        let _ = tokio::fs::remove_file(&path).await;
        data
    }

    /// Estimates the guest's dirty rate and the compressibility of what it writes,
    /// over `period` (see the module doc). `ram_bytes` is the guest's memory size;
    /// `scratch` a directory QEMU may write the samples to; `level` the zstd level the
    /// tuning would use.
    pub async fn estimate_dirty(
        &self,
        period: Duration,
        ram_bytes: u64,
        scratch: &Path,
        level: i32,
    ) -> Result<DirtyEstimate> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
            | 1;
        let ranges = sample_ranges(ram_bytes, SAMPLE_RANGES, seed);
        let mut before = Vec::with_capacity(ranges.len());
        for &a in &ranges {
            before.push(self.read_guest(a, scratch, "a").await?);
        }
        // QEMU's count runs over the same period as our second look.
        let rate = self.measure_dirty_rate(period).await?;
        let (mut changed, mut sampled) = (Vec::new(), 0);
        for (&a, b) in ranges.iter().zip(&before) {
            let after = self.read_guest(a, scratch, "b").await?;
            sampled += changed_pages(b, &after, &mut changed);
        }
        Ok(DirtyEstimate {
            dirty_bytes_per_s: rate,
            zstd_ratio: zstd_ratio(&changed, level),
            sampled_pages: sampled,
            changed_pages: (changed.len() / PAGE) as u64,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_stay_in_low_ram_aligned_and_distinct() {
        let r = sample_ranges(256 << 20, 64, 12345);
        assert!(!r.is_empty() && r.len() <= 64);
        assert!(r.windows(2).all(|w| w[0] < w[1]));
        for a in &r {
            assert_eq!(a % RANGE_BYTES, 0);
            assert!(*a >= LOW_SKIP && a + RANGE_BYTES <= 256 << 20, "{a:#x}");
        }
        let big = sample_ranges(64 << 30, 64, 7);
        assert!(big.iter().all(|a| a + RANGE_BYTES <= HIGH_LIMIT));
        assert!(
            sample_ranges(1 << 20, 8, 1).is_empty(),
            "no RAM above the skip"
        );
    }

    #[test]
    fn only_changed_pages_are_kept_and_compressibility_follows_content() {
        let before = vec![0u8; 4 * PAGE];
        let mut after = before.clone();
        after[PAGE + 3] = 1; // page 1 changed, nearly all zero
        let mut x = 1u64;
        for b in &mut after[3 * PAGE..] {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8; // page 3: random
        }
        let mut changed = Vec::new();
        assert_eq!(changed_pages(&before, &after, &mut changed), 4);
        assert_eq!(changed.len(), 2 * PAGE);
        let sparse = zstd_ratio(&changed[..PAGE], 3).unwrap();
        let random = zstd_ratio(&changed[PAGE..], 3).unwrap();
        assert!(sparse < 0.05, "{sparse}");
        assert!(random > 0.95, "{random}");
        assert_eq!(zstd_ratio(&[], 3), None);
        let e = DirtyEstimate {
            dirty_bytes_per_s: 1000,
            zstd_ratio: Some(0.25),
            sampled_pages: 4,
            changed_pages: 2,
        };
        assert_eq!(e.compressed_bytes_per_s(), 250);
    }
}
