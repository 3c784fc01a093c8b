//! Rendezvous (RFC 8004): an Initiator that only knows the rendezvous
//! server's address reaches the Responder through it, then completes the
//! base exchange directly.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Instant;

use roam_hip::identity::{HostIdentity, Rhash};
use roam_hip::machine::{Config, Host, Output, State};
use roam_hip::wire::params::*;
use roam_hip::wire::{Packet, PacketType};
use roam_hip::{rvs, CryptoError, Error};

const I: usize = 0;
const R: usize = 1;
const V: usize = 2;

struct World {
    hosts: Vec<Host>,
    addrs: Vec<SocketAddr>,
    now: Instant,
    log: Vec<(usize, usize, PacketType)>,
}

impl World {
    fn idx(&self, a: SocketAddr) -> usize {
        self.addrs.iter().position(|x| *x == a).unwrap()
    }

    /// Delivers outputs; the RVS host relays I1s not addressed to itself.
    fn pump(&mut self, mut queue: Vec<(usize, Output)>) {
        while let Some((src, o)) = queue.pop() {
            let Output::Send { to, packet } = o else {
                continue;
            };
            let dst = self.idx(to);
            self.log.push((src, dst, packet.header.packet_type));
            let bytes = packet.encode().unwrap();
            let p = Packet::decode(&bytes).unwrap();
            if dst == V
                && p.header.packet_type == PacketType::I1
                && p.header.receiver_hit != self.hosts[V].hit()
            {
                // The RVS daemon: look up the registered Responder and relay.
                let keys = self.hosts[V].keys(&p.header.receiver_hit).unwrap().clone();
                let relayed =
                    rvs::relay_i1(&p, self.addrs[src].ip(), keys.rhash, &keys.hip.our_mac).unwrap();
                queue.push((
                    V,
                    Output::Send {
                        to: self.addrs[R],
                        packet: relayed,
                    },
                ));
                continue;
            }
            let outs = self.hosts[dst]
                .receive(self.now, self.addrs[src], &p)
                .unwrap();
            queue.extend(outs.into_iter().map(|o| (dst, o)));
        }
    }
}

#[test]
fn i1_via_rendezvous_server() {
    let now = Instant::now();
    let mut w = World {
        hosts: (0..3)
            .map(|_| Host::new(HostIdentity::generate(), Config::default(), now).unwrap())
            .collect(),
        addrs: vec![
            "198.18.1.1:10500".parse().unwrap(),
            "198.18.2.1:10500".parse().unwrap(),
            "198.18.3.1:10500".parse().unwrap(),
        ],
        now,
        log: Vec::new(),
    };
    // The Responder has an association with its rendezvous server.
    let v_hit = w.hosts[V].hit();
    let outs = w.hosts[R].connect(now, v_hit, w.addrs[V]).unwrap();
    w.pump(outs.into_iter().map(|o| (R, o)).collect());
    assert_eq!(w.hosts[R].state(&v_hit), State::Established);
    w.log.clear();

    // The Initiator knows R's HIT but only V's address.
    let r_hit = w.hosts[R].hit();
    let outs = w.hosts[I].connect(now, r_hit, w.addrs[V]).unwrap();
    w.pump(outs.into_iter().map(|o| (I, o)).collect());
    assert_eq!(w.hosts[I].state(&r_hit), State::Established);
    assert_eq!(
        w.log,
        vec![
            (I, V, PacketType::I1),
            (V, R, PacketType::I1),
            (R, I, PacketType::R1),
            (I, R, PacketType::I2),
            (R, I, PacketType::R2),
        ]
    );
}

