//! Where an export's bytes live.
//!
//! [`Backend`] is deliberately small and synchronous: the server calls it
//! from a connection thread, and wrappers stack on it (dirty tracking today,
//! post-copy fetch-on-read and replication later), each holding an
//! `Arc<dyn Backend>` of the layer below.
//!
//! Contract every implementation keeps: when a method returns `Ok`, the
//! effect is visible to every later `read_at` from any thread; `flush`, and
//! any call with `fua == true`, return only once the data is on stable
//! storage.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fallocate, FallocateFlags};

/// Storage behind one export. Offsets and lengths are already checked
/// against [`Backend::size`] by the server.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes; fixed for the backend's lifetime.
    fn size(&self) -> u64;
    /// Fills all of `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; with `fua`, durably.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync semantics).
    fn flush(&self) -> io::Result<()>;
    /// Hints that a range is unused. Afterwards reads may return old data or
    /// zeroes, so wrappers that track content must treat it as a write.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Makes a range read as zeroes; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
}

/// A sparse raw image file accessed with positional I/O (pread/pwrite), so
/// any number of connection threads share one descriptor without locking.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    /// Cleared the first time the filesystem refuses `PUNCH_HOLE`, so we stop
    /// asking; trims become no-ops and zeroing falls back to writes.
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
}

impl FileBackend {
    /// Opens an existing image; its current length is the export size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file)
    }

    /// Creates (or truncates to) a sparse image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Self::from_file(file)
    }

    pub fn from_file(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(FileBackend {
            file,
            size,
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        })
    }

    fn try_fallocate(
        &self,
        flag: &AtomicBool,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if !flag.load(Ordering::Relaxed) || len == 0 {
            return Ok(len == 0);
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        match fallocate(self.file.as_raw_fd(), mode, off, l) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOSYS) => {
                flag.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // Someone shortened the file under us: past EOF reads as zeroes,
                // like a hole, rather than failing the guest's read.
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        self.try_fallocate(&self.punch_hole, mode, offset, len)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let done = if may_trim {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            self.try_fallocate(&self.punch_hole, mode, offset, len)?
        } else {
            false
        };
        let done = done || {
            let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            self.try_fallocate(&self.zero_range, mode, offset, len)?
        };
        if !done {
            self.write_zero_bytes(offset, len)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}
