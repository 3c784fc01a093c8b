//! The I/O loop around `roam_hip::Host`: one task owns the state machine,
//! the ESP back end, the UDP socket and the TUN device, so no locks sit on
//! the packet path. Handlers are synchronous (UDP and TUN writes never
//! wait: a full queue drops a packet, as a NIC would) and every drop is
//! counted in [`Stats`].
//!
//! ```text
//!            ┌────────────────────── Endpoint task ───────────────────────┐
//!  TUN ─────►│ beet::outbound → peer by HIT/LSI ─┬─ SA? seal ─────────────┼──► UDP
//!            │                                   └─ no: queue + connect() │
//!  UDP ─────►│ classify ─ HIP ─► Host::receive ─► Outputs (Send, Established,
//!            │          │                          PeerLocators, ...)     │
//!            │          └ ESP ─► open ─► beet::inbound ───────────────────┼──► TUN
//!  timer ───►│ Host::poll at Host::next_deadline                          │
//!  Command ─►│ SetLocator (rebind, UPDATE to every peer), Status,         │
//!            │ ExportAndStop (hand associations over), Stop (CLOSE all,   │
//!            │ retransmitted until CLOSE_ACK or `close_grace`)            │
//!            └────────────────────────────────────────────────────────────┘
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use roam_hip::machine::DataPath;
use roam_hip::wire::params::{
    reg_lifetime_value, Locator, LocatorAddr, LocatorSet, REG_TYPE_RENDEZVOUS,
};
use roam_hip::wire::udp::{classify, frame_hip, UdpPayload};
use roam_hip::{Hit, Host, Output, Packet, State};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::backend::{EspBackend, UserEsp};
use crate::beet::{self, Dest, View};
use crate::config::{default_lsi, EndpointConfig, LsiTable, PeerSpec};
use crate::error::{Error, EspDrop};
use crate::handover::{self, Carried};
use crate::stats::Stats;
use crate::tun::Tun;

/// Largest datagram or TUN packet read.
const BUF: usize = 65536;
/// Lifetime announced for our locators (RFC 8046 §4), seconds.
const LOCATOR_LIFETIME: u32 = 3600;
/// How often a registration that failed (rendezvous server unreachable) is retried.
const REGISTER_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Requests to the endpoint task.
#[derive(Debug)]
pub enum Command {
    /// Our locator changed: rebind if bound to a specific address and send
    /// UPDATE(LOCATOR_SET) to every established peer. Replies with the
    /// number of peers told.
    SetLocator(IpAddr, oneshot::Sender<Result<usize, String>>),
    /// One line per peer: HIT, LSI, state, address.
    Status(oneshot::Sender<String>),
    /// Freezes the endpoint and hands out its associations with their ESP
    /// state ([`crate::handover`]); the loop stops so that no further
    /// sequence numbers are used here.
    ExportAndStop(oneshot::Sender<Vec<u8>>),
    /// A new entry for the static peer table (where to send I1 for that
    /// HIT, its LSI); existing associations are not touched.
    AddPeer(PeerSpec, oneshot::Sender<Result<Ipv4Addr, String>>),
    /// Cancels the registration with the rendezvous server (RFC 8003:
    /// REG_REQUEST with lifetime 0) and stops renewing it.
    Unregister(oneshot::Sender<Result<(), String>>),
    Stop,
}

/// Talks to a running endpoint.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    pub stats: Arc<Stats>,
    pub hit: Hit,
    pub lsi: Ipv4Addr,
    /// The UDP address bound at start.
    pub listen: SocketAddr,
}

