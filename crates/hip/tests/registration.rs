//! Registration after the base exchange (RFC 8003): REG_REQUEST inside
//! UPDATE to renew before the lifetime ends or to cancel with lifetime 0,
//! REG_RESPONSE / REG_FAILED in the ACKing UPDATE, retransmission, and
//! expiry at the registrar, and registering again in a new base exchange
//! after a restarted or dead registrar let the registration lapse. Time is
//! driven by hand: no sleeping.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_hip::identity::HostIdentity;
use roam_hip::machine::{Config, Host, Output};
use roam_hip::rvs;
use roam_hip::wire::params::*;
use roam_hip::wire::{Packet, PacketType};

/// 2^((72-64)/8) s = 2 s.
const TWO_SECONDS: u8 = 72;

struct Pair {
    /// The requester (a registered host).
    r: Host,
    /// The registrar (a rendezvous server).
    v: Host,
    ra: SocketAddr,
    va: SocketAddr,
    t0: Instant,
    /// Whether a packet the receiver rejects fails the test (otherwise it
    /// is counted in `Seen::rejected`).
    strict: bool,
}

/// What happened while delivering: events of each host and the packets sent.
#[derive(Default, Debug)]
struct Seen {
    r: Vec<Output>,
    v: Vec<Output>,
    /// (sent by the requester, packet).
    packets: Vec<(bool, Packet)>,
    /// Packets the receiver refused, and why.
    rejected: Vec<String>,
}

impl Pair {
    /// A requester registered for rendezvous with a lifetime value of
    /// `lifetime` in the base exchange, at `t0`.
    fn registered(lifetime: u8) -> Pair {
        let t0 = Instant::now();
        let v_cfg = Config {
            services: vec![REG_TYPE_RENDEZVOUS],
            // From 1 s up, so short lifetimes are granted as asked.
            service_lifetime: (64, 160),
            ..Config::default()
        };
        let mut p = Pair {
            r: Host::new(HostIdentity::generate(), Config::default(), t0).unwrap(),
            v: Host::new(HostIdentity::generate(), v_cfg, t0).unwrap(),
            ra: "198.18.1.2:10500".parse().unwrap(),
            va: "198.18.3.3:10500".parse().unwrap(),
            t0,
            strict: true,
        };
        let outs =
            p.r.connect_and_register(t0, p.v.hit(), p.va, vec![REG_TYPE_RENDEZVOUS], lifetime)
                .unwrap();
        let seen = p.deliver(t0, outs, |_, _| false);
        assert!(seen.r.iter().any(|e| matches!(e,
            Output::Registration { granted, lifetime: l, .. }
                if *granted == vec![REG_TYPE_RENDEZVOUS] && *l == lifetime)));
        p
    }

    /// Delivers `outs` (from the requester) and every answer at `now`;
    /// `lost(from_requester, packet)` drops a packet on the way.
    fn deliver(
        &mut self,
        now: Instant,
        outs: Vec<Output>,
        mut lost: impl FnMut(bool, &Packet) -> bool,
    ) -> Seen {
        self.deliver_from(
            now,
            outs.into_iter().map(|o| (true, o)).collect(),
            &mut lost,
        )
    }

    fn deliver_from(
        &mut self,
        now: Instant,
        mut q: Vec<(bool, Output)>,
        lost: &mut impl FnMut(bool, &Packet) -> bool,
    ) -> Seen {
        let mut seen = Seen::default();
        let strict = self.strict;
        while let Some((from_r, o)) = q.pop() {
            match o {
                Output::Send { packet, .. } => {
                    seen.packets.push((from_r, packet.clone()));
                    if lost(from_r, &packet) {
                        continue;
                    }
                    let bytes = packet.encode().unwrap();
                    let (dst, src) = if from_r {
                        (&mut self.v, self.ra)
                    } else {
                        (&mut self.r, self.va)
                    };
                    let outs = match dst.receive_bytes(now, src, &bytes) {
                        Ok(outs) => outs,
                        Err(e) if !strict => {
                            seen.rejected.push(e.to_string());
                            continue;
                        }
                        Err(e) => panic!("{:?} refused: {e}", packet.header.packet_type),
                    };
                    q.extend(outs.into_iter().map(|o| (!from_r, o)));
                }
                e if from_r => seen.r.push(e),
                e => seen.v.push(e),
            }
        }
        seen
    }

