//! What a VM is made of, and the QEMU command line that makes it.
//!
//! [`VmConfig::argv`] is a pure function: same config, same argv. Both ends of a
//! migration must build their QEMU from the same config (only the run directory and
//! `incoming` differ), because QEMU matches devices by id and PCI slot when it loads
//! the migration stream; everything that shapes the guest is therefore explicit here
//! (versioned machine type, named CPU model, fixed device ids) rather than left to
//! QEMU's defaults, which can change between hosts.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::error::{Error, Result};

/// Largest unix socket path QEMU and the kernel accept (`sun_path` is 108 bytes incl. NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Name of the guest agent's virtio-serial port, as the agent looks for it in the guest.
pub const AGENT_PORT_NAME: &str = "org.roam.agent.0";

/// A MAC address for the guest NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The guest disk, served by an NBD server (roamd's own) on a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The NBD server's unix socket.
    pub socket: PathBuf,
    /// NBD export name.
    pub export: String,
    /// Seconds QEMU keeps guest I/O paused and retries after the NBD connection drops,
    /// so a restarting NBD server (roamd upgrade, switchover) is invisible to the guest
    /// instead of an I/O error. 0 disables reconnection.
    pub reconnect_delay_s: u32,
}

/// The guest NIC: Ethernet frames over a unix stream socket (4-byte big-endian length
/// prefix per frame) to roamd, which plays the virtual switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// roamd's listening unix socket for this VM's frames.
    pub socket: PathBuf,
    /// The guest MAC; it travels with the VM, so it must be the same on both hosts.
    pub mac: MacAddr,
}

/// Everything needed to start one QEMU for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// VM name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Per-VM run directory: QMP socket, serial log, agent socket, QEMU's stderr.
    pub run_dir: PathBuf,
    /// QEMU binary (looked up in `PATH` when not absolute).
    pub qemu_binary: PathBuf,
    /// Versioned machine type, so both hosts emulate the same board.
    pub machine: String,
    /// Named CPU model; `host` would tie the VM to one CPU type.
    pub cpu: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u16,
    /// Accelerator (see [`crate::probe_accel`]).
    pub accel: Accel,
    /// Guest kernel for direct boot.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after `console=ttyS0`.
    pub cmdline: String,
    /// Disk over NBD, if any.
    pub disk: Option<DiskConfig>,
    /// NIC over a unix stream socket, if any.
    pub nic: Option<NicConfig>,
    /// Give the guest a virtio-serial port for roam's agent (socket in the run dir).
    pub agent: bool,
    /// Free page hinting on a virtio-balloon device (QEMU's `free-page-hint`): when a
    /// migration starts, the guest's balloon driver names its free memory and QEMU
    /// skips those pages in the bulk copy. A long-running guest's free memory is full
    /// of stale data (freed page cache, exited programs), which would otherwise cross
    /// the WAN. The cost falls at migration start: the driver takes every free page
    /// then, which stalls a TCG guest for most of a second.
    ///
    /// This and `free_page_reporting` shape one balloon device (never inflated), which
    /// is part of the device set: both ends of a migration must agree, so it is
    /// recorded with the VM (older VMs have none).
    #[serde(default)]
    pub free_page_hint: bool,
    /// Free page reporting on the same device (QEMU's `free-page-reporting`): the guest
    /// reports free 2 MiB blocks as they settle, in the background, and QEMU discards
    /// them, so they read back as zero and migrate as zero pages. Same goal as hinting,
    /// with the work spread over the guest's life instead of the migration's start.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Start as a migration destination (`-incoming defer`, then `migrate-incoming`).
    pub incoming: bool,
    /// Do not run the guest by itself (`-S`): for a destination, the guest stays paused
    /// after the incoming migration completes until `cont` — so the caller can check
    /// something (roam: the disk digest) before the guest runs there.
    #[serde(default)]
    pub start_paused: bool,
    /// Keep the run directory after the VM ends (for post-mortems).
    pub keep_run_dir: bool,
}

