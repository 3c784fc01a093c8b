//! A backend that panics (a bug in a future wrapper) costs one connection,
//! not the server: other clients keep working and removal does not hang.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{qemu_io, RawClient, TestServer};
use roam_nbd::proto::cmd;
use roam_nbd::{Backend, FileBackend};

struct PanicsAtZero(FileBackend);

impl Backend for PanicsAtZero {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        assert!(offset != 0, "injected backend bug");
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
fn panicking_backend_costs_one_connection() {
    let t = TestServer::start(1 << 20);
    let b = PanicsAtZero(FileBackend::create(&t.dir.path().join("p.raw"), 1 << 20).unwrap());
    t.add("buggy", Arc::new(b), false);
    let mut c = RawClient::connect(&t.sock);
    c.go("buggy");
    c.send_request(cmd::READ, 0, 1, 0, 512);
    assert!(c.is_closed(), "connection survived a backend panic");
    // Other exports and even the same export still serve.
    let (ok, out) = qemu_io(&t.uri("disk"), &["write -P 1 0 4k", "read -P 1 0 4k"]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&t.uri("buggy"), &["read 4096 512"]);
    assert!(ok, "{out}");
    let start = Instant::now();
    let st = t.server().remove_export("buggy").unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "removal waited for a dead connection"
    );
    assert_eq!(st.connections_live, 0);
}
