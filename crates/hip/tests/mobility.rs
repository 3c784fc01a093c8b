//! Return routability of a new peer locator (RFC 8046 §5.4) and
//! credit-based authorisation (§5.3.2), driven packet by packet between two
//! in-memory hosts so every step can be inspected, lost or forged.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_hip::crypto::mac;
use roam_hip::identity::HostIdentity;
use roam_hip::machine::{AddrState, Config, DataPath, Host, MobilityConfig, Output};
use roam_hip::wire::params::*;
use roam_hip::wire::{Hit, Packet, PacketType};

const A1: &str = "198.18.1.2:10500";
const A2: &str = "198.18.2.2:10500";
const A3: &str = "198.18.5.2:10500";
const B: &str = "198.18.3.2:10500";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A (the host that moves) and B (its correspondent), established.
struct Pair {
    a: Host,
    b: Host,
    now: Instant,
}

fn sends(outs: &[Output]) -> Vec<(SocketAddr, Packet)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { to, packet } => Some((*to, packet.clone())),
            _ => None,
        })
        .collect()
}

impl Pair {
    fn new(cfg_b: Config) -> Pair {
        let now = Instant::now();
        let mut a = Host::new(HostIdentity::generate(), Config::default(), now).unwrap();
        let mut b = Host::new(HostIdentity::generate(), cfg_b, now).unwrap();
        let mut q: Vec<(bool, Packet)> = sends(&a.connect(now, b.hit(), addr(B)).unwrap())
            .into_iter()
            .map(|(_, p)| (true, p))
            .collect();
        while let Some((from_a, p)) = q.pop() {
            let outs = if from_a {
                b.receive(now, addr(A1), &p).unwrap()
            } else {
                a.receive(now, addr(B), &p).unwrap()
            };
            q.extend(sends(&outs).into_iter().map(|(_, p)| (!from_a, p)));
        }
        assert_eq!(a.keys(&b.hit()).is_some(), b.keys(&a.hit()).is_some());
        b.data_received(&a.hit());
        Pair { a, b, now }
    }

    fn ha(&self) -> Hit {
        self.a.hit()
    }

    fn hb(&self) -> Hit {
        self.b.hit()
    }

    /// A announces `to` as its locator; returns A's UPDATE.
    fn announce(&mut self, to: &str) -> Packet {
        let ip = match addr(to).ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        let ls = LocatorSet(vec![Locator {
            traffic_type: 0,
            preferred: true,
            lifetime: 60,
            addr: LocatorAddr::Ip(ip),
        }]);
        let hb = self.hb();
        let outs = self.a.update_locators(self.now, hb, ls, None).unwrap();
        sends(&outs).pop().unwrap().1
    }

    /// A's UPDATE reaches B from `from`; returns B's outputs.
    fn b_gets(&mut self, from: &str, p: &Packet) -> Vec<Output> {
        self.b.receive(self.now, addr(from), p).unwrap()
    }

    /// A answers B's echo request; returns A's reply.
    fn a_answers(&mut self, echo_req: &Packet) -> Packet {
        let outs = self.a.receive(self.now, addr(B), echo_req).unwrap();
        let s = sends(&outs);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, addr(B));
        s[0].1.clone()
    }

    /// An UPDATE as A would sign it (A's keys and identity), any contents.
    fn forged_by_a(&self, ack: u32, echo: Option<Vec<u8>>) -> Packet {
        let mut p = Packet::new(PacketType::Update, self.ha(), self.hb());
        p.add(&Ack(vec![ack])).unwrap();
        if let Some(e) = echo {
            p.add(&EchoResponseSigned(e)).unwrap();
        }
        let keys = self.a.keys(&self.hb()).unwrap();
        mac::add_mac(&mut p, keys.rhash, &keys.hip.our_mac).unwrap();
        mac::add_signature(&mut p, self.a.identity()).unwrap();
        p
    }
}

/// B's echo request in its outputs: (destination, packet, nonce, Update ID).
fn echo_request(outs: &[Output]) -> (SocketAddr, Packet, Vec<u8>, u32) {
    let (to, p) = sends(outs).pop().expect("B sends something");
    let nonce = p
        .get::<EchoRequestSigned>()
        .unwrap()
        .expect("echo request")
        .0;
    let seq = p.get::<Seq>().unwrap().expect("SEQ").0;
    assert!(p.get::<Ack>().unwrap().is_some(), "the echo request ACKs");
    (to, p, nonce, seq)
}

