//! Return routability of a peer's new locator (RFC 8046 §5.4) with
//! credit-based authorisation (RFC 8046 §5.3.2, after RFC 4225 §3.2).
//!
//! A signed UPDATE proves *who* announced a locator, not that the locator
//! belongs to them: a peer could name a victim's address and have us flood
//! it. So a new locator starts UNVERIFIED; we send an UPDATE carrying
//! SEQ, ACK (of the peer's UPDATE) and ECHO_REQUEST_SIGNED with a fresh
//! nonce *to that locator*, and only a signed ECHO_RESPONSE_SIGNED with the
//! same nonce makes it ACTIVE.
//!
//! Meanwhile data may already go to the unverified locator, within a
//! credit: every byte of data received from the peer earns one byte of
//! credit, every byte sent to an unverified locator spends one, and the
//! credit decays by [`MobilityConfig::credit_aging_factor`] every
//! [`MobilityConfig::credit_aging_interval`]. A peer can therefore make us
//! send to an address it does not own at most as much as it recently sent
//! us itself (no amplification), while an honest peer's handover is not
//! delayed by the echo round trip. Data without credit is held by the
//! caller ([`DataPath::Hold`]) until the locator is verified.
//!
//! ```text
//!   peer                                          this host
//!    │ UPDATE(LOCATOR_SET, SEQ=n, MAC, SIG)           │
//!    ├───────────────────────────────────────────────►│ addr := new (UNVERIFIED)
//!    │ UPDATE(SEQ=m, ACK=n, ECHO_REQUEST_SIGNED(N))   │ data to new addr within credit
//!    │◄───────────────────────────────────────────────┤ (to the new addr, retransmitted)
//!    │ UPDATE(ACK=m, ECHO_RESPONSE_SIGNED(N))         │
//!    ├───────────────────────────────────────────────►│ N matches: ACTIVE, held data goes
//!                        no answer after the retries: │ back to the old addr (FAILED)
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};

use super::{Association, Host, Output, Retransmit};
use crate::error::Error;
use crate::wire::params::{Ack, EchoRequestSigned, LocatorAddr, LocatorSet};
use crate::wire::{Hit, Packet, PacketType, RawParam};

/// Length of the echo nonce: 128 bits, unguessable.
pub const NONCE_LEN: usize = 16;

/// Return-routability and credit tunables.
#[derive(Clone, Debug)]
pub struct MobilityConfig {
    /// Verify a new peer locator before trusting it (RFC 8046 §5.4). Off:
    /// switch at once, as before (tests and closed labs only).
    pub verify_locators: bool,
    /// Credit kept per aging interval, as numerator/denominator (RFC 8046
    /// suggests 7/8).
    pub credit_aging_factor: (u32, u32),
    /// How often the credit decays (RFC 8046 suggests 5 s).
    pub credit_aging_interval: Duration,
    /// Ceiling of the credit counter, in bytes.
    pub credit_max: u64,
}

impl Default for MobilityConfig {
    fn default() -> Self {
        MobilityConfig {
            verify_locators: true,
            credit_aging_factor: (7, 8),
            credit_aging_interval: Duration::from_secs(5),
            credit_max: 64 << 20,
        }
    }
}

/// State of the address we send a peer's data to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrState {
    /// Verified, or learnt in the base exchange.
    Active,
    /// Announced by the peer, echo outstanding: data only within credit.
    Unverified,
}

/// Where data for a peer goes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    Send(SocketAddr),
    /// The locator is unverified and the credit does not cover the packet:
    /// keep it until [`Output::PeerAddressVerified`] (or drop it).
    Hold,
    /// No association with this peer.
    NoAssociation,
}

/// Counters of return routability, for monitoring and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MobilityStats {
    /// Address verifications started (echo requests sent, not counting
    /// retransmissions).
    pub echo_requests: u64,
    /// Locators that became ACTIVE after a matching echo.
    pub verified: u64,
    /// Verifications that got no answer: we went back to the old address.
    pub failed: u64,
    /// Echo responses that did not match the outstanding nonce (dropped).
    pub echo_mismatch: u64,
    /// Data packets held for lack of credit.
    pub held: u64,
}

/// Credit counter with lazy aging (the clock starts at the first use, as
/// the machine reads no clock of its own).
#[derive(Clone, Debug, Default)]
pub(crate) struct Credit {
    bytes: u64,
    aged_at: Option<Instant>,
}

impl Credit {
    fn age(&mut self, now: Instant, cfg: &MobilityConfig) {
        let interval = cfg.credit_aging_interval;
        let Some(aged_at) = self.aged_at else {
            self.aged_at = Some(now);
            return;
        };
        if interval.is_zero() {
            return;
        }
        let elapsed = now.saturating_duration_since(aged_at);
        let steps = (elapsed.as_nanos() / interval.as_nanos()) as u64;
        if steps == 0 {
            return;
        }
        let (num, den) = cfg.credit_aging_factor;
        let (num, den) = (u64::from(num), u64::from(den.max(1)));
        // After ~400 steps of 7/8 any u64 is zero; stop early.
        for _ in 0..steps.min(512) {
            if self.bytes == 0 {
                break;
            }
            self.bytes = self.bytes / den * num + self.bytes % den * num / den;
        }
        self.aged_at = Some(if steps > 512 {
            self.bytes = 0;
            now
        } else {
            // Whole steps only, so the rest of an interval is not lost.
            aged_at + interval * steps as u32
        });
    }

