//! Real QEMU 10 under TCG: boot, QMP, quit, local live migration, cancel.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use roam_vm::{
    Compression, Error, MigrationStatus, MigrationTuning, RunState, Vm, VmConfig, VmEvent,
};
use support::{
    guest, own_guest, process_exists, scratch, vm_config, vm_config_with, NbdServer, HEAVY,
    OWN_DISK, OWN_IO, OWN_TICK,
};

const BOOT: Duration = Duration::from_secs(60);
const MIGRATE: Duration = Duration::from_secs(60);

async fn boot(config: VmConfig) -> Vm {
    let vm = Vm::spawn(config).await.unwrap();
    let marker = guest().ready_marker;
    if let Err(e) = vm.wait_serial(&marker, BOOT).await {
        panic!("{e}\nserial log:\n{}", vm.serial_log());
    }
    vm
}

/// Destination: same config, own run dir, `-incoming defer`.
fn destination(src: &VmConfig, run_dir: &std::path::Path) -> VmConfig {
    let mut c = src.clone();
    c.run_dir = run_dir.to_path_buf();
    c.incoming = true;
    c
}

async fn wait_run_state(vm: &Vm, want: RunState) -> RunState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = vm.query_status().await.unwrap();
        if s == want || tokio::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_query_status_and_quit_cleanly() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let nbd = NbdServer::start(tmp.path(), 64 << 20);
    let run_dir = tmp.path().join("vm");
    eprintln!("guest image: {:?}", guest());
    let vm = boot(vm_config("boot", &run_dir, Some(nbd.disk()))).await;
    let pid = vm.pid().unwrap();
    assert!(run_dir.join("qmp.sock").exists());
    assert!(run_dir.join("agent.sock").exists());
    assert_eq!(vm.query_status().await.unwrap(), RunState::Running);
    // The out-of-band monitor negotiates OOB and runs `migrate-recover` there; QEMU
    // refuses it on a VM that is not in a paused post-copy, and says so.
    match vm.migrate_recover("unix:/nonexistent").await {
        Err(Error::Qmp { command, desc, .. }) => {
            assert_eq!(command, "migrate-recover");
            assert!(desc.contains("postcopy"), "{desc}");
        }
        other => panic!("migrate-recover out of band: {other:?}"),
    }
    if guest().own {
        // The NBD-backed virtio disk reached the guest.
        vm.wait_serial(OWN_DISK, Duration::from_secs(5))
            .await
            .unwrap();
    }

    let rate = vm
        .measure_dirty_rate(Duration::from_millis(300))
        .await
        .unwrap();
    assert!(rate < 256 << 20, "idle guest dirties {rate} B/s?");

    let mut events = vm.subscribe();
    vm.stop().await.unwrap();
    assert_eq!(vm.query_status().await.unwrap(), RunState::Paused);
    vm.cont().await.unwrap();
    assert_eq!(vm.query_status().await.unwrap(), RunState::Running);
    assert_eq!(events.recv().await.unwrap(), VmEvent::Stop);
    assert_eq!(events.recv().await.unwrap(), VmEvent::Resume);

    let status = vm.quit().await.unwrap();
    assert!(status.success(), "QEMU exit status {status}");
    assert!(!process_exists(pid), "QEMU {pid} left behind (zombie?)");
    assert!(!run_dir.exists(), "run dir not cleaned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_failure_reports_qemu_stderr_and_cleans_up() {
    let tmp = scratch();
    let run_dir = tmp.path().join("bad");
    let mut c = vm_config("bad", &run_dir, None);
    c.kernel = tmp.path().join("no-such-kernel");
    let err = Vm::spawn(c).await.unwrap_err();
    match err {
        Error::EarlyExit { stderr, .. } => assert!(stderr.contains("no-such-kernel"), "{stderr}"),
        other => panic!("unexpected error {other}"),
    }
    assert!(!run_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_with_pause_before_switchover() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let nbd = NbdServer::start(tmp.path(), 64 << 20);
    let src_cfg = vm_config("mig", &tmp.path().join("src"), Some(nbd.disk()));
    let dst_cfg = destination(&src_cfg, &tmp.path().join("dst"));
    let uri = format!("unix:{}", tmp.path().join("mig.sock").display());
    // Exercise multifd + zstd: both ends must agree on channels and compression.
    let tuning = MigrationTuning {
        multifd_channels: Some(2),
        compression: Compression::Zstd { level: 1 },
        downtime_limit_ms: 300,
        max_bandwidth_bytes_per_s: Some(1 << 30),
        switchover_bandwidth_bytes_per_s: Some(1 << 30),
        ..Default::default()
    };

    let src = boot(src_cfg).await;
    let dst = Vm::spawn(dst_cfg).await.unwrap();
    assert_eq!(dst.query_status().await.unwrap(), RunState::Inmigrate);
    dst.apply_tuning(&tuning).await.unwrap();
    dst.migrate_incoming(&uri).await.unwrap();

    src.apply_tuning(&tuning).await.unwrap();
    let mut src_events = src.subscribe();
    src.migrate(&uri).await.unwrap();
    let paused = src
        .wait_migration_status(&[MigrationStatus::PreSwitchover], MIGRATE)
        .await
        .unwrap();
    assert_eq!(paused.status, MigrationStatus::PreSwitchover);
    // The guest is stopped while roam would sync storage; the destination waits.
    assert_ne!(src.query_status().await.unwrap(), RunState::Running);
    assert_eq!(dst.query_status().await.unwrap(), RunState::Inmigrate);

    src.migrate_continue_pre_switchover().await.unwrap();
    let done = src
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap();
    let ram = done.ram.clone().unwrap();
    assert!(ram.transferred > 0 && ram.multifd_bytes > 0, "{ram:?}");
    // Guest RAM plus small device RAM blocks (ROMs).
    assert!(ram.total >= 256 << 20 && ram.total < 260 << 20, "{ram:?}");
    assert!(done.downtime_ms.is_some() && done.total_time_ms.is_some());
    dst.wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap();
    assert_eq!(
        wait_run_state(&dst, RunState::Running).await,
        RunState::Running
    );
    assert_eq!(src.query_status().await.unwrap(), RunState::Postmigrate);

    // The source saw the events roam steers by.
    let mut seen = Vec::new();
    while let Ok(ev) = src_events.try_recv() {
        seen.push(ev);
    }
    assert!(seen
        .iter()
        .any(|e| matches!(e, VmEvent::MigrationPass { .. })));
    for want in [
        VmEvent::Migration {
            status: MigrationStatus::PreSwitchover,
        },
        VmEvent::Migration {
            status: MigrationStatus::Completed,
        },
        VmEvent::Stop,
    ] {
        assert!(seen.contains(&want), "missing {want:?} in {seen:?}");
    }

    // Never `cont` the source (two live copies): roam-vm refuses it. Quit it instead.
    assert!(matches!(src.cont().await, Err(Error::Refused(_))));
    assert_eq!(src.query_status().await.unwrap(), RunState::Postmigrate);
    src.quit().await.unwrap();
    if guest().own {
        dst.wait_serial(OWN_TICK, Duration::from_secs(10))
            .await
            .unwrap();
    }
    assert_eq!(dst.query_status().await.unwrap(), RunState::Running);
    eprintln!(
        "migration: total {:?} ms, downtime {:?} ms, {} bytes sent",
        done.total_time_ms, done.downtime_ms, ram.transferred
    );
    dst.quit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_cancel_leaves_source_running() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let nbd = NbdServer::start(tmp.path(), 64 << 20);
    let src_cfg = vm_config("cancel", &tmp.path().join("src"), Some(nbd.disk()));
    let dst_cfg = destination(&src_cfg, &tmp.path().join("dst"));
    let uri = format!("unix:{}", tmp.path().join("mig.sock").display());
    // Slow enough (2 MB/s for ~100 MB) that the migration is still active when cancelled.
    let tuning = MigrationTuning {
        max_bandwidth_bytes_per_s: Some(2_000_000),
        postcopy: true,
        ..Default::default()
    };

    let src = boot(src_cfg).await;
    let dst = Vm::spawn(dst_cfg).await.unwrap();
    dst.apply_tuning(&tuning).await.unwrap();
    dst.migrate_incoming(&uri).await.unwrap();
    src.apply_tuning(&tuning).await.unwrap();
    src.migrate(&uri).await.unwrap();
    src.wait_migration_status(&[MigrationStatus::Active], MIGRATE)
        .await
        .unwrap();
    let during = src.query_migrate().await.unwrap();
    assert!(during.ram.as_ref().is_some_and(|r| r.remaining > 0));

    src.migrate_cancel().await.unwrap();
    let err = src
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap_err();
    // Cancelled, or Failed when QEMU saw the channel break before it finished
    // cancelling (the destination closes its end as soon as the stream stops): both
    // are an end that is not a completion, which is what a cancel must give.
    assert!(
        matches!(
            err,
            Error::MigrationEnded {
                status: MigrationStatus::Cancelled | MigrationStatus::Failed,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        wait_run_state(&src, RunState::Running).await,
        RunState::Running
    );
    // The destination gives up on its own: the incoming stream broke.
    let mut dst = dst;
    let exit = tokio::time::timeout(Duration::from_secs(10), dst.wait()).await;
    eprintln!("destination after cancel: {exit:?}");
    assert!(matches!(exit, Ok(Ok(ref st)) if !st.success()), "{exit:?}");
    assert!(dst.kill().await.is_ok());
    src.quit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_switch_after_precopy_start() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let nbd = NbdServer::start(tmp.path(), 64 << 20);
    let src_cfg = vm_config("postcopy", &tmp.path().join("src"), Some(nbd.disk()));
    let dst_cfg = destination(&src_cfg, &tmp.path().join("dst"));
    let uri = format!("unix:{}", tmp.path().join("mig.sock").display());
    // Throttled pre-copy so the switch to post-copy happens with RAM still to move.
    let tuning = MigrationTuning {
        max_bandwidth_bytes_per_s: Some(5_000_000),
        postcopy: true,
        ..Default::default()
    };

    let src = boot(src_cfg).await;
    let dst = Vm::spawn(dst_cfg).await.unwrap();
    dst.apply_tuning(&tuning).await.unwrap();
    dst.migrate_incoming(&uri).await.unwrap();
    src.apply_tuning(&tuning).await.unwrap();
    src.migrate(&uri).await.unwrap();
    src.wait_migration_status(&[MigrationStatus::Active], MIGRATE)
        .await
        .unwrap();
    src.migrate_start_postcopy().await.unwrap();
    // pause-before-switchover also holds the switch to post-copy.
    src.wait_migration_status(&[MigrationStatus::PreSwitchover], MIGRATE)
        .await
        .unwrap();
    src.migrate_continue_pre_switchover().await.unwrap();
    let done = src
        .wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap();
    let ram = done.ram.clone().unwrap();
    assert!(ram.postcopy_bytes > 0, "no post-copy phase: {ram:?}");
    assert_eq!(
        wait_run_state(&dst, RunState::Running).await,
        RunState::Running
    );
    assert_eq!(src.query_status().await.unwrap(), RunState::Postmigrate);
    src.quit().await.unwrap();
    dst.quit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_disk_survives_nbd_server_restart() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let mut nbd = NbdServer::start(tmp.path(), 64 << 20);
    // Our own init reads /dev/vda (uncached) every 200 ms and prints the outcome.
    let g = own_guest();
    let cfg = vm_config_with(&g, "nbdre", &tmp.path().join("vm"), Some(nbd.disk()));
    let vm = Vm::spawn(cfg).await.unwrap();
    vm.wait_serial(&format!("{OWN_IO} ok"), BOOT).await.unwrap();

    // reconnect-delay (5 s) covers a 1 s outage: guest reads stall, then succeed.
    let nbd = tokio::task::spawn_blocking(move || {
        nbd.restart(Duration::from_secs(1));
        nbd
    })
    .await
    .unwrap();
    let ok_before = vm.serial_log().matches(&format!("{OWN_IO} ok")).count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = vm.serial_log();
        assert!(
            !log.contains(&format!("{OWN_IO} err")),
            "guest saw an I/O error:\n{log}"
        );
        if log.matches(&format!("{OWN_IO} ok")).count() >= ok_before + 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "guest I/O did not resume:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(vm.query_status().await.unwrap(), RunState::Running);
    vm.quit().await.unwrap();
    drop(nbd);
}

/// roam's handover rule: a destination started with `-S` loads the migration but does not
/// run the guest; if it then refuses (roam: the disk digests differ), the completed source
/// can be resumed — the one safe `cont` after `postmigrate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_destination_refuses_and_the_source_resumes() {
    let _heavy = HEAVY.lock().await;
    let tmp = scratch();
    let nbd = NbdServer::start(tmp.path(), 64 << 20);
    let src_cfg = vm_config("held", &tmp.path().join("src"), Some(nbd.disk()));
    let mut dst_cfg = destination(&src_cfg, &tmp.path().join("dst"));
    dst_cfg.start_paused = true;
    let uri = format!("unix:{}", tmp.path().join("mig.sock").display());
    let tuning = MigrationTuning::default();

    let src = boot(src_cfg).await;
    let dst = Vm::spawn(dst_cfg).await.unwrap();
    dst.apply_tuning(&tuning).await.unwrap();
    dst.migrate_incoming(&uri).await.unwrap();
    src.apply_tuning(&tuning).await.unwrap();
    src.migrate(&uri).await.unwrap();
    if tuning.pause_before_switchover {
        src.wait_migration_status(&[MigrationStatus::PreSwitchover], MIGRATE)
            .await
            .unwrap();
        src.migrate_continue_pre_switchover().await.unwrap();
    }
    src.wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap();
    dst.wait_migration_status(&[MigrationStatus::Completed], MIGRATE)
        .await
        .unwrap();
    // Held: the guest state is there, but it does not run.
    let held = dst.query_status().await.unwrap();
    assert_ne!(held, RunState::Running, "-S must hold the guest");
    assert_eq!(src.query_status().await.unwrap(), RunState::Postmigrate);
    // The destination refuses; the source takes the guest back.
    dst.kill().await.unwrap();
    assert!(src.cont().await.is_err(), "plain cont stays refused");
    src.resume_after_refused_handover().await.unwrap();
    assert_eq!(
        wait_run_state(&src, RunState::Running).await,
        RunState::Running
    );
    src.quit().await.unwrap();
}