    /// Polls both hosts at `now` and delivers what they send.
    fn tick(&mut self, now: Instant, mut lost: impl FnMut(bool, &Packet) -> bool) -> Seen {
        let mut q: Vec<(bool, Output)> = self.r.poll(now).into_iter().map(|o| (true, o)).collect();
        q.extend(self.v.poll(now).into_iter().map(|o| (false, o)));
        self.deliver_from(now, q, &mut lost)
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn relays_for_r(&mut self) -> bool {
        let mut i = Host::new(HostIdentity::generate(), Config::default(), self.t0).unwrap();
        let i1 = match i.connect(self.t0, self.r.hit(), self.va).unwrap().pop() {
            Some(Output::Send { packet, .. }) => packet,
            other => panic!("no I1: {other:?}"),
        };
        let ia = "198.18.4.2:10500".parse().unwrap();
        rvs::relay_for(&self.v, &i1, ia).is_some()
    }
}

fn reg_request(p: &Packet) -> Option<RegRequest> {
    p.get::<RegRequest>().unwrap()
}

fn expired(events: &[Output]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Output::RegistrationExpired { .. }))
}

#[test]
fn lifetime_encoding_follows_rfc_8003() {
    assert_eq!(reg_lifetime(0), None, "0 means cancellation");
    assert_eq!(reg_lifetime(64), Some(Duration::from_secs(1)));
    assert_eq!(reg_lifetime(72), Some(Duration::from_secs(2)));
    assert_eq!(reg_lifetime(128), Some(Duration::from_secs(256)));
    assert_eq!(reg_lifetime(160), Some(Duration::from_secs(4096)));
    // The smallest value that lasts long enough, never one step short.
    assert_eq!(reg_lifetime_value(Duration::from_secs(2)), 72);
    let v = reg_lifetime_value(Duration::from_secs(3));
    assert_eq!(v, 77);
    assert!(reg_lifetime(v).unwrap() >= Duration::from_secs(3));
    assert!(reg_lifetime(v - 1).unwrap() < Duration::from_secs(3));
    assert_eq!(reg_lifetime_value(Duration::ZERO), 1);
    assert_eq!(reg_lifetime_value(Duration::from_secs(1 << 40)), 255);
    for v in 1..=u8::MAX {
        assert_eq!(reg_lifetime_value(reg_lifetime(v).unwrap()), v);
    }
}

/// The requester renews at half of each granted lifetime; the registrar's
/// registration never ends, so relaying continues well past the first
/// lifetime.
#[test]
fn renewed_before_the_lifetime_ends() {
    let mut p = Pair::registered(TWO_SECONDS);
    assert_eq!(
        p.v.registrations(),
        vec![(p.r.hit(), vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS)]
    );
    assert_eq!(
        p.r.registered_with(&p.v.hit()),
        Some((vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS))
    );
    // The renewal is the requester's next timer: half the lifetime.
    let due = p.r.next_deadline().unwrap();
    assert!(due <= p.at(1000), "renewal due too late");
    let mut renewals = 0;
    for ms in (250..=6000).step_by(250) {
        let seen = p.tick(p.at(ms), |_, _| false);
        for (from_r, pkt) in &seen.packets {
            if *from_r && pkt.header.packet_type == PacketType::Update {
                let req = reg_request(pkt).unwrap();
                assert_eq!(req.lifetime, TWO_SECONDS);
                assert_eq!(req.reg_types, vec![REG_TYPE_RENDEZVOUS]);
                assert!(
                    pkt.get::<Seq>().unwrap().is_some(),
                    "renewal must be reliable"
                );
                renewals += 1;
            }
            if !*from_r {
                // The answer rides in the ACKing UPDATE.
                assert!(pkt.get::<Ack>().unwrap().is_some());
                assert_eq!(
                    pkt.get::<RegResponse>().unwrap().unwrap().lifetime,
                    TWO_SECONDS
                );
            }
        }
        assert!(!expired(&seen.v), "expired at {ms} ms despite renewals");
        assert!(
            !seen
                .r
                .iter()
                .any(|e| matches!(e, Output::RegistrationLapsed { .. })),
            "lapsed at {ms} ms"
        );
        assert!(p.relays_for_r(), "no relaying at {ms} ms");
    }
    // One renewal per second over six seconds.
    assert!((5..=7).contains(&renewals), "{renewals} renewals");
}

