//! A VM that runs on this host: its QEMU, its NBD export and its guest-agent link.
//!
//! ```text
//!   disk.raw ◀─ FileBackend ◀─ TrackedBackend (marks dirty chunks) ◀─ NBD export "NAME"
//!                                                   ▲                      ▲
//!                               migration subscribes┘        QEMU ─────────┘ (unix socket)
//!   QEMU ─virtio-serial─▶ RUN/vms/NAME/agent.sock ─▶ AgentMonitor
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use roam_agent::host::AgentMonitor;
use roam_nbd::{
    Backend, DirtySubscription, DirtyTracker, FileBackend, InitialState, NbdServer, TrackedBackend,
};
use roam_vm::VmEvent;
use roam_vm::{DiskConfig, Vm, VmConfig};
use tokio::sync::{broadcast, RwLock, RwLockReadGuard};
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::replication::carry::FileIdentity;
use crate::state::{VmRecord, VmStatus};

/// Chunk size of dirty tracking and of the disk copy (one BLAKE3 hash per chunk).
pub const CHUNK_SIZE: u32 = 64 * 1024;

/// A back end stacked on the disk file (post-copy's on-demand layer).
pub type BackendLayer = dyn Fn(Arc<dyn Backend>) -> Arc<dyn Backend> + Send + Sync;

pub struct RunningVm {
    pub name: String,
    /// QEMU; `None` once it has quit. Read-locked for every QMP call, write-locked
    /// only to quit (which consumes the handle).
    vm: RwLock<Option<Vm>>,
    pid: Option<u32>,
    pub config: VmConfig,
    pub tracker: Arc<DirtyTracker>,
    pub agent: AgentMonitor,
    /// Where the disk file is; it moves once, when an arriving VM is taken over.
    disk_path: std::sync::RwLock<PathBuf>,
    pub export: String,
    /// The synthetic workload last asked of the guest agent (it migrates with the guest).
    pub workload: std::sync::Mutex<roam_control::api::Workload>,
    /// The guest's LAN and HIP endpoint, for VMs with a network.
    pub net: Option<Arc<crate::net::VmNet>>,
    /// The disk's chunk hashes as they were when it arrived here, and what the guest
    /// wrote since: an outgoing migration then hashes only those chunks for its seal,
    /// not the whole disk (0.33 s per GiB of data on this machine, for a delta of a
    /// few MB). Set by an incoming pre-copy migration; taken by the next outgoing one.
    pub hash_cache: std::sync::Mutex<Option<HashCache>>,
    /// The disk file as it was before this QEMU could write it (`None` for an arriving
    /// VM, whose disk the migration writes): a replication carry must match it.
    pub started_on: Option<FileIdentity>,
    /// Every chunk this QEMU wrote, from before its export existed: a replication link
    /// that subscribes later adds these to what it carried over.
    pub since_start: DirtySubscription,
    /// The disk file once the export was gone and QEMU could write no more (set by
    /// `stop`): a replication link's state then describes the file exactly.
    pub quiesced: std::sync::OnceLock<FileIdentity>,
    /// A back end sits between the file and the tracker (an arriving post-copy's
    /// on-demand layer): its installs write the file without passing the tracker.
    pub layered: bool,
    /// That layer, once post-copy serves through it: when it is complete nothing writes
    /// beneath the tracker any more.
    pub ondemand: std::sync::OnceLock<Arc<roam_nbd::OnDemandBackend>>,
}

impl RunningVm {
    /// Whether every write to the disk file passes the tracker from now on (no post-copy
    /// installs still to come beneath it).
    pub fn tracker_sees_all(&self) -> bool {
        !self.layered || self.ondemand.get().is_some_and(|od| od.is_complete())
    }
}

/// Chunk hashes of a disk as of one moment, and a dirty subscription taken then.
pub struct HashCache {
    pub hashes: roam_migrate::ChunkHashes,
    pub since: roam_nbd::DirtySubscription,
}

impl HashCache {
    /// The hashes, with the chunks written since they were taken marked stale.
    pub fn into_known(self) -> (roam_migrate::ChunkHashes, Vec<bool>) {
        let mut stale = vec![false; self.hashes.len() as usize];
        for c in self.since.take() {
            if let Some(s) = stale.get_mut(c as usize) {
                *s = true;
            }
        }
        (self.hashes, stale)
    }
}

impl RunningVm {
    /// Serve the disk, spawn QEMU (as a migration destination when `incoming`), and
    /// connect the agent link. On any failure everything started so far is undone.
    pub async fn start(d: &Daemon, r: &VmRecord, incoming: bool) -> Result<Arc<RunningVm>> {
        Self::start_with_disk(d, r, PathBuf::from(&r.disk_path), incoming).await
    }

