//! Real-VM test: the agent across a local live migration (two QEMUs on one
//! host, same image file, migration over a unix socket). One monitor on each
//! side, as the migration engine does: same boot id after the move,
//! heartbeats resume, guest-visible downtime measurable, every ack from both
//! sides intact in verify and in the image.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{run_setup, start_qemu, wait_marker};
use roam_agent::mkdisk::{make_disk, MkdiskOptions};
use roam_agent::monitor::{guest_downtime, AgentMonitor};
use roam_agent::proto::WorkloadConfig;
use roam_agent::record;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Just enough QMP for this test.
struct Qmp {
    rd: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("QMP {path:?}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (rd, wr) = s.into_split();
        let mut q = Qmp {
            rd: BufReader::new(rd).lines(),
            wr,
        };
        q.rd.next_line().await.unwrap().expect("QMP greeting");
        q.cmd("qmp_capabilities", json!({})).await;
        q
    }

    async fn cmd(&mut self, name: &str, args: Value) -> Value {
        let line = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.wr.write_all(line.as_bytes()).await.unwrap();
        loop {
            let l = self.rd.next_line().await.unwrap().expect("QMP closed");
            let v: Value = serde_json::from_str(&l).unwrap();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {name}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_live_migration_and_measures_downtime() {
    run_setup();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let image = p("disk.img");
    let disk = make_disk(&MkdiskOptions::new(&image, 1 << 30, 16)).unwrap();

    let qmp_arg = |sock: &str| {
        vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", p(sock).display()),
        ]
    };
    let mut src = start_qemu(
        dir.path(),
        &image,
        &p("src-agent.sock"),
        &p("src.log"),
        &qmp_arg("src-qmp.sock"),
    );
    let src_mon = AgentMonitor::spawn(p("src-agent.sock"));
    wait_marker(&p("src.log"), &mut src, Duration::from_secs(30)).await;
    let hello = src_mon.wait_hello(Duration::from_secs(20)).await.unwrap();
    src_mon
        .configure(WorkloadConfig {
            disk_writes_per_s: 100,
            mem_dirty_mib_s: 10,
            mem_working_set_mib: 32,
            ..Default::default()
        })
        .await
        .unwrap();
    src_mon
        .wait_for(Duration::from_secs(10), "acks", |s| s.acks >= 50)
        .await
        .unwrap();

    // Destination: same disk file, waiting for the stream; its monitor
    // connects before the guest arrives, as the engine's would.
    let mut dst_args = qmp_arg("dst-qmp.sock");
    dst_args.extend([
        "-incoming".to_string(),
        format!("unix:{}", p("mig.sock").display()),
    ]);
    let mut dst = start_qemu(
        dir.path(),
        &image,
        &p("dst-agent.sock"),
        &p("dst.log"),
        &dst_args,
    );
    let dst_mon = AgentMonitor::spawn(p("dst-agent.sock"));
    let mut dst_qmp = Qmp::connect(&p("dst-qmp.sock")).await;
    let mut src_qmp = Qmp::connect(&p("src-qmp.sock")).await;

    let t = Instant::now();
    src_qmp
        .cmd(
            "migrate",
            json!({"uri": format!("unix:{}", p("mig.sock").display())}),
        )
        .await;
    let info = loop {
        let info = src_qmp.cmd("query-migrate", json!({})).await;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => panic!("migration failed: {info}"),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "migration too slow: {info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "migration completed in {:?}: QEMU downtime {} ms, total {} ms",
        t.elapsed(),
        info["downtime"],
        info["total-time"]
    );
    // The source must never run again: quit it (never `cont`).
    let _ = src_qmp.cmd("quit", json!({})).await;
    src.kill();

    let dst_status = dst_qmp.cmd("query-status", json!({})).await;
    assert_eq!(dst_status["status"], "running", "{dst_status}");
    let dst_st = dst_mon
        .wait_for(Duration::from_secs(10), "heartbeats at destination", |s| {
            s.heartbeats >= 20
        })
        .await
        .unwrap();
    let src_st = src_mon.stats();
    assert_eq!(
        dst_st.boot_id,
        Some(hello.boot_id),
        "the same boot continues"
    );
    assert_eq!(dst_st.boot_changes, 0);
    let src_last = src_st.last_heartbeat.unwrap();
    let dst_first = dst_st.first_heartbeat.unwrap();
    let downtime =
        guest_downtime(&src_last, &dst_first).expect("destination heartbeat after source's last");
    eprintln!(
        "guest-visible downtime {downtime:?} (hb seq {} -> {}); dest max gap {:?}",
        src_last.seq, dst_first.seq, dst_st.max_gap
    );
    assert!(
        dst_first.seq > src_last.seq,
        "heartbeat seq continues across the move"
    );
    assert!(downtime < Duration::from_secs(5), "downtime {downtime:?}");

    // Writes go on at the destination; verify everything from both sides.
    dst_mon
        .wait_for(Duration::from_secs(10), "acks at destination", |s| {
            s.acks >= 50
        })
        .await
        .unwrap();
    dst_mon.configure(WorkloadConfig::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut acked = src_mon.acked();
    let src_max = *acked.keys().max().unwrap();
    let dst_acked = dst_mon.acked();
    assert!(
        dst_acked.keys().min().unwrap() > &src_max,
        "no seq acked twice"
    );
    acked.extend(dst_acked);
    let upto = *acked.keys().max().unwrap();
    let report = dst_mon.verify(upto, Duration::from_secs(30)).await.unwrap();
    eprintln!("verify at destination: {report:?}");
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.ok, upto + 1);
    assert_eq!(report.files.ok, 4);

    dst.kill();
    let f = std::fs::File::open(&image).unwrap();
    let check = record::check_acked(&f, &disk.log, hello.boot_id, &acked, upto).unwrap();
    assert_eq!(check.bad_count, 0, "{check:?}");
    assert_eq!(check.checked, acked.len() as u64);
}
