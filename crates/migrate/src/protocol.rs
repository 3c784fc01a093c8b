//! Control messages of a migration (the `Control` stream of the host channel).
//!
//! Messages are serde values framed by `roam-channel` (which bounds and versions every
//! frame). This module fixes their meaning; `PROTOCOL_VERSION` is exchanged in `Offer`
//! and a destination accepts the current and the previous version.

use serde::{Deserialize, Serialize};

/// Version of the migration conversation. Bump when a message changes meaning.
///
/// 2: `VmManifest::net` (the VM's HIP identity and guest LAN) and `Msg::Associations`
/// (the VM's HIP association state, sent by the source at pre-switchover when the
/// manifest has `net`). A version-1 source sends neither; a destination then runs the
/// VM without network state, as version 1 did.
///
/// 3: `Msg::EndpointAt` (D → S, VMs with `net`): where the VM's HIP endpoint now
/// listens, so the source forwards the ESP packets that still reach it during the
/// handover instead of dropping them. Either side at version 2 simply does without.
/// Also `Offer::postcopy`, `Msg::DiskComplete` and the `Pending`/`Switch` disk frames:
/// a source asks for post-copy only of a destination that accepted version 3.
/// Still 3: `Accept::base_replica` (the committed batch of the replica D copied into
/// the incoming disk). A source that knows that batch offers only the chunks written
/// since and marks its `Query` "unoffered = held" (frame.rs); a peer without the field
/// reads it as `None` and every allocated chunk is offered, as before.
/// Still 3: `VmManifest::free_page_hint` (`balloon`).
///
/// 4: `VmManifest::free_page_reporting`. A destination that does not know it would start
/// QEMU without that balloon feature, and its QEMU would refuse the incoming stream only
/// at the device state, after all of RAM crossed ("Unknown savevm section ...
/// virtio-balloon"). So a source offers version 4 for a VM that has it
/// ([`offer_version`]), and a version-3 destination refuses at once, naming the version.
pub const PROTOCOL_VERSION: u16 = 4;

/// Oldest version a destination still accepts ("current plus previous").
pub const MIN_PROTOCOL_VERSION: u16 = 3;

/// The version a source offers for `vm`: the lowest that carries everything the VM
/// needs, so that a destination one version behind still takes the VMs it can run.
pub fn offer_version(vm: &VmManifest) -> u16 {
    if vm.free_page_reporting {
        4
    } else {
        3
    }
}

/// A replica's committed batch: the primary's generation and the batch's sequence number
/// (`roam_store::Version` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaBatch {
    pub generation: u64,
    pub seq: u64,
}

/// A file the VM needs besides its disk (kernel, initramfs), named by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Where the source keeps it; the destination looks for the same content.
    pub path: String,
    pub size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
}

/// Everything the destination needs to build an identical, paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmManifest {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kernel: FileRef,
    pub initrd: FileRef,
    pub cmdline: String,
    pub disk_bytes: u64,
    /// Bytes the source disk really holds (allocated, non-hole); the destination needs
    /// at least this much free space.
    pub disk_allocated_bytes: u64,
    pub chunk_size: u32,
    /// Rises by one at every completed migration; the holder of the highest generation is
    /// the only one allowed to run the VM.
    pub generation: u64,
    pub created_at: String,
    /// The VM's network identity and guest LAN; absent for VMs without a NIC (and from
    /// version-1 sources).
    /// (Boxed: it is large and most messages are small.)
    #[serde(default)]
    pub net: Option<Box<NetSpec>>,
    /// The VM's virtio-balloon device does free page hinting; the destination's QEMU
    /// must have the same device (absent from older sources: none). Sent as `balloon`,
    /// its name from before the device could also report.
    #[serde(default, rename = "balloon")]
    pub free_page_hint: bool,
    /// The VM's virtio-balloon device does free page reporting (absent from older
    /// sources: no).
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// A VM's network identity: its HIP host identity and the LAN its guest sees. It is
/// part of the VM's definition, so it travels with the VM unchanged. The secret key only
/// ever crosses the encrypted, mutually authenticated host channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The ECDSA P-256 secret scalar of the VM's HIP host identity, 64 hex digits.
    pub hip_secret: String,
    /// The guest NIC's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The guest's address on its virtual LAN and the LAN's prefix length.
    pub guest_ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    /// The virtual LAN's gateway (served by the hosting roamd).
    pub gateway_ip: std::net::Ipv4Addr,
    pub mtu: u16,
    /// HIP correspondents the VM's endpoint knows in advance: `HIT@ADDR:PORT`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The HIP rendezvous server the VM registers its HIT with, `HIT@ADDR:PORT`
    /// (RFC 8004). Absent in records and manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rvs: Option<String>,
}

/// Largest association state `Msg::Associations` may carry (roam-hipnet's container of
/// every association; each is at most 8 KiB).
pub const MAX_ASSOCIATIONS_BYTES: usize = 256 * 1024;

