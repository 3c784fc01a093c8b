//! Test support: a guest kernel+initramfs, a real NBD server, run directories.
//!
//! The guest is the shared image built by scripts/setup.sh
//! (/var/cache/roam/guest/current) when it exists. Otherwise a tiny one is built
//! once and cached: the Debian cloud kernel and busybox-static, fetched with
//! `apt-get download` and unpacked with `dpkg -x` (nothing installed on the host),
//! plus an init script, packed into a newc cpio written here.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roam_vm::{Accel, DiskConfig, VmConfig};

/// Serialises the QEMU-heavy tests: two cores are shared by many engineers.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHARED_GUEST: &str = "/var/cache/roam/guest/current";
const OWN_CACHE: &str = "/var/cache/roam/vm-test-guest";

/// Printed by our own init once the virtio drivers are loaded.
pub const OWN_READY: &str = "ROAM-GUEST-READY";
/// Printed by our own init when the virtio disk is visible.
pub const OWN_DISK: &str = "ROAM-DISK-OK vda";
/// Printed by our own init every 200 ms, with a counter.
pub const OWN_TICK: &str = "ROAM-TICK";
/// Printed by our own init after each uncached 4 KiB read of /dev/vda: `ROAM-IO ok N`
/// or `ROAM-IO err N`.
pub const OWN_IO: &str = "ROAM-IO";

#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Serial marker meaning "booted".
    pub ready_marker: String,
    /// Kernel command line the image wants (besides console=ttyS0).
    pub cmdline: String,
    /// true: our own image, whose init prints the OWN_* markers.
    pub own: bool,
}

/// The guest image to boot.
pub fn guest() -> Guest {
    static G: std::sync::OnceLock<Guest> = std::sync::OnceLock::new();
    G.get_or_init(|| shared_guest().unwrap_or_else(own_guest))
        .clone()
}

/// The image scripts/setup.sh builds, if it is complete. Its guest.json (format 1)
/// names the ready marker and the kernel command line.
fn shared_guest() -> Option<Guest> {
    let dir = Path::new(SHARED_GUEST);
    if !dir.join(".complete").exists() {
        return None;
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("guest.json")).ok()?).ok()?;
    if meta.get("format")?.as_u64()? != 1 {
        return None;
    }
    let cmdline = meta
        .get("cmdline")
        .and_then(|c| c.as_str())
        .unwrap_or("")
        .split_whitespace()
        .filter(|w| !w.starts_with("console="))
        .collect::<Vec<_>>()
        .join(" ");
    Some(Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.img"),
        ready_marker: meta.get("ready_marker")?.as_str()?.to_string(),
        cmdline,
        own: false,
    })
}

/// Our own image, whatever else exists (for tests that need our init's markers).
pub fn own_guest() -> Guest {
    static G: std::sync::OnceLock<Guest> = std::sync::OnceLock::new();
    G.get_or_init(build_own_guest).clone()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build_own_guest() -> Guest {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    let kpkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .expect("linux-image-cloud-amd64 names no kernel package")
        .trim()
        .to_string();
    let dir = Path::new(OWN_CACHE).join(format!("{kpkg}-v2"));
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.img"));
    let g = Guest {
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        ready_marker: OWN_READY.into(),
        cmdline: String::new(),
        own: true,
    };
    if kernel.exists() && initrd.exists() {
        return g;
    }
    std::fs::create_dir_all(OWN_CACHE).unwrap();
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(OWN_CACHE)
        .unwrap();
    let w = work.path();
    run(Command::new("apt-get")
        .current_dir(w)
        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .args([kpkg.as_str(), "busybox-static"]));
    for entry in std::fs::read_dir(w).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg").arg("-x").arg(&p).arg(w.join("root")));
        }
    }
    let root = w.join("root");
    let vmlinuz = std::fs::read_dir(root.join("boot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("no vmlinuz in kernel package");
    let modroot = std::fs::read_dir(root.join("lib/modules"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read(root.join("bin/busybox")).unwrap(),
    );
    cpio.symlink("bin/sh", "busybox");
    let mut names = Vec::new();
    for m in MODULES {
        if let Some(p) = find_module(&modroot, m) {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            cpio.file(
                &format!("lib/modules/{name}"),
                0o644,
                &std::fs::read(&p).unwrap(),
            );
            names.push(name);
        }
    }
    cpio.file("init", 0o755, init_script(&names).as_bytes());
    let tmp_initrd = w.join("initramfs.img");
    std::fs::write(&tmp_initrd, cpio.finish()).unwrap();
    std::fs::copy(&vmlinuz, w.join("vmlinuz")).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    // Rename last so a half-built image is never picked up.
    std::fs::rename(w.join("vmlinuz"), &kernel).unwrap();
    std::fs::rename(&tmp_initrd, &initrd).unwrap();
    g
}

/// Load order from the modules' `depends=` fields (the host has no depmod).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
];

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else {
            let f = p.file_name()?.to_string_lossy().into_owned();
            if f == format!("{name}.ko") || f == format!("{name}.ko.xz") {
                return Some(p);
            }
        }
    }
    None
}

