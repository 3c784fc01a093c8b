//! The router: TUN ports, reader and writer threads, and the handle that controls them.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{DelayLine, InvalidParam, LinkModel, LinkParams, Verdict};
use crate::net::{ipv4_dst, Ipv4Cidr, RouteTable};
use crate::stats::{snap_link, snap_port, LinkCounters, PortCounters, WanStats};
use crate::tun::{self, Tun, TunError};

/// Packets due within this much of now are written in the same wake-up: it bounds how many
/// times a writer sleeps per second at high rates and is far below any emulated delay.
const RELEASE_SLACK: Duration = Duration::from_micros(50);
/// Packets held for one destination at most. The model bounds this by rate × delay + queue
/// on a rate-limited link; this cap bounds memory on an unlimited one (drops count as
/// queue drops). At 1500 B, about 400 MiB.
const MAX_IN_FLIGHT: usize = 1 << 18;
/// Readers re-check the stop flag at least this often.
const POLL_MS: libc::c_int = 100;
/// Packets read in one burst before handing them to the writers.
const READ_BURST: usize = 64;

/// One host attached to the WAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortConfig {
    /// Port name ("office", "home").
    pub name: String,
    /// Namespace (under `/run/netns`) where the TUN device is created.
    pub netns: String,
    /// The host's address on the WAN and its subnet, e.g. `198.18.1.2/24`. Packets to that
    /// subnet are delivered to this port.
    pub addr_cidr: Ipv4Cidr,
    /// Further destination prefixes owned by this port (e.g. a LAN behind the host).
    #[serde(default)]
    pub extra_prefixes: Vec<Ipv4Cidr>,
    /// TUN interface name inside the namespace.
    #[serde(default = "default_ifname")]
    pub ifname: String,
}

fn default_ifname() -> String {
    "wan0".to_string()
}

impl PortConfig {
    /// A port with the default interface name and no extra prefixes.
    pub fn new(name: &str, netns: &str, addr_cidr: Ipv4Cidr) -> Self {
        Self {
            name: name.to_string(),
            netns: netns.to_string(),
            addr_cidr,
            extra_prefixes: Vec::new(),
            ifname: default_ifname(),
        }
    }
}

/// The whole emulated WAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanConfig {
    /// Attached hosts, at least two.
    pub ports: Vec<PortConfig>,
    /// Parameters of every path (each direction gets its own model and queue).
    pub link: LinkParams,
    /// MTU of the TUN devices.
    pub mtu: u32,
    /// Routed through the TUN in every namespace besides the other ports' prefixes.
    pub routes: Vec<Ipv4Cidr>,
    /// Seed of the loss/jitter generators (each direction derives its own).
    pub seed: u64,
    /// Scheduling of the forwarding threads.
    #[serde(default)]
    pub priority: ThreadPriority,
}

/// How the forwarding threads are scheduled. Their wake-up latency adds straight to the
/// emulated delay, so on a busy machine they should win the CPU over the work they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreadPriority {
    /// Inherit the caller's scheduling.
    Normal,
    /// `nice` value for the threads (negative needs root; failure is logged, not fatal).
    Nice(i8),
    /// `SCHED_FIFO` at this priority (1..=99): delay stays exact under any load, but a
    /// saturated emulator can take a whole core (the kernel keeps 5 % for others).
    Realtime(u8),
    /// The default: `nice -10`.
    #[default]
    Default,
}

