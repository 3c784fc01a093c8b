//! roam-lab: roam's test bed on one machine.
//!
//! It builds what a person's move looks like — two (or more) hosts on different subnets
//! joined by a wide-area link — out of real parts: a network namespace per host, the
//! user-space WAN emulator of `roam-wan` between them, a real `roamd` in each namespace
//! driven through its real control socket, a real QEMU guest with roam's guest agent.
//! The demo, the end-to-end tests and the benchmarks all stand on it.
//!
//! ```text
//!   lab (root ns) ──control client──▶ roamd office (netns office, 198.18.1.2)
//!        │        ──control client──▶ roamd home   (netns home,   198.18.2.2)
//!        └── roam-wan: TUN in office ◀══ bandwidth · delay · loss · outage ══▶ TUN in home
//! ```
//!
//! Everything it creates (namespaces, processes, state directories, mounts) is owned by a
//! [`Lab`] value and removed when it is dropped, by id — also when a test fails.

pub mod baseline;
pub mod bench;
pub mod bench_net;
pub mod bench_storage;
pub mod bins;
pub mod echo;
pub mod hipbench;
pub mod hipproc;
pub mod host;
pub mod lab;
pub mod rng;

pub use host::Host;
pub use lab::{Lab, LabConfig, LabError};