    pub async fn start_with_disk(
        d: &Daemon,
        r: &VmRecord,
        disk_path: PathBuf,
        incoming: bool,
    ) -> Result<Arc<RunningVm>> {
        Self::start_with_layer(d, r, disk_path, incoming, None).await
    }

    /// As [`start_with_disk`](Self::start_with_disk), with `layer` stacked between the
    /// file and the dirty tracker (post-copy: the on-demand back end).
    pub async fn start_with_layer(
        d: &Daemon,
        r: &VmRecord,
        disk_path: PathBuf,
        incoming: bool,
        layer: Option<&BackendLayer>,
    ) -> Result<Arc<RunningVm>> {
        let export = r.name.clone();
        let file = FileBackend::open(&disk_path, false)
            .map_err(|e| Error::io(format!("open disk {}", disk_path.display()), e))?;
        let tracker = DirtyTracker::new(file.size(), CHUNK_SIZE as u64)
            .map_err(|e| Error::Disk(e.to_string()))?;
        let since_start = tracker.subscribe(InitialState::Clean);
        let started_on = if incoming {
            None
        } else {
            FileIdentity::of(&disk_path).ok()
        };
        let file: Arc<dyn Backend> = Arc::new(file);
        let file = match layer {
            Some(wrap) => wrap(file),
            None => file,
        };
        let backend: Arc<dyn Backend> = Arc::new(
            TrackedBackend::new(file, tracker.clone()).map_err(|e| Error::Disk(e.to_string()))?,
        );
        d.nbd
            .add_export(&export, backend, false)
            .map_err(|e| Error::Disk(format!("NBD export '{export}': {e}")))?;
        let run_dir = d.paths.vm_run(&r.name);
        let _ = std::fs::remove_dir_all(&run_dir);
        // The LAN is served before QEMU starts (QEMU connects to it). The HIP endpoint of
        // an arriving VM starts only at the switch, from the source's associations.
        let net = match &r.net {
            Some(spec) => match start_net(d, spec, &run_dir, !incoming).await {
                Ok(n) => Some(n),
                Err(e) => {
                    let _ = remove_export(&d.nbd, &export).await;
                    return Err(e);
                }
            },
            None => None,
        };
        let mut config = VmConfig::new(&r.name, &run_dir, &r.kernel, d.accel);
        config.memory_mib = r.memory_mib as u32;
        config.vcpus = r.vcpus as u16;
        config.initrd = Some(PathBuf::from(&r.initrd));
        config.cmdline = r.cmdline.clone();
        if let (Some(spec), Some(n)) = (&r.net, &net) {
            config.nic = Some(roam_vm::NicConfig {
                socket: n.socket.clone(),
                mac: roam_vm::MacAddr(crate::net::parse_mac(&spec.mac)?),
            });
            // The image's init starts its echo service (port 7) when asked to.
            config.cmdline = format!("{} roam.echo=1", config.cmdline.trim())
                .trim()
                .to_string();
        }
        config.disk = Some(DiskConfig {
            socket: d.paths.nbd_socket(),
            export: export.clone(),
            reconnect_delay_s: 5,
        });
        config.agent = true;
        config.free_page_hint = r.free_page_hint;
        config.free_page_reporting = r.free_page_reporting;
        config.incoming = incoming;
        // A destination never runs the guest by itself: roamd does, once the disk is
        // proven equal (see migration/dest.rs).
        config.start_paused = incoming;
        let vm = match Vm::spawn(config.clone()).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = remove_export(&d.nbd, &export).await;
                if let Some(n) = &net {
                    n.net.stop().await;
                }
                return Err(Error::Vm(format!("start QEMU for '{}': {e}", r.name)));
            }
        };
        let agent = AgentMonitor::start(config.paths().agent.clone());
        info!(vm = %r.name, incoming, pid = ?vm.pid(), "QEMU started");
        let events = vm.subscribe();
        let rt = Arc::new(RunningVm {
            name: r.name.clone(),
            pid: vm.pid(),
            vm: RwLock::new(Some(vm)),
            config,
            tracker,
            agent,
            disk_path: std::sync::RwLock::new(disk_path),
            export,
            workload: Default::default(),
            net: net.map(|n| n.net),
            hash_cache: Default::default(),
            started_on,
            since_start,
            quiesced: Default::default(),
            layered: layer.is_some(),
            ondemand: Default::default(),
        });
        supervise(d.self_arc(), &rt, events);
        Ok(rt)
    }

    pub fn disk_path(&self) -> PathBuf {
        self.disk_path
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Move the disk file (QEMU and the NBD export keep their open descriptor).
    pub fn move_disk(&self, to: &std::path::Path) -> Result<()> {
        let mut p = self.disk_path.write().unwrap_or_else(|p| p.into_inner());
        std::fs::rename(&*p, to).map_err(|e| Error::io("move the disk into place", e))?;
        *p = to.to_path_buf();
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The QEMU handle, while QEMU runs.
    pub async fn vm(&self) -> Result<RwLockReadGuard<'_, Vm>> {
        RwLockReadGuard::try_map(self.vm.read().await, |v| v.as_ref())
            .map_err(|_| Error::Vm(format!("QEMU of '{}' has quit", self.name)))
    }

    /// Wait until the guest agent said hello (the guest booted and is usable).
    pub async fn wait_agent(&self, timeout: Duration) -> Result<()> {
        self.agent
            .wait_hello(timeout)
            .await
            .map(|_| ())
            .map_err(|e| Error::Vm(format!("guest agent of '{}': {e}", self.name)))
    }

    /// Quit QEMU (never `cont`: see the migration's ownership rule) and unpublish the disk.
    pub async fn stop(&self, nbd: &Arc<NbdServer>) -> Result<()> {
        let vm = self.vm.write().await.take();
        let quit = match vm {
            Some(vm) => vm.quit().await.map(|_| ()),
            None => Ok(()),
        };
        self.agent.stop();
        if let Some(n) = &self.net {
            n.stop().await;
        }
        remove_export(nbd, &self.export).await?;
        // One tick of the kernel's coarse file clock, so that a later write to the file
        // cannot carry the same ctime as QEMU's last one (see replication/carry.rs).
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(id) = FileIdentity::of(&self.disk_path()) {
            let _ = self.quiesced.set(id);
        }
        quit.map_err(|e| Error::Vm(format!("quit QEMU of '{}': {e}", self.name)))
    }
}

