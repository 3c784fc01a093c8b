//! The lab: namespaces, the WAN, hosts, a VM with a workload, and migrations between them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use roam_control::api::{MigrateRequest, MigrationResult, PeerAdd, Progress, VmCreate, Workload};
use roam_wan::netns::{self, NetNs};
use roam_wan::{LinkParams, PortConfig, Wan, WanConfig, WanHandle};
use thiserror::Error;
use tracing::info;

use crate::bins;
use crate::host::Host;

#[derive(Debug, Error)]
pub enum LabError {
    #[error("lab needs root (network namespaces, TUN devices)")]
    NotRoot,
    #[error("missing binary '{0}': build with `cargo build --bins` (scripts/demo.sh does)")]
    MissingBinary(String),
    #[error("{0}")]
    Io(String),
    #[error("network: {0}")]
    Net(String),
    #[error("host: {0}")]
    Host(String),
    #[error("control API: {0}")]
    Api(String),
}

impl From<roam_control::ClientError> for LabError {
    fn from(e: roam_control::ClientError) -> Self {
        LabError::Api(e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    pub link: LinkParams,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// Data written into the VM's filesystem before it boots.
    pub data_mib: u64,
    pub workload: Workload,
    /// Put the destination host's state directory on a tmpfs of this size (disk-full tests).
    pub home_state_limit_mib: Option<u64>,
    /// Keep the lab's directory (logs, state) after the end.
    pub keep: bool,
    /// Add a third namespace, "correspondent" (198.18.3.2/24), on the WAN: a machine
    /// that runs roam's HIP endpoint (`roam-hip`) and talks to VMs by HIT or LSI.
    pub correspondent: bool,
    /// Environment for both daemons from their first start (test hooks such as
    /// `ROAM_TEST_CUT_LOG`): per lab, where `std::env::set_var` would leak into the other
    /// tests of the same process.
    pub host_env: Vec<(String, String)>,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            link: LinkParams {
                bandwidth_mbit: 100.0,
                rtt_ms: 40.0,
                loss_pct: 0.1,
                ..LinkParams::default()
            },
            memory_mib: 512,
            disk_bytes: 2 << 30,
            data_mib: 256,
            workload: Workload {
                mem_dirty_mib_s: 32,
                mem_working_set_mib: 64,
                disk_writes_per_s: 50,
                ..Default::default()
            },
            home_state_limit_mib: None,
            keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
            correspondent: false,
            host_env: Vec::new(),
        }
    }
}

/// Host names and their WAN addresses (each on its own subnet).
pub const HOSTS: [(&str, &str); 2] = [("office", "198.18.1.2"), ("home", "198.18.2.2")];
/// The correspondent's WAN address (its own subnet), when the lab has one.
pub const CORRESPONDENT_IP: &str = "198.18.3.2";
/// A second subnet routed to the correspondent's namespace: where it goes when it moves.
pub const CORRESPONDENT_MOVED_NET: &str = "198.18.4.0/24";
/// Its HIP endpoint's UDP port.
pub const CORRESPONDENT_PORT: u16 = 10500;

pub struct Lab {
    pub cfg: LabConfig,
    pub root: PathBuf,
    pub hosts: Vec<Host>,
    pub wan: Option<WanHandle>,
    tmpfs: Option<PathBuf>,
    namespaces: Vec<NetNs>,
    /// The correspondent's `roam-hip run` process.
    correspondent: Option<std::process::Child>,
}

