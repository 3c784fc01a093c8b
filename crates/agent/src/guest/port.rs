//! The virtio-serial port: finding it, reading host messages, writing lines.
//!
//! Linux virtio console semantics this relies on: while the host side is not
//! connected, poll() reports POLLHUP, read() returns 0 and a non-blocking
//! write() returns EAGAIN. So "connected" is simply "poll shows no POLLHUP".

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use super::{disk, sys, Shared};
use crate::proto::{self, AgentMsg, HostMsg, LineSplitter, PORT_NAME};

/// /dev/vportNpM whose /sys/class/virtio-ports/*/name is `name`.
pub fn find_port(name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Opens the port (non-blocking), waiting for it to appear.
pub fn open(paths: &super::Paths) -> std::io::Result<File> {
    let mut warned = false;
    loop {
        let p = paths.port.clone().or_else(|| find_port(PORT_NAME));
        if let Some(p) = p.filter(|p| p.exists()) {
            return OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&p);
        }
        if !warned {
            eprintln!("roam-agent: waiting for virtio port {PORT_NAME}");
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Drains the queue into the port; whole lines or nothing while connected.
pub fn writer_loop(sh: Arc<Shared>, mut port: File, rx: Receiver<Vec<u8>>) {
    let fd = port.as_raw_fd();
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut off = 0;
        while off < line.len() {
            if !sh.connected.load(Ordering::Acquire) && off == 0 {
                sh.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
            match port.write(&line[off..]) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let rev = sys::poll_one(fd, libc::POLLOUT, 100);
                    if rev & libc::POLLHUP != 0 {
                        // Host went away: the rest of this line goes nowhere.
                        sh.connected.store(false, Ordering::Release);
                        sh.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                Err(e) => {
                    eprintln!("roam-agent: port write: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn handle(sh: &Arc<Shared>, line: &[u8]) {
    let msg: HostMsg = match proto::decode(line) {
        Ok(m) => m,
        Err(e) => {
            sh.send_error("bad_request", e.to_string());
            return;
        }
    };
    match msg {
        HostMsg::Ping { nonce } => {
            sh.send(&AgentMsg::Hello(sh.hello()));
            sh.send(&AgentMsg::Pong { nonce });
        }
        HostMsg::Config(c) => {
            if c.disk_writes_per_s > 0 && sh.disk.is_none() {
                sh.send_error(
                    "no_disk",
                    "disk workload asked for, but the guest has no disk",
                );
            }
            match sh.config.lock() {
                Ok(mut g) => *g = c,
                Err(p) => *p.into_inner() = c,
            }
        }
        HostMsg::Verify { upto_seq } => {
            if sh.verifying.swap(true, Ordering::AcqRel) {
                sh.send_error("busy", "a verify is already running");
                return;
            }
            let sh2 = sh.clone();
            let r = std::thread::Builder::new()
                .name("verify".into())
                .spawn(move || {
                    let report = disk::verify(&sh2, upto_seq);
                    sh2.verifying.store(false, Ordering::Release);
                    sh2.send(&AgentMsg::VerifyReport(report));
                });
            if let Err(e) = r {
                sh.verifying.store(false, Ordering::Release);
                sh.send_error("internal", format!("cannot start verify: {e}"));
            }
        }
    }
}

/// Reads host messages and tracks whether the host is connected. Returns only
/// on a port error that reopening would not fix in-process.
pub fn reader_loop(sh: Arc<Shared>, mut port: File) -> std::io::Result<()> {
    let fd = port.as_raw_fd();
    let mut split = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let rev = sys::poll_one(fd, libc::POLLIN, 100);
        if rev & (libc::POLLHUP | libc::POLLERR) != 0 {
            if sh.connected.swap(false, Ordering::AcqRel) {
                split = LineSplitter::default();
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if !sh.connected.swap(true, Ordering::AcqRel) {
            // A (new) host: introduce ourselves first.
            sh.send(&AgentMsg::Hello(sh.hello()));
        }
        if rev & libc::POLLIN == 0 {
            continue;
        }
        match port.read(&mut buf) {
            Ok(0) => {
                sh.connected.store(false, Ordering::Release);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n) => {
                split.push(&buf[..n]);
                while let Some(line) = split.next_line() {
                    match line {
                        Ok(l) => handle(&sh, &l),
                        Err(e) => sh.send_error("bad_request", e.to_string()),
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
}