/// Watch QEMU: if it exits on its own (guest power-off, crash, killed) while it is this
/// host's running VM, say so, release its disk export and record the VM as stopped.
/// Intentional stops remove the VM from the running set first, so they are not reported.
fn supervise(d: Arc<Daemon>, rt: &Arc<RunningVm>, mut events: broadcast::Receiver<VmEvent>) {
    let weak = Arc::downgrade(rt);
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(VmEvent::QmpClosed) | Err(broadcast::error::RecvError::Closed) => break,
                _ => {}
            }
        }
        let Some(rt) = weak.upgrade() else {
            return;
        };
        let mine = {
            let mut vms = d.vms.lock().await;
            match vms.get(&rt.name) {
                Some(x) if Arc::ptr_eq(x, &rt) => {
                    vms.remove(&rt.name);
                    true
                }
                _ => false,
            }
        };
        if !mine {
            return;
        }
        warn!(vm = %rt.name, "QEMU exited on its own; the VM is now stopped");
        if let Err(e) = rt.stop(&d.nbd).await {
            warn!(vm = %rt.name, "after QEMU exited: {e}");
        }
        d.dedup.note_written(&rt);
        crate::replication::vm_stopped(&d, &rt);
        if let Ok(Some(mut r)) = d.store.vm(&rt.name) {
            if r.status == VmStatus::Running {
                r.status = VmStatus::Stopped;
                let _ = d.store.put_vm(&r);
                let _ = d.store.log(&serde_json::json!({
                    "event": "vm_exited", "vm": r.name,
                }));
            }
        }
    });
}

/// Removing an export waits for its clients to drain, which blocks.
pub async fn remove_export(nbd: &Arc<NbdServer>, export: &str) -> Result<()> {
    // Not block_in_place: that can retire a worker thread, and QEMU's parent-death signal
    // follows the thread that spawned it (see roam-vm).
    let (nbd, name) = (nbd.clone(), export.to_string());
    let r = tokio::task::spawn_blocking(move || nbd.remove_export(&name))
        .await
        .map_err(|e| Error::Disk(format!("remove NBD export '{export}': {e}")))?;
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            warn!(export, "remove NBD export: {e}");
            Err(Error::Disk(format!("remove NBD export '{export}': {e}")))
        }
    }
}

struct StartedNet {
    net: Arc<crate::net::VmNet>,
    socket: PathBuf,
}

/// Serve the VM's LAN in its run directory and, unless it is arriving, start its HIP
/// endpoint on the host's WAN address.
async fn start_net(
    d: &Daemon,
    spec: &roam_migrate::protocol::NetSpec,
    run_dir: &std::path::Path,
    endpoint: bool,
) -> Result<StartedNet> {
    std::fs::create_dir_all(run_dir)
        .map_err(|e| Error::io(format!("create {}", run_dir.display()), e))?;
    let socket = run_dir.join("net.sock");
    let net = crate::net::VmNet::serve(spec, &socket).await?;
    if endpoint {
        if let Err(e) = net.start_endpoint(d.cfg.listen.ip(), None).await {
            net.stop().await;
            return Err(e);
        }
    }
    Ok(StartedNet { net, socket })
}
