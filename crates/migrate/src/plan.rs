//! When to stop iterating on the disk and hand over to QEMU's memory migration.
//!
//! The disk copy runs while the guest writes, so each round resends what changed during
//! the previous one. We stop when what remains would fit in a small fraction of the
//! downtime budget at the measured rate, when rounds stop shrinking (the guest writes as
//! fast as we send), or after a bounded number of rounds. Whatever is dirty then keeps
//! flowing in the background during the memory copy, and the last bit is sent while the
//! guest is paused at pre-switchover.

/// Rate and budget observed so far.
#[derive(Debug, Clone, Copy)]
pub struct RoundStats {
    pub round: u32,
    /// Dirty bytes found at the start of this round.
    pub dirty_bytes: u64,
    /// Dirty bytes of the previous round (None for the first iteration after the bulk copy).
    pub previous_dirty_bytes: Option<u64>,
    /// Measured payload rate on the link, bytes per second.
    pub rate_bytes_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send this round and look again.
    Iterate,
    /// Good enough: start the memory copy.
    StartMemory,
}

/// Rounds after the bulk copy before we give up waiting for the disk to converge.
pub const MAX_ROUNDS: u32 = 8;

/// Decide after counting a round's dirty bytes. `budget_ms` is the share of the downtime
/// the final disk sync may take.
pub fn decide(s: RoundStats, budget_ms: u64) -> Decision {
    let rate = s.rate_bytes_per_s.max(1.0);
    let ms_needed = s.dirty_bytes as f64 / rate * 1000.0;
    if ms_needed <= budget_ms as f64 {
        return Decision::StartMemory;
    }
    if s.round >= MAX_ROUNDS {
        return Decision::StartMemory;
    }
    if let Some(prev) = s.previous_dirty_bytes {
        // Not shrinking by at least a quarter: the guest writes about as fast as we send.
        if s.dirty_bytes * 4 > prev * 3 && s.round >= 2 {
            return Decision::StartMemory;
        }
    }
    Decision::Iterate
}

/// Estimated time left, for progress bars: bytes still to send over the measured rate.
pub fn eta_ms(remaining_bytes: u64, rate_bytes_per_s: f64) -> Option<u64> {
    if rate_bytes_per_s < 1.0 {
        return None;
    }
    Some((remaining_bytes as f64 / rate_bytes_per_s * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(round: u32, dirty: u64, prev: Option<u64>) -> RoundStats {
        RoundStats {
            round,
            dirty_bytes: dirty,
            previous_dirty_bytes: prev,
            rate_bytes_per_s: 10e6,
        }
    }

    #[test]
    fn small_remainder_starts_memory() {
        assert_eq!(decide(s(1, 100_000, None), 50), Decision::StartMemory);
    }

    #[test]
    fn large_shrinking_remainder_iterates() {
        assert_eq!(decide(s(1, 50_000_000, None), 50), Decision::Iterate);
        assert_eq!(
            decide(s(2, 10_000_000, Some(50_000_000)), 50),
            Decision::Iterate
        );
    }

    #[test]
    fn stalled_or_too_many_rounds_stops() {
        assert_eq!(
            decide(s(3, 9_000_000, Some(10_000_000)), 50),
            Decision::StartMemory
        );
        assert_eq!(
            decide(s(MAX_ROUNDS, 50_000_000, None), 50),
            Decision::StartMemory
        );
    }

    #[test]
    fn eta() {
        assert_eq!(eta_ms(10_000_000, 10e6), Some(1000));
        assert_eq!(eta_ms(1, 0.0), None);
    }
}
