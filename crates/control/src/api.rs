//! The types of the control API: what crosses the socket between `roam` (or `roam-lab`) and
//! `roamd`, as JSON.
//!
//! Stability rules (this is a contract between crates and between binary versions):
//! - Every name on the wire is `snake_case`; enum values are lower-case strings.
//! - New fields may be added; readers ignore fields they do not know. Optional fields carry
//!   `#[serde(default)]` so an older writer that omits them is still understood.
//! - Renaming or removing a field, or changing its meaning or unit, needs a new route
//!   version (`/v2/...`, see [`API_VERSION`]).
//! - Units are in the field name: `_mib`, `_bytes`, `_ms`, `_mbit`, `_pct`, `_per_s`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Version of the route set; every route is under `/v{API_VERSION}/`.
pub const API_VERSION: u32 = 1;

/// Longest VM or peer name the API accepts.
pub const MAX_NAME_LEN: usize = 63;

/// Accelerator a host (or a VM on it) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulator (always available, slower).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// `GET /v1/host`: who this daemon is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name chosen at `roam host init` (e.g. "office").
    pub name: String,
    /// The host's public key as peers must pin it (`roam peer add NAME ADDR KEY`).
    pub key: String,
    /// Address the host-to-host channel listens on ("host:port").
    pub listen: String,
    /// Accelerator VMs on this host run with.
    pub accel: Accel,
    /// roamd's version string.
    pub version: String,
    /// Number of VMs this host knows (any state).
    pub vms: u32,
    /// Number of trusted peers.
    pub peers: u32,
}

/// `POST /v1/peers`: trust another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAdd {
    /// Local name for the peer, used by `roam migrate --to NAME`.
    pub name: String,
    /// Where the peer's channel listens ("host:port").
    pub addr: String,
    /// The peer's public key, as its `roam host info` prints it.
    pub key: String,
}

/// A trusted peer, as listed by `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Local name for the peer.
    pub name: String,
    /// Where the peer's channel listens ("host:port").
    pub addr: String,
    /// The pinned public key.
    pub key: String,
    /// Cap on what this host sends to the peer, Mbit/s: background replication always,
    /// migrations unless they set their own `bandwidth_limit_mbit`. `None`: no cap.
    #[serde(default)]
    pub rate_limit_mbit: Option<u32>,
}

/// `POST /v1/peers/{name}/limit`: set or clear a peer's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLimit {
    /// Mbit/s; `None` (or 0) removes the limit.
    #[serde(default)]
    pub mbit: Option<u32>,
}

fn default_vcpus() -> u32 {
    1
}

/// `POST /v1/vms`: define a new VM (it is not started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCreate {
    /// VM name, unique on the host (see [`validate_name`]).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Virtual disk size in bytes.
    pub disk_bytes: u64,
    /// Number of virtual CPUs (default 1).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// An image (raw or qcow2) on the daemon's host to copy into the new disk; `None` makes
    /// an empty disk. The path is read by roamd, so it must be absolute.
    #[serde(default)]
    pub disk_image: Option<PathBuf>,
    /// HIP correspondents the VM's endpoint knows from the start, `HIT@ADDR:PORT`
    /// (others may still open associations to it).
    #[serde(default)]
    pub hip_peers: Vec<String>,
    /// A HIP rendezvous server to register the VM's HIT with, `HIT@ADDR:PORT` (RFC 8004):
    /// peers that know only the HIT and the server's address reach the VM wherever it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hip_rvs: Option<String>,
}

/// `POST /v1/vms/{name}/peers`: add a HIP correspondent to an existing VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPeerAdd {
    /// `HIT@ADDR:PORT`, or `HIT` alone to reach it through the VM's rendezvous server.
    pub peer: String,
}

