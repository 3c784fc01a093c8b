//! Rekeying an association's ESP SAs through UPDATE (RFC 7402 §3.3, §6.9;
//! RFC 7401 §6.11), without a new Diffie-Hellman: the new keys are drawn
//! from the existing KEYMAT, at the larger of the two Keymat Index values
//! the peers announce, which each set just past the keys in use.
//!
//! ```text
//!  A (rekey)                                                  B
//!   │ UPDATE(ESP_INFO{idx_a, old=A's SPI, new=A'}, SEQ=x)      │
//!   ├────────────────────────────────────────────────────────►│ old == what B sends to?
//!   │ UPDATE(ESP_INFO{idx, old=B's SPI, new=B'}, SEQ=y, ACK=x) │ idx = max(idx_a, idx_b)
//!   │◄────────────────────────────────────────────────────────┤
//!   │ Rekeyed: in A', out B', keys at idx                      │
//!   │ UPDATE(ACK=y)                                            │
//!   ├────────────────────────────────────────────────────────►│ Rekeyed: in B', out A'
//! ```
//! Both UPDATEs with SEQ are retransmitted until ACKed. When both ends
//! start at once (the sequence-number policy fires on both), each initial
//! UPDATE carries its sender's new SPI: each end ACKs the other's, and
//! finishes when its own is ACKed, at max(idx_a, idx_b). When the KEYMAT is
//! used up, [`Host::rekey`] fails with `CryptoError::Keymat` (a rekey with
//! a new DH is not implemented).

use std::net::SocketAddr;
use std::time::Instant;

use super::{random_spi, AssociationKeys, Host, Output, State};
use crate::error::{CryptoError, Error};
use crate::esp;
use crate::wire::params::{Ack, EspInfo};
use crate::wire::{Hit, Packet, PacketType};

/// A rekey in progress.
#[derive(Clone, Debug)]
pub(crate) struct Rekey {
    /// Our UPDATE carrying our ESP_INFO.
    pub update_id: u32,
    /// Our new inbound SPI.
    pub new_spi: u32,
    pub index: usize,
    /// The peer's new inbound SPI, once known (we answered its request,
    /// or it sent its own at the same time as ours).
    pub peer_new_spi: Option<u32>,
    /// The peer ACKed our UPDATE before its ESP_INFO arrived (a
    /// simultaneous rekey whose packets crossed).
    pub ours_acked: bool,
}

/// The Keymat Index just past the SAs in use, checked against the KEYMAT.
fn next_index(k: &AssociationKeys) -> Result<usize, Error> {
    let n = esp::keymat_len(k.esp_suite).ok_or(CryptoError::Esp("unsupported ESP suite"))?;
    let next = k.esp_keymat_index + n;
    if next + n > k.keymat.len() || next > usize::from(u16::MAX) {
        return Err(CryptoError::Keymat.into());
    }
    Ok(next)
}

fn rekeyed(
    k: &AssociationKeys,
    index: usize,
    our_spi: u32,
    peer_spi: u32,
) -> Result<AssociationKeys, Error> {
    let n = esp::keymat_len(k.esp_suite).ok_or(CryptoError::Esp("unsupported ESP suite"))?;
    if index + n > k.keymat.len() || index < k.esp_keymat_index {
        return Err(CryptoError::Keymat.into());
    }
    Ok(AssociationKeys {
        esp_keymat_index: index,
        our_spi,
        peer_spi,
        ..k.clone()
    })
}

impl Host {
    /// The rekey policy (RFC 7402 §6.9: new SAs before a sequence number
    /// cycles). `seq` is the highest ESP sequence number seen on either SA
    /// of `peer`: the last one we sealed or the top of the replay window, so
    /// a peer that never rekeys on its own is rekeyed by us. Below
    /// [`Config::rekey_seq`](super::Config::rekey_seq), or while an UPDATE is
    /// outstanding (retried on a later packet), nothing happens; cheap
    /// enough to call for every packet. Fails with `CryptoError::Keymat` when
    /// the KEYMAT has no keys left: the caller must then close the
    /// association and run a new base exchange.
    pub fn rekey_if_due(
        &mut self,
        now: Instant,
        peer: &Hit,
        seq: u32,
    ) -> Result<Vec<Output>, Error> {
        if seq < self.cfg.rekey_seq {
            return Ok(Vec::new());
        }
        let Some(a) = self.assocs.get(peer) else {
            return Ok(Vec::new());
        };
        if a.state != State::Established || a.update_pending.is_some() || a.rekey.is_some() {
            return Ok(Vec::new());
        }
        self.rekey(now, *peer)
    }

    /// Starts a rekey of the ESP SAs with `peer` (ESTABLISHED, no UPDATE
    /// outstanding). [`Output::Rekeyed`] reports the new keys.
    pub fn rekey(&mut self, now: Instant, peer: Hit) -> Result<Vec<Output>, Error> {
        let a = self
            .assocs
            .get(&peer)
            .filter(|a| a.state == State::Established)
            .ok_or(Error::Unexpected("rekey needs an established association"))?;
        if a.update_pending.is_some() || a.rekey.is_some() {
            return Err(Error::Unexpected("an UPDATE is already outstanding"));
        }
        let keys = a.keys.as_ref().ok_or(Error::Unexpected("no keys"))?;
        let index = next_index(keys)?;
        let new_spi = random_spi();
        let mut p = Packet::new(PacketType::Update, self.id.hit(), peer);
        p.add(&EspInfo {
            keymat_index: index as u16,
            old_spi: keys.our_spi,
            new_spi,
        })?;
        let (id, packet, a) = self.send_update(now, peer, p)?;
        a.rekey = Some(Rekey {
            update_id: id,
            new_spi,
            index,
            peer_new_spi: None,
            ours_acked: false,
        });
        Ok(vec![Output::Send {
            to: a.peer_addr,
            packet,
        }])
    }

