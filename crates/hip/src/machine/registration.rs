//! Registration (RFC 8003) after the base exchange, and registration
//! lifetimes on both ends: REG_REQUEST inside an UPDATE re-registers before
//! the granted lifetime ends, or cancels with lifetime 0; the registrar
//! answers with REG_RESPONSE / REG_FAILED in the UPDATE that ACKs it.
//!
//! ```text
//!  requester                                               registrar
//!   │ I2(REG_REQUEST{l, [1]}) ───────────────────────────►│ expires = now + 2^((l'-64)/8) s
//!   │◄──────────────────────────── R2(REG_RESPONSE{l', [1]})│
//!   │       ... half of the granted lifetime later ...      │
//!   │ UPDATE(REG_REQUEST{l, [1]}, SEQ=x) ─────────────────►│ refreshed: expires moves on
//!   │◄──────────────── UPDATE(ACK=x, REG_RESPONSE{l', [1]}) │ (answer kept: a retransmitted
//!   │                                                       │  request gets it again, unchanged)
//!   │ UPDATE(REG_REQUEST{0, [1]}, SEQ=y) ─────────────────►│ cancelled: no more relaying
//!   │◄──────────────── UPDATE(ACK=y, REG_RESPONSE{0, [1]})  │
//!                          no refresh before `expires`: the registrar drops it
//!                          (Output::RegistrationExpired)
//! ```
//!
//! The request is an ordinary UPDATE with SEQ: retransmitted until ACKed
//! and, like every UPDATE here, never sent while another is outstanding
//! (it waits for that one's ACK). All types of one association share the
//! lifetime of the latest grant: roam only uses rendezvous (type 1).
//!
//! A registrar that restarted has lost our registration and our
//! association: it cannot even check the HIP_MAC of our renewal, so it
//! never answers. When our grant runs out with the renewal unanswered,
//! the association is dropped and a new base exchange asks again in I2;
//! one that fails is retried after [`Config::reregister_backoff`], doubled
//! per failure up to [`Config::reregister_backoff_max`]:
//!
//! ```text
//!   granted ── renewal unanswered past `expires` ──► RegistrationLapsed, Closed
//!      ▲                                              │ (association dropped)
//!      │                                              ▼
//!   R2(REG_RESPONSE) ◄── I1 … I2(REG_REQUEST) ◄── now, then backoff
//!                                                 2 s, 4 s, … 300 s after failures
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Association, Config, Host, Output, State};
use crate::error::Error;
use crate::wire::params::{
    reg_lifetime, RegFailed, RegRequest, RegResponse, REG_FAILURE_TYPE_UNAVAILABLE,
};
use crate::wire::{Hit, Packet, PacketType, RawParam};

/// A registration in force: on the registrar, the peer's with us; on the
/// requester, ours with the peer (then `expires` is by our clock, later than
/// the registrar's by the answer's one-way delay, which the refresh at half
/// the lifetime absorbs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Granted {
    pub types: Vec<u8>,
    pub lifetime: u8,
    pub expires: Instant,
}

/// What we want from a registrar (requester side).
#[derive(Clone, Debug, Default)]
pub(crate) struct Requested {
    /// Types to ask for; types the registrar refused are taken out.
    pub types: Vec<u8>,
    /// Lifetime value to ask for; 0 asks for cancellation.
    pub lifetime: u8,
    pub granted: Option<Granted>,
    /// When to send the next REG_REQUEST in an UPDATE.
    pub due: Option<Instant>,
    /// Update ID of the UPDATE carrying our REG_REQUEST, until ACKed.
    pub in_flight: Option<u32>,
}

impl Requested {
    pub fn new(types: Vec<u8>, lifetime: u8) -> Self {
        Requested {
            types,
            lifetime,
            ..Default::default()
        }
    }

    fn param(&self) -> RegRequest {
        RegRequest {
            lifetime: self.lifetime,
            reg_types: self.types.clone(),
        }
    }
}

