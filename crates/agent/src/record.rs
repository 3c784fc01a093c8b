//! The 4 KiB log record the agent writes to the raw log region of its disk,
//! and a host-side checker that reads a disk image directly.
//!
//! ```text
//!  offset  size  field
//!       0     8  magic "ROAMLOG1"
//!       8     4  format version (1, LE)
//!      12     4  reserved, 0
//!      16    16  boot id (u128 LE)
//!      32     8  seq (u64 LE)
//!      40  4048  payload: splitmix64 stream seeded from (boot id, seq)
//!    4088     8  sum: first 8 bytes of BLAKE3(bytes 0..4088), LE
//! ```
//! Record `seq` lives at `log.offset + (seq % log.slots()) * 4096`. A record is
//! a pure function of (boot id, seq), so rewriting one is idempotent and the
//! host can recompute the `sum` it was acked.

use std::os::unix::fs::FileExt;

use crate::proto::{BootId, LogRegion};

pub const RECORD_SIZE: usize = 4096;
pub const RECORD_MAGIC: [u8; 8] = *b"ROAMLOG1";
pub const RECORD_VERSION: u32 = 1;
const PAYLOAD: std::ops::Range<usize> = 40..4088;

/// What one slot holds, compared with the record expected there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    Ok,
    /// No magic: never written (or zeroed).
    Missing,
    /// A record, but not the expected one or corrupt.
    Bad(BadRecord),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRecord {
    Version,
    BootId,
    Seq(u64),
    Checksum,
    Payload,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_payload(boot_id: BootId, seq: u64, out: &mut [u8]) {
    let mut st = (boot_id.0 as u64) ^ ((boot_id.0 >> 64) as u64).rotate_left(17) ^ seq;
    for chunk in out.chunks_mut(8) {
        let v = splitmix(&mut st).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn checksum(rec: &[u8]) -> u64 {
    let h = blake3::hash(&rec[..PAYLOAD.end]);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Writes the record for (boot id, seq) into `out` and returns its sum.
pub fn encode_record(boot_id: BootId, seq: u64, out: &mut [u8]) -> u64 {
    assert!(out.len() >= RECORD_SIZE, "record buffer too small");
    let out = &mut out[..RECORD_SIZE];
    out[0..8].copy_from_slice(&RECORD_MAGIC);
    out[8..12].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    out[12..16].fill(0);
    out[16..32].copy_from_slice(&boot_id.0.to_le_bytes());
    out[32..40].copy_from_slice(&seq.to_le_bytes());
    fill_payload(boot_id, seq, &mut out[PAYLOAD]);
    let sum = checksum(out);
    out[PAYLOAD.end..].copy_from_slice(&sum.to_le_bytes());
    sum
}

/// The sum the agent acks for (boot id, seq).
pub fn expected_sum(boot_id: BootId, seq: u64) -> u64 {
    let mut buf = [0u8; RECORD_SIZE];
    encode_record(boot_id, seq, &mut buf)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Checks a slot's bytes against the record (boot id, seq).
pub fn check_record(buf: &[u8], boot_id: BootId, seq: u64) -> RecordState {
    if buf.len() < RECORD_SIZE || buf[0..8] != RECORD_MAGIC {
        return RecordState::Missing;
    }
    if buf[8..12] != RECORD_VERSION.to_le_bytes() {
        return RecordState::Bad(BadRecord::Version);
    }
    if buf[16..32] != boot_id.0.to_le_bytes() {
        return RecordState::Bad(BadRecord::BootId);
    }
    let got = u64_at(buf, 32);
    if got != seq {
        return RecordState::Bad(BadRecord::Seq(got));
    }
    if checksum(buf) != u64_at(buf, PAYLOAD.end) {
        return RecordState::Bad(BadRecord::Checksum);
    }
    let mut want = [0u8; PAYLOAD.end - PAYLOAD.start];
    fill_payload(boot_id, seq, &mut want);
    if buf[PAYLOAD] != want[..] {
        return RecordState::Bad(BadRecord::Payload);
    }
    RecordState::Ok
}

/// Byte offset of the slot of `seq`.
pub fn slot_offset(log: &LogRegion, seq: u64) -> u64 {
    log.offset + (seq % log.slots().max(1)) * RECORD_SIZE as u64
}

/// Result of [`check_acked`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckedCheck {
    /// Acks whose record should still be in the log.
    pub checked: u64,
    pub ok: u64,
    /// Seqs (up to 64) whose slot is missing, holds another record, or whose
    /// acked sum differs from the record's.
    pub bad: Vec<u64>,
    pub bad_count: u64,
    /// Acks older than the log window (overwritten by wrap-around).
    pub overwritten: u64,
}

/// Reads `image` (a raw disk image or device, host side) and checks that every
/// acked `(seq, sum)` is intact. `newest_seq` is the highest seq the agent may
/// have written (at least the highest acked one); records a whole log length
/// older were legitimately overwritten and are only counted.
pub fn check_acked<'a>(
    image: &std::fs::File,
    log: &LogRegion,
    boot_id: BootId,
    acks: impl IntoIterator<Item = (&'a u64, &'a u64)>,
    newest_seq: u64,
) -> std::io::Result<AckedCheck> {
    let slots = log.slots();
    let mut out = AckedCheck::default();
    let mut buf = vec![0u8; RECORD_SIZE];
    for (&seq, &sum) in acks {
        if slots == 0 || seq + slots <= newest_seq {
            out.overwritten += 1;
            continue;
        }
        out.checked += 1;
        image.read_exact_at(&mut buf, slot_offset(log, seq))?;
        let good =
            check_record(&buf, boot_id, seq) == RecordState::Ok && u64_at(&buf, PAYLOAD.end) == sum;
        if good {
            out.ok += 1;
        } else {
            out.bad_count += 1;
            if out.bad.len() < 64 {
                out.bad.push(seq);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_corruption() {
        let b = BootId(0xdead_beef_0000_1111_2222_3333_4444_5555);
        let mut buf = vec![0u8; RECORD_SIZE];
        assert_eq!(check_record(&buf, b, 0), RecordState::Missing);
        let sum = encode_record(b, 42, &mut buf);
        assert_eq!(sum, expected_sum(b, 42));
        assert_ne!(sum, expected_sum(b, 43));
        assert_ne!(sum, expected_sum(BootId(1), 42));
        assert_eq!(check_record(&buf, b, 42), RecordState::Ok);
        assert_eq!(
            check_record(&buf, b, 41),
            RecordState::Bad(BadRecord::Seq(42))
        );
        assert_eq!(
            check_record(&buf, BootId(7), 42),
            RecordState::Bad(BadRecord::BootId)
        );
        buf[1000] ^= 1;
        assert_eq!(
            check_record(&buf, b, 42),
            RecordState::Bad(BadRecord::Checksum)
        );
    }

    #[test]
    fn payload_is_not_trivially_compressible() {
        let mut buf = vec![0u8; RECORD_SIZE];
        encode_record(BootId(3), 5, &mut buf);
        let distinct: std::collections::HashSet<u8> = buf[PAYLOAD].iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[test]
    fn check_acked_reads_an_image() {
        let log = LogRegion {
            offset: 8192,
            len: 4 * RECORD_SIZE as u64,
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(log.offset + log.len).unwrap();
        let b = BootId(99);
        let mut acks = std::collections::BTreeMap::new();
        let mut buf = vec![0u8; RECORD_SIZE];
        for seq in 0..6u64 {
            let sum = encode_record(b, seq, &mut buf);
            f.write_all_at(&buf, slot_offset(&log, seq)).unwrap();
            acks.insert(seq, sum);
        }
        let r = check_acked(&f, &log, b, &acks, 5).unwrap();
        assert_eq!((r.checked, r.ok, r.overwritten, r.bad_count), (4, 4, 2, 0));
        // A wrong acked sum and a lost write are both caught.
        acks.insert(5, 1);
        f.write_all_at(&[0u8; RECORD_SIZE], slot_offset(&log, 4))
            .unwrap();
        let r = check_acked(&f, &log, b, &acks, 5).unwrap();
        assert_eq!(r.bad, vec![4, 5]);
        assert_eq!(r.ok, 2);
    }
}
