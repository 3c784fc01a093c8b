//! FLUSH and FUA are acknowledged only after the backend made data durable.
//!
//! A recording backend wraps the real file backend and logs, with a global
//! sequence number, when its flush (or FUA write) finished; it also sleeps
//! inside flush so that a server replying early would be caught. The
//! client logs when each reply arrived.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RawClient, TestServer};
use roam_nbd::proto::{cmd, cmdflags};
use roam_nbd::{Backend, FileBackend};

static SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Log {
    flush_done: Vec<u64>,
    fua_done: Vec<u64>,
    writes: Vec<(u64, bool)>,
}

struct Recording {
    inner: FileBackend,
    log: Mutex<Log>,
    delay: Duration,
}

impl Backend for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        if fua {
            std::thread::sleep(self.delay);
        }
        self.inner.write_at(buf, offset, fua)?;
        let mut l = self.log.lock().unwrap();
        l.writes.push((offset, fua));
        if fua {
            l.fua_done.push(SEQ.fetch_add(1, Ordering::SeqCst));
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.flush()?;
        self.log
            .lock()
            .unwrap()
            .flush_done
            .push(SEQ.fetch_add(1, Ordering::SeqCst));
        Ok(())
    }
    fn trim(&self, o: u64, l: u64, fua: bool) -> std::io::Result<()> {
        self.inner.trim(o, l, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, fua: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, t, fua)
    }
}

#[test]
fn flush_and_fua_reply_only_after_backend_finished() {
    let t = TestServer::empty();
    let rec = Arc::new(Recording {
        inner: FileBackend::create(&t.dir.path().join("f.raw"), 1 << 20).unwrap(),
        log: Mutex::default(),
        delay: Duration::from_millis(150),
    });
    t.add("disk", rec.clone(), false);
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");

    // Pipelined: write, flush, FUA write. Replies may come in any order
    // (several workers serve a connection); each is stamped on arrival.
    c.send_request(cmd::WRITE, 0, 1, 0, 4);
    c.s.write_all(b"aaaa").unwrap();
    c.send_request(cmd::FLUSH, 0, 2, 0, 0);
    c.send_request(cmd::WRITE, cmdflags::FUA, 3, 4096, 4);
    c.s.write_all(b"bbbb").unwrap();
    let start = Instant::now();
    let mut arrived = std::collections::HashMap::new();
    for _ in 0..3 {
        let r = c.read_reply();
        assert_eq!(r.error, 0);
        arrived.insert(r.cookie, SEQ.fetch_add(1, Ordering::SeqCst));
    }
    assert!(start.elapsed() >= Duration::from_millis(140));
    let after_flush_reply = arrived[&2];
    let after_fua_reply = arrived[&3];

    let log = rec.log.lock().unwrap();
    assert_eq!(log.flush_done.len(), 1);
    assert!(
        log.flush_done[0] < after_flush_reply,
        "flush replied before it finished"
    );
    assert_eq!(log.fua_done.len(), 1);
    assert!(log.fua_done[0] < after_fua_reply, "FUA write replied early");
    let mut writes = log.writes.clone();
    writes.sort();
    assert_eq!(writes, vec![(0, false), (4096, true)]);
    assert_eq!(t.server().export_stats("disk").unwrap().flushes, 1);
}

/// Real file backend: data written then flushed is in the file, and a FUA
/// write through qemu-io reaches the backend with fua set.
#[test]
fn qemu_io_fua_reaches_backend() {
    let t = TestServer::empty();
    let rec = Arc::new(Recording {
        inner: FileBackend::create(&t.dir.path().join("f.raw"), 1 << 20).unwrap(),
        log: Mutex::default(),
        delay: Duration::ZERO,
    });
    t.add("disk", rec.clone(), false);
    let (ok, out) = common::qemu_io(&t.uri("disk"), &["write -f -P 3 8192 4096", "flush"]);
    assert!(ok, "{out}");
    let log = rec.log.lock().unwrap();
    assert!(log.writes.contains(&(8192, true)), "{:?}", log.writes);
    assert!(!log.flush_done.is_empty());
}

/// Reads of the first 4 KiB take 1 s (as a post-copy read waiting on the
/// network would); other reads take `SlowFirstBlock.1`.
struct SlowFirstBlock(FileBackend, Duration);

