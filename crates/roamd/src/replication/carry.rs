//! What a replication link knows when its VM stops, kept so that the VM's next start
//! (in this roamd, or after an orderly restart of it) replicates only what the replica
//! still lacks instead of comparing the whole disk by hash.
//!
//! ```text
//!  VM stops: QEMU quits, NBD export removed ─▶ disk quiet: stat it (FileIdentity)
//!    link: Carry{replica committed (g, s), pending ∪ dirty, generation, identity}
//!    carry file written (sealed, atomic), again at roamd's orderly stop
//!    roamd starts: read; the link adopts it (the VM runs again): deleted
//!  VM starts: stat the disk before its export exists (RunningVm::started_on)
//!    same identity, same generation, replica still at (g, s)?  ─ yes ─▶ send pending
//!                                                              └─ no ──▶ hash comparison
//! ```
//!
//! Soundness rests on two facts. Every write of a running VM passes the dirty tracker,
//! so once its export is gone the chunks written since `(g, s)` are exactly `pending ∪
//! dirty`. Nothing else may have written the file in between: any write or metadata
//! change moves its ctime, which nobody can set back, and a replaced file has another
//! inode. A carry that does not match is dropped (costing one hash comparison, never a
//! chunk). The file is written when the VM stops, so a crash of roamd while the VM is
//! stopped keeps it; it is deleted when the VM runs again, and should one survive
//! anyway, the VM's writes since changed the identity it names. A crash of roamd
//! while the VM runs leaves a live map instead (`roam_store::live`), which roamd's next start
//! turns into a carry.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use roam_store::envelope::{self, Kind};
use roam_store::Version;
use serde::{Deserialize, Serialize};

const KIND: Kind = Kind {
    what: "replication carry",
    magic: 0x524F_4341, // "ROCA"
    version: 1,
    min_version: 1,
    // Ranges of pending chunks; a disk of 2^24 chunks, every other one pending, fits.
    cap: 512 << 20,
};

/// Who a disk file is and when it last changed: equal identities mean nobody wrote it
/// in between (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// A stopped VM's replication state toward one replica host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carry {
    /// The VM's generation when it stopped.
    pub generation: u64,
    /// The replica's last committed batch as this link saw it commit.
    pub synced_to: Version,
    /// Chunks written since `synced_to` (taken for an uncommitted batch, or still dirty).
    pub pending: BTreeSet<u64>,
    /// The disk file once its export was gone.
    pub disk: FileIdentity,
}

/// Why a carry cannot be used (logged; the link compares by hash instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the VM's generation changed ({had} → {now})")]
    Generation { had: u64, now: u64 },
    #[error("the disk file changed while the VM was stopped")]
    DiskChanged,
    #[error("the disk could not be examined before the VM started")]
    DiskUnknown,
    #[error("it names chunk {chunk}, beyond the disk's {chunks}")]
    OutOfRange { chunk: u64, chunks: u64 },
}

