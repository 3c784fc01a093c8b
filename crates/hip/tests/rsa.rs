//! RSA host identities (RFC 7401 §5.2.9 algorithm 5, RFC 3110 key format,
//! RSASSA-PSS/SHA-256, HIT suite 1): known answers, rejections of malformed
//! keys, property tests of the HI parser, and associations between RSA and
//! ECDSA hosts through the state machine.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use roam_hip::hi_rsa;
use roam_hip::identity::{algorithm, HitSuite, HostIdentity, PeerIdentity};
use roam_hip::machine::{Config, Host, Output, State};
use roam_hip::wire::params::{di_type, HostIdParam};
use roam_hip::CryptoError;

/// The 2048-bit test key (`openssl genrsa`, PKCS#1 DER).
fn rsa_test_identity() -> HostIdentity {
    let mut secret = algorithm::RSA.to_be_bytes().to_vec();
    secret.extend_from_slice(include_bytes!("data/rsa2048-test-key.der"));
    HostIdentity::from_secret(&secret).unwrap()
}

fn rsa_param(hi: Vec<u8>) -> HostIdParam {
    HostIdParam {
        algorithm: algorithm::RSA,
        hi,
        di_type: di_type::NONE,
        di: Vec::new(),
    }
}

#[test]
fn hit_of_the_test_key_is_the_known_answer() {
    // Computed independently (Python hashlib over the RFC 3110 encoding of
    // the key as read by the `cryptography` package): 2001:20::/28, OGA ID
    // 1, middle 96 bits of SHA-256(context ID | HI).
    let id = rsa_test_identity();
    assert_eq!(
        id.hit().to_string(),
        "2001:21:8409:757e:a0d4:96ae:5fa5:8ce3"
    );
    assert_eq!(id.suite(), HitSuite::RsaDsaSha256);
    assert_eq!(id.algorithm(), algorithm::RSA);
    let p = id.host_id_param();
    // RFC 3110: 1-octet exponent length 3, e = 65537, 256-octet modulus.
    assert_eq!(p.hi.len(), 260);
    assert_eq!(&p.hi[..4], &[3, 1, 0, 1]);
    assert_ne!(p.hi[4], 0);
    let peer = PeerIdentity::from_param(&p).unwrap();
    assert_eq!(peer.hit(), id.hit());
    assert_eq!(peer, id.peer());
}

#[test]
fn signatures_verify_and_tampering_fails() {
    let id = rsa_test_identity();
    let peer = id.peer();
    let sig = id.sign(b"HIP packet bytes");
    assert_eq!(sig.len(), 256);
    peer.verify(b"HIP packet bytes", &sig).unwrap();
    // PSS is randomised: two signatures differ, both verify.
    let sig2 = id.sign(b"HIP packet bytes");
    assert_ne!(sig, sig2);
    peer.verify(b"HIP packet bytes", &sig2).unwrap();
    assert_eq!(
        peer.verify(b"HIP packet bytez", &sig),
        Err(CryptoError::Signature)
    );
    let mut bad = sig.clone();
    bad[100] ^= 1;
    assert!(peer.verify(b"HIP packet bytes", &bad).is_err());
    assert!(peer.verify(b"HIP packet bytes", &sig[..255]).is_err());
    assert!(peer.verify(b"HIP packet bytes", &[]).is_err());
    // Another key's signature, an ECDSA signature: refused.
    let ec = HostIdentity::generate();
    assert!(peer.verify(b"x", &ec.sign(b"x")).is_err());
    assert!(ec.peer().verify(b"x", &id.sign(b"x")).is_err());
}

#[test]
fn secrets_round_trip_and_generation_is_bounded() {
    let id = rsa_test_identity();
    let again = HostIdentity::from_secret(&id.to_secret()).unwrap();
    assert_eq!(again.hit(), id.hit());
    assert_eq!(id.secret_bytes(), [0; 32], "RSA has no P-256 scalar");
    let ec = HostIdentity::generate();
    let ec2 = HostIdentity::from_secret(&ec.to_secret()).unwrap();
    assert_eq!(ec2.hit(), ec.hit());
    assert!(HostIdentity::from_secret(&[]).is_err());
    assert!(HostIdentity::from_secret(&[0, 5, 1, 2, 3]).is_err());
    assert!(HostIdentity::from_secret(&[0, 9, 1]).is_err());
    assert!(HostIdentity::from_secret(&vec![0u8; 5000]).is_err());
    assert!(HostIdentity::generate_rsa(512).is_err());
    assert!(HostIdentity::generate_rsa(8192).is_err());
    let fresh = HostIdentity::generate_rsa(1024).unwrap();
    assert_eq!(fresh.hit().oga_id(), 1);
    let p = fresh.host_id_param();
    assert_eq!(p.hi.len(), 4 + 128);
    fresh.peer().verify(b"abc", &fresh.sign(b"abc")).unwrap();
}

