use super::*;
use proptest::prelude::*;

fn ms(x: f64) -> Duration {
    Duration::from_secs_f64(x / 1e3)
}

fn params(bw: f64, rtt: f64) -> LinkParams {
    LinkParams {
        bandwidth_mbit: bw,
        rtt_ms: rtt,
        ..LinkParams::default()
    }
}

fn deliver(v: Verdict) -> Instant {
    match v {
        Verdict::Deliver(t) => t,
        Verdict::Drop(r) => panic!("dropped: {r:?}"),
    }
}

#[test]
fn unlimited_link_adds_half_the_rtt() {
    let t0 = Instant::now();
    let mut l = LinkModel::new(params(0.0, 40.0), 1).unwrap();
    assert_eq!(deliver(l.on_packet(t0, 1500)), t0 + ms(20.0));
    assert_eq!(l.backlog_bytes(t0), 0);
}

#[test]
fn serialization_delay_matches_rate() {
    // 1500 bytes at 12 Mbit/s = 1 ms on the wire.
    let t0 = Instant::now();
    let mut l = LinkModel::new(params(12.0, 0.0), 1).unwrap();
    let a = deliver(l.on_packet(t0, 1500));
    let b = deliver(l.on_packet(t0, 1500));
    assert_eq!(a, t0 + ms(1.0));
    assert_eq!(b, t0 + ms(2.0));
    assert_eq!(l.backlog_bytes(t0), 3000);
    assert_eq!(l.backlog_bytes(t0 + ms(1.5)), 750);
    assert_eq!(l.backlog_bytes(t0 + ms(3.0)), 0);
}

#[test]
fn saturated_link_delivers_exactly_the_rate() {
    // Offer 2x the rate for 1 s; delivered bytes over [0, 1s] must equal the rate.
    let t0 = Instant::now();
    let p = LinkParams {
        queue_bytes: Some(20_000_000),
        ..params(100.0, 40.0)
    };
    let mut l = LinkModel::new(p, 1).unwrap();
    let gap = Duration::from_nanos(60_000); // 1500 B / 60 us = 200 Mbit/s offered
    let mut last = t0;
    let mut bytes = 0u64;
    for i in 0..16_000u32 {
        let t = deliver(l.on_packet(t0 + gap * i, 1500));
        assert!(t >= last, "FIFO order");
        last = t;
        if t <= t0 + ms(20.0) + Duration::from_secs(1) {
            bytes += 1500;
        }
    }
    let mbit = bytes as f64 * 8.0 / 1e6;
    assert!((mbit - 100.0).abs() < 0.1, "delivered {mbit} Mbit in 1 s");
}

#[test]
fn default_queue_is_the_bdp_and_tail_drops() {
    let p = params(100.0, 40.0);
    assert_eq!(p.effective_queue_bytes(), 500_000);
    assert_eq!(
        params(1.0, 1.0).effective_queue_bytes(),
        MIN_DEFAULT_QUEUE_BYTES
    );
    let t0 = Instant::now();
    let mut l = LinkModel::new(p, 1).unwrap();
    let mut accepted = 0;
    let mut full = 0;
    for _ in 0..1000 {
        match l.on_packet(t0, 1000) {
            Verdict::Deliver(_) => accepted += 1,
            Verdict::Drop(DropReason::QueueFull) => full += 1,
            Verdict::Drop(r) => panic!("{r:?}"),
        }
    }
    assert_eq!(accepted, 500);
    assert_eq!(full, 500);
    // Once the queue drained a packet's worth, one more fits.
    assert!(matches!(
        l.on_packet(t0 + Duration::from_micros(80), 1000),
        Verdict::Deliver(_)
    ));
}

#[test]
fn outage_drops_everything_until_off() {
    let t0 = Instant::now();
    let mut l = LinkModel::new(params(10.0, 10.0), 1).unwrap();
    l.set_outage(true);
    for i in 0..100 {
        assert_eq!(
            l.on_packet(t0 + ms(i as f64), 100),
            Verdict::Drop(DropReason::Outage)
        );
    }
    l.set_outage(false);
    assert!(matches!(
        l.on_packet(t0 + ms(200.0), 100),
        Verdict::Deliver(_)
    ));
}

#[test]
fn loss_rate_is_close_to_setting() {
    let t0 = Instant::now();
    let p = LinkParams {
        loss_pct: 2.0,
        ..params(0.0, 0.0)
    };
    let mut l = LinkModel::new(p, 7).unwrap();
    let lost = (0..100_000)
        .filter(|_| l.on_packet(t0, 100) == Verdict::Drop(DropReason::Loss))
        .count();
    // 2000 expected, sigma ~44.
    assert!((1800..2200).contains(&lost), "lost {lost}");
}