impl Handle {
    pub async fn set_locator(&self, ip: IpAddr) -> Result<usize, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::SetLocator(ip, tx))
            .await
            .map_err(|_| "endpoint stopped".to_string())?;
        rx.await.map_err(|_| "endpoint stopped".to_string())?
    }

    pub async fn status(&self) -> String {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Status(tx)).await.is_err() {
            return String::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the endpoint and returns its carried state.
    pub async fn export_and_stop(&self) -> Result<Vec<u8>, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::ExportAndStop(tx))
            .await
            .map_err(|_| "endpoint stopped".to_string())?;
        rx.await.map_err(|_| "endpoint stopped".to_string())
    }

    /// Adds a correspondent; returns the LSI it is known by here.
    pub async fn add_peer(&self, peer: PeerSpec) -> Result<Ipv4Addr, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::AddPeer(peer, tx))
            .await
            .map_err(|_| "endpoint stopped".to_string())?;
        rx.await.map_err(|_| "endpoint stopped".to_string())?
    }

    /// Cancels the registration with the rendezvous server; returns once
    /// the request is sent (it is retransmitted until answered).
    pub async fn unregister(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Unregister(tx))
            .await
            .map_err(|_| "endpoint stopped".to_string())?;
        rx.await.map_err(|_| "endpoint stopped".to_string())?
    }

    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }
}

/// One HIP endpoint: identity, associations, data plane.
pub struct Endpoint {
    host: Host,
    esp: Box<dyn EspBackend>,
    sock: UdpSocket,
    dev: PacketDev,
    listen: SocketAddr,
    our_lsi: Ipv4Addr,
    lsis: LsiTable,
    /// Static table: where to send I1 (None: via the RVS).
    peers: HashMap<Hit, Option<SocketAddr>>,
    rvs: Option<SocketAddr>,
    queues: HashMap<Hit, VecDeque<Vec<u8>>>,
    queue_len: usize,
    established: HashSet<Hit>,
    serve_rvs: bool,
    /// The rendezvous server we keep registered with.
    register_with: Option<PeerSpec>,
    /// Lifetime value asked for (RFC 8003 encoding).
    register_lifetime: u8,
    /// Peers sent CLOSE by Stop; the loop waits for their CLOSE_ACKs.
    closing: Vec<Hit>,
    close_grace: std::time::Duration,
    stats: Arc<Stats>,
}

/// Where the inner IP packets come from and go to: the TUN device, or the
/// caller through channels (roamd's virtual LAN for a VM), or nothing (a
/// pure rendezvous server).
pub enum PacketDev {
    Tun(Tun),
    /// The endpoint reads packets to send from `outbound` and delivers
    /// received packets to `inbound` (dropped and counted when full).
    Channel {
        outbound: mpsc::Receiver<Vec<u8>>,
        inbound: mpsc::Sender<Vec<u8>>,
    },
    None,
}

impl PacketDev {
    /// The next packet to carry; waits forever when there is no device.
    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PacketDev::Tun(t) => t.recv(buf).await,
            PacketDev::Channel { outbound, .. } => match outbound.recv().await {
                Some(p) => {
                    let n = p.len().min(buf.len());
                    buf[..n].copy_from_slice(&p[..n]);
                    Ok(n)
                }
                None => std::future::pending().await,
            },
            PacketDev::None => std::future::pending().await,
        }
    }

    fn send(&self, pkt: Vec<u8>) -> bool {
        match self {
            PacketDev::Tun(t) => t.send(&pkt).is_ok(),
            PacketDev::Channel { inbound, .. } => inbound.try_send(pkt).is_ok(),
            PacketDev::None => false,
        }
    }

    fn name(&self) -> String {
        match self {
            PacketDev::Tun(t) => t.name().to_string(),
            PacketDev::Channel { .. } => "channel".to_string(),
            PacketDev::None => "none".to_string(),
        }
    }
}

impl Endpoint {
    /// Opens the TUN device and the socket and starts the loop with the
    /// user-space ESP back end.
    pub async fn start(
        cfg: EndpointConfig,
    ) -> Result<(Handle, tokio::task::JoinHandle<()>), Error> {
        Self::start_with(cfg, Box::new(UserEsp::new())).await
    }

    /// As [`Endpoint::start`], with another ESP back end.
    pub async fn start_with(
        cfg: EndpointConfig,
        esp: Box<dyn EspBackend>,
    ) -> Result<(Handle, tokio::task::JoinHandle<()>), Error> {
        let dev = match &cfg.tun_name {
            Some(name) => {
                let t = Tun::open(name)?;
                let hit = cfg.identity.hit();
                t.configure(
                    hit.as_ipv6(),
                    cfg.lsi.unwrap_or_else(|| default_lsi(&hit)),
                    cfg.mtu,
                )?;
                PacketDev::Tun(t)
            }
            None => PacketDev::None,
        };
        Self::start_on(cfg, esp, dev).await
    }