#[test]
fn relayed_i1_needs_a_valid_rvs_hmac() {
    let id = HostIdentity::generate();
    let mut i1 = Packet::new(PacketType::I1, id.hit(), HostIdentity::generate().hit());
    i1.add(&DhGroupList(vec![7])).unwrap();
    let key = [5u8; 48];
    let relayed = rvs::relay_i1(&i1, "198.18.1.1".parse().unwrap(), Rhash::Sha384, &key).unwrap();
    // FROM carries the IPv4-mapped address; RVS_HMAC covers it.
    let from: From = relayed.get().unwrap().unwrap();
    assert_eq!(
        from.0,
        "::ffff:198.18.1.1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    let back = Packet::decode(&relayed.encode().unwrap()).unwrap();
    assert_eq!(
        rvs::verify_relayed_i1(&back, Rhash::Sha384, &key).unwrap(),
        "198.18.1.1".parse::<std::net::IpAddr>().unwrap()
    );
    let mut forged = back.clone();
    forged.remove(ty::FROM);
    forged
        .add(&From("::ffff:198.18.9.9".parse().unwrap()))
        .unwrap();
    assert_eq!(
        rvs::verify_relayed_i1(&forged, Rhash::Sha384, &key),
        Err(Error::Crypto(CryptoError::Mac))
    );
    assert!(rvs::verify_relayed_i1(&back, Rhash::Sha384, &[6u8; 48]).is_err());
}

#[test]
fn responder_drops_relayed_i1_from_unknown_or_forging_rvs() {
    let now = Instant::now();
    let mut r = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let mut v = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let (ra, va): (SocketAddr, SocketAddr) = (
        "198.18.2.1:10500".parse().unwrap(),
        "198.18.3.1:10500".parse().unwrap(),
    );
    // Establish R <-> V.
    let mut q: Vec<(bool, Output)> = r
        .connect(now, v.hit(), va)
        .unwrap()
        .into_iter()
        .map(|o| (true, o))
        .collect();
    while let Some((from_r, o)) = q.pop() {
        if let Output::Send { packet, .. } = o {
            let (dst, src) = if from_r { (&mut v, ra) } else { (&mut r, va) };
            q.extend(
                dst.receive(now, src, &packet)
                    .unwrap()
                    .into_iter()
                    .map(|o| (!from_r, o)),
            );
        }
    }
    let mut i1 = Packet::new(PacketType::I1, HostIdentity::generate().hit(), r.hit());
    i1.add(&DhGroupList(vec![7])).unwrap();
    let keys = v.keys(&r.hit()).unwrap().clone();
    let good = rvs::relay_i1(
        &i1,
        "198.18.1.1".parse().unwrap(),
        keys.rhash,
        &keys.hip.our_mac,
    )
    .unwrap();
    // From an address R has no association with: dropped.
    let stranger: SocketAddr = "198.18.4.1:10500".parse().unwrap();
    assert!(matches!(
        r.receive(now, stranger, &good),
        Err(Error::Unexpected(_))
    ));
    // From V but keyed wrongly: dropped.
    let bad = rvs::relay_i1(&i1, "198.18.1.1".parse().unwrap(), keys.rhash, &[0u8; 48]).unwrap();
    assert_eq!(
        r.receive(now, va, &bad).unwrap_err(),
        Error::Crypto(CryptoError::Mac)
    );
    // The genuine relay is answered at the Initiator's address with VIA_RVS.
    let outs = r.receive(now, va, &good).unwrap();
    let Output::Send { to, packet } = &outs[0] else {
        panic!()
    };
    assert_eq!(*to, "198.18.1.1:10500".parse::<SocketAddr>().unwrap());
    let via: ViaRvs = packet.get().unwrap().unwrap();
    assert_eq!(
        via.0,
        vec!["::ffff:198.18.3.1".parse::<std::net::Ipv6Addr>().unwrap()]
    );
}

#[test]
fn registration_for_rendezvous_in_the_base_exchange() {
    let now = Instant::now();
    let v_cfg = Config {
        services: vec![REG_TYPE_RENDEZVOUS],
        ..Config::default()
    };
    let mut v = Host::new(HostIdentity::generate(), v_cfg, now).unwrap();
    let mut r = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let (ra, va): (SocketAddr, SocketAddr) = (
        "198.18.2.1:10500".parse().unwrap(),
        "198.18.3.1:10500".parse().unwrap(),
    );
    // Ask for rendezvous (1) and an unknown service (200) for 2^((128-64)/8) s.
    let outs = r
        .connect_and_register(now, v.hit(), va, vec![REG_TYPE_RENDEZVOUS, 200], 128)
        .unwrap();
    let mut q: Vec<(bool, Output)> = outs.into_iter().map(|o| (true, o)).collect();
    let mut events = Vec::new();
    let mut seen = Vec::new();
    while let Some((from_r, o)) = q.pop() {
        match o {
            Output::Send { packet, .. } => {
                seen.push(packet.clone());
                let (dst, src) = if from_r { (&mut v, ra) } else { (&mut r, va) };
                q.extend(
                    dst.receive(now, src, &packet)
                        .unwrap()
                        .into_iter()
                        .map(|o| (!from_r, o)),
                );
            }
            other => events.push(other),
        }
    }
    // R1 offered the service, I2 asked, R2 answered (all signed parts).
    let r1 = seen
        .iter()
        .find(|p| p.header.packet_type == PacketType::R1)
        .unwrap();
    assert_eq!(
        r1.get::<RegInfo>().unwrap().unwrap().reg_types,
        vec![REG_TYPE_RENDEZVOUS]
    );
    let i2 = seen
        .iter()
        .find(|p| p.header.packet_type == PacketType::I2)
        .unwrap();
    assert_eq!(i2.get::<RegRequest>().unwrap().unwrap().lifetime, 128);
    assert!(events.iter().any(|e| matches!(e,
        Output::Registration { granted, failed, lifetime: 128, .. }
            if *granted == vec![REG_TYPE_RENDEZVOUS] && *failed == vec![200])));
    assert_eq!(
        v.registrations(),
        vec![(r.hit(), vec![REG_TYPE_RENDEZVOUS], 128)]
    );
    assert_eq!(reg_lifetime_secs(128), 256.0);
    assert_eq!(v.peer_addr(&r.hit()), Some(ra));
}

/// Delivers `outs` between two hosts at `aa` and `ba` until nothing is left; returns
/// the non-Send outputs.
fn pump2(
    a: &mut Host,
    aa: SocketAddr,
    b: &mut Host,
    ba: SocketAddr,
    outs: Vec<Output>,
) -> Vec<Output> {
    let now = Instant::now();
    let mut q: Vec<(bool, Output)> = outs.into_iter().map(|o| (true, o)).collect();
    let mut events = Vec::new();
    while let Some((from_a, o)) = q.pop() {
        match o {
            Output::Send { packet, .. } => {
                let (dst, src) = if from_a { (&mut *b, aa) } else { (&mut *a, ba) };
                q.extend(
                    dst.receive(now, src, &packet)
                        .unwrap()
                        .into_iter()
                        .map(|o| (!from_a, o)),
                );
            }
            other => events.push(other),
        }
    }
    events
}

/// The rendezvous server's decision (`rvs::relay_for`): only I1s for HITs registered
/// for rendezvous are relayed, to the registered host's current locator, which an
/// UPDATE from a host that moved re-points.
#[test]
fn relay_for_relays_only_registered_hits_and_follows_updates() {
    let now = Instant::now();
    let v_cfg = Config {
        services: vec![REG_TYPE_RENDEZVOUS],
        ..Config::default()
    };
    let mut v = Host::new(HostIdentity::generate(), v_cfg, now).unwrap();
    let mut r = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let mut u = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let mut i = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
    let va: SocketAddr = "198.18.3.3:10500".parse().unwrap();
    let ra: SocketAddr = "198.18.1.2:10501".parse().unwrap();
    let ua: SocketAddr = "198.18.2.2:10500".parse().unwrap();
    let ia: SocketAddr = "198.18.4.2:10500".parse().unwrap();
    // R registers; U only has an association with V.
    let outs = r
        .connect_and_register(now, v.hit(), va, vec![REG_TYPE_RENDEZVOUS], 160)
        .unwrap();
    pump2(&mut r, ra, &mut v, va, outs);
    let outs = u.connect(now, v.hit(), va).unwrap();
    pump2(&mut u, ua, &mut v, va, outs);
    assert_eq!(v.state(&u.hit()), State::R2Sent);

    let i1_for = |i: &mut Host, hit| {
        let outs = i.connect(now, hit, va).unwrap();
        match outs.into_iter().next() {
            Some(Output::Send { packet, .. }) => packet,
            other => panic!("no I1: {other:?}"),
        }
    };
    // Not registered, or addressed to the server itself: processed locally.
    let to_u = i1_for(&mut i, u.hit());
    assert!(rvs::relay_for(&v, &to_u, ia).is_none());
    let to_v = i1_for(&mut i, v.hit());
    assert!(rvs::relay_for(&v, &to_v, ia).is_none());
    // Registered: relayed to R with FROM = the Initiator's address.
    let to_r = i1_for(&mut i, r.hit());
    let (to, relayed) = rvs::relay_for(&v, &to_r, ia).unwrap().unwrap();
    assert_eq!(to, ra);
    assert_eq!(
        rvs::from_v6(relayed.get::<From>().unwrap().unwrap().0),
        ia.ip()
    );
    // Only I1 is relayed.
    let mut not_i1 = to_r.clone();
    not_i1.header.packet_type = PacketType::Update;
    assert!(rvs::relay_for(&v, &not_i1, ia).is_none());

    // R moves (another host, another port: a migrated VM) and tells V with UPDATE;
    // the daemon applies the verified locator, and the relay follows.
    let ra2: SocketAddr = "198.18.2.2:10502".parse().unwrap();
    let set = LocatorSet(vec![Locator {
        traffic_type: 0,
        preferred: true,
        lifetime: 3600,
        addr: LocatorAddr::Ip(
            "198.18.2.2"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped(),
        ),
    }]);
    let outs = r.update_locators(now, v.hit(), set, None).unwrap();
    let events = pump2(&mut r, ra2, &mut v, va, outs);
    let r_hit = r.hit();
    let from = events
        .iter()
        .find_map(|e| match e {
            Output::PeerLocators { peer, from, .. } if *peer == r_hit => Some(*from),
            _ => None,
        })
        .unwrap_or_else(|| panic!("V saw no locator change: {events:?}"));
    assert_eq!(from, ra2);
    assert!(events
        .iter()
        .any(|e| matches!(e, Output::UpdateAcked { .. })));
    assert!(v.set_peer_addr(&r_hit, from));
    let (to, _) = rvs::relay_for(&v, &to_r, ia).unwrap().unwrap();
    assert_eq!(to, ra2);
}