#[test]
fn new_locator_is_unverified_until_the_echo_returns() {
    let mut t = Pair::new(Config::default());
    let ha = t.ha();
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Active));
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::PeerLocators { from, .. } if *from == addr(A2))));
    let (to, req, nonce, _) = echo_request(&outs);
    assert_eq!(to, addr(A2), "the echo goes to the new locator");
    assert_eq!(nonce.len(), 16);
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A2)));
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Unverified));

    let reply = t.a_answers(&req);
    assert_eq!(reply.get::<EchoResponseSigned>().unwrap().unwrap().0, nonce);
    let outs = t.b.receive(t.now, addr(A2), &reply).unwrap();
    assert!(outs.iter().any(
        |o| matches!(o, Output::PeerAddressVerified { peer, addr: x } if *peer == ha && *x == addr(A2))
    ));
    assert!(
        sends(&outs).is_empty(),
        "an ACK-only UPDATE is not answered"
    );
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Active));
    let st = t.b.mobility_stats();
    assert_eq!((st.echo_requests, st.verified, st.failed), (1, 1, 0));
    // The check does not leave a retransmission behind.
    t.now += Duration::from_secs(60);
    assert!(sends(&t.b.poll(t.now)).is_empty());
}

#[test]
fn wrong_or_missing_nonce_is_dropped_and_counted() {
    let mut t = Pair::new(Config::default());
    let ha = t.ha();
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    let (_, req, nonce, seq) = echo_request(&outs);
    let mut wrong = nonce.clone();
    wrong[0] ^= 1;
    // Signed and MACed by A, but the wrong nonce: still not verified.
    assert!(t
        .b
        .receive(t.now, addr(A2), &t.forged_by_a(seq, Some(wrong)))
        .is_err());
    assert!(t
        .b
        .receive(t.now, addr(A2), &t.forged_by_a(seq, None))
        .is_err());
    assert!(t
        .b
        .receive(
            t.now,
            addr(A2),
            &t.forged_by_a(seq, Some(nonce[..8].to_vec()))
        )
        .is_err());
    assert_eq!(t.b.mobility_stats().echo_mismatch, 3);
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Unverified));
    // A stranger's packet fails the MAC before the nonce is looked at.
    let mut stranger = t.forged_by_a(seq, Some(nonce.clone()));
    stranger.remove(ty::HIP_SIGNATURE);
    stranger.remove(ty::HIP_MAC);
    mac::add_mac(&mut stranger, roam_hip::identity::Rhash::Sha384, &[7; 48]).unwrap();
    assert!(t.b.receive(t.now, addr(A2), &stranger).is_err());
    assert_eq!(t.b.mobility_stats().echo_mismatch, 3);
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Unverified));
    // The real answer still verifies.
    let reply = t.a_answers(&req);
    let outs = t.b.receive(t.now, addr(A2), &reply).unwrap();
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::PeerAddressVerified { .. })));
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Active));
}

#[test]
fn data_to_an_unverified_locator_is_limited_by_credit() {
    let mut t = Pair::new(Config::default());
    let ha = t.ha();
    // Before the move A sent B 1000 bytes of data.
    t.b.inbound_data(t.now, &ha, 1000);
    assert_eq!(
        t.b.outbound_data(t.now, &ha, 5000),
        DataPath::Send(addr(A1))
    );
    assert_eq!(
        t.b.credit(t.now, &ha),
        Some(1000),
        "ACTIVE spends no credit"
    );
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    let (_, req, _, _) = echo_request(&outs);
    assert_eq!(t.b.outbound_data(t.now, &ha, 600), DataPath::Send(addr(A2)));
    assert_eq!(t.b.outbound_data(t.now, &ha, 600), DataPath::Hold);
    assert_eq!(t.b.outbound_data(t.now, &ha, 400), DataPath::Send(addr(A2)));
    assert_eq!(t.b.outbound_data(t.now, &ha, 1), DataPath::Hold);
    assert_eq!(t.b.mobility_stats().held, 2);
    // More data from A earns more credit; it ages by 7/8 every 5 s.
    t.b.inbound_data(t.now, &ha, 800);
    t.now += Duration::from_secs(5);
    assert_eq!(t.b.credit(t.now, &ha), Some(700));
    assert_eq!(t.b.outbound_data(t.now, &ha, 701), DataPath::Hold);
    // Verified: everything goes, whatever the credit.
    let reply = t.a_answers(&req);
    t.b.receive(t.now, addr(A2), &reply).unwrap();
    assert_eq!(
        t.b.outbound_data(t.now, &ha, 100_000),
        DataPath::Send(addr(A2))
    );
    assert_eq!(
        t.b.outbound_data(t.now, &Hit([9; 16]), 1),
        DataPath::NoAssociation
    );
}