/// Life-cycle state of a VM on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, never started here (or cleanly stopped and reset).
    Created,
    /// QEMU is starting.
    Starting,
    /// The guest runs on this host.
    Running,
    /// The guest is stopped; its disk is here.
    Stopped,
    /// A migration away from (or into) this host is in progress.
    Migrating,
    /// The VM moved to another host (`host` says where); this entry is a tombstone.
    Moved,
    /// QEMU died or a step failed; see the daemon's log.
    Failed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Migrating => "migrating",
            VmState::Moved => "moved",
            VmState::Failed => "failed",
        })
    }
}

/// A VM as the daemon knows it (`GET /v1/vms/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Life-cycle state.
    pub state: VmState,
    /// Host the VM runs on (or was last seen on): this host's name, or a peer's when `moved`.
    pub host: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Virtual disk size in bytes.
    pub disk_bytes: u64,
    /// Where the disk lives on this host.
    pub disk_path: PathBuf,
    /// Accelerator the VM runs with; `None` when it has not run on this host.
    #[serde(default)]
    pub accel: Option<Accel>,
    /// QEMU's process id while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Bumped each time ownership of the VM moves (migration); a higher generation wins.
    pub generation: u64,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub created_at: u64,
    /// The VM's network identity (HIP) and guest LAN; `None` for VMs without a NIC.
    #[serde(default)]
    pub net: Option<VmNetInfo>,
    /// Set when this host's copy must not run: a newer owner exists (`stale`), or another
    /// host is primary too (`split_brain`). Cleared by `roam vm force-primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<VmConflict>,
}

/// Why this host's copy of a VM must not run (one writer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmConflict {
    /// `owner` holds a newer generation; this copy is kept, not started, not replicated.
    Stale {
        owner: String,
        owner_generation: u64,
        generation: u64,
        learned_from: String,
        since_unix_ms: u64,
    },
    /// `other_host` is primary too; replication between the two stops until one side
    /// runs `roam vm force-primary`.
    SplitBrain {
        other_host: String,
        other_generation: u64,
        generation: u64,
        since_unix_ms: u64,
    },
}

impl VmConflict {
    /// `stale` or `split_brain`, as the table's state column shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            VmConflict::Stale { .. } => "stale",
            VmConflict::SplitBrain { .. } => "split_brain",
        }
    }
}

/// `POST /v1/vms/{name}/force-primary`: make this host's copy the VM's primary, above
/// every generation known, overriding the others (logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcePrimary {
    /// Who asked (user@host), for the log.
    #[serde(default)]
    pub by: Option<String>,
}

/// A VM's network: its HIP identity, the names peers reach it by, and its guest LAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNetInfo {
    /// Host Identity Tag (RFC 7343 ORCHIDv2, IPv6 notation).
    pub hit: String,
    /// IPv4 local-scope identifier (198.19.0.0/16) derived from the HIT.
    pub lsi: String,
    /// The guest NIC's MAC.
    pub mac: String,
    /// The guest's address on its virtual LAN, `IP/PREFIX`.
    pub guest_ip: String,
    pub gateway: String,
    pub mtu: u16,
    /// HIP correspondents configured at create (`HIT@ADDR:PORT`).
    #[serde(default)]
    pub peers: Vec<String>,
    /// UDP port of the VM's HIP endpoint on this host, while it runs.
    #[serde(default)]
    pub hip_port: Option<u16>,
    /// The rendezvous server the VM registers with (`HIT@ADDR:PORT`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rvs: Option<String>,
}

/// `POST /v1/vms/{name}/migrate`: move a running VM to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The VM to move. In the request body it may be left empty (the path names the VM); if
    /// given it must match the path.
    #[serde(default)]
    pub vm: String,
    /// Destination peer name (as given to `roam peer add`).
    pub to: String,
    /// Allow switching to post-copy when pre-copy does not converge.
    #[serde(default)]
    pub postcopy: bool,
    /// Cap on the migration's bandwidth, Mbit/s; `None` lets roamd choose from the link.
    #[serde(default)]
    pub bandwidth_limit_mbit: Option<u32>,
}