/// The registrar's decision on `req` (RFC 8003 §3.3), given the peer's
/// current registration: the registration from now on and the REG_RESPONSE
/// / REG_FAILED parameters that answer it. Types we do not offer fail with
/// "registration type unavailable"; a lifetime outside ours is clamped.
pub(crate) fn decide(
    cfg: &Config,
    now: Instant,
    req: &RegRequest,
    current: Option<&Granted>,
) -> Result<(Option<Granted>, Vec<RawParam>), Error> {
    let mut ok: Vec<u8> = Vec::new();
    let mut refused: Vec<u8> = Vec::new();
    for t in &req.reg_types {
        let list = if cfg.services.contains(t) {
            &mut ok
        } else {
            &mut refused
        };
        if !list.contains(t) {
            list.push(*t);
        }
    }
    let mut params = Vec::new();
    let next = if req.lifetime == 0 {
        // Cancelling a type that is not registered is answered the same
        // way: the requester only needs to know it is not registered.
        if !ok.is_empty() {
            params.push(RawParam::from_body(&RegResponse {
                lifetime: 0,
                reg_types: ok.clone(),
            })?);
        }
        current.and_then(|g| {
            let types: Vec<u8> = g
                .types
                .iter()
                .filter(|t| !ok.contains(t))
                .copied()
                .collect();
            (!types.is_empty()).then(|| Granted { types, ..g.clone() })
        })
    } else if ok.is_empty() {
        current.cloned()
    } else {
        let (lo, hi) = cfg.service_lifetime;
        // At least 1: a 0 here would read as a cancellation.
        let lifetime = req.lifetime.clamp(lo, hi.max(lo)).max(1);
        let span = reg_lifetime(lifetime).ok_or(Error::Unexpected("lifetime 0"))?;
        params.push(RawParam::from_body(&RegResponse {
            lifetime,
            reg_types: ok.clone(),
        })?);
        let mut types = current.map(|g| g.types.clone()).unwrap_or_default();
        types.extend(ok.iter().filter(|t| !types.contains(t)).collect::<Vec<_>>());
        Some(Granted {
            types,
            lifetime,
            expires: now + span,
        })
    };
    if !refused.is_empty() {
        params.push(RawParam::from_body(&RegFailed {
            lifetime: 0,
            failure_type: REG_FAILURE_TYPE_UNAVAILABLE,
            reg_types: refused,
        })?);
    }
    Ok((next, params))
}

/// Our REG_REQUEST went out in the UPDATE `id`: no longer due, waiting for
/// the answer.
pub(crate) fn reg_request_sent(a: &mut Association, id: u32) {
    if let Some(r) = a.requested.as_mut() {
        r.due = None;
        r.in_flight = Some(id);
    }
}

/// Whether an UPDATE of ours may go out now: one outstanding at a time,
/// and not in the middle of a rekey.
fn can_update(a: &Association) -> bool {
    matches!(a.state, State::Established | State::R2Sent)
        && a.update_pending.is_none()
        && a.rekey.is_none()
}

/// When `poll` has registration work on `a`: an expiry on either side, or
/// a request that can go out.
pub(crate) fn next_deadline(a: &Association) -> Option<Instant> {
    let ours = a.requested.as_ref().and_then(|r| {
        let due = r.due.filter(|_| can_update(a));
        let lapse = r.granted.as_ref().map(|g| g.expires);
        due.into_iter().chain(lapse).min()
    });
    let theirs = a.registration.as_ref().map(|g| g.expires);
    ours.into_iter().chain(theirs).min()
}

/// A registrar we lost (our grant lapsed with the renewal unanswered) and
/// register with again in a new base exchange.
#[derive(Clone, Debug)]
pub(crate) struct Reregister {
    pub addr: SocketAddr,
    pub types: Vec<u8>,
    pub lifetime: u8,
    /// Base exchanges that ended without an association, in a row.
    pub failures: u32,
    /// When to start the next base exchange; `None` while one runs.
    pub next: Option<Instant>,
}

/// How long to wait after `failures` failed base exchanges in a row.
fn backoff(cfg: &Config, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    cfg.reregister_backoff
        .saturating_mul(1 << doublings)
        .min(cfg.reregister_backoff_max)
}

