//! `/MANIFEST` of the demo data file system: which files it holds and their
//! BLAKE3 hashes, written by `roam-mkdisk`, checked by the agent's `verify`.
//!
//! Text, versioned, bounded:
//! ```text
//! roam-manifest 1
//! <64 hex blake3> <size in bytes> <relative path>
//! …
//! ```

use std::io::Read;
use std::path::{Component, Path};

pub const MANIFEST_HEADER: &str = "roam-manifest 1";
/// Name of the manifest in the root of the file system.
pub const MANIFEST_NAME: &str = "MANIFEST";
/// Largest manifest accepted (checked before parsing).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("manifest header is not {MANIFEST_HEADER:?}")]
    Header,
    #[error("manifest line {0}: {1}")]
    Line(usize, &'static str),
    #[error("manifest: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hash: [u8; 32],
    pub size: u64,
    /// Relative, no `..`, no newline.
    pub path: String,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\n')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

pub fn parse(text: &str) -> Result<Vec<Entry>, ManifestError> {
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge);
    }
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(ManifestError::Header);
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if line.is_empty() {
            continue;
        }
        if out.len() >= MAX_ENTRIES {
            return Err(ManifestError::Line(n, "too many entries"));
        }
        let mut it = line.splitn(3, ' ');
        let hash = it
            .next()
            .and_then(hex32)
            .ok_or(ManifestError::Line(n, "bad hash"))?;
        let size = it
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(ManifestError::Line(n, "bad size"))?;
        let path = it.next().ok_or(ManifestError::Line(n, "no path"))?;
        if !safe_path(path) {
            return Err(ManifestError::Line(n, "unsafe path"));
        }
        out.push(Entry {
            hash,
            size,
            path: path.to_string(),
        });
    }
    Ok(out)
}

pub fn render(entries: &[Entry]) -> String {
    let mut s = String::from(MANIFEST_HEADER);
    s.push('\n');
    for e in entries {
        for b in e.hash {
            s.push_str(&format!("{b:02x}"));
        }
        s.push_str(&format!(" {} {}\n", e.size, e.path));
    }
    s
}

/// Hashes a file the way the manifest does.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    hash_reader(std::fs::File::open(path)?, &mut vec![0u8; READ_LEN])
}

// 4 MiB: the uncached reads of the check get no readahead, so each one should be large.
const READ_LEN: usize = 4 << 20;

fn hash_reader(mut f: std::fs::File, buf: &mut [u8]) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, *h.finalize().as_bytes()))
}

/// Hashes a file like [`hash_file`] without leaving it in the page cache (O_DIRECT).
/// The guest's check is a test instrument and must not change what the guest's
/// memory holds: read through the cache, a check of a 600 MiB data set filled a
/// 256 MiB guest with page cache, and the next migration carried it as RAM. On a file
/// system without O_DIRECT (tmpfs) the pages read are dropped afterwards instead.
pub fn hash_file_uncached(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    use std::os::fd::AsRawFd;
    match crate::guest::sys::open_direct(path, false) {
        // Sequential reads of a page-aligned buffer keep every offset aligned; the
        // last read of a file whose size is not a block multiple just comes back short.
        Ok(f) => hash_reader(f, &mut crate::guest::sys::AlignedBuf::new(READ_LEN)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = std::fs::File::open(path)?;
            let fd = f.as_raw_fd();
            let r = hash_reader(f.try_clone()?, &mut vec![0u8; READ_LEN]);
            // SAFETY: fd is a valid descriptor owned by `f`, alive for this call.
            unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
            r
        }
        Err(e) => Err(e),
    }
}

/// Outcome of checking a tree against its manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeCheck {
    pub counts: crate::proto::Counts,
    pub first_bad: Vec<String>,
}

/// Reads `root/MANIFEST` and checks every listed file under `root`.
/// A tree without a manifest checks nothing.
pub fn check_tree(root: &Path, max_bad: usize) -> Result<TreeCheck, ManifestError> {
    let mpath = root.join(MANIFEST_NAME);
    let meta = match std::fs::metadata(&mpath) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TreeCheck::default()),
        Err(e) => return Err(e.into()),
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge);
    }
    let text = std::fs::read_to_string(&mpath)?;
    let mut out = TreeCheck::default();
    for e in parse(&text)? {
        out.counts.checked += 1;
        match hash_file_uncached(&root.join(&e.path)) {
            Ok((size, hash)) if size == e.size && hash == e.hash => out.counts.ok += 1,
            Ok(_) => {
                out.counts.bad += 1;
                if out.first_bad.len() < max_bad {
                    out.first_bad.push(e.path.clone());
                }
            }
            Err(_) => {
                out.counts.missing += 1;
                if out.first_bad.len() < max_bad {
                    out.first_bad.push(e.path.clone());
                }
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
    fn render_parse_round_trip_and_refusals() {
        let e = vec![
            Entry {
                hash: [0xab; 32],
                size: 5,
                path: "data/a file.txt".into(),
            },
            Entry {
                hash: [1; 32],
                size: 0,
                path: "b".into(),
            },
        ];
        assert_eq!(parse(&render(&e)).unwrap(), e);
        assert!(matches!(parse("nope\n"), Err(ManifestError::Header)));
        let bad = format!("{MANIFEST_HEADER}\n{} 1 ../etc/passwd\n", "00".repeat(32));
        assert!(matches!(
            parse(&bad),
            Err(ManifestError::Line(2, "unsafe path"))
        ));
        let bad = format!("{MANIFEST_HEADER}\n{} x a\n", "00".repeat(32));
        assert!(matches!(
            parse(&bad),
            Err(ManifestError::Line(2, "bad size"))
        ));
    }

    #[test]
    fn check_tree_finds_changed_and_missing_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("b"), b"world").unwrap();
        let mut entries = Vec::new();
        for name in ["a", "b"] {
            let (size, hash) = hash_file(&d.path().join(name)).unwrap();
            entries.push(Entry {
                hash,
                size,
                path: name.into(),
            });
        }
        std::fs::write(d.path().join(MANIFEST_NAME), render(&entries)).unwrap();
        let r = check_tree(d.path(), 4).unwrap();
        assert_eq!((r.counts.checked, r.counts.ok), (2, 2));
        // Both readers agree, on a file larger than one read and not a block multiple.
        let big: Vec<u8> = (0..READ_LEN * 2 + 777).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.path().join("big"), &big).unwrap();
        let want = (big.len() as u64, *blake3::hash(&big).as_bytes());
        assert_eq!(hash_file(&d.path().join("big")).unwrap(), want);
        assert_eq!(hash_file_uncached(&d.path().join("big")).unwrap(), want);
        std::fs::write(d.path().join("a"), b"hellO").unwrap();
        std::fs::remove_file(d.path().join("b")).unwrap();
        let r = check_tree(d.path(), 4).unwrap();
        assert_eq!((r.counts.ok, r.counts.bad, r.counts.missing), (0, 1, 1));
        assert_eq!(r.first_bad, vec!["a".to_string(), "b".to_string()]);
    }
}
