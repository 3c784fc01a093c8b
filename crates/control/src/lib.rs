//! roam-control: the local control API of roamd, its client, and the `roam` CLI.
//!
//! Owns:
//! - the API types ([`api`]) — the JSON contract between `roam`/`roam-lab` and `roamd`;
//! - the [`Host`] trait roamd implements, and the server ([`serve`]) that exposes it as
//!   HTTP/1.1 + JSON on a unix socket (mode 0600, routes under `/v1`);
//! - the migrate stream framing ([`wire`]): NDJSON progress lines, then a result;
//! - the typed [`Client`], and the `roam` binary built on it (`src/bin/roam`).
//!
//! Does not own: anything a VM, a peer or a migration actually does — that is roamd's,
//! behind [`Host`]. It also does not own the state directory: `roam host init` execs
//! `roamd init`.
//!
//! ```text
//!   roam CLI / roam-lab                              roamd
//!   ───────────────────                              ─────
//!   Client::vm_start("desk") ──HTTP/1.1 on──▶ server::router ──▶ Host::vm_start
//!                            unix socket 0600   (validates names,   (daemon logic)
//!                            /run/roam/roamd.sock maps ApiError → status)
//!
//!   Client::migrate(req, on_progress)            pump task (owns the migration)
//!        ◀── {"progress":{..}}\n  (≥5/s) ◀──── mpsc<Progress> ◀── Host::migrate(req, tx)
//!        ◀── {"result":{..}}\n  or {"error":{..}}\n        ◀──────── Ok(result) / Err(e)
//! ```
//!
//! Stability: see [`api`] for the rules (snake_case, add-only fields, `/v2` for breaks).

pub mod api;
pub mod client;
pub mod host;
pub mod server;
pub mod units;
pub mod wire;

pub use api::{
    Accel, ApiError, ByteCounts, ErrorCode, HostInfo, LinkStats, MigrateRequest, MigrationResult,
    Outcome, PeerAdd, PeerInfo, Phase, Progress, ReplicaInfo, ReplicaState, VmCreate, VmInfo,
    VmState,
};
pub use client::{Client, ClientError};
pub use host::Host;
pub use server::{router, serve, ServeError};

/// Where roamd listens and `roam` connects unless told otherwise (`--socket`, `ROAM_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/roam/roamd.sock";
