//! End-to-end scenarios: real roamd hosts in network namespaces, a real QEMU guest with
//! roam's agent, the emulated WAN between them. Each test owns its lab; everything is
//! removed when the lab drops, also on failure.
//!
//! Sizes are smaller than the demo's (256 MiB guest, 1 GiB disk, 64 MiB of data) so that
//! the suite stays within its time budget on 2 cores under TCG; the paths are the same.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use roam_control::api::{Outcome, PeerAdd, Phase, Workload};
use roam_lab::{Lab, LabConfig};
use roam_wan::LinkParams;

fn small(link: LinkParams) -> LabConfig {
    LabConfig {
        link,
        memory_mib: 256,
        disk_bytes: 1 << 30,
        data_mib: 64,
        workload: Workload {
            mem_dirty_mib_s: 16,
            mem_working_set_mib: 32,
            disk_writes_per_s: 40,
            ..Default::default()
        },
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    }
}

fn wan(mbit: f64, rtt: f64, loss: f64) -> LinkParams {
    LinkParams {
        bandwidth_mbit: mbit,
        rtt_ms: rtt,
        loss_pct: loss,
        ..LinkParams::default()
    }
}

async fn heartbeats_flow(lab: &Lab, host: &str, vm: &str) -> bool {
    let Ok(a) = lab.host(host).client.vm_agent(vm).await else {
        return false;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Ok(b) = lab.host(host).client.vm_agent(vm).await else {
        return false;
    };
    b.heartbeats > a.heartbeats + 10
}

async fn no_debris(lab: &Lab, host: &str) {
    // QEMU processes and NBD exports must match the VMs this host runs, no more.
    let running: Vec<String> = lab
        .host(host)
        .client
        .vm_list()
        .await
        .map(|v| {
            v.into_iter()
                .filter(|i| i.state == roam_control::api::VmState::Running)
                .map(|i| i.name)
                .collect()
        })
        .unwrap_or_default();
    let ok = roam_lab::lab::wait_until(Duration::from_secs(15), || {
        let mut exports = lab.nbd_exports(host);
        exports.sort();
        lab.debris(host).is_empty()
            && lab.qemu_processes(host).len() == running.len()
            && exports == running
    })
    .await;
    assert!(
        ok,
        "{host} left debris: {:?}, QEMU pids {:?}, NBD exports {:?}, for running VMs {running:?}",
        lab.debris(host),
        lab.qemu_processes(host),
        lab.nbd_exports(host)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_of_busy_vm_over_wan_loses_nothing_and_moves_back() {
    let lab = Lab::start(small(wan(100.0, 40.0, 0.1))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut phases = Vec::new();
    let r = lab
        .migrate("desk", "office", "home", |p| {
            if phases.last() != Some(&p.phase) {
                phases.push(p.phase);
            }
        })
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
    assert!(
        r.acked_writes > 0,
        "the workload made no acknowledged writes"
    );
    assert_eq!(r.acked_writes_lost, 0);
    assert!(!r.guest_rebooted);
    assert!(r.downtime_ms.is_some());
    assert!(r.guest_downtime_ms.is_some());
    assert!(r.bytes.disk > 0 && r.bytes.memory > 0);
    assert!(r.bytes.wire >= r.bytes.disk);
    assert!(phases.contains(&Phase::DiskBulk) && phases.contains(&Phase::Memory));
    assert!(
        heartbeats_flow(&lab, "home", "desk").await,
        "guest not alive at home"
    );
    // The source keeps its disk but no QEMU and no export.
    let office = lab.host("office").client.vm_show("desk").await.unwrap();
    assert_eq!(office.state, roam_control::api::VmState::Moved);
    assert!(office.disk_path.exists());
    no_debris(&lab, "office").await;
    no_debris(&lab, "home").await;
    // The old host's copy became a replica, kept fresh by the new primary.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let reps = lab
            .host("home")
            .client
            .replica_list(Some("desk"))
            .await
            .unwrap();
        // The guest keeps writing, so "lagging" by a chunk or two is the steady state.
        if reps.iter().any(|r| {
            r.host == "office"
                && matches!(
                    r.state,
                    roam_control::api::ReplicaState::InSync
                        | roam_control::api::ReplicaState::Lagging
                )
                && r.last_sync_unix_ms.is_some()
                && r.lag_bytes < 8 << 20
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "office never caught up as a replica: {reps:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // And back: the old host accepts its VM again at a higher generation.
    let back = lab.migrate("desk", "home", "office", |_| {}).await.unwrap();
    assert_eq!(back.outcome, Outcome::Completed, "{:?}", back.error);
    assert_eq!(back.acked_writes_lost, 0);
    // office kept its old copy: only what changed since travels back.
    assert!(
        back.chunks_skipped.unwrap_or(0) > 0,
        "no chunk was reused: {back:?}"
    );
    assert!(
        back.bytes.disk * 2 < r.bytes.disk,
        "return move sent {} disk bytes, the first move {}",
        back.bytes.disk,
        r.bytes.disk
    );
    assert!(heartbeats_flow(&lab, "office", "desk").await);
    let info = lab.host("office").client.vm_show("desk").await.unwrap();
    assert_eq!(info.generation, 3);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_mid_migration_leaves_vm_running_on_source() {
    let lab = Lab::start(small(wan(50.0, 20.0, 0.0))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    let wan = lab.wan.as_ref().unwrap();
    let cut = AtomicBool::new(false);
    let r = lab
        .migrate("desk", "office", "home", |p| {
            if p.phase == Phase::DiskBulk
                && p.disk_sent_bytes > 4 << 20
                && !cut.load(Ordering::SeqCst)
            {
                cut.store(true, Ordering::SeqCst);
                wan.set_outage(true);
            }
        })
        .await
        .unwrap();
    assert!(cut.load(Ordering::SeqCst), "the link was never cut");
    assert_eq!(r.outcome, Outcome::Aborted);
    eprintln!("abort reason: {}", r.error.as_deref().unwrap_or("<none>"));
    assert!(r.error.is_some());
    assert!(
        heartbeats_flow(&lab, "office", "desk").await,
        "guest not running on source"
    );
    wan.set_outage(false);
    no_debris(&lab, "office").await;
    no_debris(&lab, "home").await;
    // A second attempt succeeds.
    let again = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(again.outcome, Outcome::Completed, "{:?}", again.error);
    assert_eq!(again.acked_writes_lost, 0);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_mid_migration_leaves_vm_running_on_source() {
    let mut lab = Lab::start(small(wan(50.0, 20.0, 0.0))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    let home_pid = lab.host_mut("home").pid().expect("home roamd runs");
    let killed = AtomicBool::new(false);
    let r = lab
        .migrate("desk", "office", "home", |p| {
            if p.phase == Phase::DiskBulk
                && p.disk_sent_bytes > 4 << 20
                && !killed.load(Ordering::SeqCst)
            {
                killed.store(true, Ordering::SeqCst);
                // SAFETY: kill(2) on a pid we spawned and have not reaped.
                unsafe { libc::kill(home_pid as i32, libc::SIGKILL) };
            }
        })
        .await
        .unwrap();
    assert!(killed.load(Ordering::SeqCst), "home was never killed");
    assert_eq!(r.outcome, Outcome::Aborted);
    eprintln!("abort reason: {}", r.error.as_deref().unwrap_or("<none>"));
    assert!(r.error.is_some());
    assert!(
        heartbeats_flow(&lab, "office", "desk").await,
        "guest not running on source"
    );
    // home comes back: it cleans what the interrupted migration left.
    lab.host_mut("home").spawn().await.unwrap();
    no_debris(&lab, "home").await;
    no_debris(&lab, "office").await;
    let again = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(again.outcome, Outcome::Completed, "{:?}", again.error);
    assert_eq!(again.acked_writes_lost, 0);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_disk_full_is_refused_and_vm_stays() {
    let mut cfg = small(wan(1000.0, 2.0, 0.0));
    cfg.home_state_limit_mib = Some(48);
    let lab = Lab::start(cfg).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    lab.start_workload("office", "desk").await.unwrap();
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Aborted);
    let err = r.error.unwrap_or_default();
    eprintln!("abort reason: {err}");
    assert!(err.contains("disk full"), "error does not say why: {err}");
    assert!(heartbeats_flow(&lab, "office", "desk").await);
    no_debris(&lab, "home").await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_wrong_peer_key_is_refused_before_anything_is_exchanged() {
    let lab = Lab::start(small(wan(1000.0, 2.0, 0.0))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    // office pins a wrong key for home's address.
    let rogue_key = lab.host("office").key.clone(); // office's own key: certainly not home's
    lab.host("office")
        .client
        .peer_add(&PeerAdd {
            name: "rogue".into(),
            addr: lab.host("home").addr.clone(),
            key: rogue_key,
        })
        .await
        .unwrap();
    let r = lab
        .migrate("desk", "office", "rogue", |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Aborted);
    let err = r.error.unwrap_or_default();
    assert!(
        err.to_lowercase().contains("key"),
        "error does not name the key: {err}"
    );
    // home does not know office any more: it refuses the handshake.
    lab.host("home").client.peer_remove("office").await.unwrap();
    let r = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    assert_eq!(r.outcome, Outcome::Aborted);
    assert!(heartbeats_flow(&lab, "office", "desk").await);
    no_debris(&lab, "home").await;
    assert!(lab.host("home").client.vm_list().await.unwrap().is_empty());
    lab.shutdown().await;
}

/// The `roam` CLI, as a person runs it, against real daemons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roam_cli_drives_real_daemons() {
    let lab = Lab::start(small(wan(1000.0, 2.0, 0.0))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let roam = roam_lab::bins::find("roam").expect("roam binary built");
    let sock = lab.host("office").socket.clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&roam)
            .arg("--socket")
            .arg(&sock)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["vm", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "desk");
    assert_eq!(list[0]["state"], "running");
    let (code, out, _) = run(&["peer", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("home"));
    // A bad key is refused with a message that names what is wrong.
    let (code, _, err) = run(&["peer", "add", "x", "198.18.2.2:7000", "ed25519:nope"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("key"), "{err}");
    let (code, out, err) = run(&["migrate", "desk", "--to", "home"]);
    assert_eq!(code, Some(0), "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "vm",
        "from",
        "to",
        "outcome",
        "total_ms",
        "downtime_ms",
        "guest_downtime_ms",
        "bytes",
        "link",
        "acked_writes",
        "acked_writes_lost",
        "guest_rebooted",
        "accel",
    ] {
        assert!(r.get(key).is_some(), "result lacks {key}: {out}");
    }
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["acked_writes_lost"], 0);
    lab.shutdown().await;
}

/// roamd supervises QEMU: a QEMU that dies on its own is noticed, its disk export is
/// released, the VM is recorded as stopped, and it can be started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_dies_is_noticed_and_the_vm_can_start_again() {
    let lab = Lab::start(small(wan(1000.0, 2.0, 0.0))).await.unwrap();
    lab.create_vm("office", "desk").await.unwrap();
    let c = &lab.host("office").client;
    let pid = c.vm_show("desk").await.unwrap().pid.expect("QEMU pid");
    // SAFETY: kill(2) on the QEMU pid roamd reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.vm_show("desk").await.unwrap();
        if v.state == roam_control::api::VmState::Stopped {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {:?}", v.state);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    no_debris(&lab, "office").await;
    let v = c.vm_start("desk").await.unwrap();
    assert_eq!(v.state, roam_control::api::VmState::Running);
    assert!(heartbeats_flow(&lab, "office", "desk").await);
    lab.shutdown().await;
}