impl Lab {
    /// Build the namespaces, the WAN and the two hosts, and pin each host's key at the other.
    pub async fn start(cfg: LabConfig) -> Result<Lab, LabError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LabError::NotRoot);
        }
        let roamd = bins::find("roamd").ok_or_else(|| LabError::MissingBinary("roamd".into()))?;
        let root = std::env::temp_dir().join(netns::unique_name("roam-lab"));
        std::fs::create_dir_all(&root)
            .map_err(|e| LabError::Io(format!("create {}: {e}", root.display())))?;
        let mut lab = Lab {
            cfg: cfg.clone(),
            root: root.clone(),
            hosts: Vec::new(),
            wan: None,
            tmpfs: None,
            namespaces: Vec::new(),
            correspondent: None,
        };
        let mut ports = Vec::new();
        for (name, ip) in HOSTS {
            let ns = NetNs::create(&netns::unique_name(&format!("roam-{name}")))
                .map_err(|e| LabError::Net(e.to_string()))?;
            let cidr = format!("{ip}/24")
                .parse()
                .map_err(|e| LabError::Net(format!("{e}")))?;
            ports.push(PortConfig::new(name, ns.name(), cidr));
            lab.namespaces.push(ns);
        }
        if cfg.correspondent {
            let ns = NetNs::create(&netns::unique_name("roam-corr"))
                .map_err(|e| LabError::Net(e.to_string()))?;
            let cidr = format!("{CORRESPONDENT_IP}/24")
                .parse()
                .map_err(|e| LabError::Net(format!("{e}")))?;
            let mut port = PortConfig::new("correspondent", ns.name(), cidr);
            // A second subnet for a correspondent that moves (crate::hipproc).
            port.extra_prefixes.push(
                CORRESPONDENT_MOVED_NET
                    .parse()
                    .map_err(|e| LabError::Net(format!("{e}")))?,
            );
            ports.push(port);
            lab.namespaces.push(ns);
        }
        let wan = Wan::start(WanConfig::new(ports, cfg.link))
            .map_err(|e| LabError::Net(e.to_string()))?;
        lab.wan = Some(wan);
        if let Some(mib) = cfg.home_state_limit_mib {
            let dir = root.join("home");
            std::fs::create_dir_all(&dir).map_err(|e| LabError::Io(e.to_string()))?;
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "roam-lab"])
                .arg(&dir)
                .status()
                .map_err(|e| LabError::Io(format!("mount tmpfs: {e}")))?;
            if !st.success() {
                return Err(LabError::Io(format!("mount tmpfs on {}", dir.display())));
            }
            lab.tmpfs = Some(dir);
        }
        for (i, (name, ip)) in HOSTS.iter().enumerate() {
            let ns = lab.namespaces[i].name().to_string();
            let h = Host::start(name, &ns, ip, &root, &roamd, &cfg.host_env).await?;
            lab.hosts.push(h);
        }
        for i in 0..lab.hosts.len() {
            for j in 0..lab.hosts.len() {
                if i == j {
                    continue;
                }
                let req = PeerAdd {
                    name: lab.hosts[j].name.clone(),
                    addr: lab.hosts[j].addr.clone(),
                    key: lab.hosts[j].key.clone(),
                };
                lab.hosts[i].client.peer_add(&req).await?;
            }
        }
        info!(root = %root.display(), "lab ready");
        Ok(lab)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| &self.hosts[0])
    }

    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        let i = self.hosts.iter().position(|h| h.name == name).unwrap_or(0);
        &mut self.hosts[i]
    }

    pub fn wan(&self) -> &WanHandle {
        // The WAN lives as long as the lab; only Drop takes it.
        self.wan
            .as_ref()
            .unwrap_or_else(|| unreachable!("lab without WAN"))
    }

    /// Make a disk image with `data_mib` of files, create the VM on `host` and boot it.
    pub async fn create_vm(&self, host: &str, vm: &str) -> Result<(), LabError> {
        self.create_vm_with_rvs(host, vm, None).await
    }

    /// As [`Lab::create_vm`], registering the VM's HIT with a rendezvous server
    /// (`HIT@ADDR:PORT`).
    pub async fn create_vm_with_rvs(
        &self,
        host: &str,
        vm: &str,
        rvs: Option<String>,
    ) -> Result<(), LabError> {
        self.create_from(host, vm, self.cfg.data_mib, rvs).await
    }

    /// A demo disk image (the lab's disk size) with `data_mib` of generated data, in the
    /// lab's directory. Images share their first files: a common base image.
    pub fn make_image(&self, name: &str, data_mib: u64) -> Result<PathBuf, LabError> {
        let image = self.root.join(format!("{name}-image.raw"));
        make_disk(&image, self.cfg.disk_bytes, data_mib)?;
        Ok(image)
    }

    /// Like `create_vm`, with `data_mib` of generated data instead of the lab's: images
    /// made with the same seed share their first files (a common base image).
    pub async fn create_vm_with_data(
        &self,
        host: &str,
        vm: &str,
        data_mib: u64,
    ) -> Result<(), LabError> {
        self.create_from(host, vm, data_mib, None).await
    }

    async fn create_from(
        &self,
        host: &str,
        vm: &str,
        data_mib: u64,
        rvs: Option<String>,
    ) -> Result<(), LabError> {
        let image = self.make_image(vm, data_mib)?;
        let h = self.host(host);
        h.client
            .vm_create(&VmCreate {
                name: vm.to_string(),
                memory_mib: self.cfg.memory_mib,
                disk_bytes: self.cfg.disk_bytes,
                vcpus: 1,
                disk_image: Some(image.clone()),
                hip_peers: Vec::new(),
                hip_rvs: rvs,
            })
            .await?;
        let _ = std::fs::remove_file(&image);
        h.client.vm_start(vm).await?;
        Ok(())
    }

    pub async fn start_workload(&self, host: &str, vm: &str) -> Result<(), LabError> {
        self.host(host)
            .client
            .vm_workload(vm, &self.cfg.workload)
            .await?;
        Ok(())
    }

    pub async fn migrate(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        on_progress: impl FnMut(&Progress),
    ) -> Result<MigrationResult, LabError> {
        let req = MigrateRequest {
            vm: vm.to_string(),
            to: to.to_string(),
            postcopy: false,
            bandwidth_limit_mbit: None,
        };
        Ok(self.host(from).client.migrate(&req, on_progress).await?)
    }

    /// Files and processes a host left behind that a finished or failed migration must
    /// not leave: incoming disks, QEMU processes of VMs it does not run, stray sockets.
    pub fn debris(&self, host: &str) -> Vec<String> {
        let h = self.host(host);
        let mut out = Vec::new();
        let incoming = h.state.join("incoming");
        if let Ok(rd) = std::fs::read_dir(&incoming) {
            for e in rd.flatten() {
                out.push(format!("incoming file: {}", e.path().display()));
            }
        }
        // Migration sockets left in any VM's run directory.
        let vm_dirs = std::fs::read_dir(h.run_dir().join("vms"))
            .into_iter()
            .flatten()
            .flatten();
        for vm_dir in vm_dirs {
            let files = std::fs::read_dir(vm_dir.path())
                .into_iter()
                .flatten()
                .flatten();
            for f in files {
                if f.file_name().to_string_lossy().starts_with("migrate-") {
                    out.push(format!("migration socket: {}", f.path().display()));
                }
            }
        }
        out
    }

    /// NBD exports the host's roamd serves right now (asked with libnbd's `nbdinfo`).
    pub fn nbd_exports(&self, host: &str) -> Vec<String> {
        let h = self.host(host);
        let sock = h.run_dir().join("nbd.sock");
        let out = Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .output();
        let Ok(out) = out else {
            return vec!["<nbdinfo failed to run>".into()];
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["exports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["export-name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// QEMU processes whose command line names this lab's `host` run directory.
    pub fn qemu_processes(&self, host: &str) -> Vec<u32> {
        let run_dir = self.host(host).run_dir().display().to_string();
        let mut pids = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                    continue;
                };
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("qemu-system") && cmd.contains(&run_dir) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// The correspondent's namespace, when the lab has one.
    pub fn correspondent_ns(&self) -> Option<&str> {
        self.cfg
            .correspondent
            .then(|| self.namespaces.get(HOSTS.len()).map(|n| n.name()))
            .flatten()
    }

    /// Start roam's HIP endpoint in the correspondent namespace with a new identity, a
    /// TUN device and `peers` (`HIT@ADDR:PORT`); returns its control socket. Its log is
    /// `ROOT/correspondent.log`.
    pub async fn start_correspondent(&mut self, peers: &[String]) -> Result<PathBuf, LabError> {
        let ns = self
            .correspondent_ns()
            .ok_or_else(|| LabError::Net("the lab has no correspondent".into()))?
            .to_string();
        let hip =
            bins::find("roam-hip").ok_or_else(|| LabError::MissingBinary("roam-hip".into()))?;
        let id = self.root.join("correspondent.id");
        let _ = std::fs::remove_file(&id);
        let out = Command::new(&hip)
            .arg("keygen")
            .arg(&id)
            .output()
            .map_err(|e| LabError::Io(format!("run roam-hip keygen: {e}")))?;
        if !out.status.success() {
            return Err(LabError::Io(format!(
                "roam-hip keygen: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let control = self.root.join("correspondent.sock");
        let log_path = self.root.join("correspondent.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| LabError::Io(format!("create {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::Io(format!("log: {e}")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(&hip)
            .arg("run")
            .arg("--identity")
            .arg(&id)
            .arg("--listen")
            .arg(format!("{CORRESPONDENT_IP}:{CORRESPONDENT_PORT}"))
            .arg("--tun")
            .arg("hipc0")
            .arg("--control")
            .arg(&control);
        for p in peers {
            cmd.arg("--peer").arg(p);
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| LabError::Io(format!("spawn roam-hip: {e}")))?;
        self.correspondent = Some(child);
        if !wait_until(Duration::from_secs(10), || control.exists()).await {
            return Err(LabError::Net(format!(
                "the correspondent's endpoint did not start; see {}",
                log_path.display()
            )));
        }
        Ok(control)
    }

    fn stop_correspondent(&mut self) {
        if let Some(mut c) = self.correspondent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn shutdown(mut self) {
        self.stop_correspondent();
        for h in self.hosts.iter_mut() {
            h.stop().await;
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_correspondent();
        for h in self.hosts.iter_mut() {
            h.kill();
        }
        self.hosts.clear();
        if let Some(w) = self.wan.take() {
            w.shutdown();
        }
        self.namespaces.clear();
        if let Some(dir) = self.tmpfs.take() {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
        if !self.cfg.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `roam-mkdisk`: a sparse raw disk whose filesystem holds `data_mib` of files.
fn make_disk(path: &Path, bytes: u64, data_mib: u64) -> Result<(), LabError> {
    let mk =
        bins::find("roam-mkdisk").ok_or_else(|| LabError::MissingBinary("roam-mkdisk".into()))?;
    let out = Command::new(&mk)
        .arg("--size")
        .arg(bytes.to_string())
        .arg("--data-mib")
        .arg(data_mib.to_string())
        .arg(path)
        .output()
        .map_err(|e| LabError::Io(format!("run {}: {e}", mk.display())))?;
    if !out.status.success() {
        return Err(LabError::Io(format!(
            "roam-mkdisk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Poll until `f` is true or the time is up.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}
