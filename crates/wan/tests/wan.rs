//! Namespace tests: real namespaces, real TUN devices, real TCP/UDP traffic through the
//! emulator. Need root. Tests take a global lock so throughput figures are not skewed by a
//! neighbour test on this 2-core machine.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use roam_wan::control::{self, LinkUpdate, Request};
use roam_wan::netns::{self, unique_name, NetNs};
use roam_wan::{probe, LinkParams, PortConfig, Wan, WanConfig, WanHandle};

static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes the timing tests and gives this test's thread (and so every probe and
/// emulator thread it starts) `nice -10`: on a machine busy with other work the probes must
/// not measure their own scheduling delays.
fn serial() -> MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    probe::renice_current_thread(-10).unwrap();
    g
}

const OFFICE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const HOME: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const THIRD: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);

/// Namespaces plus a WAN between them; the WAN is shut down before the namespaces go.
struct Lab {
    wan: Option<WanHandle>,
    ns: Vec<NetNs>,
}

impl Lab {
    fn new(n: usize, link: LinkParams) -> Self {
        Self::with(n, link, 1500)
    }

    fn with(n: usize, link: LinkParams, mtu: u32) -> Self {
        let names = ["office", "home", "third"];
        let addrs = ["198.18.1.2/24", "198.18.2.2/24", "198.18.3.2/24"];
        let ns: Vec<NetNs> = (0..n)
            .map(|i| NetNs::create(&unique_name(&format!("wt-{}", names[i]))).unwrap())
            .collect();
        let ports = (0..n)
            .map(|i| PortConfig::new(names[i], ns[i].name(), addrs[i].parse().unwrap()))
            .collect();
        let mut cfg = WanConfig::new(ports, link);
        cfg.mtu = mtu;
        let wan = Wan::start(cfg).unwrap();
        Self { wan: Some(wan), ns }
    }
    fn wan(&self) -> &WanHandle {
        self.wan.as_ref().unwrap()
    }
    fn ns(&self, i: usize) -> &str {
        self.ns[i].name()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(w) = self.wan.take() {
            w.shutdown();
        }
    }
}

fn link(bw: f64, rtt: f64) -> LinkParams {
    LinkParams {
        bandwidth_mbit: bw,
        rtt_ms: rtt,
        ..LinkParams::default()
    }
}

fn median_rtt(lab: &Lab) -> Duration {
    let _echo = probe::UdpEcho::start(lab.ns(1), SocketAddrV4::new(HOME, 7)).unwrap();
    let r = probe::udp_rtt(
        lab.ns(0),
        SocketAddrV4::new(HOME, 7),
        21,
        Duration::from_millis(10),
    )
    .unwrap();
    assert_eq!(
        r.samples.len(),
        r.sent,
        "no probe may be lost on a loss-free link"
    );
    r.median().unwrap()
}

#[test]
fn rtt_matches_setting() {
    let _g = serial();
    let lab = Lab::new(2, link(100.0, 40.0));
    let m40 = median_rtt(&lab);
    lab.wan().set_link(link(100.0, 10.0)).unwrap();
    let m10 = median_rtt(&lab);
    // Asymmetric: 15 ms office->home, still 5 ms home->office.
    lab.wan()
        .set_link_directed("office", "home", link(100.0, 30.0))
        .unwrap();
    let m_asym = median_rtt(&lab);
    assert!(
        m_asym >= Duration::from_millis(20) && m_asym <= Duration::from_millis(22),
        "{m_asym:?}"
    );
    eprintln!("RTT: setting 40 ms -> median {m40:?}; setting 10 ms -> median {m10:?}");
    assert!(
        m40 >= Duration::from_millis(40) && m40 <= Duration::from_millis(44),
        "{m40:?}"
    );
    assert!(
        m10 >= Duration::from_millis(10) && m10 <= Duration::from_millis(11),
        "{m10:?}"
    );
}