impl Backend for SlowFirstBlock {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(if offset < 4096 {
            Duration::from_secs(1)
        } else {
            self.1
        });
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn trim(&self, o: u64, l: u64, fua: bool) -> std::io::Result<()> {
        self.0.trim(o, l, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, fua: bool) -> std::io::Result<()> {
        self.0.write_zeroes(o, l, t, fua)
    }
}

#[test]
fn slow_request_does_not_hold_back_other_replies() {
    let t = TestServer::empty();
    let f = FileBackend::create(&t.dir.path().join("s.raw"), 1 << 20).unwrap();
    let b = SlowFirstBlock(f, Duration::ZERO);
    t.add("disk", Arc::new(b), false);
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    let start = Instant::now();
    c.send_request(cmd::READ, 0, 1, 0, 512); // slow
    c.send_request(cmd::READ, 0, 2, 8192, 512); // fast
    c.send_request(cmd::WRITE, 0, 3, 16384, 4);
    c.s.write_all(b"cccc").unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = c.read_reply();
        assert_eq!(r.error, 0);
        if r.cookie != 3 {
            let mut d = [0u8; 512];
            std::io::Read::read_exact(&mut c.s, &mut d).unwrap();
        }
        got.push((r.cookie, start.elapsed()));
    }
    let when = |k: u64| got.iter().find(|(c, _)| *c == k).unwrap().1;
    assert!(
        when(2) < Duration::from_millis(300),
        "fast read held back: {got:?}"
    );
    assert!(
        when(3) < Duration::from_millis(300),
        "write held back: {got:?}"
    );
    assert!(when(1) >= Duration::from_millis(500));
}

/// Hundreds of pipelined writes then reads with distinct contents; every
/// reply matches its cookie and every read returns what was written.
#[test]
fn deep_pipeline_round_trip() {
    let t = TestServer::start(8 << 20);
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    let n = 600u64;
    let data = |i: u64| -> Vec<u8> { (0..4096u32).map(|j| (i as u32 * 31 + j) as u8).collect() };
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let r = roam_nbd::proto::Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: i,
                offset: i * 8192,
                length: 4096,
            };
            w.write_all(&r.encode()).unwrap();
            w.write_all(&data(i)).unwrap();
        }
        for i in 0..n {
            let r = roam_nbd::proto::Request {
                flags: 0,
                kind: cmd::READ,
                cookie: n + i,
                offset: i * 8192,
                length: 4096,
            };
            w.write_all(&r.encode()).unwrap();
        }
    });
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 4096];
    let mut writes_done = 0;
    for _ in 0..2 * n {
        let r = c.read_reply();
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie), "duplicate cookie {}", r.cookie);
        if r.cookie >= n {
            std::io::Read::read_exact(&mut c.s, &mut buf).unwrap();
            assert_eq!(
                buf,
                data(r.cookie - n),
                "read {} returned wrong data",
                r.cookie - n
            );
        } else {
            writes_done += 1;
        }
    }
    sender.join().unwrap();
    assert_eq!(writes_done, n);
    assert_eq!(t.server().export_stats("disk").unwrap().writes, n);
}

/// Removing an export while a client has requests queued: requests being
/// served finish normally, queued ones are answered ESHUTDOWN, then the
/// connection closes; no request is answered twice.
#[test]
fn removal_answers_queued_requests_with_eshutdown() {
    let t = TestServer::empty();
    let f = FileBackend::create(&t.dir.path().join("s.raw"), 1 << 20).unwrap();
    t.add(
        "disk",
        Arc::new(SlowFirstBlock(f, Duration::from_millis(40))),
        false,
    );
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    let n = 40u64;
    for i in 0..n {
        c.send_request(cmd::READ, 0, i, 4096 + i * 512, 512);
    }
    std::thread::sleep(Duration::from_millis(150));
    let server = t.server.as_ref().unwrap();
    let stats = std::thread::scope(|s| {
        let h = s.spawn(|| server.remove_export("disk").unwrap());
        let (mut ok, mut shut, mut seen) = (0, 0, std::collections::HashSet::new());
        loop {
            let mut b = [0u8; 16];
            if std::io::Read::read_exact(&mut c.s, &mut b).is_err() {
                break;
            }
            let r = roam_nbd::proto::SimpleReply::decode(&b).unwrap();
            assert!(seen.insert(r.cookie), "cookie {} answered twice", r.cookie);
            if r.error == 0 {
                let mut d = [0u8; 512];
                std::io::Read::read_exact(&mut c.s, &mut d).unwrap();
                ok += 1;
            } else {
                assert_eq!(r.error, roam_nbd::proto::errno::ESHUTDOWN);
                shut += 1;
            }
        }
        (h.join().unwrap(), ok, shut)
    });
    let (st, ok, shut) = stats;
    assert!(ok >= 1, "nothing was served before removal");
    assert!(shut >= 1, "no queued request got ESHUTDOWN (ok={ok})");
    assert_eq!(ok + shut, n, "some requests were never answered");
    assert_eq!(st.reads, ok);
    assert_eq!(st.connections_live, 0);
}
