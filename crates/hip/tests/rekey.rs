//! Rekeying the ESP SAs through UPDATE with ESP_INFO (RFC 7402 §3.3),
//! without a new DH: both ends agree on new SPIs and on keys drawn further
//! along the KEYMAT, and real ESP packets flow on the new SAs.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roam_hip::esp;
use roam_hip::identity::HostIdentity;
use roam_hip::machine::{AssociationKeys, Config, Host, Output, State};
use roam_hip::wire::params::{EspInfo, Seq};
use roam_hip::wire::{Packet, PacketType};
use roam_hip::{CryptoError, Error};

const ADDR: [&str; 2] = ["198.18.0.1:10500", "198.18.0.2:10500"];

struct Two {
    h: [Host; 2],
    now: Instant,
    q: VecDeque<(usize, Packet)>,
    keys: [Option<AssociationKeys>; 2],
    rekeyed: [u32; 2],
}

impl Two {
    fn new() -> Two {
        Two::with(Config::default())
    }

    fn with(cfg: Config) -> Two {
        let now = Instant::now();
        let mut t = Two {
            h: [
                Host::new(HostIdentity::generate(), cfg.clone(), now).unwrap(),
                Host::new(HostIdentity::generate(), cfg, now).unwrap(),
            ],
            now,
            q: VecDeque::new(),
            keys: [None, None],
            rekeyed: [0, 0],
        };
        let peer = t.h[1].hit();
        let outs = t.h[0].connect(now, peer, addr(1)).unwrap();
        t.absorb(0, outs);
        t.run(None);
        t.h[1].data_received(&t.h[0].hit());
        assert_eq!(t.h[1].state(&t.h[0].hit()), State::Established);
        t
    }

    fn absorb(&mut self, from: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { packet, .. } => self.q.push_back((1 - from, packet)),
                Output::Established { keys, .. } => self.keys[from] = Some(*keys),
                Output::Rekeyed { keys, .. } => {
                    self.keys[from] = Some(*keys);
                    self.rekeyed[from] += 1;
                }
                _ => {}
            }
        }
    }

    /// Delivers everything, dropping the `drop`-th packet (1-based).
    fn run(&mut self, drop: Option<usize>) {
        let mut n = 0;
        while let Some((dst, p)) = self.q.pop_front() {
            n += 1;
            if Some(n) == drop {
                continue;
            }
            let outs = self.h[dst].receive(self.now, addr(1 - dst), &p).unwrap();
            self.absorb(dst, outs);
        }
    }

    fn rekey(&mut self, i: usize) {
        let peer = self.h[1 - i].hit();
        let outs = self.h[i].rekey(self.now, peer).unwrap();
        self.absorb(i, outs);
    }

    fn poll(&mut self, d: Duration) {
        self.now += d;
        for i in 0..2 {
            let outs = self.h[i].poll(self.now);
            self.absorb(i, outs);
        }
    }

    /// A real ESP packet each way on the current SAs.
    fn esp_works(&self) {
        let (mut out0, mut in0) = esp::sas(self.keys[0].as_ref().unwrap()).unwrap();
        let (mut out1, mut in1) = esp::sas(self.keys[1].as_ref().unwrap()).unwrap();
        let p = out0.seal(6, b"zero to one").unwrap();
        assert_eq!(in1.open(&p).unwrap(), (6, b"zero to one".to_vec()));
        let p = out1.seal(17, b"one to zero").unwrap();
        assert_eq!(in0.open(&p).unwrap(), (17, b"one to zero".to_vec()));
    }
}

fn addr(i: usize) -> SocketAddr {
    ADDR[i].parse().unwrap()
}

