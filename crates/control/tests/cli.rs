//! The `roam` binary as a subprocess against the real server (with the daemon test double).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::TestServer;

const ROAM: &str = env!("CARGO_BIN_EXE_roam");

async fn roam(socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(ROAM)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("ROAM_SOCKET")
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

const RESULT_KEYS: [&str; 16] = [
    "vm",
    "from",
    "to",
    "outcome",
    "total_ms",
    "downtime_ms",
    "guest_downtime_ms",
    "pause_ms",
    "bytes",
    "link",
    "acked_writes",
    "acked_writes_lost",
    "guest_rebooted",
    "accel",
    "phases",
    "tuning",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_prints_exactly_the_result() {
    let srv = TestServer::start().await;
    let o = roam(&srv.socket, &["--json", "migrate", "desk", "--to", "home"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "one JSON object on stdout: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(keys(&v), RESULT_KEYS.into_iter().collect());
    assert_eq!(
        keys(&v["bytes"]),
        ["memory", "disk", "wire"].into_iter().collect()
    );
    assert_eq!(
        keys(&v["link"]),
        ["bandwidth_mbit", "rtt_ms", "loss_pct"]
            .into_iter()
            .collect()
    );
    assert_eq!(v["outcome"], "completed");
    assert_eq!(v["accel"], "tcg");
    assert_eq!(v["downtime_ms"], 45);
    assert_eq!(v["phases"]["switchover"], 45);
    assert_eq!(v["tuning"]["max-bandwidth"], 12_500_000);
    assert!(stderr(&o).is_empty(), "no bar with --json: {}", stderr(&o));

    // Aborted: the error key appears, and the exit code says so.
    let o = roam(&srv.socket, &["--json", "migrate", "flaky", "--to", "home"]).await;
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let mut want: BTreeSet<&str> = RESULT_KEYS.into_iter().collect();
    want.insert("error");
    assert_eq!(keys(&v), want);
    assert_eq!(v["outcome"], "aborted");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_human_output() {
    let srv = TestServer::start().await;
    let o = roam(
        &srv.socket,
        &["migrate", "desk", "--to", "home", "--bandwidth-limit", "50"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("desk moved office → home in 1.2 s: paused - (QEMU's figure 45 ms), heartbeat gap 120 ms"),
        "{out}"
    );
    assert!(out.contains("0 lost"), "{out}");
    // stderr is not a terminal here: one line per phase instead of a bar.
    let err = stderr(&o);
    for phase in ["connect", "memory", "switchover"] {
        assert!(err.contains(phase), "{err}");
    }
    let o = roam(&srv.socket, &["migrate", "flaky", "--to", "home"]).await;
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stdout(&o).contains("ABORTED after 1.2 s: destination QEMU exited"),
        "{}",
        stdout(&o)
    );
    let o = roam(&srv.socket, &["migrate", "ghost", "--to", "home"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "roam: no vm ghost (not_found)");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_and_peer_commands() {
    let srv = TestServer::start().await;
    let s = &srv.socket;
    let o = roam(
        s,
        &[
            "vm", "create", "desk", "--memory", "1G", "--disk", "8G", "--vcpus", "2",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "created vm desk (1 GiB memory, 8 GiB disk, 2 vcpus) at /var/lib/roam/vms/desk/disk\n"
    );
    let o = roam(s, &["vm", "start", "desk"]).await;
    assert_eq!(stdout(&o), "desk: running on office (pid 4242, tcg)\n");
    let o = roam(s, &["vm", "list"]).await;
    let out = stdout(&o);
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("NAME  STATE    HOST    MEMORY"),
        "{out}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("desk  running  office  1 GiB"),
        "{out}"
    );
    let o = roam(s, &["--json", "vm", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["name"], "desk");
    assert_eq!(v[0]["state"], "running");
    let o = roam(s, &["vm", "show", "desk"]).await;
    assert!(
        stdout(&o).contains("created     2026-11-18 11:06:40 UTC"),
        "{}",
        stdout(&o)
    );

    let o = roam(
        s,
        &["peer", "add", "home", "198.18.1.1:4433", "ed25519:BBBB"],
    )
    .await;
    assert_eq!(stdout(&o), "added peer home at 198.18.1.1:4433\n");
    let o = roam(s, &["--json", "peer", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{"name": "home", "addr": "198.18.1.1:4433", "key": "ed25519:BBBB",
            "rate_limit_mbit": null}])
    );
    // Forcing a primary is never done by accident: no terminal to ask on, no --yes.
    let o = roam(s, &["vm", "force-primary", "desk"]).await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    let o = roam(s, &["peer", "set-limit", "home", "fast"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = roam(s, &["host", "info"]).await;
    assert!(stdout(&o).contains("peers    1"), "{}", stdout(&o));
    let o = roam(s, &["--json", "peer", "remove", "home"]).await;
    assert_eq!(stdout(&o).trim(), r#"{"ok":true}"#);

    // A HIP correspondent added to an existing VM shows in `vm show`.
    let peer = "2001:2a:1:2:3:4:5:6@198.18.3.2:10500";
    let o = roam(s, &["vm", "peer-add", "desk", peer]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("desk: added HIP peer {peer}\n"));
    let o = roam(s, &["vm", "show", "desk"]).await;
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.contains("hip peers") && l.contains(peer)),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("hip rvs")), "{out}");
    let o = roam(s, &["vm", "peer-add", "desk", "nonsense"]).await;
    assert_eq!(o.status.code(), Some(1));

    // Conflicts come back as clear errors with exit code 1.
    let o = roam(s, &["vm", "delete", "desk"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "roam: vm desk is running (conflict)");

    // Sizes are checked before anything is sent.
    let o = roam(s, &["vm", "create", "x", "--memory", "1X", "--disk", "8G"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o).trim(),
        "roam: bad --memory '1X': expected a size such as 512M or 2G"
    );
    let o = roam(
        s,
        &["vm", "create", "x", "--memory", "1G", "--disk", "lots"],
    )
    .await;
    assert_eq!(
        stderr(&o).trim(),
        "roam: bad --disk 'lots': expected a size such as 512M or 2G"
    );
    assert_eq!(srv.host.vms.lock().unwrap().len(), 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("roamd.sock");
    for args in [
        &["host", "info"][..],
        &["--json", "migrate", "desk", "--to", "home"],
    ] {
        let o = roam(&socket, args).await;
        assert_eq!(o.status.code(), Some(1));
        assert!(stdout(&o).is_empty());
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!(
                "roam: cannot reach roamd at {}: ",
                socket.display()
            )),
            "{err}"
        );
        assert!(err.trim_end().ends_with("— is it running?"), "{err}");
    }
}

#[test]
fn host_init_execs_roamd_beside_roam_or_on_path() {
    let dir = tempfile::tempdir().unwrap();
    let beside = dir.path().join("bin");
    std::fs::create_dir(&beside).unwrap();
    std::fs::copy(ROAM, beside.join("roam")).unwrap();
    let record = dir.path().join("args");
    let script = format!(
        "#!/bin/sh\necho \"$0 $* socket=$ROAM_SOCKET\" > {}\n",
        record.display()
    );
    let fake = beside.join("roamd");
    std::fs::write(&fake, &script).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let o = std::process::Command::new(beside.join("roam"))
        .args([
            "--socket",
            "/tmp/x.sock",
            "host",
            "init",
            "--name",
            "office",
            "--listen",
            "198.18.0.1:4433",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        got.trim(),
        format!(
            "{} init --name office --listen 198.18.0.1:4433 socket=/tmp/x.sock",
            fake.display()
        )
    );

    // Not beside roam: found on PATH.
    let lone = dir.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::copy(ROAM, lone.join("roam")).unwrap();
    std::fs::remove_file(&record).unwrap();
    let o = std::process::Command::new(lone.join("roam"))
        .args(["host", "init"])
        .env("PATH", &beside)
        .env_remove("ROAM_SOCKET")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(std::fs::read_to_string(&record)
        .unwrap()
        .trim()
        .ends_with("roamd init socket=/run/roam/roamd.sock"));

    // Nowhere: a clear error.
    let o = std::process::Command::new(lone.join("roam"))
        .args(["host", "init"])
        .env("PATH", dir.path().join("empty"))
        .env_remove("ROAM_SOCKET")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot run roamd"));
}

/// On a terminal the progress bar is drawn (through `script`, which gives roam a pty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_on_a_terminal() {
    let srv = TestServer::start().await;
    let cmd = format!(
        "{ROAM} --socket {} migrate desk --to home",
        srv.socket.display()
    );
    let o = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    // The bar's prefix shows the phase, and its message the daemon's rate and ETA.
    assert!(out.contains("switchover"), "{out}");
    assert!(out.contains("11.9 MiB/s  ETA 5.0 s"), "{out}");
    assert!(out.contains("desk moved office → home"), "{out}");
    srv.stop().await;
}
