//! State machine tests: two in-memory hosts exchange encoded packets through
//! a lossy queue under virtual time.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_hip::crypto::{dh, puzzle};
use roam_hip::identity::HostIdentity;
use roam_hip::identity::Rhash;
use roam_hip::machine::{AssociationKeys, Config, Host, Output, State};
use roam_hip::wire::params::*;
use roam_hip::wire::{Hit, Packet, PacketType};
use roam_hip::{CryptoError, Error};

const A_ADDR: &str = "198.18.0.1:10500";
const B_ADDR: &str = "198.18.0.2:10500";

struct Net {
    hosts: [Host; 2],
    addrs: [SocketAddr; 2],
    queue: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    now: Instant,
    established: [Option<AssociationKeys>; 2],
    events: Vec<(usize, Output)>,
    sent: Vec<(usize, PacketType)>,
    /// Drop the n-th packet of a type (1-based count per type).
    drop: Vec<(PacketType, usize)>,
}

impl Net {
    fn new(cfg_a: Config, cfg_b: Config) -> Self {
        let now = Instant::now();
        let a = Host::new(HostIdentity::generate(), cfg_a, now).unwrap();
        let b = Host::new(HostIdentity::generate(), cfg_b, now).unwrap();
        Net {
            hosts: [a, b],
            addrs: [A_ADDR.parse().unwrap(), B_ADDR.parse().unwrap()],
            queue: VecDeque::new(),
            now,
            established: [None, None],
            events: Vec::new(),
            sent: Vec::new(),
            drop: Vec::new(),
        }
    }

    fn hit(&self, i: usize) -> Hit {
        self.hosts[i].hit()
    }

    fn absorb(&mut self, from: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, packet } => {
                    let dst = if to == self.addrs[0] { 0 } else { 1 };
                    assert_eq!(dst, 1 - from, "sent to the wrong host");
                    let t = packet.header.packet_type;
                    self.sent.push((from, t));
                    let nth = self.sent.iter().filter(|(_, x)| *x == t).count();
                    if self.drop.contains(&(t, nth)) {
                        continue;
                    }
                    // Real bytes: encode here, decode at the receiver.
                    self.queue
                        .push_back((dst, self.addrs[from], packet.encode().unwrap()));
                }
                Output::Established { keys, .. } => {
                    self.established[from] = Some(*keys.clone());
                    self.events.push((
                        from,
                        Output::Established {
                            peer: keys.peer_hit,
                            keys,
                        },
                    ));
                }
                other => self.events.push((from, other)),
            }
        }
    }

    /// Delivers queued packets until the queue is empty; returns drop errors.
    fn run(&mut self) -> Vec<Error> {
        let mut errs = Vec::new();
        while let Some((dst, from, bytes)) = self.queue.pop_front() {
            match self.hosts[dst].receive_bytes(self.now, from, &bytes) {
                Ok(outs) => self.absorb(dst, outs),
                Err(e) => errs.push(e),
            }
        }
        errs
    }

    /// Advances virtual time and runs timers on both hosts.
    fn advance(&mut self, d: Duration) {
        self.now += d;
        for i in 0..2 {
            let outs = self.hosts[i].poll(self.now);
            self.absorb(i, outs);
        }
    }

    fn connect(&mut self, i: usize) {
        let peer = self.hit(1 - i);
        let outs = self.hosts[i]
            .connect(self.now, peer, self.addrs[1 - i])
            .unwrap();
        self.absorb(i, outs);
    }
}

fn assert_matching_keys(net: &Net) {
    let a = net.established[0].as_ref().expect("A established");
    let b = net.established[1].as_ref().expect("B established");
    assert_eq!(a.keymat, b.keymat);
    assert_eq!(a.hip.our_mac, b.hip.peer_mac);
    assert_eq!(a.hip.peer_mac, b.hip.our_mac);
    assert_eq!(a.hip.our_enc, b.hip.peer_enc);
    assert_ne!(a.hip.our_mac, a.hip.peer_mac);
    assert_eq!(a.our_spi, b.peer_spi);
    assert_eq!(a.peer_spi, b.our_spi);
    assert_eq!(a.esp_keymat_index, b.esp_keymat_index);
    assert_eq!(a.esp_suite, b.esp_suite);
    assert_ne!(a.we_are_greater, b.we_are_greater);
}

