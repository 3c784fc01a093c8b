//! The HIP state machine (RFC 7401 §4.4, §6), pure: events and packets plus
//! the current time go in, packets to send and association events come out.
//! Nothing here reads a clock or touches a socket.
//!
//! ```text
//!   connect() ──► I1 ─────────────────────────► (stateless) R1 from cache
//!   R1 ──► verify SIG2, check DH/HIT suite, solve puzzle, DH, KEYMAT ──► I2
//!   I2 ──► check #I/#J, DH, KEYMAT, decrypt HOST_ID, MAC, SIG ──► R2, state
//!   R2 ──► MAC_2, SIG ──► ESTABLISHED
//!   poll(now) ──► retransmissions, EC/CLOSED timers, puzzle secret rotation
//! ```
//!
//! One [`Host`] serves one local identity and all its peers; associations
//! are keyed by the peer HIT (one association per HIT pair, §6).

mod close;
mod initiator;
mod mobility;
mod persist;
mod registration;
mod rekey;
mod responder;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::crypto::keymat::HipKeys;
use crate::crypto::{cipher, dh};
use crate::error::Error;
use crate::identity::{HostIdentity, PeerIdentity, Rhash};
use crate::wire::params::{LocatorSet, Notification, Seq};
use crate::wire::{Hit, Packet, RawParam};

pub use mobility::{chosen_locator, AddrState, DataPath, MobilityConfig, MobilityStats};
pub use responder::PuzzleConfig;

/// ESP transform suite 8: AES-128-CBC with HMAC-SHA-256 (RFC 7402 §5.1.2).
pub const ESP_SUITE_AES128_CBC_SHA256: u16 = 8;

/// Association states (RFC 7401 §4.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Unassociated,
    I1Sent,
    I2Sent,
    R2Sent,
    Established,
    Closing,
    Closed,
    EFailed,
}

/// Tunables. Defaults follow the RFC's suggestions where it has them.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our DH groups, most preferred first.
    pub dh_groups: Vec<u8>,
    /// HIP_CIPHER IDs we offer/accept, most preferred first.
    pub ciphers: Vec<u16>,
    /// ESP transform suites we offer/accept.
    pub esp_suites: Vec<u16>,
    /// Encrypt our HOST_ID in I2 (needs a non-NULL cipher).
    pub encrypt_host_id: bool,
    /// First retransmission timeout for I1, I2, CLOSE; doubled each time.
    pub retransmit_initial: Duration,
    /// I1_RETRIES_MAX / I2_RETRIES_MAX.
    pub retries_max: u32,
    /// Exchange Complete: R2-SENT becomes ESTABLISHED after this.
    pub ec_timeout: Duration,
    /// Unused Association Lifetime plus MSL: how long CLOSING retries.
    pub close_timeout: Duration,
    /// How long CLOSED and E-FAILED state is kept.
    pub state_hold: Duration,
    pub puzzle: PuzzleConfig,
    /// Registration types we grant as a registrar (RFC 8003), e.g.
    /// [`REG_TYPE_RENDEZVOUS`](crate::wire::params::REG_TYPE_RENDEZVOUS);
    /// empty means R1 carries no REG_INFO.
    pub services: Vec<u8>,
    /// Minimum and maximum registration lifetime we grant (RFC 8003
    /// encoding: 2^((v - 64) / 8) seconds).
    pub service_lifetime: (u8, u8),
    /// UDP port peers listen on (RFC 5770: 10500); used to answer an I1
    /// relayed by a rendezvous server, whose FROM carries only an address.
    pub udp_port: u16,
    /// Return routability and credit-based authorisation (RFC 8046).
    pub mobility: MobilityConfig,
    /// ESP sequence number at which [`Host::rekey_if_due`] starts a rekey:
    /// a sequence number must never cycle on one SA (RFC 4303 §3.3.3,
    /// RFC 7402 §6.9), and the rekey needs a few round trips to finish.
    pub rekey_seq: u32,
    /// Re-registration after a lapse (see `registration.rs`): the first new
    /// base exchange with the registrar starts at once; after one that
    /// fails, the next waits this long, doubled for every failure in a row
    /// up to `reregister_backoff_max`, so a dead registrar is not hammered.
    pub reregister_backoff: Duration,
    pub reregister_backoff_max: Duration,
}

