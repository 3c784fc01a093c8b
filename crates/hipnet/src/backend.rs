//! The ESP seam. [`UserEsp`] seals and opens in this process (the kernel
//! here has no ESP); a kernel BEET back end (`ip xfrm state … mode beet`)
//! would implement the same trait by installing the SAs in the kernel and
//! returning [`EspDrop::NoSa`] from `seal`/`open`, since packets would then
//! never reach user space.

use std::collections::HashMap;

use roam_hip::esp::{self, Inbound, Outbound};
use roam_hip::{AssociationKeys, Hit};

use crate::error::EspDrop;

/// The per-association ESP state that must move with a VM: restarting at
/// sequence number 1 would be rejected by the peer's replay window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaState {
    /// Last sequence number we sent.
    pub out_seq: u32,
    /// Highest sequence number received and the window bitmap below it.
    pub in_top: u32,
    pub in_bitmap: u64,
}

/// Where ESP for established associations is done.
pub trait EspBackend: Send {
    /// Installs (or replaces, after a new base exchange) both SAs of an
    /// association.
    fn install(&mut self, peer: Hit, keys: &AssociationKeys) -> Result<(), EspDrop>;
    /// Forgets the SAs of `peer`.
    fn remove(&mut self, peer: &Hit);
    fn has_sa(&self, peer: &Hit) -> bool;
    /// Seals one BEET payload for `peer`: the bytes to send over UDP.
    fn seal(&mut self, peer: &Hit, next_header: u8, payload: &[u8]) -> Result<Vec<u8>, EspDrop>;
    /// Opens one ESP datagram: (peer, next header, payload).
    fn open(&mut self, datagram: &[u8]) -> Result<(Hit, u8, Vec<u8>), EspDrop>;
    /// Sequence state of `peer`'s SAs, to carry them to another host.
    fn sa_state(&self, peer: &Hit) -> Option<SaState>;
    /// Continues `peer`'s installed SAs from a carried state.
    fn restore(&mut self, peer: &Hit, state: SaState) -> Result<(), EspDrop>;
}

/// User-space ESP (suite 8, 64-packet replay window) from `roam_hip::esp`.
#[derive(Default)]
pub struct UserEsp {
    out: HashMap<Hit, Outbound>,
    inb: HashMap<u32, (Hit, Inbound)>,
    /// The inbound SA each peer had before its last `install` (a rekey):
    /// the peer keeps sending on it until our rekey reaches it, so it stays
    /// open until the first packet arrives on the new SA (RFC 7402 §6.10:
    /// the old SA is dropped once the new one is in use).
    draining: HashMap<u32, (Hit, Inbound)>,
}

impl UserEsp {
    pub fn new() -> Self {
        Self::default()
    }
}

impl EspBackend for UserEsp {
    fn install(&mut self, peer: Hit, keys: &AssociationKeys) -> Result<(), EspDrop> {
        let (o, i) = esp::sas(keys).map_err(|_| EspDrop::Invalid)?;
        self.draining.retain(|_, (h, _)| *h != peer);
        let old: Vec<u32> = self
            .inb
            .iter()
            .filter(|(_, (h, _))| *h == peer)
            .map(|(spi, _)| *spi)
            .collect();
        for spi in old {
            if let Some(sa) = self.inb.remove(&spi) {
                if spi != i.spi {
                    self.draining.insert(spi, sa);
                }
            }
        }
        self.out.insert(peer, o);
        self.inb.insert(i.spi, (peer, i));
        Ok(())
    }

    fn remove(&mut self, peer: &Hit) {
        self.out.remove(peer);
        self.inb.retain(|_, (h, _)| h != peer);
        self.draining.retain(|_, (h, _)| h != peer);
    }

    fn has_sa(&self, peer: &Hit) -> bool {
        self.out.contains_key(peer)
    }

    fn seal(&mut self, peer: &Hit, next_header: u8, payload: &[u8]) -> Result<Vec<u8>, EspDrop> {
        let sa = self.out.get_mut(peer).ok_or(EspDrop::NoSa)?;
        sa.seal(next_header, payload)
            .map_err(|_| EspDrop::SeqExhausted)
    }

    fn open(&mut self, datagram: &[u8]) -> Result<(Hit, u8, Vec<u8>), EspDrop> {
        let spi = esp::spi_of(datagram).ok_or(EspDrop::Invalid)?;
        let current = self.inb.contains_key(&spi);
        let (peer, sa) = match self.inb.get_mut(&spi) {
            Some(x) => x,
            None => self
                .draining
                .get_mut(&spi)
                .ok_or(EspDrop::UnknownSpi(spi))?,
        };
        // Replays are told apart from forgeries before the ICV is checked
        // (open checks the window again; the cheap test here only names
        // the reason).
        let seq = datagram
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(EspDrop::Invalid)?;
        if !sa.window().check(seq) {
            return Err(EspDrop::Replay);
        }
        let (nh, payload) = sa.open(datagram).map_err(|_| EspDrop::Invalid)?;
        let peer = *peer;
        if current && !self.draining.is_empty() {
            // The peer uses the new SA: the old one has served its time.
            self.draining.retain(|_, (h, _)| *h != peer);
        }
        Ok((peer, nh, payload))
    }

