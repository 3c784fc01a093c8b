//! roam-nbd: roamd's own NBD server, which serves each VM disk to QEMU.
//!
//! **Owns:** the NBD wire protocol ([`proto`], pure encode/decode), the
//! storage abstraction ([`Backend`], [`FileBackend`] over a sparse raw
//! file), per-chunk dirty tracking for any number of consumers
//! ([`DirtyTracker`]), and the unix-socket server ([`NbdServer`]).
//!
//! **Does not touch:** QEMU itself, the network between hosts, replication
//! policy. Those live in the daemon and the migration crates, which wrap a
//! [`Backend`] (e.g. to block a read until post-copy fetched the block) and
//! subscribe to a [`DirtyTracker`] to learn what to send.
//!
//! ```text
//!  QEMU ──unix socket──▶ NbdServer ── accept ──▶ connection (handshake, then 4 workers)
//!                           │                      │ proto::Request::decode
//!                      exports table               │ proto::check_request
//!                   name → Arc<dyn Backend>        ▼
//!                                        TrackedBackend ── mark(chunks) ──▶ DirtyTracker
//!                                              │                              │ │
//!                                              ▼                   subscription  subscription
//!                                        OnDemandBackend (post-copy   (migration)  (replica)
//!                                         destination only: waits for missing chunks)
//!                                              │
//!                                        FileBackend (pread/pwrite, fdatasync, fallocate)
//! ```
//!
//! Life of a write: the connection thread decodes the 28-byte header,
//! validates it against the export (bounds, flags, read-only), reads the
//! payload into a reused buffer, calls `write_at` down the backend stack
//! (data is written, then chunks are marked dirty), and only then queues the
//! reply. See `docs/nbd.md` for the ordering argument in full.

pub mod backend;
pub mod dirty;
pub mod ondemand;
pub mod proto;
pub mod server;

pub use backend::{Backend, FileBackend};
pub use dirty::{
    BitStore, DirtyError, DirtySubscription, DirtyTracker, FlushHold, InitialState, TrackedBackend,
    DEFAULT_CHUNK_SIZE, MAX_FLUSH_HOLD,
};
pub use ondemand::{ChunkState, Fetcher, OnDemandBackend, OnDemandStats};
pub use server::{ExportStats, NbdServer, ServerConfig, ServerError};
