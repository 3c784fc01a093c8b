//! The baseline for the storage benchmarks: QEMU moving a VM with its local disk by its
//! own means, as libvirt's `virsh migrate --live --copy-storage-all` does, over the lab's
//! emulated WAN.
//!
//! ```text
//!  from-ns: QEMU (disk: raw file) ──blockdev-mirror sync=full──▶ NBD ══ WAN ══▶ to-ns: QEMU
//!           then `migrate tcp:` (RAM + devices) ══════════════════ WAN ══▶ -incoming defer
//!           once migrated: block-job-cancel (a ready mirror: the copy is complete)
//! ```
//!
//! Both QEMUs run in the lab's namespaces, the destination's NBD export (QEMU's own
//! `block-export-add`) listens on its WAN address, so every byte crosses the same
//! emulated link as roam's. Bytes are counted by the WAN (IP packets, both directions).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::lab::{Lab, LabError};

const NBD_PORT: u16 = 10809;
const MIGRATE_PORT: u16 = 4444;

/// What the baseline move cost.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineMove {
    /// IP bytes the WAN carried in both directions during the move.
    pub wire_bytes: u64,
    /// From the start of the disk mirror to QEMU's migration completed and the mirror
    /// cancelled (libvirt's order).
    pub seconds: f64,
    /// Of which: the disk mirror until it reported ready.
    pub mirror_seconds: f64,
    /// QEMU's own RAM figure.
    pub ram_bytes: u64,
}

