//! ESP (RFC 7402, BEET) after a real base exchange: both directions, replay
//! window, tampering, and wrong SPI.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Instant;

use roam_hip::esp::{sas, spi_of, ReplayWindow};
use roam_hip::identity::HostIdentity;
use roam_hip::machine::{AssociationKeys, Config, Host, Output};
use roam_hip::CryptoError;

fn establish() -> (AssociationKeys, AssociationKeys) {
    let now = Instant::now();
    let mut h = [
        Host::new(HostIdentity::generate(), Config::default(), now).unwrap(),
        Host::new(HostIdentity::generate(), Config::default(), now).unwrap(),
    ];
    let addr: [SocketAddr; 2] = [
        "198.18.0.1:10500".parse().unwrap(),
        "198.18.0.2:10500".parse().unwrap(),
    ];
    let mut keys: [Option<AssociationKeys>; 2] = [None, None];
    let mut queue = vec![];
    let peer = h[1].hit();
    for o in h[0].connect(now, peer, addr[1]).unwrap() {
        queue.push((1usize, o));
    }
    while let Some((dst, o)) = queue.pop() {
        match o {
            Output::Send { packet, .. } => {
                let outs = h[dst]
                    .receive_bytes(now, addr[1 - dst], &packet.encode().unwrap())
                    .unwrap();
                for o in outs {
                    queue.push((1 - dst, o));
                }
            }
            // The event belongs to the host that produced it.
            Output::Established { keys: k, .. } => keys[1 - dst] = Some(*k),
            _ => {}
        }
    }
    (keys[0].take().unwrap(), keys[1].take().unwrap())
}

#[test]
fn esp_both_directions_after_base_exchange() {
    let (ka, kb) = establish();
    let (mut a_out, mut a_in) = sas(&ka).unwrap();
    let (mut b_out, mut b_in) = sas(&kb).unwrap();
    assert_eq!(a_out.spi, b_in.spi);
    let tcp_segment = b"\x04\xd2\x00\x16 some tcp bytes".to_vec();
    let pkt = a_out.seal(6, &tcp_segment).unwrap();
    assert_eq!(spi_of(&pkt), Some(kb.our_spi));
    assert_eq!(pkt.len() % 4, 0);
    assert_eq!(b_in.open(&pkt).unwrap(), (6, tcp_segment.clone()));
    // Replay of the same packet is refused.
    assert_eq!(
        b_in.open(&pkt),
        Err(CryptoError::Esp("replayed or too old"))
    );
    let back = b_out.seal(17, &[1, 2, 3]).unwrap();
    assert_eq!(a_in.open(&back).unwrap(), (17, vec![1, 2, 3]));
    // Every payload length pads correctly, including empty.
    for n in 0..40 {
        let p = a_out.seal(41, &vec![n as u8; n]).unwrap();
        assert_eq!(b_in.open(&p).unwrap(), (41, vec![n as u8; n]));
    }
}

#[test]
fn esp_rejects_tampering_and_wrong_sa() {
    let (ka, kb) = establish();
    let (mut a_out, mut a_in) = sas(&ka).unwrap();
    let (_, mut b_in) = sas(&kb).unwrap();
    let pkt = a_out.seal(6, b"payload").unwrap();
    for at in [4, 10, 30, pkt.len() - 1] {
        let mut t = pkt.clone();
        t[at] ^= 1;
        assert!(b_in.open(&t).is_err(), "flip at {at}");
    }
    // Our own packet does not open with our inbound SA (different SPI/keys).
    assert!(a_in.open(&pkt).is_err());
    assert!(b_in.open(&pkt[..20]).is_err());
    // The untampered packet still opens: failures did not move the window.
    assert_eq!(b_in.open(&pkt).unwrap().1, b"payload");
}

#[test]
fn replay_window_64() {
    let mut w = ReplayWindow::default();
    assert!(!w.check(0));
    for s in [5u32, 3, 4, 70] {
        assert!(w.check(s));
        w.update(s);
        assert!(!w.check(s));
    }
    // 70 - 64 = 6 is the oldest acceptable number.
    assert!(!w.check(6));
    assert!(w.check(7));
    assert!(w.check(69));
    w.update(1000);
    assert!(!w.check(936));
    assert!(w.check(937));
    // Out-of-order within the window is fine, once.
    for s in (937..1000).rev() {
        assert!(w.check(s));
        w.update(s);
    }
    assert!((937..=1000).all(|s| !w.check(s)));
}

#[test]
fn sa_state_moves_with_the_vm() {
    let (ka, kb) = establish();
    let (mut a_out, _) = sas(&ka).unwrap();
    let (_, mut b_in) = sas(&kb).unwrap();
    for _ in 0..100 {
        let p = a_out.seal(6, b"x").unwrap();
        b_in.open(&p).unwrap();
    }
    // A fresh SA from the same keys restarts at 1: the peer refuses it.
    let (mut fresh, _) = sas(&ka).unwrap();
    assert!(b_in.open(&fresh.seal(6, b"y").unwrap()).is_err());
    // Resuming after the moved sequence number works.
    let (mut moved, _) = sas(&ka).unwrap();
    moved.resume_after(a_out.seq());
    assert_eq!(b_in.open(&moved.seal(6, b"z").unwrap()).unwrap().1, b"z");
    // The receive window moves too.
    let (top, bitmap) = b_in.window().to_parts();
    assert_eq!(top, 101);
    let (_, mut b_in2) = sas(&kb).unwrap();
    b_in2.restore_window(ReplayWindow::from_parts(top, bitmap));
    let old = {
        let (mut o, _) = sas(&ka).unwrap();
        o.resume_after(50);
        o.seal(6, b"old").unwrap()
    };
    assert!(b_in2.open(&old).is_err());
}