#[test]
fn base_exchange_derives_identical_keys() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::I1Sent);
    let errs = net.run();
    assert!(errs.is_empty(), "{errs:?}");
    let types: Vec<_> = net.sent.iter().map(|(_, t)| *t).collect();
    assert_eq!(
        types,
        vec![
            PacketType::I1,
            PacketType::R1,
            PacketType::I2,
            PacketType::R2
        ]
    );
    assert_matching_keys(&net);
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::Established);
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::R2Sent);
    // The Responder kept no state for the I1: only the I2 created it.
    // Exchange Complete timer moves R2-SENT to ESTABLISHED.
    net.advance(Duration::from_secs(11));
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Established);
    // P-256 was negotiated (our first preference) with AES-128-CBC.
    assert_eq!(net.established[0].as_ref().unwrap().cipher, 2);
}

#[test]
fn base_exchange_with_mandatory_modp_group_and_clear_host_id() {
    let cfg = Config {
        dh_groups: vec![dh::GROUP_MODP_1536],
        encrypt_host_id: false,
        ..Config::default()
    };
    let mut net = Net::new(cfg.clone(), cfg);
    net.connect(0);
    assert!(net.run().is_empty());
    assert_matching_keys(&net);
}

#[test]
fn responder_picks_its_preference_among_initiator_groups() {
    let a = Config {
        dh_groups: vec![dh::GROUP_MODP_1536, dh::GROUP_NIST_P256],
        ..Config::default()
    };
    let mut net = Net::new(a, Config::default());
    net.connect(0);
    assert!(net.run().is_empty());
    assert_matching_keys(&net);
}

#[test]
fn lost_packets_are_recovered_by_retransmission() {
    let mut net = Net::new(Config::default(), Config::default());
    // Lose the first I1, the first R1's I2 and the first R2.
    net.drop = vec![
        (PacketType::I1, 1),
        (PacketType::I2, 1),
        (PacketType::R2, 1),
    ];
    net.connect(0);
    assert!(net.run().is_empty());
    assert!(net.established[0].is_none());
    net.advance(Duration::from_millis(600)); // I1 retransmitted
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::I2Sent);
    net.advance(Duration::from_millis(600)); // I2 retransmitted, R2 lost
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::R2Sent);
    assert!(net.established[0].is_none());
    net.advance(Duration::from_millis(1100)); // I2 again; R2 resent from cache
    assert!(net.run().is_empty());
    assert_matching_keys(&net);
    let r2s = net
        .sent
        .iter()
        .filter(|(_, t)| *t == PacketType::R2)
        .count();
    assert_eq!(r2s, 2);
}

#[test]
fn retries_exhausted_fail_the_exchange() {
    let mut net = Net::new(Config::default(), Config::default());
    net.drop = (1..=10).map(|n| (PacketType::I1, n)).collect();
    net.connect(0);
    for _ in 0..8 {
        net.advance(Duration::from_secs(20));
        net.run();
    }
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 0 && matches!(o, Output::Failed { .. })));
    // E-FAILED is held, then discarded to UNASSOCIATED.
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::Unassociated);
    assert_eq!(
        net.sent
            .iter()
            .filter(|(_, t)| *t == PacketType::I1)
            .count(),
        6
    );
}

#[test]
fn simultaneous_open_resolves_by_hit_comparison() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    net.connect(1);
    let errs = net.run();
    // The I1 sent by the greater HIT is dropped by the smaller one.
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_matching_keys(&net);
    let greater = if net.hit(0) > net.hit(1) { 0 } else { 1 };
    // Only the greater HIT answered with an R1; the smaller sent the I2.
    let r1_from: Vec<_> = net
        .sent
        .iter()
        .filter(|(_, t)| *t == PacketType::R1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(r1_from, vec![greater]);
    let i2_from: Vec<_> = net
        .sent
        .iter()
        .filter(|(_, t)| *t == PacketType::I2)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(i2_from, vec![1 - greater]);
}