/// Phases of a migration, in the order they normally happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reaching the peer and agreeing on the plan.
    Connect,
    /// First full pass over the disk (blocks the destination does not already have).
    DiskBulk,
    /// Re-sending disk blocks written during the bulk pass.
    DiskIterate,
    /// QEMU's RAM pre-copy (or post-copy) rounds.
    Memory,
    /// Guest paused: last pages, device state, disk sync, network handover.
    Switchover,
    /// Checking the guest runs at the destination.
    Verify,
    /// Post-copy: the guest runs at the destination; the rest of its disk follows in
    /// the background (and on demand).
    DiskPostcopy,
    /// Releasing the source.
    Cleanup,
    /// Finished successfully.
    Done,
    /// Gave up; the VM keeps running at the source.
    Aborted,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::Connect,
        Phase::DiskBulk,
        Phase::DiskIterate,
        Phase::Memory,
        Phase::Switchover,
        Phase::Verify,
        Phase::DiskPostcopy,
        Phase::Cleanup,
        Phase::Done,
        Phase::Aborted,
    ];

    /// The wire name (`disk_bulk`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::DiskBulk => "disk_bulk",
            Phase::DiskIterate => "disk_iterate",
            Phase::Memory => "memory",
            Phase::Switchover => "switchover",
            Phase::Verify => "verify",
            Phase::DiskPostcopy => "disk_postcopy",
            Phase::Cleanup => "cleanup",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a running migration, streamed several times a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Time since the migration started.
    pub elapsed_ms: u64,
    /// Disk bytes sent so far (all passes).
    pub disk_sent_bytes: u64,
    /// Disk bytes the plan has to send in the bulk pass.
    pub disk_total_bytes: u64,
    /// RAM bytes sent so far (all rounds).
    pub memory_sent_bytes: u64,
    /// RAM bytes still dirty (QEMU's `remaining`).
    pub memory_remaining_bytes: u64,
    /// Guest RAM size.
    pub memory_total_bytes: u64,
    /// Bytes that crossed the host-to-host link (after compression, with framing).
    pub wire_bytes: u64,
    /// Current transfer rate on the link.
    pub rate_bytes_per_s: u64,
    /// Estimated time to finish, when roamd can tell.
    #[serde(default)]
    pub eta_ms: Option<u64>,
    /// Guest dirty-page rate, when QEMU reports it.
    #[serde(default)]
    pub dirty_rate_pages_per_s: Option<u64>,
}

impl Progress {
    /// A progress report with every counter at zero.
    pub fn new(phase: Phase) -> Self {
        Progress {
            phase,
            elapsed_ms: 0,
            disk_sent_bytes: 0,
            disk_total_bytes: 0,
            memory_sent_bytes: 0,
            memory_remaining_bytes: 0,
            memory_total_bytes: 0,
            wire_bytes: 0,
            rate_bytes_per_s: 0,
            eta_ms: None,
            dirty_rate_pages_per_s: None,
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM runs at the destination.
    Completed,
    /// The VM still runs at the source; `error` says why.
    Aborted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Completed => "completed",
            Outcome::Aborted => "aborted",
        })
    }
}

/// Bytes a migration moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounts {
    /// RAM bytes sent by QEMU (all rounds, before compression).
    pub memory: u64,
    /// Disk bytes sent (before compression).
    pub disk: u64,
    /// Bytes that crossed the host-to-host link.
    pub wire: u64,
}

/// The link as measured during the migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Measured (or configured) bandwidth, Mbit/s.
    pub bandwidth_mbit: f64,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Packet loss, percent.
    pub loss_pct: f64,
}

