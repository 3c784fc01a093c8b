//! zstd level from link speed against CPU cost, as a pure function.
//!
//! Sending one byte of disk costs wire time `1 / (ratio(L) × link)` and compression time
//! `1 / speed(L)`. The CPU is shared with the guests (and the chunks are compressed on one
//! blocking thread), so a core-second is worth about as much as a link-second: the level
//! chosen minimises `wire + cpu_weight × cpu` per byte. With the reference table below
//! (single-core zstd on a ~3 GHz x86 over mixed OS/disk data) the choice is:
//!
//! | link (Mbit/s) | > 130 | 32–130 | 13–32 | 5–13 | 1–5 | < 1 |
//! |---------------|-------|--------|-------|------|-----|-----|
//! | level         | 1     | 3      | 6     | 9    | 12  | 15  |
//!
//! Above ~130 Mbit/s compression time is the cost that matters (level 3 would save 5 % of
//! the bytes for 1.7× the CPU); on slow links each saved percent is worth milliseconds of
//! link per chunk.
//!
//! `cpu_speed` scales the table to the host (measure level 1 on a sample chunk and divide
//! by 500 MB/s); a slower CPU pushes towards lower levels, a faster one towards higher.

/// (level, compression speed in MB/s on the reference core, compression ratio).
const TABLE: [(i32, f64, f64); 6] = [
    (1, 500.0, 2.10),
    (3, 300.0, 2.20),
    (6, 120.0, 2.30),
    (9, 65.0, 2.36),
    (12, 30.0, 2.42),
    (15, 12.0, 2.46),
];

/// Inputs of the choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelInput {
    /// Link capacity available to this transfer, bits per second.
    pub link_bps: f64,
    /// This host's zstd speed relative to the reference core (1.0 = 500 MB/s at level 1).
    pub cpu_speed: f64,
    /// Worth of a CPU-second against a link-second (1.0 by default; higher when the
    /// guests need the CPU, lower on an idle host).
    pub cpu_weight: f64,
}

impl LevelInput {
    pub fn link(link_bps: f64) -> LevelInput {
        LevelInput {
            link_bps,
            cpu_speed: 1.0,
            cpu_weight: 1.0,
        }
    }
}

/// Estimated seconds per MB of input at `level`'s table row.
fn cost(row: &(i32, f64, f64), i: &LevelInput) -> f64 {
    let (_, speed, ratio) = *row;
    let link_mbs = i.link_bps / 8e6;
    1.0 / (ratio * link_mbs) + i.cpu_weight / (speed * i.cpu_speed)
}

/// zstd's own default level: what [`choose_level`] answers when it knows nothing.
pub const DEFAULT_LEVEL: i32 = 3;

/// The zstd level to use. Nonsense inputs (zero, negative, NaN) fall back to
/// [`DEFAULT_LEVEL`].
pub fn choose_level(i: LevelInput) -> i32 {
    let sane = |x: f64| x.is_finite() && x > 0.0;
    if !(sane(i.link_bps) && sane(i.cpu_speed) && i.cpu_weight.is_finite() && i.cpu_weight >= 0.0) {
        return DEFAULT_LEVEL;
    }
    let mut best = TABLE[0];
    for row in &TABLE[1..] {
        if cost(row, &i) < cost(&best, &i) {
            best = *row;
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MBIT: f64 = 1e6;

    #[test]
    fn anchors() {
        assert_eq!(choose_level(LevelInput::link(10_000.0 * MBIT)), 1);
        assert_eq!(choose_level(LevelInput::link(1_000.0 * MBIT)), 1);
        assert_eq!(choose_level(LevelInput::link(400.0 * MBIT)), 1);
        assert_eq!(choose_level(LevelInput::link(100.0 * MBIT)), 3);
        assert!(choose_level(LevelInput::link(20.0 * MBIT)) >= 6);
        assert!(choose_level(LevelInput::link(5.0 * MBIT)) >= 9);
        assert!(choose_level(LevelInput::link(0.5 * MBIT)) >= 12);
    }

    #[test]
    fn cpu_matters() {
        let slow = LevelInput {
            cpu_speed: 0.2,
            ..LevelInput::link(100.0 * MBIT)
        };
        assert_eq!(
            choose_level(slow),
            1,
            "a slow CPU on a fast-ish link: level 1"
        );
        let idle = LevelInput {
            cpu_weight: 0.1,
            ..LevelInput::link(100.0 * MBIT)
        };
        assert!(
            choose_level(idle) > 3,
            "an idle host spends CPU to save link"
        );
    }

    #[test]
    fn nonsense_falls_back() {
        assert_eq!(choose_level(LevelInput::link(0.0)), 3);
        assert_eq!(choose_level(LevelInput::link(f64::NAN)), 3);
        assert_eq!(
            choose_level(LevelInput {
                cpu_speed: -1.0,
                ..LevelInput::link(MBIT)
            }),
            3
        );
    }

    proptest! {
        #[test]
        fn monotone_in_link_speed(a in 0.1f64..20_000.0, b in 0.1f64..20_000.0, w in 0.05f64..5.0, s in 0.1f64..4.0) {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let i = |l: f64| LevelInput { link_bps: l * MBIT, cpu_speed: s, cpu_weight: w };
            prop_assert!(choose_level(i(lo)) >= choose_level(i(hi)), "slower link never gets a lower level");
        }

        #[test]
        fn always_a_table_level(l in any::<f64>(), s in any::<f64>(), w in any::<f64>()) {
            let lv = choose_level(LevelInput { link_bps: l, cpu_speed: s, cpu_weight: w });
            prop_assert!(TABLE.iter().any(|r| r.0 == lv));
        }
    }
}
