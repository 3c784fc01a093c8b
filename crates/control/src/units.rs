//! Sizes and durations as people type and read them: `512M`, `2G`, `1.5GiB`, `8 GiB`.
//!
//! Suffixes are binary multiples, as in QEMU (`K`=1024, `M`=1024², `G`, `T`), with or
//! without `iB`/`B`, any case. A bare number is bytes.

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with a known unit.
    #[error("expected a size such as 512M or 2G")]
    Syntax,
    /// More than 2^64 - 1 bytes, or a fraction of a byte.
    #[error("size out of range")]
    Range,
}

/// Parses a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Syntax),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(SizeError::Syntax);
    }
    // Fixed-point: value = (int.frac) << shift, computed exactly in u128.
    let digits = format!("{int}{frac}");
    if digits.len() > 30 {
        return Err(SizeError::Range);
    }
    let mantissa: u128 = digits.parse().map_err(|_| SizeError::Syntax)?;
    let scale = 10u128.pow(frac.len() as u32);
    let scaled = mantissa << shift;
    if !scaled.is_multiple_of(scale) {
        return Err(SizeError::Range);
    }
    u64::try_from(scaled / scale).map_err(|_| SizeError::Range)
}

/// Formats bytes with a binary unit and up to one decimal: `0 B`, `512 B`, `1.5 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = n as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 100.0 || v.fract() < 0.05 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Formats milliseconds for people: `850 ms`, `12.3 s`, `4m05s`.
pub fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        let s = ms / 1000;
        if s < 3600 {
            format!("{}m{:02}s", s / 60, s % 60)
        } else {
            format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
        }
    }
}

/// A Unix time (seconds) as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_unix_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("8 GB"), Ok(8 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(".5K"), Ok(512));
    }

    #[test]
    fn bad_sizes() {
        for s in ["", "1X", "G", "1.2.3G", "-1G", "1 G B", "abc", "1e3"] {
            assert_eq!(parse_size(s), Err(SizeError::Syntax), "{s:?}");
        }
        assert_eq!(parse_size("0.1"), Err(SizeError::Range));
        assert_eq!(parse_size("16777216T"), Err(SizeError::Range));
        assert_eq!(
            parse_size("99999999999999999999999999999999999"),
            Err(SizeError::Range)
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(8 << 30), "8 GiB");
        assert_eq!(format_bytes(300 << 20), "300 MiB");
        assert_eq!(format_ms(850), "850 ms");
        assert_eq!(format_ms(12_345), "12.3 s");
        assert_eq!(format_ms(245_000), "4m05s");
        assert_eq!(format_unix_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_unix_utc(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29 00:00:00");
    }
}
