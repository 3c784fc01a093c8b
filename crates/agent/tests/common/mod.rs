//! Helpers shared by the real-VM tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roam_agent::proto::READY_MARKER;

/// Kills and reaps QEMU however the test ends.
pub struct Qemu(Option<Child>);

impl Qemu {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn guest_dir() -> PathBuf {
    let cache = std::env::var_os("ROAM_CACHE").unwrap_or_else(|| "/var/cache/roam".into());
    PathBuf::from(cache).join("guest/current")
}

pub fn run_setup() {
    let t = Instant::now();
    let st = Command::new("bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .status()
        .expect("cannot run bash scripts/setup.sh");
    assert!(
        st.success(),
        "scripts/setup.sh failed ({st}); see its output above"
    );
    eprintln!("setup.sh took {:?}", t.elapsed());
}

/// Boots the guest of `scripts/setup.sh` under TCG: agent port on `sock`,
/// `image` as a file-backed virtio-blk disk, serial console to `serial`, plus
/// `extra` arguments (QMP, -incoming, …).
pub fn start_qemu(dir: &Path, image: &Path, sock: &Path, serial: &Path, extra: &[String]) -> Qemu {
    let g = guest_dir();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.join("guest.json")).expect("guest.json")).unwrap();
    let cmdline = meta["cmdline"].as_str().expect("cmdline in guest.json");
    let child = Command::new("qemu-system-x86_64")
        .current_dir(dir)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-no-reboot",
            "-name",
            &format!("roam-agent-test-{}", std::process::id()),
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join("initramfs.img"))
        .args(["-append", cmdline])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent0,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=agent0,name=org.roam.agent.0",
        ])
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            image.display()
        ))
        .args(["-blockdev", "driver=raw,file=f0,node-name=disk0"])
        .args(["-device", "virtio-blk-pci,drive=disk0"])
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start qemu-system-x86_64 (installed by scripts/setup.sh)");
    Qemu(Some(child))
}

pub async fn wait_marker(serial: &Path, qemu: &mut Qemu, timeout: Duration) {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(serial).unwrap_or_default();
        if log.contains(READY_MARKER) {
            eprintln!("guest ready after {:?}", start.elapsed());
            return;
        }
        if let Some(Some(st)) = qemu.0.as_mut().map(|c| c.try_wait().ok().flatten()) {
            panic!("qemu exited ({st}) before {READY_MARKER}; serial log:\n{log}");
        }
        assert!(
            start.elapsed() < timeout,
            "no {READY_MARKER} after {timeout:?}; serial log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