#[test]
fn rekey_gives_both_ends_new_spis_and_matching_keys() {
    let mut t = Two::new();
    t.esp_works();
    let before = t.keys.clone();
    t.rekey(0);
    t.run(None);
    assert_eq!(t.rekeyed, [1, 1]);
    let (k0, k1) = (t.keys[0].as_ref().unwrap(), t.keys[1].as_ref().unwrap());
    let (b0, b1) = (before[0].as_ref().unwrap(), before[1].as_ref().unwrap());
    assert_ne!(k0.our_spi, b0.our_spi);
    assert_ne!(k1.our_spi, b1.our_spi);
    assert_eq!(k0.peer_spi, k1.our_spi);
    assert_eq!(k1.peer_spi, k0.our_spi);
    assert_eq!(k0.esp_keymat_index, b0.esp_keymat_index + 96);
    assert_eq!(k0.esp_keymat_index, k1.esp_keymat_index);
    // The machine's view follows, so exports carry the new SAs.
    assert_eq!(t.h[0].keys(&t.h[1].hit()), Some(k0));
    t.esp_works();
    // The old keys no longer open the new SA's packets.
    let (mut new_out, _) = esp::sas(k0).unwrap();
    let (_, mut old_in) = esp::sas(b1).unwrap();
    assert!(old_in.open(&new_out.seal(6, b"x").unwrap()).is_err());
    // Either side may rekey again.
    t.rekey(1);
    t.run(None);
    assert_eq!(t.rekeyed, [2, 2]);
    t.esp_works();
}

#[test]
fn lost_rekey_packets_are_retransmitted() {
    for lost in 1..=3 {
        let mut t = Two::new();
        t.rekey(0);
        t.run(Some(lost));
        assert_ne!(t.rekeyed, [1, 1], "packet {lost} was lost");
        for _ in 0..6 {
            t.poll(Duration::from_millis(600));
            t.run(None);
        }
        assert_eq!(t.rekeyed, [1, 1], "after losing packet {lost}");
        t.esp_works();
    }
}

#[test]
fn keymat_runs_out_and_bad_esp_info_is_refused() {
    let mut t = Two::new();
    let mut n = 0;
    loop {
        let peer = t.h[1].hit();
        match t.h[0].rekey(t.now, peer) {
            Ok(outs) => {
                t.absorb(0, outs);
                t.run(None);
                n += 1;
            }
            Err(e) => {
                assert_eq!(e, Error::Crypto(CryptoError::Keymat));
                break;
            }
        }
        assert!(n < 20);
    }
    // 1024 octets of KEYMAT: HIP keys, the first SAs, then the rekeys.
    assert!(n >= 5, "{n} rekeys");
    t.esp_works();
    // An ESP_INFO naming an SA that is not in use is refused; the same SEQ
    // with the right SA is still processed (not taken for a duplicate).
    let mut t = Two::new();
    let (me, peer) = (t.h[0].hit(), t.h[1].hit());
    let k = t.keys[0].clone().unwrap();
    let id0 = t.h[0].identity().clone();
    let build = |old_spi: u32| {
        let mut p = Packet::new(PacketType::Update, me, peer);
        p.add(&EspInfo {
            keymat_index: (k.esp_keymat_index + 96) as u16,
            old_spi,
            new_spi: 0x1234_5678,
        })
        .unwrap();
        p.add(&Seq(40)).unwrap();
        roam_hip::crypto::mac::add_mac(&mut p, k.rhash, &k.hip.our_mac).unwrap();
        roam_hip::crypto::mac::add_signature(&mut p, &id0).unwrap();
        p
    };
    assert!(t.h[1]
        .receive(t.now, addr(0), &build(k.our_spi ^ 1))
        .is_err());
    let outs = t.h[1].receive(t.now, addr(0), &build(k.our_spi)).unwrap();
    assert!(matches!(&outs[..], [Output::Send { packet, .. }]
        if packet.get::<EspInfo>().unwrap().is_some()));
}