impl Carry {
    /// Whether this carry describes the disk a VM starts with: same generation, file
    /// untouched since, every chunk inside the disk.
    pub fn check(
        &self,
        generation: u64,
        started_on: Option<FileIdentity>,
        chunks: u64,
    ) -> Result<(), Unusable> {
        if self.generation != generation {
            return Err(Unusable::Generation {
                had: self.generation,
                now: generation,
            });
        }
        match started_on {
            None => return Err(Unusable::DiskUnknown),
            Some(id) if id != self.disk => return Err(Unusable::DiskChanged),
            Some(_) => {}
        }
        match self.pending.last() {
            Some(&c) if c >= chunks => Err(Unusable::OutOfRange { chunk: c, chunks }),
            _ => Ok(()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let f = CarryFile {
            generation: self.generation,
            synced_generation: self.synced_to.generation,
            synced_seq: self.synced_to.seq,
            disk: self.disk,
            pending: ranges(&self.pending),
        };
        envelope::seal(&KIND, &serde_json::to_vec(&f).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Result<Carry, String> {
        let (_, payload) = envelope::open(&KIND, bytes).map_err(|e| e.to_string())?;
        let f: CarryFile = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let mut pending = BTreeSet::new();
        for (a, b) in f.pending {
            if a >= b || b - a > 1 << 32 {
                return Err(format!("bad range {a}..{b}"));
            }
            pending.extend(a..b);
        }
        Ok(Carry {
            generation: f.generation,
            synced_to: Version {
                generation: f.synced_generation,
                seq: f.synced_seq,
            },
            pending,
            disk: f.disk,
        })
    }

    /// Write durably (roamd's orderly stop).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        envelope::write_atomic(path, &self.encode()).map_err(|e| e.to_string())
    }

    /// Read (roamd's start). `Ok(None)` when there is none; a file that does not decode
    /// is deleted, and reported. A good one stays until the link adopts it (`remove`), so
    /// that a crash before the VM starts keeps it.
    pub fn load(path: &Path) -> Result<Option<Carry>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Carry::decode(&bytes).map(Some).map_err(|e| {
            let _ = std::fs::remove_file(path);
            let _ = envelope::sync_dir(path);
            format!("{}: {e}", path.display())
        })
    }
}

/// Where the carry of `vm`'s link to `host` waits while roamd is down.
pub fn path(state: &Path, vm: &str, host: &str) -> PathBuf {
    state.join("replication").join(format!("{vm}@{host}.carry"))
}

/// Delete the carry file of `vm`'s link to `host`, if any (durably: a stale one must not
/// come back after a crash).
pub fn remove(state: &Path, vm: &str, host: &str) {
    let p = path(state, vm, host);
    if std::fs::remove_file(&p).is_ok() {
        let _ = envelope::sync_dir(&p);
    }
}

#[derive(Serialize, Deserialize)]
struct CarryFile {
    generation: u64,
    synced_generation: u64,
    synced_seq: u64,
    disk: FileIdentity,
    /// Half-open ranges: a typical pending set is a few runs, not thousands of numbers.
    pending: Vec<(u64, u64)>,
}

fn ranges(set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in set {
        match out.last_mut() {
            Some((_, end)) if *end == c => *end = c + 1,
            _ => out.push((c, c + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carry() -> Carry {
        Carry {
            generation: 4,
            synced_to: Version {
                generation: 4,
                seq: 19,
            },
            pending: [0, 1, 2, 7, 40, 41].into_iter().collect(),
            disk: FileIdentity {
                dev: 1,
                ino: 2,
                size: 1 << 30,
                mtime_ns: 5,
                ctime_ns: 6,
            },
        }
    }

    #[test]
    fn a_carry_survives_its_file_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "desk", "home");
        let c = carry();
        assert_eq!(ranges(&c.pending), vec![(0, 3), (7, 8), (40, 42)]);
        c.save(&p).unwrap();
        assert_eq!(Carry::load(&p).unwrap(), Some(c.clone()));
        assert_eq!(Carry::load(&p).unwrap(), Some(c), "reading keeps it");
        remove(dir.path(), "desk", "home");
        assert!(!p.exists());
        assert_eq!(Carry::load(&p).unwrap(), None);
    }

    #[test]
    fn a_damaged_carry_is_an_error_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "desk", "home");
        carry().save(&p).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n / 2] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(Carry::load(&p).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn only_the_same_generation_and_an_untouched_disk_qualify() {
        let c = carry();
        let chunks = (1 << 30) / 65536;
        assert_eq!(c.check(4, Some(c.disk), chunks), Ok(()));
        assert!(matches!(
            c.check(5, Some(c.disk), chunks),
            Err(Unusable::Generation { had: 4, now: 5 })
        ));
        let touched = FileIdentity {
            ctime_ns: 7,
            ..c.disk
        };
        assert_eq!(
            c.check(4, Some(touched), chunks),
            Err(Unusable::DiskChanged)
        );
        let replaced = FileIdentity { ino: 3, ..c.disk };
        assert_eq!(
            c.check(4, Some(replaced), chunks),
            Err(Unusable::DiskChanged)
        );
        assert_eq!(c.check(4, None, chunks), Err(Unusable::DiskUnknown));
        assert!(matches!(
            c.check(4, Some(c.disk), 41),
            Err(Unusable::OutOfRange { chunk: 41, .. })
        ));
    }

    #[test]
    fn a_real_write_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        let before = FileIdentity::of(&f).unwrap();
        assert_eq!(FileIdentity::of(&f).unwrap(), before);
        // The coarse kernel clock ticks every few ms: wait one out, then write in place.
        std::thread::sleep(std::time::Duration::from_millis(20));
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .write_all_at(b"x", 100)
            .unwrap();
        assert_ne!(FileIdentity::of(&f).unwrap(), before);
    }
}