#[test]
fn jitter_spreads_rtt_within_bounds() {
    let _g = serial();
    // ±3 ms each way on 20 ms: RTT within [14, 26] ms, and visibly spread.
    let lab = Lab::new(
        2,
        LinkParams {
            jitter_ms: 3.0,
            ..link(100.0, 20.0)
        },
    );
    let _echo = probe::UdpEcho::start(lab.ns(1), SocketAddrV4::new(HOME, 7)).unwrap();
    let r = probe::udp_rtt(
        lab.ns(0),
        SocketAddrV4::new(HOME, 7),
        30,
        Duration::from_millis(15),
    )
    .unwrap();
    // Lowest sample: the emulator never delivers early. 90th percentile rather than the
    // maximum above: one probe stalled by a busy machine is scheduling, not the link.
    let (lo, hi) = (r.samples[0], r.samples[r.samples.len() * 9 / 10]);
    eprintln!(
        "jitter: setting 20 ms ± 3 ms each way -> RTT min {lo:?}, p90 {hi:?}, median {:?}, max {:?}",
        r.median().unwrap(),
        r.samples[r.samples.len() - 1]
    );
    assert_eq!(r.samples.len(), 30);
    assert!(
        lo >= Duration::from_millis(14) && hi <= Duration::from_millis(28),
        "{lo:?} {hi:?}"
    );
    assert!(hi - lo >= Duration::from_millis(3), "{lo:?} {hi:?}");
}

#[test]
fn tcp_throughput_matches_setting() {
    let _g = serial();
    let lab = Lab::new(2, link(50.0, 40.0));
    let to = SocketAddrV4::new(HOME, 5001);
    let measure = |port: u16| {
        let to = SocketAddrV4::new(*to.ip(), port);
        probe::tcp_throughput(
            lab.ns(0),
            lab.ns(1),
            to,
            Duration::from_secs(1),
            Duration::from_secs(3),
        )
        .unwrap()
    };
    let r50 = measure(5001);
    lab.wan().set_link(link(100.0, 40.0)).unwrap();
    let r100 = measure(5002);
    eprintln!(
        "TCP goodput: setting 50 -> {:.1} Mbit/s; setting 100 -> {:.1} Mbit/s",
        r50.mbit(),
        r100.mbit()
    );
    // Goodput is at most 1448/1500 of the IP rate (TCP/IP headers with timestamps).
    for (r, set) in [(r50, 50.0), (r100, 100.0)] {
        assert!(
            r.mbit() >= set * 0.9 && r.mbit() <= set * 1.0,
            "{} vs {set}",
            r.mbit()
        );
    }
    let s = lab.wan().stats();
    let l = s.link("office", "home").unwrap();
    assert_eq!(l.drop_loss, 0);
    assert_eq!(l.drop_tx_error, 0);
}

#[test]
fn loss_rate_matches_setting() {
    let _g = serial();
    let lab = Lab::new(
        2,
        LinkParams {
            loss_pct: 5.0,
            ..link(100.0, 10.0)
        },
    );
    let n = 20_000;
    let r = probe::udp_loss(
        lab.ns(0),
        lab.ns(1),
        SocketAddrV4::new(HOME, 6000),
        n,
        200,
        10_000,
        Duration::from_millis(300),
    )
    .unwrap();
    let s = lab.wan().stats();
    let l = s.link("office", "home").unwrap();
    let lost_pct = (r.sent - r.received) as f64 * 100.0 / r.sent as f64;
    eprintln!(
        "loss: setting 5 % -> {lost_pct:.2} % of {} datagrams; emulator counted {}",
        r.sent, l.drop_loss
    );
    assert_eq!(r.sent, n);
    // Expected 1000 lost, sigma ~31: allow 5 sigma.
    assert!(
        (845..=1155).contains(&(n - r.received)),
        "lost {}",
        n - r.received
    );
    // Every missing datagram was a deliberate loss, nothing else.
    assert_eq!(l.drop_loss, n - r.received);
    assert_eq!(l.drop_queue, 0);
}