#[test]
fn bad_puzzle_solution_is_rejected_statelessly() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    // Deliver I1 and R1 only.
    for _ in 0..2 {
        let (dst, from, bytes) = net.queue.pop_front().unwrap();
        let outs = net.hosts[dst].receive_bytes(net.now, from, &bytes).unwrap();
        net.absorb(dst, outs);
    }
    let (dst, from, bytes) = net.queue.pop_front().unwrap();
    let mut i2 = Packet::decode(&bytes).unwrap();
    assert_eq!(i2.header.packet_type, PacketType::I2);
    let mut sol: Solution = i2.get().unwrap().unwrap();
    // Pick a #J that certainly fails (#K is small, many #J solve it).
    let (hi, hr) = (i2.header.sender_hit, i2.header.receiver_hit);
    let good_j = sol.j.clone();
    for x in 1u8..=255 {
        sol.j[0] = good_j[0] ^ x;
        if !puzzle::verify(Rhash::Sha384, &sol.i, &hi, &hr, &sol.j, sol.k) {
            break;
        }
    }
    i2.remove(ty::SOLUTION);
    i2.add(&sol).unwrap();
    let err = net.hosts[dst].receive(net.now, from, &i2).unwrap_err();
    assert_eq!(err, Error::Crypto(CryptoError::Puzzle));
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Unassociated);
    // Claiming an easier #K than asked changes #I's derivation: rejected.
    let mut sol2: Solution = Packet::decode(&bytes).unwrap().get().unwrap().unwrap();
    sol2.k = 0;
    let mut i2b = Packet::decode(&bytes).unwrap();
    i2b.remove(ty::SOLUTION);
    i2b.add(&sol2).unwrap();
    assert!(net.hosts[dst].receive(net.now, from, &i2b).is_err());
    // The genuine I2 still works.
    let outs = net.hosts[dst].receive_bytes(net.now, from, &bytes).unwrap();
    net.absorb(dst, outs);
    assert!(net.run().is_empty());
    assert_matching_keys(&net);
}

#[test]
fn tampered_i2_fails_mac_and_r1_downgrade_is_detected() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    let (dst, from, i1) = net.queue.pop_front().unwrap();
    let outs = net.hosts[dst].receive_bytes(net.now, from, &i1).unwrap();
    net.absorb(dst, outs);
    // Downgrade: an attacker strips P-256 from the I1 so B answers MODP.
    let mut forged_i1 = Packet::decode(&i1).unwrap();
    forged_i1.remove(ty::DH_GROUP_LIST);
    forged_i1
        .add(&DhGroupList(vec![dh::GROUP_MODP_1536]))
        .unwrap();
    let r1_modp = match net.hosts[1]
        .receive(net.now, from, &forged_i1)
        .unwrap()
        .remove(0)
    {
        Output::Send { packet, .. } => packet,
        other => panic!("{other:?}"),
    };
    let err = net.hosts[0]
        .receive(net.now, net.addrs[1], &r1_modp)
        .unwrap_err();
    assert!(matches!(err, Error::Negotiation(_)), "{err:?}");
    // The genuine R1 proceeds; then flip a byte inside the I2's ENCRYPTED.
    let (dst, from, r1) = net.queue.pop_front().unwrap();
    let outs = net.hosts[dst].receive_bytes(net.now, from, &r1).unwrap();
    net.absorb(dst, outs);
    let (dst, from, i2) = net.queue.pop_front().unwrap();
    let mut p = Packet::decode(&i2).unwrap();
    let mut dhp: DiffieHellman = p.get().unwrap().unwrap();
    let k2 = dh::DhKey::generate(dhp.group).unwrap();
    dhp.public = k2.public().to_vec();
    p.remove(ty::DIFFIE_HELLMAN);
    p.add(&dhp).unwrap();
    // A different DH value gives other keys: the HOST_ID does not decrypt
    // to a valid parameter, or the HIP_MAC fails.
    assert!(net.hosts[dst].receive(net.now, from, &p).is_err());
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Unassociated);
}

