//! A test double of the daemon (pure in-memory state behind the real server) and a helper
//! that runs the real server on a temp unix socket.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use roam_control::api::*;
use roam_control::{serve, Host, ServeError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Behaviour of `migrate` in the fake, by VM name:
/// - "desk": three progress reports 400 ms apart (so the server must fill the gaps), then
///   a completed result;
/// - "flaky": one progress report, then an aborted result;
/// - "slow": progress for ~600 ms, sets `migrated_slow` when it finishes;
/// - anything else: not_found; destination "offline": peer_refused.
pub struct FakeHost {
    pub peers: Mutex<BTreeMap<String, PeerInfo>>,
    pub vms: Mutex<BTreeMap<String, VmInfo>>,
    pub cancel: CancellationToken,
    pub migrated_slow: AtomicBool,
    pub replicas: Mutex<Vec<ReplicaInfo>>,
}

impl FakeHost {
    pub fn new(cancel: CancellationToken) -> Self {
        FakeHost {
            peers: Mutex::default(),
            vms: Mutex::default(),
            cancel,
            migrated_slow: AtomicBool::new(false),
            replicas: Mutex::default(),
        }
    }
}

pub fn progress(phase: Phase, elapsed_ms: u64) -> Progress {
    Progress {
        phase,
        elapsed_ms,
        disk_sent_bytes: elapsed_ms * 1000,
        disk_total_bytes: 8 << 30,
        memory_sent_bytes: elapsed_ms * 2000,
        memory_remaining_bytes: 100 << 20,
        memory_total_bytes: 1 << 30,
        wire_bytes: elapsed_ms * 1500,
        rate_bytes_per_s: 12_500_000,
        eta_ms: Some(5000),
        dirty_rate_pages_per_s: Some(300),
    }
}

pub fn result(vm: &str, to: &str, outcome: Outcome) -> MigrationResult {
    MigrationResult {
        vm: vm.into(),
        from: "office".into(),
        to: to.into(),
        outcome,
        error: (outcome == Outcome::Aborted).then(|| "destination QEMU exited".to_string()),
        total_ms: 1234,
        downtime_ms: Some(45),
        guest_downtime_ms: Some(120),
        pause_ms: None,
        bytes: ByteCounts {
            memory: 1 << 30,
            disk: 100 << 20,
            wire: 300 << 20,
        },
        link: LinkStats {
            bandwidth_mbit: 100.0,
            rtt_ms: 30.0,
            loss_pct: 0.1,
        },
        acked_writes: 1000,
        acked_writes_lost: 0,
        guest_rebooted: false,
        accel: Accel::Tcg,
        phases: [
            (Phase::Connect, 10),
            (Phase::Memory, 900),
            (Phase::Switchover, 45),
        ]
        .into(),
        tuning: serde_json::json!({"capabilities": {"postcopy-ram": false}, "max-bandwidth": 12500000}),
        chunks_skipped: None,
        postcopy: None,
        chunks_deduped: None,
        least_bytes: None,
        chunks_offered: None,
    }
}

#[async_trait]
impl Host for FakeHost {
    async fn host_info(&self) -> Result<HostInfo, ApiError> {
        Ok(HostInfo {
            name: "office".into(),
            key: "ed25519:AAAA".into(),
            listen: "198.18.0.1:4433".into(),
            accel: Accel::Tcg,
            version: "0.1.0".into(),
            vms: self.vms.lock().unwrap().len() as u32,
            peers: self.peers.lock().unwrap().len() as u32,
        })
    }

    async fn peer_add(&self, req: PeerAdd) -> Result<PeerInfo, ApiError> {
        let mut peers = self.peers.lock().unwrap();
        if peers.contains_key(&req.name) {
            return Err(ApiError::conflict(format!("peer {} exists", req.name)));
        }
        let p = PeerInfo {
            name: req.name.clone(),
            addr: req.addr,
            key: req.key,
            rate_limit_mbit: None,
        };
        peers.insert(req.name, p.clone());
        Ok(p)
    }

    async fn peer_list(&self) -> Result<Vec<PeerInfo>, ApiError> {
        Ok(self.peers.lock().unwrap().values().cloned().collect())
    }

    async fn peer_remove(&self, name: &str) -> Result<(), ApiError> {
        self.peers
            .lock()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no peer {name}")))
    }

    async fn vm_create(&self, req: VmCreate) -> Result<VmInfo, ApiError> {
        let mut vms = self.vms.lock().unwrap();
        if vms.contains_key(&req.name) {
            return Err(ApiError::conflict(format!("vm {} exists", req.name)));
        }
        let v = VmInfo {
            name: req.name.clone(),
            state: VmState::Created,
            host: "office".into(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            disk_bytes: req.disk_bytes,
            disk_path: PathBuf::from(format!("/var/lib/roam/vms/{}/disk", req.name)),
            accel: None,
            pid: None,
            generation: 1,
            created_at: 1_795_000_000,
            net: None,
            conflict: None,
        };
        vms.insert(req.name, v.clone());
        Ok(v)
    }

    async fn vm_list(&self) -> Result<Vec<VmInfo>, ApiError> {
        Ok(self.vms.lock().unwrap().values().cloned().collect())
    }

    async fn vm_show(&self, name: &str) -> Result<VmInfo, ApiError> {
        self.vms
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no vm {name}")))
    }

    async fn vm_start(&self, name: &str) -> Result<VmInfo, ApiError> {
        let mut vms = self.vms.lock().unwrap();
        let v = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("no vm {name}")))?;
        if v.state == VmState::Running {
            return Err(ApiError::conflict(format!("vm {name} is already running")));
        }
        v.state = VmState::Running;
        v.pid = Some(4242);
        v.accel = Some(Accel::Tcg);
        Ok(v.clone())
    }

    async fn vm_stop(&self, name: &str) -> Result<VmInfo, ApiError> {
        let mut vms = self.vms.lock().unwrap();
        let v = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("no vm {name}")))?;
        v.state = VmState::Stopped;
        v.pid = None;
        Ok(v.clone())
    }

    async fn vm_delete(&self, name: &str) -> Result<(), ApiError> {
        let mut vms = self.vms.lock().unwrap();
        match vms.get(name).map(|v| v.state) {
            None => Err(ApiError::not_found(format!("no vm {name}"))),
            Some(VmState::Running) => Err(ApiError::conflict(format!("vm {name} is running"))),
            Some(_) => {
                vms.remove(name);
                Ok(())
            }
        }
    }

    async fn migrate(
        &self,
        req: MigrateRequest,
        progress_tx: mpsc::Sender<Progress>,
    ) -> Result<MigrationResult, ApiError> {
        if req.to == "offline" {
            return Err(ApiError::peer_refused("peer offline did not answer"));
        }
        match req.vm.as_str() {
            "desk" => {
                for (i, phase) in [Phase::Connect, Phase::Memory, Phase::Switchover]
                    .into_iter()
                    .enumerate()
                {
                    let _ = progress_tx.send(progress(phase, i as u64 * 400)).await;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                Ok(result(&req.vm, &req.to, Outcome::Completed))
            }
            "flaky" => {
                let _ = progress_tx.send(progress(Phase::Memory, 0)).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(result(&req.vm, &req.to, Outcome::Aborted))
            }
            "slow" => {
                for i in 0..30 {
                    // Ignore send errors as the trait docs allow; the server must keep draining.
                    let _ = progress_tx.send(progress(Phase::Memory, i * 20)).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.migrated_slow.store(true, Ordering::SeqCst);
                Ok(result(&req.vm, &req.to, Outcome::Completed))
            }
            other => Err(ApiError::not_found(format!("no vm {other}"))),
        }
    }

    async fn replica_add(&self, vm: &str, host: &str) -> Result<ReplicaInfo, ApiError> {
        if !self.vms.lock().unwrap().contains_key(vm) {
            return Err(ApiError::not_found(format!("no VM {vm}")));
        }
        let mut list = self.replicas.lock().unwrap();
        if list.iter().any(|r| r.vm == vm && r.host == host) {
            return Err(ApiError::conflict(format!("{vm} is replicated to {host}")));
        }
        let r = ReplicaInfo {
            vm: vm.into(),
            host: host.into(),
            state: ReplicaState::Seeding,
            lag_bytes: 8 << 30,
            lag_ms: 0,
            last_sync_unix_ms: None,
            generation: 1,
            error: None,
        };
        list.push(r.clone());
        Ok(r)
    }

    async fn replica_remove(&self, vm: &str, host: &str) -> Result<(), ApiError> {
        let mut list = self.replicas.lock().unwrap();
        let before = list.len();
        list.retain(|r| !(r.vm == vm && r.host == host));
        if list.len() == before {
            return Err(ApiError::not_found(format!("no replica of {vm} on {host}")));
        }
        Ok(())
    }

    async fn replica_list(&self, vm: Option<&str>) -> Result<Vec<ReplicaInfo>, ApiError> {
        let list = self.replicas.lock().unwrap();
        Ok(list
            .iter()
            .filter(|r| vm.is_none_or(|v| r.vm == v))
            .cloned()
            .collect())
    }

    async fn vm_peer_add(&self, name: &str, req: VmPeerAdd) -> Result<VmInfo, ApiError> {
        let mut vms = self.vms.lock().unwrap();
        let v = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("no vm {name}")))?;
        if !req.peer.starts_with("2001:2") {
            return Err(ApiError::bad_request(format!("HIP peer '{}'", req.peer)));
        }
        let net = v.net.get_or_insert_with(|| VmNetInfo {
            hit: "2001:2a::1".into(),
            lsi: "198.19.0.1".into(),
            mac: "52:54:00:00:00:01".into(),
            guest_ip: "198.18.100.2/24".into(),
            gateway: "198.18.100.1".into(),
            mtu: 1400,
            peers: Vec::new(),
            hip_port: None,
            rvs: None,
        });
        net.peers.push(req.peer);
        Ok(v.clone())
    }

    async fn shutdown(&self) -> Result<(), ApiError> {
        self.cancel.cancel();
        Ok(())
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub host: Arc<FakeHost>,
    pub cancel: CancellationToken,
    pub task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/roamd.sock");
        Self::start_at(dir, socket).await
    }

    pub async fn start_at(dir: tempfile::TempDir, socket: PathBuf) -> TestServer {
        let cancel = CancellationToken::new();
        let host = Arc::new(FakeHost::new(cancel.clone()));
        let task = {
            let (socket, host, cancel) = (socket.clone(), host.clone(), cancel.clone());
            tokio::spawn(async move { serve(&socket, host, cancel).await })
        };
        wait_for_socket(&socket).await;
        TestServer {
            dir,
            socket,
            host,
            cancel,
            task,
        }
    }

    pub fn client(&self) -> roam_control::Client {
        roam_control::Client::new(&self.socket)
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        (&mut self.task).await.unwrap().unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server did not come up at {}", path.display());
}
