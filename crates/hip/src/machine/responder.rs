//! Responder side: stateless R1s from a precreated cache (§6.7.1), puzzle
//! difficulty raised under an I1 flood, and I2 processing (§6.9).
//!
//! #I is never stored: it is RHASH(S | HIT-I | HIT-R | Opaque | #K)
//! truncated to RHASH_len (Appendix A, plus #K so an Initiator cannot claim
//! an easier puzzle, and an Opaque counter so #I is not reused per
//! Initiator). S rotates every `secret_lifetime`; the R1 generation counter
//! names it, and the previous S stays valid for verification.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};

use super::{random_spi, Association, AssociationKeys, Host, Output, State};
use crate::crypto::keymat::{self, Drawer, HipKeys};
use crate::crypto::{cipher, dh, mac, puzzle};
use crate::error::{CryptoError, Error};
use crate::identity::{HitSuite, PeerIdentity};
use crate::wire::params::*;
use crate::wire::{Hit, Packet, PacketType, RawParam};

/// Puzzle tuning.
#[derive(Clone, Debug)]
pub struct PuzzleConfig {
    /// #K when not under load.
    pub k_base: u8,
    /// Ceiling for #K under an I1 flood.
    pub k_max: u8,
    /// I1s per second above which #K is raised.
    pub flood_rate: u32,
    /// PUZZLE Lifetime field: 2^(value - 32) seconds (37 = 32 s).
    pub lifetime: u8,
    /// How often S (and the R1 generation) changes.
    pub secret_lifetime: Duration,
}

