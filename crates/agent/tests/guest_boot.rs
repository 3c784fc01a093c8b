//! Real-VM test: scripts/setup.sh builds the guest, QEMU boots it under TCG
//! with a demo disk, the host monitor talks to the real agent, and the image
//! file is checked from the host after QEMU is killed.
//!
//! Needs root (apt, QEMU); fails (does not skip) when set-up fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{run_setup, start_qemu, wait_marker};

use roam_agent::mkdisk::{make_disk, MkdiskOptions};
use roam_agent::monitor::{AgentMonitor, MonitorStats};
use roam_agent::proto::WorkloadConfig;
use roam_agent::record;

fn show(what: &str, s: &MonitorStats) {
    eprintln!(
        "{what}: connects {} heartbeats {} max gap {:?} acks {} (max seq {:?}) decode errors {} agent errors {} {:?}",
        s.connects,
        s.heartbeats,
        s.max_gap,
        s.acks,
        s.max_acked_seq,
        s.decode_errors,
        s.agent_errors,
        s.last_agent_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_boots_writes_durably_and_verifies() {
    run_setup();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let sock = dir.path().join("agent.sock");
    let serial = dir.path().join("serial.log");
    let t = Instant::now();
    let disk = make_disk(&MkdiskOptions::new(&image, 1 << 30, 32)).unwrap();
    eprintln!("mkdisk: {disk:?} in {:?}", t.elapsed());

    let t0 = Instant::now();
    let mut qemu = start_qemu(dir.path(), &image, &sock, &serial, &[]);
    let mon = AgentMonitor::spawn(&sock);
    wait_marker(&serial, &mut qemu, Duration::from_secs(30)).await;
    let hello = mon
        .wait_hello(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; serial:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            )
        });
    eprintln!("hello after {:?}: {hello:?}", t0.elapsed());
    assert_eq!(hello.disk_size, Some(1 << 30));
    assert_eq!(hello.log, Some(disk.log));
    assert!(
        hello.data_mounted,
        "the ext4 part should be mounted at /data"
    );
    let boot_id = hello.boot_id;

    // Idle: heartbeats every 10 ms, no gap of 100 ms.
    mon.wait_for(Duration::from_secs(10), "heartbeats", |s| s.heartbeats >= 5)
        .await
        .unwrap();
    mon.reset_gap();
    let before = mon.stats().heartbeats;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = mon.stats();
    show("idle", &idle);
    assert!(
        idle.heartbeats - before >= 50,
        "only {} heartbeats in 1 s",
        idle.heartbeats - before
    );
    assert!(
        idle.max_gap < Duration::from_millis(100),
        "idle heartbeat gap {:?}",
        idle.max_gap
    );
    let rtt = mon.ping(Duration::from_secs(5)).await.unwrap();
    eprintln!("ping round trip {rtt:?}");

    // Disk + memory workload: acks arrive, heartbeats keep flowing.
    mon.configure(WorkloadConfig {
        disk_writes_per_s: 200,
        mem_dirty_mib_s: 20,
        mem_working_set_mib: 32,
        ..Default::default()
    })
    .await
    .unwrap();
    mon.reset_gap();
    let busy = mon
        .wait_for(Duration::from_secs(10), "100 acks", |s| s.acks >= 100)
        .await
        .unwrap();
    show("busy", &busy);
    assert!(
        busy.max_gap < Duration::from_millis(250),
        "busy heartbeat gap {:?}",
        busy.max_gap
    );

    // The host goes away and comes back (as during a migration): the agent
    // keeps writing, and the new connection sees the same boot.
    let acks_before = mon.acked();
    mon.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mon = AgentMonitor::spawn(&sock);
    let hello2 = mon.wait_hello(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        hello2.boot_id, boot_id,
        "reconnect must not change the boot id"
    );
    assert!(
        hello2.next_seq > acks_before.keys().max().copied().unwrap_or(0) + 20,
        "writes continued while disconnected: next_seq {} vs {} acked before",
        hello2.next_seq,
        acks_before.len()
    );
    mon.wait_for(Duration::from_secs(10), "acks after reconnect", |s| {
        s.acks >= 50
    })
    .await
    .unwrap();

    // Stop writing, then verify everything written so far.
    mon.configure(WorkloadConfig::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut acked = acks_before;
    acked.extend(mon.acked());
    let upto = *acked.keys().max().unwrap();
    let report = mon.verify(upto, Duration::from_secs(20)).await.unwrap();
    eprintln!("verify report: {report:?}");
    assert!(report.all_ok(), "verify found damage: {report:?}");
    assert_eq!(report.range.map(|r| r.0), Some(0));
    assert!(report.ok > upto, "every record 0..={upto} checked");
    assert_eq!(report.files.checked, 8, "32 MiB in 4 MiB files");
    assert_eq!(report.files.ok, 8);
    let st = mon.stats();
    show("end", &st);
    assert_eq!(st.boot_changes, 0);
    for (seq, sum) in &acked {
        assert_eq!(
            *sum,
            record::expected_sum(boot_id, *seq),
            "acked sum of seq {seq}"
        );
    }

    // Hard stop, then read the image as a file: every acked record is there.
    qemu.kill();
    let newest = hello2.next_seq.max(upto);
    let f = std::fs::File::open(&image).unwrap();
    let check = record::check_acked(&f, &disk.log, boot_id, &acked, newest).unwrap();
    eprintln!("host-side check of {} acks: {check:?}", acked.len());
    assert_eq!(
        check.bad_count, 0,
        "acked records lost or damaged: {:?}",
        check.bad
    );
    assert_eq!(check.checked, acked.len() as u64);
    eprintln!("total {:?}", t0.elapsed());
}
