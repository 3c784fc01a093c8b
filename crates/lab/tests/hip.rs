//! Connections survive the move: a correspondent on a third subnet holds a TCP connection
//! to the echo service in a VM (by the VM's LSI, over HIP), streaming both ways, while the
//! VM migrates office → home. Real roamd hosts, real QEMU guest, real `roam-hip` endpoint
//! with a TUN device in the correspondent's namespace, the emulated WAN between them.

// Tests and their helpers may unwrap (project rule).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roam_control::api::{Outcome, Workload};
use roam_lab::echo::EchoClient;
use roam_lab::{Lab, LabConfig};
use roam_wan::LinkParams;

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
