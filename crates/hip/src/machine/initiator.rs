//! Initiator side: I1 (§6.6), R1 processing and I2 (§6.8), R2 (§6.10).

use std::net::SocketAddr;
use std::time::Instant;

use super::responder::KEYMAT_LEN;
use super::{random_spi, registration, Association, AssociationKeys, Host, Output, State};
use crate::crypto::keymat::{self, Drawer, HipKeys};
use crate::crypto::{cipher, dh, mac, puzzle};
use crate::error::{CryptoError, Error};
use crate::identity::{HitSuite, PeerIdentity};
use crate::wire::params::*;
use crate::wire::{Hit, Packet, PacketType, RawParam};

impl Host {
    /// Like [`Host::connect`], asking the peer (a registrar) for the given
    /// registration types in the base exchange (RFC 8003 §3.2).
    pub fn connect_and_register(
        &mut self,
        now: Instant,
        peer: Hit,
        addr: SocketAddr,
        reg_types: Vec<u8>,
        lifetime: u8,
    ) -> Result<Vec<Output>, Error> {
        let out = self.connect(now, peer, addr)?;
        if let Some(a) = self.assocs.get_mut(&peer) {
            if a.state == State::I1Sent {
                a.requested = Some(registration::Requested::new(reg_types, lifetime));
            }
        }
        Ok(out)
    }

    /// Starts a base exchange with `peer` at `addr` (UNASSOCIATED, CLOSING,
    /// CLOSED, E-FAILED → I1-SENT). Opportunistic mode (NULL peer HIT) is
    /// not supported.
    pub fn connect(
        &mut self,
        now: Instant,
        peer: Hit,
        addr: SocketAddr,
    ) -> Result<Vec<Output>, Error> {
        if peer.is_null() {
            return Err(Error::Unexpected("opportunistic mode is not supported"));
        }
        if let Some(a) = self.assocs.get(&peer) {
            if matches!(
                a.state,
                State::I1Sent | State::I2Sent | State::R2Sent | State::Established
            ) {
                return Ok(Vec::new());
            }
        }
        let mut i1 = Packet::new(PacketType::I1, self.id.hit(), peer);
        i1.add(&DhGroupList(self.cfg.dh_groups.clone()))?;
        let mut a = Association::new(peer, addr);
        a.state = State::I1Sent;
        a.retransmit = Some(self.start_retransmit(i1.clone(), now));
        self.assocs.insert(peer, a);
        Ok(vec![Output::Send {
            to: addr,
            packet: i1,
        }])
    }