#[test]
fn malformed_rsa_host_identities_are_refused() {
    let good = rsa_test_identity().host_id_param().hi;
    let (e, n) = hi_rsa::split_hi(&good).unwrap();
    assert_eq!((e.len(), n.len()), (3, 256));
    let refused = |hi: Vec<u8>| PeerIdentity::from_param(&rsa_param(hi)).is_err();
    assert!(refused(Vec::new()));
    assert!(refused(vec![3, 1, 0]));
    // Leading zero in the exponent or the modulus.
    let mut z = vec![4, 0, 1, 0, 1];
    z.extend_from_slice(n);
    assert!(refused(z));
    let mut z = vec![3, 1, 0, 1, 0];
    z.extend_from_slice(n);
    assert!(refused(z));
    // Long exponent-length form for a short exponent.
    let mut l = vec![0, 0, 3, 1, 0, 1];
    l.extend_from_slice(n);
    assert!(refused(l));
    // Modulus of 1016 and 4104 bits.
    let mut small = vec![3, 1, 0, 1];
    small.extend_from_slice(&n[..127]);
    assert!(refused(small));
    let mut big = vec![3, 1, 0, 1];
    big.extend(std::iter::repeat_n(0xff, 513));
    assert!(refused(big));
    // Exponent longer than the key could use, or running past the end.
    let mut long_e = vec![9];
    long_e.extend(std::iter::repeat_n(1, 9));
    long_e.extend_from_slice(n);
    assert!(refused(long_e));
    assert!(refused(vec![200, 1, 2]));
    // Exponent 1 (not a valid RSA key).
    let mut one = vec![1, 1];
    one.extend_from_slice(n);
    assert!(refused(one));
    // The HIT follows the exact bytes: a different valid HI, another HIT.
    assert!(!refused(good.clone()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rsa_hi_parser_never_panics(hi in proptest::collection::vec(any::<u8>(), 0..700)) {
        let r = PeerIdentity::from_param(&rsa_param(hi.clone()));
        // Whatever is accepted re-derives its HIT in suite 1.
        if let Ok(p) = r {
            prop_assert_eq!(p.hit().oga_id(), 1);
            prop_assert!(hi_rsa::split_hi(&hi).is_ok());
        }
    }

    #[test]
    fn secret_parser_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut s = vec![0, 5];
        s.extend_from_slice(&b);
        let _ = HostIdentity::from_secret(&s);
        let _ = HostIdentity::from_secret(&b);
    }
}

/// Signature and HI of the test key, made once (RSA is slow in debug).
fn signed_once() -> &'static (Vec<u8>, Vec<u8>, roam_hip::Hit) {
    static ONCE: std::sync::OnceLock<(Vec<u8>, Vec<u8>, roam_hip::Hit)> =
        std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let id = rsa_test_identity();
        (id.host_id_param().hi, id.sign(b"data"), id.hit())
    })
}

proptest! {
    // Each case parses a 2048-bit key and verifies: few cases, all bits
    // of the HI reachable.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn flipped_bits_in_a_valid_hi_never_verify_its_signature(at in 0usize..260, bit in 0u8..8) {
        let (hi, sig, hit) = signed_once();
        let mut hi = hi.clone();
        hi[at] ^= 1 << bit;
        if let Ok(p) = PeerIdentity::from_param(&rsa_param(hi)) {
            prop_assert_ne!(p.hit(), *hit);
            prop_assert!(p.verify(b"data", sig).is_err());
        }
    }
}

/// Runs a base exchange in memory; returns both hosts.
fn exchange(i: HostIdentity, r: HostIdentity) -> (Host, Host, Instant) {
    let now = Instant::now();
    let mut hosts = [
        Host::new(i, Config::default(), now).unwrap(),
        Host::new(r, Config::default(), now).unwrap(),
    ];
    let addr: [SocketAddr; 2] = [
        "198.18.0.1:10500".parse().unwrap(),
        "198.18.0.2:10500".parse().unwrap(),
    ];
    let peer = hosts[1].hit();
    let mut q: Vec<(usize, Output)> = hosts[0]
        .connect(now, peer, addr[1])
        .unwrap()
        .into_iter()
        .map(|o| (0, o))
        .collect();
    let mut established = 0;
    while let Some((src, o)) = q.pop() {
        match o {
            Output::Send { packet, .. } => {
                let dst = 1 - src;
                let bytes = packet.encode().unwrap();
                for out in hosts[dst].receive_bytes(now, addr[src], &bytes).unwrap() {
                    q.push((dst, out));
                }
            }
            Output::Established { .. } => established += 1,
            _ => {}
        }
    }
    assert_eq!(established, 2);
    let [a, b] = hosts;
    (a, b, now)
}

#[test]
fn rsa_and_ecdsa_hosts_complete_the_base_exchange_and_close() {
    for (i, r) in [
        (rsa_test_identity(), HostIdentity::generate()),
        (HostIdentity::generate(), rsa_test_identity()),
    ] {
        let r_suite = r.suite();
        let (mut a, mut b, now) = exchange(i, r);
        let (ha, hb) = (a.hit(), b.hit());
        assert_eq!(a.state(&hb), State::Established);
        let ka = a.keys(&hb).unwrap().clone();
        let kb = b.keys(&ha).unwrap().clone();
        assert_eq!(ka.keymat, kb.keymat);
        // RHASH is the Responder's suite hash.
        assert_eq!(ka.rhash, r_suite.rhash());
        // CLOSE and CLOSE_ACK are signed with each side's own algorithm.
        let outs = a.close(now, hb).unwrap();
        let Output::Send { packet, .. } = &outs[0] else {
            panic!("no CLOSE")
        };
        let back = b
            .receive(now, "198.18.0.1:10500".parse().unwrap(), packet)
            .unwrap();
        let Output::Send { packet, .. } = &back[0] else {
            panic!("no CLOSE_ACK")
        };
        let done = a
            .receive(
                now + Duration::from_millis(1),
                "198.18.0.2:10500".parse().unwrap(),
                packet,
            )
            .unwrap();
        assert!(matches!(&done[..], [Output::Closed { .. }]));
    }
}