/// Expiry on both sides (no packets): the peer's registration with us
/// ends, or ours with the peer lapses. Returns true if ours lapsed while we
/// still want it: the caller drops the association and registers again in
/// a new base exchange.
///
/// Why the lapse, and not the renewal UPDATE running out of retransmissions
/// (RFC 7401 leaves what follows that to the host; `update_given_up` only
/// asks again): the lifetime is what the registrar promised (RFC 8003).
/// Until it ends, a registrar that is merely unreachable still holds our
/// registration and relays for us, and a new base exchange would replace a
/// working association over a passing loss. Once it ends with no renewal
/// answered, the registration is gone at the registrar whatever happened
/// there (its clock started before ours), the association carries nothing
/// worth keeping, and after a restart only a new base exchange can get it
/// back. It also scales with the lifetime asked for, where the
/// retransmission limit (about 31 s by default) outlasts short lifetimes
/// and comes long before long ones end. The price: a host may be
/// unreachable through a restarted registrar for up to one lifetime.
pub(crate) fn poll_expiry(a: &mut Association, now: Instant, out: &mut Vec<Output>) -> bool {
    if let Some(g) = a.registration.take_if(|g| now >= g.expires) {
        // A retransmitted request must not be answered with the grant
        // that just ended.
        a.reg_answer = None;
        out.push(Output::RegistrationExpired {
            peer: a.peer_hit,
            types: g.types,
        });
    }
    let Some(r) = a.requested.as_mut() else {
        return false;
    };
    if let Some(g) = r.granted.take_if(|g| now >= g.expires) {
        out.push(Output::RegistrationLapsed {
            peer: a.peer_hit,
            types: g.types,
        });
        // A renewal was due at half the lifetime: reaching the end means it
        // went unanswered (or never got out, behind another unanswered
        // UPDATE).
        if r.lifetime > 0 && !r.types.is_empty() {
            return true;
        }
        if r.in_flight.is_none() {
            a.requested = None;
        }
    }
    false
}

/// Our UPDATE `id` went unanswered through every retransmission.
pub(crate) fn update_given_up(a: &mut Association, id: u32, now: Instant) {
    let Some(r) = a.requested.as_mut().filter(|r| r.in_flight == Some(id)) else {
        return;
    };
    r.in_flight = None;
    if r.lifetime > 0 && !r.types.is_empty() {
        // Keep asking while the association lasts: the registrar may have
        // been briefly unreachable, and a lapsed registration means no
        // relaying.
        r.due = Some(now);
    } else if r.granted.is_none() {
        a.requested = None;
    } else {
        // An unconfirmed cancellation: the registration ends at the
        // registrar when its lifetime does.
        r.types.clear();
    }
}

impl Host {
    /// Asks the registrar `peer` (an established association) for `types`
    /// with about `lifetime` (RFC 8003 encoding, see
    /// [`reg_lifetime_value`](crate::wire::params::reg_lifetime_value); 0
    /// cancels) in an UPDATE, retransmitted until ACKed. From then on the
    /// registration is renewed at half of every granted lifetime, until it
    /// is cancelled. If another UPDATE is outstanding, the request goes out
    /// once that one is ACKed (returns no packet now).
    pub fn register(
        &mut self,
        now: Instant,
        peer: Hit,
        types: Vec<u8>,
        lifetime: u8,
    ) -> Result<Vec<Output>, Error> {
        let a = self
            .assocs
            .get_mut(&peer)
            .filter(|a| matches!(a.state, State::Established | State::R2Sent))
            .ok_or(Error::Unexpected(
                "registration needs an established association",
            ))?;
        if types.is_empty() {
            return Err(Error::Unexpected("registration without a type"));
        }
        let r = a.requested.get_or_insert_with(Default::default);
        r.types = types;
        r.lifetime = lifetime;
        r.due = Some(now);
        Ok(self.send_reg_request(now, peer)?.into_iter().collect())
    }

    /// Cancels our registration with `peer` (REG_REQUEST with lifetime 0
    /// for the types we hold or asked for). While registering again after
    /// a lapse, stops doing so instead (nothing to cancel at the registrar;
    /// an I2 already sent may still register, and that lapses unrenewed).
    pub fn cancel_registration(&mut self, now: Instant, peer: Hit) -> Result<Vec<Output>, Error> {
        if self.reregistering(&peer) {
            self.reregister.remove(&peer);
            if let Some(a) = self.assocs.get_mut(&peer) {
                a.requested = None;
            }
            return Ok(Vec::new());
        }
        let types = self
            .assocs
            .get(&peer)
            .and_then(|a| a.requested.as_ref())
            .map(|r| {
                let mut t = r.types.clone();
                for g in r.granted.iter().flat_map(|g| &g.types) {
                    if !t.contains(g) {
                        t.push(*g);
                    }
                }
                t
            })
            .filter(|t| !t.is_empty())
            .ok_or(Error::Unexpected("not registered with this peer"))?;
        self.register(now, peer, types, 0)
    }

    /// What the registrar `peer` granted us: types and lifetime value.
    pub fn registered_with(&self, peer: &Hit) -> Option<(Vec<u8>, u8)> {
        let g = self
            .assocs
            .get(peer)?
            .requested
            .as_ref()?
            .granted
            .as_ref()?;
        Some((g.types.clone(), g.lifetime))
    }