/// The policy: a rekey starts once the highest sequence number seen passes
/// `rekey_seq`, once per rekey (not again while one is running), and the
/// new SAs restart numbering, so the old SA never reaches the wrap.
#[test]
fn rekey_starts_before_the_sequence_number_wraps() {
    let cfg = Config {
        rekey_seq: 1000,
        ..Config::default()
    };
    let mut t = Two::with(cfg);
    let peer = t.h[1].hit();
    assert!(t.h[0].rekey_if_due(t.now, &peer, 999).unwrap().is_empty());
    let outs = t.h[0].rekey_if_due(t.now, &peer, 1000).unwrap();
    assert!(matches!(&outs[..], [Output::Send { packet, .. }]
        if packet.get::<EspInfo>().unwrap().is_some()));
    // Every later packet asks again: no second UPDATE while one is out.
    assert!(t.h[0].rekey_if_due(t.now, &peer, 1001).unwrap().is_empty());
    t.absorb(0, outs);
    t.run(None);
    assert_eq!(t.rekeyed, [1, 1]);
    t.esp_works();
    // The peer's side counts too (its outbound is our inbound window).
    let back = t.h[0].hit();
    assert!(!t.h[1]
        .rekey_if_due(t.now, &back, u32::MAX)
        .unwrap()
        .is_empty());
}

/// A rekey UPDATE the peer never answers is given up after the retries,
/// and the policy can start a new one afterwards.
#[test]
fn an_unanswered_rekey_does_not_block_the_next() {
    let cfg = Config {
        rekey_seq: 10,
        ..Config::default()
    };
    let mut t = Two::with(cfg);
    let peer = t.h[1].hit();
    let outs = t.h[0].rekey_if_due(t.now, &peer, 11).unwrap();
    assert_eq!(outs.len(), 1);
    // Lose the request and every retransmission.
    for _ in 0..10 {
        t.q.clear();
        t.poll(Duration::from_secs(20));
    }
    t.q.clear();
    assert_eq!(t.rekeyed, [0, 0]);
    let outs = t.h[0].rekey_if_due(t.now, &peer, 12).unwrap();
    assert_eq!(outs.len(), 1, "a new rekey starts");
    t.absorb(0, outs);
    t.run(None);
    assert_eq!(t.rekeyed, [1, 1]);
    t.esp_works();
}

#[test]
fn the_policy_reports_an_exhausted_keymat() {
    let cfg = Config {
        rekey_seq: 1,
        ..Config::default()
    };
    let mut t = Two::with(cfg);
    let peer = t.h[1].hit();
    let mut n = 0;
    let err = loop {
        match t.h[0].rekey_if_due(t.now, &peer, 5) {
            Ok(outs) => {
                t.absorb(0, outs);
                t.run(None);
                n += 1;
            }
            Err(e) => break e,
        }
        assert!(n < 20);
    };
    assert_eq!(err, Error::Crypto(CryptoError::Keymat));
    assert_eq!(t.rekeyed, [n, n]);
}

/// Both ends start a rekey at once (both see the same sequence numbers):
/// the crossing UPDATEs each carry a new SPI, both are ACKed, and both
/// ends finish with the same keys, whichever packet is lost.
#[test]
fn simultaneous_rekeys_complete_on_both_ends() {
    for lost in [None, Some(1), Some(2), Some(3), Some(4)] {
        let mut t = Two::new();
        let before = t.keys[0].clone().unwrap();
        let (h0, h1) = (t.h[0].hit(), t.h[1].hit());
        let o0 = t.h[0].rekey(t.now, h1).unwrap();
        let o1 = t.h[1].rekey(t.now, h0).unwrap();
        t.absorb(0, o0);
        t.absorb(1, o1);
        t.run(lost);
        for _ in 0..6 {
            t.poll(Duration::from_millis(600));
            t.run(None);
        }
        assert_eq!(t.rekeyed, [1, 1], "lost packet {lost:?}");
        let (k0, k1) = (t.keys[0].as_ref().unwrap(), t.keys[1].as_ref().unwrap());
        assert_eq!(k0.peer_spi, k1.our_spi);
        assert_eq!(k1.peer_spi, k0.our_spi);
        assert_eq!(k0.esp_keymat_index, before.esp_keymat_index + 96);
        assert_eq!(k0.esp_keymat_index, k1.esp_keymat_index);
        t.esp_works();
        // And the next rekey works as usual.
        t.rekey(1);
        t.run(None);
        assert_eq!(t.rekeyed, [2, 2]);
        t.esp_works();
    }
}