impl Default for PuzzleConfig {
    fn default() -> Self {
        PuzzleConfig {
            k_base: 1,
            k_max: 20,
            flood_rate: 100,
            lifetime: 37,
            secret_lifetime: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Generation {
    counter: u64,
    secret: [u8; 32],
    /// One DH key per group, shared by the R1s of this generation.
    dh: HashMap<u8, dh::DhKey>,
    /// Signed R1 templates by (group, #K).
    r1: HashMap<(u8, u8), Packet>,
}

impl Generation {
    fn new(counter: u64) -> Self {
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut secret);
        Generation {
            counter,
            secret,
            dh: HashMap::new(),
            r1: HashMap::new(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ResponderState {
    current: Generation,
    previous: Option<Generation>,
    pub rotate_at: Instant,
    opaque_counter: u16,
    window_start: Instant,
    window_count: u32,
    last_rate: u32,
}

impl ResponderState {
    pub fn new(cfg: &super::Config, now: Instant) -> Self {
        ResponderState {
            current: Generation::new(1),
            previous: None,
            rotate_at: now + cfg.puzzle.secret_lifetime,
            opaque_counter: 0,
            window_start: now,
            window_count: 0,
            last_rate: 0,
        }
    }

    pub fn rotate(&mut self, cfg: &super::Config, now: Instant) {
        let next = Generation::new(self.current.counter + 1);
        self.previous = Some(std::mem::replace(&mut self.current, next));
        self.rotate_at = now + cfg.puzzle.secret_lifetime;
    }

    /// Counts an I1 in one-second windows.
    fn note_i1(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_secs(1) {
            // A window with no I1s since the last one counts as zero.
            self.last_rate = if elapsed >= Duration::from_secs(2) {
                0
            } else {
                self.window_count
            };
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count = self.window_count.saturating_add(1);
    }

    /// #K now: base, plus one per doubling of the I1 rate over the flood
    /// threshold (the current window counts as soon as it exceeds it).
    pub fn k(&self, cfg: &PuzzleConfig) -> u8 {
        let rate = self.last_rate.max(self.window_count);
        if rate <= cfg.flood_rate || cfg.flood_rate == 0 {
            return cfg.k_base;
        }
        let over = (rate / cfg.flood_rate).max(1);
        let extra = 1 + over.ilog2() as u8;
        cfg.k_base.saturating_add(extra * 2).min(cfg.k_max)
    }
}

fn puzzle_i(
    suite: HitSuite,
    secret: &[u8],
    hit_i: &Hit,
    hit_r: &Hit,
    opaque: [u8; 2],
    k: u8,
) -> Vec<u8> {
    suite
        .rhash()
        .digest(&[secret, &hit_i.0, &hit_r.0, &opaque, &[k]])
}

impl Host {
    /// Current puzzle difficulty (exposed for monitoring and tests).
    pub fn puzzle_k(&self) -> u8 {
        self.responder.k(&self.cfg.puzzle)
    }

    fn r1_template(&mut self, group: u8, k: u8) -> Result<Packet, Error> {
        let gen = &mut self.responder.current;
        if let Some(p) = gen.r1.get(&(group, k)) {
            return Ok(p.clone());
        }
        let key = match gen.dh.entry(group) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(dh::DhKey::generate(group)?),
        };
        let rhash = self.id.suite().rhash();
        let mut p = Packet::new(PacketType::R1, self.id.hit(), Hit::NULL);
        p.add(&R1Counter {
            reserved: 0,
            counter: gen.counter,
        })?;
        p.add(&Puzzle {
            k,
            lifetime: self.cfg.puzzle.lifetime,
            opaque: [0, 0],
            i: vec![0; rhash.len()],
        })?;
        p.add(&DiffieHellman {
            group,
            public: key.public().to_vec(),
        })?;
        p.add(&HipCipher(self.cfg.ciphers.clone()))?;
        p.add(&self.id.host_id_param())?;
        // Every suite we can verify an Initiator in, ours first (§5.2.10).
        let mut suites = vec![self.id.suite()];
        for s in [HitSuite::EcdsaSha384, HitSuite::RsaDsaSha256] {
            if !suites.contains(&s) {
                suites.push(s);
            }
        }
        p.add(&HitSuiteList(
            suites.iter().map(|s| s.list_octet()).collect(),
        ))?;
        p.add(&DhGroupList(self.cfg.dh_groups.clone()))?;
        p.add(&TransportFormatList(vec![ty::ESP_TRANSFORM]))?;
        p.add(&EspTransform(self.cfg.esp_suites.clone()))?;
        if !self.cfg.services.is_empty() {
            p.add(&RegInfo {
                min_lifetime: self.cfg.service_lifetime.0,
                max_lifetime: self.cfg.service_lifetime.1,
                reg_types: self.cfg.services.clone(),
            })?;
        }
        mac::add_signature2(&mut p, &self.id)?;
        gen.r1.insert((group, k), p.clone());
        Ok(p)
    }

    pub(crate) fn on_i1(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let me = self.id.hit();
        let peer = p.header.sender_hit;
        if !(p.header.receiver_hit == me || p.header.receiver_hit.is_null()) {
            return Err(Error::Unexpected("I1 for another HIT"));
        }
        let list: DhGroupList = p.get()?.ok_or(Error::Missing(ty::DH_GROUP_LIST))?;
        self.responder.note_i1(now);
        if let Some(a) = self.assocs.get(&peer) {
            // Simultaneous open (§6.7 step 3): the smaller HIT yields.
            if a.state == State::I1Sent && me < peer {
                return Err(Error::Unexpected("I1 in I1-SENT from a greater HIT"));
            }
        }
        let group = dh::select_group(&self.cfg.dh_groups, &list.0)
            .or_else(|| self.cfg.dh_groups.first().copied())
            .ok_or(Error::Negotiation("no DH groups configured"))?;
        // An I1 relayed by a rendezvous server we are registered with
        // (RFC 8004): check its RVS_HMAC and answer the Initiator directly.
        let mut reply_to = from;
        let mut via = None;
        if p.find(ty::FROM).is_some() {
            let keys = self
                .assocs
                .values()
                .find(|a| {
                    a.peer_addr == from && matches!(a.state, State::Established | State::R2Sent)
                })
                .and_then(|a| a.keys.as_ref())
                .ok_or(Error::Unexpected(
                    "relayed I1 from an unknown rendezvous server",
                ))?;
            let ip = crate::rvs::verify_relayed_i1(p, keys.rhash, &keys.hip.peer_mac)?;
            reply_to = SocketAddr::new(ip, self.cfg.udp_port);
            via = Some(from.ip());
        }
        let k = self.responder.k(&self.cfg.puzzle);
        let mut r1 = self.r1_template(group, k)?;
        r1.header.receiver_hit = peer;
        self.responder.opaque_counter = self.responder.opaque_counter.wrapping_add(1);
        let opaque = self.responder.opaque_counter.to_be_bytes();
        let i = puzzle_i(
            self.id.suite(),
            &self.responder.current.secret,
            &peer,
            &me,
            opaque,
            k,
        );
        r1.remove(ty::PUZZLE);
        r1.add(&Puzzle {
            k,
            lifetime: self.cfg.puzzle.lifetime,
            opaque,
            i,
        })?;
        if let Some(rvs) = via {
            crate::rvs::add_via_rvs(&mut r1, &[rvs])?;
        }
        Ok(vec![Output::Send {
            to: reply_to,
            packet: r1,
        }])
    }

    pub(crate) fn on_i2(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let me = self.id.hit();
        let peer = p.header.sender_hit;
        if p.header.receiver_hit != me {
            return Err(Error::Unexpected("I2 for another HIT"));
        }
        HitSuite::of_hit(&peer)?;
        let sol: Solution = p.get()?.ok_or(Error::Missing(ty::SOLUTION))?;
        if let Some(a) = self.assocs.get(&peer) {
            match a.state {
                // A retransmitted (or replayed) I2 that built the current
                // association: resend its R2 and change nothing, so a replay
                // cannot reset SPIs (§6.9 step 4).
                State::R2Sent | State::Established
                    if a.i2_solution.as_deref() == Some(&sol.j[..]) =>
                {
                    if let Some(r2) = &a.r2 {
                        return Ok(vec![Output::Send {
                            to: from,
                            packet: r2.clone(),
                        }]);
                    }
                }
                State::I2Sent if me < peer => {
                    return Err(Error::Unexpected("I2 in I2-SENT from a greater HIT"));
                }
                _ => {}
            }
        }
        // Which generation issued the puzzle.
        let counter: Option<R1Counter> = p.get()?;
        let gen = match counter.map(|c| c.counter) {
            None => &self.responder.current,
            Some(c) if c == self.responder.current.counter => &self.responder.current,
            Some(c) => self
                .responder
                .previous
                .as_ref()
                .filter(|g| g.counter == c)
                .ok_or(Error::Unexpected("stale R1 generation"))?,
        };
        let suite = self.id.suite();
        let rhash = suite.rhash();
        let want_i = puzzle_i(suite, &gen.secret, &peer, &me, sol.opaque, sol.k);
        if want_i != sol.i || sol.k < self.cfg.puzzle.k_base {
            return Err(CryptoError::Puzzle.into());
        }
        if !puzzle::verify(rhash, &sol.i, &peer, &me, &sol.j, sol.k) {
            return Err(CryptoError::Puzzle.into());
        }
        let dhp: DiffieHellman = p.get()?.ok_or(Error::Missing(ty::DIFFIE_HELLMAN))?;
        let our_dh = gen
            .dh
            .get(&dhp.group)
            .ok_or(CryptoError::DhGroup(dhp.group))?;
        let kij = our_dh.shared(&dhp.public)?;
        let hc: HipCipher = p.get()?.ok_or(Error::Missing(ty::HIP_CIPHER))?;
        let cipher_id = match hc.0.as_slice() {
            [c] if self.cfg.ciphers.contains(c) => *c,
            _ => return Err(Error::Negotiation("I2 HIP_CIPHER not one we offered")),
        };
        let tfl: TransportFormatList = p.get()?.ok_or(Error::Missing(ty::TRANSPORT_FORMAT_LIST))?;
        if tfl.0.first() != Some(&ty::ESP_TRANSFORM) {
            return Err(Error::Negotiation(
                "only the ESP transport format is supported",
            ));
        }
        let et: EspTransform = p.get()?.ok_or(Error::Missing(ty::ESP_TRANSFORM))?;
        let esp_suite = match et.0.as_slice() {
            [s] if self.cfg.esp_suites.contains(s) => *s,
            _ => return Err(Error::Negotiation("I2 ESP_TRANSFORM not one we offered")),
        };
        let esp_info: EspInfo = p.get()?.ok_or(Error::Missing(ty::ESP_INFO))?;

        let km = keymat::derive(rhash, &kij, &peer, &me, &sol.i, &sol.j, KEYMAT_LEN)?;
        let we_are_greater = me > peer;
        let mut d = Drawer::new(&km);
        let hip = HipKeys::draw(
            &mut d,
            cipher::key_len(cipher_id)?,
            rhash.len(),
            we_are_greater,
        )?;
        let esp_keymat_index = d.index();

        // The Initiator's HOST_ID, in clear or in ENCRYPTED.
        let host_id_raw = match p.find(ty::HOST_ID) {
            Some(raw) => raw.clone(),
            None => {
                let enc: Encrypted = p.get()?.ok_or(Error::Missing(ty::HOST_ID))?;
                let plain = cipher::decrypt(cipher_id, &hip.peer_enc, &enc.iv_and_data)?;
                first_param(&plain).ok_or(CryptoError::Decrypt)?
            }
        };
        if host_id_raw.ty() != ty::HOST_ID {
            return Err(CryptoError::Decrypt.into());
        }
        let peer_id = PeerIdentity::from_param(&host_id_raw.body()?)?;
        if peer_id.hit() != peer {
            return Err(Error::HitMismatch);
        }
        mac::verify_mac(p, rhash, &hip.peer_mac)?;
        mac::verify_signature(p, &peer_id)?;

        // Accepted: build state and R2 (§6.9 steps 18-21).
        let our_spi = random_spi();
        let keys = AssociationKeys {
            peer_hit: peer,
            rhash,
            cipher: cipher_id,
            hip: hip.clone(),
            keymat: km,
            esp_keymat_index,
            esp_suite,
            our_spi,
            peer_spi: esp_info.new_spi,
            we_are_greater,
        };
        let mut r2 = Packet::new(PacketType::R2, me, peer);
        r2.add(&EspInfo {
            keymat_index: esp_keymat_index as u16,
            old_spi: 0,
            new_spi: our_spi,
        })?;
        // Registration (RFC 8003 §3.3): grant what we offer, refuse the rest
        // with failure type 1 (registration type unavailable).
        let mut registration = None;
        if let Some(req) = p.get::<RegRequest>()? {
            // A cancellation in I2 has nothing to cancel.
            if req.lifetime != 0 {
                let (granted, params) = super::registration::decide(&self.cfg, now, &req, None)?;
                registration = granted;
                for param in params {
                    r2.insert(param);
                }
            }
        }
        let our_host_id = RawParam::from_body(&self.id.host_id_param())?;
        mac::add_mac2(&mut r2, rhash, &hip.our_mac, &our_host_id)?;
        mac::add_signature(&mut r2, &self.id)?;

        let mut a = Association::new(peer, from);
        a.state = State::R2Sent;
        a.deadline = Some(now + self.cfg.ec_timeout);
        a.peer = Some(peer_id);
        a.peer_host_id = Some(host_id_raw);
        a.keys = Some(keys.clone());
        a.r2 = Some(r2.clone());
        a.i2_solution = Some(sol.j);
        a.registration = registration;
        self.assocs.insert(peer, a);
        Ok(vec![
            Output::Send {
                to: from,
                packet: r2,
            },
            Output::Established {
                peer,
                keys: Box::new(keys),
            },
        ])
    }
}

/// KEYMAT drawn per association: HIP keys, ESP keys, and room for rekeying.
pub(crate) const KEYMAT_LEN: usize = 1024;

/// Parses the first TLV of a decrypted ENCRYPTED payload; trailing cipher
/// padding is ignored.
pub(crate) fn first_param(plain: &[u8]) -> Option<RawParam> {
    if plain.len() < 4 {
        return None;
    }
    let t = u16::from_be_bytes([plain[0], plain[1]]);
    let len = usize::from(u16::from_be_bytes([plain[2], plain[3]]));
    let c = plain.get(4..4 + len)?;
    RawParam::new(t, c).ok()
}