/// Default [`Config::rekey_seq`]: 2^26 packets (≈ 4 minutes at a line rate
/// of 270 000 packets/s) before the wrap, room for every retransmission of
/// the rekey UPDATE.
pub const REKEY_SEQ_DEFAULT: u32 = u32::MAX - (1 << 26);

impl Default for Config {
    fn default() -> Self {
        Config {
            dh_groups: vec![dh::GROUP_NIST_P256, dh::GROUP_MODP_1536],
            ciphers: vec![cipher::CIPHER_AES_128_CBC],
            esp_suites: vec![ESP_SUITE_AES128_CBC_SHA256],
            encrypt_host_id: true,
            retransmit_initial: Duration::from_millis(500),
            retries_max: 5,
            ec_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(30),
            state_hold: Duration::from_secs(10),
            puzzle: PuzzleConfig::default(),
            udp_port: crate::wire::udp::HIP_UDP_PORT,
            services: Vec::new(),
            // 2^((96-64)/8) = 16 s to 2^((160-64)/8) = 4096 s.
            service_lifetime: (96, 160),
            mobility: MobilityConfig::default(),
            rekey_seq: REKEY_SEQ_DEFAULT,
            reregister_backoff: Duration::from_secs(2),
            reregister_backoff_max: Duration::from_secs(300),
        }
    }
}

/// Keys and parameters of an established association, for the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssociationKeys {
    pub peer_hit: Hit,
    pub rhash: Rhash,
    pub cipher: u16,
    pub hip: HipKeys,
    /// Whole KEYMAT; ESP keys start at `esp_keymat_index`.
    pub keymat: Vec<u8>,
    pub esp_keymat_index: usize,
    pub esp_suite: u16,
    /// SPI the peer sends to us with (our inbound SA).
    pub our_spi: u32,
    /// SPI we send to the peer with.
    pub peer_spi: u32,
    /// True if our HIT is the greater one (we are HOST_g).
    pub we_are_greater: bool,
}

/// What the machine wants done.
#[derive(Clone, Debug)]
pub enum Output {
    /// Send this packet (encode, frame, and send it to `to`).
    Send { to: SocketAddr, packet: Packet },
    /// Keys are in place: the association can carry data.
    Established {
        peer: Hit,
        keys: Box<AssociationKeys>,
    },
    /// The base exchange failed (E-FAILED).
    Failed { peer: Hit },
    /// The association was closed and its state discarded or frozen.
    Closed { peer: Hit },
    /// A NOTIFY arrived; it never changes state (§6.13).
    Notified {
        peer: Hit,
        notification: Notification,
    },
    /// A verified UPDATE announced the peer's locators (RFC 8046); `from`
    /// is where it came from. Address verification is the caller's policy.
    PeerLocators {
        peer: Hit,
        from: SocketAddr,
        locators: LocatorSet,
    },
    /// The peer's new locator answered our echo request (RFC 8046 §5.4):
    /// data held for lack of credit can go now.
    PeerAddressVerified { peer: Hit, addr: SocketAddr },
    /// The new locator never answered: traffic is back on `fallback`.
    PeerAddressFailed {
        peer: Hit,
        addr: SocketAddr,
        fallback: SocketAddr,
    },
    /// The ESP SAs were rekeyed (RFC 7402 §3.3): install these keys (new
    /// SPIs, keys drawn at the new `esp_keymat_index`).
    Rekeyed {
        peer: Hit,
        keys: Box<AssociationKeys>,
    },
    /// The peer acknowledged our UPDATE.
    UpdateAcked { peer: Hit, update_id: u32 },
    /// A registrar granted (REG_RESPONSE) or refused (REG_FAILED) services,
    /// in R2 or in the UPDATE that ACKed our REG_REQUEST. `lifetime` 0 with
    /// types in `granted`: those registrations were cancelled.
    Registration {
        peer: Hit,
        granted: Vec<u8>,
        failed: Vec<u8>,
        lifetime: u8,
    },
    /// Our registration with `peer` reached the end of its lifetime without
    /// a renewal answered: the association with `peer` is dropped
    /// ([`Output::Closed`] follows) and a new base exchange asks for the
    /// registration again in I2, retried with backoff until it succeeds
    /// (see [`Host::reregistering`]).
    RegistrationLapsed { peer: Hit, types: Vec<u8> },
    /// Registrar: `peer` registered, renewed (`lifetime` > 0) or cancelled
    /// (`lifetime` 0) `types` with a REG_REQUEST in an UPDATE.
    Registered {
        peer: Hit,
        types: Vec<u8>,
        lifetime: u8,
    },
    /// Registrar: `peer`'s registration ended without renewal; a rendezvous
    /// server no longer relays for it.
    RegistrationExpired { peer: Hit, types: Vec<u8> },
}

