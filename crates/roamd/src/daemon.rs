//! The daemon object: host state, running VMs, and the control API's implementation.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use roam_channel::{Endpoint, Identity, PublicKey, TrustSet};
use roam_control::api::{
    self as api, AgentStatus, ApiError, HostInfo, MigrateRequest, MigrationResult, PeerAdd,
    PeerInfo, Progress, ReplicaInfo, VmCreate, VmInfo, VmPeerAdd, VmState, Workload,
};
use roam_control::Host;
use roam_nbd::NbdServer;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{HostConfig, Paths};
use crate::error::{Error, Result};
use crate::runtime::RunningVm;
use crate::state::{PeerRecord, Store, VmRecord, VmStatus};

pub struct Daemon {
    pub cfg: HostConfig,
    pub paths: Paths,
    pub store: Store,
    pub identity: Identity,
    pub trust: Arc<TrustSet>,
    pub endpoint: Endpoint,
    pub nbd: Arc<NbdServer>,
    pub accel: roam_vm::Accel,
    /// VMs whose QEMU runs here, by name.
    pub vms: tokio::sync::Mutex<HashMap<String, Arc<RunningVm>>>,
    /// VMs in a migration (leaving or arriving): no other operation may touch them.
    pub busy: Mutex<HashSet<String>>,
    pub shutdown: CancellationToken,
    /// Background replicas: links of this host's VMs, replicas held for others.
    pub replication: crate::replication::Replication,
    /// This host's dedup index (every disk it holds), used by disk receivers.
    pub dedup: Arc<crate::dedup::Dedup>,
    /// The link rate last measured to each peer (see linkrate.rs).
    pub link_rates: crate::linkrate::LinkRates,
    /// Post-copy moves out whose destination may run the guest (QEMU completed, no
    /// `Running` heard): the VM stays paused here until that destination asks for the
    /// rest of the disk (`migration::resume`), which proves it owns the VM.
    pub unknown_handovers: Mutex<HashMap<String, crate::migration::resume::Handover>>,
    /// Lets `&self` trait methods hand an owning handle to long-lived tasks.
    me: std::sync::Weak<Daemon>,
}

#[derive(Debug, Serialize)]
pub struct InitOutput {
    pub name: String,
    pub key: String,
    pub listen: String,
    pub state: String,
}

