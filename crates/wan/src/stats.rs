//! Counters kept on the hot path (relaxed atomics) and their serializable snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::model::DropReason;

#[derive(Debug, Default)]
pub(crate) struct LinkCounters {
    pub fwd_packets: AtomicU64,
    pub fwd_bytes: AtomicU64,
    pub drop_loss: AtomicU64,
    pub drop_queue: AtomicU64,
    pub drop_outage: AtomicU64,
    pub drop_tx_error: AtomicU64,
}

impl LinkCounters {
    pub fn drop(&self, r: DropReason) {
        match r {
            DropReason::Loss => &self.drop_loss,
            DropReason::QueueFull => &self.drop_queue,
            DropReason::Outage => &self.drop_outage,
        }
        .fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct PortCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub drop_no_route: AtomicU64,
    pub drop_not_ipv4: AtomicU64,
}

/// Counters of one direction of one path (`from` port to `to` port).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Source port name.
    pub from: String,
    /// Destination port name.
    pub to: String,
    /// Packets written into the destination TUN.
    pub fwd_packets: u64,
    /// Their bytes (IP packets).
    pub fwd_bytes: u64,
    /// Dropped by random loss.
    pub drop_loss: u64,
    /// Dropped because the bottleneck queue was full.
    pub drop_queue: u64,
    /// Dropped during an outage (on arrival or when due).
    pub drop_outage: u64,
    /// The destination TUN refused the write.
    pub drop_tx_error: u64,
}

/// Counters of one port (what its host sent into the WAN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    /// Port name.
    pub name: String,
    /// Packets read from the port's TUN.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Destination not in any port's prefix (or in the sender's own).
    pub drop_no_route: u64,
    /// Not IPv4.
    pub drop_not_ipv4: u64,
}

/// A snapshot of every counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WanStats {
    /// Per port.
    pub ports: Vec<PortStats>,
    /// Per direction of each pair of ports.
    pub links: Vec<LinkStats>,
}

impl WanStats {
    /// The counters of direction `from` → `to`.
    pub fn link(&self, from: &str, to: &str) -> Option<&LinkStats> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }

    /// The counters of port `name`.
    pub fn port(&self, name: &str) -> Option<&PortStats> {
        self.ports.iter().find(|p| p.name == name)
    }
}

pub(crate) fn snap_link(from: &str, to: &str, c: &LinkCounters) -> LinkStats {
    LinkStats {
        from: from.to_string(),
        to: to.to_string(),
        fwd_packets: c.fwd_packets.load(Relaxed),
        fwd_bytes: c.fwd_bytes.load(Relaxed),
        drop_loss: c.drop_loss.load(Relaxed),
        drop_queue: c.drop_queue.load(Relaxed),
        drop_outage: c.drop_outage.load(Relaxed),
        drop_tx_error: c.drop_tx_error.load(Relaxed),
    }
}

pub(crate) fn snap_port(name: &str, c: &PortCounters) -> PortStats {
    PortStats {
        name: name.to_string(),
        rx_packets: c.rx_packets.load(Relaxed),
        rx_bytes: c.rx_bytes.load(Relaxed),
        drop_no_route: c.drop_no_route.load(Relaxed),
        drop_not_ipv4: c.drop_not_ipv4.load(Relaxed),
    }
}