    /// Our rekey UPDATE `update_id` was ACKed. If it answered the peer's
    /// request, the new SAs are in place now.
    pub(crate) fn rekey_acked(
        &mut self,
        peer: Hit,
        update_id: u32,
    ) -> Result<Option<Output>, Error> {
        let Some(a) = self.assocs.get_mut(&peer) else {
            return Ok(None);
        };
        let Some(r) = a.rekey.clone().filter(|r| r.update_id == update_id) else {
            return Ok(None);
        };
        let Some(peer_spi) = r.peer_new_spi else {
            // Our own request: completes with the peer's ESP_INFO.
            if let Some(r) = a.rekey.as_mut() {
                r.ours_acked = true;
            }
            return Ok(None);
        };
        let keys = a.keys.as_ref().ok_or(Error::Unexpected("no keys"))?;
        let new = rekeyed(keys, r.index, r.new_spi, peer_spi)?;
        a.keys = Some(new.clone());
        a.rekey = None;
        Ok(Some(Output::Rekeyed {
            peer,
            keys: Box::new(new),
        }))
    }

    /// A fresh UPDATE with ESP_INFO and SEQ `seq_id`: the peer's rekey
    /// request, or its answer to ours (then `acked_ours`).
    pub(crate) fn on_esp_info(
        &mut self,
        now: Instant,
        peer: Hit,
        from: SocketAddr,
        seq_id: u32,
        info: &EspInfo,
        ack: Option<&Ack>,
    ) -> Result<Vec<Output>, Error> {
        let a = self
            .assocs
            .get(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        let keys = a.keys.as_ref().ok_or(Error::Unexpected("no keys"))?;
        // old_spi names the SA the peer receives on: the one we send with.
        if info.old_spi != keys.peer_spi || info.new_spi <= 255 {
            return Err(Error::Unexpected("ESP_INFO does not match the SA in use"));
        }
        let ours = a.rekey.clone();
        match ours {
            Some(r)
                if r.peer_new_spi.is_none()
                    && !r.ours_acked
                    && !ack.is_some_and(|k| k.0.contains(&r.update_id)) =>
            {
                // Both ends started a rekey at once (RFC 7402 §6.9.1: each
                // side's initial UPDATE already carries its new SPI). Keep
                // the peer's SPI and the larger index and ACK its SEQ; ours
                // completes when the peer ACKs our UPDATE. Both ends take
                // max(index_a, index_b), so they draw the same keys.
                let index = r.index.max(usize::from(info.keymat_index));
                rekeyed(keys, index, 0, 0)?;
                let (reply, to) = self.update_reply(now, peer, from, seq_id, None, Vec::new())?;
                if let Some(r) = self.assocs.get_mut(&peer).and_then(|a| a.rekey.as_mut()) {
                    r.peer_new_spi = Some(info.new_spi);
                    r.index = index;
                }
                Ok(vec![Output::Send { to, packet: reply }])
            }
            Some(r) if r.peer_new_spi.is_none() => {
                // The answer to our request (it ACKs our UPDATE, now or
                // before): the new SAs are in place.
                let index = r.index.max(usize::from(info.keymat_index));
                let new = rekeyed(keys, index, r.new_spi, info.new_spi)?;
                let (reply, to) = self.update_reply(now, peer, from, seq_id, None, Vec::new())?;
                let a = self
                    .assocs
                    .get_mut(&peer)
                    .ok_or(Error::Unexpected("no association"))?;
                a.keys = Some(new.clone());
                a.rekey = None;
                Ok(vec![
                    Output::Rekeyed {
                        peer,
                        keys: Box::new(new),
                    },
                    Output::Send { to, packet: reply },
                ])
            }
            Some(_) => Err(Error::Unexpected("rekey already answered")),
            None => {
                if a.update_pending.is_some() {
                    return Err(Error::Unexpected("an UPDATE is already outstanding"));
                }
                let index = next_index(keys)?.max(usize::from(info.keymat_index));
                // Refuse an index the KEYMAT cannot serve before answering.
                rekeyed(keys, index, 0, 0)?;
                let new_spi = random_spi();
                let mut p = Packet::new(PacketType::Update, self.id.hit(), peer);
                p.add(&EspInfo {
                    keymat_index: index as u16,
                    old_spi: keys.our_spi,
                    new_spi,
                })?;
                p.add(&Ack(vec![seq_id]))?;
                let (id, packet, a) = self.send_update(now, peer, p)?;
                a.rekey = Some(Rekey {
                    update_id: id,
                    new_spi,
                    index,
                    peer_new_spi: Some(info.new_spi),
                    ours_acked: false,
                });
                Ok(vec![Output::Send { to: from, packet }])
            }
        }
    }
}
