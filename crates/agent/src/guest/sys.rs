//! Small OS helpers for the guest agent: aligned buffers for O_DIRECT, clocks,
//! randomness, the boot id kept in /run.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::proto::BootId;

/// A zeroed heap buffer aligned to 4096 bytes, as O_DIRECT requires.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(1).div_ceil(4096) * 4096;
        let layout = match std::alloc::Layout::from_size_align(len, 4096) {
            Ok(l) => l,
            Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; 4096]>()),
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialised (zeroed) allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// CLOCK_MONOTONIC in milliseconds (time since boot, not counting suspend).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// 16 random bytes without blocking early in boot (GRND_INSECURE: the boot id
/// needs uniqueness, not secrecy), mixed with the clock in case it fails.
pub fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    // SAFETY: b is a valid writable buffer of b.len() bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_INSECURE) };
    let mut v = u128::from_le_bytes(b);
    if n != 16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        v ^= t ^ ((std::process::id() as u128) << 64) ^ uptime_ms() as u128;
    }
    v
}

/// The boot id stored in `dir/boot_id`, created on first use. `dir` is on a
/// tmpfs (/run), so the id lives exactly as long as this boot.
pub fn load_or_create_boot_id(dir: &Path) -> std::io::Result<BootId> {
    let path = dir.join("boot_id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if let Ok(id) = s.trim().parse::<BootId>() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(dir)?;
    let id = BootId(random_u128());
    let tmp = dir.join(format!("boot_id.{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// Opens a disk for direct, synchronous I/O (every completed write is durable).
pub fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if write {
        flags |= libc::O_DSYNC;
    }
    o.custom_flags(flags).open(path)
}

/// Size of a block device or file in bytes.
pub fn device_size(f: &File) -> std::io::Result<u64> {
    let mut f = f;
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Raises the calling thread's scheduling priority (best effort; the
/// heartbeat thread must not starve behind the memory workload).
pub fn raise_thread_priority() {
    // SAFETY: plain syscalls on the calling thread; failure is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
    }
}

/// poll(2) on one fd; returns revents (0 on timeout or EINTR).
pub fn poll_one(fd: std::os::fd::RawFd, events: libc::c_short, timeout_ms: i32) -> libc::c_short {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: p is a valid pollfd array of length 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r <= 0 {
        0
    } else {
        p.revents
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn boot_id_is_stable_within_a_run_dir() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_boot_id(d.path()).unwrap();
        let b = load_or_create_boot_id(d.path()).unwrap();
        assert_eq!(a, b);
        let d2 = tempfile::tempdir().unwrap();
        assert_ne!(a, load_or_create_boot_id(d2.path()).unwrap());
    }
}
