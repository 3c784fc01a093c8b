//! The socket side against a fake QEMU (a unix stream client speaking the
//! stream netdev framing): ARP over the socket, both packet queues, a second
//! connection taking over, bad length prefixes.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use roam_vlan::wire::{arp, ethernet, ipv4, udp, Mac};
use roam_vlan::{serve, LanConfig, MAX_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

const GUEST_MAC: Mac = Mac([0x52, 0x54, 0, 0x10, 0x20, 0x30]);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 4, 4);
const T: Duration = Duration::from_secs(5);

async fn send(s: &mut UnixStream, frame: &[u8]) {
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(frame).await.unwrap();
}

async fn recv(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    timeout(T, s.read_exact(&mut len)).await.unwrap().unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).await.unwrap();
    f
}

fn arp_request(cfg: &LanConfig) -> Vec<u8> {
    let a = arp::Arp {
        op: arp::OP_REQUEST,
        sender_mac: GUEST_MAC,
        sender_ip: cfg.guest_ip,
        target_mac: Mac([0; 6]),
        target_ip: cfg.gateway_ip,
    };
    ethernet::build(
        Mac::BROADCAST,
        GUEST_MAC,
        ethernet::ETHERTYPE_ARP,
        &a.encode(),
    )
}

fn guest_udp(cfg: &LanConfig, payload: &[u8]) -> Vec<u8> {
    let d = udp::build(cfg.guest_ip, PEER, 5555, 7, payload).unwrap();
    let p = ipv4::build(cfg.guest_ip, PEER, ipv4::PROTO_UDP, 64, 1, &d).unwrap();
    ethernet::build(cfg.gateway_mac, GUEST_MAC, ethernet::ETHERTYPE_IPV4, &p)
}

#[tokio::test]
async fn frames_both_ways_and_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.sock");
    let cfg = LanConfig::new(GUEST_MAC);
    let (handle, mut from_guest, to_guest) = serve(&path, cfg.clone()).await.unwrap();
    assert!(!handle.connected());

    // Guest 1: ARP and a packet off the LAN.
    let mut q1 = UnixStream::connect(&path).await.unwrap();
    assert!(handle.wait_connections(1, T).await);
    send(&mut q1, &arp_request(&cfg)).await;
    let reply = recv(&mut q1).await;
    let e = ethernet::Frame::parse(&reply).unwrap();
    assert_eq!(e.src, cfg.gateway_mac);
    assert_eq!(
        arp::Arp::parse(e.payload).unwrap().sender_mac,
        cfg.gateway_mac
    );
    send(&mut q1, &guest_udp(&cfg, b"one")).await;
    let pkt = timeout(T, from_guest.recv()).await.unwrap().unwrap();
    let p = ipv4::Packet::parse(&pkt).unwrap();
    assert_eq!((p.header.src, p.header.dst), (cfg.guest_ip, PEER));

    // Host to guest.
    let d = udp::build(PEER, cfg.guest_ip, 7, 5555, b"back").unwrap();
    let back = ipv4::build(PEER, cfg.guest_ip, ipv4::PROTO_UDP, 64, 2, &d).unwrap();
    to_guest.send(back.clone()).await.unwrap();
    let f = recv(&mut q1).await;
    assert_eq!(&f[14..], &back[..]);

    // Guest 2 (the destination QEMU) connects: it now gets the host's
    // packets; guest 1 stays open but muted.
    let mut q2 = UnixStream::connect(&path).await.unwrap();
    assert!(handle.wait_connections(2, T).await);
    to_guest.send(back.clone()).await.unwrap();
    assert_eq!(&recv(&mut q2).await[14..], &back[..]);
    send(&mut q1, &guest_udp(&cfg, b"stale")).await;
    send(&mut q2, &guest_udp(&cfg, b"two")).await;
    let pkt = timeout(T, from_guest.recv()).await.unwrap().unwrap();
    assert!(
        pkt.ends_with(b"two"),
        "a muted connection's frame got through"
    );
    let mut one = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(200), q1.read(&mut one))
            .await
            .is_err(),
        "the muted connection was closed or written to"
    );

    // A zero length is skipped; an oversize length closes that connection.
    q2.write_all(&0u32.to_be_bytes()).await.unwrap();
    send(&mut q2, &arp_request(&cfg)).await;
    assert_eq!(
        ethernet::Frame::parse(&recv(&mut q2).await)
            .unwrap()
            .ethertype,
        0x0806
    );
    q2.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
        .await
        .unwrap();
    let n = timeout(T, q2.read(&mut one)).await.unwrap().unwrap();
    assert_eq!(n, 0, "connection not closed after an oversize length");
    // Nobody active: packets for the guest are dropped and counted.
    for _ in 0..50 {
        if !handle.connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!handle.connected());
    to_guest.send(back).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let s = handle.stats();
    assert_eq!(s.io.connections, 2);
    assert_eq!(s.io.muted_frames, 1);
    assert_eq!(s.io.bad_length, 2);
    assert_eq!(s.io.frames_from_qemu, 4);
    assert_eq!(s.io.frames_to_qemu, 4);
    assert_eq!(s.io.to_guest_dropped, 1);
    assert_eq!(s.lan.arp_replies, 2);
    assert_eq!(s.lan.to_host, 2);
    assert_eq!(s.lan.from_host, 3);

    handle.shutdown().await;
    assert!(!path.exists(), "socket not removed");
}

#[tokio::test]
async fn full_host_queue_drops_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.sock");
    let cfg = LanConfig::new(GUEST_MAC);
    let (handle, from_guest, _to_guest) = serve(&path, cfg.clone()).await.unwrap();
    let mut q = UnixStream::connect(&path).await.unwrap();
    let n = roam_vlan::QUEUE_DEPTH + 10;
    for i in 0..n {
        send(&mut q, &guest_udp(&cfg, &(i as u32).to_be_bytes())).await;
    }
    let deadline = tokio::time::Instant::now() + T;
    while handle.stats().lan.to_host < n as u64 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = handle.stats();
    assert_eq!(s.lan.to_host, n as u64);
    assert_eq!(s.io.to_host_dropped, 10);
    assert_eq!(from_guest.len(), roam_vlan::QUEUE_DEPTH);
    drop(handle);
    assert!(!path.exists());
}

#[tokio::test]
async fn bad_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LanConfig::new(GUEST_MAC);
    cfg.gateway_ip = Ipv4Addr::new(198, 18, 7, 1);
    assert!(matches!(
        serve(dir.path().join("s"), cfg).await,
        Err(roam_vlan::Error::Config(_))
    ));
    // A file that is not a socket is never replaced.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        serve(&file, LanConfig::new(GUEST_MAC)).await,
        Err(roam_vlan::Error::Listen { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A stale socket is.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (h, _, _) = serve(&stale, LanConfig::new(GUEST_MAC)).await.unwrap();
    UnixStream::connect(&stale).await.unwrap();
    assert!(h.wait_connections(1, T).await);
}
