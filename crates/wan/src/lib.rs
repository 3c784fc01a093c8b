//! roam-wan: a user-space WAN emulator between network namespaces.
//!
//! The kernel on roam's machines has no `netem`, so delay, jitter, loss, rate and outages
//! are emulated here: an L3 router in user space with one TUN device per attached host.
//!
//! ```text
//!   netns "office"                     roam-wan process                    netns "home"
//!  ┌──────────────┐   ┌───────────────────────────────────────────────┐  ┌──────────────┐
//!  │ 198.18.1.2/24│   │ wan-rx-office: read ─► route by dst ─► model  │  │ 198.18.2.2/24│
//!  │   wan0 (TUN) ├──►│   (office→home: loss, queue, rate, delay)     │  │   wan0 (TUN) │
//!  │              │   │        └─► inbox[home] (delay line) ─►        │  │              │
//!  │              │   │ wan-tx-home: sleep until due ─► write ────────┼─►│              │
//!  │              │◄──┼── wan-tx-office ◄─ inbox[office] ◄─ wan-rx-home ◄┤              │
//!  └──────────────┘   └───────────────────────────────────────────────┘  └──────────────┘
//! ```
//!
//! - [`model`]: the link model, pure and deterministic ([`LinkModel`], [`DelayLine`]).
//! - [`netns`]: create/delete named namespaces, run closures inside one.
//! - [`engine`]: [`Wan::start`] → [`WanHandle`] (`set_link`, `set_outage`, `stats`, `shutdown`).
//! - [`control`]: the versioned JSON-lines protocol of the `roam-wan` binary's unix socket.
//! - [`probe`]: UDP echo/RTT, UDP loss and TCP throughput probes used by tests and `roam-wan bench`.
//!
//! Owns: TUN devices it creates and the threads moving packets. Does not own namespaces it
//! was given (the caller creates and deletes them) nor anything outside 198.18.0.0/15 by
//! default.
//!
//! Why not `str0m-netem`: it is sans-IO like this model, but it drops packets silently (no
//! reason to count), clones every packet (its duplication path), counts packets already
//! propagating as queue occupancy (so a BDP-sized buffer holds only half a BDP of queue),
//! always reorders under jitter, and has no outage. The model here is ~300 lines.
//!
//! Why threads, not tokio: TUN reads and writes are plain syscalls with nothing to overlap,
//! and delivery needs sub-millisecond timers (tokio's timer wheel ticks in 1 ms, which at
//! 1 Gbit/s would release 83-packet bursts). A writer thread per destination sleeps on a
//! condvar with a deadline (timer slack 1 ns), woken by readers only when a new packet is due
//! before the one it sleeps for.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
pub mod engine;
pub mod model;
pub mod net;
pub mod netns;
pub mod probe;
pub mod stats;
pub mod tun;

pub use engine::{PortConfig, ThreadPriority, Wan, WanConfig, WanError, WanHandle};
pub use model::{DelayLine, DropReason, LinkModel, LinkParams, Verdict};
pub use net::Ipv4Cidr;
pub use netns::NetNs;
pub use stats::{LinkStats, PortStats, WanStats};
