//! The real `roam-agent` binary, run as a host process: its port is a pty in
//! raw mode (same poll/read/write semantics the agent relies on while the host
//! is connected), its disk a file opened with O_DIRECT, its /data a directory
//! with a MANIFEST. Checks what needs no VM: the protocol on the wire, pacing,
//! durable acks, verify, and that a respawned agent keeps its boot id and
//! sequence (as /init's respawn loop relies on).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use roam_agent::manifest::{self, Entry};
use roam_agent::proto::{self, AgentMsg, Hello, HostMsg, LogRegion, VerifyReport, WorkloadConfig};
use roam_agent::record;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Pty {
    master: File,
    slave_path: PathBuf,
    _slave: File,
}

fn open_pty() -> Pty {
    let (mut m, mut s) = (0, 0);
    // SAFETY: out-pointers to two ints; no name/termios/winsize requested.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty failed");
    // SAFETY: s is an open tty fd; t is fully written by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(s, &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(s, libc::TCSANOW, &t), 0);
    }
    let slave_path = std::fs::read_link(format!("/proc/self/fd/{s}")).unwrap();
    // SAFETY: m and s are fresh fds owned by nobody else.
    let (master, slave) = unsafe { (File::from_raw_fd(m), File::from_raw_fd(s)) };
    Pty {
        master,
        slave_path,
        _slave: slave,
    }
}

fn spawn_agent(dir: &Path, port: &Path) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_roam-agent"))
        .env("ROAM_AGENT_PORT", port)
        .env("ROAM_AGENT_STATE_DIR", dir.join("run"))
        .env("ROAM_AGENT_DISK", dir.join("disk.img"))
        .env("ROAM_AGENT_DATA", dir.join("data"))
        .spawn()
        .unwrap();
    Agent(child)
}

/// Lines from the agent, decoded on a reader thread.
fn reader(master: &File) -> Receiver<AgentMsg> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut r = BufReader::new(master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let m: AgentMsg = proto::decode(&line).expect("agent sent an undecodable line");
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

#[derive(Default)]
struct Seen {
    hellos: Vec<Hello>,
    hbs: u64,
    acks: BTreeMap<u64, u64>,
    reports: Vec<VerifyReport>,
    errors: Vec<String>,
}

/// Collects messages until `done` holds or the timeout passes.
fn pump(rx: &Receiver<AgentMsg>, seen: &mut Seen, timeout: Duration, done: impl Fn(&Seen) -> bool) {
    let end = Instant::now() + timeout;
    while !done(seen) {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(AgentMsg::Hello(h)) => seen.hellos.push(h),
            Ok(AgentMsg::Hb(_)) => seen.hbs += 1,
            Ok(AgentMsg::Ack(a)) => {
                assert!(
                    seen.acks.insert(a.seq, a.sum).is_none(),
                    "seq {} acked twice",
                    a.seq
                );
            }
            Ok(AgentMsg::VerifyReport(r)) => seen.reports.push(r),
            Ok(AgentMsg::Error(e)) => seen.errors.push(format!("{}: {}", e.code, e.message)),
            Ok(AgentMsg::Pong { .. }) => {}
            Err(RecvTimeoutError::Timeout) => panic!("timed out; errors {:?}", seen.errors),
            Err(RecvTimeoutError::Disconnected) => panic!("agent output ended"),
        }
    }
}

fn send(master: &mut File, m: &HostMsg) {
    master.write_all(&proto::encode(m).unwrap()).unwrap();
}