/// Without renewals the registrar drops the registration when its lifetime
/// ends, and relays nothing for the host any more.
#[test]
fn expires_at_the_registrar_without_renewal() {
    let mut p = Pair::registered(TWO_SECONDS);
    let v_deadline = p.v.next_deadline().unwrap();
    assert!(v_deadline <= p.at(2000), "expiry not scheduled");
    // The requester's renewals are all lost.
    let lose_r = |from_r: bool, _: &Packet| from_r;
    let seen = p.tick(p.at(1990), lose_r);
    assert!(!expired(&seen.v));
    assert!(p.relays_for_r());
    let seen = p.tick(p.at(2010), lose_r);
    let r_hit = p.r.hit();
    assert!(
        seen.v.iter().any(|e| matches!(e,
            Output::RegistrationExpired { peer, types }
                if *peer == r_hit && *types == vec![REG_TYPE_RENDEZVOUS])),
        "{:?}",
        seen.v
    );
    assert!(p.v.registrations().is_empty());
    assert!(!p.relays_for_r());
    // The requester's grant lapsed too (by its own clock), with its
    // renewal unanswered: it drops the association and starts over with a
    // new base exchange (whose I1 is lost too).
    assert!(seen
        .r
        .iter()
        .any(|e| matches!(e, Output::RegistrationLapsed { .. })));
    assert!(seen.r.iter().any(|e| matches!(e, Output::Closed { .. })));
    assert!(sent_i1(&seen));
    assert_eq!(p.r.registered_with(&p.v.hit()), None);
    assert!(p.r.reregistering(&p.v.hit()));
}

fn sent_i1(seen: &Seen) -> bool {
    seen.packets
        .iter()
        .any(|(r, pkt)| *r && pkt.header.packet_type == PacketType::I1)
}

