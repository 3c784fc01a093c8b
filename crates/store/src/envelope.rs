//! The stored form of every small file this crate writes (chunk maps, dirty maps, the
//! replica's applied record): magic, version, length, payload, checksum — checked in that
//! order, and the length against a cap *before* anything is allocated.
//!
//! ```text
//!  0       4         6         8                16            16+len
//!  | magic | version | reserved | payload len u64 | payload … | blake3(header ‖ payload) |
//! ```
//!
//! All integers big-endian. The checksum is BLAKE3 (already a dependency, and fast enough
//! that a 2 MiB dirty map costs under a millisecond); it covers the header, so a flipped
//! version or length byte is caught too.
//!
//! Files are replaced atomically: write `NAME.tmp`, fsync it, rename over `NAME`, fsync the
//! directory. A crash leaves either the old or the new file, never a mix; a stray `.tmp` is
//! ignored (and overwritten next time).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 32;

/// Identity of one kind of stored file.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub what: &'static str,
    pub magic: u32,
    /// Version written.
    pub version: u16,
    /// Oldest version still read ("current plus previous").
    pub min_version: u16,
    /// Largest payload accepted.
    pub cap: u64,
}

/// Wrap `payload` in the envelope.
pub fn seal(kind: &Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&kind.magic.to_be_bytes());
    out.extend_from_slice(&kind.version.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Check an envelope and return `(version, payload)`.
pub fn open<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<(u16, &'a [u8])> {
    let what = kind.what;
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(StoreError::Truncated {
            what,
            have: bytes.len() as u64,
            need: (HEADER_LEN + TRAILER_LEN) as u64,
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != kind.magic {
        return Err(StoreError::BadMagic {
            what,
            expected: kind.magic,
            found: magic,
        });
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version < kind.min_version || version > kind.version {
        return Err(StoreError::BadVersion {
            what,
            found: version,
            min: kind.min_version,
            max: kind.version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let len = u64::from_be_bytes(len);
    if len > kind.cap {
        return Err(StoreError::TooLarge {
            what,
            len,
            cap: kind.cap,
        });
    }
    let need = HEADER_LEN as u64 + len + TRAILER_LEN as u64;
    if bytes.len() as u64 != need {
        return Err(StoreError::Truncated {
            what,
            have: bytes.len() as u64,
            need,
        });
    }
    let body_end = HEADER_LEN + len as usize;
    let sum = blake3::hash(&bytes[..body_end]);
    if sum.as_bytes()[..] != bytes[body_end..] {
        return Err(StoreError::Checksum { what });
    }
    Ok((version, &bytes[HEADER_LEN..body_end]))
}

/// Read a sealed file, refusing one larger than the cap before reading it.
pub fn read_file(kind: &Kind, path: &Path) -> Result<(u16, Vec<u8>)> {
    let mut f = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io("stat", path, e))?
        .len();
    let max = kind.cap + (HEADER_LEN + TRAILER_LEN) as u64;
    if len > max {
        return Err(StoreError::TooLarge {
            what: kind.what,
            len,
            cap: max,
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows between stat and read.
    (&mut f)
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| StoreError::io("read", path, e))?;
    let (v, payload) = open(kind, &buf)?;
    Ok((v, payload.to_vec()))
}

/// Seal `payload` and replace `path` atomically and durably.
pub fn write_file(kind: &Kind, path: &Path, payload: &[u8]) -> Result<()> {
    write_atomic(path, &seal(kind, payload))
}

/// Replace `path` with `bytes`: tmp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StoreError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
    sync_dir(path)
}

/// fsync the directory holding `path`, so a rename or create in it is durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync dir", dir, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: Kind = Kind {
        what: "test file",
        magic: 0x5445_5354,
        version: 2,
        min_version: 1,
        cap: 1024,
    };

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_file(&K, &p, b"one").unwrap();
        write_file(&K, &p, b"two!").unwrap();
        assert_eq!(read_file(&K, &p).unwrap(), (2, b"two!".to_vec()));
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn each_header_field_is_checked() {
        let good = seal(&K, b"payload");
        let mut m = good.clone();
        m[0] ^= 1;
        assert!(matches!(open(&K, &m), Err(StoreError::BadMagic { .. })));
        let mut v = good.clone();
        v[5] = 9;
        assert!(matches!(
            open(&K, &v),
            Err(StoreError::BadVersion { found: 9, .. })
        ));
        let mut l = good.clone();
        l[8] = 0xff;
        assert!(matches!(open(&K, &l), Err(StoreError::TooLarge { .. })));
        let mut c = good.clone();
        c[HEADER_LEN] ^= 1;
        assert!(matches!(open(&K, &c), Err(StoreError::Checksum { .. })));
        assert!(matches!(
            open(&K, &good[..good.len() - 1]),
            Err(StoreError::Truncated { .. })
        ));
        assert_eq!(open(&K, &good).unwrap(), (2, &b"payload"[..]));
    }

    #[test]
    fn oversized_file_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            read_file(&K, &p),
            Err(StoreError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_single_byte_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..200),
                                            pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut b = seal(&K, &payload);
            let i = pos.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(open(&K, &b).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = open(&K, &bytes);
        }
    }
}
