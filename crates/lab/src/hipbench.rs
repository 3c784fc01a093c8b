//! HIP base-exchange latency over the emulated WAN, direct and through a rendezvous
//! server, beside the RTT measured on the same paths in the same run.
//!
//! ```text
//!  ns I 198.18.1.2 ── WAN (every path: same delay) ── ns R 198.18.2.2  responder, registered
//!        │ fresh identity per round                        ▲            with the RVS at start
//!        │ direct:  I1 ─► R, R1 ◄─, I2 ─►, R2 ◄─            │ I1 + FROM + RVS_HMAC
//!        └ via RVS: I1 ─► RVS ────────────────────────────┘ then R1 (VIA_RVS) straight to I
//!                         ns V 198.18.3.2  rendezvous server (roam_hip::rvs::relay_for)
//!  rtt: UDP ping-pong I ─► R ─► I, the same path the exchange takes
//! ```
//!
//! The protocol runs in `roam_hip::Host`s on blocking UDP sockets (one thread per
//! namespace), so the figure is the protocol's own: two round trips plus the puzzle,
//! Diffie-Hellman and signatures (three for the direct exchange, one leg more via the
//! server). Built without optimisation the crypto adds tens of milliseconds.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roam_hip::wire::params::REG_TYPE_RENDEZVOUS;
use roam_hip::wire::udp::{classify, frame_hip, UdpPayload, HIP_UDP_PORT};
use roam_hip::{Config, Hit, Host, HostIdentity, Output, Packet};
use roam_wan::netns::{self, NetNs};
use roam_wan::{LinkParams, PortConfig, Wan, WanConfig};
use serde::Serialize;

use crate::lab::LabError;

const I_IP: [u8; 4] = [198, 18, 1, 2];
const R_IP: [u8; 4] = [198, 18, 2, 2];
const V_IP: [u8; 4] = [198, 18, 3, 2];
/// UDP port of the RTT echo on the responder's side.
const PING_PORT: u16 = 10600;

/// What one run measured (milliseconds, sorted samples).
#[derive(Debug, Clone, Serialize)]
pub struct HipFigures {
    /// The emulator's configured RTT.
    pub link_rtt_ms: f64,
    /// UDP round trips initiator → responder → initiator.
    pub rtt_ms: Vec<f64>,
    /// Complete base exchanges, Initiator's view (connect to ESTABLISHED).
    pub direct_ms: Vec<f64>,
    /// The same, the I1 sent to the rendezvous server and relayed.
    pub via_rvs_ms: Vec<f64>,
}

