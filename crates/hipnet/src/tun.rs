//! A TUN device (IFF_TUN | IFF_NO_PI: one IP packet per read/write) made
//! readable by tokio, and its addresses and routes set with iproute2.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;

use tokio::io::unix::AsyncFd;

use crate::error::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TUN device.
pub struct Tun {
    fd: AsyncFd<File>,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) TUN device `name`, non-blocking. Needs
    /// CAP_NET_ADMIN.
    pub fn open(name: &str) -> Result<Tun, Error> {
        let err = |source| Error::Tun {
            name: name.to_string(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(err)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a
        // properly sized, initialised struct ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fcntl on a descriptor we own, with plain integer flags.
        let rc = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `file` owns the descriptor; it is neither closed nor
        // replaced while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(file) }.map_err(|e| Error::Tun {
            name: name.to_string(),
            source: e.into_parts().1,
        })?;
        Ok(Tun {
            fd,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brings the device up with our HIT and LSI, routes the HIT prefix
    /// (2001:20::/28) and the LSI range (198.19.0.0/16) into it.
    pub fn configure(&self, hit: Ipv6Addr, lsi: Ipv4Addr, mtu: u16) -> Result<(), Error> {
        let n = self.name.as_str();
        // The namespace may have IPv6 disabled on new devices.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6"), "0");
        ip(&["link", "set", "dev", n, "mtu", &mtu.to_string(), "up"])?;
        ip(&["addr", "add", &format!("{lsi}/32"), "dev", n])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{hit}/128"),
            "dev",
            n,
            "nodad",
        ])?;
        ip(&[
            "route",
            "replace",
            "198.19.0.0/16",
            "dev",
            n,
            "src",
            &lsi.to_string(),
        ])?;
        ip(&[
            "-6",
            "route",
            "replace",
            "2001:20::/28",
            "dev",
            n,
            "src",
            &hit.to_string(),
        ])?;
        Ok(())
    }

    /// Reads one packet into `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|f| f.get_ref().read(buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes one packet; a full queue drops it (like a NIC would).
    pub fn send(&self, pkt: &[u8]) -> std::io::Result<usize> {
        self.fd.get_ref().write(pkt)
    }
}

/// Runs `ip ARGS`, turning a failure into an error with its stderr.
pub fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