fn apply_priority(p: ThreadPriority) {
    let res = match p {
        ThreadPriority::Normal => return,
        ThreadPriority::Default | ThreadPriority::Nice(_) => {
            let nice = if let ThreadPriority::Nice(n) = p {
                n
            } else {
                -10
            };
            // SAFETY: gettid has no preconditions; setpriority on our own tid affects only
            // this thread (Linux treats PRIO_PROCESS with a tid per thread).
            let rc = unsafe {
                libc::setpriority(
                    libc::PRIO_PROCESS,
                    libc::gettid() as libc::id_t,
                    nice.into(),
                )
            };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        ThreadPriority::Realtime(prio) => {
            let param = libc::sched_param {
                sched_priority: prio.clamp(1, 99).into(),
            };
            // SAFETY: pid 0 = the calling thread; param is a valid sched_param.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    if let Err(e) = res {
        tracing::warn!("cannot set thread priority {p:?}: {e}");
    }
}

impl WanConfig {
    /// Defaults: MTU 1500, route 198.18.0.0/15, seed 1, threads at `nice -10`.
    pub fn new(ports: Vec<PortConfig>, link: LinkParams) -> Self {
        let wan = Ipv4Cidr {
            addr: std::net::Ipv4Addr::new(198, 18, 0, 0),
            prefix: 15,
        };
        Self {
            ports,
            link,
            mtu: 1500,
            routes: vec![wan],
            seed: 1,
            priority: ThreadPriority::Default,
        }
    }
}

/// Errors starting or controlling the WAN.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// Bad link parameters.
    #[error(transparent)]
    Param(#[from] InvalidParam),
    /// TUN or namespace setup failed.
    #[error("port {port}: {source}")]
    Tun {
        /// Port name.
        port: String,
        /// Cause.
        source: TunError,
    },
    /// The configuration is inconsistent.
    #[error("bad config: {0}")]
    Config(String),
    /// No port of that name.
    #[error("no port named {0:?}")]
    NoSuchPort(String),
    /// A thread could not be started.
    #[error("spawn thread: {0}")]
    Spawn(io::Error),
}

/// A packet on its way to a destination port.
struct Pkt {
    src: usize,
    data: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Awake,
    Until(Instant),
    Forever,
}

struct InboxState {
    line: DelayLine<Pkt>,
    waiting: Waiting,
    stop: bool,
}

/// Packets bound for one port, released by that port's writer thread.
struct Inbox {
    state: Mutex<InboxState>,
    cv: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Port {
    name: String,
    tun: Tun,
    counters: PortCounters,
    inbox: Inbox,
}

/// Control and counters of one direction; the model itself lives in the reader thread.
struct LinkCtl {
    params: Mutex<LinkParams>,
    gen: AtomicU64,
    outage: AtomicBool,
    counters: LinkCounters,
}

struct Shared {
    ports: Vec<Port>,
    /// Index `src * n + dst`; the diagonal is unused.
    links: Vec<LinkCtl>,
    table: RouteTable,
    stop: AtomicBool,
}

impl Shared {
    fn link(&self, src: usize, dst: usize) -> &LinkCtl {
        &self.links[src * self.ports.len() + dst]
    }
}

/// A running WAN. Dropping it shuts it down like [`WanHandle::shutdown`].
pub struct WanHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Entry point.
pub struct Wan;

impl Wan {
    /// Opens a TUN device in every port's namespace and starts forwarding.
    pub fn start(cfg: WanConfig) -> Result<WanHandle, WanError> {
        cfg.link.validate()?;
        let n = cfg.ports.len();
        if n < 2 {
            return Err(WanError::Config("need at least two ports".into()));
        }
        if !(576..=65535).contains(&cfg.mtu) {
            return Err(WanError::Config(format!(
                "mtu {} not in 576..=65535",
                cfg.mtu
            )));
        }
        let mut table = RouteTable::default();
        for (i, p) in cfg.ports.iter().enumerate() {
            if cfg.ports[..i].iter().any(|q| q.name == p.name) {
                return Err(WanError::Config(format!("duplicate port name {}", p.name)));
            }
            table.add(p.addr_cidr, i);
            for x in &p.extra_prefixes {
                table.add(*x, i);
            }
        }
        let mut ports = Vec::with_capacity(n);
        for (i, p) in cfg.ports.iter().enumerate() {
            let mut routes = cfg.routes.clone();
            for (j, q) in cfg.ports.iter().enumerate() {
                if j != i {
                    routes.push(q.addr_cidr);
                    routes.extend(q.extra_prefixes.iter().copied());
                }
            }
            let tun = tun::open_in(&p.netns, &p.ifname, p.addr_cidr, cfg.mtu, &routes).map_err(
                |source| WanError::Tun {
                    port: p.name.clone(),
                    source,
                },
            )?;
            ports.push(Port {
                name: p.name.clone(),
                tun,
                counters: PortCounters::default(),
                inbox: Inbox {
                    state: Mutex::new(InboxState {
                        line: DelayLine::new(),
                        waiting: Waiting::Awake,
                        stop: false,
                    }),
                    cv: Condvar::new(),
                },
            });
        }
        let links = (0..n * n)
            .map(|_| LinkCtl {
                params: Mutex::new(cfg.link),
                gen: AtomicU64::new(0),
                outage: AtomicBool::new(false),
                counters: LinkCounters::default(),
            })
            .collect();
        let shared = Arc::new(Shared {
            ports,
            links,
            table,
            stop: AtomicBool::new(false),
        });
        let mut handle = WanHandle {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let s = shared.clone();
            let seed = cfg.seed;
            let link = cfg.link;
            let prio = cfg.priority;
            let name = &shared.ports[i].name;
            let t = thread::Builder::new()
                .name(format!("wan-rx-{name}"))
                .spawn(move || {
                    apply_priority(prio);
                    reader(&s, i, link, seed)
                })
                .map_err(WanError::Spawn)?;
            handle.threads.push(t);
            let s = shared.clone();
            let t = thread::Builder::new()
                .name(format!("wan-tx-{name}"))
                .spawn(move || {
                    apply_priority(prio);
                    writer(&s, i)
                })
                .map_err(WanError::Spawn)?;
            handle.threads.push(t);
        }
        Ok(handle)
    }
}

impl WanHandle {
    fn index(&self, name: &str) -> Result<usize, WanError> {
        self.shared
            .ports
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| WanError::NoSuchPort(name.to_string()))
    }

    fn pairs(&self) -> impl Iterator<Item = (usize, usize)> {
        let n = self.shared.ports.len();
        (0..n).flat_map(move |a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
    }

    fn set_params_of(&self, a: usize, b: usize, params: LinkParams) {
        let l = self.shared.link(a, b);
        *l.params.lock().unwrap_or_else(PoisonError::into_inner) = params;
        l.gen.fetch_add(1, Relaxed);
    }

    /// Port names in configuration order.
    pub fn port_names(&self) -> Vec<String> {
        self.shared.ports.iter().map(|p| p.name.clone()).collect()
    }

    /// Sets the parameters of every path (both directions). Queued packets keep their times.
    pub fn set_link(&self, params: LinkParams) -> Result<(), WanError> {
        params.validate()?;
        for (a, b) in self.pairs() {
            self.set_params_of(a, b, params);
        }
        Ok(())
    }

    /// Sets the parameters of the path between ports `a` and `b` (both directions).
    pub fn set_link_between(&self, a: &str, b: &str, params: LinkParams) -> Result<(), WanError> {
        params.validate()?;
        let (a, b) = (self.index(a)?, self.index(b)?);
        self.set_params_of(a, b, params);
        self.set_params_of(b, a, params);
        Ok(())
    }

    /// Sets the parameters of direction `from` → `to` only (asymmetric links).
    pub fn set_link_directed(
        &self,
        from: &str,
        to: &str,
        params: LinkParams,
    ) -> Result<(), WanError> {
        params.validate()?;
        let (a, b) = (self.index(from)?, self.index(to)?);
        self.set_params_of(a, b, params);
        Ok(())
    }

    /// The parameters of direction `from` → `to`.
    pub fn link(&self, from: &str, to: &str) -> Result<LinkParams, WanError> {
        let (a, b) = (self.index(from)?, self.index(to)?);
        Ok(*self
            .shared
            .link(a, b)
            .params
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts or ends an outage on every path. While on, nothing is delivered: packets
    /// arriving are dropped and so are packets already in flight when they fall due.
    pub fn set_outage(&self, on: bool) {
        for (a, b) in self.pairs() {
            self.shared.link(a, b).outage.store(on, Relaxed);
        }
    }

    /// Starts or ends an outage on the path between `a` and `b` (both directions).
    pub fn set_outage_between(&self, a: &str, b: &str, on: bool) -> Result<(), WanError> {
        let (a, b) = (self.index(a)?, self.index(b)?);
        self.shared.link(a, b).outage.store(on, Relaxed);
        self.shared.link(b, a).outage.store(on, Relaxed);
        Ok(())
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> WanStats {
        let s = &self.shared;
        WanStats {
            ports: s
                .ports
                .iter()
                .map(|p| snap_port(&p.name, &p.counters))
                .collect(),
            links: self
                .pairs()
                .map(|(a, b)| snap_link(&s.ports[a].name, &s.ports[b].name, &s.link(a, b).counters))
                .collect(),
        }
    }

    /// Stops every thread and closes the TUN devices (they vanish from their namespaces).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for p in &self.shared.ports {
            p.inbox.lock().stop = true;
            p.inbox.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a WAN thread panicked");
            }
        }
    }
}

impl Drop for WanHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits up to [`POLL_MS`] for the fd to be readable.
fn wait_readable(fd: libc::c_int) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
}

/// Reads the port's TUN, runs each packet through the model of its direction and hands it to
/// the destination's writer. Owns the models of every direction leaving this port, so the
/// per-packet path takes no lock except the destination inbox's, once per burst.
fn reader(s: &Shared, me: usize, initial: LinkParams, seed: u64) {
    let n = s.ports.len();
    let port = &s.ports[me];
    let mut models: Vec<Option<LinkModel>> = (0..n)
        .map(|d| {
            let link_seed =
                seed ^ ((me as u64) << 32 | d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (d != me)
                .then(|| LinkModel::new(initial, link_seed).ok())
                .flatten()
        })
        .collect();
    let mut gens = vec![0u64; n];
    let mut batches: Vec<Vec<(Instant, Pkt)>> = (0..n).map(|_| Vec::new()).collect();
    let mut buf = vec![0u8; 65536];
    let mut read_failed = false;
    while !s.stop.load(Relaxed) {
        let mut got = 0;
        while got < READ_BURST {
            let len = match port.tun.read(&mut buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // E.g. EBADFD once the namespace (and with it the netdev) was deleted
                    // under us: say so once, then idle until shutdown.
                    if !read_failed {
                        tracing::warn!("read {}: {e}; port stops forwarding", port.name);
                        read_failed = true;
                    }
                    thread::sleep(Duration::from_millis(POLL_MS as u64));
                    break;
                }
            };
            got += 1;
            let now = Instant::now();
            let pkt = &buf[..len];
            port.counters.rx_packets.fetch_add(1, Relaxed);
            port.counters.rx_bytes.fetch_add(len as u64, Relaxed);
            let Some(dst_ip) = ipv4_dst(pkt) else {
                port.counters.drop_not_ipv4.fetch_add(1, Relaxed);
                continue;
            };
            let d = match s.table.lookup(dst_ip) {
                Some(d) if d != me => d,
                _ => {
                    port.counters.drop_no_route.fetch_add(1, Relaxed);
                    continue;
                }
            };
            let ctl = s.link(me, d);
            let Some(model) = models[d].as_mut() else {
                continue;
            };
            let g = ctl.gen.load(Relaxed);
            if g != gens[d] {
                gens[d] = g;
                let p = *ctl.params.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = model.set_params(p) {
                    tracing::warn!("link params rejected: {e}");
                }
            }
            model.set_outage(ctl.outage.load(Relaxed));
            match model.on_packet(now, len) {
                Verdict::Deliver(at) => batches[d].push((
                    at,
                    Pkt {
                        src: me,
                        data: pkt.to_vec(),
                    },
                )),
                Verdict::Drop(r) => ctl.counters.drop(r),
            }
        }
        for (d, batch) in batches.iter_mut().enumerate() {
            if !batch.is_empty() {
                let lost = hand_over(&s.ports[d].inbox, batch);
                s.link(me, d).counters.drop_queue.fetch_add(lost, Relaxed);
            }
        }
        if got == 0 && !read_failed {
            wait_readable(port.tun.fd().as_raw_fd());
        }
    }
}

/// Hands a burst to the destination's writer; returns how many packets did not fit under
/// [`MAX_IN_FLIGHT`].
fn hand_over(inbox: &Inbox, batch: &mut Vec<(Instant, Pkt)>) -> u64 {
    let earliest = batch.iter().map(|(t, _)| *t).min();
    let mut st = inbox.lock();
    let mut overflow = 0;
    for (at, p) in batch.drain(..) {
        if st.line.len() < MAX_IN_FLIGHT {
            st.line.push(at, p);
        } else {
            overflow += 1;
        }
    }
    // Wake the writer only if it sleeps past the new earliest packet; at steady state the
    // writer wakes by its own timer and never needs a signal.
    let wake = match (st.waiting, earliest) {
        (Waiting::Forever, _) => true,
        (Waiting::Until(t), Some(e)) => e < t,
        _ => false,
    };
    if wake {
        st.waiting = Waiting::Awake;
        inbox.cv.notify_one();
    }
    overflow
}

/// Writes packets into the port's TUN when they fall due.
fn writer(s: &Shared, me: usize) {
    // Default timer slack (50 us) would add up to that much to every delivery.
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let port = &s.ports[me];
    let mut due: Vec<Pkt> = Vec::with_capacity(256);
    let mut st = port.inbox.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        while due.len() < 256 {
            match st.line.pop_due(now + RELEASE_SLACK) {
                Some(p) => due.push(p),
                None => break,
            }
        }
        if !due.is_empty() {
            drop(st);
            for p in due.drain(..) {
                let ctl = s.link(p.src, me);
                if ctl.outage.load(Relaxed) {
                    ctl.counters.drop_outage.fetch_add(1, Relaxed);
                    continue;
                }
                match port.tun.write(&p.data) {
                    Ok(_) => {
                        ctl.counters.fwd_packets.fetch_add(1, Relaxed);
                        ctl.counters
                            .fwd_bytes
                            .fetch_add(p.data.len() as u64, Relaxed);
                    }
                    Err(_) => {
                        ctl.counters.drop_tx_error.fetch_add(1, Relaxed);
                    }
                }
            }
            st = port.inbox.lock();
            continue;
        }
        st = match st.line.next_due() {
            Some(t) => {
                st.waiting = Waiting::Until(t);
                let timeout = t.saturating_duration_since(now);
                port.inbox
                    .cv
                    .wait_timeout(st, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => {
                st.waiting = Waiting::Forever;
                port.inbox
                    .cv
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner)
            }
        };
        st.waiting = Waiting::Awake;
    }
}
