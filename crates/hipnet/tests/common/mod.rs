//! A three-namespace lab for the endpoint tests, torn down on drop:
//!
//! ```text
//!  corr (endpoint A)            router                  vmhost (endpoint B)
//!  198.18.3.2 ── veth ── 198.18.3.1 | 198.18.1.1 ── veth ── 198.18.1.2  (first locator)
//!                                   | 198.18.2.1 ── veth ── 198.18.2.2  (after the move)
//!                                   | 198.18.4.1 ── veth ── 198.18.4.2  rvs (optional)
//! ```
//! Each endpoint runs the real `roam-hip` binary inside its namespace with a
//! TUN device; test threads enter a namespace with setns(2) to open sockets.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roam_hipnet::config::{default_lsi, keygen};
use roam_hipnet::control;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn in_ns(ns: &str, cmd: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    sh(&v);
}

/// Runs `f` on a thread whose network namespace is `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on an open namespace descriptor; it affects only
        // this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

pub struct Endpoint {
    pub ns: String,
    pub ctl: PathBuf,
    pub hit: String,
    pub lsi: Ipv4Addr,
    pub log: PathBuf,
}

impl Endpoint {
    pub fn ctl(&self, req: &str) -> String {
        control::request(&self.ctl, req).unwrap()
    }

    pub fn stats(&self) -> std::collections::HashMap<String, u64> {
        control::parse_stats(&self.ctl("stats"))
    }
}

pub struct Lab {
    pub corr: Endpoint,
    pub vm: Endpoint,
    /// The rendezvous server, in its own namespace, when asked for.
    pub rvs: Option<Endpoint>,
    pub router: String,
    pub dir: PathBuf,
    children: Vec<Child>,
    /// Index in `children` of the running VM-side endpoint.
    vm_child: usize,
    namespaces: Vec<String>,
}

pub const CORR_ADDR: &str = "198.18.3.2";
pub const VM_ADDR1: &str = "198.18.1.2";
pub const VM_ADDR2: &str = "198.18.2.2";
pub const RVS_ADDR: &str = "198.18.4.2";

fn endpoint(ns: &str, dir: &Path, name: &str) -> Endpoint {
    Endpoint {
        ns: ns.to_string(),
        ctl: dir.join(format!("{name}.sock")),
        hit: String::new(),
        lsi: Ipv4Addr::UNSPECIFIED,
        log: dir.join(format!("{name}.log")),
    }
}

impl Lab {
    /// The correspondent knows the VM's HIT and first locator.
    pub fn new(tag: &str) -> Lab {
        Self::build(tag, false)
    }

    /// The correspondent knows only the VM's HIT and the RVS's address;
    /// the VM host registers with the RVS.
    pub fn with_rvs(tag: &str) -> Lab {
        Self::build(tag, true)
    }