    pub fn earn(&mut self, now: Instant, cfg: &MobilityConfig, n: usize) {
        self.age(now, cfg);
        self.bytes = self.bytes.saturating_add(n as u64).min(cfg.credit_max);
    }

    pub fn spend(&mut self, now: Instant, cfg: &MobilityConfig, n: usize) -> bool {
        self.age(now, cfg);
        match self.bytes.checked_sub(n as u64) {
            Some(left) => {
                self.bytes = left;
                true
            }
            None => false,
        }
    }

    pub fn balance(&mut self, now: Instant, cfg: &MobilityConfig) -> u64 {
        self.age(now, cfg);
        self.bytes
    }
}

/// An outstanding address check.
#[derive(Clone, Debug)]
pub(crate) struct Verification {
    pub addr: SocketAddr,
    /// The last ACTIVE address, where traffic returns if the check fails.
    pub previous: SocketAddr,
    pub nonce: Vec<u8>,
    /// Our Update ID of the UPDATE carrying the echo request.
    pub update_id: u32,
    pub retransmit: Retransmit,
}

/// The locator a LOCATOR_SET asks us to use: the first preferred one, else
/// the first; the port is the one the UPDATE came from (RFC 5770: locators
/// name addresses only).
pub fn chosen_locator(set: &LocatorSet, from: SocketAddr) -> Option<SocketAddr> {
    let l = set.0.iter().find(|l| l.preferred).or(set.0.first())?;
    match l.addr {
        LocatorAddr::Ip(a) | LocatorAddr::EspSpi { addr: a, .. } => {
            Some(SocketAddr::new(crate::rvs::from_v6(a), from.port()))
        }
        LocatorAddr::Other { .. } => None,
    }
}

pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Host {
    /// Return-routability counters.
    pub fn mobility_stats(&self) -> MobilityStats {
        self.mobility
    }

    /// Whether the address we send `peer`'s data to is verified.
    pub fn addr_state(&self, peer: &Hit) -> Option<AddrState> {
        self.assocs.get(peer).map(|a| a.addr_state)
    }

    /// Current credit of `peer` in bytes (after aging).
    pub fn credit(&mut self, now: Instant, peer: &Hit) -> Option<u64> {
        let cfg = &self.cfg.mobility;
        self.assocs
            .get_mut(peer)
            .map(|a| a.credit.balance(now, cfg))
    }

    /// `len` bytes of data from `peer` arrived (an ESP packet that
    /// verified): earns credit, and completes R2-SENT like
    /// [`Host::data_received`].
    pub fn inbound_data(&mut self, now: Instant, peer: &Hit, len: usize) {
        self.data_received(peer);
        let cfg = &self.cfg.mobility;
        if let Some(a) = self.assocs.get_mut(peer) {
            a.credit.earn(now, cfg, len);
        }
    }

    /// Where a data packet of `len` bytes for `peer` may go now. To an
    /// unverified locator this spends credit, and says
    /// [`DataPath::Hold`] when there is not enough.
    pub fn outbound_data(&mut self, now: Instant, peer: &Hit, len: usize) -> DataPath {
        let cfg = &self.cfg.mobility;
        let Some(a) = self.assocs.get_mut(peer) else {
            return DataPath::NoAssociation;
        };
        match a.addr_state {
            AddrState::Active => DataPath::Send(a.peer_addr),
            AddrState::Unverified => {
                if a.credit.spend(now, cfg, len) {
                    DataPath::Send(a.peer_addr)
                } else {
                    self.mobility.held += 1;
                    DataPath::Hold
                }
            }
        }
    }

    /// The signed reply to a peer's UPDATE with SEQ `peer_seq`: ACK, the
    /// `answers` to what it asked (ECHO_RESPONSE_SIGNED, REG_RESPONSE /
    /// REG_FAILED), and, when `set` (a fresh
    /// LOCATOR_SET) names a locator other than where we send, the switch to
    /// it with an address check (SEQ + ECHO_REQUEST_SIGNED, sent to the new
    /// locator and retransmitted). Returns the packet and where it goes.
    pub(crate) fn update_reply(
        &mut self,
        now: Instant,
        peer: Hit,
        from: SocketAddr,
        peer_seq: u32,
        set: Option<&LocatorSet>,
        answers: Vec<RawParam>,
    ) -> Result<(Packet, SocketAddr), Error> {
        let mut reply = Packet::new(PacketType::Update, self.id.hit(), peer);
        reply.add(&Ack(vec![peer_seq]))?;
        for param in answers {
            reply.insert(param);
        }
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        let Some(addr) = set.and_then(|s| chosen_locator(s, from)) else {
            return Ok((self.signed_with_mac(&peer, reply)?, from));
        };
        let checking = a.verification.as_ref().map(|v| v.addr);
        if addr == a.peer_addr && (a.addr_state == AddrState::Active || checking == Some(addr)) {
            return Ok((self.signed_with_mac(&peer, reply)?, from));
        }
        if !self.cfg.mobility.verify_locators {
            a.peer_addr = addr;
            a.addr_state = AddrState::Active;
            a.verification = None;
            return Ok((self.signed_with_mac(&peer, reply)?, from));
        }
        let mut nonce = vec![0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        reply.add(&EchoRequestSigned(nonce.clone()))?;
        // Retransmitted on its own: the address check, not the outstanding
        // UPDATE.
        let (update_id, reply, retransmit) = self.sequenced_update(now, peer, reply)?;
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        // A check replaced by a newer locator keeps the last ACTIVE address
        // as the fallback.
        let previous = match &a.verification {
            Some(v) => v.previous,
            None => a.peer_addr,
        };
        a.verification = Some(Verification {
            addr,
            previous,
            nonce,
            update_id,
            retransmit,
        });
        a.peer_addr = addr;
        a.addr_state = AddrState::Unverified;
        self.mobility.echo_requests += 1;
        Ok((reply, addr))
    }

    /// Checks an UPDATE's ACK against the outstanding address check.
    /// `Ok(Some(..))`: it answered the check correctly; `Ok(None)`: it is
    /// not about the check; `Err`: it acknowledges the check with a missing
    /// or wrong nonce (dropped and counted, nothing changes).
    pub(crate) fn echo_answer(
        &mut self,
        peer: &Hit,
        ack: Option<&Ack>,
        echo: Option<&[u8]>,
    ) -> Result<Option<SocketAddr>, Error> {
        let Some(a) = self.assocs.get(peer) else {
            return Ok(None);
        };
        let (Some(v), Some(ack)) = (&a.verification, ack) else {
            return Ok(None);
        };
        if !ack.0.contains(&v.update_id) {
            return Ok(None);
        }
        match echo {
            Some(n) if ct_eq(n, &v.nonce) => Ok(Some(v.addr)),
            _ => {
                self.mobility.echo_mismatch += 1;
                Err(Error::Unexpected(
                    "echo response does not match the address check",
                ))
            }
        }
    }

    /// The check succeeded: the locator is ACTIVE.
    pub(crate) fn address_verified(&mut self, peer: Hit, addr: SocketAddr) -> Option<Output> {
        let a = self.assocs.get_mut(&peer)?;
        a.verification = None;
        if a.peer_addr != addr {
            return None;
        }
        a.addr_state = AddrState::Active;
        self.mobility.verified += 1;
        Some(Output::PeerAddressVerified { peer, addr })
    }
}

/// Drives the retransmission of an association's address check; gives up
/// after `retries_max` and returns to the previous address.
pub(crate) fn poll_verification(
    a: &mut Association,
    now: Instant,
    retries_max: u32,
    stats: &mut MobilityStats,
    out: &mut Vec<Output>,
) {
    let Some(v) = a.verification.as_mut() else {
        return;
    };
    let r = &mut v.retransmit;
    if now < r.next {
        return;
    }
    if r.tries >= retries_max {
        let (addr, previous) = (v.addr, v.previous);
        a.verification = None;
        a.peer_addr = previous;
        a.addr_state = AddrState::Active;
        stats.failed += 1;
        out.push(Output::PeerAddressFailed {
            peer: a.peer_hit,
            addr,
            fallback: previous,
        });
        return;
    }
    r.tries += 1;
    r.interval *= 2;
    r.next = now + r.interval;
    out.push(Output::Send {
        to: v.addr,
        packet: r.packet.clone(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_ages_by_seven_eighths_per_interval() {
        let cfg = MobilityConfig::default();
        let t0 = Instant::now();
        let mut c = Credit::default();
        c.earn(t0, &cfg, 8000);
        assert_eq!(c.balance(t0 + Duration::from_secs(4), &cfg), 8000);
        assert_eq!(c.balance(t0 + Duration::from_secs(5), &cfg), 7000);
        assert_eq!(c.balance(t0 + Duration::from_secs(11), &cfg), 6125);
        assert!(!c.spend(t0 + Duration::from_secs(11), &cfg, 6126));
        assert!(c.spend(t0 + Duration::from_secs(11), &cfg, 6125));
        c.earn(t0 + Duration::from_secs(12), &cfg, 100);
        assert_eq!(c.balance(t0 + Duration::from_secs(3600), &cfg), 0);
        let mut big = Credit::default();
        big.earn(t0, &cfg, usize::MAX);
        assert_eq!(big.balance(t0, &cfg), cfg.credit_max);
    }
}