    /// Peers registered with us as a registrar, with the granted types and
    /// lifetime (a rendezvous server relays I1s for these HITs).
    pub fn registrations(&self) -> Vec<(Hit, Vec<u8>, u8)> {
        self.assocs
            .values()
            .filter(|a| matches!(a.state, State::R2Sent | State::Established))
            .filter_map(|a| {
                a.registration
                    .as_ref()
                    .map(|g| (a.peer_hit, g.types.clone(), g.lifetime))
            })
            .collect()
    }

    /// Sends the REG_REQUEST UPDATE to `peer` if one is due and no other
    /// UPDATE is outstanding.
    pub(crate) fn send_reg_request(
        &mut self,
        now: Instant,
        peer: Hit,
    ) -> Result<Option<Output>, Error> {
        let Some(a) = self.assocs.get(&peer) else {
            return Ok(None);
        };
        let Some(r) = a
            .requested
            .as_ref()
            .filter(|r| r.due.is_some_and(|d| now >= d))
        else {
            return Ok(None);
        };
        if !can_update(a) {
            return Ok(None);
        }
        let mut p = Packet::new(PacketType::Update, self.id.hit(), peer);
        p.add(&r.param())?;
        let (id, packet, a) = self.send_update(now, peer, p)?;
        reg_request_sent(a, id);
        Ok(Some(Output::Send {
            to: a.peer_addr,
            packet,
        }))
    }

    /// Adds our pending REG_REQUEST to an UPDATE we are about to send for
    /// another reason (a new locator): one UPDATE instead of two, and the
    /// one it replaces as outstanding is not lost. Returns whether it did;
    /// then [`reg_request_sent`] once the UPDATE has its ID.
    pub(crate) fn piggyback_reg_request(&self, now: Instant, peer: &Hit, p: &mut Packet) -> bool {
        let Some(r) = self.assocs.get(peer).and_then(|a| a.requested.as_ref()) else {
            return false;
        };
        let waiting = r.due.is_some_and(|d| now >= d) || r.in_flight.is_some();
        if !waiting || r.types.is_empty() {
            return false;
        }
        p.add(&r.param()).is_ok()
    }

    /// Whether we are registering with `peer` again after our registration
    /// lapsed unanswered: a new base exchange runs or waits out its backoff.
    /// A caller with retries of its own leaves `peer` alone meanwhile.
    pub fn reregistering(&self, peer: &Hit) -> bool {
        self.reregister.contains_key(peer)
            && !matches!(self.state(peer), State::Established | State::R2Sent)
    }

    /// Our registration with `peer` lapsed unanswered: drop the association
    /// (the registrar lost it, or will not answer on it) and register again
    /// in a new base exchange, started by [`Host::poll_reregister`] at once.
    pub(crate) fn drop_lapsed_registrar(&mut self, now: Instant, peer: Hit, out: &mut Vec<Output>) {
        let Some(a) = self.assocs.remove(&peer) else {
            return;
        };
        out.push(Output::Closed { peer });
        let Some(r) = a.requested else {
            return;
        };
        self.reregister.insert(
            peer,
            Reregister {
                addr: a.peer_addr,
                types: r.types,
                lifetime: r.lifetime,
                failures: 0,
                next: Some(now),
            },
        );
    }

