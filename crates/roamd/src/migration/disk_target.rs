//! Where the disk receiver's writes go: straight into the incoming file, or through the
//! undo log of a disk this host lent to the migration in place (`roam_store::Promoted`:
//! a chunk's first overwrite saves it first, and reads see every write), so that a failed
//! migration can give that disk back exactly as it was.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use roam_migrate::digest::ChunkHashes;

use super::{clear, disk_write_error, read_chunk};
use crate::error::{Error, Result};

/// A promoted disk shared between the receiver and the migration that owns it: the
/// migration takes it out (to keep or roll it back), after which writes fail.
pub type SharedPromoted = Arc<std::sync::Mutex<Option<roam_store::Promoted>>>;

/// Where the receiver's writes go: straight into the file, or through a promoted disk's
/// undo log (a first overwrite of a chunk saves the chunk first; reads see every write).
pub(super) enum Target {
    File(Arc<File>),
    Undo(SharedPromoted),
}

impl Target {
    fn with<T>(
        p: &SharedPromoted,
        f: impl FnOnce(&mut roam_store::Promoted) -> roam_store::Result<T>,
    ) -> std::result::Result<T, StoreOrGone> {
        let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
        let p = g.as_mut().ok_or(StoreOrGone::Gone)?;
        f(p).map_err(StoreOrGone::Store)
    }

    pub(super) fn write(&self, chunk: u64, off: u64, data: &[u8]) -> Result<()> {
        match self {
            Target::File(f) => f
                .write_all_at(data, off)
                .map_err(|e| disk_write_error(chunk, e)),
            Target::Undo(p) => Self::with(p, |p| p.write(chunk, data)).map_err(|e| e.at(chunk)),
        }
    }

    pub(super) fn clear(&self, chunk: u64, off: u64, len: usize) -> Result<()> {
        match self {
            Target::File(f) => clear(f, off, len).map_err(|e| disk_write_error(chunk, e)),
            Target::Undo(p) => Self::with(p, |p| p.zero(chunk)).map_err(|e| e.at(chunk)),
        }
    }

    /// Chunk `idx` as last written.
    pub(super) fn read<'a>(
        &self,
        hashes: &ChunkHashes,
        idx: u64,
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8]> {
        match self {
            Target::File(f) => read_chunk(f, hashes, idx, buf),
            Target::Undo(p) => {
                let (_, len) = hashes.range(idx).ok_or_else(|| {
                    Error::Disk(format!("chunk {idx} is beyond the end of the disk"))
                })?;
                let data = &mut buf[..len];
                Self::with(p, |p| p.read(idx, data)).map_err(|e| e.at(idx))?;
                Ok(data)
            }
        }
    }

    /// Every write so far is in the file (undo log: saved and written).
    pub(super) fn flush(&self) -> Result<()> {
        match self {
            Target::File(_) => Ok(()),
            Target::Undo(p) => Self::with(p, |p| p.flush()).map_err(|e| e.at(0)),
        }
    }

    /// Every write so far is durable.
    pub(super) fn sync(&self) -> Result<()> {
        match self {
            Target::File(f) => f
                .sync_data()
                .map_err(|e| Error::io("flush received disk", e)),
            Target::Undo(p) => Self::with(p, |p| p.sync()).map_err(|e| e.at(0)),
        }
    }
}

enum StoreOrGone {
    Store(roam_store::StoreError),
    /// The migration took the disk back (it failed and rolls back).
    Gone,
}

impl StoreOrGone {
    fn at(self, chunk: u64) -> Error {
        match self {
            StoreOrGone::Gone => Error::Migration("the incoming disk was given back".into()),
            StoreOrGone::Store(roam_store::StoreError::Io { source, .. }) => {
                disk_write_error(chunk, source)
            }
            StoreOrGone::Store(e) => Error::Disk(format!("incoming disk: {e}")),
        }
    }
}
