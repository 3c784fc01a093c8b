//! The replication conversation as data: messages, and the replica host's admission rules.
//! No I/O here, so every rule is testable without sockets.
//!
//! One stream of kind `StreamKind::Replication`, opened by the primary. Control messages are
//! channel message frames (JSON, length-capped by the channel); chunk data is the
//! migration's `DiskFrame`s (`roam_migrate::frame`), so `DiskSender` is reused unchanged.
//!
//! ```text
//!  primary (source)                                   replica host
//!   │── Hello{version, vm, source_host, generation, geometry} ─▶│ open/create ReplicaWriter
//!   │◀─────────── Welcome{applied generation, seq} | Refuse ─────│ (stale primary? split brain?)
//!   │ per batch:                                                 │
//!   │── Begin{generation, seq, flush_epoch, seed} ──────────────▶│ writer.begin (generation rule)
//!   │◀──────────────────────────────── Ready | Refuse ───────────│
//!   │   seed only: Hash frames…, Query ═══════════════════════▶ │ compare with committed chunks
//!   │◀══════════════════════════════════ Want…, WantEnd ═════════│
//!   │══ Data/Zero frames (passes until no FLUSH completed) ═════▶│ writer.stage (journal)
//!   │══ Sync(frames) ═══════════════════════════════════════════▶│ writer.commit (atomic)
//!   │◀══════════════════════════════════════════ Sync(frames) ═══│ = committed
//!   │── Bye ────────────────────────────────────────────────────▶│
//!
//!  removal (a fresh stream):  Remove{vm, source_host, generation} ─▶ ◀─ Removed | Refuse
//!  ownership (a fresh stream): Claims{mine} ─▶ ◀─ Claims{theirs} | Refuse
//! ```

use roam_store::Version;
use serde::{Deserialize, Serialize};

/// Version of this conversation. A replica host accepts this one and the previous.
pub const REPL_VERSION: u16 = 1;
const MIN_REPL_VERSION: u16 = 1;

pub fn version_accepted(v: u16) -> bool {
    (MIN_REPL_VERSION..=REPL_VERSION).contains(&v)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplMsg {
    Hello {
        version: u16,
        vm: String,
        source_host: String,
        generation: u64,
        disk_bytes: u64,
        chunk_size: u32,
    },
    Welcome {
        version: u16,
        applied_generation: u64,
        applied_seq: u64,
    },
    Begin {
        generation: u64,
        seq: u64,
        flush_epoch: u64,
        /// First batch of a session whose replica state is not known to the primary: the
        /// primary offers hashes of every allocated chunk; the replica clears the rest.
        seed: bool,
    },
    Ready,
    Refuse {
        reason: String,
        /// The refusal is the one-writer rule: the sender is not (or no longer) the primary.
        #[serde(default)]
        stale: bool,
    },
    Bye,
    Remove {
        vm: String,
        source_host: String,
        generation: u64,
    },
    Removed,
    /// The one-writer exchange (peer contact, `crate::ownership`): each side's claims
    /// about the VMs it knows; answered with the same message.
    Claims {
        version: u16,
        claims: Vec<crate::ownership::rules::Claim>,
    },
}

impl ReplMsg {
    pub fn refuse(reason: impl Into<String>, stale: bool) -> ReplMsg {
        ReplMsg::Refuse {
            reason: reason.into(),
            stale,
        }
    }
}

/// What the replica host knows of a replica when a primary says hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub disk_bytes: u64,
    pub chunk_size: u32,
    pub applied: Version,
    pub primary: String,
}

/// Whether this host runs the VM itself (then it is the primary, not a replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalVm {
    None,
    /// Defined or running here.
    Primary,
    /// Moved away; the old copy is a tombstone, a replica may live beside it.
    Moved,
}

/// The replica host's decision on a `Hello`: `Err(Refuse)` or `Ok(())`.
pub fn admit_hello(
    version: u16,
    generation: u64,
    disk_bytes: u64,
    chunk_size: u32,
    local: LocalVm,
    held: Option<&Held>,
) -> Result<(), ReplMsg> {
    if !version_accepted(version) {
        return Err(ReplMsg::refuse(
            format!("replication protocol version {version} is not supported here"),
            false,
        ));
    }
    if local == LocalVm::Primary {
        return Err(ReplMsg::refuse(
            "the VM is defined on this host (it is its primary, not a replica); \
             two hosts claim it: split brain",
            true,
        ));
    }
    if let Some(h) = held {
        if h.applied.generation > generation {
            return Err(ReplMsg::refuse(
                format!(
                    "stale primary: the replica holds generation {} (written by '{}'), \
                     the offer is generation {generation}",
                    h.applied.generation, h.primary
                ),
                true,
            ));
        }
        if h.disk_bytes != disk_bytes || h.chunk_size != chunk_size {
            return Err(ReplMsg::refuse(
                format!(
                    "the replica here is {} bytes in chunks of {}, the disk is {disk_bytes} \
                     in chunks of {chunk_size}; remove the replica first",
                    h.disk_bytes, h.chunk_size
                ),
                false,
            ));
        }
    }
    Ok(())
}