/// `roamd init`: state directory, identity key, configuration. Re-running it on an
/// initialised directory keeps the key (and says so) instead of replacing the identity.
pub fn init(
    state: &Path,
    name: &str,
    listen: SocketAddr,
    run_dir: Option<PathBuf>,
) -> Result<InitOutput> {
    api::validate_name("host", name).map_err(|e| Error::BadRequest(e.message))?;
    std::fs::create_dir_all(state)
        .map_err(|e| Error::io(format!("create {}", state.display()), e))?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", state.display()), e))?;
    let cfg = HostConfig::new(name, listen, state, run_dir);
    let paths = Paths {
        state: state.to_path_buf(),
        run: cfg.run_dir.clone(),
    };
    let (identity, _created) = Identity::load_or_generate(&paths.identity())
        .map_err(|e| Error::State(format!("identity: {e}")))?;
    cfg.save(state)?;
    Store::open(&paths.db())?;
    Ok(InitOutput {
        name: cfg.name,
        key: identity.public_key().to_string(),
        listen: listen.to_string(),
        state: state.display().to_string(),
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `roamd run`.
pub async fn run(state: PathBuf, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = HostConfig::load(&state)?;
    let paths = Paths {
        state: state.clone(),
        run: cfg.run_dir.clone(),
    };
    // Nothing runs yet (QEMUs die with the daemon that spawned them): sockets and logs of
    // an earlier life are debris.
    let _ = std::fs::remove_dir_all(paths.run.join("vms"));
    for d in [&paths.run, &paths.run.join("vms")] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod {}", d.display()), e))?;
    }
    let store = Store::open(&paths.db())?;
    let identity = Identity::load(&paths.identity())
        .map_err(|e| Error::State(format!("identity {}: {e}", paths.identity().display())))?;
    let trust = Arc::new(TrustSet::new());
    for p in store.peers()? {
        match p.key.parse::<PublicKey>() {
            Ok(k) => {
                trust.insert(p.name.clone(), k);
            }
            Err(e) => warn!(peer = %p.name, "ignoring peer with unreadable key: {e}"),
        }
    }
    let endpoint = Endpoint::bind(
        cfg.listen,
        identity.clone(),
        trust.clone(),
        crate::replication::testhooks::channel_config(),
    )
    .map_err(|e| anyhow::anyhow!("peer channel on {}: {e}", cfg.listen))?;
    let nbd = Arc::new(
        NbdServer::bind(paths.nbd_socket(), Default::default())
            .map_err(|e| anyhow::anyhow!("NBD server: {e}"))?,
    );
    let accel = tokio::task::spawn_blocking(roam_vm::probe_accel).await?;
    // QEMU processes die with the daemon that spawned them, so nothing runs yet: a VM
    // recorded as running was interrupted. Say so; never pretend it still runs.
    for mut v in store.vms()? {
        if v.status == VmStatus::Running {
            warn!(vm = %v.name, "was running when roamd stopped; now stopped");
            v.status = VmStatus::Stopped;
            store.put_vm(&v)?;
        }
    }
    // Leftovers of migrations that were arriving when roamd stopped. A disk of this host
    // one of them had borrowed in place is given back first (it lives in there).
    crate::migration::dest::give_back_after_restart(&paths.state);
    let _ = std::fs::remove_dir_all(paths.state.join("incoming"));
    let shutdown = CancellationToken::new();
    let daemon = Arc::new_cyclic(|me| Daemon {
        cfg,
        paths,
        store,
        identity,
        trust,
        endpoint,
        nbd,
        accel,
        vms: Default::default(),
        busy: Default::default(),
        shutdown: shutdown.clone(),
        replication: Default::default(),
        dedup: Default::default(),
        link_rates: Default::default(),
        unknown_handovers: Default::default(),
        me: me.clone(),
    });
    daemon.dedup.start(
        daemon.paths.state.join("chunks.redb"),
        crate::dedup::disks_of(&daemon.store),
    );
    info!(
        host = %daemon.cfg.name,
        listen = %daemon.cfg.listen,
        key = %daemon.identity.public_key(),
        accel = ?daemon.accel,
        "roamd running"
    );
    let peers = tokio::spawn(crate::peer::accept_loop(daemon.clone()));
    crate::replication::start_saved(&daemon);
    crate::ownership::announce_at_start(&daemon);
    let sock = socket.unwrap_or_else(|| daemon.paths.control_socket());
    let host: Arc<dyn Host> = daemon.clone();
    let served = roam_control::serve(&sock, host, shutdown.clone()).await;
    shutdown.cancel();
    peers.abort();
    // VMs first: once their exports are gone, each replication link knows exactly what
    // its replica lacks, and keeps it for the next start (replication/carry.rs).
    daemon.stop_all().await;
    crate::replication::stop_all(&daemon).await;
    daemon.endpoint.close();
    served.map_err(|e| anyhow::anyhow!("control API on {}: {e}", sock.display()))
}

impl Daemon {
    pub fn self_arc(&self) -> Arc<Daemon> {
        // The daemon lives in an Arc for its whole life, so this cannot fail while a
        // method runs on it.
        self.me
            .upgrade()
            .unwrap_or_else(|| unreachable!("daemon used after drop"))
    }

    /// Mark `vm` busy for the life of the returned guard, or refuse.
    pub fn claim(self: &Arc<Self>, vm: &str) -> Result<BusyGuard> {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !b.insert(vm.to_string()) {
            return Err(Error::Conflict(format!(
                "VM '{vm}' is being migrated; try again when that ends"
            )));
        }
        Ok(BusyGuard {
            daemon: self.clone(),
            vm: vm.to_string(),
        })
    }

    pub fn vm_record(&self, name: &str) -> Result<VmRecord> {
        self.store
            .vm(name)?
            .ok_or_else(|| Error::not_found("VM", name))
    }

    pub async fn running(&self, name: &str) -> Option<Arc<RunningVm>> {
        self.vms.lock().await.get(name).cloned()
    }

    fn info(&self, r: &VmRecord, rt: Option<&Arc<RunningVm>>, busy: bool) -> VmInfo {
        let state = match (r.status, busy) {
            (_, true) => VmState::Migrating,
            (VmStatus::Running, _) => VmState::Running,
            (VmStatus::Stopped, _) => VmState::Stopped,
            (VmStatus::Moved, _) => VmState::Moved,
        };
        VmInfo {
            name: r.name.clone(),
            state,
            host: match (&r.moved_to, r.status) {
                (Some(to), VmStatus::Moved) => to.clone(),
                _ => self.cfg.name.clone(),
            },
            memory_mib: r.memory_mib,
            vcpus: r.vcpus,
            disk_bytes: r.disk_bytes,
            disk_path: PathBuf::from(&r.disk_path),
            accel: rt.map(|_| api_accel(self.accel)),
            pid: rt.and_then(|v| v.pid()),
            generation: r.generation,
            created_at: r.created_at,
            net: r.net.as_ref().and_then(|n| {
                let port = rt
                    .and_then(|v| v.net.as_ref())
                    .and_then(|n| n.listen())
                    .map(|a| a.port());
                crate::net::info(n, port)
                    .map_err(|e| warn!(vm = %r.name, "network identity: {e}"))
                    .ok()
            }),
            conflict: crate::ownership::conflict_info(self, r),
        }
    }

    pub async fn vm_info(&self, r: &VmRecord) -> VmInfo {
        let rt = self.running(&r.name).await;
        let busy = self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&r.name);
        self.info(r, rt.as_ref(), busy)
    }

    /// Quit every local QEMU (daemon shutdown).
    async fn stop_all(&self) {
        let all: Vec<_> = self.vms.lock().await.drain().collect();
        for (name, vm) in all {
            if let Err(e) = vm.stop(&self.nbd).await {
                warn!(vm = %name, "stop: {e}");
            }
            self.dedup.note_written(&vm);
            crate::replication::vm_stopped(self, &vm);
            if let Ok(Some(mut r)) = self.store.vm(&name) {
                if r.status == VmStatus::Running {
                    r.status = VmStatus::Stopped;
                    let _ = self.store.put_vm(&r);
                }
            }
        }
    }

    pub fn peer_record(&self, name: &str) -> Result<PeerRecord> {
        self.store
            .peer(name)?
            .ok_or_else(|| Error::not_found("peer", name))
    }

    /// A channel connection to the pinned peer `name`, which must answer within 10 s.
    pub async fn connect_peer(&self, name: &str) -> Result<roam_channel::Connection> {
        let p = self.peer_record(name)?;
        let key: PublicKey = p
            .key
            .parse()
            .map_err(|e| Error::State(format!("key of peer '{name}': {e}")))?;
        let addr: SocketAddr = p
            .addr
            .parse()
            .map_err(|e| Error::State(format!("address of peer '{name}': {e}")))?;
        let peer_err = |detail: String| Error::Peer {
            peer: name.to_string(),
            detail,
        };
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.endpoint.connect(addr, key),
        )
        .await
        .map_err(|_| peer_err(format!("no answer from {addr} within 10 s")))?
        .map_err(|e| peer_err(e.to_string()))
    }
}