impl VmConfig {
    /// A config with roam's defaults: 256 MiB, 1 vCPU, pc-q35-10.0, qemu64, agent on.
    pub fn new(
        name: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        accel: Accel,
    ) -> Self {
        VmConfig {
            name: name.into(),
            run_dir: run_dir.into(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            machine: "pc-q35-10.0".into(),
            cpu: "qemu64".into(),
            memory_mib: 256,
            vcpus: 1,
            accel,
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            disk: None,
            nic: None,
            agent: true,
            free_page_hint: false,
            free_page_reporting: false,
            incoming: false,
            start_paused: false,
            keep_run_dir: false,
        }
    }

    /// Paths of the files QEMU creates in the run directory.
    pub fn paths(&self) -> RunPaths {
        RunPaths::new(&self.run_dir)
    }

    /// The complete QEMU argv (without the binary itself).
    pub fn argv(&self) -> Result<Vec<String>> {
        self.validate()?;
        let p = self.paths();
        let mut a: Vec<String> = Vec::with_capacity(48);
        let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));

        push(&["-name", &format!("{},debug-threads=on", self.name)]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-machine", &self.machine]);
        push(&["-accel", self.accel.qemu_name()]);
        push(&["-cpu", &self.cpu]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.vcpus.to_string()]);

        push(&["-kernel", &opt_path(&self.kernel)?]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &opt_path(initrd)?]);
        }
        let mut cmdline = String::from("console=ttyS0");
        if !self.cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.cmdline.trim());
        }
        push(&["-append", &cmdline]);

        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                opt_path(&p.qmp)?
            ),
            "-mon",
            "chardev=qmp0,mode=control",
            // Out-of-band commands only (`crate::oob`): `migrate-recover` must get
            // through while the main loop waits for a missing post-copy page.
            "-chardev",
            &format!(
                "socket,id=qmp1,path={},server=on,wait=off",
                opt_path(&p.qmp_oob)?
            ),
            "-mon",
            "chardev=qmp1,mode=control",
        ]);
        // A file chardev, not a socket: the log must fill even when nobody is attached,
        // and a socket chardev with `wait=off` drops output while unconnected.
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", opt_path(&p.serial_log)?),
            "-serial",
            "chardev:serial0",
        ]);

        if let Some(disk) = &self.disk {
            let mut bd = format!(
                "driver=nbd,server.type=unix,server.path={},export={},node-name=disk0",
                opt_path(&disk.socket)?,
                escape_opt(&disk.export)
            );
            if disk.reconnect_delay_s > 0 {
                bd.push_str(&format!(",reconnect-delay={}", disk.reconnect_delay_s));
            }
            push(&["-blockdev", &bd]);
            push(&["-device", "virtio-blk-pci,id=vda,drive=disk0"]);
        }

        if let Some(nic) = &self.nic {
            push(&[
                "-netdev",
                &format!(
                    "stream,id=n0,server=off,addr.type=unix,addr.path={},reconnect-ms=200",
                    opt_path(&nic.socket)?
                ),
                "-device",
                &format!("virtio-net-pci,id=nic0,netdev=n0,mac={}", nic.mac),
            ]);
        }

        if self.agent {
            push(&[
                "-device",
                "virtio-serial-pci,id=vser0",
                "-chardev",
                &format!(
                    "socket,id=agent0,path={},server=on,wait=off",
                    opt_path(&p.agent)?
                ),
                "-device",
                &format!("virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}"),
            ]);
        }

        if self.free_page_hint || self.free_page_reporting {
            let mut dev = String::from("virtio-balloon-pci,id=balloon0");
            if self.free_page_hint {
                // QEMU requires an iothread for the hinting (it runs beside the migration).
                push(&["-object", "iothread,id=balloon-io"]);
                dev.push_str(",free-page-hint=on,iothread=balloon-io");
            }
            if self.free_page_reporting {
                dev.push_str(",free-page-reporting=on");
            }
            push(&["-device", &dev]);
        }

        if self.start_paused {
            push(&["-S"]);
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        Ok(a)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(format!("bad VM name {:?}", self.name));
        }
        if self.memory_mib < 16 {
            return bad(format!("memory {} MiB is too small", self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return bad(format!("vcpus {} out of range 1..=255", self.vcpus));
        }
        for (what, s) in [("machine", &self.machine), ("cpu", &self.cpu)] {
            if s.is_empty() || s.contains([',', '\n', '\0']) {
                return bad(format!("bad {what} {s:?}"));
            }
        }
        if self.cmdline.contains(['\n', '\0']) {
            return bad("kernel cmdline contains a newline or NUL".into());
        }
        let p = self.paths();
        let mut sockets = vec![p.qmp.clone(), p.qmp_oob.clone()];
        if self.agent {
            sockets.push(p.agent.clone());
        }
        if let Some(d) = &self.disk {
            if d.export.is_empty() || d.export.len() > 4096 {
                return bad("NBD export name must be 1..=4096 bytes".into());
            }
            sockets.push(d.socket.clone());
        }
        if let Some(n) = &self.nic {
            sockets.push(n.socket.clone());
        }
        for s in sockets {
            check_socket_path(&s)?;
        }
        Ok(())
    }
}