#[test]
fn unanswered_check_is_retransmitted_then_falls_back() {
    let mut t = Pair::new(Config::default());
    let ha = t.ha();
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    let (_, req, _, _) = echo_request(&outs);
    let mut resent = 0;
    let mut failed = None;
    for _ in 0..200 {
        t.now += Duration::from_millis(250);
        for o in t.b.poll(t.now) {
            match o {
                Output::Send { to, packet } => {
                    assert_eq!(to, addr(A2));
                    assert_eq!(packet, req, "the same signed request");
                    resent += 1;
                }
                Output::PeerAddressFailed {
                    peer,
                    addr: x,
                    fallback,
                } => {
                    assert_eq!((peer, x), (ha, addr(A2)));
                    failed = Some(fallback);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(resent, Config::default().retries_max);
    assert_eq!(failed, Some(addr(A1)));
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A1)));
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Active));
    assert_eq!(t.b.mobility_stats().failed, 1);
    // A late answer is not an answer to anything now: ignored, A1 stays.
    let reply = t.a_answers(&req);
    let outs = t.b.receive(t.now, addr(A2), &reply).unwrap();
    assert!(!outs
        .iter()
        .any(|o| matches!(o, Output::PeerAddressVerified { .. })));
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A1)));
}

#[test]
fn duplicate_update_is_acked_without_a_second_check() {
    let mut t = Pair::new(Config::default());
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    let (_, req, nonce, _) = echo_request(&outs);
    // B's answer was lost; A's retransmitted UPDATE is only ACKed again.
    let outs = t.b_gets(A2, &upd);
    let s = sends(&outs);
    assert_eq!(s.len(), 1);
    assert!(s[0].1.get::<EchoRequestSigned>().unwrap().is_none());
    assert_eq!(t.b.mobility_stats().echo_requests, 1);
    // The first request's nonce still verifies.
    let reply = t.a_answers(&req);
    assert_eq!(reply.get::<EchoResponseSigned>().unwrap().unwrap().0, nonce);
    t.b.receive(t.now, addr(A2), &reply).unwrap();
    assert_eq!(t.b.addr_state(&t.ha()), Some(AddrState::Active));
}

#[test]
fn a_newer_locator_replaces_the_check_and_keeps_the_fallback() {
    let mut t = Pair::new(Config::default());
    let ha = t.ha();
    let upd = t.announce(A2);
    let (_, old_req, _, _) = echo_request(&t.b_gets(A2, &upd));
    let upd = t.announce(A3);
    let (to, _, _, _) = echo_request(&t.b_gets(A3, &upd));
    assert_eq!(to, addr(A3));
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A3)));
    // The answer to the replaced check does not verify A3.
    let reply = t.a_answers(&old_req);
    assert!(t.b.receive(t.now, addr(A2), &reply).is_ok());
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Unverified));
    // Nobody answers for A3: back to A1, the last verified address.
    for _ in 0..200 {
        t.now += Duration::from_millis(250);
        t.b.poll(t.now);
    }
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A1)));
}

#[test]
fn verification_can_be_turned_off() {
    let cfg = Config {
        mobility: MobilityConfig {
            verify_locators: false,
            ..MobilityConfig::default()
        },
        ..Config::default()
    };
    let mut t = Pair::new(cfg);
    let ha = t.ha();
    let upd = t.announce(A2);
    let outs = t.b_gets(A2, &upd);
    let s = sends(&outs);
    assert!(s[0].1.get::<EchoRequestSigned>().unwrap().is_none());
    assert_eq!(t.b.peer_addr(&ha), Some(addr(A2)));
    assert_eq!(t.b.addr_state(&ha), Some(AddrState::Active));
}