/// The final report of a migration: the numbers the project is judged by.
///
/// Its JSON keys are a contract (`roam --json migrate` prints it, the lab tool parses it):
/// `vm`, `from`, `to`, `outcome`, `error` (only when aborted), `total_ms`, `downtime_ms`,
/// `guest_downtime_ms`, `pause_ms`, `bytes`, `link`, `acked_writes`, `acked_writes_lost`,
/// `guest_rebooted`, `accel`, `phases`, `tuning`. Keys may be added, never removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationResult {
    /// The VM.
    pub vm: String,
    /// Source host name.
    pub from: String,
    /// Destination host name.
    pub to: String,
    /// Completed or aborted.
    pub outcome: Outcome,
    /// Why the migration aborted; present only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall time from request to done.
    pub total_ms: u64,
    /// QEMU's downtime figure; `None` when it never got that far.
    pub downtime_ms: Option<u64>,
    /// Longest heartbeat gap the guest agent saw; `None` without an agent.
    pub guest_downtime_ms: Option<u64>,
    /// The guest's real pause: from its stop at the source to its resume at the
    /// destination (QMP events, compared across the two hosts' clocks — exact in the
    /// lab, as good as their synchronisation elsewhere). Unlike `downtime_ms` it
    /// includes the device state's trip over the link and its load.
    #[serde(default)]
    pub pause_ms: Option<u64>,
    /// Bytes moved.
    pub bytes: ByteCounts,
    /// The link as measured.
    pub link: LinkStats,
    /// Guest writes acknowledged (by the agent's write checker) during the migration.
    pub acked_writes: u64,
    /// Of those, how many were missing at the destination (must be 0).
    pub acked_writes_lost: u64,
    /// Whether the guest rebooted (boot id changed) — it must not.
    pub guest_rebooted: bool,
    /// Accelerator used at the destination.
    pub accel: Accel,
    /// Time spent in each phase, ms (phases not reached are absent).
    #[serde(default)]
    pub phases: BTreeMap<Phase, u64>,
    /// QEMU settings roamd chose (capabilities, parameters), free-form.
    #[serde(default)]
    pub tuning: serde_json::Value,
    /// Disk chunks the destination already held (an older copy of this disk), which
    /// therefore did not cross the WAN; absent when it held none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_skipped: Option<u64>,
    /// Post-copy storage (`--postcopy`): the switchover came before the disk was
    /// complete; these figures say how far from complete and what the guest waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyStats>,
    /// Of those, chunks found *elsewhere* on the destination (its dedup index: another
    /// disk, another offset) or copied there from another chunk of this transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_deduped: Option<u64>,
    /// The least possible disk bytes: the zstd-compressed size (level 3) of each distinct
    /// chunk content the destination lacked, counted once; compare with `bytes.disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_bytes: Option<u64>,
    /// Chunk hashes the source offered (56 bytes each on the wire); absent when it
    /// offered none. Far below the allocated chunks when the destination's replica was
    /// in a state the source knew (only what changed since is offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_offered: Option<u64>,
}