/// The registrar restarts (same identity and address, no state): it cannot
/// check the renewal's HIP_MAC and never answers. When the grant runs out,
/// the requester drops the association and registers in a new base
/// exchange (REG_REQUEST in I2), then renews in UPDATE as before.
#[test]
fn restarted_registrar_is_registered_with_again() {
    let mut p = Pair::registered(TWO_SECONDS);
    let v_hit = p.v.hit();
    p.v = Host::new(p.v.identity().clone(), p.v.config().clone(), p.at(500)).unwrap();
    p.strict = false;
    assert!(p.v.registrations().is_empty());
    assert!(!p.relays_for_r());

    // The renewal at 1 s and its retransmission at 1.5 s go unanswered.
    let none = |_: bool, _: &Packet| false;
    for ms in [1000, 1500, 1990] {
        let seen = p.tick(p.at(ms), none);
        assert!(seen.packets.iter().all(|(r, _)| *r), "answered at {ms}");
        assert!(!sent_i1(&seen), "new exchange before the lapse");
        assert!(seen.r.is_empty(), "{:?}", seen.r);
    }
    assert!(!p.r.reregistering(&v_hit));

    // At the end of the 2 s grant: lapse, association dropped, and a new
    // base exchange that registers at once.
    let seen = p.tick(p.at(2010), none);
    assert!(seen
        .r
        .iter()
        .any(|e| matches!(e, Output::RegistrationLapsed { .. })));
    assert!(seen
        .r
        .iter()
        .any(|e| matches!(e, Output::Closed { peer } if *peer == v_hit)));
    assert!(sent_i1(&seen));
    let i2 = seen
        .packets
        .iter()
        .find(|(r, pkt)| *r && pkt.header.packet_type == PacketType::I2)
        .map(|(_, pkt)| pkt)
        .expect("no I2");
    let req = reg_request(i2).expect("no REG_REQUEST in I2");
    assert_eq!(req.reg_types, vec![REG_TYPE_RENDEZVOUS]);
    assert_eq!(req.lifetime, TWO_SECONDS);
    assert!(seen
        .r
        .iter()
        .any(|e| matches!(e, Output::Established { peer, .. } if *peer == v_hit)));
    assert_eq!(
        p.r.registered_with(&v_hit),
        Some((vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS))
    );
    assert_eq!(p.v.registrations().len(), 1);
    assert!(p.relays_for_r());
    assert!(!p.r.reregistering(&v_hit));

    // Renewed in UPDATE on the new association at half the new lifetime.
    let seen = p.tick(p.at(3010), none);
    assert!(seen.rejected.is_empty(), "{:?}", seen.rejected);
    assert!(
        seen.v.iter().any(|e| matches!(
            e,
            Output::Registered {
                lifetime: TWO_SECONDS,
                ..
            }
        )),
        "{:?}",
        seen.v
    );
    let seen = p.tick(p.at(4500), none);
    assert!(!expired(&seen.v));
    assert!(p.relays_for_r());
}

/// A registrar that stays away is not hammered: after each failed base
/// exchange (I1 retransmitted until it gives up) the next one waits
/// `reregister_backoff`, doubled per failure up to `reregister_backoff_max`.
/// Once it is back, the next exchange registers.
#[test]
fn dead_registrar_is_retried_with_backoff() {
    let mut p = Pair::registered(TWO_SECONDS);
    let v_hit = p.v.hit();
    let cfg = p.r.config().clone();
    let lost = |from_r: bool, _: &Packet| from_r;
    let mut failed_at = None;
    let mut waits = Vec::new();
    let mut i1s = 0;
    let end = p.at(30 * 60 * 1000);
    while let Some(t) = p.r.next_deadline().filter(|t| *t <= end) {
        let seen = p.tick(t, lost);
        if sent_i1(&seen) {
            i1s += 1;
            if let Some(f) = failed_at.take() {
                waits.push(t - f);
            }
        }
        if seen.r.iter().any(|e| matches!(e, Output::Failed { .. })) {
            failed_at = Some(t);
        }
        assert!(p.r.reregistering(&v_hit) || t < p.at(2000));
    }
    let s = Duration::from_secs;
    let mut want: Vec<Duration> = [2, 4, 8, 16, 32, 64, 128, 256].map(s).to_vec();
    want.extend(std::iter::repeat_n(
        cfg.reregister_backoff_max,
        waits.len() - want.len(),
    ));
    assert_eq!(waits, want);
    // About 6 I1s per exchange (5 retransmissions), 13 exchanges in 30 min.
    assert!(i1s <= 6 * 14, "{i1s} I1s in 30 minutes");

    // The registrar is back (it kept the old association; the new I2
    // replaces it): the next exchange registers.
    let mut t = p.r.next_deadline().unwrap();
    while p.r.registered_with(&v_hit).is_none() {
        p.tick(t, |_, _| false);
        t = p.r.next_deadline().unwrap();
        assert!(t <= end + s(400), "not registered again");
    }
    assert!(!p.r.reregistering(&v_hit));
    assert!(p.relays_for_r());
}