/// Why a migration stopped, as both sides report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortReason {
    pub message: String,
}

/// One message on the control stream. Direction is given per variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// S → D: open a migration.
    Offer {
        version: u16,
        source_host: String,
        vm: VmManifest,
        /// Post-copy storage: the guest will resume at D before the disk is complete
        /// (D starts from an empty disk and serves missing chunks on demand).
        #[serde(default)]
        postcopy: bool,
    },
    /// D → S: ready to receive the disk; QEMU started with `-incoming defer`.
    /// `base_chunks` > 0: D starts from an older copy of this disk holding that many
    /// allocated chunks, so S should offer hashes first and send only what differs.
    /// `indexed_chunks` > 0: D's dedup index knows that many chunks of other disks, so
    /// offering hashes first pays even without a base (a shared base image, a replica).
    Accept {
        version: u16,
        free_bytes: u64,
        #[serde(default)]
        base_chunks: u64,
        #[serde(default)]
        indexed_chunks: u64,
        /// The link rate (bytes/s) D last measured towards S, 0 if none: S's fallback
        /// when its own disk copy is too short to measure the link.
        #[serde(default)]
        link_rate_hint: u64,
        /// The base is this host's replica of the VM as of this committed batch (`None`:
        /// no base, a kept copy, or a replica state D cannot name).
        #[serde(default)]
        base_replica: Option<ReplicaBatch>,
    },
    /// D → S: will not take this VM; nothing was created.
    Refuse { reason: String },
    /// S → D: set these QEMU migration settings and start listening for the RAM stream.
    StartMemory { tuning: serde_json::Value },
    /// D → S: QEMU listens; S may `migrate`.
    MemoryReady,
    /// D → S: outcome of the disk check asked for by the `Seal` disk frame.
    DiskVerified {
        ok: bool,
        root: String,
        chunks_written: u64,
        detail: Option<String>,
    },
    /// D → S: the VM runs on D. `first_heartbeat_unix_ms` is when D's roamd first heard
    /// the guest agent after resume (0 if not yet heard).
    Running {
        first_heartbeat_unix_ms: u64,
        boot_id: Option<String>,
        /// When D let the guest run (unix ms, D's clock). With the source's stop time
        /// it gives the real pause; QEMU's own downtime figure ends when the source
        /// has written the device state, before it crossed the link and was loaded.
        #[serde(default)]
        resumed_unix_ms: Option<u64>,
    },
    /// S → D: ask the guest agent on D to re-read every acknowledged record.
    Verify {
        upto_seq: u64,
        acked: u64,
        boot_id: Option<String>,
    },
    /// D → S: what the agent found.
    VerifyReport {
        checked: u64,
        ok: u64,
        bad: u64,
        missing: u64,
        boot_id: Option<String>,
        detail: Option<String>,
    },
    /// S → D (version ≥ 2, VMs with `net`), at pre-switchover while the guest is paused:
    /// the VM's HIP associations (roam-hipnet's handover container, hex; empty when the
    /// source had none to hand over). D starts the VM's HIP endpoint from it and
    /// announces its own locator once the guest runs.
    Associations { state: String },
    /// D → S (both at version ≥ 3), once D's HIP endpoint runs from the associations
    /// and has announced its locator: the endpoint's UDP address. Peers' ESP packets
    /// sent before they learnt the new locator still reach S; S forwards them here
    /// rather than letting TCP wait out a retransmission timeout.
    EndpointAt { addr: String },
    /// S → D: the source QEMU has quit; D owns the VM at this generation.
    Commit {
        generation: u64,
        /// Hosts that should hold replicas of the VM from now on: the source itself (its
        /// kept disk becomes a replica) and the replicas it had. The destination starts
        /// replicating to them; older sources send none.
        #[serde(default)]
        replicas: Vec<String>,
    },
    /// D → S: ownership recorded.
    Committed,
    /// D → S (post-copy): every chunk arrived and the digest of what the source sent
    /// was compared with the source's `Seal`; with the on-demand figures for the result.
    DiskComplete {
        ok: bool,
        root: String,
        /// Chunks a guest request waited for, fetched ahead of the background copy.
        demand_fetches: u64,
        /// Guest requests that waited, and how long (ms).
        waits: u64,
        wait_p50_ms: f64,
        wait_max_ms: f64,
        /// Per demanded chunk, request to arrival: median and longest (ms).
        #[serde(default)]
        fetch_p50_ms: f64,
        #[serde(default)]
        fetch_max_ms: f64,
        /// Guest reads that needed exactly one missing chunk, request to data (ms).
        #[serde(default)]
        single_reads: u64,
        #[serde(default)]
        single_read_p50_ms: f64,
        #[serde(default)]
        single_read_max_ms: f64,
        /// Source chunks dropped because the guest had already rewritten them here.
        superseded: u64,
        detail: Option<String>,
    },
    /// D → S, on a new connection (post-copy, after the link died with chunks still
    /// missing at D): D owns and runs `vm` at `generation` and asks S to send the rest.
    /// D then opens a `Disk` stream naming what it lacks (`Pending` frames, then
    /// `Switch`) and a `DiskDemand` stream; S answers as after a post-copy switch
    /// (`Pending`…`Switch`, chunk frames, `Seal`), D sends `DiskComplete`, S `Commit`.
    ResumeDisk {
        version: u16,
        vm: String,
        generation: u64,
        /// RAM post-copy was under way too: D's QEMU listens again (`migrate-recover`)
        /// and S resumes its paused RAM stream (`migrate … resume=true`) over this
        /// connection before it lets go.
        #[serde(default)]
        ram: bool,
    },
    /// S → D: S holds `vm`'s disk as of the switchover and will send what D lacks.
    ResumeAccepted,
    /// Either way: stop now; the source keeps running the VM.
    Abort(AbortReason),
}

