//! roamd: the roam daemon, one per host.
mod error;
mod migration;
mod state;

fn main() {}