    fn build(tag: &str, with_rvs: bool) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "namespace tests need root");
        let id = format!("{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("roam-hipnet-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (c, r, v) = (format!("rhc{id}"), format!("rhr{id}"), format!("rhv{id}"));
        let s_ns = format!("rhs{id}");
        let mut lab = Lab {
            corr: endpoint(&c, &dir, "corr"),
            vm: endpoint(&v, &dir, "vm"),
            rvs: with_rvs.then(|| endpoint(&s_ns, &dir, "rvs")),
            router: r.clone(),
            dir,
            children: Vec::new(),
            vm_child: 0,
            namespaces: Vec::new(),
        };
        let mut all = vec![&c, &r, &v];
        if with_rvs {
            all.push(&s_ns);
        }
        for ns in all {
            sh(&["ip", "netns", "add", ns]);
            lab.namespaces.push(ns.clone());
            in_ns(ns, &["ip", "link", "set", "lo", "up"]);
        }
        let link = |a: &str, an: &str, aip: &str, b: &str, bn: &str, bip: &str| {
            sh(&[
                "ip", "link", "add", an, "netns", a, "type", "veth", "peer", "name", bn, "netns", b,
            ]);
            in_ns(a, &["ip", "addr", "add", aip, "dev", an]);
            in_ns(a, &["ip", "link", "set", an, "up"]);
            in_ns(b, &["ip", "addr", "add", bip, "dev", bn]);
            in_ns(b, &["ip", "link", "set", bn, "up"]);
        };
        link(&c, "c0", "198.18.3.2/24", &r, "r3", "198.18.3.1/24");
        link(&v, "v1", "198.18.1.2/24", &r, "r1", "198.18.1.1/24");
        link(&v, "v2", "198.18.2.2/24", &r, "r2", "198.18.2.1/24");
        if with_rvs {
            link(&s_ns, "s0", "198.18.4.2/24", &r, "r4", "198.18.4.1/24");
            in_ns(
                &s_ns,
                &["ip", "route", "add", "default", "via", "198.18.4.1"],
            );
        }
        in_ns(&r, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        in_ns(&c, &["ip", "route", "add", "default", "via", "198.18.3.1"]);
        in_ns(&v, &["ip", "route", "add", "default", "via", "198.18.1.1"]);

        let (ida, idb) = (lab.dir.join("corr.id"), lab.dir.join("vm.id"));
        let (a, b) = (keygen(&ida).unwrap(), keygen(&idb).unwrap());
        lab.corr.hit = a.hit().to_string();
        lab.corr.lsi = default_lsi(&a.hit());
        lab.vm.hit = b.hit().to_string();
        lab.vm.lsi = default_lsi(&b.hit());
        let corr_listen = format!("{CORR_ADDR}:10500");
        let vm_listen = format!("{VM_ADDR1}:10500");
        if with_rvs {
            let ids = lab.dir.join("rvs.id");
            let rv = keygen(&ids).unwrap();
            let rvs_listen = format!("{RVS_ADDR}:10500");
            let ep = lab.rvs.as_mut().unwrap();
            ep.hit = rv.hit().to_string();
            ep.lsi = default_lsi(&rv.hit());
            lab.spawn(Which::Rvs, &ids, &rvs_listen, &["--no-tun", "--serve-rvs"]);
            let reg = format!("{}@{rvs_listen}", rv.hit());
            lab.spawn(Which::Vm, &idb, &vm_listen, &["--register", &reg]);
            let peer = lab.vm.hit.clone();
            lab.spawn(
                Which::Corr,
                &ida,
                &corr_listen,
                &["--peer", &peer, "--rvs", &rvs_listen],
            );
        } else {
            // The VM side knows nobody and answers whoever authenticates.
            let peer = format!("{}@{VM_ADDR1}:10500", lab.vm.hit);
            lab.spawn(Which::Corr, &ida, &corr_listen, &["--peer", &peer]);
            lab.spawn(Which::Vm, &idb, &vm_listen, &[]);
        }
        lab
    }

    fn spawn(&mut self, which: Which, id: &Path, listen: &str, extra: &[&str]) {
        let ep = match which {
            Which::Corr => &self.corr,
            Which::Vm => &self.vm,
            Which::Rvs => self.rvs.as_ref().unwrap(),
        };
        let log = std::fs::File::create(&ep.log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ep.ns,
            env!("CARGO_BIN_EXE_roam-hip"),
            "run",
        ])
        .arg("--identity")
        .arg(id)
        .args(["--listen", listen, "--tun", "hip0", "--control"])
        .arg(&ep.ctl)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
        let child = cmd.spawn().unwrap();
        if matches!(which, Which::Vm) {
            self.vm_child = self.children.len();
        }
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while control::request(&ep.ctl, "status").is_err() {
            assert!(Instant::now() < deadline, "endpoint did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hands the VM's associations to a new endpoint process listening on
    /// `listen`: `ctl export` stops the old one (it must not send another
    /// ESP sequence number), the new one starts with `--import`.
    pub fn handover_vm(&mut self, listen: &str) -> Duration {
        let t = Instant::now();
        let state = self.vm.ctl("export");
        assert!(!state.starts_with("error"), "{state}");
        let c = &mut self.children[self.vm_child];
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(c.try_wait(), Ok(None)) {
            assert!(Instant::now() < deadline, "old endpoint did not stop");
            std::thread::sleep(Duration::from_millis(2));
        }
        let file = self.dir.join("vm.state");
        std::fs::write(&file, state.trim()).unwrap();
        let idb = self.dir.join("vm.id");
        let log = self.dir.join("vm.log");
        let old = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::write(self.dir.join("vm-old.log"), old).unwrap();
        let f = file.to_str().unwrap().to_string();
        self.spawn(Which::Vm, &idb, listen, &["--import", &f]);
        t.elapsed()
    }

    pub fn logs(&self) -> String {
        let r = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("--- corr\n{}--- vm\n{}", r(&self.corr.log), r(&self.vm.log))
    }
}

#[derive(Clone, Copy)]
enum Which {
    Corr,
    Vm,
    Rvs,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Byte `i` of the test stream: a position-dependent pattern, so a lost,
/// duplicated or reordered byte shows up as a mismatch.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// An echo server in `ns` for `conns` connections on `port`.
pub fn echo_server(ns: &str, port: u16, conns: usize) -> std::thread::JoinHandle<()> {
    spawn_in(ns, move || {
        // A dual-stack listener: LSI (IPv4) and HIT (IPv6) connections.
        let l6 = TcpListener::bind(("::", port)).unwrap();
        l6.set_nonblocking(true).unwrap();
        let mut workers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while workers.len() < conns && Instant::now() < deadline {
            for l in [&l6] {
                if let Ok((mut s, _)) = l.accept() {
                    s.set_nonblocking(false).unwrap();
                    workers.push(std::thread::spawn(move || {
                        let mut r = s.try_clone().unwrap();
                        let _ = std::io::copy(&mut r, &mut s);
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for w in workers {
            w.join().unwrap();
        }
    })
}

/// What a client saw of its echoed stream.
#[derive(Debug)]
pub struct EchoResult {
    pub bytes: u64,
    /// Longest time between two reads that returned data.
    pub max_gap: Duration,
    /// When (after the first byte) the longest gap began.
    pub gap_at: Duration,
}

/// Connects to `to`, streams `total` pattern bytes in `chunk`-sized writes
/// every `pace`, and checks every echoed byte.
pub fn echo_client(
    ns: &str,
    to: SocketAddr,
    total: u64,
    chunk: usize,
    pace: Duration,
) -> std::thread::JoinHandle<EchoResult> {
    spawn_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut off = 0u64;
            while off < total {
                let n = chunk.min((total - off) as usize);
                let buf: Vec<u8> = (off..off + n as u64).map(pattern).collect();
                w.write_all(&buf).unwrap();
                off += n as u64;
                std::thread::sleep(pace);
            }
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut buf = vec![0u8; 65536];
        let mut got = 0u64;
        let start = Instant::now();
        let mut last: Option<Instant> = None;
        let (mut max_gap, mut gap_at) = (Duration::ZERO, Duration::ZERO);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let now = Instant::now();
            if let Some(l) = last {
                if now - l > max_gap {
                    max_gap = now - l;
                    gap_at = l - start;
                }
            }
            last = Some(now);
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern(got + k as u64),
                    "byte {} differs",
                    got + k as u64
                );
            }
            got += n as u64;
        }
        writer.join().unwrap();
        assert_eq!(got, total, "echoed stream length");
        EchoResult {
            bytes: got,
            max_gap,
            gap_at,
        }
    })
}