#[test]
fn i1_flood_raises_puzzle_difficulty() {
    let mut cfg = Config::default();
    cfg.puzzle.k_base = 2;
    cfg.puzzle.flood_rate = 20;
    cfg.puzzle.k_max = 16;
    let now = Instant::now();
    let mut b = Host::new(HostIdentity::generate(), cfg, now).unwrap();
    let from: SocketAddr = A_ADDR.parse().unwrap();
    let mut ks = Vec::new();
    for n in 0..200u32 {
        let mut i1 = Packet::new(PacketType::I1, Hit([n as u8; 16]), b.hit());
        i1.add(&DhGroupList(vec![7])).unwrap();
        let t = now + Duration::from_millis(u64::from(n) * 2); // 500 I1/s
        let out = b.receive(t, from, &i1).unwrap();
        let Output::Send { packet, .. } = &out[0] else {
            panic!()
        };
        let pz: Puzzle = packet.get().unwrap().unwrap();
        ks.push(pz.k);
    }
    assert_eq!(ks[0], 2);
    assert!(*ks.last().unwrap() >= 6, "{ks:?}");
    assert!(ks.iter().all(|k| *k <= 16));
    // After a quiet period #K falls back.
    let quiet = now + Duration::from_secs(10);
    let mut i1 = Packet::new(PacketType::I1, Hit([7; 16]), b.hit());
    i1.add(&DhGroupList(vec![7])).unwrap();
    b.receive(quiet, from, &i1).unwrap();
    assert_eq!(b.puzzle_k(), 2);
}

#[test]
fn close_and_close_ack() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    assert!(net.run().is_empty());
    let peer = net.hit(1);
    let outs = net.hosts[0].close(net.now, peer).unwrap();
    net.absorb(0, outs);
    assert_eq!(net.hosts[0].state(&peer), State::Closing);
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[0].state(&peer), State::Unassociated);
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Closed);
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 0 && matches!(o, Output::Closed { .. })));
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 1 && matches!(o, Output::Closed { .. })));
    net.advance(Duration::from_secs(11));
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Unassociated);
    // A new exchange works after closing.
    net.connect(0);
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[0].state(&peer), State::Established);
}

#[test]
fn lost_close_ack_is_retransmitted() {
    let mut net = Net::new(Config::default(), Config::default());
    net.drop = vec![(PacketType::CloseAck, 1)];
    net.connect(0);
    assert!(net.run().is_empty());
    let outs = net.hosts[0].close(net.now, net.hit(1)).unwrap();
    net.absorb(0, outs);
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::Closing);
    net.advance(Duration::from_millis(600));
    assert!(net.run().is_empty());
    assert_eq!(net.hosts[0].state(&net.hit(1)), State::Unassociated);
}

#[test]
fn notify_is_verified_and_reported() {
    let mut net = Net::new(Config::default(), Config::default());
    let n = Notification {
        msg_type: notify::RESPONDER_BUSY_PLEASE_RETRY,
        data: vec![],
    };
    let p = net.hosts[1].notify(net.hit(0), n.clone()).unwrap();
    let outs = net.hosts[0]
        .receive_bytes(net.now, net.addrs[1], &p.encode().unwrap())
        .unwrap();
    assert!(matches!(&outs[..], [Output::Notified { notification, .. }] if *notification == n));
    // A NOTIFY signed by someone else but claiming B's HIT is dropped.
    let mut forged = HostIdentityNotify::forge(&net, n);
    forged.header.sender_hit = net.hit(1);
    assert!(net.hosts[0]
        .receive(net.now, net.addrs[1], &forged)
        .is_err());
}

struct HostIdentityNotify;
impl HostIdentityNotify {
    fn forge(net: &Net, n: Notification) -> Packet {
        let h = Host::new(HostIdentity::generate(), Config::default(), net.now).unwrap();
        h.notify(net.hit(0), n).unwrap()
    }
}

#[test]
fn update_with_locator_set_is_acked() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    assert!(net.run().is_empty());
    let ls = LocatorSet(vec![Locator {
        traffic_type: 0,
        preferred: true,
        lifetime: 120,
        addr: LocatorAddr::Ip("::ffff:198.18.7.2".parse().unwrap()),
    }]);
    // A moved there: B checks the new locator with an echo request.
    net.addrs[0] = "198.18.7.2:10500".parse().unwrap();
    // Lose the first UPDATE: it is retransmitted.
    net.drop = vec![(PacketType::Update, 1)];
    let outs = net.hosts[0]
        .update_locators(net.now, net.hit(1), ls.clone(), None)
        .unwrap();
    net.absorb(0, outs);
    assert!(net.run().is_empty());
    net.advance(Duration::from_millis(600));
    assert!(net.run().is_empty());
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 1
            && matches!(o, Output::PeerLocators { locators, .. } if *locators == ls)));
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 0 && matches!(o, Output::UpdateAcked { update_id: 0, .. })));
    assert!(net.events.iter().any(|(i, o)| *i == 1
        && matches!(o, Output::PeerAddressVerified { addr, .. } if *addr == net.addrs[0])));
    // B moved from R2-SENT to ESTABLISHED on the UPDATE.
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Established);
}