/// What a post-copy migration's guest saw of its disk arriving after it resumed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Chunks (64 KiB) the destination did not hold yet when the guest resumed there.
    pub chunks_pending_at_resume: u64,
    /// Chunks fetched on demand, ahead of the background copy, because a guest request
    /// needed them.
    pub demand_fetches: u64,
    /// Guest requests that waited for a chunk, and how long (median, longest), measured
    /// in the destination's NBD back end.
    pub demand_waits: u64,
    pub demand_fetch_p50_ms: f64,
    pub demand_fetch_max_ms: f64,
    /// Per chunk fetched on demand, from the guest request that asked for it to its
    /// arrival (what a guest read of that one missing block waits): median, longest, ms.
    #[serde(default)]
    pub block_fetch_p50_ms: f64,
    #[serde(default)]
    pub block_fetch_max_ms: f64,
    /// Guest reads that needed exactly one missing block (chunk), from the read's
    /// arrival in the destination's NBD back end to its data: how many, median,
    /// longest (ms). Benchmark 3's latency.
    #[serde(default)]
    pub single_reads: u64,
    #[serde(default)]
    pub single_read_p50_ms: f64,
    #[serde(default)]
    pub single_read_max_ms: f64,
    /// Chunks from the source dropped because the guest had rewritten them already.
    pub chunks_superseded: u64,
    /// Bytes of chunks sent on demand (frames, compressed).
    pub demand_bytes: u64,
    /// From the request to the guest running at the destination.
    pub time_to_running_ms: u64,
    /// From the request to the destination holding every chunk, digest checked.
    pub disk_complete_ms: u64,
    /// RAM moved by post-copy too (QEMU's `postcopy-ram`): pre-copy stalled, roamd
    /// issued `migrate-start-postcopy`, and the guest ran at the destination while its
    /// remaining pages were faulted over on demand.
    #[serde(default)]
    pub ram: bool,
    /// When roamd switched RAM to post-copy, ms from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_started_ms: Option<u64>,
    /// Pre-copy passes (QEMU's dirty syncs) before the switch to post-copy.
    #[serde(default)]
    pub ram_precopy_passes: u64,
    /// RAM bytes still pre-copy would have had to send when the switch came.
    #[serde(default)]
    pub ram_remaining_at_switch: u64,
    /// QEMU's figures after the RAM post-copy completed: bytes sent in post-copy,
    /// page requests from the destination's faults.
    #[serde(default)]
    pub ram_postcopy_bytes: u64,
    #[serde(default)]
    pub ram_postcopy_requests: u64,
    /// When the source QEMU finished sending every page, ms from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_complete_ms: Option<u64>,
    /// What decided RAM's mode: the guest's dirty rate (bytes/s) and the compressed
    /// over raw size of what it wrote, measured while the disk probe ran. RAM goes
    /// post-copy only when a compressed pre-copy could not keep up with the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_dirty_bytes_per_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_dirty_zstd_ratio: Option<f64>,
}

/// Where a background replica stands (`roam replica list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// The first copy is under way (only what the replica host lacks travels).
    Seeding,
    /// The replica holds the disk as of the last FLUSH cut; nothing is pending.
    InSync,
    /// Connected, but changes are pending (`lag_bytes` of them).
    Lagging,
    /// The replica host cannot be reached; retrying with backoff. The VM is unaffected.
    Paused,
    /// Refused (e.g. a stale primary) or failed; `error` says why.
    Error,
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaState::Seeding => "seeding",
            ReplicaState::InSync => "in_sync",
            ReplicaState::Lagging => "lagging",
            ReplicaState::Paused => "paused",
            ReplicaState::Error => "error",
        })
    }
}

/// One replica of a VM's disk on another host (`GET /v1/replicas`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub vm: String,
    /// The host that keeps the replica.
    pub host: String,
    pub state: ReplicaState,
    /// Bytes of the disk changed here and not yet committed at the replica.
    pub lag_bytes: u64,
    /// Age of the oldest change the replica has not committed, ms (0 when in sync).
    pub lag_ms: u64,
    /// When the replica last committed a batch.
    #[serde(default)]
    pub last_sync_unix_ms: Option<u64>,
    /// The VM's generation (one writer) the replica was last written at.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Machine-readable class of an [`ApiError`].
/// What the guest agent should do (`POST /v1/vms/{name}/workload`): a synthetic workload
/// that dirties memory and makes acknowledged, durable disk writes, so that a migration
/// can be measured and checked under load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// MiB of guest memory rewritten per second.
    #[serde(default)]
    pub mem_dirty_mib_s: u32,
    /// Size of the memory working set being rewritten, MiB.
    #[serde(default)]
    pub mem_working_set_mib: u32,
    /// Durable 4 KiB record writes per second, each acknowledged to the host.
    #[serde(default)]
    pub disk_writes_per_s: u32,
    /// File operations per second on the guest's ext4 `/data` (rewrite, append, delete,
    /// each fsynced): real file-system metadata changes on the disk.
    #[serde(default)]
    pub file_writes_per_s: u32,
    /// Single-block (4 KiB, uncached) reads per second at random places of the guest's
    /// `/data` files: a read-latency probe.
    #[serde(default)]
    pub probe_reads_per_s: u32,
    /// Dirty whole pages with random bytes (incompressible) instead of a stamp per page.
    #[serde(default)]
    pub mem_incompressible: bool,
}