/// A child process, killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A baseline QEMU and its monitor (the QMP connection goes first when dropped).
struct Qemu {
    qmp: Qmp,
    _child: ChildGuard,
}

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Result<Qmp, LabError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(LabError::Io(format!("QMP {}: {e}", path.display())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (r, w) = s.into_split();
        let mut q = Qmp {
            r: BufReader::new(r),
            w,
        };
        q.line().await?; // greeting
        q.cmd("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, LabError> {
        let mut l = String::new();
        let n = self
            .r
            .read_line(&mut l)
            .await
            .map_err(|e| LabError::Io(format!("QMP read: {e}")))?;
        if n == 0 {
            return Err(LabError::Io("QMP closed".into()));
        }
        serde_json::from_str(&l).map_err(|e| LabError::Io(format!("QMP json: {e}")))
    }

    async fn cmd(&mut self, name: &str, args: Value) -> Result<Value, LabError> {
        let mut m = serde_json::to_vec(&json!({"execute": name, "arguments": args}))
            .map_err(|e| LabError::Io(e.to_string()))?;
        m.push(b'\n');
        self.w
            .write_all(&m)
            .await
            .map_err(|e| LabError::Io(format!("QMP write: {e}")))?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(LabError::Io(format!("QMP {name}: {e}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

fn guest_files() -> (PathBuf, PathBuf) {
    let g = PathBuf::from("/var/cache/roam/guest/current");
    (g.join("vmlinuz"), g.join("initramfs.img"))
}

async fn spawn_qemu(
    netns: &str,
    dir: &Path,
    name: &str,
    disk: &Path,
    memory_mib: u64,
    incoming: bool,
) -> Result<Qemu, LabError> {
    let (kernel, initrd) = guest_files();
    let qmp = dir.join(format!("{name}.qmp"));
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, "qemu-system-x86_64"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", "pc-q35-10.0", "-accel", "tcg", "-cpu", "qemu64"])
        .args(["-m", &format!("{memory_mib}M"), "-smp", "1"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{name}.serial")).display()
        ))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0,cache.direct=off",
            disk.display()
        ))
        .args(["-blockdev", "driver=raw,file=f0,node-name=disk0"])
        .args(["-device", "virtio-blk-pci,id=vda,drive=disk0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join(format!("{name}.stderr")))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    // Guarded at once: reaped even if the QMP connection fails.
    let child = ChildGuard(
        c.spawn()
            .map_err(|e| LabError::Io(format!("spawn QEMU: {e}")))?,
    );
    let qmp = Qmp::connect(&qmp).await?;
    Ok(Qemu { qmp, _child: child })
}

fn wan_bytes(lab: &Lab) -> u64 {
    lab.wan().stats().links.iter().map(|l| l.fwd_bytes).sum()
}

/// Copy a (sparse) disk file for a baseline run.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<(), LabError> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| LabError::Io(format!("cp: {e}")))?;
    if !st.success() {
        return Err(LabError::Io(format!("cp {} failed", from.display())));
    }
    Ok(())
}

/// Move a VM whose disk is a copy of `disk` from host `from` to host `to` the way
/// libvirt's `--copy-storage-all` does; return the WAN bytes and the time.
pub async fn copy_storage_all(
    lab: &Lab,
    from: &str,
    to: &str,
    disk: &Path,
    memory_mib: u64,
) -> Result<BaselineMove, LabError> {
    let dir = lab.root.join(format!("baseline-{from}-{to}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| LabError::Io(e.to_string()))?;
    let src_disk = dir.join("src.raw");
    sparse_copy(disk, &src_disk)?;
    let size = std::fs::metadata(&src_disk)
        .map_err(|e| LabError::Io(e.to_string()))?
        .len();
    let dst_disk = dir.join("dst.raw");
    std::fs::File::create(&dst_disk)
        .and_then(|f| f.set_len(size))
        .map_err(|e| LabError::Io(e.to_string()))?;
    let to_ip = lab
        .host(to)
        .addr
        .split(':')
        .next()
        .unwrap_or("")
        .to_string();

    let mut dst = spawn_qemu(
        &lab.host(to).netns,
        &dir,
        "dst",
        &dst_disk,
        memory_mib,
        true,
    )
    .await?;
    let mut src = spawn_qemu(
        &lab.host(from).netns,
        &dir,
        "src",
        &src_disk,
        memory_mib,
        false,
    )
    .await?;
    // Let the guest boot (its memory is then what a running guest's is).
    let serial = dir.join("src.serial");
    let booted = crate::lab::wait_until(Duration::from_secs(90), || {
        std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("ROAM-GUEST-READY"))
    })
    .await;
    if !booted {
        return Err(LabError::Io("baseline guest did not boot".into()));
    }

    // Destination: NBD export of its (empty) disk on the WAN address, and listen for RAM.
    dst.qmp
        .cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": to_ip, "port": NBD_PORT.to_string()}}}),
        )
        .await?;
    dst.qmp
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}),
        )
        .await?;
    dst.qmp
        .cmd(
            "migrate-incoming",
            json!({"uri": format!("tcp:{to_ip}:{MIGRATE_PORT}")}),
        )
        .await?;

    let bytes0 = wan_bytes(lab);
    let t0 = Instant::now();
    src.qmp
        .cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "target0", "export": "disk0",
                   "server": {"type": "inet", "host": to_ip, "port": NBD_PORT.to_string()}}),
        )
        .await?;
    src.qmp
        .cmd(
            "blockdev-mirror",
            json!({"job-id": "m0", "device": "disk0", "target": "target0", "sync": "full"}),
        )
        .await?;
    loop {
        let jobs = src.qmp.cmd("query-block-jobs", json!({})).await?;
        let ready = jobs
            .as_array()
            .and_then(|a| a.first())
            .and_then(|j| j.get("ready"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if ready {
            break;
        }
        if jobs.as_array().is_some_and(|a| a.is_empty()) {
            let tail = |n: &str| {
                std::fs::read_to_string(dir.join(format!("{n}.stderr"))).unwrap_or_default()
            };
            return Err(LabError::Io(format!(
                "baseline mirror job ended before it was ready; source QEMU: {} destination \
                 QEMU: {}",
                tail("src").trim(),
                tail("dst").trim()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mirror_seconds = t0.elapsed().as_secs_f64();
    src.qmp
        .cmd(
            "migrate",
            json!({"uri": format!("tcp:{to_ip}:{MIGRATE_PORT}")}),
        )
        .await?;
    let ram_bytes;
    loop {
        let st = src.qmp.cmd("query-migrate", json!({})).await?;
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => {
                ram_bytes = st
                    .pointer("/ram/transferred")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                break;
            }
            Some("failed") | Some("cancelled") => {
                return Err(LabError::Io(format!("baseline migration: {st}")))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    src.qmp
        .cmd("block-job-cancel", json!({"device": "m0"}))
        .await?;
    loop {
        let jobs = src.qmp.cmd("query-block-jobs", json!({})).await?;
        if jobs.as_array().is_none_or(|a| a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let wire_bytes = wan_bytes(lab).saturating_sub(bytes0);
    dst.qmp.cmd("nbd-server-stop", json!({})).await?;
    dst.qmp.cmd("cont", json!({})).await?;
    let _ = src.qmp.cmd("quit", json!({})).await;
    let _ = dst.qmp.cmd("quit", json!({})).await;
    drop(src);
    drop(dst);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BaselineMove {
        wire_bytes,
        seconds,
        mirror_seconds,
        ram_bytes,
    })
}
