//! End-to-end tests of the `roam-hip` endpoint in network namespaces (run
//! as root): a base exchange carrying TCP by LSI and by HIT across a router,
//! a locator change during a running stream (RFC 8046 UPDATE), and garbage
//! and replayed datagrams on port 10500.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn tcp_by_lsi_and_hit_through_a_router() {
    let lab = Lab::new("a");
    let server = echo_server(&lab.vm.ns, 5001, 2);
    let by_lsi = SocketAddr::new(IpAddr::V4(lab.vm.lsi), 5001);
    let hit: Ipv6Addr = lab.vm.hit.parse().unwrap();
    let by_hit = SocketAddr::new(IpAddr::V6(hit), 5001);
    let started = Instant::now();
    let r = echo_client(&lab.corr.ns, by_lsi, 256 * 1024, 4096, Duration::ZERO)
        .join()
        .unwrap_or_else(|_| panic!("LSI stream failed\n{}", lab.logs()));
    println!(
        "LSI stream: {} bytes echoed in {:?}",
        r.bytes,
        started.elapsed()
    );
    let r = echo_client(&lab.corr.ns, by_hit, 256 * 1024, 4096, Duration::ZERO)
        .join()
        .unwrap_or_else(|_| panic!("HIT stream failed\n{}", lab.logs()));
    println!("HIT stream: {} bytes echoed", r.bytes);
    server.join().unwrap();
    let (a, b) = (lab.corr.stats(), lab.vm.stats());
    assert_eq!(a["established"], 1, "{}", lab.logs());
    assert_eq!(b["established"], 1);
    assert!(a["esp_out"] > 100 && b["esp_in"] > 100, "{a:?} {b:?}");
    for k in [
        "esp_replayed",
        "esp_invalid",
        "hip_dropped",
        "esp_bad_inner",
    ] {
        assert_eq!(a[k] + b[k], 0, "{k}: {a:?} {b:?}");
    }
    let status = lab.corr.ctl("status");
    assert!(status.contains(&format!("peer {} lsi {}", lab.vm.hit, lab.vm.lsi)));
    assert!(status.contains("state Established"), "{status}");
}

#[test]
fn stream_survives_a_locator_change() {
    let lab = Lab::new("b");
    let server = echo_server(&lab.vm.ns, 5002, 1);
    let to = SocketAddr::new(IpAddr::V4(lab.vm.lsi), 5002);
    // 4 KiB every 5 ms (~6.5 Mbit/s) for about 3 s.
    let total = 600 * 4096;
    let client = echo_client(&lab.corr.ns, to, total, 4096, Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(lab.corr.stats()["established"], 1, "{}", lab.logs());
    // The VM host leaves subnet 1 for subnet 2.
    let moved = Instant::now();
    in_ns(
        &lab.vm.ns,
        &["ip", "route", "replace", "default", "via", "198.18.2.1"],
    );
    in_ns(
        &lab.vm.ns,
        &["ip", "addr", "del", "198.18.1.2/24", "dev", "v1"],
    );
    let told = lab.vm.ctl(&format!("locator {VM_ADDR2}"));
    assert_eq!(told.trim(), "ok 1", "{}", lab.logs());
    let told_at = moved.elapsed();
    // The correspondent follows once the UPDATE is verified.
    while !lab.corr.ctl("status").contains(VM_ADDR2) && moved.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let followed_at = moved.elapsed();
    let r = client
        .join()
        .unwrap_or_else(|_| panic!("stream broke\n{}", lab.logs()));
    for l in lab.logs().lines() {
        if ["locator", "moved", "acknowledged"]
            .iter()
            .any(|k| l.contains(k))
        {
            println!("{l}");
        }
    }
    println!("move → UPDATE sent {told_at:?}, correspondent switched {followed_at:?}");
    server.join().unwrap();
    println!(
        "locator change at {:?} after start: {} bytes echoed intact, longest gap {:?} (at {:?})",
        moved.elapsed(),
        r.bytes,
        r.max_gap,
        r.gap_at
    );
    let (a, b) = (lab.corr.stats(), lab.vm.stats());
    assert_eq!(a["peer_moves"], 1, "{a:?}\n{}", lab.logs());
    assert_eq!(b["updates_sent"], 1);
    // The correspondent checked the new locator (RFC 8046 echo) and sent
    // within its credit meanwhile.
    assert_eq!(a["rr_verified"], 1, "{a:?}\n{}", lab.logs());
    assert_eq!(a["rr_failed"], 0, "{a:?}");
    println!(
        "return routability: verified {}, packets held for credit {}",
        a["rr_verified"], a["rr_held"]
    );
    let status = lab.corr.ctl("status");
    assert!(
        status.contains(&format!("addr {VM_ADDR2}:10500")),
        "{status}"
    );
    // Seen here: about 10 ms (fast retransmit covers the packets sent to
    // the old locator); an RTO-driven recovery would still be well below.
    assert!(
        r.max_gap < Duration::from_millis(1500),
        "gap {:?}",
        r.max_gap
    );
}

/// Waits for one ESP datagram arriving in `ns` for `dst`:10500 (AF_PACKET;
/// outgoing packets on a veth are not reliably seen, incoming ones are).
fn capture_esp(ns: &str, dst: [u8; 4]) -> std::thread::JoinHandle<Vec<u8>> {
    spawn_in(ns, move || {
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 16 || p[9] != 17 || p[16..20] != dst {
                continue;
            }
            let udp = &p[ihl..];
            let port = u16::from_be_bytes([udp[2], udp[3]]);
            if port == 10500 && udp[8..12] != [0, 0, 0, 0] {
                return udp[8..].to_vec();
            }
        }
        panic!("no ESP packet seen");
    })
}