/// Counts datagrams arriving at `addr` inside `ns` until `stop`.
fn udp_counter(
    ns: &str,
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    thread::JoinHandle<Result<(), netns::NetnsError>>,
) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = netns::spawn_in(ns, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .unwrap();
    rx.recv().unwrap();
    (count, h)
}

/// Sends a datagram to `to` from inside `ns` every ms until `stop`.
fn udp_pacer(
    ns: &str,
    to: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<(), netns::NetnsError>> {
    netns::spawn_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = s.send_to(b"tick", to);
            thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap()
}

fn wait_count(c: &AtomicU64, dur: Duration) -> u64 {
    let before = c.load(Ordering::Relaxed);
    thread::sleep(dur);
    c.load(Ordering::Relaxed) - before
}

#[test]
fn outage_blocks_everything_then_traffic_resumes() {
    let _g = serial();
    let lab = Lab::new(2, link(10.0, 20.0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, rx) = udp_counter(lab.ns(1), SocketAddrV4::new(HOME, 6001), stop.clone());
    let tx = udp_pacer(lab.ns(0), SocketAddrV4::new(HOME, 6001), stop.clone());
    let before = wait_count(&count, Duration::from_millis(300));
    lab.wan().set_outage(true);
    // A datagram the writer handed to the kernel just before may still be on its way up
    // to the receiving socket.
    thread::sleep(Duration::from_millis(20));
    let during = wait_count(&count, Duration::from_millis(500));
    lab.wan().set_outage(false);
    thread::sleep(Duration::from_millis(50)); // one RTT for the first packets to arrive
    let after = wait_count(&count, Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    tx.join().unwrap().unwrap();
    rx.join().unwrap().unwrap();
    let l = lab.wan().stats().link("office", "home").unwrap().clone();
    eprintln!("outage: {before} datagrams in 300 ms before, {during} in 500 ms during, {after} in 300 ms after; dropped {}", l.drop_outage);
    assert!(before > 100, "{before}");
    assert_eq!(during, 0);
    assert!(after > 100, "{after}");
    assert!(l.drop_outage > 300, "{}", l.drop_outage);
}

#[test]
fn three_ports_route_by_subnet_and_pair_outage() {
    let _g = serial();
    let lab = Lab::new(3, link(50.0, 4.0));
    let stop = Arc::new(AtomicBool::new(false));
    let (to_home, rx1) = udp_counter(lab.ns(1), SocketAddrV4::new(HOME, 6002), stop.clone());
    let (to_third, rx2) = udp_counter(lab.ns(2), SocketAddrV4::new(THIRD, 6002), stop.clone());
    let tx1 = udp_pacer(lab.ns(0), SocketAddrV4::new(HOME, 6002), stop.clone());
    let tx2 = udp_pacer(lab.ns(0), SocketAddrV4::new(THIRD, 6002), stop.clone());
    // 198.18.9.9 is inside the routed /15 but belongs to no port.
    let tx3 = udp_pacer(
        lab.ns(0),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 9), 6002),
        stop.clone(),
    );
    thread::sleep(Duration::from_millis(100));
    lab.wan()
        .set_outage_between("office", "home", true)
        .unwrap();
    thread::sleep(Duration::from_millis(20));
    let home = wait_count(&to_home, Duration::from_millis(300));
    let third = wait_count(&to_third, Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for h in [tx1, tx2, tx3, rx1, rx2] {
        h.join().unwrap().unwrap();
    }
    let s = lab.wan().stats();
    eprintln!(
        "pair outage: office->home {home}, office->third {third}; no-route {}",
        s.port("office").unwrap().drop_no_route
    );
    assert_eq!(home, 0);
    assert!(third > 100, "{third}");
    assert!(s.port("office").unwrap().drop_no_route > 100);
    assert!(s.link("office", "third").unwrap().fwd_packets > 200);
}

#[test]
fn shutdown_removes_tun_devices() {
    let _g = serial();
    let mut lab = Lab::with(2, link(10.0, 2.0), 1400);
    let has_dev = |ns: &str| {
        Command::new("ip")
            .args(["-n", ns, "link", "show", "wan0"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(has_dev(lab.ns(0)) && has_dev(lab.ns(1)));
    let show = Command::new("ip")
        .args(["-n", lab.ns(0), "link", "show", "wan0"])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("mtu 1400") && show.contains(",UP"), "{show}");
    lab.wan.take().unwrap().shutdown();
    assert!(!has_dev(lab.ns(0)) && !has_dev(lab.ns(1)));
}

#[test]
fn control_socket_changes_a_running_wan() {
    let _g = serial();
    let lab = Lab::new(2, link(10.0, 2.0));
    let dir = std::env::temp_dir().join(unique_name("roam-wan-ctl"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ctl.sock");
    let stop = AtomicBool::new(false);
    thread::scope(|sc| {
        let server = sc.spawn(|| control::serve(lab.wan(), &sock, &stop));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let upd = LinkUpdate {
            rtt_ms: Some(30.0),
            loss_pct: Some(1.0),
            ..Default::default()
        };
        let r = control::call(
            &sock,
            &Request::Set {
                update: upd,
                between: None,
            },
        )
        .unwrap();
        assert_eq!(r.link.unwrap().rtt_ms, 30.0);
        assert_eq!(lab.wan().link("home", "office").unwrap().loss_pct, 1.0);
        assert_eq!(
            lab.wan().link("home", "office").unwrap().bandwidth_mbit,
            10.0
        );
        let bad = control::call(
            &sock,
            &Request::Outage {
                on: true,
                between: Some(("office".into(), "nowhere".into())),
            },
        );
        assert!(bad.is_err());
        let r = control::call(&sock, &Request::Stats).unwrap();
        assert_eq!(r.stats.unwrap().links.len(), 2);
        control::call(&sock, &Request::Shutdown).unwrap();
        server.join().unwrap().unwrap();
    });
    assert!(!sock.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills and reaps the child if the test fails before it exits.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn binary_runs_and_answers_ctl() {
    let _g = serial();
    let a = NetNs::create(&unique_name("wt-bin-a")).unwrap();
    let b = NetNs::create(&unique_name("wt-bin-b")).unwrap();
    let dir = std::env::temp_dir().join(unique_name("roam-wan-bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ctl.sock");
    let bin = env!("CARGO_BIN_EXE_roam-wan");
    let mut child = ChildGuard(
        Command::new(bin)
            .args([
                "run",
                "--port",
                &format!("office={},198.18.1.2/24", a.name()),
            ])
            .args(["--port", &format!("home={},198.18.2.2/24", b.name())])
            .args(["--bandwidth-mbit", "20", "--rtt-ms", "6", "--control"])
            .arg(&sock)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let ctl = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("ctl")
            .arg("--control")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Traffic through the child process, then read its counters.
    // home -> office, the direction the other tests use least.
    let _echo = probe::UdpEcho::start(a.name(), SocketAddrV4::new(OFFICE, 7)).unwrap();
    let r = probe::udp_rtt(
        b.name(),
        SocketAddrV4::new(OFFICE, 7),
        5,
        Duration::from_millis(5),
    )
    .unwrap();
    assert_eq!(r.samples.len(), 5);
    assert!(r.median().unwrap() >= Duration::from_millis(6));
    ctl(&["outage", "on"]);
    ctl(&["outage", "off"]);
    ctl(&["set", "--rtt-ms", "8"]);
    let json = ctl(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["link"]["rtt_ms"], 8.0);
    let fwd = v["stats"]["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["fwd_packets"].as_u64().unwrap())
        .sum::<u64>();
    assert!(fwd >= 10, "{json}");
    ctl(&["shutdown"]);
    let status = child.0.wait().unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
