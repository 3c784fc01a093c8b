//! Two hosts complete the base exchange over real UDP sockets on 127.0.0.1
//! with RFC 5770 framing (32 zero bits, then the HIP packet with a zero
//! checksum). Ports are ephemeral here; production uses 10500.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use roam_hip::identity::HostIdentity;
use roam_hip::machine::{AssociationKeys, Config, Host, Output, State};
use roam_hip::wire::udp::{classify, frame_hip, UdpPayload};

struct Node {
    host: Host,
    sock: UdpSocket,
    keys: Option<AssociationKeys>,
    received: usize,
}

impl Node {
    fn new(now: Instant) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Node {
            host: Host::new(HostIdentity::generate(), Config::default(), now).unwrap(),
            sock,
            keys: None,
            received: 0,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn handle(&mut self, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, packet } => {
                    let bytes = packet.encode().unwrap();
                    // The HIP checksum is zero inside UDP (RFC 5770).
                    assert_eq!(&bytes[4..6], &[0, 0]);
                    self.sock.send_to(&frame_hip(&bytes), to).unwrap();
                }
                Output::Established { keys, .. } => self.keys = Some(*keys),
                _ => {}
            }
        }
    }

    /// Receives at most one datagram and runs timers.
    fn step(&mut self, start: Instant) {
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            self.received += 1;
            match classify(&buf[..n]).unwrap() {
                UdpPayload::Hip(p) => {
                    let outs = self.host.receive_bytes(Instant::now(), from, p).unwrap();
                    self.handle(outs);
                }
                UdpPayload::Esp(_) => panic!("no ESP expected"),
            }
        }
        let _ = start;
        let outs = self.host.poll(Instant::now());
        self.handle(outs);
    }
}

#[test]
fn base_exchange_over_udp_loopback() {
    let start = Instant::now();
    let mut a = Node::new(start);
    let mut b = Node::new(start);
    let outs = a
        .host
        .connect(Instant::now(), b.host.hit(), b.addr())
        .unwrap();
    a.handle(outs);
    let deadline = start + Duration::from_secs(20);
    while (a.keys.is_none() || b.keys.is_none()) && Instant::now() < deadline {
        b.step(start);
        a.step(start);
    }
    let (ka, kb) = (
        a.keys.expect("A established"),
        b.keys.expect("B established"),
    );
    assert_eq!(ka.keymat, kb.keymat);
    assert_eq!(ka.our_spi, kb.peer_spi);
    assert_eq!(a.host.state(&b.host.hit()), State::Established);
    assert_eq!(b.host.state(&a.host.hit()), State::R2Sent);
    // I1, I2 went one way; R1, R2 the other.
    assert_eq!(b.received, 2);
    assert_eq!(a.received, 2);
}