/// What the host sees of a VM's guest agent (`GET /v1/vms/{name}/agent`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub connected: bool,
    #[serde(default)]
    pub boot_id: Option<String>,
    pub heartbeats: u64,
    #[serde(default)]
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Longest gap between two heartbeats seen by this host, ms.
    pub max_gap_ms: u64,
    /// Disk writes the guest acknowledged as durable, as seen by this host.
    pub acked_writes: u64,
    #[serde(default)]
    pub max_acked_seq: Option<u64>,
    /// The workload the agent runs.
    #[serde(default)]
    pub workload: Workload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such VM, peer or route.
    NotFound,
    /// The request clashes with current state (name taken, VM running, ...).
    Conflict,
    /// The request is malformed or a value is out of range.
    BadRequest,
    /// The peer refused or could not be reached.
    PeerRefused,
    /// The daemon cannot do it now (shutting down, resource busy, not supported).
    Unavailable,
    /// A bug or an unexpected failure inside roamd.
    Internal,
}

impl ErrorCode {
    /// HTTP status the server answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::BadRequest => 400,
            ErrorCode::PeerRefused => 502,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The code a client assumes for an HTTP status with no usable error body.
    pub fn from_http_status(status: u16) -> ErrorCode {
        match status {
            404 | 405 => ErrorCode::NotFound,
            409 => ErrorCode::Conflict,
            400 | 411 | 413 | 415 | 422 => ErrorCode::BadRequest,
            502 => ErrorCode::PeerRefused,
            503 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }

    /// The wire name (`not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::PeerRefused => "peer_refused",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error the daemon reports; the body of every non-2xx answer is
/// `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    /// Class of the error.
    pub code: ErrorCode,
    /// Human-readable, specific message (names the VM/peer and what was wrong).
    pub message: String,
}

impl ApiError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    /// `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    /// `peer_refused`.
    pub fn peer_refused(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PeerRefused, message)
    }
    /// `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The envelope of an error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

/// Checks a VM or peer name: 1 to [`MAX_NAME_LEN`] characters of `a-z A-Z 0-9 - _ .`, not
/// starting with `.` or `-`. Names become file and QEMU object names on the daemon, so the
/// API refuses anything else before the daemon sees it.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::bad_request(format!(
            "bad {kind} name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with '.' or '-'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return bad(&format!(
            "character {c:?} not allowed (use a-z, 0-9, '-', '_', '.')"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn enums_are_snake_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Phase::DiskBulk).unwrap(),
            "\"disk_bulk\""
        );
        assert_eq!(
            serde_json::to_string(&ErrorCode::PeerRefused).unwrap(),
            "\"peer_refused\""
        );
        assert_eq!(serde_json::to_string(&VmState::Moved).unwrap(), "\"moved\"");
        for p in Phase::ALL {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
    }

    #[test]
    fn status_mapping_round_trips() {
        for code in [
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::BadRequest,
            ErrorCode::PeerRefused,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_http_status(code.http_status()), code);
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{code}\""));
        }
    }

    #[test]
    fn optional_fields_may_be_omitted() {
        let c: VmCreate =
            serde_json::from_str(r#"{"name":"a","memory_mib":1,"disk_bytes":2}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.disk_image, None);
        let m: MigrateRequest = serde_json::from_str(r#"{"to":"home","extra":1}"#).unwrap();
        assert_eq!(
            m,
            MigrateRequest {
                vm: String::new(),
                to: "home".into(),
                postcopy: false,
                bandwidth_limit_mbit: None
            }
        );
    }

    #[test]
    fn names() {
        assert!(validate_name("vm", "desk").is_ok());
        assert!(validate_name("vm", "desk-2.home_x").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(64)] {
            let e = validate_name("vm", bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }
}
