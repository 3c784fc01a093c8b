//! The last link rate a migration measured to each peer.
//!
//! A migration measures the link by its disk bulk copy, but a move that finds nearly
//! everything at the destination (a return move to a fresh replica) copies too little to
//! measure anything, and a new QUIC connection's congestion window says little after a
//! short, application-limited exchange (it showed 1/8 of a 100 Mbit/s link). Tuning QEMU
//! and the send window from that figure throttled a return move's memory copy to a
//! quarter of the link. So each host remembers what it measured per peer, and a
//! destination passes its own figure in `Accept` (the other direction of the same link).
//! A stale figure costs at most a mistuned pause; the fresh measurement wins whenever the
//! copy was long enough to make one.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct LinkRates(Mutex<HashMap<String, u64>>);

impl LinkRates {
    pub fn record(&self, peer: &str, bytes_per_s: f64) {
        if bytes_per_s.is_finite() && bytes_per_s >= 1.0 {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(peer.to_string(), bytes_per_s as u64);
        }
    }

    /// Bytes per second, 0 when never measured.
    pub fn get(&self, peer: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_sane_figure_per_peer() {
        let r = LinkRates::default();
        assert_eq!(r.get("home"), 0);
        r.record("home", 12.5e6);
        r.record("home", f64::NAN);
        r.record("home", 0.0);
        assert_eq!(r.get("home"), 12_500_000);
        assert_eq!(r.get("office"), 0);
    }
}