fn init_script(modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n",
    );
    for m in modules {
        s.push_str(&format!("insmod /lib/modules/{m} 2>/dev/null\n"));
    }
    s.push_str(&format!(
        "i=0\n\
         while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done\n\
         [ -b /dev/vda ] && echo '{OWN_DISK}'\n\
         echo '{OWN_READY}'\n\
         n=0\n\
         while true; do\n\
           n=$((n+1)); echo \"{OWN_TICK} $n\"\n\
           if [ -b /dev/vda ]; then\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((n % 1000)) 2>/dev/null;\n\
             then echo \"{OWN_IO} ok $n\"; else echo \"{OWN_IO} err $n\"; fi\n\
           fi\n\
           sleep 0.2\n\
         done\n"
    ));
    s
}

/// A minimal newc cpio writer (the host has no `cpio`).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_len as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }
    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// A fresh short run-directory root under /tmp (unix socket paths stay short).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("roamvm-{}-", std::process::id()))
        .tempdir_in("/tmp")
        .unwrap()
}

/// A real NBD server (`qemu-nbd`) exporting a raw file on a unix socket.
pub struct NbdServer {
    child: Child,
    pub socket: PathBuf,
    pub export: String,
}

impl NbdServer {
    pub fn start(dir: &Path, size: u64) -> NbdServer {
        let image = dir.join("disk.raw");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        let socket = dir.join("nbd.sock");
        NbdServer {
            child: serve(&image, &socket),
            socket,
            export: "disk0".into(),
        }
    }

    /// Kills the server, waits `down_for`, and serves the same image on the same
    /// socket again.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        let _ = std::fs::remove_file(&self.socket);
        let image = self.socket.with_file_name("disk.raw");
        self.child = serve(&image, &self.socket);
    }

    pub fn disk(&self) -> DiskConfig {
        DiskConfig {
            socket: self.socket.clone(),
            export: self.export.clone(),
            reconnect_delay_s: 5,
        }
    }
}

fn serve(image: &Path, socket: &Path) -> Child {
    let mut child = Command::new("qemu-nbd")
        .arg("-k")
        .arg(socket)
        .args(["-f", "raw", "-x", "disk0", "-e", "4", "-t"])
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-nbd did not come up on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 256 MiB guest config in `run_dir`, booting the test guest. Always TCG: the
/// tests must behave the same on hosts whose KVM cannot run standard guests.
pub fn vm_config(name: &str, run_dir: &Path, disk: Option<DiskConfig>) -> VmConfig {
    vm_config_with(&guest(), name, run_dir, disk)
}

/// Like [`vm_config`], booting `g`.
pub fn vm_config_with(g: &Guest, name: &str, run_dir: &Path, disk: Option<DiskConfig>) -> VmConfig {
    let mut c = VmConfig::new(name, run_dir, &g.kernel, Accel::Tcg);
    c.initrd = Some(g.initrd.clone());
    c.cmdline = g.cmdline.clone();
    c.memory_mib = 256;
    c.disk = disk;
    c
}

/// Whether a process exists (a zombie counts as existing).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
