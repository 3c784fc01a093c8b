//! Connections survive the move: a correspondent on a third subnet holds a TCP connection
//! to the echo service in a VM (by the VM's LSI, over HIP), streaming both ways, while the
//! VM migrates office → home. Real roamd hosts, real QEMU guest, real `roam-hip` endpoint
//! with a TUN device in the correspondent's namespace, the emulated WAN between them.

// Tests and their helpers may unwrap (project rule).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roam_control::api::{Outcome, Workload};
use roam_lab::{Lab, LabConfig};
use roam_wan::LinkParams;

/// Byte `i` of the stream: distinct at every offset (a lost, repeated or reordered run of
/// bytes of any length shows up as a mismatch).
fn pattern(i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[(i % 8) as usize]
}

#[derive(Default)]
struct Echo {
    sent: AtomicU64,
    received: AtomicU64,
    mismatch: Mutex<Option<String>>,
    /// Longest time between two reads that returned data, and when it ended.
    max_gap: Mutex<(Duration, Option<Instant>)>,
    stop_writing: AtomicBool,
    done: AtomicBool,
}

/// Connects (retrying while the guest gets its lease) and streams until told to stop.
fn stream(to: SocketAddr, echo: Arc<Echo>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let conn = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("connect {to}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let we = echo.clone();
    let writer = std::thread::spawn(move || {
        // 1 KiB every 5 ms: ~200 KB/s each way, steady, far below the link.
        let mut off = 0u64;
        while !we.stop_writing.load(Ordering::Relaxed) {
            let buf: Vec<u8> = (off..off + 1024).map(pattern).collect();
            if w.write_all(&buf).is_err() {
                break;
            }
            off += 1024;
            we.sent.store(off, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut r = conn;
    let mut buf = vec![0u8; 65536];
    let mut at = 0u64;
    let mut last = Instant::now();
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                let gap = now - last;
                last = now;
                {
                    let mut g = echo.max_gap.lock().unwrap();
                    if at > 0 && gap > g.0 {
                        *g = (gap, Some(now));
                    }
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    let i = at + k as u64;
                    if *b != pattern(i) {
                        let mut m = echo.mismatch.lock().unwrap();
                        if m.is_none() {
                            *m = Some(format!("byte {i}: got {b:#04x}, want {:#04x}", pattern(i)));
                        }
                    }
                }
                at += n as u64;
                echo.received.store(at, Ordering::Relaxed);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if echo.done.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(e) => {
                let _ = writer.join();
                return Err(format!("read after {at} bytes: {e}"));
            }
        }
    }
    let _ = writer.join();
    Ok(())
}

fn config() -> LabConfig {
    LabConfig {
        link: LinkParams {
            bandwidth_mbit: 100.0,
            rtt_ms: 40.0,
            loss_pct: 0.0,
            ..LinkParams::default()
        },
        memory_mib: 256,
        disk_bytes: 1 << 30,
        data_mib: 16,
        workload: Workload::default(),
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: true,
    }
}

async fn wait_received(echo: &Echo, at_least: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if echo.received.load(Ordering::Relaxed) >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

type Client = std::thread::JoinHandle<Result<Result<(), String>, roam_wan::netns::NetnsError>>;

/// A lab with a VM on office and a correspondent streaming through the VM's echo service.
async fn streaming_lab() -> (Lab, Arc<Echo>, Client, roam_control::api::VmNetInfo) {
    let mut lab = Lab::start(config()).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let info = lab.host("office").client.vm_show("desk").await.unwrap();
    let net = info.net.clone().expect("a new VM has a network identity");
    assert!(net.lsi.starts_with("198.19."), "{net:?}");
    let port = net.hip_port.expect("the VM's HIP endpoint runs");
    let peer = format!("{}@{}:{port}", net.hit, roam_lab::lab::HOSTS[0].1);
    lab.start_correspondent(&[peer]).await.unwrap();

    let to: SocketAddr = format!("{}:7", net.lsi).parse().unwrap();
    let echo = Arc::new(Echo::default());
    let ns = lab.correspondent_ns().unwrap().to_string();
    let e2 = echo.clone();
    let client = roam_wan::netns::spawn_in(&ns, move || stream(to, e2)).unwrap();
    // The stream runs before the move.
    if !wait_received(&echo, 100 << 10, Duration::from_secs(90)).await {
        // The echo service comes from the guest image's init: an image published from an
        // older scripts/guest-init.sh has none (rebuild: scripts/guest-image.sh --force).
        let serial = lab.root.join("office-run/vms/desk/serial.log");
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        panic!(
            "no echo from the VM through HIP (received {} bytes); guest echo service {}; \
             see {}/correspondent.log and {}",
            echo.received.load(Ordering::Relaxed),
            if log.contains("echo service on tcp port 7") {
                "started"
            } else {
                "NOT started (guest image without it?)"
            },
            lab.root.display(),
            serial.display()
        );
    }
    (lab, echo, client, net)
}

/// Stops writing and checks that every byte sent came back exactly once, in order.
async fn finish_stream(echo: &Echo, client: Client) -> u64 {
    echo.stop_writing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = echo.sent.load(Ordering::Relaxed);
    let all_back = wait_received(echo, sent, Duration::from_secs(20)).await;
    echo.done.store(true, Ordering::Relaxed);
    let res = tokio::task::spawn_blocking(move || client.join())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    res.unwrap_or_else(|e| panic!("stream: {e}"));
    let received = echo.received.load(Ordering::Relaxed);
    assert!(all_back, "sent {sent} bytes, {received} came back");
    assert_eq!(received, sent, "bytes duplicated or lost");
    assert_eq!(*echo.mismatch.lock().unwrap(), None);
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_to_a_vm_survives_its_migration() {
    let (lab, echo, client, net) = streaming_lab().await;
    let before = echo.received.load(Ordering::Relaxed);
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    let moved_at = Instant::now();

    // The stream goes on after the move: at least another 200 KiB echoed from home.
    let after = echo.received.load(Ordering::Relaxed);
    assert!(
        wait_received(&echo, after + (200 << 10), Duration::from_secs(30)).await,
        "the connection stalled after the move ({} bytes received, {after} at the switch)",
        echo.received.load(Ordering::Relaxed)
    );
    let home = lab.host("home").client.vm_show("desk").await.unwrap();
    assert_eq!(home.net.as_ref().map(|n| &n.hit), Some(&net.hit));

    // Stop writing; everything sent must come back exactly once, in order.
    let sent = finish_stream(&echo, client).await;
    let (gap, gap_at) = *echo.max_gap.lock().unwrap();
    println!(
        "HIP handover: {sent} bytes each way ({before} before the move), longest gap between \
         received bytes {} ms (it ended {:?} before the migration call returned), \
         migration downtime {:?} ms, guest downtime {:?} ms",
        gap.as_millis(),
        gap_at.map(|t| moved_at.saturating_duration_since(t)),
        r.downtime_ms,
        r.guest_downtime_ms
    );
    assert!(
        gap < Duration::from_secs(10),
        "the stream stopped for {gap:?}"
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_to_a_vm_survives_an_aborted_migration() {
    let (mut lab, echo, client, _net) = streaming_lab().await;
    let home_pid = lab.host_mut("home").pid().expect("home roamd runs");
    let killed = AtomicBool::new(false);
    let r = lab
        .migrate("desk", "office", "home", |p| {
            if p.phase == roam_control::api::Phase::DiskBulk
                && p.disk_sent_bytes > 2 << 20
                && !killed.swap(true, Ordering::SeqCst)
            {
                // SAFETY: kill(2) on a pid the lab spawned and has not reaped.
                unsafe { libc::kill(home_pid as i32, libc::SIGKILL) };
            }
        })
        .await
        .unwrap();
    assert!(killed.load(Ordering::SeqCst), "home was never killed");
    assert_eq!(r.outcome, Outcome::Aborted);
    // The VM stayed on office, and so did its endpoint: the stream goes on.
    let after = echo.received.load(Ordering::Relaxed);
    assert!(
        wait_received(&echo, after + (100 << 10), Duration::from_secs(30)).await,
        "the connection stalled after the abort"
    );
    let sent = finish_stream(&echo, client).await;
    let (gap, _) = *echo.max_gap.lock().unwrap();
    println!(
        "aborted migration: {sent} bytes each way, longest gap {} ms",
        gap.as_millis()
    );
    lab.shutdown().await;
}

/// Starts a TCP client in the correspondent's namespace streaming through the echo
/// service at `to`; returns once 64 KiB came back.
async fn stream_through(lab: &Lab, to: SocketAddr, what: &str) -> (Arc<Echo>, Client, Duration) {
    let ns = lab.correspondent_ns().unwrap().to_string();
    let echo = Arc::new(Echo::default());
    let e2 = echo.clone();
    let t0 = Instant::now();
    let client = roam_wan::netns::spawn_in(&ns, move || stream(to, e2)).unwrap();
    assert!(
        wait_received(&echo, 64 << 10, Duration::from_secs(60)).await,
        "{what}: no echo through the rendezvous server (received {} bytes); see {}",
        echo.received.load(Ordering::Relaxed),
        lab.root.display()
    );
    (echo, client, t0.elapsed())
}

/// Rendezvous (RFC 8004 with RFC 8003 registration): the VM registers its HIT with a
/// rendezvous server; a correspondent that knows only that HIT and the server's address
/// reaches the VM's echo service; the VM migrates office → home and the connection
/// survives (the VM's UPDATE re-points the server too); then the correspondent moves to
/// another subnet and, having lost all state, reaches the VM again through the server:
/// both ends have moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_finds_a_vm_after_both_ends_moved() {
    use roam_lab::hipproc::{self, MOVED_CORRESPONDENT_IP, PORT, RVS_IP};
    let lab = Lab::start(config()).await.unwrap();
    let rvs = hipproc::start_rvs(&lab).await.unwrap();
    let rvs_at = format!("{RVS_IP}:{PORT}");
    let rvs_spec = format!("{}@{rvs_at}", rvs.hit);
    lab.create_vm_with_rvs("office", "desk", Some(rvs_spec.clone()))
        .await
        .unwrap();
    let net = lab
        .host("office")
        .client
        .vm_show("desk")
        .await
        .unwrap()
        .net
        .unwrap();
    assert_eq!(net.rvs.as_deref(), Some(rvs_spec.as_str()));
    let office = roam_lab::lab::HOSTS[0].1;
    let home = roam_lab::lab::HOSTS[1].1;
    // Registration: the server knows the VM's HIT at office's address.
    let registered_at = |at: &str| {
        let at = format!("addr {at}:");
        let hit = net.hit.clone();
        let st = rvs.ctl("status").unwrap_or_default();
        st.lines()
            .any(|l| l.contains(&hit) && l.contains("Established") && l.contains(&at))
    };
    assert!(
        roam_lab::lab::wait_until(Duration::from_secs(20), || registered_at(office)).await,
        "the VM did not register with the RVS: {}\n{}",
        rvs.ctl("status").unwrap_or_default(),
        rvs.log_text()
    );

    // The correspondent knows the VM's HIT and the RVS's address, nothing else.
    let id = lab.root.join("corr.id");
    let ns = lab.correspondent_ns().unwrap().to_string();
    let mut corr = hipproc::start_correspondent(
        &lab,
        "corr",
        roam_lab::lab::CORRESPONDENT_IP,
        &id,
        std::slice::from_ref(&net.hit),
        Some(&rvs_at),
    )
    .await
    .unwrap();
    // `roam vm peer-add`: the running VM's endpoint learns the correspondent at once, and
    // the peer travels with the VM's record.
    let corr_at = format!("{}@{}:{PORT}", corr.hit, roam_lab::lab::CORRESPONDENT_IP);
    let shown = lab
        .host("office")
        .client
        .vm_peer_add("desk", &corr_at)
        .await
        .unwrap();
    assert_eq!(shown.net.unwrap().peers, vec![corr_at.clone()]);
    let log = std::fs::read_to_string(&lab.host("office").log).unwrap();
    assert!(
        log.contains("peer added"),
        "the running endpoint was not told"
    );
    let to: SocketAddr = format!("{}:7", net.lsi).parse().unwrap();
    let (echo, client, first) = stream_through(&lab, to, "first connection").await;
    assert_eq!(rvs.stat("rvs_relayed"), 1, "{}", rvs.log_text());
    let st = corr.ctl("status").unwrap();
    assert!(st.contains(&format!("addr {office}:")), "{st}");

    // The VM moves; the connection survives, and the server follows the VM.
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    let after = echo.received.load(Ordering::Relaxed);
    assert!(
        wait_received(&echo, after + (100 << 10), Duration::from_secs(30)).await,
        "the connection stalled after the move"
    );
    let sent = finish_stream(&echo, client).await;
    let at_home = lab.host("home").client.vm_show("desk").await.unwrap();
    assert_eq!(at_home.net.unwrap().peers, vec![corr_at]);
    assert!(
        roam_lab::lab::wait_until(Duration::from_secs(10), || registered_at(home)).await,
        "the RVS did not follow the VM: {}",
        rvs.ctl("status").unwrap_or_default()
    );

    // The correspondent moves to another subnet and starts afresh (same identity, no
    // association, no idea where the VM went): only the server can find it.
    corr.stop();
    hipproc::wan_addr(&ns, "add", &format!("{MOVED_CORRESPONDENT_IP}/32")).unwrap();
    hipproc::wan_addr(
        &ns,
        "del",
        &format!("{}/24", roam_lab::lab::CORRESPONDENT_IP),
    )
    .unwrap();
    let corr2 = hipproc::start_correspondent(
        &lab,
        "corr-moved",
        MOVED_CORRESPONDENT_IP,
        &id,
        std::slice::from_ref(&net.hit),
        Some(&rvs_at),
    )
    .await
    .unwrap();
    assert_eq!(corr2.hit, corr.hit);
    let (echo2, client2, second) = stream_through(&lab, to, "after both moved").await;
    let sent2 = finish_stream(&echo2, client2).await;
    assert_eq!(rvs.stat("rvs_relayed"), 2, "{}", rvs.log_text());
    let st = corr2.ctl("status").unwrap();
    assert!(st.contains(&format!("addr {home}:")), "{st}");
    println!(
        "rendezvous: first connection echoed 64 KiB after {} ms, {sent} bytes each way \
         across the move (migration downtime {:?} ms); after both moved, 64 KiB after {} ms, \
         {sent2} bytes each way",
        first.as_millis(),
        r.downtime_ms,
        second.as_millis()
    );
    drop(corr2);
    drop(rvs);
    lab.shutdown().await;
}