pub fn api_accel(a: roam_vm::Accel) -> api::Accel {
    match a {
        roam_vm::Accel::Kvm => api::Accel::Kvm,
        roam_vm::Accel::Tcg => api::Accel::Tcg,
    }
}

/// Releases a VM's busy mark when dropped, whatever path the operation took.
pub struct BusyGuard {
    daemon: Arc<Daemon>,
    vm: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.daemon
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.vm);
    }
}

pub fn to_api(e: Error) -> ApiError {
    match e {
        Error::NotFound { .. } => ApiError::not_found(e.to_string()),
        Error::Conflict(_) => ApiError::conflict(e.to_string()),
        Error::BadRequest(_) => ApiError::bad_request(e.to_string()),
        Error::Peer { .. } => ApiError::peer_refused(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// Copy a disk file without filling its holes (and as a reflink where the filesystem
/// can): `cp` does both well. A partial copy is removed.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| Error::io("run cp", e))?;
    if !st.success() {
        let _ = std::fs::remove_file(to);
        return Err(Error::Disk(format!(
            "copying {} to {} failed ({st}); disk full?",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}

/// The disk this host kept when `vm` moved away, if it has one of `disk_bytes` bytes.
pub fn kept_disk(d: &Daemon, vm: &str, disk_bytes: u64) -> Option<PathBuf> {
    let r = d.store.vm(vm).ok()??;
    if r.status != VmStatus::Moved {
        return None;
    }
    let path = PathBuf::from(r.disk_path);
    let same_size = std::fs::metadata(&path)
        .map(|m| m.len() == disk_bytes)
        .unwrap_or(false);
    same_size.then_some(path)
}

#[async_trait]
impl Host for Daemon {
    async fn host_info(&self) -> Result<HostInfo, ApiError> {
        Ok(HostInfo {
            name: self.cfg.name.clone(),
            key: self.identity.public_key().to_string(),
            listen: self.cfg.listen.to_string(),
            accel: api_accel(self.accel),
            version: env!("CARGO_PKG_VERSION").to_string(),
            vms: self.store.vms().map_err(to_api)?.len() as u32,
            peers: self.store.peers().map_err(to_api)?.len() as u32,
        })
    }

    async fn peer_add(&self, req: PeerAdd) -> Result<PeerInfo, ApiError> {
        let key: PublicKey = req
            .key
            .parse()
            .map_err(|e| ApiError::bad_request(format!("peer key '{}': {e}", req.key)))?;
        let addr: SocketAddr = req.addr.parse().map_err(|e| {
            ApiError::bad_request(format!(
                "peer address '{}': {e} (expected IP:PORT)",
                req.addr
            ))
        })?;
        if req.name == self.cfg.name {
            return Err(ApiError::bad_request(format!(
                "'{}' is this host's own name",
                req.name
            )));
        }
        if let Some(old) = self.store.peer(&req.name).map_err(to_api)? {
            if old.key != key.to_string() || old.addr != addr.to_string() {
                return Err(ApiError::conflict(format!(
                    "peer '{}' exists with another key or address; remove it first",
                    req.name
                )));
            }
        }
        let rec = PeerRecord {
            name: req.name.clone(),
            addr: addr.to_string(),
            key: key.to_string(),
            rate_limit_mbit: None,
        };
        self.store.put_peer(&rec).map_err(to_api)?;
        self.trust.insert(req.name.clone(), key);
        info!(peer = %rec.name, addr = %rec.addr, "peer pinned");
        Ok(PeerInfo {
            name: rec.name,
            addr: rec.addr,
            key: rec.key,
            rate_limit_mbit: rec.rate_limit_mbit,
        })
    }

    async fn peer_list(&self) -> Result<Vec<PeerInfo>, ApiError> {
        Ok(self
            .store
            .peers()
            .map_err(to_api)?
            .into_iter()
            .map(|p| PeerInfo {
                name: p.name,
                addr: p.addr,
                key: p.key,
                rate_limit_mbit: p.rate_limit_mbit,
            })
            .collect())
    }

    async fn peer_remove(&self, name: &str) -> Result<(), ApiError> {
        let p = self.peer_record(name).map_err(to_api)?;
        self.store.remove_peer(name).map_err(to_api)?;
        if let Ok(k) = p.key.parse::<PublicKey>() {
            self.trust.remove(&k);
        }
        Ok(())
    }

    async fn vm_create(&self, req: VmCreate) -> Result<VmInfo, ApiError> {
        if self.store.vm(&req.name).map_err(to_api)?.is_some() {
            return Err(ApiError::conflict(format!(
                "VM '{}' already exists on this host",
                req.name
            )));
        }
        if req.memory_mib < 64 {
            return Err(ApiError::bad_request(format!(
                "memory {} MiB is too small (at least 64 MiB)",
                req.memory_mib
            )));
        }
        if req.disk_bytes < 1 << 20 || !req.disk_bytes.is_multiple_of(512) {
            return Err(ApiError::bad_request(format!(
                "disk size {} bytes: must be at least 1 MiB and a multiple of 512",
                req.disk_bytes
            )));
        }
        for f in [&self.cfg.kernel, &self.cfg.initrd] {
            if !f.exists() {
                return Err(ApiError::unavailable(format!(
                    "guest image file {} is missing (run scripts/setup.sh)",
                    f.display()
                )));
            }
        }
        for p in &req.hip_peers {
            p.parse::<roam_hipnet::PeerSpec>().map_err(|e| {
                ApiError::bad_request(format!("HIP peer '{p}': {e} (expected HIT@ADDR:PORT)"))
            })?;
        }
        let spec = roam_migrate::protocol::NetSpec {
            peers: req.hip_peers.clone(),
            rvs: req.hip_rvs.clone(),
            ..crate::net::new_spec()
        };
        crate::net::rvs_spec(&spec).map_err(to_api)?;
        let dir = self.paths.vm_dir(&req.name);
        let disk = self.paths.vm_disk(&req.name);
        let made: Result<()> = (|| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            if let Some(img) = &req.disk_image {
                copy_sparse(img, &disk)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&disk)
                .map_err(|e| Error::io(format!("create {}", disk.display()), e))?;
            let len = f.metadata().map_err(|e| Error::io("stat disk", e))?.len();
            if len > req.disk_bytes {
                return Err(Error::BadRequest(format!(
                    "image is {len} bytes, larger than the disk size {}",
                    req.disk_bytes
                )));
            }
            f.set_len(req.disk_bytes)
                .map_err(|e| Error::io("size disk", e))?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(to_api(e));
        }
        let rec = VmRecord {
            name: req.name.clone(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus.max(1),
            disk_bytes: req.disk_bytes,
            disk_path: disk.display().to_string(),
            kernel: self.cfg.kernel.display().to_string(),
            initrd: self.cfg.initrd.display().to_string(),
            cmdline: String::new(),
            status: VmStatus::Stopped,
            generation: 1,
            moved_to: None,
            created_at: now_secs(),
            net: Some(spec),
            // Hinting off: it stalls a TCG guest for 0.5–0.8 s when a migration starts
            // (its one vCPU reports every free page), which a peer's TCP stream sees as
            // a gap (HIP handover bench: 180–240 ms without, 550–880 ms with). Reporting
            // keeps free memory off the wire too, but the guest does that work in the
            // background, so nothing is left for the migration's start (docs/vm.md).
            free_page_hint: false,
            free_page_reporting: true,
        };
        self.store.put_vm(&rec).map_err(to_api)?;
        self.dedup.scan_disk(&disk);
        Ok(self.info(&rec, None, false))
    }

    async fn vm_list(&self) -> Result<Vec<VmInfo>, ApiError> {
        let mut out = Vec::new();
        for r in self.store.vms().map_err(to_api)? {
            out.push(self.vm_info(&r).await);
        }
        Ok(out)
    }

    async fn vm_show(&self, name: &str) -> Result<VmInfo, ApiError> {
        let r = self.vm_record(name).map_err(to_api)?;
        Ok(self.vm_info(&r).await)
    }

    async fn vm_peer_add(&self, name: &str, req: VmPeerAdd) -> Result<VmInfo, ApiError> {
        req.peer.parse::<roam_hipnet::PeerSpec>().map_err(|e| {
            ApiError::bad_request(format!(
                "HIP peer '{}': {e} (expected HIT@ADDR:PORT or HIT)",
                req.peer
            ))
        })?;
        // Not while a migration carries the record (and the endpoint's state) away.
        let _busy = self.self_arc().claim(name).map_err(to_api)?;
        let mut r = self.vm_record(name).map_err(to_api)?;
        if r.status == VmStatus::Moved {
            return Err(ApiError::conflict(format!(
                "VM '{name}' moved to '{}'; add the peer there",
                r.moved_to.as_deref().unwrap_or("?")
            )));
        }
        let Some(net) = r.net.as_mut() else {
            return Err(ApiError::bad_request(format!(
                "VM '{name}' has no network (created before HIP identities)"
            )));
        };
        if !req.peer.contains('@') && net.rvs.is_none() {
            return Err(ApiError::bad_request(format!(
                "HIP peer '{}' has no address and VM '{name}' has no rendezvous server",
                req.peer
            )));
        }
        if !net.peers.contains(&req.peer) {
            net.peers.push(req.peer.clone());
        }
        self.store.put_vm(&r).map_err(to_api)?;
        if let Some(n) = self.running(name).await.and_then(|rt| rt.net.clone()) {
            n.add_peer(&req.peer).await.map_err(to_api)?;
        }
        drop(_busy);
        Ok(self.vm_info(&r).await)
    }

    async fn vm_start(&self, name: &str) -> Result<VmInfo, ApiError> {
        let mut r = self.vm_record(name).map_err(to_api)?;
        match r.status {
            VmStatus::Moved => {
                return Err(ApiError::conflict(format!(
                    "VM '{name}' moved to '{}'; this host's copy must not run",
                    r.moved_to.as_deref().unwrap_or("?")
                )))
            }
            VmStatus::Running if self.running(name).await.is_some() => {
                return Ok(self.vm_info(&r).await)
            }
            _ => {}
        }
        crate::ownership::check_start(&self.self_arc(), name)
            .await
            .map_err(to_api)?;
        let rt = RunningVm::start(self, &r, false).await.map_err(to_api)?;
        rt.wait_agent(std::time::Duration::from_secs(60))
            .await
            .map_err(to_api)?;
        self.vms.lock().await.insert(name.to_string(), rt);
        r.status = VmStatus::Running;
        self.store.put_vm(&r).map_err(to_api)?;
        Ok(self.vm_info(&r).await)
    }

    async fn vm_stop(&self, name: &str) -> Result<VmInfo, ApiError> {
        let mut r = self.vm_record(name).map_err(to_api)?;
        if self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return Err(ApiError::conflict(format!("VM '{name}' is being migrated")));
        }
        let rt = self.vms.lock().await.remove(name);
        if let Some(rt) = rt {
            rt.stop(&self.nbd).await.map_err(to_api)?;
            self.dedup.note_written(&rt);
            crate::replication::vm_stopped(self, &rt);
        }
        if r.status == VmStatus::Running {
            r.status = VmStatus::Stopped;
            self.store.put_vm(&r).map_err(to_api)?;
        }
        Ok(self.vm_info(&r).await)
    }

    async fn vm_delete(&self, name: &str) -> Result<(), ApiError> {
        let r = self.vm_record(name).map_err(to_api)?;
        if self.running(name).await.is_some() {
            return Err(ApiError::conflict(format!(
                "VM '{name}' is running; stop it first"
            )));
        }
        self.store.remove_vm(name).map_err(to_api)?;
        self.dedup.forget_disk(std::path::Path::new(&r.disk_path));
        let _ = std::fs::remove_dir_all(self.paths.vm_dir(&r.name));
        Ok(())
    }

    async fn migrate(
        &self,
        req: MigrateRequest,
        progress: mpsc::Sender<Progress>,
    ) -> Result<MigrationResult, ApiError> {
        let me = self.self_arc();
        crate::migration::source::migrate(me, req, progress).await
    }

    async fn vm_workload(&self, name: &str, w: Workload) -> Result<AgentStatus, ApiError> {
        let rt = self.running(name).await.ok_or_else(|| {
            ApiError::conflict(format!("VM '{name}' is not running on this host"))
        })?;
        rt.agent
            .configure(roam_agent::WorkloadConfig {
                mem_dirty_mib_s: w.mem_dirty_mib_s,
                mem_working_set_mib: w.mem_working_set_mib,
                disk_writes_per_s: w.disk_writes_per_s,
                file_writes_per_s: w.file_writes_per_s,
                probe_reads_per_s: w.probe_reads_per_s,
                mem_incompressible: w.mem_incompressible,
            })
            .await
            .map_err(|e| ApiError::unavailable(format!("guest agent of '{name}': {e}")))?;
        *rt.workload.lock().unwrap_or_else(|p| p.into_inner()) = w;
        Ok(agent_status(&rt))
    }

    async fn vm_agent(&self, name: &str) -> Result<AgentStatus, ApiError> {
        let rt = self.running(name).await.ok_or_else(|| {
            ApiError::conflict(format!("VM '{name}' is not running on this host"))
        })?;
        Ok(agent_status(&rt))
    }

    async fn replica_add(&self, vm: &str, host: &str) -> Result<ReplicaInfo, ApiError> {
        crate::replication::add(&self.self_arc(), vm, host).await
    }

    async fn replica_remove(&self, vm: &str, host: &str) -> Result<(), ApiError> {
        crate::replication::remove(&self.self_arc(), vm, host).await
    }

    async fn replica_list(&self, vm: Option<&str>) -> Result<Vec<ReplicaInfo>, ApiError> {
        Ok(crate::replication::list(self, vm))
    }

    async fn host_log(&self) -> Result<Vec<serde_json::Value>, ApiError> {
        self.store.log_events(1000).map_err(to_api)
    }

    async fn vm_force_primary(
        &self,
        name: &str,
        req: api::ForcePrimary,
    ) -> Result<VmInfo, ApiError> {
        let by = req.by.unwrap_or_else(|| "unknown".into());
        crate::ownership::force_primary(&self.self_arc(), name, &by).await
    }

    async fn peer_set_limit(&self, name: &str, req: api::PeerLimit) -> Result<PeerInfo, ApiError> {
        crate::replication::set_limit(&self.self_arc(), name, req.mbit.filter(|&m| m > 0))
    }

    async fn shutdown(&self) -> Result<(), ApiError> {
        self.shutdown.cancel();
        Ok(())
    }
}

fn agent_status(rt: &RunningVm) -> AgentStatus {
    let s = rt.agent.snapshot();
    AgentStatus {
        connected: s.connected,
        boot_id: s.boot_id,
        heartbeats: s.heartbeats,
        last_heartbeat_unix_ms: s.last_heartbeat_unix_ms,
        max_gap_ms: s.max_gap_ms,
        acked_writes: s.acked,
        max_acked_seq: s.max_acked_seq,
        workload: *rt.workload.lock().unwrap_or_else(|p| p.into_inner()),
    }
}
