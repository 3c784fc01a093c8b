//! Hostile and broken clients: the server answers with an error or closes
//! that one connection, and keeps serving everyone else.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::{Read, Write};

use common::{qemu_io, RawClient, TestServer};
use roam_nbd::proto::handshake::{ClientOption, OptionHeader};
use roam_nbd::proto::{cmd, errno, opt, rep, MAX_REQUEST_LEN};

fn assert_still_serving(t: &TestServer) {
    assert_eq!(common::server_panics(), 0, "a server thread panicked");
    let (ok, out) = qemu_io(&t.uri("disk"), &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"]);
    assert!(ok, "fresh qemu-io failed after abuse:\n{out}");
}

#[test]
fn bad_client_flags_and_magic_close_connection() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    // Unknown client flag bits.
    let mut c = RawClient::connect(&t.sock);
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g).unwrap();
    c.s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(c.is_closed());
    // Bad option magic.
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    c.s.write_all(&[0x41u8; 16]).unwrap();
    assert!(c.is_closed());
    // Bad request magic after a good handshake.
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn truncated_handshakes_and_garbage() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    for junk in [
        &b""[..],
        &b"\x00\x00"[..],
        &b"\x00\x00\x00\x03IHAVE"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
    ] {
        let mut c = RawClient::connect(&t.sock);
        c.s.write_all(junk).unwrap();
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.is_closed());
    }
    // Option header promising data that never comes.
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    let h = OptionHeader {
        option: opt::GO,
        length: 100,
    };
    c.s.write_all(&h.encode()).unwrap();
    c.s.write_all(&[0u8; 10]).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.is_closed());
    // Garbage after the handshake.
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    c.s.write_all(&[0xffu8; 1000]).unwrap();
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn huge_option_length_closes_without_allocating() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    let h = OptionHeader {
        option: opt::GO,
        length: u32::MAX,
    };
    c.s.write_all(&h.encode()).unwrap();
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    let mut c = RawClient::connect(&t.sock);
    c.greet();
    for o in [
        opt::STRUCTURED_REPLY,
        opt::STARTTLS,
        opt::LIST_META_CONTEXT,
        opt::EXTENDED_HEADERS,
        4242,
    ] {
        c.send_option(&ClientOption::Unsupported(o));
        let (h, _) = c.read_option_reply();
        assert_eq!((h.option, h.reply_type), (o, rep::ERR_UNSUP));
    }
    // Malformed GO: ERR_INVALID, connection stays usable.
    let bad = OptionHeader {
        option: opt::GO,
        length: 3,
    };
    c.s.write_all(&bad.encode()).unwrap();
    c.s.write_all(&[0, 0, 9]).unwrap();
    let (h, _) = c.read_option_reply();
    assert_eq!(h.reply_type, rep::ERR_INVALID);
    // Unknown export: ERR_UNKNOWN.
    c.send_option(&ClientOption::Info {
        name: "nope",
        requests: roam_nbd::proto::handshake::info_requests(&[]),
    });
    let (h, _) = c.read_option_reply();
    assert_eq!(h.reply_type, rep::ERR_UNKNOWN);
    // LIST still works, then ABORT is acknowledged and the server closes.
    c.send_option(&ClientOption::List);
    let (h, body) = c.read_option_reply();
    assert_eq!(h.reply_type, rep::SERVER);
    assert_eq!(&body[4..], b"disk");
    let (h, _) = c.read_option_reply();
    assert_eq!(h.reply_type, rep::ACK);
    c.send_option(&ClientOption::Abort);
    let (h, _) = c.read_option_reply();
    assert_eq!((h.option, h.reply_type), (opt::ABORT, rep::ACK));
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn bad_requests_get_errors_and_connection_survives() {
    common::count_server_panics();
    let size = 1u64 << 20;
    let t = TestServer::start(size);
    let mut c = RawClient::connect(&t.sock);
    assert_eq!(c.go("disk").0, size);

    // Read beyond the end.
    c.send_request(cmd::READ, 0, 1, size - 100, 4096);
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (1, errno::EINVAL));
    c.send_request(cmd::READ, 0, 2, size, 1);
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (2, errno::EINVAL));
    // Write beyond the end: payload is consumed, ENOSPC.
    c.send_request(cmd::WRITE, 0, 3, size - 2, 8);
    c.s.write_all(&[7u8; 8]).unwrap();
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (3, errno::ENOSPC));
    // Trim / zero beyond the end.
    c.send_request(cmd::TRIM, 0, 4, size, 4096);
    assert_eq!(c.read_reply().error, errno::ENOSPC);
    c.send_request(cmd::WRITE_ZEROES, 0, 5, u64::MAX - 1, 4096);
    assert_eq!(c.read_reply().error, errno::ENOSPC);
    // Oversized read: EINVAL, no data.
    c.send_request(cmd::READ, 0, 6, 0, MAX_REQUEST_LEN + 1);
    assert_eq!(c.read_reply().error, errno::EINVAL);
    // Unknown command and unknown flags.
    c.send_request(77, 0, 7, 0, 0);
    assert_eq!(c.read_reply().error, errno::EINVAL);
    c.send_request(cmd::READ, 0x8000, 8, 0, 512);
    assert_eq!(c.read_reply().error, errno::EINVAL);
    // Still fine: a real read works and returns data.
    c.send_request(cmd::WRITE, 0, 9, 512, 4);
    c.s.write_all(b"roam").unwrap();
    assert_eq!(c.read_reply().error, 0);
    c.send_request(cmd::READ, 0, 10, 512, 4);
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (10, 0));
    let mut b = [0u8; 4];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"roam");
    // DISC closes.
    c.send_request(cmd::DISC, 0, 11, 0, 0);
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn oversized_write_gets_error_then_close() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    let mut c = RawClient::connect(&t.sock);
    c.go("disk");
    c.send_request(cmd::WRITE, 0, 1, 0, MAX_REQUEST_LEN + 1);
    let r = c.read_reply();
    assert_eq!((r.cookie, r.error), (1, errno::EINVAL));
    assert!(c.is_closed());
    assert_still_serving(&t);
}

#[test]
fn many_abusive_clients_at_once() {
    common::count_server_panics();
    let t = TestServer::start(1 << 20);
    let handles: Vec<_> = (0..16u8)
        .map(|i| {
            let sock = t.sock.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&sock);
                if i % 2 == 0 {
                    c.greet();
                }
                let junk: Vec<u8> = (0..4096u32)
                    .map(|x| (x as u8).wrapping_mul(i | 1))
                    .collect();
                let _ = c.s.write_all(&junk);
                let _ = c.s.shutdown(std::net::Shutdown::Write);
                c.is_closed()
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
    assert_still_serving(&t);
}
