//! Interoperability with real NBD peers: qemu-io, qemu-img, nbdinfo.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{qemu_io, run, RawClient, TestServer};
use roam_nbd::proto::cmd;
use roam_nbd::{DirtyTracker, FileBackend, InitialState, TrackedBackend};

const MIB: u64 = 1024 * 1024;

#[test]
fn qemu_io_write_read_flush_discard_zero() {
    let t = TestServer::start(64 * MIB);
    let uri = t.uri("disk");
    let (ok, out) = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 4k",
            "write -f -P 0x11 2M 64k", // FUA
            "flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 4k",
            "read -P 0x11 2M 64k",
            "discard 0 64k",
            "read -P 0 0 64k",
            "read -P 0xab 64k 64k",
            "write -z 1M 4k",
            "read -P 0 1M 4k",
            "write -z -u 2M 64k",
            "read -P 0 2M 64k",
        ],
    );
    assert!(ok, "qemu-io failed:\n{out}");
    // The bytes really reached the file.
    let data = std::fs::read(t.file()).unwrap();
    assert!(data[64 * 1024..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(data[..64 * 1024].iter().all(|&b| b == 0));
    let st = t.server().export_stats("disk").unwrap();
    assert!(st.bytes_written >= MIB + 4096 + 65536, "{st:?}");
    assert!(st.bytes_read >= MIB + 4096, "{st:?}");
    assert!(
        st.flushes >= 1 && st.trims >= 1 && st.write_zeroes >= 2,
        "{st:?}"
    );
}

#[test]
fn qemu_img_convert_in_and_compare() {
    let t = TestServer::start(32 * MIB);
    let src = t.dir.path().join("src.raw");
    // A source with data, holes and a zero run.
    let (ok, out) = run(
        "qemu-img",
        &["create", "-f", "raw", src.to_str().unwrap(), "32M"],
    );
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(
        &src.display().to_string(),
        &[
            "write -P 0x42 0 3M",
            "write -P 0x17 10M 5M",
            "write -P 0x99 31M 1M",
        ],
    );
    assert!(ok, "{out}");
    let uri = t.uri("disk");
    let (ok, out) = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(ok, "convert failed: {out}");
    let (ok, out) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(ok && out.contains("Images are identical"), "compare: {out}");
    // And a difference is noticed.
    let (ok, _) = qemu_io(&uri, &["write -P 0x01 20M 512"]);
    assert!(ok);
    let (ok, out) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(
        !ok && out.contains("Content mismatch at offset 20971520"),
        "compare: {out}"
    );
}

#[test]
fn nbdinfo_lists_exports_and_sizes() {
    let t = TestServer::start(8 * MIB);
    let other = FileBackend::create(&t.dir.path().join("b.raw"), 3 * MIB + 512).unwrap();
    t.add("second", Arc::new(other), true);
    let list_uri = format!("nbd+unix:///?socket={}", t.sock.display());
    let (ok, out) = run("nbdinfo", &["--list", &list_uri]);
    assert!(ok, "{out}");
    assert!(out.contains("export=\"disk\""), "{out}");
    assert!(out.contains("export=\"second\""), "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    assert!(out.contains("export-size: 3146240"), "{out}");
    let (ok, out) = run("nbdinfo", &["--json", &t.uri("second")]);
    assert!(ok, "{out}");
    assert!(out.contains("\"export-size\": 3146240"), "{out}");
    assert!(out.contains("\"is_read_only\": true"), "{out}");
    assert!(out.contains("\"block_size_maximum\": 33554432"), "{out}");
    let (ok, out) = run("nbdinfo", &["--size", &t.uri("disk")]);
    assert!(ok && out.trim() == "8388608", "{out}");
    // Unknown export: nbdinfo fails, server survives.
    let (ok, _) = run("nbdinfo", &["--size", &t.uri("nope")]);
    assert!(!ok);
    let (ok, out) = run("nbdinfo", &["--size", &t.uri("disk")]);
    assert!(ok, "{out}");
}

#[test]
fn read_only_export_refuses_writes() {
    let t = TestServer::empty();
    let dir = tempfile::tempdir().unwrap();
    let fb = FileBackend::create(&dir.path().join("ro.raw"), MIB).unwrap();
    t.add("ro", Arc::new(fb), true);
    let (ok, out) = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 64k", &t.uri("ro")],
    );
    assert!(ok && out.contains("read 65536/65536"), "{out}");
    // qemu refuses to open a READ_ONLY export for writing;
    // a raw client gets EPERM from us.
    let (ok, _) = qemu_io(&t.uri("ro"), &["write -P 1 0 4k"]);
    assert!(!ok);
    let mut c = RawClient::connect(&t.sock);
    let (size, flags) = c.go("ro");
    assert_eq!(size, MIB);
    assert!(flags & roam_nbd::proto::tflags::READ_ONLY != 0);
    c.send_request(cmd::WRITE, 0, 9, 0, 4);
    std::io::Write::write_all(&mut c.s, b"abcd").unwrap();
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (9, roam_nbd::proto::errno::EPERM));
}