#[derive(Clone, Debug)]
pub(crate) struct Retransmit {
    pub packet: Packet,
    pub tries: u32,
    pub next: Instant,
    pub interval: Duration,
    /// Give up at this time instead of after `retries_max` (CLOSE).
    pub give_up_at: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Association {
    pub peer_hit: Hit,
    pub peer_addr: SocketAddr,
    pub state: State,
    pub retransmit: Option<Retransmit>,
    /// EC timer in R2-SENT, discard timer in CLOSED / E-FAILED.
    pub deadline: Option<Instant>,
    pub peer: Option<PeerIdentity>,
    /// The peer's HOST_ID: as received in R1 (HIP_MAC_2 covers it) when we
    /// initiated, as received in I2 when we responded.
    pub peer_host_id: Option<RawParam>,
    pub r1_counter: Option<u64>,
    /// Keys: pending while I2-SENT, final once established.
    pub keys: Option<AssociationKeys>,
    /// The R2 we sent, resent on a duplicate I2 in R2-SENT.
    pub r2: Option<Packet>,
    /// The I2 that produced `r2` (duplicate detection).
    pub i2_solution: Option<Vec<u8>>,
    /// ECHO_REQUEST_SIGNED nonce of our CLOSE.
    pub close_nonce: Option<Vec<u8>>,
    /// Update ID of our next UPDATE (§5.2.16).
    pub update_id: u32,
    /// Our UPDATE waiting for an ACK.
    pub update_pending: Option<u32>,
    /// Highest peer Update ID processed.
    pub peer_update_id: Option<u32>,
    /// Requester side: the registration we want from the peer and what it
    /// granted.
    pub requested: Option<registration::Requested>,
    /// Registrar side: the peer's registration with us.
    pub registration: Option<registration::Granted>,
    /// Registrar side: the peer's UPDATE SEQ that carried its last
    /// REG_REQUEST and our answer, repeated if that UPDATE is retransmitted.
    pub reg_answer: Option<(u32, Vec<RawParam>)>,
    /// Whether `peer_addr` is verified (RFC 8046 §5.4).
    pub addr_state: AddrState,
    /// The outstanding check of a new peer locator.
    pub verification: Option<mobility::Verification>,
    /// Credit-based authorisation for an unverified `peer_addr`.
    pub credit: mobility::Credit,
    /// A rekey of the ESP SAs in progress.
    pub rekey: Option<rekey::Rekey>,
}

impl Association {
    pub fn new(peer_hit: Hit, peer_addr: SocketAddr) -> Self {
        Association {
            peer_hit,
            peer_addr,
            state: State::Unassociated,
            retransmit: None,
            deadline: None,
            peer: None,
            peer_host_id: None,
            r1_counter: None,
            keys: None,
            r2: None,
            i2_solution: None,
            close_nonce: None,
            update_id: 0,
            update_pending: None,
            peer_update_id: None,
            requested: None,
            registration: None,
            reg_answer: None,
            addr_state: AddrState::Active,
            verification: None,
            credit: mobility::Credit::default(),
            rekey: None,
        }
    }
}

/// One local host identity and its associations.
#[derive(Debug)]
pub struct Host {
    pub(crate) id: HostIdentity,
    pub(crate) cfg: Config,
    pub(crate) assocs: HashMap<Hit, Association>,
    pub(crate) responder: responder::ResponderState,
    pub(crate) mobility: MobilityStats,
    /// Registrars we lost and register with again in a new base exchange.
    pub(crate) reregister: HashMap<Hit, registration::Reregister>,
}

impl Host {
    pub fn new(id: HostIdentity, cfg: Config, now: Instant) -> Result<Self, Error> {
        let responder = responder::ResponderState::new(&cfg, now);
        Ok(Host {
            id,
            cfg,
            assocs: HashMap::new(),
            responder,
            mobility: MobilityStats::default(),
            reregister: HashMap::new(),
        })
    }