/// The batch number a primary at `generation` uses next, given what the replica applied:
/// batch numbers continue within a generation and restart under a newer one.
pub fn next_seq(generation: u64, applied: Version) -> u64 {
    if applied.generation == generation {
        applied.seq + 1
    } else {
        1
    }
}

/// Whether the replica must be compared by hash (seed) rather than sent the changes since
/// `synced_to`, the last commit this primary saw (in this roamd's life, or carried over a
/// stop). The replica may be *later* in the same generation: batches whose commit reply
/// never arrived (the link or roamd died first). Those were proposed by this primary (one
/// writer per generation) after `synced_to`, from chunks it still holds as pending, so the
/// replica differs from the disk only in chunks written since `synced_to`: pending ∪
/// dirty. An earlier batch (the replica lost commits) or another generation: seed.
pub fn needs_seed(synced_to: Option<Version>, applied: Version) -> bool {
    match synced_to {
        Some(v) => !(applied.generation == v.generation && applied.seq >= v.seq),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(g: u64, s: u64) -> Held {
        Held {
            disk_bytes: 1 << 30,
            chunk_size: 65536,
            applied: Version {
                generation: g,
                seq: s,
            },
            primary: "office".into(),
        }
    }

    #[test]
    fn stale_primary_is_refused_as_stale() {
        let h = held(3, 10);
        let r = admit_hello(1, 2, 1 << 30, 65536, LocalVm::None, Some(&h));
        match r {
            Err(ReplMsg::Refuse { reason, stale }) => {
                assert!(stale);
                assert!(reason.contains("stale primary"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(admit_hello(1, 3, 1 << 30, 65536, LocalVm::None, Some(&h)).is_ok());
        assert!(admit_hello(1, 4, 1 << 30, 65536, LocalVm::Moved, Some(&h)).is_ok());
    }

    #[test]
    fn a_host_running_the_vm_is_no_replica() {
        let r = admit_hello(1, 9, 1 << 30, 65536, LocalVm::Primary, None);
        assert!(matches!(r, Err(ReplMsg::Refuse { stale: true, .. })));
    }

    #[test]
    fn geometry_and_version_must_match() {
        let h = held(1, 1);
        assert!(admit_hello(1, 1, 2 << 30, 65536, LocalVm::None, Some(&h)).is_err());
        assert!(admit_hello(99, 1, 1 << 30, 65536, LocalVm::None, None).is_err());
        assert!(admit_hello(1, 1, 1 << 30, 65536, LocalVm::None, None).is_ok());
    }

    #[test]
    fn batch_numbers_continue_within_a_generation() {
        let v = |generation, seq| Version { generation, seq };
        assert_eq!(next_seq(2, v(2, 7)), 8);
        assert_eq!(next_seq(3, v(2, 7)), 1);
        assert!(!needs_seed(Some(v(2, 7)), v(2, 7)));
        // A commit whose reply was lost: still incremental.
        assert!(!needs_seed(Some(v(2, 6)), v(2, 7)));
        // The replica lost commits, or another generation wrote it: compare by hash.
        assert!(needs_seed(Some(v(2, 7)), v(2, 6)));
        assert!(needs_seed(Some(v(2, 7)), v(3, 9)));
        assert!(needs_seed(Some(v(2, 7)), v(1, 9)));
        assert!(needs_seed(None, v(0, 0)));
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = ReplMsg::Begin {
            generation: 2,
            seq: 3,
            flush_epoch: 4,
            seed: true,
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"type\":\"begin\""), "{j}");
        assert_eq!(serde_json::from_str::<ReplMsg>(&j).unwrap(), m);
        let r: ReplMsg = serde_json::from_str(r#"{"type":"refuse","reason":"x"}"#).unwrap();
        assert_eq!(r, ReplMsg::refuse("x", false));
    }
}