#[test]
fn association_moves_to_another_host_with_its_identity() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    assert!(net.run().is_empty());
    let peer = net.hit(1);
    let blob = net.hosts[0].export_association(&peer).unwrap();
    assert_eq!(&blob[..6], b"RHIPAS");
    // The VM (identity + association) moves to a new host process.
    let moved_id =
        HostIdentity::from_secret_bytes(&net.hosts[0].identity().secret_bytes()).unwrap();
    let mut moved = Host::new(moved_id, Config::default(), net.now).unwrap();
    assert_eq!(moved.import_association(&blob).unwrap(), peer);
    assert_eq!(moved.state(&peer), State::Established);
    assert_eq!(moved.keys(&peer), net.established[0].as_ref());
    // A different identity refuses it; corruption and truncation are caught.
    let mut other = Host::new(HostIdentity::generate(), Config::default(), net.now).unwrap();
    assert!(other.import_association(&blob).is_err());
    let mut bad = blob.clone();
    bad[40] ^= 1;
    assert!(moved.import_association(&bad).is_err());
    assert!(moved.import_association(&blob[..blob.len() - 1]).is_err());
    assert!(moved.import_association(&vec![0u8; 9000]).is_err());
    // The moved host announces its new locator; the peer accepts the
    // UPDATE (MAC and signature with the moved keys) and ACKs it.
    net.hosts[0] = moved;
    net.addrs[0] = "198.18.9.1:10500".parse().unwrap();
    let ls = LocatorSet(vec![Locator {
        traffic_type: 0,
        preferred: true,
        lifetime: 60,
        addr: LocatorAddr::Ip("::ffff:198.18.9.1".parse().unwrap()),
    }]);
    let outs = net.hosts[0]
        .update_locators(net.now, peer, ls.clone(), None)
        .unwrap();
    net.absorb(0, outs);
    assert!(net.run().is_empty());
    assert!(net.events.iter().any(|(i, o)| *i == 1
        && matches!(o, Output::PeerLocators { locators, from, .. }
            if *locators == ls && *from == "198.18.9.1:10500".parse::<SocketAddr>().unwrap())));
    assert!(net
        .events
        .iter()
        .any(|(i, o)| *i == 0 && matches!(o, Output::UpdateAcked { .. })));
    // The Responder side exports too.
    assert!(net.hosts[1].export_association(&net.hit(0)).is_ok());
}

#[test]
fn replayed_i2_does_not_reset_an_established_association() {
    let mut net = Net::new(Config::default(), Config::default());
    net.connect(0);
    // Keep a copy of the I2 as an attacker would.
    let mut i2_copy = None;
    while let Some((dst, from, bytes)) = net.queue.pop_front() {
        if Packet::decode(&bytes).unwrap().header.packet_type == PacketType::I2 {
            i2_copy = Some(bytes.clone());
        }
        let outs = net.hosts[dst].receive_bytes(net.now, from, &bytes).unwrap();
        net.absorb(dst, outs);
    }
    net.advance(Duration::from_secs(11));
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Established);
    let before = net.hosts[1].keys(&net.hit(0)).unwrap().clone();
    let attacker: SocketAddr = "198.18.66.6:10500".parse().unwrap();
    let outs = net.hosts[1]
        .receive_bytes(net.now, attacker, &i2_copy.unwrap())
        .unwrap();
    assert!(
        matches!(&outs[..], [Output::Send { packet, .. }] if packet.header.packet_type == PacketType::R2)
    );
    assert_eq!(net.hosts[1].state(&net.hit(0)), State::Established);
    assert_eq!(net.hosts[1].keys(&net.hit(0)), Some(&before));
}