    pub fn hit(&self) -> Hit {
        self.id.hit()
    }

    pub fn identity(&self) -> &HostIdentity {
        &self.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// State of the association with `peer` (UNASSOCIATED if none).
    pub fn state(&self, peer: &Hit) -> State {
        self.assocs
            .get(peer)
            .map_or(State::Unassociated, |a| a.state)
    }

    /// Keys of the association with `peer`, once established.
    pub fn keys(&self, peer: &Hit) -> Option<&AssociationKeys> {
        self.assocs
            .get(peer)
            .filter(|a| matches!(a.state, State::R2Sent | State::Established))
            .and_then(|a| a.keys.as_ref())
    }

    /// Keys of the association with `peer` in any state that has them,
    /// I2-SENT included (diagnostics and interop tests: compare KEYMAT with
    /// another implementation before R2).
    pub fn negotiated_keys(&self, peer: &Hit) -> Option<&AssociationKeys> {
        self.assocs.get(peer).and_then(|a| a.keys.as_ref())
    }

    /// Sends to `addr` from now on (after the caller verified a new peer
    /// locator, RFC 8046 §5.4).
    pub fn set_peer_addr(&mut self, peer: &Hit, addr: SocketAddr) -> bool {
        match self.assocs.get_mut(peer) {
            Some(a) => {
                a.peer_addr = addr;
                a.addr_state = AddrState::Active;
                a.verification = None;
                true
            }
            None => false,
        }
    }

    /// Address of the peer, as last learnt.
    pub fn peer_addr(&self, peer: &Hit) -> Option<SocketAddr> {
        self.assocs.get(peer).map(|a| a.peer_addr)
    }

    /// Decodes and processes a received HIP packet. An `Err` means the
    /// packet was dropped, and why; state is unchanged.
    pub fn receive_bytes(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<Output>, Error> {
        let p = Packet::decode(bytes)?;
        self.receive(now, from, &p)
    }

    /// Processes a received HIP packet.
    pub fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        p: &Packet,
    ) -> Result<Vec<Output>, Error> {
        use crate::wire::PacketType::*;
        match p.header.packet_type {
            I1 => self.on_i1(now, from, p),
            R1 => self.on_r1(now, from, p),
            I2 => self.on_i2(now, from, p),
            R2 => self.on_r2(now, from, p),
            Close => self.on_close(now, from, p),
            CloseAck => self.on_close_ack(now, p),
            Notify => self.on_notify(p),
            Update => self.on_update(now, from, p),
        }
    }

    /// User data arrived on the association: R2-SENT may become ESTABLISHED.
    pub fn data_received(&mut self, peer: &Hit) {
        if let Some(a) = self.assocs.get_mut(peer) {
            if a.state == State::R2Sent {
                a.state = State::Established;
                a.deadline = None;
            }
        }
    }

    /// The earliest time `poll` has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let assoc = self.assocs.values().flat_map(|a| {
            [
                a.retransmit.as_ref().map(|r| r.next),
                a.verification.as_ref().map(|v| v.retransmit.next),
                a.deadline,
                registration::next_deadline(a),
            ]
            .into_iter()
            .flatten()
        });
        let rereg = self.reregister.values().filter_map(|r| r.next);
        assoc
            .chain(rereg)
            .chain(std::iter::once(self.responder.rotate_at))
            .min()
    }

    /// Runs timers: retransmissions, EC and discard timers, puzzle secret
    /// rotation, registration renewals, expiry and re-registration.
    pub fn poll(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if now >= self.responder.rotate_at {
            self.responder.rotate(&self.cfg, now);
        }
        let retries_max = self.cfg.retries_max;
        let hold = self.cfg.state_hold;
        let mut remove = Vec::new();
        let mut lapsed = Vec::new();
        for a in self.assocs.values_mut() {
            mobility::poll_verification(a, now, retries_max, &mut self.mobility, &mut out);
            if let Some(r) = a.retransmit.as_mut() {
                if now >= r.next {
                    let expired = match r.give_up_at {
                        Some(t) => now >= t,
                        None => r.tries >= retries_max,
                    };
                    if expired {
                        a.retransmit = None;
                        match a.state {
                            State::I1Sent | State::I2Sent => {
                                a.state = State::EFailed;
                                a.keys = None;
                                a.deadline = Some(now + hold);
                                out.push(Output::Failed { peer: a.peer_hit });
                            }
                            State::Closing => {
                                remove.push(a.peer_hit);
                                out.push(Output::Closed { peer: a.peer_hit });
                            }
                            // An unacknowledged UPDATE: the association is
                            // considered broken (§6.11 step 4).
                            State::Established | State::R2Sent => {
                                if let Some(id) = a.update_pending.take() {
                                    registration::update_given_up(a, id, now);
                                }
                                // A rekey that was never answered must not
                                // block the next one.
                                a.rekey = None;
                            }
                            _ => {}
                        }
                    } else {
                        r.tries += 1;
                        r.interval *= 2;
                        r.next = now + r.interval;
                        out.push(Output::Send {
                            to: a.peer_addr,
                            packet: r.packet.clone(),
                        });
                    }
                }
            }
            if registration::poll_expiry(a, now, &mut out) {
                lapsed.push(a.peer_hit);
            }
            if let Some(d) = a.deadline {
                if now >= d {
                    a.deadline = None;
                    match a.state {
                        State::R2Sent => a.state = State::Established,
                        State::Closed | State::EFailed => remove.push(a.peer_hit),
                        _ => {}
                    }
                }
            }
        }
        for h in remove {
            self.assocs.remove(&h);
        }
        for peer in lapsed {
            self.drop_lapsed_registrar(now, peer, &mut out);
        }
        self.poll_reregister(now, &mut out);
        self.poll_reg_requests(now, &mut out);
        out
    }

    pub(crate) fn start_retransmit(&self, packet: Packet, now: Instant) -> Retransmit {
        Retransmit {
            packet,
            tries: 0,
            next: now + self.cfg.retransmit_initial,
            interval: self.cfg.retransmit_initial,
            give_up_at: None,
        }
    }

    /// Adds SEQ with `peer`'s next Update ID (§5.2.16) to the UPDATE `p`,
    /// signs it and takes the ID; the packet goes out retransmitted until
    /// ACKed. Every UPDATE with a SEQ that we send is numbered here.
    pub(crate) fn sequenced_update(
        &mut self,
        now: Instant,
        peer: Hit,
        mut p: Packet,
    ) -> Result<(u32, Packet, Retransmit), Error> {
        let id = self
            .assocs
            .get(&peer)
            .ok_or(Error::Unexpected("no association"))?
            .update_id;
        p.add(&Seq(id))?;
        let p = self.signed_with_mac(&peer, p)?;
        let retransmit = self.start_retransmit(p.clone(), now);
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        a.update_id = id.wrapping_add(1);
        Ok((id, p, retransmit))
    }

    /// Sends `p` as our one outstanding UPDATE to `peer` (§6.11): numbered
    /// by [`Host::sequenced_update`], retransmitted by the association until
    /// its ACK arrives or it gives up. Returns the Update ID, the packet and
    /// the association, where the caller notes what the UPDATE carries.
    pub(crate) fn send_update(
        &mut self,
        now: Instant,
        peer: Hit,
        p: Packet,
    ) -> Result<(u32, Packet, &mut Association), Error> {
        let (id, p, retransmit) = self.sequenced_update(now, peer, p)?;
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(Error::Unexpected("no association"))?;
        a.update_pending = Some(id);
        a.retransmit = Some(retransmit);
        Ok((id, p, a))
    }
}

/// A random SPI outside the reserved range 0..=255 (RFC 4303 §2.1).
pub(crate) fn random_spi() -> u32 {
    use rand_core::{OsRng, RngCore};
    loop {
        let s = OsRng.next_u32();
        if s > 255 {
            return s;
        }
    }
}
