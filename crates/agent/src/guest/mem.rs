//! Memory workload: dirties pages of a working set at a configured rate, so
//! that live migration has something to re-send.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;

const PAGE: usize = 4096;
const TICK: Duration = Duration::from_millis(10);

/// Pages to dirty in one tick at `mib_s`, carrying the fractional part.
pub fn pages_this_tick(mib_s: u32, tick: Duration, carry: &mut f64) -> usize {
    let want = mib_s as f64 * (1024.0 * 1024.0 / PAGE as f64) * tick.as_secs_f64() + *carry;
    let n = (want + 1e-9).floor();
    *carry = want - n;
    n as usize
}

pub fn mem_loop(sh: Arc<Shared>) {
    let mut set: Vec<u8> = Vec::new();
    let mut cursor = 0usize;
    let mut carry = 0.0;
    let mut stamp = 0u64;
    let mut next = Instant::now();
    loop {
        next += TICK;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        let cfg = sh.config();
        let want = cfg.mem_working_set_mib as usize * 1024 * 1024;
        if want != set.len() {
            // Zeroed pages are untouched until dirtied; freeing returns them.
            set = vec![0u8; want];
            cursor = 0;
        }
        let pages = set.len() / PAGE;
        if pages == 0 || cfg.mem_dirty_mib_s == 0 {
            carry = 0.0;
            continue;
        }
        for _ in 0..pages_this_tick(cfg.mem_dirty_mib_s, TICK, &mut carry).min(pages) {
            stamp = stamp
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = cursor * PAGE;
            if cfg.mem_incompressible {
                for w in set[at..at + PAGE].chunks_exact_mut(8) {
                    stamp ^= stamp << 13;
                    stamp ^= stamp >> 7;
                    stamp ^= stamp << 17;
                    w.copy_from_slice(&stamp.to_le_bytes());
                }
            } else {
                set[at..at + 8].copy_from_slice(&stamp.to_le_bytes());
            }
            cursor = (cursor + 1) % pages;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_kept_over_many_ticks() {
        let mut carry = 0.0;
        let total: usize = (0..100)
            .map(|_| pages_this_tick(3, Duration::from_millis(10), &mut carry))
            .sum();
        assert_eq!(total, 3 * 256);
        assert_eq!(pages_this_tick(0, Duration::from_millis(10), &mut 0.0), 0);
    }
}
