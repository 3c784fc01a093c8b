//! TUN devices created inside a namespace but read and written from the emulator's threads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::net::Ipv4Cidr;
use crate::netns::{self, ip, NetnsError};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Errors opening or configuring a TUN device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// Namespace or `ip` trouble.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun: {0}")]
    Open(io::Error),
    /// `TUNSETIFF` failed (name taken, no permission).
    #[error("TUNSETIFF {name}: {source}")]
    SetIff {
        /// Interface name.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// Interface name too long or not ASCII.
    #[error("bad interface name {0:?}")]
    BadName(String),
}

/// An open TUN device (L3, no packet-info header). The netdev disappears when this drops.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
    netns: String,
}

impl Tun {
    /// Interface name inside its namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace holding the netdev.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The device fd (non-blocking).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Reads one packet; `WouldBlock` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes; the fd is open.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet. Safe to call from any thread, concurrently with reads.
    pub fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: pkt is a valid readable region of pkt.len() bytes; the fd is open.
        let n = unsafe { libc::write(self.file.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_here(ifname: &str) -> Result<File, TunError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TunError::Open)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    req.flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq; IfReq has its layout
    // (16-byte name, flags in the union, padded to 40 bytes) and lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(TunError::SetIff {
            name: ifname.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // IPv6 would only bring router solicitations the router drops; /proc/sys/net follows
    // the calling thread's namespace, which is the TUN's here. Best effort.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    Ok(file)
}

/// Opens TUN device `ifname` inside namespace `ns`, then gives it `addr` and `mtu`, brings
/// it up and routes each of `routes` through it.
pub fn open_in(
    ns: &str,
    ifname: &str,
    addr: Ipv4Cidr,
    mtu: u32,
    routes: &[Ipv4Cidr],
) -> Result<Tun, TunError> {
    if ifname.is_empty()
        || ifname.len() >= libc::IFNAMSIZ
        || !ifname.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(TunError::BadName(ifname.to_string()));
    }
    let owned = ifname.to_string();
    let file = netns::run_in(ns, move || open_here(&owned))??;
    let tun = Tun {
        file,
        name: ifname.to_string(),
        netns: ns.to_string(),
    };
    let mtu = mtu.to_string();
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        "dev",
        ifname,
        "mtu",
        &mtu,
        "txqueuelen",
        "1000",
        "up",
    ])?;
    ip(&["-n", ns, "addr", "add", &addr.to_string(), "dev", ifname])?;
    for r in routes {
        let net = r.network().to_string();
        if r.network() == addr.network() {
            continue; // the address already brings its connected route
        }
        ip(&["-n", ns, "route", "replace", &net, "dev", ifname])?;
    }
    Ok(tun)
}
