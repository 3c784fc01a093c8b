//! Shutdown leaves no threads and no socket behind. Alone in its own test
//! binary so the process's thread count is not disturbed by other tests.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use common::{qemu_io, RawClient, TestServer};
use roam_nbd::proto::cmd;

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn shutdown_joins_every_thread_and_removes_socket() {
    let before = thread_count();
    let mut t = TestServer::start(4 << 20);
    let (ok, out) = qemu_io(&t.uri("disk"), &["write -P 1 0 64k", "read -P 1 0 64k"]);
    assert!(ok, "{out}");
    // One client attached mid-session, one stuck in the handshake.
    let mut attached = RawClient::connect(&t.sock);
    attached.go("disk");
    attached.send_request(cmd::FLUSH, 0, 1, 0, 0);
    assert_eq!(attached.read_reply().error, 0);
    let _handshaking = RawClient::connect(&t.sock);
    std::thread::sleep(Duration::from_millis(50));
    // accept thread + 1 attached connection (4 workers) + 1 handshaking.
    assert!(
        thread_count() >= before + 6,
        "{} vs {before}",
        thread_count()
    );

    let sock = t.sock.clone();
    t.server.take().unwrap().shutdown();
    assert!(!sock.exists());
    assert!(attached.is_closed());
    // Threads that deregistered may still be unwinding for a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while thread_count() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(thread_count(), before, "server threads left running");
}
