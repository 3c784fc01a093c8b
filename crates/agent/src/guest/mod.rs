//! The guest side: what the static `roam-agent` binary runs inside the VM.
//!
//! ```text
//!   hb thread ──(every 10 ms)──┐
//!   disk thread ──(ack after O_DSYNC write)──┤ bounded queue ──> writer thread ──> /dev/vportNpM
//!   verify thread ──(verify_report)──┘     (dropped while the host is away)
//!   mem thread: dirties its working set          reader (main thread) <── /dev/vportNpM
//!   files thread: fsynced ext4 churn in /data      config / verify / ping
//!   probe thread: single-block O_DIRECT reads of /data files
//! ```
//! Nothing waits on the host: while the chardev has no client (e.g. during a
//! migration, before the destination's monitor connects) messages are dropped,
//! never buffered without bound, and the workloads keep going.

pub mod disk;
pub mod files;
pub mod mem;
pub mod port;
pub mod probe;
pub mod sys;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{self, AgentMsg, BootId, Heartbeat, Hello, LogRegion, WorkloadConfig};

/// Outgoing lines queued at most (about 10 s of heartbeats).
pub const OUT_QUEUE: usize = 1024;
pub const HB_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("state dir {0}: {1}")]
    State(PathBuf, std::io::Error),
    #[error("agent port: {0}")]
    Port(std::io::Error),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

/// Where things are; overridable by environment for testing outside a VM.
#[derive(Clone, Debug)]
pub struct Paths {
    /// tmpfs directory for the boot id and next seq (`ROAM_AGENT_STATE_DIR`).
    pub state_dir: PathBuf,
    /// The disk with the log region (`ROAM_AGENT_DISK`).
    pub disk: PathBuf,
    /// Mount point of the data file system (`ROAM_AGENT_DATA`).
    pub data_dir: PathBuf,
    /// The port device; found by name under /sys/class/virtio-ports if unset
    /// (`ROAM_AGENT_PORT`).
    pub port: Option<PathBuf>,
}

impl Paths {
    pub fn from_env() -> Paths {
        let get = |k: &str, d: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| d.into()));
        Paths {
            state_dir: get("ROAM_AGENT_STATE_DIR", "/run/roam"),
            disk: get("ROAM_AGENT_DISK", "/dev/vda"),
            data_dir: get("ROAM_AGENT_DATA", "/data"),
            port: std::env::var_os("ROAM_AGENT_PORT").map(PathBuf::from),
        }
    }
}

/// The disk as the agent sees it.
#[derive(Clone, Debug)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub size: u64,
    pub log: LogRegion,
}

/// State shared by the agent's threads.
pub struct Shared {
    pub boot_id: BootId,
    pub paths: Paths,
    pub disk: Option<DiskInfo>,
    pub data_mounted: bool,
    pub config: Mutex<WorkloadConfig>,
    /// The host side of the port is connected (no POLLHUP).
    pub connected: AtomicBool,
    /// Next log seq to write (= records written so far this boot).
    pub next_seq: AtomicU64,
    pub verifying: AtomicBool,
    pub dropped: AtomicU64,
    out: SyncSender<Vec<u8>>,
}

impl Shared {
    /// Queues a message for the host; dropped if the host is away or the
    /// queue is full (the host only counts what it receives).
    pub fn send(&self, msg: &AgentMsg) {
        if !self.connected.load(Ordering::Acquire) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let line = match proto::encode(msg) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("roam-agent: cannot encode a message: {e}");
                return;
            }
        };
        match self.out.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn send_error(&self, code: &str, message: impl Into<String>) {
        self.send(&AgentMsg::Error(proto::AgentError {
            code: code.into(),
            message: message.into(),
        }));
    }

    pub fn config(&self) -> WorkloadConfig {
        match self.config.lock() {
            Ok(c) => *c,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn hello(&self) -> Hello {
        Hello {
            version: proto::PROTO_VERSION,
            boot_id: self.boot_id,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            disk_size: self.disk.as_ref().map(|d| d.size),
            log: self.disk.as_ref().map(|d| d.log),
            data_mounted: self.data_mounted,
            next_seq: self.next_seq.load(Ordering::Acquire),
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), GuestError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(GuestError::Thread)
}

fn heartbeat_loop(sh: Arc<Shared>) {
    sys::raise_thread_priority();
    let mut seq = 0u64;
    let mut next = Instant::now();
    loop {
        next += HB_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > 10 * HB_INTERVAL {
            // Paused or starved: resume the cadence from now, no burst.
            next = now;
        }
        sh.send(&AgentMsg::Hb(Heartbeat {
            seq,
            boot_id: sh.boot_id,
            uptime_ms: sys::uptime_ms(),
        }));
        seq += 1;
    }
}

/// Runs the agent until the port fails (then `/init` starts it again).
pub fn run(paths: Paths) -> Result<(), GuestError> {
    std::fs::create_dir_all(&paths.state_dir)
        .map_err(|e| GuestError::State(paths.state_dir.clone(), e))?;
    let boot_id = sys::load_or_create_boot_id(&paths.state_dir)
        .map_err(|e| GuestError::State(paths.state_dir.clone(), e))?;
    let disk = disk::probe(&paths.disk);
    // "Mounted" = the data file system with its manifest is there to verify.
    let data_mounted = paths
        .data_dir
        .join(crate::manifest::MANIFEST_NAME)
        .is_file();
    let next_seq = disk::load_next_seq(&paths.state_dir);
    eprintln!(
        "roam-agent: boot {boot_id}, disk {:?}, data mounted: {data_mounted}, next seq {next_seq}",
        disk.as_ref().map(|d| (d.size, d.log))
    );
    let (tx, rx) = std::sync::mpsc::sync_channel(OUT_QUEUE);
    let sh = Arc::new(Shared {
        boot_id,
        paths: paths.clone(),
        disk,
        data_mounted,
        config: Mutex::new(WorkloadConfig::default()),
        connected: AtomicBool::new(false),
        next_seq: AtomicU64::new(next_seq),
        verifying: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        out: tx,
    });
    let port = port::open(&paths).map_err(GuestError::Port)?;
    let writer_fd = port.try_clone().map_err(GuestError::Port)?;
    {
        let sh = sh.clone();
        spawn("writer", move || port::writer_loop(sh, writer_fd, rx))?;
    }
    {
        let sh = sh.clone();
        spawn("hb", move || heartbeat_loop(sh))?;
    }
    {
        let sh = sh.clone();
        spawn("mem", move || mem::mem_loop(sh))?;
    }
    if sh.disk.is_some() {
        let sh = sh.clone();
        spawn("disk", move || disk::write_loop(sh))?;
    }
    if sh.data_mounted {
        let sh = sh.clone();
        spawn("files", move || files::file_loop(sh))?;
    }
    if sh.data_mounted {
        let sh = sh.clone();
        spawn("probe", move || probe::probe_loop(sh))?;
    }
    port::reader_loop(sh, port).map_err(GuestError::Port)
}