/// Files inside a VM's run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The run directory itself.
    pub dir: PathBuf,
    /// QMP control socket (QEMU listens).
    pub qmp: PathBuf,
    /// A second QMP monitor, for out-of-band commands (`crate::oob`).
    pub qmp_oob: PathBuf,
    /// Serial console output (ttyS0).
    pub serial_log: PathBuf,
    /// Guest agent channel (QEMU listens, roamd connects).
    pub agent: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
}

impl RunPaths {
    /// Paths for a run directory.
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            dir: dir.to_path_buf(),
            qmp: dir.join("qmp.sock"),
            qmp_oob: dir.join("qmp-oob.sock"),
            serial_log: dir.join("serial.log"),
            agent: dir.join("agent.sock"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

/// Fails when a path does not fit in `sockaddr_un`.
pub fn check_socket_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

/// QEMU's option parser splits on commas; a literal comma is written twice.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

fn opt_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Config(format!("path is not UTF-8: {}", p.display())))?;
    if s.contains(['\n', '\0']) {
        return Err(Error::Config(format!("path contains newline/NUL: {s:?}")));
    }
    Ok(escape_opt(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        let mut c = VmConfig::new("desk", "/run/roam/vm/desk", "/g/vmlinuz", Accel::Tcg);
        c.initrd = Some("/g/initramfs.img".into());
        c.cmdline = "quiet panic=-1".into();
        c
    }

    /// The value following `flag` for every occurrence of it.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn minimal_vm_argv() {
        let a = base().argv().unwrap();
        assert_eq!(values(&a, "-name"), ["desk,debug-threads=on"]);
        for f in ["-nodefaults", "-no-user-config"] {
            assert!(a.iter().any(|x| x == f), "{f} missing");
        }
        assert_eq!(values(&a, "-display"), ["none"]);
        assert_eq!(values(&a, "-machine"), ["pc-q35-10.0"]);
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert_eq!(values(&a, "-cpu"), ["qemu64"]);
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(values(&a, "-smp"), ["1"]);
        assert_eq!(values(&a, "-kernel"), ["/g/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/g/initramfs.img"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 quiet panic=-1"]);
        assert_eq!(
            values(&a, "-mon"),
            ["chardev=qmp0,mode=control", "chardev=qmp1,mode=control"]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
        let chardevs = values(&a, "-chardev");
        assert_eq!(
            chardevs,
            [
                "socket,id=qmp0,path=/run/roam/vm/desk/qmp.sock,server=on,wait=off",
                "socket,id=qmp1,path=/run/roam/vm/desk/qmp-oob.sock,server=on,wait=off",
                "file,id=serial0,path=/run/roam/vm/desk/serial.log",
                "socket,id=agent0,path=/run/roam/vm/desk/agent.sock,server=on,wait=off",
            ]
        );
        assert!(values(&a, "-blockdev").is_empty());
        assert!(values(&a, "-netdev").is_empty());
        assert!(values(&a, "-incoming").is_empty());
    }

    #[test]
    fn disk_nic_agent_and_incoming() {
        let mut c = base();
        c.accel = Accel::Kvm;
        c.memory_mib = 1024;
        c.vcpus = 2;
        c.disk = Some(DiskConfig {
            socket: "/run/roam/nbd.sock".into(),
            export: "desk-root".into(),
            reconnect_delay_s: 10,
        });
        c.nic = Some(NicConfig {
            socket: "/run/roam/vm/desk/net.sock".into(),
            mac: MacAddr([0x52, 0x54, 0x00, 0xab, 0x0c, 0x01]),
        });
        c.incoming = true;
        c.free_page_hint = true;
        let a = c.argv().unwrap();
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-m"), ["1024M"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(
            values(&a, "-blockdev"),
            ["driver=nbd,server.type=unix,server.path=/run/roam/nbd.sock,export=desk-root,node-name=disk0,reconnect-delay=10"]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["stream,id=n0,server=off,addr.type=unix,addr.path=/run/roam/vm/desk/net.sock,reconnect-ms=200"]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-blk-pci,id=vda,drive=disk0",
                "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:0c:01",
                "virtio-serial-pci,id=vser0",
                "virtserialport,bus=vser0.0,chardev=agent0,name=org.roam.agent.0",
                "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=balloon-io",
            ]
        );
        assert_eq!(values(&a, "-object"), ["iothread,id=balloon-io"]);
        assert_eq!(values(&a, "-incoming"), ["defer"]);
        assert_eq!(a.last().map(String::as_str), Some("defer"));
    }

    #[test]
    fn balloon_with_reporting_hinting_or_both() {
        let balloon = |hint: bool, report: bool| {
            let mut c = base();
            c.free_page_hint = hint;
            c.free_page_reporting = report;
            let a = c.argv().unwrap();
            let dev: Vec<String> = values(&a, "-device")
                .into_iter()
                .filter(|d| d.starts_with("virtio-balloon-pci"))
                .map(String::from)
                .collect();
            let obj: Vec<String> = values(&a, "-object")
                .into_iter()
                .map(String::from)
                .collect();
            (dev, obj)
        };
        assert_eq!(balloon(false, false), (vec![], vec![]));
        // Reporting runs in the guest's own time: no iothread.
        assert_eq!(
            balloon(false, true),
            (
                vec!["virtio-balloon-pci,id=balloon0,free-page-reporting=on".to_string()],
                vec![]
            )
        );
        assert_eq!(
            balloon(true, true),
            (
                vec![
                    "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=balloon-io,free-page-reporting=on"
                        .to_string()
                ],
                vec!["iothread,id=balloon-io".to_string()]
            )
        );
    }

    #[test]
    fn configs_without_free_page_reporting_still_load() {
        let mut c = base();
        c.free_page_hint = true;
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("free_page_reporting");
        let back: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn source_and_destination_differ_only_in_run_dir_and_incoming() {
        let src = base();
        let mut dst = base();
        dst.run_dir = "/run/roam/vm/desk-in".into();
        dst.incoming = true;
        let a = src.argv().unwrap();
        let b = dst.argv().unwrap();
        let strip = |v: Vec<String>, dir: &str| -> Vec<String> {
            v.into_iter()
                .filter(|x| x != "-incoming" && x != "defer")
                .map(|x| x.replace(dir, "RUN"))
                .collect()
        };
        assert_eq!(
            strip(a, "/run/roam/vm/desk"),
            strip(b, "/run/roam/vm/desk-in")
        );
    }

    #[test]
    fn commas_in_paths_are_escaped_and_agent_optional() {
        let mut c = base();
        c.run_dir = "/tmp/a,b".into();
        c.agent = false;
        let a = c.argv().unwrap();
        assert_eq!(
            values(&a, "-chardev")[0],
            "socket,id=qmp0,path=/tmp/a,,b/qmp.sock,server=on,wait=off"
        );
        assert!(values(&a, "-device").is_empty());
    }

    #[test]
    fn rejects_bad_configs() {
        let mut c = base();
        c.name = "a,b".into();
        assert!(matches!(c.argv(), Err(Error::Config(_))));
        let mut c = base();
        c.run_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(c.argv(), Err(Error::SocketPathTooLong { .. })));
        let mut c = base();
        c.vcpus = 0;
        assert!(c.argv().is_err());
        let mut c = base();
        c.cmdline = "a\nb".into();
        assert!(c.argv().is_err());
        let mut c = base();
        c.cpu = "host,+vmx".into();
        assert!(c.argv().is_err());
    }
}
