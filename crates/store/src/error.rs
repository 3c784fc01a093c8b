//! One error type for the crate: every variant names what was being done, so a daemon log
//! line says which file or which step failed without a backtrace.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in roam-store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what}: bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        what: &'static str,
        expected: u32,
        found: u32,
    },
    #[error("{what}: unsupported version {found} (this build reads {min}..={max})")]
    BadVersion {
        what: &'static str,
        found: u16,
        min: u16,
        max: u16,
    },
    #[error("{what}: {len} bytes exceeds the {cap}-byte cap")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("{what}: truncated ({have} bytes, need {need})")]
    Truncated {
        what: &'static str,
        have: u64,
        need: u64,
    },
    #[error("{what}: checksum mismatch")]
    Checksum { what: &'static str },
    #[error("{what}: malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("geometry mismatch: {detail}")]
    Geometry { detail: String },
    #[error("chunk {chunk} is out of range (disk has {chunks} chunks)")]
    ChunkOutOfRange { chunk: u64, chunks: u64 },
    #[error("chunk index database: {0}")]
    Index(String),
    #[error("replica: batch from generation {offered} refused, replica has seen generation {seen} (stale primary)")]
    StaleGeneration { seen: u64, offered: u64 },
    #[error(
        "replica: split brain: generation {generation} claimed by {existing:?} and {offered:?}"
    )]
    SplitBrain {
        generation: u64,
        existing: String,
        offered: String,
    },
    #[error("replica: batch {offered:?} is not newer than the applied {applied:?}")]
    NotNewer {
        applied: (u64, u64),
        offered: (u64, u64),
    },
    #[error("replica: {0}")]
    Replica(String),
    /// The disk is lent to a migration (`crate::promote`); it must be rolled back (or
    /// the promotion kept) before anything else opens it.
    #[error("disk is promoted to a migration (marker {0}); roll it back first")]
    Promoted(PathBuf),
    /// Returned by a fault-injection hook: the operation stops as if the process died.
    #[error("injected crash at {0:?}")]
    InjectedCrash(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn index(e: impl std::fmt::Display) -> Self {
        StoreError::Index(e.to_string())
    }
}
