//! CLOSE / CLOSE_ACK (§5.3.7-8, §6.14-15), NOTIFY (§5.3.6, §6.13) and
//! UPDATE with SEQ/ACK (§6.11-12) carrying LOCATOR_SET (RFC 8046).

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::{OsRng, RngCore};

use super::{registration, Host, Output, Retransmit, State};
use crate::crypto::mac;
use crate::error::Error;
use crate::identity::PeerIdentity;
use crate::wire::params::*;
use crate::wire::{Hit, Packet, PacketType, RawParam};

impl Host {
    pub(crate) fn signed_with_mac(&self, peer: &Hit, mut p: Packet) -> Result<Packet, Error> {
        let a = self
            .assocs
            .get(peer)
            .ok_or(Error::Unexpected("no association"))?;
        let keys = a
            .keys
            .as_ref()
            .ok_or(Error::Unexpected("association has no keys"))?;
        mac::add_mac(&mut p, keys.rhash, &keys.hip.our_mac)?;
        mac::add_signature(&mut p, &self.id)?;
        Ok(p)
    }

    fn verify_mac_sig(&self, peer: &Hit, p: &Packet) -> Result<(), Error> {
        let a = self
            .assocs
            .get(peer)
            .ok_or(Error::Unexpected("no association"))?;
        let (keys, id) = match (&a.keys, &a.peer) {
            (Some(k), Some(i)) => (k, i),
            _ => return Err(Error::Unexpected("association has no keys")),
        };
        mac::verify_mac(p, keys.rhash, &keys.hip.peer_mac)?;
        mac::verify_signature(p, id)?;
        Ok(())
    }