#[test]
fn garbage_and_replays_are_counted_and_dropped() {
    let lab = Lab::new("c");
    let server = echo_server(&lab.vm.ns, 5003, 2);
    let to = SocketAddr::new(IpAddr::V4(lab.vm.lsi), 5003);
    let cap = capture_esp(&lab.vm.ns, [198, 18, 1, 2]);
    echo_client(&lab.corr.ns, to, 64 * 1024, 1024, Duration::from_millis(1))
        .join()
        .unwrap();
    let esp = cap.join().unwrap();
    // Let the closing stream's last segments land before counting.
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.vm.stats();
    let target: SocketAddr = format!("{VM_ADDR1}:10500").parse().unwrap();
    let esp2 = esp.clone();
    spawn_in(&lab.corr.ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        // Replays of a packet the VM host already accepted.
        for _ in 0..5 {
            s.send_to(&esp2, target).unwrap();
        }
        // Same SPI, far-ahead sequence number, no valid ICV: a forgery.
        let mut forged = esp2.clone();
        forged[4..8].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
        s.send_to(&forged, target).unwrap();
        let mut x = 0x2545_f491u32;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        for len in 0..300usize {
            let mut d: Vec<u8> = (0..len % 100).map(|_| rnd()).collect();
            // A third look like HIP control packets (zero marker).
            if len % 3 == 0 && d.len() >= 4 {
                d[..4].copy_from_slice(&[0, 0, 0, 0]);
            }
            if d.len() >= 4 && d[..4] == [0, 0, 0, 0] && len % 3 != 0 {
                d[0] = 1;
            }
            s.send_to(&d, target).unwrap();
            // Paced so the kernel's socket buffer never overflows and
            // every datagram reaches the endpoint's counters.
            std::thread::sleep(Duration::from_micros(300));
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = lab.vm.stats();
    let d = |k: &str| after[k] - before[k];
    println!(
        "dropped: replayed {} invalid {} unknown_spi {} hip {} garbage {}",
        d("esp_replayed"),
        d("esp_invalid"),
        d("esp_unknown_spi"),
        d("hip_dropped"),
        d("udp_garbage")
    );
    assert_eq!(d("esp_replayed"), 5, "{after:?}");
    assert!(d("esp_invalid") >= 1);
    // Lengths 0..8 are too short for RFC 5770, a zero marker makes the
    // rest HIP (rejected by the decoder or the state machine) or ESP for
    // an SPI that does not exist.
    assert_eq!(d("udp_garbage"), 24, "{after:?}");
    assert_eq!(d("hip_dropped"), 92, "{after:?}");
    assert_eq!(d("esp_unknown_spi"), 184, "{after:?}");
    assert_eq!(d("esp_in"), 0, "nothing forged was delivered");
    // The association still carries data.
    let r = echo_client(&lab.corr.ns, to, 64 * 1024, 4096, Duration::ZERO)
        .join()
        .unwrap_or_else(|_| panic!("association broken\n{}", lab.logs()));
    assert_eq!(r.bytes, 64 * 1024);
    server.join().unwrap();
    assert_eq!(lab.vm.stats()["established"], 1);
}

/// Polls `what` until `cond` holds (5 s at most).
fn wait_for(what: impl Fn() -> String, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = what();
        if cond(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn rendezvous_server_finds_a_host_that_moved() {
    let lab = Lab::with_rvs("d");
    let rvs = lab.rvs.as_ref().unwrap();
    let st = wait_for(|| lab.vm.ctl("status"), |s| s.contains("state Established"));
    assert!(
        st.contains(&rvs.hit),
        "VM host not registered: {st}\n{}",
        lab.logs()
    );
    // The VM host moves before anyone talks to it: only the RVS hears.
    in_ns(
        &lab.vm.ns,
        &["ip", "route", "replace", "default", "via", "198.18.2.1"],
    );
    in_ns(
        &lab.vm.ns,
        &["ip", "addr", "del", "198.18.1.2/24", "dev", "v1"],
    );
    assert_eq!(lab.vm.ctl(&format!("locator {VM_ADDR2}")).trim(), "ok 1");
    let st = wait_for(|| rvs.ctl("status"), |s| s.contains(VM_ADDR2));
    assert!(st.contains(&format!("addr {VM_ADDR2}:10500")), "{st}");
    // The correspondent knows only the VM's HIT and the RVS's address.
    let server = echo_server(&lab.vm.ns, 5004, 1);
    let hit: Ipv6Addr = lab.vm.hit.parse().unwrap();
    let r = echo_client(
        &lab.corr.ns,
        SocketAddr::new(IpAddr::V6(hit), 5004),
        64 * 1024,
        4096,
        Duration::ZERO,
    )
    .join()
    .unwrap_or_else(|_| panic!("stream via RVS failed\n{}", lab.logs()));
    server.join().unwrap();
    assert_eq!(r.bytes, 64 * 1024);
    assert_eq!(rvs.stats()["rvs_relayed"], 1, "{}", lab.logs());
    let st = lab.corr.ctl("status");
    assert!(st.contains(&format!("addr {VM_ADDR2}:10500")), "{st}");
}

/// The VM's associations move to another endpoint process at another
/// locator (what roamd does at migration): keys, SPIs and ESP sequence
/// numbers carry over, no new base exchange, no replay rejects.
#[test]
fn associations_move_to_a_new_endpoint_at_a_new_locator() {
    let mut lab = Lab::new("e");
    let server = echo_server(&lab.vm.ns, 5005, 1);
    let to = SocketAddr::new(IpAddr::V4(lab.vm.lsi), 5005);
    let total = 500 * 4096;
    let client = echo_client(&lab.corr.ns, to, total, 4096, Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(1000));
    let moved = Instant::now();
    in_ns(
        &lab.vm.ns,
        &["ip", "route", "replace", "default", "via", "198.18.2.1"],
    );
    in_ns(
        &lab.vm.ns,
        &["ip", "addr", "del", "198.18.1.2/24", "dev", "v1"],
    );
    let took = lab.handover_vm(&format!("{VM_ADDR2}:10500"));
    let told = lab.vm.ctl(&format!("locator {VM_ADDR2}"));
    let announced = moved.elapsed();
    assert_eq!(told.trim(), "ok 1", "{}", lab.logs());
    let r = client
        .join()
        .unwrap_or_else(|_| panic!("stream broke\n{}", lab.logs()));
    server.join().unwrap();
    println!(
        "handover: export+restart {took:?}, UPDATE out {announced:?} after the move; \
         {} bytes echoed intact, longest gap {:?}",
        r.bytes, r.max_gap
    );
    let (a, b) = (lab.corr.stats(), lab.vm.stats());
    assert_eq!(a["established"], 1, "no second base exchange: {a:?}");
    assert_eq!(
        b["established"], 0,
        "the new endpoint imported, not exchanged"
    );
    assert_eq!(a["esp_replayed"] + b["esp_replayed"], 0, "{a:?} {b:?}");
    assert_eq!(a["esp_invalid"] + b["esp_invalid"], 0);
    assert!(b["esp_in"] > 50 && b["esp_out"] > 50, "{b:?}");
    assert_eq!(a["peer_moves"], 1);
    assert!(r.max_gap < Duration::from_secs(3), "gap {:?}", r.max_gap);
}