    fn sa_state(&self, peer: &Hit) -> Option<SaState> {
        let out = self.out.get(peer)?;
        let (_, inb) = self.inb.values().find(|(h, _)| h == peer)?;
        let (in_top, in_bitmap) = inb.window().to_parts();
        Some(SaState {
            out_seq: out.seq(),
            in_top,
            in_bitmap,
        })
    }

    fn restore(&mut self, peer: &Hit, st: SaState) -> Result<(), EspDrop> {
        let out = self.out.get_mut(peer).ok_or(EspDrop::NoSa)?;
        out.resume_after(st.out_seq);
        let (_, inb) = self
            .inb
            .values_mut()
            .find(|(h, _)| h == peer)
            .ok_or(EspDrop::NoSa)?;
        inb.restore_window(esp::ReplayWindow::from_parts(st.in_top, st.in_bitmap));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn user_esp_classifies_drops() {
        let (ka, kb) = crate::bench::exchange_in_memory().unwrap();
        // Each side's keys name the other side.
        let (hit_b, hit_a) = (ka.peer_hit, kb.peer_hit);
        let (mut a, mut b) = (UserEsp::new(), UserEsp::new());
        a.install(hit_b, &ka).unwrap();
        b.install(hit_a, &kb).unwrap();
        assert_eq!(a.seal(&hit_a, 6, b"x"), Err(EspDrop::NoSa));
        let d = a.seal(&hit_b, 6, b"hello").unwrap();
        assert_eq!(b.open(&d).unwrap(), (hit_a, 6, b"hello".to_vec()));
        assert_eq!(b.open(&d), Err(EspDrop::Replay));
        let mut forged = a.seal(&hit_b, 6, b"again").unwrap();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert_eq!(b.open(&forged), Err(EspDrop::Invalid));
        let mut other = d.clone();
        other[..4].copy_from_slice(&[0, 0, 1, 0]);
        assert_eq!(b.open(&other), Err(EspDrop::UnknownSpi(256)));
        assert_eq!(b.open(&[1, 2, 3]), Err(EspDrop::Invalid));
        // The forged packet did not advance the window: the genuine one
        // with the same sequence number is still accepted.
        forged[n - 1] ^= 1;
        assert_eq!(b.open(&forged).unwrap().2, b"again".to_vec());
        b.remove(&hit_a);
        assert!(!b.has_sa(&hit_a));
        assert!(b.draining.is_empty());
        assert!(matches!(b.open(&d), Err(EspDrop::UnknownSpi(_))));
    }
}

#[cfg(test)]
mod rekey_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// After a rekey, packets the peer sealed on the old SA (in flight, or
    /// sent before the rekey reached it) still open, until the first packet
    /// on the new SA retires the old one.
    #[test]
    fn the_old_inbound_sa_drains_after_a_rekey() {
        let (ka, kb) = crate::bench::exchange_in_memory().unwrap();
        let (hit_b, hit_a) = (ka.peer_hit, kb.peer_hit);
        let (mut a, mut b) = (UserEsp::new(), UserEsp::new());
        a.install(hit_b, &ka).unwrap();
        b.install(hit_a, &kb).unwrap();
        let in_flight = a.seal(&hit_b, 6, b"old 1").unwrap();
        let later = a.seal(&hit_b, 6, b"old 2").unwrap();
        // B rekeys first (new keys 96 octets further, new SPIs).
        let (mut ka2, mut kb2) = (ka.clone(), kb.clone());
        ka2.esp_keymat_index += 96;
        kb2.esp_keymat_index += 96;
        ka2.our_spi = 0x5000;
        kb2.peer_spi = 0x5000;
        kb2.our_spi = 0x6000;
        ka2.peer_spi = 0x6000;
        b.install(hit_a, &kb2).unwrap();
        assert_eq!(b.open(&in_flight).unwrap().2, b"old 1");
        a.install(hit_b, &ka2).unwrap();
        let new = a.seal(&hit_b, 6, b"new").unwrap();
        assert_eq!(b.open(&new).unwrap().2, b"new");
        // The new SA is in use: the old one is gone.
        assert_eq!(b.open(&later), Err(EspDrop::UnknownSpi(kb.our_spi)));
        assert_eq!(b.sa_state(&hit_a).unwrap().in_top, 1);
    }
}
