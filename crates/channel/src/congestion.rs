//! A loss-tolerant congestion controller for long, fat, lossy WAN links.
//!
//! Loss-based controllers (CUBIC, NewReno) read every lost packet as congestion. On a
//! 100 Mbit/s, 40 ms path with 0.1% random loss that caps one flow near 11 Mbit/s
//! (Mathis et al.: MSS/RTT · 1.22/√p). quinn's BBR ignores loss, but its BBRv1 start-up
//! and probing overshoot a bottleneck buffer of one bandwidth-delay product so badly that
//! half the bytes on the wire were retransmissions in our lab — and "bytes that crossed
//! the WAN" is one of roam's headline numbers.
//!
//! So: CUBIC, but a loss only counts as congestion when the path shows a queue. A
//! congested bottleneck fills its buffer before it drops, so its losses come with an RTT
//! well above the path's minimum; a random loss on an empty path does not. Losses seen
//! while the RTT is within `max(3 ms, min_rtt / 8)` of the minimum are ignored (and
//! counted); persistent congestion always counts.
//!
//! ```text
//!   loss ──▶ queue delay = rtt − min_rtt ──> threshold? ──yes──▶ CUBIC backs off
//!                                              └──no───▶ ignored (random loss)
//! ```

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// Losses ignored as random by every controller of the process (for logs and tests).
pub static IGNORED_LOSSES: AtomicU64 = AtomicU64::new(0);

/// Builds [`LossTolerant`] controllers around CUBIC.
#[derive(Debug, Default)]
pub struct LossTolerantConfig {
    inner: Arc<CubicConfig>,
}

impl ControllerFactory for LossTolerantConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            inner: self.inner.clone().build(now, current_mtu),
            rtt: Duration::ZERO,
            min_rtt: Duration::ZERO,
        })
    }
}

/// CUBIC that ignores losses while the path shows no queue.
pub struct LossTolerant {
    inner: Box<dyn Controller>,
    rtt: Duration,
    min_rtt: Duration,
}

/// Queueing delay above which a loss is taken as congestion.
pub fn queue_threshold(min_rtt: Duration) -> Duration {
    (min_rtt / 8).max(Duration::from_millis(3))
}

/// Whether a loss seen at `rtt` on a path whose minimum RTT is `min_rtt` is congestion.
pub fn is_congestion(rtt: Duration, min_rtt: Duration, persistent: bool) -> bool {
    persistent || min_rtt.is_zero() || rtt.saturating_sub(min_rtt) > queue_threshold(min_rtt)
}

impl Controller for LossTolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        // The freshest of smoothed and latest: a queue shows at once in `latest`.
        self.rtt = rtt.conservative();
        self.min_rtt = rtt.min();
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if is_congestion(self.rtt, self.min_rtt, is_persistent_congestion) {
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        } else {
            IGNORED_LOSSES.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            inner: self.inner.clone_box(),
            rtt: self.rtt,
            min_rtt: self.min_rtt,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn random_loss_on_an_empty_path_is_ignored() {
        assert!(!is_congestion(ms(41), ms(40), false));
        assert!(!is_congestion(ms(12), ms(10), false));
    }

    #[test]
    fn loss_with_a_queue_is_congestion() {
        assert!(is_congestion(ms(60), ms(40), false));
        assert!(is_congestion(ms(14), ms(10), false));
        assert!(is_congestion(ms(40), ms(40), true));
    }

    #[test]
    fn no_rtt_sample_yet_means_congestion() {
        assert!(is_congestion(ms(0), ms(0), false));
    }
}