pub fn median(v: &[f64]) -> f64 {
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl HipFigures {
    /// The issue's target for the direct exchange: 2 × RTT + 20 ms (RTT as measured).
    pub fn target_ms(&self) -> f64 {
        2.0 * median(&self.rtt_ms) + 20.0
    }

    pub fn render(&self) -> String {
        let row = |name: &str, v: &[f64]| {
            format!(
                "  {name:<28} median {:7.1} ms  min {:7.1}  max {:7.1}  (n={})\n",
                median(v),
                v.first().copied().unwrap_or(f64::NAN),
                v.last().copied().unwrap_or(f64::NAN),
                v.len()
            )
        };
        let mut s = format!(
            "HIP base exchange over the WAN ({} ms RTT configured)\n",
            self.link_rtt_ms
        );
        s.push_str(&row("UDP round trip I-R", &self.rtt_ms));
        s.push_str(&row("base exchange, direct", &self.direct_ms));
        s.push_str(&row("base exchange, via RVS", &self.via_rvs_ms));
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn err(what: &str) -> impl Fn(String) -> LabError + '_ {
    move |e| LabError::Net(format!("{what}: {e}"))
}

/// Receives one HIP packet (or times out after the socket's read timeout).
fn recv_hip(s: &UdpSocket, buf: &mut [u8]) -> Option<(SocketAddr, Packet)> {
    let (n, from) = s.recv_from(buf).ok()?;
    match classify(&buf[..n]) {
        Ok(UdpPayload::Hip(p)) => Packet::decode(p).ok().map(|p| (from, p)),
        _ => None,
    }
}

/// A host that answers HIP until `stop`: the responder (which first registers with the
/// server at `register`) or the rendezvous server (`serve_rvs`).
fn serve(
    id: HostIdentity,
    listen: SocketAddr,
    serve_rvs: bool,
    register: Option<(Hit, SocketAddr)>,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
) -> Result<(), String> {
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut cfg = Config::default();
    if serve_rvs {
        cfg.services = vec![REG_TYPE_RENDEZVOUS];
    }
    let mut host = Host::new(id, cfg, Instant::now()).map_err(|e| e.to_string())?;
    match register {
        Some((hit, at)) => {
            let outs = host
                .connect_and_register(Instant::now(), hit, at, vec![REG_TYPE_RENDEZVOUS], 160)
                .map_err(|e| e.to_string())?;
            roam_hipnet::bench::send_all(&sock, outs);
        }
        None => ready.store(true, Ordering::SeqCst),
    }
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        if let Some((from, p)) = recv_hip(&sock, &mut buf) {
            if serve_rvs {
                match roam_hip::rvs::relay_for(&host, &p, from) {
                    Some(Ok((to, relayed))) => {
                        if let Ok(b) = relayed.encode() {
                            let _ = sock.send_to(&frame_hip(&b), to);
                        }
                        continue;
                    }
                    Some(Err(_)) => continue,
                    None => {}
                }
            }
            if let Ok(outs) = host.receive(Instant::now(), from, &p) {
                for o in &outs {
                    if matches!(o, Output::Registration { .. }) {
                        ready.store(true, Ordering::SeqCst);
                    }
                }
                roam_hipnet::bench::send_all(&sock, outs);
            }
        }
        let outs = host.poll(Instant::now());
        roam_hipnet::bench::send_all(&sock, outs);
    }
    Ok(())
}

/// One base exchange from a fresh identity to `peer`, sending I1 to `i1_to`.
fn exchange(peer: Hit, i1_to: SocketAddr) -> Result<Duration, String> {
    let listen = SocketAddr::from((I_IP, HIP_UDP_PORT));
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut host = Host::new(HostIdentity::generate(), Config::default(), Instant::now())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let outs = host
        .connect(start, peer, i1_to)
        .map_err(|e| e.to_string())?;
    let mut done = roam_hipnet::bench::send_all(&sock, outs);
    while !done && start.elapsed() < Duration::from_secs(10) {
        if let Some((from, p)) = recv_hip(&sock, &mut buf) {
            if let Ok(outs) = host.receive(Instant::now(), from, &p) {
                done = roam_hipnet::bench::send_all(&sock, outs);
            }
        }
        let outs = host.poll(Instant::now());
        roam_hipnet::bench::send_all(&sock, outs);
    }
    let took = start.elapsed();
    if done {
        Ok(took)
    } else {
        Err(format!("base exchange via {i1_to} did not complete"))
    }
}

/// UDP ping-pong samples from the initiator's namespace.
fn pings(n: usize) -> Result<Vec<f64>, String> {
    let s = UdpSocket::bind(SocketAddr::from((I_IP, 0))).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let to = SocketAddr::from((R_IP, PING_PORT));
    let mut v = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..n as u32 {
        let t = Instant::now();
        s.send_to(&i.to_be_bytes(), to).map_err(|e| e.to_string())?;
        // Answers to earlier, timed-out pings are skipped by their number.
        while let Ok(k) = s.recv(&mut buf) {
            if buf[..k] == i.to_be_bytes() {
                v.push(ms(t.elapsed()));
                break;
            }
        }
    }
    Ok(v)
}

/// Runs `rounds` exchanges each way over a WAN of `rtt_ms` (100 Mbit/s, no loss).
pub fn run(rtt_ms: f64, rounds: usize) -> Result<HipFigures, LabError> {
    let names = ["roam-hbi", "roam-hbr", "roam-hbv"];
    let mut nss = Vec::new();
    let mut ports = Vec::new();
    for (name, ip) in names.iter().zip([I_IP, R_IP, V_IP]) {
        let ns =
            NetNs::create(&netns::unique_name(name)).map_err(|e| LabError::Net(e.to_string()))?;
        let cidr = format!("{}.{}.{}.{}/24", ip[0], ip[1], ip[2], ip[3])
            .parse()
            .map_err(|e| LabError::Net(format!("{e}")))?;
        ports.push(PortConfig::new(name, ns.name(), cidr));
        nss.push(ns);
    }
    let link = LinkParams {
        bandwidth_mbit: 100.0,
        rtt_ms,
        loss_pct: 0.0,
        ..LinkParams::default()
    };
    let wan = Wan::start(WanConfig::new(ports, link)).map_err(|e| LabError::Net(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let res = measure(&nss, rounds, rtt_ms, &stop);
    stop.store(true, Ordering::SeqCst);
    wan.shutdown();
    drop(nss);
    res
}

type Server = std::thread::JoinHandle<Result<Result<(), String>, netns::NetnsError>>;

fn measure(
    nss: &[NetNs],
    rounds: usize,
    rtt_ms: f64,
    stop: &Arc<AtomicBool>,
) -> Result<HipFigures, LabError> {
    let spawn = |ns: &NetNs,
                 f: Box<dyn FnOnce() -> Result<(), String> + Send>|
     -> Result<Server, LabError> {
        netns::spawn_in(ns.name(), f).map_err(|e| LabError::Net(e.to_string()))
    };
    let (rid, vid) = (HostIdentity::generate(), HostIdentity::generate());
    let (rhit, vhit) = (rid.hit(), vid.hit());
    let v_at = SocketAddr::from((V_IP, HIP_UDP_PORT));
    let r_at = SocketAddr::from((R_IP, HIP_UDP_PORT));
    let (rready, vready) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut servers = Vec::new();
    let (s, v) = (stop.clone(), vready.clone());
    servers.push(spawn(
        &nss[2],
        Box::new(move || serve(vid, v_at, true, None, s, v)),
    )?);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !vready.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (s, r) = (stop.clone(), rready.clone());
    servers.push(spawn(
        &nss[1],
        Box::new(move || serve(rid, r_at, false, Some((vhit, v_at)), s, r)),
    )?);
    let s = stop.clone();
    servers.push(spawn(
        &nss[1],
        Box::new(move || {
            let sock =
                UdpSocket::bind(SocketAddr::from((R_IP, PING_PORT))).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            Ok(())
        }),
    )?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rready.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !rready.load(Ordering::SeqCst) {
        stop.store(true, Ordering::SeqCst);
        return Err(LabError::Net(
            "the responder did not register with the RVS".into(),
        ));
    }
    let figures = netns::run_in(nss[0].name(), move || -> Result<HipFigures, String> {
        let rtt = pings(20)?;
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            direct.push(ms(exchange(rhit, r_at)?));
            via.push(ms(exchange(rhit, v_at)?));
        }
        let mut f = HipFigures {
            link_rtt_ms: rtt_ms,
            rtt_ms: rtt,
            direct_ms: direct,
            via_rvs_ms: via,
        };
        for v in [&mut f.rtt_ms, &mut f.direct_ms, &mut f.via_rvs_ms] {
            v.sort_by(f64::total_cmp);
        }
        Ok(f)
    })
    .map_err(|e| LabError::Net(e.to_string()))?;
    stop.store(true, Ordering::SeqCst);
    for s in servers {
        match s.join() {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(LabError::Net(e)),
            Ok(Err(e)) => return Err(LabError::Net(e.to_string())),
            Err(_) => return Err(LabError::Net("bench thread panicked".into())),
        }
    }
    figures.map_err(err("HIP bench"))
}