#[test]
fn same_seed_same_fate() {
    let t0 = Instant::now();
    let p = LinkParams {
        loss_pct: 10.0,
        jitter_ms: 5.0,
        allow_reorder: true,
        ..params(50.0, 20.0)
    };
    let run = |seed| {
        let mut l = LinkModel::new(p, seed).unwrap();
        (0..500)
            .map(|i| l.on_packet(t0 + ms(i as f64 * 0.1), 1200))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn jitter_reorders_only_when_allowed() {
    let t0 = Instant::now();
    let base = LinkParams {
        jitter_ms: 10.0,
        ..params(0.0, 40.0)
    };
    let count_inversions = |allow| {
        let mut l = LinkModel::new(
            LinkParams {
                allow_reorder: allow,
                ..base
            },
            9,
        )
        .unwrap();
        let times: Vec<_> = (0..1000)
            .map(|i| deliver(l.on_packet(t0 + ms(i as f64), 100)))
            .collect();
        for t in &times {
            assert!(*t >= t0 + ms(10.0) && *t <= t0 + ms(1000.0 + 30.0));
        }
        times.windows(2).filter(|w| w[1] < w[0]).count()
    };
    assert!(count_inversions(true) > 50);
    assert_eq!(count_inversions(false), 0);
}

#[test]
fn order_keeping_jitter_keeps_spread_and_mean_under_load() {
    // 1 Gbit/s of back-to-back 1500-byte packets for 2 s on 40 ms ± 5 ms. Clamping
    // independent offsets to FIFO order would push nearly every packet to +5 ms.
    let t0 = Instant::now();
    let p = LinkParams {
        jitter_ms: 5.0,
        ..params(1000.0, 40.0)
    };
    let mut l = LinkModel::new(
        LinkParams {
            queue_bytes: Some(u64::MAX),
            ..p
        },
        11,
    )
    .unwrap();
    let gap = Duration::from_nanos(12_000);
    let mut last = t0;
    let (mut sum, mut lo, mut hi) = (0.0, f64::MAX, f64::MIN);
    let n = 166_000u32;
    for i in 0..n {
        let now = t0 + gap * i;
        let t = deliver(l.on_packet(now, 1500));
        assert!(t >= last);
        last = t;
        let d = (t - now).as_secs_f64() * 1e3 - 20.0 - 0.012;
        sum += d;
        lo = lo.min(d);
        hi = hi.max(d);
    }
    let mean = sum / f64::from(n);
    assert!(mean.abs() < 1.5, "mean offset {mean} ms");
    assert!(
        lo < -3.5 && hi > 3.5 && lo >= -5.01 && hi <= 5.01,
        "{lo} .. {hi}"
    );
}

#[test]
fn invalid_params_are_rejected() {
    assert!(LinkModel::new(
        LinkParams {
            loss_pct: 101.0,
            ..Default::default()
        },
        0
    )
    .is_err());
    assert!(LinkModel::new(
        LinkParams {
            rtt_ms: f64::NAN,
            ..Default::default()
        },
        0
    )
    .is_err());
    assert!(LinkModel::new(
        LinkParams {
            bandwidth_mbit: -1.0,
            ..Default::default()
        },
        0
    )
    .is_err());
}

#[test]
fn delay_line_orders_by_time_then_arrival() {
    let t0 = Instant::now();
    let mut d = DelayLine::new();
    d.push(t0 + ms(5.0), "b");
    d.push(t0 + ms(1.0), "a");
    d.push(t0 + ms(5.0), "c");
    assert_eq!(d.next_due(), Some(t0 + ms(1.0)));
    assert_eq!(d.pop_due(t0), None);
    assert_eq!(d.pop_due(t0 + ms(10.0)), Some("a"));
    assert_eq!(d.pop_due(t0 + ms(10.0)), Some("b"));
    assert_eq!(d.pop_due(t0 + ms(10.0)), Some("c"));
    assert!(d.is_empty());
}

proptest! {
    /// Whatever the arrivals, a rate-limited link never delivers faster than its rate,
    /// never before the propagation delay, and (without reorder) keeps FIFO order.
    #[test]
    fn never_faster_than_rate(
        bw in 1.0f64..1000.0,
        rtt in 0.0f64..200.0,
        jitter in 0.0f64..20.0,
        loss in 0.0f64..50.0,
        arrivals in proptest::collection::vec((0u64..200_000, 40usize..1500), 1..300),
        seed in any::<u64>(),
    ) {
        let p = LinkParams { bandwidth_mbit: bw, rtt_ms: rtt, jitter_ms: jitter, loss_pct: loss, ..Default::default() };
        let mut l = LinkModel::new(p, seed).unwrap();
        let t0 = Instant::now();
        let mut now = t0;
        let mut last: Option<Instant> = None;
        let mut bytes = 0u64;
        let mut first: Option<Instant> = None;
        for (gap_ns, len) in arrivals {
            now += Duration::from_nanos(gap_ns);
            let backlog = l.backlog_bytes(now);
            match l.on_packet(now, len) {
                Verdict::Deliver(t) => {
                    prop_assert!(t >= now + p.one_way_delay().saturating_sub(ms(jitter)));
                    if let Some(last) = last { prop_assert!(t >= last); }
                    last = Some(t);
                    first.get_or_insert(now);
                    bytes += len as u64;
                }
                Verdict::Drop(DropReason::QueueFull) => {
                    prop_assert!(backlog + len as u64 > p.effective_queue_bytes());
                }
                Verdict::Drop(DropReason::Loss) => {}
                Verdict::Drop(DropReason::Outage) => prop_assert!(false, "no outage set"),
            }
        }
        // All accepted bytes need at least bytes*8/rate on the wire after the first arrival.
        if let (Some(first), Some(last)) = (first, last) {
            let wire = Duration::from_secs_f64(bytes as f64 * 8.0 / (bw * 1e6));
            let min_end = first + wire + p.one_way_delay();
            prop_assert!(last + ms(jitter) + Duration::from_micros(1) >= min_end);
        }
    }
}
