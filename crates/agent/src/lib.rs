//! roam-agent: the guest agent, its wire protocol, and the host-side monitor.
//!
//! Owns: the protocol spoken over the virtio-serial port `org.roam.agent.0`
//! ([`proto`]), the on-disk log record format ([`record`]), the demo data
//! manifest ([`manifest`]), the guest-side agent ([`guest`], run by the static
//! `roam-agent` binary inside the VM), the host-side [`monitor::AgentMonitor`]
//! (feature `host`), and the `roam-mkdisk` demo-disk builder ([`mkdisk`]).
//! Does not own: starting QEMU (roam-vm), migration (roam-migrate), the guest
//! image build (scripts/guest-image.sh, which builds this crate's binary).
//!
//! ```text
//!    host                                   │ guest (TCG/KVM)
//!    AgentMonitor ── unix socket ── QEMU chardev ── virtio-serial ── roam-agent
//!      hello/hb/ack/verify_report  <────────┼──────────────────────    │  │
//!      config/verify/ping          ─────────┼─────────────────────>    │  │
//!                                           │        4 KiB records,    │  │ dirty pages
//!    record::check_acked(image) <── disk image ── virtio-blk /dev/vda ◄┘  ▼ (working set)
//!                                           │   [ ext4 /data | raw log region ]
//! ```
//! The migration engine holds one monitor on the source and one on the
//! destination; guest-visible downtime is the destination's first heartbeat
//! minus the source's last ([`monitor::guest_downtime`]).

pub mod guest;
pub mod manifest;
pub mod mkdisk;
#[cfg(feature = "host")]
pub mod monitor;
pub mod proto;
pub mod record;

/// The host-side API under the name the daemon uses.
#[cfg(feature = "host")]
pub mod host {
    pub use crate::monitor::*;
}

#[cfg(feature = "host")]
pub use monitor::{AgentMonitor, AgentSnapshot, HeartbeatSeen, MonitorError, MonitorStats};
pub use proto::{BootId, LogRegion, VerifyReport, WorkloadConfig};
