//! Counters of a connection and of an endpoint.
//!
//! Bytes are **wire** bytes: UDP payloads including QUIC headers, padding, ACKs and
//! retransmissions, not application payload.

use std::time::Duration;

/// Statistics of one connection (from quinn's own accounting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    /// UDP payload bytes sent.
    pub tx_bytes: u64,
    /// UDP datagrams sent.
    pub tx_datagrams: u64,
    /// UDP payload bytes received.
    pub rx_bytes: u64,
    /// UDP datagrams received.
    pub rx_datagrams: u64,
    /// Smoothed round-trip time estimate.
    pub rtt: Duration,
    /// Packets declared lost (and retransmitted if they carried data).
    pub lost_packets: u64,
    /// Bytes in packets declared lost.
    pub lost_bytes: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Congestion events (loss episodes the controller reacted to).
    pub congestion_events: u64,
    /// Current congestion window in bytes.
    pub cwnd: u64,
    /// Current path MTU (UDP payload) in bytes.
    pub mtu: u16,
}

impl ConnectionStats {
    /// Lost packets as a percentage of packets sent (0 before anything was sent).
    pub fn loss_pct(&self) -> f64 {
        if self.sent_packets == 0 {
            0.0
        } else {
            self.lost_packets as f64 * 100.0 / self.sent_packets as f64
        }
    }

    /// The rate the congestion controller currently allows, `cwnd / RTT`, in bytes per
    /// second; `None` before the first RTT sample. An *upper bound* on the path's
    /// capacity: BBR keeps cwnd at about twice the bandwidth-delay product, and an idle
    /// connection's cwnd is not backed by measurements. For the rate actually achieved,
    /// difference `tx_bytes` over time.
    pub fn bandwidth_estimate_bytes_per_s(&self) -> Option<f64> {
        let rtt = self.rtt.as_secs_f64();
        (rtt > 0.0 && self.cwnd > 0).then(|| self.cwnd as f64 / rtt)
    }
}

impl From<quinn::ConnectionStats> for ConnectionStats {
    fn from(s: quinn::ConnectionStats) -> Self {
        Self {
            tx_bytes: s.udp_tx.bytes,
            tx_datagrams: s.udp_tx.datagrams,
            rx_bytes: s.udp_rx.bytes,
            rx_datagrams: s.udp_rx.datagrams,
            rtt: s.path.rtt,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            sent_packets: s.path.sent_packets,
            congestion_events: s.path.congestion_events,
            cwnd: s.path.cwnd,
            mtu: s.path.current_mtu,
        }
    }
}

/// Statistics of an endpoint since it was bound, closed connections included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStats {
    /// UDP payload bytes sent by the socket (every connection, every handshake).
    pub tx_bytes: u64,
    /// UDP datagrams sent.
    pub tx_datagrams: u64,
    /// UDP payload bytes received by the socket (garbage included).
    pub rx_bytes: u64,
    /// UDP datagrams received.
    pub rx_datagrams: u64,
    /// Connections established by `connect`.
    pub connections_opened: u64,
    /// Connections handed out by `accept`.
    pub connections_accepted: u64,
    /// Connections currently open.
    pub connections_active: u64,
    /// Handshakes refused because the client's key is not trusted.
    pub refused_handshakes: u64,
    /// Incoming handshakes that failed for any other reason.
    pub failed_handshakes: u64,
    /// Packets lost, summed over all connections (closed ones included).
    pub lost_packets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_rates() {
        let mut s = ConnectionStats::default();
        assert_eq!(s.loss_pct(), 0.0);
        assert_eq!(s.bandwidth_estimate_bytes_per_s(), None);
        s.sent_packets = 200;
        s.lost_packets = 3;
        assert!((s.loss_pct() - 1.5).abs() < 1e-9);
        s.cwnd = 1_000_000;
        s.rtt = Duration::from_millis(100);
        assert_eq!(s.bandwidth_estimate_bytes_per_s(), Some(10_000_000.0));
    }
}
