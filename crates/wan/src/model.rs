//! The link model: pure, no I/O, no clock of its own, deterministic for a seed.
//!
//! One [`LinkModel`] is one direction of one WAN path. It is told "a packet of `len` bytes
//! arrived at `now`" and answers with a [`Verdict`]: deliver it at some later instant, or
//! drop it for a [`DropReason`]. The caller owns the packets, the clock and the timers; the
//! model only keeps the state a real bottleneck link has:
//!
//! ```text
//!  arrival ─► outage? ─► random loss? ─► tail-drop queue ─► serializer ─► propagation ─► out
//!            (drop)       (drop)          (drop if the       (len*8/rate)  (delay ± jitter,
//!                                          backlog is full)                 optionally FIFO)
//! ```
//!
//! The queue is not a container: the backlog in bytes is derived from `busy_until`, the
//! instant the serializer finishes the last accepted packet, as `(busy_until - now) * rate`.
//! That is exactly the number of bytes a FIFO in front of a link of that rate would still
//! hold, so no dequeue events are needed.

use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Smallest default queue: 16 full-size packets, so a link with a tiny bandwidth-delay product
/// still absorbs a TCP burst.
const MIN_DEFAULT_QUEUE_BYTES: u64 = 16 * 1500;

/// Parameters of a WAN path, the same for both directions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkParams {
    /// Bottleneck rate in Mbit/s of IP packets (headers included). `0` = unlimited.
    pub bandwidth_mbit: f64,
    /// Round-trip propagation delay in ms; each direction adds half of it.
    pub rtt_ms: f64,
    /// The one-way delay varies within `± jitter_ms`. Without `allow_reorder` it drifts
    /// smoothly between random points (so order is kept and the mean stays the delay);
    /// with it, each packet draws its own offset.
    pub jitter_ms: f64,
    /// Probability in percent that a packet is lost, independently per packet.
    pub loss_pct: f64,
    /// Queue in front of the bottleneck in bytes; `None` = the bandwidth-delay product
    /// (at least 16 packets of 1500 bytes), which lets one TCP flow keep the link full.
    pub queue_bytes: Option<u64>,
    /// With jitter, let a later packet overtake an earlier one (netem's behaviour). Off by
    /// default: a single physical path keeps order, and TCP takes reordering as loss.
    pub allow_reorder: bool,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            bandwidth_mbit: 0.0,
            rtt_ms: 0.0,
            jitter_ms: 0.0,
            loss_pct: 0.0,
            queue_bytes: None,
            allow_reorder: false,
        }
    }
}

/// A [`LinkParams`] field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid link parameter {field}: {value} ({why})")]
pub struct InvalidParam {
    /// Field name.
    pub field: &'static str,
    /// Offending value.
    pub value: f64,
    /// What is allowed.
    pub why: &'static str,
}