#[test]
fn agent_process_acks_durably_verifies_and_survives_respawn() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk_size = 64u64 << 20;
    File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(disk_size)
        .unwrap();
    let log = LogRegion::for_disk(disk_size).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f.txt"), b"some data\n").unwrap();
    let (size, hash) = manifest::hash_file(&data.join("f.txt")).unwrap();
    let entries = [Entry {
        hash,
        size,
        path: "f.txt".into(),
    }];
    std::fs::write(
        data.join(manifest::MANIFEST_NAME),
        manifest::render(&entries),
    )
    .unwrap();

    let mut pty = open_pty();
    let rx = reader(&pty.master);
    let mut seen = Seen::default();
    let agent = spawn_agent(dir.path(), &pty.slave_path);
    pump(&rx, &mut seen, Duration::from_secs(10), |s| {
        !s.hellos.is_empty()
    });
    let hello = seen.hellos[0].clone();
    assert_eq!(hello.disk_size, Some(disk_size));
    assert_eq!(hello.log, Some(log));
    assert!(hello.data_mounted);
    assert_eq!(hello.next_seq, 0);

    // Heartbeats at about 100 Hz.
    let t = Instant::now();
    pump(&rx, &mut seen, Duration::from_secs(5), |s| s.hbs >= 50);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "50 heartbeats took {:?}",
        t.elapsed()
    );

    send(
        &mut pty.master,
        &HostMsg::Config(WorkloadConfig {
            disk_writes_per_s: 500,
            mem_dirty_mib_s: 50,
            mem_working_set_mib: 16,
            ..Default::default()
        }),
    );
    pump(&rx, &mut seen, Duration::from_secs(10), |s| {
        s.acks.len() >= 100
    });

    // Kill it hard mid-workload and start it again, as /init would.
    drop(agent);
    let before = seen.acks.len() as u64;
    let _agent = spawn_agent(dir.path(), &pty.slave_path);
    pump(&rx, &mut seen, Duration::from_secs(10), |s| {
        s.hellos.len() >= 2
    });
    let hello2 = seen.hellos[1].clone();
    assert_eq!(hello2.boot_id, hello.boot_id, "same boot, same id");
    assert!(
        hello2.next_seq >= before,
        "sequence went back: {} < {before}",
        hello2.next_seq
    );

    send(
        &mut pty.master,
        &HostMsg::Config(WorkloadConfig {
            disk_writes_per_s: 500,
            ..Default::default()
        }),
    );
    pump(&rx, &mut seen, Duration::from_secs(10), |s| {
        s.acks.len() as u64 >= before + 100
    });
    send(&mut pty.master, &HostMsg::Config(WorkloadConfig::default()));
    std::thread::sleep(Duration::from_millis(100));
    let upto = *seen.acks.keys().max().unwrap();
    send(&mut pty.master, &HostMsg::Verify { upto_seq: upto });
    pump(&rx, &mut seen, Duration::from_secs(20), |s| {
        !s.reports.is_empty()
    });
    let rep = seen.reports[0].clone();
    assert!(rep.all_ok(), "{rep:?}");
    assert_eq!(rep.detail, None);
    assert_eq!(rep.range, Some((0, upto)));
    assert_eq!(rep.ok, upto + 1);
    assert_eq!((rep.files.checked, rep.files.ok), (1, 1));

    // A bad request gets an error, not silence or a crash.
    pty.master.write_all(b"{\"type\":\"reformat\"}\n").unwrap();
    pump(&rx, &mut seen, Duration::from_secs(5), |s| {
        !s.errors.is_empty()
    });
    assert!(
        seen.errors[0].starts_with("bad_request"),
        "{:?}",
        seen.errors
    );

    // Every ack is on disk, read as a plain file.
    let f = File::open(dir.path().join("disk.img")).unwrap();
    let check = record::check_acked(&f, &log, hello.boot_id, &seen.acks, upto).unwrap();
    assert_eq!(check.bad_count, 0, "{check:?}");
    assert_eq!(check.checked, seen.acks.len() as u64);

    // Corrupt one acked record behind the agent's back: verify finds it.
    use std::os::unix::fs::FileExt;
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("disk.img"))
        .unwrap();
    w.write_all_at(b"XX", record::slot_offset(&log, 7) + 100)
        .unwrap();
    w.sync_all().unwrap();
    send(&mut pty.master, &HostMsg::Verify { upto_seq: upto });
    pump(&rx, &mut seen, Duration::from_secs(20), |s| {
        s.reports.len() >= 2
    });
    let rep = &seen.reports[1];
    assert_eq!((rep.bad, rep.first_bad_seqs.clone()), (1, vec![7]));
    assert!(rep.detail.as_deref().unwrap_or("").contains("1 bad"));
}
