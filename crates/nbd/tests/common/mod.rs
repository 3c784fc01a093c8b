//! Shared helpers: a server on a temp socket, real-tool runners, a raw client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use roam_nbd::proto::handshake::{
    decode_greeting, info_requests, ClientFlags, ClientOption, InfoItem, OptionReplyHeader,
    GREETING_LEN,
};
use roam_nbd::proto::{rep, Request, SimpleReply};
use roam_nbd::{Backend, FileBackend, NbdServer, ServerConfig};

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: Option<NbdServer>,
    pub sock: PathBuf,
}

impl TestServer {
    /// A server with one writable export "disk" over a sparse file.
    pub fn start(size: u64) -> Self {
        let t = Self::empty();
        let fb = FileBackend::create(&t.dir.path().join("disk.raw"), size).unwrap();
        t.add("disk", Arc::new(fb), false);
        t
    }

    pub fn empty() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let config = ServerConfig {
            drain_grace: Duration::from_millis(500),
            ..ServerConfig::default()
        };
        let server = NbdServer::bind(&sock, config).unwrap();
        TestServer {
            dir,
            server: Some(server),
            sock,
        }
    }

    pub fn add(&self, name: &str, b: Arc<dyn Backend>, ro: bool) {
        self.server().add_export(name, b, ro).unwrap();
    }

    pub fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }

    pub fn file(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

/// Runs a tool under `timeout` so a hung peer fails the test instead of
/// hanging it. Returns (success, stdout+stderr).
pub fn run(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let (ok, out) = run("qemu-io", &args);
    // qemu-io exits 0 even when a command fails; its messages say so.
    let failed =
        out.contains("failed") || out.contains("Pattern verification") || out.contains("error");
    (ok && !failed, out)
}

/// A hand-driven NBD client for malformed-traffic and ordering tests.
pub struct RawClient {
    pub s: UnixStream,
}

impl RawClient {
    pub fn connect(sock: &std::path::Path) -> Self {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient { s }
    }

    /// Reads the greeting and sends client flags.
    pub fn greet(&mut self) {
        let mut g = [0u8; GREETING_LEN];
        self.s.read_exact(&mut g).unwrap();
        decode_greeting(&g).unwrap();
        self.s
            .write_all(&ClientFlags { no_zeroes: true }.encode())
            .unwrap();
    }

    pub fn send_option(&mut self, o: &ClientOption<'_>) {
        let mut v = Vec::new();
        o.encode(&mut v);
        self.s.write_all(&v).unwrap();
    }

    pub fn read_option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OptionReplyHeader::LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        assert!(h.length < 1 << 20);
        let mut body = vec![0u8; h.length as usize];
        self.s.read_exact(&mut body).unwrap();
        (h, body)
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        self.greet();
        self.send_option(&ClientOption::Go {
            name: export,
            requests: info_requests(&[0, 3]),
        });
        let mut export_info = None;
        loop {
            let (h, body) = self.read_option_reply();
            match h.reply_type {
                rep::INFO => {
                    if let InfoItem::Export { size, flags } = InfoItem::decode(&body).unwrap() {
                        export_info = Some((size, flags));
                    }
                }
                rep::ACK => return export_info.unwrap(),
                t => panic!("GO failed: reply type {t:#x}"),
            }
        }
    }

    pub fn send_request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    pub fn read_reply(&mut self) -> SimpleReply {
        let mut b = [0u8; SimpleReply::LEN];
        self.s.read_exact(&mut b).unwrap();
        SimpleReply::decode(&b).unwrap()
    }

    /// True if the server closed the connection (EOF or reset) within 10 s.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts panics on server threads (named `nbd-*`), keeping the default
/// report, so a test can assert the server never panicked.
pub fn count_server_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("nbd-"))
            {
                PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            prev(info);
        }));
    });
}

pub fn server_panics() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}
