//! roam-store: the storage foundation of decentralised replication — what a host knows
//! about the chunks it holds, and how a replica changes from one consistent state to the
//! next. A library of pure logic plus local file I/O; **no networking**.
//!
//! # What it owns
//! * [`ChunkMap`] — per-chunk content (zero / BLAKE3 hash / unknown) of one disk; stored
//!   versioned and checksummed; [`ChunkMap::diff`] says which chunks of a replica are stale.
//! * [`plan()`] / [`plan_offers`] — the transfer plan: for each changed chunk, zero it, copy it
//!   from anywhere on the destination ([`HaveSet`]), copy it from a chunk sent in the same
//!   batch, or send it — each missing content crosses the wire once.
//! * [`ChunkIndex`] — the per-host dedup index (redb): hash → (disk file, chunk). Rebuilt from
//!   the disk files when lost, corrupt or of another format; hits re-hashed before use.
//! * [`LiveMap`] — what a replica still lacks while its disk is written (dirty bits, the
//!   chunks of an uncommitted batch, the replica's last batch), in a file mapped shared,
//!   so that a crash of the writing process leaves it on the host; bounded memory (two
//!   bits per chunk).
//! * [`CutBuilder`] — when chunks read from a live disk form a crash-consistent state (the
//!   FLUSH-epoch rule); model-tested against a guest that writes and flushes concurrently.
//! * [`ReplicaWriter`] — the receiver: a raw disk file plus a redo journal; a batch becomes
//!   visible atomically; `open` recovers after a crash at any step; the generation rule
//!   (stale primary, split brain) is enforced on every batch.
//! * [`Promoted`] — a disk file (a replica, a kept copy) lent in place to an incoming
//!   migration under an undo log: pre-images of first overwrites are durable before the
//!   writes, so a failed migration or a crash gives the file back exactly as lent.
//! * [`choose_level`] — zstd level from link speed against CPU cost.
//! * [`envelope`] — magic, version, length cap, BLAKE3 checksum, atomic replace: the stored
//!   form of every small file here.
//!
//! # What it does not touch
//! Sockets, the channel, QEMU, the NBD server and roamd's state store. The wire format of
//! chunks stays `roam_migrate::frame`; the dirty bits come from `roam_nbd::DirtyTracker`.
//!
//! # Data flow (source S → replica R)
//! ```text
//!  S: NBD write ─▶ DirtyTracker (bits in a LiveMap) ─take_keeping()─▶ batch #s
//!                        │ flush_epoch                                  │ chunks
//!                        └──────────────▶ CutBuilder (passes) ◀─ read + hash (ChunkMap)
//!                                                  │ Consistent{epoch}
//!  ───────── offers (chunk, hash) ─────────────────┼──────────── wire (daemon) ─────────
//!  R: plan_offers(offers, ChunkIndex) ─▶ wanted ─▶ S sends compressed (choose_level)
//!     ReplicaWriter: begin(gen, primary, s) ─ stage(local copy | received | zero)* ─ commit
//!                    └─ journal ─ commit record ─ apply ─ fsync ─ applied record ─▶ ack(s)
//! ```
//!
//! # Done here / still to wire in roamd
//! Done and tested: everything above, as a library. The daemon must still: run the
//! replication loop per (VM, replica host) over the channel (offers, wanted list, frames,
//! commit, ack) with rate limits and priorities; feed `DirtySubscription::take()` into the
//! dirty map and persist it at each FLUSH epoch; add the FLUSH gate to the NBD server for
//! [`PassEnd::Gate`] and, for exactness after a roamd crash, persist the dirty map before
//! acknowledging a write to a cold extent (`mark` returns `true`) — without that gate an
//! unclean open must be followed by a full hash comparison; call [`ChunkIndex::record_many`]
//! after writes it makes to local disks; carry the generation and primary id in each batch
//! and implement `roam vm force-primary`. (A replica becomes the disk of a VM migrating
//! to its host through [`ReplicaWriter::promote`]: lent in place, see [`promote`].) See
//! `docs/storage.md`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod chunkmap;
pub mod cut;
pub mod envelope;
pub mod error;
pub mod index;
mod io;
pub mod level;
pub mod live;
pub mod plan;
pub mod promote;
pub mod replica;

pub use chunkmap::{ChunkMap, ChunkState, Digest};
pub use cut::{CutBuilder, PassEnd};
pub use error::{Result, StoreError};
pub use index::{ChunkIndex, FileId, Location};
pub use level::{choose_level, LevelInput};
pub use live::LiveMap;
pub use plan::{plan, plan_offers, Action, HaveSet, TransferPlan};
pub use promote::{PromotePaths, Promoted, RolledBack};
pub use replica::{BatchId, ReplicaWriter, Version};