    pub(crate) fn on_r1(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let me = self.id.hit();
        let peer = p.header.sender_hit;
        if p.header.receiver_hit != me {
            return Err(Error::Unexpected("R1 for another HIT"));
        }
        let a = self
            .assocs
            .get(&peer)
            .ok_or(Error::Unexpected("R1 without a sent I1"))?;
        if !matches!(a.state, State::I1Sent | State::I2Sent) {
            return Err(Error::Unexpected("R1 outside I1-SENT/I2-SENT"));
        }
        let host_id_raw = p.find(ty::HOST_ID).ok_or(Error::Missing(ty::HOST_ID))?;
        let peer_id = PeerIdentity::from_param(&host_id_raw.body()?)?;
        if peer_id.hit() != peer {
            return Err(Error::HitMismatch);
        }
        mac::verify_signature2(p, &peer_id)?;
        let counter: Option<R1Counter> = p.get()?;
        if a.state == State::I2Sent {
            // §6.8 step 8: only a fresher R1 restarts the exchange.
            match (counter.as_ref(), a.r1_counter) {
                (Some(c), Some(old)) if c.counter > old => {}
                _ => return Err(Error::Unexpected("R1 in I2-SENT without a larger counter")),
            }
        }
        let suites: HitSuiteList = p.get()?.ok_or(Error::Missing(ty::HIT_SUITE_LIST))?;
        if !suites.0.contains(&self.id.suite().list_octet()) {
            return Err(Error::Negotiation(
                "Responder does not support our HIT suite",
            ));
        }
        // Downgrade protection (§4.1.7, §6.8 step 7).
        let dhp: DiffieHellman = p.get()?.ok_or(Error::Missing(ty::DIFFIE_HELLMAN))?;
        let their_groups: DhGroupList = p.get()?.ok_or(Error::Missing(ty::DH_GROUP_LIST))?;
        match dh::select_group(&their_groups.0, &self.cfg.dh_groups) {
            Some(g) if g == dhp.group => {}
            Some(_) => return Err(Error::Negotiation("DH group is not the best common one")),
            None => return Err(Error::Negotiation("no common DH group")),
        }
        let hc: HipCipher = p.get()?.ok_or(Error::Missing(ty::HIP_CIPHER))?;
        let cipher_id =
            hc.0.iter()
                .copied()
                .find(|c| self.cfg.ciphers.contains(c))
                .ok_or(Error::Negotiation("no common HIP cipher"))?;
        let tfl: TransportFormatList = p.get()?.ok_or(Error::Missing(ty::TRANSPORT_FORMAT_LIST))?;
        if !tfl.0.contains(&ty::ESP_TRANSFORM) {
            return Err(Error::Negotiation("Responder offers no ESP transport"));
        }
        let et: EspTransform = p.get()?.ok_or(Error::Missing(ty::ESP_TRANSFORM))?;
        let esp_suite =
            et.0.iter()
                .copied()
                .find(|s| self.cfg.esp_suites.contains(s))
                .ok_or(Error::Negotiation("no common ESP suite"))?;

        // RHASH is the hash of the Responder's HIT suite.
        let rhash = HitSuite::of_hit(&peer)?.rhash();
        let pz: Puzzle = p.get()?.ok_or(Error::Missing(ty::PUZZLE))?;
        if pz.i.len() != rhash.len() {
            return Err(Error::Unexpected("#I length does not match RHASH"));
        }
        let tries = 1u64 << (u32::from(pz.k.min(puzzle::MAX_K)) + 4).min(34);
        let j = puzzle::solve(rhash, &pz.i, &me, &peer, pz.k, tries)?;
        let our_dh = dh::DhKey::generate(dhp.group)?;
        let kij = our_dh.shared(&dhp.public)?;
        let km = keymat::derive(rhash, &kij, &me, &peer, &pz.i, &j, KEYMAT_LEN)?;
        let we_are_greater = me > peer;
        let mut d = Drawer::new(&km);
        let hip = HipKeys::draw(
            &mut d,
            cipher::key_len(cipher_id)?,
            rhash.len(),
            we_are_greater,
        )?;
        let esp_keymat_index = d.index();
        let our_spi = random_spi();

        let mut i2 = Packet::new(PacketType::I2, me, peer);
        if let Some(raw) = p.find(ty::R1_COUNTER) {
            // Echoed verbatim, reserved field included (§5.2.3).
            i2.insert(raw.clone());
        }
        i2.add(&Solution {
            k: pz.k,
            opaque: pz.opaque,
            i: pz.i.clone(),
            j: j.clone(),
        })?;
        i2.add(&DiffieHellman {
            group: dhp.group,
            public: our_dh.public().to_vec(),
        })?;
        i2.add(&HipCipher(vec![cipher_id]))?;
        let host_id = RawParam::from_body(&self.id.host_id_param())?;
        if self.cfg.encrypt_host_id && cipher_id != cipher::CIPHER_NULL {
            let data = cipher::encrypt(cipher_id, &hip.our_enc, host_id.wire())?;
            i2.add(&Encrypted {
                reserved: 0,
                iv_and_data: data,
            })?;
        } else {
            i2.insert(host_id);
        }
        i2.add(&EspInfo {
            keymat_index: esp_keymat_index as u16,
            old_spi: 0,
            new_spi: our_spi,
        })?;
        if let Some(e) = p.get::<EchoRequestSigned>()? {
            i2.add(&EchoResponseSigned(e.0))?;
        }
        let wanted = self
            .assocs
            .get(&peer)
            .and_then(|a| a.requested.as_ref())
            .map(|r| (r.types.clone(), r.lifetime));
        if let (Some((types, lifetime)), Some(info)) = (wanted, p.get::<RegInfo>()?) {
            // Types the registrar did not offer are requested too: it answers
            // them with REG_FAILED, which tells the caller why.
            i2.add(&RegRequest {
                lifetime: lifetime
                    .clamp(info.min_lifetime, info.max_lifetime.max(info.min_lifetime)),
                reg_types: types,
            })?;
        }
        i2.add(&TransportFormatList(vec![ty::ESP_TRANSFORM]))?;
        i2.add(&EspTransform(vec![esp_suite]))?;
        mac::add_mac(&mut i2, rhash, &hip.our_mac)?;
        mac::add_signature(&mut i2, &self.id)?;
        for e in p.find_all(ty::ECHO_REQUEST_UNSIGNED) {
            i2.add(&EchoResponseUnsigned(e.contents().to_vec()))?;
        }

        let keys = AssociationKeys {
            peer_hit: peer,
            rhash,
            cipher: cipher_id,
            hip,
            keymat: km,
            esp_keymat_index,
            esp_suite,
            our_spi,
            peer_spi: 0,
            we_are_greater,
        };
        let retransmit = self.start_retransmit(i2.clone(), now);
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("association vanished"))?;
        a.state = State::I2Sent;
        a.peer_addr = from;
        a.peer = Some(peer_id);
        a.peer_host_id = Some(host_id_raw.clone());
        a.r1_counter = counter.map(|c| c.counter);
        a.keys = Some(keys);
        a.retransmit = Some(retransmit);
        Ok(vec![Output::Send {
            to: from,
            packet: i2,
        }])
    }

    pub(crate) fn on_r2(
        &mut self,
        now: Instant,
        _from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let me = self.id.hit();
        let peer = p.header.sender_hit;
        if p.header.receiver_hit != me {
            return Err(Error::Unexpected("R2 for another HIT"));
        }
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("R2 without association"))?;
        if a.state != State::I2Sent {
            return Err(Error::Unexpected("R2 outside I2-SENT"));
        }
        let (keys, peer_id, host_id) = match (&a.keys, &a.peer, &a.peer_host_id) {
            (Some(k), Some(pi), Some(h)) => (k, pi, h),
            _ => return Err(Error::Unexpected("I2-SENT without keys")),
        };
        mac::verify_mac2(p, keys.rhash, &keys.hip.peer_mac, host_id)?;
        mac::verify_signature(p, peer_id)?;
        let info: EspInfo = p.get()?.ok_or(Error::Missing(ty::ESP_INFO))?;
        if info.new_spi == 0 {
            return Err(CryptoError::Esp("R2 ESP_INFO has no SPI").into());
        }
        let granted: Option<RegResponse> = p.get()?;
        let failed: Option<RegFailed> = p.get()?;
        let mut keys = keys.clone();
        keys.peer_spi = info.new_spi;
        a.keys = Some(keys.clone());
        a.state = State::Established;
        a.retransmit = None;
        let mut out = vec![Output::Established {
            peer,
            keys: Box::new(keys),
        }];
        if granted.is_some() || failed.is_some() {
            let lifetime = granted.as_ref().map_or(0, |g| g.lifetime);
            let granted = granted.map(|g| g.reg_types).unwrap_or_default();
            let failed_types = failed
                .as_ref()
                .map(|f| &f.reg_types[..])
                .unwrap_or_default();
            if let Some(r) = a.requested.as_mut() {
                r.types.retain(|t| !failed_types.contains(t));
                match reg_lifetime(lifetime).filter(|_| !granted.is_empty()) {
                    Some(span) => {
                        r.granted = Some(registration::Granted {
                            types: granted.clone(),
                            lifetime,
                            expires: now + span,
                        });
                        // Renew at half the lifetime: the other half leaves
                        // room for the UPDATE's retransmissions.
                        r.due = Some(now + span / 2);
                    }
                    None => a.requested = None,
                }
            }
            out.push(Output::Registration {
                peer,
                granted,
                failed: failed.map(|f| f.reg_types).unwrap_or_default(),
                lifetime,
            });
        }
        Ok(out)
    }
}
