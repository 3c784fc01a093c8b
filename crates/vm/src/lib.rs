//! roam-vm: spawn, supervise and drive one QEMU 10 per VM over QMP.
//!
//! **Owns:** the QEMU command line ([`VmConfig::argv`], a pure function), the QEMU
//! process (start, wait for QMP, quit/kill, always reaped, run directory cleaned),
//! the QMP connection and its events, the accelerator probe, and migration control:
//! typed capabilities/parameters ([`MigrationTuning`]), their choice from measured
//! link figures ([`choose_tuning`], pure), migrate / incoming / continue / cancel /
//! post-copy, and QEMU's figures ([`MigrationStats`]).
//!
//! **Does not touch:** guest RAM (beyond reading a 4 MiB sample through QMP to
//! estimate how it compresses, [`dirty`]) or the migration stream (QEMU copies; roamd relays
//! QEMU's migration unix socket over its encrypted channel), the disk (roamd's NBD
//! server owns it; QEMU is only its client), the NIC frames (roamd's switch), the
//! guest agent protocol (roam-agent), or where/when to migrate (roam-migrate).
//!
//! ```text
//!            roamd / roam-migrate
//!                 │  VmConfig, MigrationTuning        ▲ VmEvent (broadcast),
//!                 ▼                                   │ MigrationStats
//!   ┌───────────── roam-vm ─────────────────────────────────────────┐
//!   │ config::argv ──▶ tokio::process (QEMU) ◀── qmp (qapi) ─ events │
//!   └───────────────────────┬───────────────────────────────────────┘
//!   run dir: qmp.sock  serial.log  agent.sock  qemu.log
//!                           │
//!        QEMU ── NBD (unix) ──▶ roamd NBD server        (disk)
//!             ── stream netdev (unix) ──▶ roamd switch  (NIC)
//!             ── migration unix socket ──▶ roamd relay ══ WAN ══▶ peer roamd
//! ```
//!
//! **QMP client.** QMP goes through the `qapi` crate (0.15, schema of QEMU 9.1). For
//! the commands and events roam uses, QEMU 10.0.2's introspected schema is the same
//! (checked: `MigrationStatus`, `MigrationCapability`, `MigrationParameters`,
//! `MigrationStats`, `RunState`, `ShutdownCause`, the MIGRATION/STOP/RESUME/SHUTDOWN
//! events), so it is used as the brief asks. Its limits, and what this crate does
//! about them:
//! * it never uses command ids (it misreads the `oob` greeting), and a dropped
//!   `execute` future makes the next command panic; every command therefore runs to
//!   completion in its own task ([`qmp`] module);
//! * a message it cannot decode ends its stream: an event new in QEMU 10.0
//!   (`NETDEV_VHOST_USER_CONNECTED`/`DISCONNECTED`, not used by roam) or a new enum
//!   value in an answer (`multifd-compression: qatzip`, never set by roam). The loss
//!   shows up as [`VmEvent::QmpClosed`] and errors, never as wrong data. Should roam
//!   need such commands, a small typed JSON client would replace `qapi` here.

// Tests may unwrap (project rule); library code may not.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accel;
pub mod config;
pub mod dirty;
pub mod error;
pub mod migration;
pub mod oob;
pub mod qmp;
pub mod tuning;
pub mod vm;

pub use accel::{decide_accel, probe_accel, Accel, AccelFacts};
pub use config::{DiskConfig, MacAddr, NicConfig, RunPaths, VmConfig, AGENT_PORT_NAME};
pub use dirty::DirtyEstimate;
pub use error::{Error, Result};
pub use migration::{Compression, MigrationStats, MigrationStatus, MigrationTuning, RamStats};
pub use qmp::VmEvent;
pub use tuning::{choose_tuning, LinkFigures, PrecopyStall};
pub use vm::{RunState, Vm};