    /// Starts the loop on a given packet device (`cfg.tun_name` is
    /// ignored): roamd passes [`PacketDev::Channel`] connected to a VM's
    /// virtual LAN.
    pub async fn start_on(
        cfg: EndpointConfig,
        esp: Box<dyn EspBackend>,
        dev: PacketDev,
    ) -> Result<(Handle, tokio::task::JoinHandle<()>), Error> {
        let hit = cfg.identity.hit();
        let our_lsi = cfg.lsi.unwrap_or_else(|| default_lsi(&hit));
        let mut lsis = LsiTable::default();
        lsis.bind(hit, our_lsi)?;
        let mut peers = HashMap::new();
        for p in &cfg.peers {
            match p.lsi {
                Some(l) => lsis.bind(p.hit, l)?,
                None => {
                    lsis.ensure(p.hit);
                }
            }
            peers.insert(p.hit, p.addr);
        }
        let sock = UdpSocket::bind(cfg.listen).await?;
        // Handlers send with try_send_to, which needs the reactor to have
        // seen the socket writable once (see set_locator).
        sock.writable().await?;
        let listen = sock.local_addr()?;
        let mut hip = cfg.hip.clone();
        if cfg.serve_rvs && !hip.services.contains(&REG_TYPE_RENDEZVOUS) {
            hip.services.push(REG_TYPE_RENDEZVOUS);
        }
        let host = Host::new(cfg.identity.clone(), hip, Instant::now())?;
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(16);
        let handle = Handle {
            tx,
            stats: stats.clone(),
            hit,
            lsi: our_lsi,
            listen,
        };
        if let Some(path) = &cfg.control {
            crate::control::serve(path, handle.clone())?;
        }
        info!(%hit, lsi = %our_lsi, %listen, dev = dev.name(),
            rvs = cfg.serve_rvs, "HIP endpoint up");
        let mut ep = Endpoint {
            host,
            esp,
            sock,
            dev,
            listen,
            our_lsi,
            lsis,
            peers,
            rvs: cfg.rvs,
            queues: HashMap::new(),
            queue_len: cfg.queue_len,
            established: HashSet::new(),
            serve_rvs: cfg.serve_rvs,
            register_with: cfg.register_with.clone(),
            register_lifetime: reg_lifetime_value(cfg.register_lifetime),
            closing: Vec::new(),
            close_grace: cfg.close_grace,
            stats,
        };
        if let Some(state) = &cfg.import {
            ep.import(state)?;
            ep.host.advance_update_ids(cfg.import_update_skip);
        }
        if let Some(r) = &cfg.register_with {
            ep.register(r)?;
        }
        let task = tokio::spawn(ep.run(rx));
        Ok((handle, task))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut ubuf = vec![0u8; BUF];
        let mut tbuf = vec![0u8; BUF];
        let mut reg_tick = tokio::time::interval(REGISTER_RETRY);
        reg_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set once Stop has sent CLOSE: from then on only HIP packets and
        // timers are served, until every CLOSE is acknowledged or this time.
        let mut draining: Option<tokio::time::Instant> = None;
        loop {
            if let Some(until) = draining {
                if self
                    .closing
                    .iter()
                    .all(|h| self.host.state(h) != State::Closing)
                {
                    break;
                }
                if tokio::time::Instant::now() >= until {
                    let left = self
                        .closing
                        .iter()
                        .filter(|h| self.host.state(h) == State::Closing)
                        .count();
                    warn!(left, "stopping with CLOSEs unacknowledged");
                    for _ in 0..left {
                        Stats::bump(&self.stats.close_unacked);
                    }
                    break;
                }
            }
            let mut deadline = self
                .host
                .next_deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            if let Some(until) = draining {
                deadline = deadline.min(until);
            }
            tokio::select! {
                r = self.sock.recv_from(&mut ubuf) => match r {
                    Ok((n, from)) => self.on_udp(&ubuf[..n], from),
                    Err(e) => debug!("udp recv: {e}"),
                },
                r = self.dev.recv(&mut tbuf), if draining.is_none() => match r {
                    Ok(n) => self.on_tun(&tbuf[..n]),
                    Err(e) => {
                        warn!("tun read: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                _ = reg_tick.tick(), if self.register_with.is_some() && draining.is_none() => {
                    self.keep_registered()
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let outs = self.host.poll(Instant::now());
                    self.handle(outs);
                }
                c = rx.recv(), if draining.is_none() => match c {
                    Some(Command::SetLocator(ip, reply)) => {
                        let r = self.set_locator(ip).await;
                        let _ = reply.send(r);
                    }
                    Some(Command::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::AddPeer(p, reply)) => {
                        let _ = reply.send(self.add_peer(p));
                    }
                    Some(Command::Unregister(reply)) => {
                        let _ = reply.send(self.unregister());
                    }
                    Some(Command::ExportAndStop(reply)) => {
                        let _ = reply.send(self.export());
                        break;
                    }
                    Some(Command::Stop) | None => {
                        self.close_all();
                        draining = Some(tokio::time::Instant::now() + self.close_grace);
                    }
                },
            }
        }
        info!("HIP endpoint stopped");
    }

    /// Registers with a rendezvous server (RFC 8003 in the base exchange,
    /// RFC 8004 rendezvous type); `roam_hip` renews it at half of each
    /// granted lifetime. An association with the server that arrived with a
    /// migrated VM already holds the registration there (the server follows
    /// our UPDATE), but its renewal schedule did not come along: renew it
    /// now in an UPDATE, which rides with the locator UPDATE that follows.
    fn register(&mut self, r: &PeerSpec) -> Result<(), Error> {
        let addr = r
            .addr
            .ok_or_else(|| Error::PeerSpec(format!("{} (no address)", r.hit)))?;
        let now = Instant::now();
        let types = vec![REG_TYPE_RENDEZVOUS];
        let outs = if self.established.contains(&r.hit) {
            info!(rvs = %r.hit, "registration carried over; renewing it");
            self.host
                .register(now, r.hit, types, self.register_lifetime)?
        } else {
            self.host
                .connect_and_register(now, r.hit, addr, types, self.register_lifetime)?
        };
        self.handle(outs);
        Ok(())
    }

    /// Cancels the registration and stops keeping it.
    fn unregister(&mut self) -> Result<(), String> {
        let r = self
            .register_with
            .take()
            .ok_or("not registered with a rendezvous server")?;
        let outs = self
            .host
            .cancel_registration(Instant::now(), r.hit)
            .map_err(|e| e.to_string())?;
        info!(rvs = %r.hit, "cancelling the registration");
        self.handle(outs);
        Ok(())
    }

    /// Registers again when the last attempt failed or the association with the
    /// server went away (it is retried until the server answers). After a lapse
    /// (the server restarted, or stayed away past the lifetime) `roam_hip` runs
    /// the new base exchanges itself, with backoff: leave it alone meanwhile.
    fn keep_registered(&mut self) {
        let Some(r) = self.register_with.clone() else {
            return;
        };
        if self.host.reregistering(&r.hit) {
            return;
        }
        if matches!(
            self.host.state(&r.hit),
            State::Unassociated | State::Closed | State::EFailed
        ) {
            info!(rvs = %r.hit, "registering with the rendezvous server again");
            if let Err(e) = self.register(&r) {
                warn!(rvs = %r.hit, "registration: {e}");
            }
        }
    }

    fn add_peer(&mut self, p: PeerSpec) -> Result<Ipv4Addr, String> {
        let lsi = match p.lsi {
            Some(l) => {
                self.lsis.bind(p.hit, l).map_err(|e| e.to_string())?;
                l
            }
            None => self.lsis.ensure(p.hit),
        };
        info!(peer = %p.hit, %lsi, addr = ?p.addr, "peer added");
        self.peers.insert(p.hit, p.addr);
        Ok(lsi)
    }

    fn on_tun(&mut self, pkt: &[u8]) {
        Stats::bump(&self.stats.tun_in);
        let our_hit = self.host.hit();
        let o = match beet::outbound(pkt, &our_hit) {
            Ok(o) => o,
            Err(e) => {
                debug!("tun packet dropped: {e}");
                Stats::bump(&self.stats.tun_dropped);
                return;
            }
        };
        let peer = match o.dest {
            Dest::Hit(h) => h,
            Dest::Lsi(l) => match self.lsis.hit(&l) {
                Some(h) if h != our_hit => h,
                _ => {
                    Stats::bump(&self.stats.tun_dropped);
                    return;
                }
            },
        };
        if self.esp.has_sa(&peer) {
            let (nh, payload) = (o.next_header, o.payload);
            if !self.send_esp(&peer, nh, payload) {
                // Held: the peer's new locator is unverified and out of
                // credit; flushed when the echo comes back.
                self.enqueue(peer, pkt);
            }
            return;
        }
        // No SA yet: keep a few packets and start the base exchange.
        self.enqueue(peer, pkt);
        if matches!(
            self.host.state(&peer),
            State::Unassociated | State::Closed | State::Closing | State::EFailed
        ) {
            self.connect(peer);
        }
    }

    fn connect(&mut self, peer: Hit) {
        let addr = self
            .peers
            .get(&peer)
            .copied()
            .flatten()
            .or(self.host.peer_addr(&peer))
            .or(self.rvs);
        let Some(addr) = addr else {
            debug!(%peer, "no locator and no rendezvous server");
            self.queues.remove(&peer);
            Stats::bump(&self.stats.tun_dropped);
            return;
        };
        match self.host.connect(Instant::now(), peer, addr) {
            Ok(outs) => self.handle(outs),
            Err(e) => warn!(%peer, "connect: {e}"),
        }
    }

    fn enqueue(&mut self, peer: Hit, pkt: &[u8]) {
        let q = self.queues.entry(peer).or_default();
        if q.len() >= self.queue_len {
            Stats::bump(&self.stats.queue_dropped);
        } else {
            q.push_back(pkt.to_vec());
        }
    }

    /// Seals and sends; false if the packet must be held (return
    /// routability: unverified locator, no credit).
    fn send_esp(&mut self, peer: &Hit, nh: u8, payload: &[u8]) -> bool {
        let to = match self.host.outbound_data(Instant::now(), peer, payload.len()) {
            DataPath::Send(to) => to,
            DataPath::Hold => {
                Stats::bump(&self.stats.rr_held);
                return false;
            }
            DataPath::NoAssociation => {
                Stats::bump(&self.stats.tun_dropped);
                return true;
            }
        };
        match self.esp.seal(peer, nh, payload) {
            Ok(d) => {
                if self.sock.try_send_to(&d, to).is_ok() {
                    Stats::bump(&self.stats.esp_out);
                } else {
                    Stats::bump(&self.stats.send_errors);
                }
                self.rekey_if_due(*peer, &d);
            }
            Err(e) => {
                debug!(%peer, "seal: {e}");
                Stats::bump(&self.stats.tun_dropped);
            }
        }
        true
    }

    fn on_udp(&mut self, d: &[u8], from: SocketAddr) {
        match classify(d) {
            Err(_) => Stats::bump(&self.stats.udp_garbage),
            Ok(UdpPayload::Hip(p)) => {
                let p = match Packet::decode(p) {
                    Ok(p) => p,
                    Err(e) => {
                        debug!(%from, "HIP packet dropped: {e}");
                        Stats::bump(&self.stats.hip_dropped);
                        return;
                    }
                };
                if self.serve_rvs && self.relay(&p, from) {
                    return;
                }
                match self.host.receive(Instant::now(), from, &p) {
                    Ok(outs) => {
                        Stats::bump(&self.stats.hip_in);
                        self.handle(outs);
                    }
                    Err(e) => {
                        debug!(%from, "HIP packet dropped: {e}");
                        Stats::bump(&self.stats.hip_dropped);
                    }
                }
            }
            Ok(UdpPayload::Esp(e)) => self.on_esp(e),
        }
    }

    /// Rendezvous (RFC 8004 §3.3): an I1 for a HIT registered with us is
    /// forwarded with FROM and RVS_HMAC to the HIT's current address.
    /// Returns true if the packet was consumed.
    fn relay(&mut self, p: &Packet, from: SocketAddr) -> bool {
        match roam_hip::rvs::relay_for(&self.host, p, from) {
            None => false,
            Some(Ok((to, relayed))) => {
                match relayed.encode() {
                    Ok(bytes) if self.sock.try_send_to(&frame_hip(&bytes), to).is_ok() => {
                        Stats::bump(&self.stats.rvs_relayed)
                    }
                    Ok(_) => Stats::bump(&self.stats.send_errors),
                    Err(e) => {
                        debug!(%to, "relay: {e}");
                        Stats::bump(&self.stats.hip_dropped);
                    }
                }
                true
            }
            Some(Err(e)) => {
                debug!(%from, "relay: {e}");
                Stats::bump(&self.stats.hip_dropped);
                true
            }
        }
    }

    /// The rekey policy (RFC 7402 §6.9) after an ESP packet `d` of `peer`
    /// was sealed or opened: its sequence number (octets 4..8) is the
    /// newest on that SA. When the KEYMAT is used up the association is
    /// closed; the next packet for the peer starts a new base exchange.
    fn rekey_if_due(&mut self, peer: Hit, d: &[u8]) {
        let Some(seq) = d
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return;
        };
        // Cheap test first: this runs for every packet.
        if seq < self.host.config().rekey_seq {
            return;
        }
        let now = Instant::now();
        match self.host.rekey_if_due(now, &peer, seq) {
            Ok(outs) => self.handle(outs),
            Err(e) => {
                warn!(%peer, "no rekey possible ({e}): closing for a new base exchange");
                Stats::bump(&self.stats.rekey_exhausted);
                // The new base exchange may have to start here, and the
                // CLOSE_ACK erases the association with the peer's address:
                // a peer that reached us (not in the static table) stays
                // reachable.
                if let Some(addr) = self.host.peer_addr(&peer) {
                    self.peers.entry(peer).or_insert(Some(addr));
                }
                match self.host.close(now, peer) {
                    Ok(outs) => self.handle(outs),
                    Err(e) => debug!(%peer, "close: {e}"),
                }
            }
        }
    }

    fn on_esp(&mut self, d: &[u8]) {
        let (peer, nh, payload) = match self.esp.open(d) {
            Ok(x) => x,
            Err(e) => {
                let c = match e {
                    EspDrop::UnknownSpi(_) | EspDrop::NoSa => &self.stats.esp_unknown_spi,
                    EspDrop::Replay => &self.stats.esp_replayed,
                    EspDrop::Invalid | EspDrop::SeqExhausted => &self.stats.esp_invalid,
                };
                Stats::bump(c);
                return;
            }
        };
        self.host.inbound_data(Instant::now(), &peer, payload.len());
        self.rekey_if_due(peer, d);
        let view = View {
            our_hit: self.host.hit(),
            peer_hit: peer,
            our_lsi: self.our_lsi,
            peer_lsi: self.lsis.ensure(peer),
        };
        match beet::inbound(nh, &payload, &view) {
            Ok(pkt) => {
                if self.dev.send(pkt) {
                    Stats::bump(&self.stats.esp_in);
                    Stats::bump(&self.stats.tun_out);
                } else {
                    Stats::bump(&self.stats.send_errors);
                }
            }
            Err(_) => Stats::bump(&self.stats.esp_bad_inner),
        }
    }

    fn handle(&mut self, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, packet } => match packet.encode() {
                    Ok(bytes) => match self.sock.try_send_to(&frame_hip(&bytes), to) {
                        Ok(_) => Stats::bump(&self.stats.hip_out),
                        Err(e) => {
                            debug!(%to, "HIP send: {e}");
                            Stats::bump(&self.stats.send_errors);
                        }
                    },
                    Err(e) => warn!("encode: {e}"),
                },
                Output::Established { peer, keys } => {
                    if let Err(e) = self.esp.install(peer, &keys) {
                        warn!(%peer, "installing SAs: {e}");
                        continue;
                    }
                    let lsi = self.lsis.ensure(peer);
                    info!(%peer, %lsi, "association established");
                    Stats::bump(&self.stats.established);
                    self.established.insert(peer);
                    self.flush_queue(peer);
                }
                Output::Failed { peer } => {
                    warn!(%peer, "base exchange failed");
                    Stats::bump(&self.stats.failed);
                    self.forget(&peer);
                }
                Output::Closed { peer } => {
                    info!(%peer, "association closed");
                    Stats::bump(&self.stats.closed);
                    self.forget(&peer);
                }
                Output::PeerLocators { peer, from, .. } => {
                    // roam_hip switched to the locator (unverified, within
                    // credit) and sent the echo request.
                    info!(%peer, %from, addr = ?self.host.peer_addr(&peer), "peer moved");
                    Stats::bump(&self.stats.peer_moves);
                }
                Output::PeerAddressVerified { peer, addr } => {
                    info!(%peer, %addr, "peer locator verified");
                    Stats::bump(&self.stats.rr_verified);
                    self.flush_queue(peer);
                }
                Output::PeerAddressFailed {
                    peer,
                    addr,
                    fallback,
                } => {
                    warn!(%peer, %addr, %fallback, "peer locator did not answer");
                    Stats::bump(&self.stats.rr_failed);
                    self.flush_queue(peer);
                }
                Output::Rekeyed { peer, keys } => {
                    // New SPIs and keys (RFC 7402 §3.3); packets still in
                    // flight on the old inbound SA are lost.
                    match self.esp.install(peer, &keys) {
                        Ok(()) => {
                            info!(%peer, spi = keys.our_spi, "rekeyed");
                            Stats::bump(&self.stats.rekeys);
                        }
                        Err(e) => warn!(%peer, "installing rekeyed SAs: {e}"),
                    }
                }
                Output::UpdateAcked { peer, update_id } => {
                    info!(%peer, update_id, "UPDATE acknowledged")
                }
                Output::Notified { peer, notification } => {
                    info!(%peer, ?notification, "NOTIFY")
                }
                Output::Registration {
                    peer,
                    granted,
                    failed,
                    lifetime,
                } => {
                    info!(%peer, ?granted, ?failed, lifetime, "registration");
                    if lifetime > 0 && !granted.is_empty() {
                        Stats::bump(&self.stats.reg_granted);
                    }
                }
                Output::RegistrationLapsed { peer, types } => {
                    let again = self.host.reregistering(&peer);
                    warn!(%peer, ?types, again, "registration lapsed unanswered");
                    Stats::bump(&self.stats.reg_lapsed);
                }
                Output::Registered {
                    peer,
                    types,
                    lifetime,
                } => {
                    info!(%peer, ?types, lifetime, "peer registration");
                    if lifetime == 0 {
                        Stats::bump(&self.stats.rvs_cancelled);
                    } else {
                        Stats::bump(&self.stats.rvs_renewed);
                    }
                }
                Output::RegistrationExpired { peer, types } => {
                    info!(%peer, ?types, "peer registration expired: no more relaying");
                    Stats::bump(&self.stats.rvs_expired);
                }
            }
        }
    }

    fn forget(&mut self, peer: &Hit) {
        self.esp.remove(peer);
        self.established.remove(peer);
        if let Some(q) = self.queues.remove(peer) {
            for _ in q {
                Stats::bump(&self.stats.queue_dropped);
            }
        }
    }

    fn flush_queue(&mut self, peer: Hit) {
        let Some(q) = self.queues.remove(&peer) else {
            return;
        };
        let our_hit = self.host.hit();
        for pkt in q {
            if let Ok(o) = beet::outbound(&pkt, &our_hit) {
                let (nh, payload) = (o.next_header, o.payload);
                if !self.send_esp(&peer, nh, payload) {
                    Stats::bump(&self.stats.queue_dropped);
                }
            }
        }
    }

    async fn set_locator(&mut self, ip: IpAddr) -> Result<usize, String> {
        if !self.listen.ip().is_unspecified() && self.listen.ip() != ip {
            let addr = SocketAddr::new(ip, self.listen.port());
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|e| format!("bind {addr}: {e}"))?;
            // tokio's try_send_to refuses to write until the reactor has
            // seen the new socket writable; without this wait the UPDATE
            // below would be dropped and only its retransmission (500 ms
            // later) would get through.
            s.writable()
                .await
                .map_err(|e| format!("socket {addr}: {e}"))?;
            self.sock = s;
            self.listen = addr;
        }
        let v6 = match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        let now = Instant::now();
        let mut told = 0;
        let mut peers: Vec<Hit> = self.established.iter().copied().collect();
        peers.sort();
        for peer in peers {
            let Some(spi) = self.host.keys(&peer).map(|k| k.our_spi) else {
                continue;
            };
            let set = LocatorSet(vec![Locator {
                traffic_type: 0,
                preferred: true,
                lifetime: LOCATOR_LIFETIME,
                addr: LocatorAddr::EspSpi { spi, addr: v6 },
            }]);
            match self.host.update_locators(now, peer, set, None) {
                Ok(outs) => {
                    told += 1;
                    Stats::bump(&self.stats.updates_sent);
                    self.handle(outs);
                }
                Err(e) => warn!(%peer, "UPDATE: {e}"),
            }
        }
        info!(%ip, told, "locator changed");
        Ok(told)
    }

    /// CLOSE to every peer on shutdown; the loop then keeps running (HIP
    /// and timers only) so that `Host::poll` retransmits each CLOSE until its
    /// CLOSE_ACK arrives or `close_grace` ends (RFC 7401 §6.14).
    fn close_all(&mut self) {
        let mut peers: Vec<Hit> = self.established.iter().copied().collect();
        peers.sort();
        for peer in peers {
            match self.host.close(Instant::now(), peer) {
                Ok(outs) => {
                    self.closing.push(peer);
                    self.handle(outs);
                }
                Err(e) => debug!(%peer, "close: {e}"),
            }
        }
    }

    fn export(&self) -> Vec<u8> {
        let mut peers: Vec<&Hit> = self.established.iter().collect();
        peers.sort();
        let carried: Vec<Carried> = peers
            .into_iter()
            .filter_map(|p| {
                Some(Carried {
                    sa: self.esp.sa_state(p)?,
                    lsi: self.lsis.lsi(p)?,
                    blob: self.host.export_association(p).ok()?,
                })
            })
            .collect();
        info!(associations = carried.len(), "exported");
        handover::encode(&carried)
    }

    fn import(&mut self, state: &[u8]) -> Result<(), Error> {
        for c in handover::decode(state)? {
            let peer = self.host.import_association(&c.blob)?;
            let keys = self
                .host
                .keys(&peer)
                .cloned()
                .ok_or(Error::Restore(peer, EspDrop::NoSa))?;
            self.esp
                .install(peer, &keys)
                .and_then(|_| self.esp.restore(&peer, c.sa))
                .map_err(|e| Error::Restore(peer, e))?;
            self.lsis.bind(peer, c.lsi)?;
            self.established.insert(peer);
            info!(%peer, out_seq = c.sa.out_seq, "association imported");
        }
        Ok(())
    }

    fn status(&mut self) -> String {
        let mut hits: Vec<Hit> = self
            .peers
            .keys()
            .chain(self.established.iter())
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        hits.sort();
        let mut s = format!(
            "self {} lsi {} listen {}\n",
            self.host.hit(),
            self.our_lsi,
            self.listen
        );
        for h in hits {
            let addr = self
                .host
                .peer_addr(&h)
                .or(self.peers.get(&h).copied().flatten());
            s.push_str(&format!(
                "peer {h} lsi {} state {:?} addr {}\n",
                self.lsis.ensure(h),
                self.host.state(&h),
                addr.map_or("-".to_string(), |a| a.to_string())
            ));
        }
        s
    }
}
