//! Property tests of the ESP parser (`esp::Inbound::open`) and its replay
//! window: whatever arrives, open never panics; only what the peer's SA
//! sealed, unmodified, whole and new, is accepted; and a rejected packet
//! leaves the window as it was.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use proptest::prelude::*;
use roam_hip::crypto::keymat::HipKeys;
use roam_hip::esp::{sas, Inbound, Outbound, ReplayWindow};
use roam_hip::identity::Rhash;
use roam_hip::machine::{AssociationKeys, ESP_SUITE_AES128_CBC_SHA256};
use roam_hip::Hit;

const SPI_A: u32 = 0x1000;
const SPI_B: u32 = 0x2000;

/// Keys as both ends of one association would hold them, from a fixed
/// KEYMAT (no base exchange: these tests are about the ESP codec).
fn keys(we_are_greater: bool) -> AssociationKeys {
    let (our_spi, peer_spi) = if we_are_greater {
        (SPI_A, SPI_B)
    } else {
        (SPI_B, SPI_A)
    };
    AssociationKeys {
        peer_hit: Hit([u8::from(we_are_greater); 16]),
        rhash: Rhash::Sha384,
        cipher: 0,
        hip: HipKeys {
            our_enc: vec![],
            our_mac: vec![],
            peer_enc: vec![],
            peer_mac: vec![],
        },
        keymat: (0..1024u32).map(|i| (i * 7 + 3) as u8).collect(),
        esp_keymat_index: 0,
        esp_suite: ESP_SUITE_AES128_CBC_SHA256,
        our_spi,
        peer_spi,
        we_are_greater,
    }
}

/// A's outbound SA and B's inbound SA (the pair A → B).
fn pair() -> (Outbound, Inbound) {
    let (a_out, _) = sas(&keys(true)).unwrap();
    let (_, b_in) = sas(&keys(false)).unwrap();
    (a_out, b_in)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn seal_then_open_round_trips(nh in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let (mut out, mut inb) = pair();
        let pkt = out.seal(nh, &payload).unwrap();
        prop_assert_eq!(pkt.len() % 16, (8 + 16) % 16);
        prop_assert_eq!(inb.open(&pkt).unwrap(), (nh, payload));
    }

    #[test]
    fn arbitrary_bytes_are_rejected(mut data in proptest::collection::vec(any::<u8>(), 0..400), right_spi in any::<bool>()) {
        let (_, mut inb) = pair();
        if right_spi && data.len() >= 4 {
            data[..4].copy_from_slice(&SPI_A.to_be_bytes());
        }
        let before = inb.window().clone();
        prop_assert!(inb.open(&data).is_err());
        prop_assert_eq!(inb.window(), &before);
    }

    #[test]
    fn any_bit_flip_or_truncation_is_rejected_without_moving_the_window(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        bit in any::<usize>(),
        cut in any::<usize>(),
    ) {
        let (mut out, mut inb) = pair();
        let pkt = out.seal(6, &payload).unwrap();
        let mut flipped = pkt.clone();
        let bit = bit % (pkt.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(inb.open(&flipped).is_err());
        let short = &pkt[..cut % pkt.len()];
        prop_assert!(inb.open(short).is_err());
        let mut long = pkt.clone();
        long.push(0);
        prop_assert!(inb.open(&long).is_err());
        prop_assert_eq!(inb.window(), &ReplayWindow::default());
        // The genuine packet is still new.
        prop_assert_eq!(inb.open(&pkt).unwrap(), (6, payload));
    }

    /// The bitmap window against a plain set of seen numbers: accept iff
    /// never seen, not zero, and within 64 of the highest seen.
    #[test]
    fn replay_window_matches_a_model(seqs in proptest::collection::vec(
        prop_oneof![1u32..200, 1u32..=u32::MAX, (u32::MAX - 100)..=u32::MAX], 1..120)
    ) {
        let (mut out, mut inb) = pair();
        let mut seen = HashSet::new();
        let mut top = 0u32;
        for s in seqs {
            out.resume_after(s - 1);
            let pkt = out.seal(17, &s.to_be_bytes()).unwrap();
            let fresh = !seen.contains(&s) && (s > top || top - s < 64);
            let got = inb.open(&pkt);
            prop_assert_eq!(got.is_ok(), fresh, "seq {} top {}", s, top);
            if fresh {
                seen.insert(s);
                top = top.max(s);
            }
        }
    }
}

#[test]
fn sequence_number_never_wraps() {
    let (mut out, mut inb) = pair();
    out.resume_after(u32::MAX - 1);
    let last = out.seal(6, b"last").unwrap();
    assert!(out.seal(6, b"wrapped").is_err());
    assert_eq!(out.seq(), u32::MAX);
    assert_eq!(inb.open(&last).unwrap().1, b"last");
}