/// A lost renewal is retransmitted with the same SEQ; a lost answer is
/// given again, unchanged, for the retransmitted request. (A 4 s lifetime:
/// the retransmissions at 2.5 s and 3.5 s come before the grant lapses,
/// which would start a new base exchange instead.)
#[test]
fn lost_renewal_and_lost_answer_are_retransmitted() {
    const FOUR_SECONDS: u8 = 80;
    let mut p = Pair::registered(FOUR_SECONDS);
    // The first renewal (at 2 s) is lost on the way to the registrar.
    let seen = p.tick(p.at(2000), |from_r, _| from_r);
    let first = seen.packets.iter().find(|(r, _)| *r).unwrap().1.clone();
    assert!(reg_request(&first).is_some());
    // Retransmitted after Config::retransmit_initial (500 ms); this time
    // the registrar's answer is lost.
    let seen = p.tick(p.at(2500), |from_r, _| !from_r);
    let again = seen.packets.iter().find(|(r, _)| *r).unwrap().1.clone();
    assert_eq!(again.get::<Seq>().unwrap(), first.get::<Seq>().unwrap());
    assert_eq!(seen.v.len(), 1, "registrar processed the request once");
    // The next retransmission is a duplicate: answered again, not reprocessed.
    let seen = p.tick(p.at(3500), |_, _| false);
    assert!(seen.v.is_empty(), "duplicate reprocessed: {:?}", seen.v);
    let answer = seen
        .packets
        .iter()
        .find(|(r, _)| !*r)
        .map(|(_, pkt)| pkt.clone())
        .unwrap();
    assert!(answer.get::<RegResponse>().unwrap().is_some());
    assert!(seen.r.iter().any(|e| matches!(
        e,
        Output::Registration {
            lifetime: FOUR_SECONDS,
            ..
        }
    )));
    // The registration was renewed at 2.5 s, so it holds until 6.5 s.
    let seen = p.tick(p.at(6400), |from_r, _| from_r);
    assert!(!expired(&seen.v));
    let seen = p.tick(p.at(6600), |from_r, _| from_r);
    assert!(expired(&seen.v));
}

/// Lifetime 0 cancels: the registrar stops relaying at once, and the
/// requester stops renewing.
#[test]
fn cancellation_with_lifetime_zero() {
    let mut p = Pair::registered(TWO_SECONDS);
    let now = p.at(100);
    let outs = p.r.cancel_registration(now, p.v.hit()).unwrap();
    let seen = p.deliver(now, outs, |_, _| false);
    let req = reg_request(&seen.packets[0].1).unwrap();
    assert_eq!(req.lifetime, 0);
    let r_hit = p.r.hit();
    assert!(seen.v.iter().any(|e| matches!(e,
        Output::Registered { peer, lifetime: 0, .. } if *peer == r_hit)));
    assert!(seen.r.iter().any(|e| matches!(e,
        Output::Registration { granted, lifetime: 0, .. }
            if *granted == vec![REG_TYPE_RENDEZVOUS])));
    assert!(p.v.registrations().is_empty());
    assert!(!p.relays_for_r());
    assert_eq!(p.r.registered_with(&p.v.hit()), None);
    // Nothing more to renew, and nothing expires later.
    for ms in [1000, 2500, 5000] {
        let seen = p.tick(p.at(ms), |_, _| false);
        assert!(seen.packets.is_empty(), "sent after cancelling: {seen:?}");
        assert!(seen.v.is_empty() && seen.r.is_empty());
    }
    // Registering again in an UPDATE works.
    let now = p.at(6000);
    let outs =
        p.r.register(now, p.v.hit(), vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS)
            .unwrap();
    p.deliver(now, outs, |_, _| false);
    assert_eq!(p.v.registrations().len(), 1);
    assert!(p.relays_for_r());
}

