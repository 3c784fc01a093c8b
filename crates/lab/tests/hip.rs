//! Connections survive the move: a correspondent on a third subnet holds a TCP connection
//! to the echo service in a VM (by the VM's LSI, over HIP), streaming both ways, while the
//! VM migrates office → home. Real roamd hosts, real QEMU guest, real `roam-hip` endpoint
//! with a TUN device in the correspondent's namespace, the emulated WAN between them.

// Tests and their helpers may unwrap (project rule).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roam_control::api::Outcome;
use roam_lab::echo::EchoClient;
use roam_lab::{Lab, LabConfig};

fn config() -> LabConfig {
    roam_lab::bench_net::handover_config(std::env::var_os("ROAM_LAB_KEEP").is_some())
}

/// A lab with a VM on office and a correspondent streaming through the VM's echo service
/// (addressed by the VM's LSI).
async fn streaming_lab() -> (Lab, EchoClient, roam_control::api::VmNetInfo) {
    streaming_lab_via(false).await
}

/// Like [`streaming_lab`]; `by_hit`: to the VM's HIT (IPv6; the guest has its SLAAC
/// address on the LAN, roamd's LAN NATs it to the HIT) instead of its LSI.
async fn streaming_lab_via(by_hit: bool) -> (Lab, EchoClient, roam_control::api::VmNetInfo) {
    let mut lab = Lab::start(config()).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let info = lab.host("office").client.vm_show("desk").await.unwrap();
    let net = info.net.clone().expect("a new VM has a network identity");
    assert!(net.lsi.starts_with("198.19."), "{net:?}");
    let port = net.hip_port.expect("the VM's HIP endpoint runs");
    let peer = format!("{}@{}:{port}", net.hit, roam_lab::lab::HOSTS[0].1);
    lab.start_correspondent(&[peer]).await.unwrap();

    let to: SocketAddr = if by_hit {
        format!("[{}]:7", net.hit).parse().unwrap()
    } else {
        format!("{}:7", net.lsi).parse().unwrap()
    };
    let client = match EchoClient::start(&lab, to).await {
        Ok(c) => c,
        Err(e) => {
            // The echo service comes from the guest image's init: an image published
            // from an older scripts/guest-init.sh has none (rebuild:
            // scripts/guest-image.sh --force).
            let serial = lab.root.join("office-run/vms/desk/serial.log");
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            panic!(
                "{e}; guest echo service {}; see {}/correspondent.log and {}",
                if log.contains("echo service on tcp port 7") {
                    "started"
                } else {
                    "NOT started (guest image without it?)"
                },
                lab.root.display(),
                serial.display()
            );
        }
    };
    (lab, client, net)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_to_a_vm_survives_its_migration() {
    let (lab, client, net) = streaming_lab().await;
    let echo = client.echo.clone();
    let before = echo.received();
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    let moved_at = Instant::now();

    // The stream goes on after the move: at least another 200 KiB echoed from home.
    let after = echo.received();
    assert!(
        echo.wait_received(after + (200 << 10), Duration::from_secs(30))
            .await,
        "the connection stalled after the move ({} bytes received, {after} at the switch)",
        echo.received()
    );
    let home = lab.host("home").client.vm_show("desk").await.unwrap();
    assert_eq!(home.net.as_ref().map(|n| &n.hit), Some(&net.hit));

    // Stop writing; everything sent must come back exactly once, in order.
    let sent = client.finish().await.unwrap();
    let (gap, gap_at) = echo.max_gap();
    println!(
        "HIP handover: {sent} bytes each way ({before} before the move), longest gap between \
         received bytes {} ms (it ended {:?} before the migration call returned), \
         guest paused {:?} ms (QEMU's downtime figure {:?} ms, heartbeat gap {:?} ms)",
        gap.as_millis(),
        gap_at.map(|t| moved_at.saturating_duration_since(t)),
        r.pause_ms,
        r.downtime_ms,
        r.guest_downtime_ms
    );
    assert!(
        gap < Duration::from_secs(10),
        "the stream stopped for {gap:?}"
    );
    lab.shutdown().await;
}

/// The same by the VM's HIT: IPv6 end to end, the guest unmodified (SLAAC on its LAN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_to_a_vm_by_its_hit_survives_its_migration() {
    let (lab, client, net) = streaming_lab_via(true).await;
    let echo = client.echo.clone();
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    let after = echo.received();
    assert!(
        echo.wait_received(after + (200 << 10), Duration::from_secs(30))
            .await,
        "the IPv6 connection stalled after the move ({} bytes received, {after} at the switch)",
        echo.received()
    );
    let home = lab.host("home").client.vm_show("desk").await.unwrap();
    assert_eq!(home.net.as_ref().map(|n| &n.hit), Some(&net.hit));
    let sent = client.finish().await.unwrap();
    let (gap, _) = echo.max_gap();
    println!(
        "HIP handover by HIT: {sent} bytes each way, longest gap {} ms, guest paused {:?} ms",
        gap.as_millis(),
        r.pause_ms
    );
    assert!(
        gap < Duration::from_secs(10),
        "the stream stopped for {gap:?}"
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_to_a_vm_survives_an_aborted_migration() {
    let (mut lab, client, _net) = streaming_lab().await;
    let echo = client.echo.clone();
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
    let after = echo.received();
    assert!(
        echo.wait_received(after + (100 << 10), Duration::from_secs(30))
            .await,
        "the connection stalled after the abort"
    );
    let sent = client.finish().await.unwrap();
    let (gap, _) = echo.max_gap();
    println!(
        "aborted migration: {sent} bytes each way, longest gap {} ms",
        gap.as_millis()
    );
    lab.shutdown().await;
}

/// The destination announces its locator before its guest runs; if it then calls
/// the handover off, the source must take the identity back and bring the peers back
/// to itself — with an UPDATE the peer does not discard as a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_survives_a_handover_refused_after_the_update() {
    let (mut lab, client, _net) = streaming_lab().await;
    let echo = client.echo.clone();
    let home = lab.host_mut("home");
    home.env
        .push(("ROAM_FAULTS".into(), "refuse-handover".into()));
    home.spawn().await.unwrap();
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Aborted, "the fault must abort the move");
    let home_log = std::fs::read_to_string(&lab.host("home").log).unwrap();
    assert!(
        home_log.contains("HIP: UPDATE with our locator sent"),
        "home never announced itself, so the move back was not exercised"
    );
    let office = lab.host("office").client.vm_show("desk").await.unwrap();
    assert_eq!(office.state, roam_control::api::VmState::Running);
    // The VM stayed on office and the peer came back to it: the stream goes on.
    let after = echo.received();
    assert!(
        echo.wait_received(after + (100 << 10), Duration::from_secs(30))
            .await,
        "the connection stalled after the refused handover ({} bytes, {after} at the abort)",
        echo.received()
    );
    let sent = client.finish().await.unwrap();
    let (gap, _) = echo.max_gap();
    println!(
        "refused handover: {sent} bytes each way, longest gap {} ms",
        gap.as_millis()
    );
    lab.shutdown().await;
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
    let t0 = Instant::now();
    let client = EchoClient::start(&lab, to).await.unwrap_or_else(|e| {
        panic!(
            "first connection via the RVS: {e}; see {}",
            lab.root.display()
        )
    });
    let first = t0.elapsed();
    let echo = client.echo.clone();
    assert_eq!(rvs.stat("rvs_relayed"), 1, "{}", rvs.log_text());
    let st = corr.ctl("status").unwrap();
    assert!(st.contains(&format!("addr {office}:")), "{st}");

    // The VM moves; the connection survives, and the server follows the VM.
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    let after = echo.received();
    assert!(
        echo.wait_received(after + (100 << 10), Duration::from_secs(30))
            .await,
        "the connection stalled after the move"
    );
    let sent = client.finish().await.unwrap();
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
    let t0 = Instant::now();
    let client2 = EchoClient::start(&lab, to)
        .await
        .unwrap_or_else(|e| panic!("after both moved: {e}; see {}", lab.root.display()));
    let second = t0.elapsed();
    let sent2 = client2.finish().await.unwrap();
    assert_eq!(rvs.stat("rvs_relayed"), 2, "{}", rvs.log_text());
    let st = corr2.ctl("status").unwrap();
    assert!(st.contains(&format!("addr {home}:")), "{st}");
    println!(
        "rendezvous: first connection echoed 100 KiB after {} ms, {sent} bytes each way \
         across the move (migration downtime {:?} ms); after both moved, 100 KiB after {} ms, \
         {sent2} bytes each way",
        first.as_millis(),
        r.downtime_ms,
        second.as_millis()
    );
    drop(corr2);
    drop(rvs);
    lab.shutdown().await;
}
