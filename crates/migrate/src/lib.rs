//! roam-migrate: the host-to-host migration protocol, as pure data.
//!
//! This crate owns *what* two roam daemons say to each other while a VM moves, and the
//! small pieces of logic that decide *when* (convergence of the disk copy, the disk
//! digest that proves both disks equal before switchover). It owns no socket, no file,
//! no QEMU: the engine that moves bytes lives in `roamd` (`src/migration/`), the channel
//! in `roam-channel`, the NBD server in `roam-nbd`. That split keeps every byte format
//! here testable and fuzzable without a network.
//!
//! One migration, source S → destination D (all on one authenticated channel):
//!
//! ```text
//!  S (roamd)                                   D (roamd)
//!   | -- Control: Offer{vm manifest, disk} ---> |  check name, space; create sparse disk,
//!   | <-------------------- Accept / Refuse --- |  NBD export, QEMU -incoming defer
//!   | == Disk stream: DiskFrame* (bulk) ======> |  write chunk, hash it
//!   | == Disk stream: DiskFrame* (dirty) =====> |  (rounds while the VM runs)
//!   | -- StartMemory{tuning} -----------------> |  migrate-incoming unix:…
//!   | <----------------------- MemoryReady ---- |
//!   | == MigrationStream(s): QEMU's bytes ====> |  relayed into D's QEMU socket
//!   |   (QEMU reaches pre-switchover: VM paused)|
//!   | == Disk: last dirty chunks, Seal{root} => |  fdatasync, compare digest
//!   | <------------------ DiskVerified{ok} ---- |
//!   |   migrate-continue                        |
//!   | <------------- Running{first heartbeat} - |  QEMU resumed on D
//!   | -- Verify{acked upto} ------------------> |  guest agent re-reads its records
//!   | <------------------- VerifyReport ------- |
//!   |   quit QEMU (never cont), keep disk       |
//!   | -- Commit{generation} ------------------> |  D owns the VM from now on
//! ```
//!
//! Any `Abort` (or a dead channel) before `Commit` leaves the VM running on S; D removes
//! everything it created for the attempt.

pub mod digest;
pub mod frame;
pub mod plan;
pub mod protocol;

pub use digest::{ChunkHashes, Digest};
pub use frame::{DiskFrame, FrameError};
pub use protocol::{Msg, VmManifest, PROTOCOL_VERSION};