/// A type the registrar does not offer fails with REG_FAILED (type
/// unavailable) in the ACKing UPDATE; the offered one is still granted,
/// and the renewals ask only for what was granted.
#[test]
fn unknown_type_fails_in_update() {
    let mut p = Pair::registered(TWO_SECONDS);
    let now = p.at(100);
    let outs =
        p.r.register(now, p.v.hit(), vec![REG_TYPE_RENDEZVOUS, 200], TWO_SECONDS)
            .unwrap();
    let seen = p.deliver(now, outs, |_, _| false);
    let answer = &seen.packets.iter().find(|(r, _)| !*r).unwrap().1;
    let failed = answer.get::<RegFailed>().unwrap().unwrap();
    assert_eq!(failed.failure_type, REG_FAILURE_TYPE_UNAVAILABLE);
    assert_eq!(failed.reg_types, vec![200]);
    assert!(seen.r.iter().any(|e| matches!(e,
        Output::Registration { granted, failed, .. }
            if *granted == vec![REG_TYPE_RENDEZVOUS] && *failed == vec![200])));
    // Only 200: nothing granted, the rendezvous registration is unchanged.
    let now = p.at(200);
    let outs =
        p.r.register(now, p.v.hit(), vec![200], TWO_SECONDS)
            .unwrap();
    let seen = p.deliver(now, outs, |_, _| false);
    assert!(seen.r.iter().any(|e| matches!(e,
        Output::Registration { granted, failed, .. }
            if granted.is_empty() && *failed == vec![200])));
    assert_eq!(
        p.v.registrations(),
        vec![(p.r.hit(), vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS)]
    );
    // Refused types are not asked for again.
    let outs =
        p.r.register(
            p.at(300),
            p.v.hit(),
            vec![REG_TYPE_RENDEZVOUS, 200],
            TWO_SECONDS,
        )
        .unwrap();
    p.deliver(p.at(300), outs, |_, _| false);
    let seen = p.tick(p.at(1400), |_, _| false);
    let renewal = &seen.packets.iter().find(|(r, _)| *r).unwrap().1;
    assert_eq!(
        reg_request(renewal).unwrap().reg_types,
        vec![REG_TYPE_RENDEZVOUS]
    );
}

/// One UPDATE outstanding at a time: a request made meanwhile waits for the
/// ACK; a locator UPDATE carries a pending request along (what a moved VM's
/// host sends its rendezvous server).
#[test]
fn requests_wait_for_or_ride_with_other_updates() {
    let mut p = Pair::registered(TWO_SECONDS);
    let set = LocatorSet(vec![Locator {
        traffic_type: 0,
        preferred: true,
        lifetime: 3600,
        addr: LocatorAddr::Ip(
            "198.18.1.2"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped(),
        ),
    }]);
    let now = p.at(100);
    let locator_update =
        p.r.update_locators(now, p.v.hit(), set.clone(), None)
            .unwrap();
    let outs =
        p.r.register(now, p.v.hit(), vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS)
            .unwrap();
    assert!(outs.is_empty(), "sent while an UPDATE was outstanding");
    let seen = p.deliver(now, locator_update, |_, _| false);
    assert!(seen
        .packets
        .iter()
        .all(|(_, pkt)| reg_request(pkt).is_none()));
    // ACKed: the waiting request goes out at the next poll.
    let seen = p.tick(p.at(110), |_, _| false);
    assert!(seen
        .packets
        .iter()
        .any(|(r, pkt)| *r && reg_request(pkt).is_some()));
    assert!(seen
        .r
        .iter()
        .any(|e| matches!(e, Output::Registration { .. })));

    // A request in flight (its packet lost) rides on the next locator UPDATE.
    let now = p.at(200);
    let outs =
        p.r.register(now, p.v.hit(), vec![REG_TYPE_RENDEZVOUS], TWO_SECONDS)
            .unwrap();
    assert_eq!(outs.len(), 1);
    let outs = p.r.update_locators(now, p.v.hit(), set, None).unwrap();
    let seen = p.deliver(now, outs, |_, _| false);
    let (_, first) = &seen.packets[0];
    assert!(first.get::<LocatorSet>().unwrap().is_some());
    assert!(reg_request(first).is_some());
    assert!(seen.r.iter().any(|e| matches!(
        e,
        Output::Registration {
            lifetime: TWO_SECONDS,
            ..
        }
    )));
}