#[test]
fn concurrent_clients_and_dirty_tracking() {
    let t = TestServer::empty();
    let size = 16 * MIB;
    let fb = Arc::new(FileBackend::create(&t.dir.path().join("d.raw"), size).unwrap());
    let tracker = DirtyTracker::new(size, 64 * 1024).unwrap();
    let migration = tracker.subscribe(InitialState::Clean);
    let replica = tracker.subscribe(InitialState::Clean);
    t.add(
        "d",
        Arc::new(TrackedBackend::new(fb, tracker.clone()).unwrap()),
        false,
    );
    let uri = t.uri("d");
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {}M 128k", i + 1, i * 2);
                let r = format!("read -P {} {}M 128k", i + 1, i * 2);
                qemu_io(&uri, &[&w, "flush", &r])
            })
        })
        .collect();
    for h in handles {
        let (ok, out) = h.join().unwrap();
        assert!(ok, "{out}");
    }
    // Each client wrote 128 KiB = 2 chunks at i*2 MiB.
    let want: Vec<u64> = (0..4).flat_map(|i| [i * 32, i * 32 + 1]).collect();
    assert_eq!(migration.take(), want);
    assert!(migration.take().is_empty());
    assert_eq!(replica.count(), 8);
    assert!(tracker.flush_epoch() >= 4);
    assert_eq!(t.server().export_stats("d").unwrap().connections_total, 4);
}

#[test]
fn remove_export_disconnects_clients_and_shutdown_cleans_up() {
    let mut t = TestServer::start(4 * MIB);
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    c.send_request(cmd::READ, 0, 1, 0, 512);
    assert_eq!(c.read_reply().error, 0);
    let mut buf = [0u8; 512];
    std::io::Read::read_exact(&mut c.s, &mut buf).unwrap();
    let mut idle = RawClient::connect(&t.sock); // stuck in the handshake
    let mut g = [0u8; 18];
    std::io::Read::read_exact(&mut idle.s, &mut g).unwrap();

    let st = t.server().remove_export("disk").unwrap();
    assert_eq!(st.reads, 1);
    assert_eq!(st.connections_live, 0);
    assert!(c.is_closed(), "client still connected after removal");
    assert!(t.server().export_names().is_empty());
    let (ok, _) = qemu_io(&t.uri("disk"), &["read 0 512"]);
    assert!(!ok, "removed export still served");
    // Re-adding works and serves again.
    let fb = FileBackend::open(&t.file(), false).unwrap();
    t.add("disk", Arc::new(fb), false);
    let (ok, out) = qemu_io(&t.uri("disk"), &["read 0 512"]);
    assert!(ok, "{out}");

    let sock = t.sock.clone();
    t.server.take().unwrap().shutdown();
    assert!(!sock.exists(), "socket file left behind");
    assert!(idle.is_closed(), "handshaking client not cut off");
}

#[tokio::test(flavor = "current_thread")]
async fn server_inside_tokio_runtime() {
    // A current-thread runtime: the server must not need the runtime's
    // threads, and the blocking calls work from spawn_blocking.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let fb = FileBackend::create(&dir.path().join("d"), MIB).unwrap();
    let server = roam_nbd::NbdServer::bind(&sock, Default::default()).unwrap();
    server.add_export("disk", Arc::new(fb), false).unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let (ok, out) =
        tokio::task::spawn_blocking(move || qemu_io(&uri, &["write -P 7 0 4k", "read -P 7 0 4k"]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    let start = std::time::Instant::now();
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert!(!sock.exists());
}

#[test]
fn legacy_export_name_and_default_export() {
    use roam_nbd::proto::handshake::ClientOption;
    use std::io::Read;
    let t = TestServer::start(2 * MIB);
    // Legacy NBD_OPT_EXPORT_NAME: size + flags, no zeroes (we sent NO_ZEROES).
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    c.send_option(&ClientOption::ExportName("disk"));
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 2 * MIB);
    c.send_request(cmd::READ, 0, 5, 0, 16);
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (5, 0));
    // Unknown name: EXPORT_NAME has no error reply, so the server closes.
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    c.send_option(&ClientOption::ExportName("nope"));
    assert!(c.is_closed());
    // The empty name picks the only export.
    let uri = format!("nbd+unix://?socket={}", t.sock.display());
    let (ok, out) = qemu_io(&uri, &["write -P 9 0 4k", "read -P 9 0 4k"]);
    assert!(ok, "{out}");
}

/// The real consumer: QEMU's own NBD block driver, as roamd will wire it
/// (`-blockdev driver=nbd,server.type=unix,...`), driven through HMP's
/// `qemu-io` command on a machine-less QEMU (no guest needed).
#[test]
fn qemu_system_blockdev_nbd_client() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let t = TestServer::empty();
    let size = 8 * MIB;
    let fb = Arc::new(FileBackend::create(&t.dir.path().join("q.raw"), size).unwrap());
    let tracker = DirtyTracker::new(size, 64 * 1024).unwrap();
    let sub = tracker.subscribe(InitialState::Clean);
    t.add(
        "vm",
        Arc::new(TrackedBackend::new(fb, tracker.clone()).unwrap()),
        false,
    );
    let blockdev = format!(
        "driver=nbd,server.type=unix,server.path={},export=vm,node-name=disk0",
        t.sock.display()
    );
    let mut child = Command::new("timeout")
        .args([
            "60",
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
        ])
        .args([
            "-display",
            "none",
            "-accel",
            "tcg",
            "-monitor",
            "stdio",
            "-blockdev",
        ])
        .arg(&blockdev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"qemu-io disk0 \"write -P 0x33 1M 64k\"\n\
              qemu-io disk0 \"read -P 0x33 1M 64k\"\n\
              qemu-io disk0 \"flush\"\nquit\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu failed: {text}");
    assert!(
        text.contains("wrote 65536/65536 bytes at offset 1048576"),
        "{text}"
    );
    assert!(
        text.contains("read 65536/65536 bytes at offset 1048576"),
        "{text}"
    );
    assert!(!text.contains("verification failed"), "{text}");
    let data = std::fs::read(t.dir.path().join("q.raw")).unwrap();
    assert!(data[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0x33));
    assert_eq!(sub.take(), vec![16]);
    assert!(tracker.flush_epoch() >= 1);
}