    /// New base exchanges with registrars we lost: started when due, and
    /// after one that ended without an association, scheduled after the
    /// backoff. Done once the association is up (the registration in it
    /// then follows the usual rules).
    pub(crate) fn poll_reregister(&mut self, now: Instant, out: &mut Vec<Output>) {
        let peers: Vec<Hit> = self.reregister.keys().copied().collect();
        for peer in peers {
            let state = self.state(&peer);
            let Some(j) = self.reregister.get_mut(&peer) else {
                continue;
            };
            match state {
                State::Established | State::R2Sent => {
                    self.reregister.remove(&peer);
                    continue;
                }
                // Ours, or one the caller started: wait for its end.
                State::I1Sent | State::I2Sent => {
                    j.next = None;
                    continue;
                }
                _ => {}
            }
            match j.next {
                None => {
                    j.failures = j.failures.saturating_add(1);
                    j.next = Some(now + backoff(&self.cfg, j.failures));
                }
                Some(t) if now >= t => {
                    j.next = None;
                    let (addr, types, lifetime) = (j.addr, j.types.clone(), j.lifetime);
                    match self.connect_and_register(now, peer, addr, types, lifetime) {
                        Ok(o) => out.extend(o),
                        // Only encoding can fail, and would again.
                        Err(_) => {
                            self.reregister.remove(&peer);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Registration requests whose time has come (renewals, requests that
    /// waited for another UPDATE's ACK).
    pub(crate) fn poll_reg_requests(&mut self, now: Instant, out: &mut Vec<Output>) {
        let due: Vec<Hit> = self
            .assocs
            .values()
            .filter(|a| {
                can_update(a)
                    && a.requested
                        .as_ref()
                        .is_some_and(|r| r.due.is_some_and(|d| now >= d))
            })
            .map(|a| a.peer_hit)
            .collect();
        for peer in due {
            match self.send_reg_request(now, peer) {
                Ok(o) => out.extend(o),
                // Only signing can fail here; the next poll would fail
                // the same way, so stop asking.
                Err(_) => {
                    if let Some(a) = self.assocs.get_mut(&peer) {
                        a.requested = None;
                    }
                }
            }
        }
    }

    /// Registrar: the REG_REQUEST in the peer's UPDATE `seq` (`fresh`: not
    /// seen before). Returns what the ACKing UPDATE carries and the event to
    /// report; a retransmitted request gets the same answer again without
    /// changing anything.
    pub(crate) fn on_reg_request(
        &mut self,
        now: Instant,
        peer: Hit,
        seq: u32,
        fresh: bool,
        p: &Packet,
    ) -> Result<(Vec<RawParam>, Option<Output>), Error> {
        let a = self
            .assocs
            .get(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        if !fresh {
            let again = match &a.reg_answer {
                Some((id, params)) if *id == seq => params.clone(),
                _ => Vec::new(),
            };
            return Ok((again, None));
        }
        let Some(req) = p.get::<RegRequest>()? else {
            return Ok((Vec::new(), None));
        };
        let (next, params) = decide(&self.cfg, now, &req, a.registration.as_ref())?;
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        a.registration = next;
        a.reg_answer = Some((seq, params.clone()));
        let lifetime = if req.lifetime == 0 {
            0
        } else {
            a.registration.as_ref().map_or(0, |g| g.lifetime)
        };
        let types: Vec<u8> = req
            .reg_types
            .iter()
            .filter(|t| self.cfg.services.contains(t))
            .copied()
            .collect();
        let event = (!types.is_empty()).then_some(Output::Registered {
            peer,
            types,
            lifetime,
        });
        Ok((params, event))
    }

    /// Requester: the registrar ACKed our UPDATE `id`. If it carried our
    /// REG_REQUEST, take in the REG_RESPONSE / REG_FAILED beside the ACK.
    pub(crate) fn on_reg_answer(
        &mut self,
        now: Instant,
        peer: Hit,
        id: u32,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        let Some(a) = self.assocs.get_mut(&peer) else {
            return Ok(Vec::new());
        };
        let Some(r) = a.requested.as_mut().filter(|r| r.in_flight == Some(id)) else {
            return Ok(Vec::new());
        };
        r.in_flight = None;
        let resp: Option<RegResponse> = p.get()?;
        let failed: Option<RegFailed> = p.get()?;
        let asked = r.types.clone();
        let (granted, lifetime) = resp.map_or((Vec::new(), 0), |g| (g.reg_types, g.lifetime));
        let failed = match failed {
            Some(f) => f.reg_types,
            // ACKed without any answer: the registrar does not take
            // REG_REQUEST in UPDATE. Stop asking; what we hold lapses at
            // its end.
            None if granted.is_empty() => asked,
            None => Vec::new(),
        };
        r.types.retain(|t| !failed.contains(t));
        match reg_lifetime(lifetime) {
            Some(span) if !granted.is_empty() => {
                r.granted = Some(Granted {
                    types: granted.clone(),
                    lifetime,
                    expires: now + span,
                });
                // A request made while this one was in flight stays due.
                if r.due.is_none() && r.lifetime > 0 {
                    r.due = Some(now + span / 2);
                }
            }
            None if !granted.is_empty() => {
                // Cancelled.
                if let Some(g) = r.granted.as_mut() {
                    g.types.retain(|t| !granted.contains(t));
                }
                r.granted = r.granted.take().filter(|g| !g.types.is_empty());
                if r.lifetime == 0 {
                    r.types.retain(|t| !granted.contains(t));
                }
            }
            _ => {}
        }
        if r.due.is_none() && r.granted.is_none() && (r.types.is_empty() || r.lifetime == 0) {
            a.requested = None;
        }
        Ok(vec![Output::Registration {
            peer,
            granted,
            failed,
            lifetime,
        }])
    }
}