impl LinkParams {
    /// Checks every field is finite and in range.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let check = |field, value: f64, max: f64| {
            if !value.is_finite() || value < 0.0 || value > max {
                Err(InvalidParam {
                    field,
                    value,
                    why: "must be finite, >= 0 and <= max",
                })
            } else {
                Ok(())
            }
        };
        check("bandwidth_mbit", self.bandwidth_mbit, 1_000_000.0)?;
        check("rtt_ms", self.rtt_ms, 600_000.0)?;
        check("jitter_ms", self.jitter_ms, 600_000.0)?;
        check("loss_pct", self.loss_pct, 100.0)?;
        Ok(())
    }

    /// Rate in bit/s, `None` when unlimited.
    pub fn rate_bps(&self) -> Option<u64> {
        let bps = self.bandwidth_mbit * 1e6;
        (bps >= 1.0).then_some(bps as u64)
    }

    /// One-way propagation delay (half the RTT).
    pub fn one_way_delay(&self) -> Duration {
        Duration::from_secs_f64(self.rtt_ms / 2.0 / 1e3)
    }

    /// The queue size in force: the explicit one, else the bandwidth-delay product.
    pub fn effective_queue_bytes(&self) -> u64 {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        match self.rate_bps() {
            Some(bps) => {
                let bdp = (bps as f64 / 8.0 * self.rtt_ms / 1e3) as u64;
                bdp.max(MIN_DEFAULT_QUEUE_BYTES)
            }
            None => u64::MAX,
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The link is in an outage.
    Outage,
    /// Random loss.
    Loss,
    /// The queue in front of the bottleneck was full (tail drop).
    QueueFull,
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the far side at this instant.
    Deliver(Instant),
    /// Drop it.
    Drop(DropReason),
}

/// SplitMix64: tiny, fast, and stable across crate versions, so a seed always replays the
/// same losses and jitter (a `rand` upgrade could change its generators' streams).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One direction of a WAN path. See the module doc.
#[derive(Debug, Clone)]
pub struct LinkModel {
    params: LinkParams,
    queue_bytes: u64,
    rate_bps: Option<u64>,
    delay: Duration,
    outage: bool,
    rng: SplitMix64,
    /// When the serializer finishes the last accepted packet.
    busy_until: Option<Instant>,
    /// Delivery time of the last accepted packet, to keep FIFO order under jitter.
    last_delivery: Option<Instant>,
    /// Order-keeping jitter: the offset (seconds) moves linearly from `.0` to `.1`.
    drift: Option<((Instant, f64), (Instant, f64))>,
}

impl LinkModel {
    /// A link with these parameters and RNG seed.
    pub fn new(params: LinkParams, seed: u64) -> Result<Self, InvalidParam> {
        params.validate()?;
        Ok(Self {
            params,
            queue_bytes: params.effective_queue_bytes(),
            rate_bps: params.rate_bps(),
            delay: params.one_way_delay(),
            outage: false,
            rng: SplitMix64::new(seed),
            busy_until: None,
            last_delivery: None,
            drift: None,
        })
    }

    /// Current parameters.
    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    /// Changes the parameters; packets already accepted keep their delivery times and the
    /// backlog carries over (it drains at the new rate from now on).
    pub fn set_params(&mut self, params: LinkParams) -> Result<(), InvalidParam> {
        params.validate()?;
        self.params = params;
        self.queue_bytes = params.effective_queue_bytes();
        self.rate_bps = params.rate_bps();
        self.delay = params.one_way_delay();
        Ok(())
    }

    /// Starts or ends an outage: while on, every arriving packet is dropped.
    pub fn set_outage(&mut self, on: bool) {
        self.outage = on;
    }

    /// Whether an outage is on.
    pub fn outage(&self) -> bool {
        self.outage
    }

    /// Bytes waiting for (or in) the serializer at `now`.
    pub fn backlog_bytes(&self, now: Instant) -> u64 {
        match (self.busy_until, self.rate_bps) {
            (Some(busy), Some(bps)) if busy > now => {
                let ns = (busy - now).as_nanos();
                (ns * u128::from(bps) / 8_000_000_000) as u64
            }
            _ => 0,
        }
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`. `now` must not go
    /// backwards between calls by more than scheduling noise; it is clamped if it does.
    pub fn on_packet(&mut self, now: Instant, len: usize) -> Verdict {
        if self.outage {
            return Verdict::Drop(DropReason::Outage);
        }
        if self.params.loss_pct > 0.0 && self.rng.next_f64() * 100.0 < self.params.loss_pct {
            return Verdict::Drop(DropReason::Loss);
        }
        let depart = match self.rate_bps {
            Some(bps) => {
                let backlog = self.backlog_bytes(now);
                if backlog > 0 && backlog.saturating_add(len as u64) > self.queue_bytes {
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let start = match self.busy_until {
                    Some(busy) if busy > now => busy,
                    _ => now,
                };
                let ser_ns = (len as u128 * 8_000_000_000) / u128::from(bps);
                let depart = start + Duration::from_nanos(ser_ns as u64);
                self.busy_until = Some(depart);
                depart
            }
            None => now,
        };
        let mut deliver = depart + self.delay;
        if self.params.jitter_ms > 0.0 {
            let j = if self.params.allow_reorder {
                (self.rng.next_f64() * 2.0 - 1.0) * self.params.jitter_ms / 1e3
            } else {
                self.drift_at(depart)
            };
            deliver = if j >= 0.0 {
                deliver + Duration::from_secs_f64(j)
            } else {
                // Never earlier than the packet left the serializer.
                deliver
                    .checked_sub(Duration::from_secs_f64(-j))
                    .unwrap_or(depart)
                    .max(depart)
            };
        }
        if !self.params.allow_reorder {
            if let Some(last) = self.last_delivery {
                deliver = deliver.max(last);
            }
        }
        self.last_delivery = Some(deliver);
        Verdict::Deliver(deliver)
    }
}

impl LinkModel {
    /// The order-keeping jitter offset at `t`, in seconds: a piecewise-linear walk through
    /// uniform random points in `± jitter` spaced `4 × jitter` apart. Its slope stays
    /// within ±0.5, so `t + offset(t)` only grows: later packets never overtake, bulk
    /// traffic sees the same spread and mean as sparse probes, and the delay changes
    /// smoothly the way queueing delay on a real path does.
    fn drift_at(&mut self, t: Instant) -> f64 {
        let j = self.params.jitter_ms / 1e3;
        let period = Duration::from_secs_f64((4.0 * j).max(1e-3));
        let draw = |rng: &mut SplitMix64| (rng.next_f64() * 2.0 - 1.0) * j;
        let ((mut t0, mut v0), (mut t1, mut v1)) = match self.drift {
            Some(d) => d,
            None => {
                let v = draw(&mut self.rng);
                ((t, v), (t + period, draw(&mut self.rng)))
            }
        };
        if t >= t1 + period * 64 {
            // Long idle: restart the walk here rather than step through the gap.
            (t0, v0) = (t, v1);
            (t1, v1) = (t + period, draw(&mut self.rng));
        }
        while t >= t1 {
            (t0, v0) = (t1, v1);
            (t1, v1) = (t1 + period, draw(&mut self.rng));
        }
        self.drift = Some(((t0, v0), (t1, v1)));
        let f = if t <= t0 {
            0.0
        } else {
            (t - t0).as_secs_f64() / (t1 - t0).as_secs_f64()
        };
        // Clamp the walk's amplitude if jitter was lowered since the points were drawn.
        (v0 + (v1 - v0) * f).clamp(-j, j)
    }
}

/// Packets waiting for their delivery instant, earliest first; ties keep arrival order.
#[derive(Debug)]
pub struct DelayLine<T> {
    heap: BinaryHeap<Slot<T>>,
    seq: u64,
}

#[derive(Debug)]
struct Slot<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Slot<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest on top.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> Default for DelayLine<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> DelayLine<T> {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `item` for delivery at `at`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Slot {
            at,
            seq: self.seq,
            item,
        });
    }

    /// The earliest delivery instant, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|s| s.at)
    }

    /// Removes and returns the earliest item if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|s| s.item)
        } else {
            None
        }
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Drops everything, returning how many items there were.
    pub fn clear(&mut self) -> usize {
        let n = self.heap.len();
        self.heap.clear();
        n
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
