//! Demo disk images: a sparse raw file whose first part is an ext4 file system
//! (built with `mkfs.ext4 -d`, nothing mounted) holding generated data and a
//! [`crate::manifest`], and whose last part is the agent's zeroed log region.
//!
//! ```text
//!  0                                   log.offset                 size
//!  [ ext4: /MANIFEST, /data/rand-*.bin, /data/text-*.txt | log (zeros) ]
//! ```
//! Half the data is incompressible (PRNG bytes), half compressible text; every
//! file is different, so neither dedup nor compression makes it vanish.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::manifest::{self, Entry};
use crate::proto::LogRegion;

const MIB: u64 = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct MkdiskOptions {
    pub out: PathBuf,
    /// Image size in bytes (the log region is taken from its end).
    pub size: u64,
    /// Data to put in the file system, MiB.
    pub data_mib: u64,
    /// Largest single data file, MiB.
    pub file_mib: u64,
    /// Seed of the generated content (same seed, same files).
    pub seed: u64,
}

impl MkdiskOptions {
    pub fn new(out: impl Into<PathBuf>, size: u64, data_mib: u64) -> Self {
        MkdiskOptions {
            out: out.into(),
            size,
            data_mib,
            file_mib: 4,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MkdiskReport {
    pub size: u64,
    /// Bytes covered by the file system (= log.offset).
    pub fs_size: u64,
    pub log: LogRegion,
    pub files: usize,
    pub data_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MkdiskError {
    #[error("a {0}-byte disk is too small for a log region")]
    TooSmall(u64),
    #[error("{data_mib} MiB of data do not fit a {fs_mib} MiB file system")]
    DataTooLarge { data_mib: u64, fs_mib: u64 },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

const WORDS: &[&str] = &[
    "roam",
    "virtual",
    "machine",
    "migrates",
    "across",
    "the",
    "wide",
    "area",
    "network",
    "while",
    "memory",
    "pages",
    "and",
    "disk",
    "blocks",
    "travel",
    "to",
    "a",
    "host",
    "near",
    "person",
    "every",
    "connection",
    "stays",
    "open",
    "no",
    "acknowledged",
    "write",
    "is",
    "lost",
    "replica",
    "fresh",
    "office",
    "home",
    "link",
    "latency",
    "bandwidth",
    "dirty",
    "rate",
    "downtime",
];

fn random_file(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize + 8);
    while (v.len() as u64) < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

fn text_file(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize + 64);
    let mut line = 0usize;
    while (v.len() as u64) < len {
        let r = rng.next();
        let w = WORDS[(r % WORDS.len() as u64) as usize];
        v.extend_from_slice(w.as_bytes());
        line += w.len() + 1;
        if line > 72 {
            v.push(b'\n');
            line = 0;
        } else if r >> 60 == 0 {
            v.extend_from_slice(b", ");
        } else {
            v.push(b' ');
        }
    }
    v.truncate(len as usize);
    v
}

fn io<T>(p: &Path, r: std::io::Result<T>) -> Result<T, MkdiskError> {
    r.map_err(|e| MkdiskError::Io(p.to_path_buf(), e))
}

/// Builds the image described by `opts` (overwriting `opts.out`).
pub fn make_disk(opts: &MkdiskOptions) -> Result<MkdiskReport, MkdiskError> {
    let log = LogRegion::for_disk(opts.size).ok_or(MkdiskError::TooSmall(opts.size))?;
    let fs_size = log.offset;
    // ext4 metadata and journal need room; keep a generous margin.
    if opts.data_mib * MIB + 48 * MIB > fs_size * 9 / 10 {
        return Err(MkdiskError::DataTooLarge {
            data_mib: opts.data_mib,
            fs_mib: fs_size / MIB,
        });
    }
    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let staging = Staging(parent.join(format!(".roam-mkdisk-{}-{nanos}", std::process::id())));
    let data_dir = staging.0.join("data");
    io(&data_dir, std::fs::create_dir_all(&data_dir))?;

    let mut rng = Rng(opts.seed ^ 0x726f_616d);
    let mut entries = Vec::new();
    let total = opts.data_mib * MIB;
    let per_file = opts.file_mib.max(1) * MIB;
    let mut written = 0u64;
    let mut i = 0usize;
    while written < total {
        let len = per_file.min(total - written);
        let (name, bytes) = if i.is_multiple_of(2) {
            (format!("data/rand-{i:04}.bin"), random_file(&mut rng, len))
        } else {
            (format!("data/text-{i:04}.txt"), text_file(&mut rng, len))
        };
        let path = staging.0.join(&name);
        io(&path, std::fs::write(&path, &bytes))?;
        entries.push(Entry {
            hash: *blake3::hash(&bytes).as_bytes(),
            size: len,
            path: name,
        });
        written += len;
        i += 1;
    }
    let mpath = staging.0.join(manifest::MANIFEST_NAME);
    io(&mpath, std::fs::write(&mpath, manifest::render(&entries)))?;

    {
        let f = io(&opts.out, std::fs::File::create(&opts.out))?;
        io(&opts.out, f.set_len(opts.size))?;
    }
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "roam-data"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg("-d")
        .arg(&staging.0)
        .arg(&opts.out)
        .arg((fs_size / 4096).to_string())
        .output()
        .map_err(|e| {
            MkdiskError::Mkfs(format!("cannot run mkfs.ext4 (apt package e2fsprogs): {e}"))
        })?;
    if !out.status.success() {
        return Err(MkdiskError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let len = io(&opts.out, std::fs::metadata(&opts.out))?.len();
    if len != opts.size {
        return Err(MkdiskError::Mkfs(format!(
            "image is {len} bytes, wanted {}",
            opts.size
        )));
    }
    let _ = std::io::stderr().flush();
    Ok(MkdiskReport {
        size: opts.size,
        fs_size,
        log,
        files: entries.len(),
        data_bytes: written,
    })
}

/// Parses sizes like `2G`, `256M`, `4096` (bytes), `512K`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("256m"), Some(256 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn text_compresses_and_random_does_not() {
        let mut r = Rng(5);
        let t = text_file(&mut r, 1 << 16);
        let b = random_file(&mut r, 1 << 16);
        let distinct = |v: &[u8]| v.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct(&t) < 40, "text uses few symbols");
        assert!(distinct(&b) == 256);
        assert_eq!(t.len(), 1 << 16);
    }

    #[test]
    fn refuses_impossible_layouts() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.img");
        assert!(matches!(
            make_disk(&MkdiskOptions::new(&img, 1 << 20, 1)),
            Err(MkdiskError::TooSmall(_))
        ));
        assert!(matches!(
            make_disk(&MkdiskOptions::new(&img, 64 << 20, 100)),
            Err(MkdiskError::DataTooLarge { .. })
        ));
    }

    /// Real mkfs.ext4: the image has the size asked for, an ext4 superblock at
    /// 1024, a zero log region, and debugfs can read the manifest back.
    #[test]
    fn builds_an_ext4_image_with_a_manifest() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("demo.img");
        let start = std::time::Instant::now();
        let r = make_disk(&MkdiskOptions::new(&img, 600 << 20, 16)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        assert_eq!(r.files, 4);
        assert_eq!(r.data_bytes, 16 << 20);
        assert_eq!(r.fs_size, r.log.offset);
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&img).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 600 << 20);
        let mut sb = [0u8; 2];
        f.read_exact_at(&mut sb, 1024 + 0x38).unwrap();
        assert_eq!(u16::from_le_bytes(sb), 0xef53, "ext4 magic");
        let mut log = vec![1u8; 1 << 20];
        f.read_exact_at(&mut log, r.log.offset).unwrap();
        assert!(log.iter().all(|&b| b == 0));
        let out = Command::new("debugfs")
            .args(["-R", "cat /MANIFEST"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let entries = manifest::parse(&text).unwrap();
        assert_eq!(entries.len(), 4);
        assert!(entries[1].path.starts_with("data/text-"));
    }
}