    /// Closes the association with `peer` (→ CLOSING).
    pub fn close(&mut self, now: Instant, peer: Hit) -> Result<Vec<Output>, Error> {
        let state = self.state(&peer);
        if !matches!(state, State::Established | State::R2Sent) {
            return Err(Error::Unexpected("close needs an established association"));
        }
        let mut nonce = vec![0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let mut p = Packet::new(PacketType::Close, self.id.hit(), peer);
        p.add(&EchoRequestSigned(nonce.clone()))?;
        let p = self.signed_with_mac(&peer, p)?;
        let mut r: Retransmit = self.start_retransmit(p.clone(), now);
        r.give_up_at = Some(now + self.cfg.close_timeout);
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        a.state = State::Closing;
        a.close_nonce = Some(nonce);
        a.retransmit = Some(r);
        a.deadline = None;
        Ok(vec![Output::Send {
            to: a.peer_addr,
            packet: p,
        }])
    }

    pub(crate) fn on_close(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let peer = p.header.sender_hit;
        if p.header.receiver_hit != self.id.hit() {
            return Err(Error::Unexpected("CLOSE for another HIT"));
        }
        let state = self.state(&peer);
        if !matches!(
            state,
            State::Established | State::R2Sent | State::I2Sent | State::Closing | State::Closed
        ) {
            return Err(Error::Unexpected("CLOSE without association"));
        }
        self.verify_mac_sig(&peer, p)?;
        let echo: EchoRequestSigned = p.get()?.ok_or(Error::Missing(ty::ECHO_REQUEST_SIGNED))?;
        let mut ack = Packet::new(PacketType::CloseAck, self.id.hit(), peer);
        ack.add(&EchoResponseSigned(echo.0))?;
        let ack = self.signed_with_mac(&peer, ack)?;
        let hold = self.cfg.state_hold;
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        let was_closed = a.state == State::Closed;
        a.state = State::Closed;
        a.retransmit = None;
        a.deadline = Some(now + hold);
        let mut out = vec![Output::Send {
            to: from,
            packet: ack,
        }];
        if !was_closed {
            out.push(Output::Closed { peer });
        }
        Ok(out)
    }

    pub(crate) fn on_close_ack(&mut self, _now: Instant, p: &Packet) -> Result<Vec<Output>, Error> {
        let peer = p.header.sender_hit;
        let a = self
            .assocs
            .get(&peer)
            .ok_or(Error::Unexpected("CLOSE_ACK without association"))?;
        if !matches!(a.state, State::Closing | State::Closed) {
            return Err(Error::Unexpected("CLOSE_ACK outside CLOSING/CLOSED"));
        }
        let echo: EchoResponseSigned = p.get()?.ok_or(Error::Missing(ty::ECHO_RESPONSE_SIGNED))?;
        if a.close_nonce.as_deref() != Some(&echo.0[..]) {
            return Err(Error::Unexpected("CLOSE_ACK echo does not match our CLOSE"));
        }
        self.verify_mac_sig(&peer, p)?;
        let was_closing = a.state == State::Closing;
        self.assocs.remove(&peer);
        Ok(if was_closing {
            vec![Output::Closed { peer }]
        } else {
            Vec::new()
        })
    }

    /// Builds a signed NOTIFY for `peer` carrying our HOST_ID.
    pub fn notify(&self, peer: Hit, notification: Notification) -> Result<Packet, Error> {
        let mut p = Packet::new(PacketType::Notify, self.id.hit(), peer);
        p.add(&notification)?;
        p.add(&self.id.host_id_param())?;
        mac::add_signature(&mut p, &self.id)?;
        Ok(p)
    }

    pub(crate) fn on_notify(&mut self, p: &Packet) -> Result<Vec<Output>, Error> {
        let peer = p.header.sender_hit;
        // Verify with the HI we know, else with the one in the packet if it
        // matches the sender HIT.
        let known = self.assocs.get(&peer).and_then(|a| a.peer.clone());
        let id = match known {
            Some(i) => i,
            None => {
                let h: HostIdParam = p.get()?.ok_or(Error::Missing(ty::HOST_ID))?;
                let i = PeerIdentity::from_param(&h)?;
                if i.hit() != peer {
                    return Err(Error::HitMismatch);
                }
                i
            }
        };
        mac::verify_signature(p, &id)?;
        Ok(p.find_all(ty::NOTIFICATION)
            .filter_map(|r| r.body::<Notification>().ok())
            .map(|notification| Output::Notified { peer, notification })
            .collect())
    }

    /// Sends an UPDATE with our new locators (RFC 8046 §5.1), reliably
    /// (SEQ, retransmitted until ACKed).
    pub fn update_locators(
        &mut self,
        now: Instant,
        peer: Hit,
        locators: LocatorSet,
        new_peer_addr: Option<SocketAddr>,
    ) -> Result<Vec<Output>, Error> {
        if !matches!(self.state(&peer), State::Established | State::R2Sent) {
            return Err(Error::Unexpected("UPDATE needs an established association"));
        }
        let mut p = Packet::new(PacketType::Update, self.id.hit(), peer);
        p.add(&locators)?;
        // This UPDATE takes the place of any outstanding one: a REG_REQUEST
        // waiting or in flight rides along (a moved VM's host renews its
        // registration with the rendezvous server in the same packet).
        let rides_along = self.piggyback_reg_request(now, &peer, &mut p);
        let (id, packet, a) = self.send_update(now, peer, p)?;
        if rides_along {
            registration::reg_request_sent(a, id);
        }
        if let Some(addr) = new_peer_addr {
            a.peer_addr = addr;
        }
        Ok(vec![Output::Send {
            to: a.peer_addr,
            packet,
        }])
    }

    pub(crate) fn on_update(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let peer = p.header.sender_hit;
        if !matches!(self.state(&peer), State::Established | State::R2Sent) {
            return Err(Error::Unexpected(
                "UPDATE without an established association",
            ));
        }
        let seq: Option<Seq> = p.get()?;
        let ack: Option<Ack> = p.get()?;
        if seq.is_none() && ack.is_none() {
            return Err(Error::Unexpected("UPDATE without SEQ or ACK"));
        }
        self.verify_mac_sig(&peer, p)?;
        // The answer to an address check first: a wrong one changes nothing.
        let echo: Option<EchoResponseSigned> = p.get()?;
        let verified = self.echo_answer(&peer, ack.as_ref(), echo.as_ref().map(|e| &e.0[..]))?;
        let mut out = Vec::new();
        let mut acked = None;
        {
            let a = self
                .assocs
                .get_mut(&peer)
                .ok_or(Error::Unexpected("no association"))?;
            // An UPDATE shows the peer is ESTABLISHED (§4.4.3, R2-SENT).
            if a.state == State::R2Sent {
                a.state = State::Established;
                a.deadline = None;
            }
            if let (Some(ack), Some(pending)) = (&ack, a.update_pending) {
                if ack.0.contains(&pending) {
                    a.update_pending = None;
                    a.retransmit = None;
                    acked = Some(pending);
                    out.push(Output::UpdateAcked {
                        peer,
                        update_id: pending,
                    });
                }
            }
        }
        if let Some(addr) = verified {
            out.extend(self.address_verified(peer, addr));
        }
        if let Some(id) = acked {
            out.extend(self.rekey_acked(peer, id)?);
            out.extend(self.on_reg_answer(now, peer, id, p)?);
        }
        if let Some(Seq(id)) = seq {
            let (fresh, prev) = {
                let a = self
                    .assocs
                    .get_mut(&peer)
                    .ok_or(Error::Unexpected("no association"))?;
                let prev = a.peer_update_id;
                let fresh = prev.is_none_or(|last| id.wrapping_sub(last) as i32 > 0);
                if fresh {
                    a.peer_update_id = Some(id);
                }
                (fresh, prev)
            };
            if fresh {
                if let Some(info) = p.get::<EspInfo>()? {
                    match self.on_esp_info(now, peer, from, id, &info, ack.as_ref()) {
                        Ok(o) => out.extend(o),
                        Err(e) => {
                            // Unprocessed: its retransmission must not be
                            // taken for a duplicate.
                            if let Some(a) = self.assocs.get_mut(&peer) {
                                a.peer_update_id = prev;
                            }
                            return Err(e);
                        }
                    }
                    return Ok(out);
                }
            }
            let locators = if fresh { p.get::<LocatorSet>()? } else { None };
            if let Some(locators) = &locators {
                out.push(Output::PeerLocators {
                    peer,
                    from,
                    locators: locators.clone(),
                });
            }
            // A REG_REQUEST is answered beside the ACK (RFC 8003 §3.2);
            // a duplicate gets the first answer again.
            let (mut answers, event) = self.on_reg_request(now, peer, id, fresh, p)?;
            out.extend(event);
            // Duplicates are ACKed again but not reprocessed (§6.12.1); an
            // echo request is answered every time.
            if let Some(e) = p.get::<EchoRequestSigned>()? {
                answers.push(RawParam::from_body(&EchoResponseSigned(e.0))?);
            }
            let (reply, to) = self.update_reply(now, peer, from, id, locators.as_ref(), answers)?;
            out.push(Output::Send { to, packet: reply });
        }
        Ok(out)
    }
}