impl Msg {
    pub fn abort(message: impl Into<String>) -> Self {
        Msg::Abort(AbortReason {
            message: message.into(),
        })
    }

    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Offer { .. } => "offer",
            Msg::Accept { .. } => "accept",
            Msg::Refuse { .. } => "refuse",
            Msg::StartMemory { .. } => "start_memory",
            Msg::MemoryReady => "memory_ready",
            Msg::DiskVerified { .. } => "disk_verified",
            Msg::Running { .. } => "running",
            Msg::Verify { .. } => "verify",
            Msg::VerifyReport { .. } => "verify_report",
            Msg::Associations { .. } => "associations",
            Msg::EndpointAt { .. } => "endpoint_at",
            Msg::Commit { .. } => "commit",
            Msg::Committed => "committed",
            Msg::DiskComplete { .. } => "disk_complete",
            Msg::ResumeDisk { .. } => "resume_disk",
            Msg::ResumeAccepted => "resume_accepted",
            Msg::Abort(_) => "abort",
        }
    }
}

/// Whether a destination speaking `PROTOCOL_VERSION` accepts an offer at `version`.
pub fn version_accepted(version: u16) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_json() {
        let msgs = vec![
            Msg::Accept {
                version: 1,
                free_bytes: 5,
                base_chunks: 0,
                indexed_chunks: 7,
                link_rate_hint: 0,
                base_replica: Some(ReplicaBatch {
                    generation: 2,
                    seq: 9,
                }),
            },
            Msg::abort("destination disk full"),
            Msg::DiskVerified {
                ok: true,
                root: "ab".into(),
                chunks_written: 3,
                detail: None,
            },
            Msg::MemoryReady,
            Msg::Associations {
                state: "52484950".into(),
            },
            Msg::EndpointAt {
                addr: "198.18.2.2:10500".into(),
            },
            Msg::ResumeDisk {
                version: PROTOCOL_VERSION,
                vm: "desk".into(),
                generation: 4,
                ram: true,
            },
            Msg::ResumeAccepted,
        ];
        for m in msgs {
            let s = serde_json::to_string(&m).unwrap();
            let back: Msg = serde_json::from_str(&s).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn manifests_name_the_balloon_as_older_peers_do() {
        let file = |p: &str| FileRef {
            path: p.into(),
            size: 1,
            blake3: "ab".into(),
        };
        let m = VmManifest {
            name: "desk".into(),
            memory_mib: 256,
            vcpus: 1,
            kernel: file("k"),
            initrd: file("i"),
            cmdline: String::new(),
            disk_bytes: 1 << 30,
            disk_allocated_bytes: 0,
            chunk_size: 65536,
            generation: 1,
            created_at: "1".into(),
            net: None,
            free_page_hint: true,
            free_page_reporting: false,
        };
        let mut v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["balloon"], true);
        // A source from before reporting sends no `free_page_reporting`.
        v.as_object_mut().unwrap().remove("free_page_reporting");
        assert_eq!(serde_json::from_value::<VmManifest>(v).unwrap(), m);
        // A VM with reporting needs version 4: a version-3 destination refuses the
        // offer at once instead of failing at the device state.
        assert_eq!(offer_version(&m), 3);
        let r = VmManifest {
            free_page_reporting: true,
            ..m
        };
        assert_eq!(offer_version(&r), 4);
        assert!(version_accepted(offer_version(&r)));
    }

    #[test]
    fn unknown_type_is_an_error_not_a_panic() {
        assert!(serde_json::from_str::<Msg>(r#"{"type":"launch_missiles"}"#).is_err());
    }

    #[test]
    fn version_window() {
        assert!(version_accepted(PROTOCOL_VERSION));
        assert!(version_accepted(3), "a source one version behind is taken");
        assert!(!version_accepted(PROTOCOL_VERSION + 1));
        assert!(!version_accepted(0));
    }
}
