//! Two endpoints in one process on 127.0.0.1, their inner packets carried
//! through channels (the seam roamd uses for a VM's virtual LAN) instead of
//! TUN devices: needs no privileges.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use roam_hip::HostIdentity;
use roam_hipnet::beet::internet_checksum;
use roam_hipnet::config::default_lsi;
use roam_hipnet::{Endpoint, EndpointConfig, Handle, PacketDev, PeerSpec, UserEsp};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct Side {
    h: Handle,
    to_net: mpsc::Sender<Vec<u8>>,
    from_net: mpsc::Receiver<Vec<u8>>,
}

async fn side(id: HostIdentity, peers: Vec<PeerSpec>, import: Option<Vec<u8>>) -> Side {
    side_with(id, peers, import, |_| {}).await.0
}

async fn side_with(
    id: HostIdentity,
    peers: Vec<PeerSpec>,
    import: Option<Vec<u8>>,
    tune: impl FnOnce(&mut EndpointConfig),
) -> (Side, JoinHandle<()>) {
    let mut cfg = EndpointConfig::new(id, "127.0.0.1:0".parse().unwrap(), "unused");
    cfg.tun_name = None;
    cfg.peers = peers;
    cfg.import = import;
    tune(&mut cfg);
    let (to_net, outbound) = mpsc::channel(64);
    let (inbound, from_net) = mpsc::channel(64);
    let (h, task) = Endpoint::start_on(
        cfg,
        Box::new(UserEsp::new()),
        PacketDev::Channel { outbound, inbound },
    )
    .await
    .unwrap();
    (
        Side {
            h,
            to_net,
            from_net,
        },
        task,
    )
}

/// An IPv4/UDP packet with valid checksums.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let ulen = 8 + data.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let hc = internet_checksum(&p);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    let mut u = vec![0x30, 0x39, 0x13, 0x89];
    u.extend_from_slice(&(ulen as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let c = udp4_checksum(src, dst, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&u);
    p
}

fn udp4_checksum(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
    let mut ph = src.octets().to_vec();
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, 17]);
    ph.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut s = seg.to_vec();
    s[6] = 0;
    s[7] = 0;
    ph.extend_from_slice(&s);
    internet_checksum(&ph)
}

async fn recv(s: &mut Side) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), s.from_net.recv())
        .await
        .expect("no packet within 10 s")
        .unwrap()
}

#[tokio::test]
async fn lsi_and_hit_packets_cross_and_survive_a_handover() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let (ida, idb) = (HostIdentity::generate(), HostIdentity::generate());
    let (hit_a, hit_b) = (ida.hit(), idb.hit());
    let mut b = side(idb, Vec::new(), None).await;
    // A names B with an LSI of its own choosing: B must still see a packet
    // to its own LSI, with valid checksums.
    let b_seen_by_a = Ipv4Addr::new(198, 19, 77, 77);
    let spec = format!("{hit_b}@{}/{b_seen_by_a}", b.h.listen);
    let mut a = side(ida.clone(), vec![spec.parse().unwrap()], None).await;

    let pkt = udp4(a.h.lsi, b_seen_by_a, b"over the LSI");
    a.to_net.send(pkt).await.unwrap();
    let got = recv(&mut b).await;
    let (src, dst) = (default_lsi(&hit_a), b.h.lsi);
    assert_eq!(&got[12..16], &src.octets());
    assert_eq!(&got[16..20], &dst.octets());
    assert_eq!(internet_checksum(&got[..20]), 0);
    assert_eq!(
        u16::from_be_bytes([got[26], got[27]]),
        udp4_checksum(src, dst, &got[20..])
    );
    assert_eq!(&got[28..], b"over the LSI");

    // B answers by HIT (IPv6, pure BEET).
    let mut v6 = vec![0x60, 0, 0, 0, 0, 3, 59, 64];
    v6.extend_from_slice(&hit_b.0);
    v6.extend_from_slice(&hit_a.0);
    v6.extend_from_slice(b"hit");
    b.to_net.send(v6.clone()).await.unwrap();
    assert_eq!(recv(&mut a).await, v6);

    // A's associations move to a new endpoint on another port.
    let state = a.h.export_and_stop().await.unwrap();
    let mut a2 = side(ida, Vec::new(), Some(state)).await;
    assert_eq!(a2.h.set_locator("127.0.0.1".parse().unwrap()).await, Ok(1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pkt = udp4(a2.h.lsi, b_seen_by_a, b"after the move");
    a2.to_net.send(pkt).await.unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"after the move");
    b.to_net.send(v6.clone()).await.unwrap();
    assert_eq!(recv(&mut a2).await, v6);
    let st = b.h.status().await;
    let a2_addr: SocketAddr = a2.h.listen;
    assert!(st.contains(&a2_addr.to_string()), "{st}");
    let s = &b.h.stats;
    assert_eq!(s.get("esp_replayed"), Some(0));
    assert_eq!(s.get("established"), Some(1));
    assert_eq!(s.get("peer_moves"), Some(1));
    // B checked the new locator (echo request to a2's port, RFC 8046).
    assert_eq!(s.get("rr_verified"), Some(1));
    assert_eq!(s.get("rr_failed"), Some(0));
    assert_eq!(a2.h.stats.get("established"), Some(0));

    // Stopping sends CLOSE: the peer leaves ESTABLISHED.
    b.h.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = a2.h.status().await;
    assert!(!st.contains("state Established"), "{st}");
}

#[tokio::test]
async fn a_move_to_another_address_is_verified_before_it_is_trusted() {
    let (ida, idb) = (HostIdentity::generate(), HostIdentity::generate());
    let hit_b = idb.hit();
    let mut b = side(idb, Vec::new(), None).await;
    let spec = format!("{hit_b}@{}", b.h.listen);
    let mut a = side(ida, vec![spec.parse().unwrap()], None).await;
    let b_lsi = default_lsi(&hit_b);
    a.to_net
        .send(udp4(a.h.lsi, b_lsi, b"before"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"before");
    // A's address changes: the socket is rebound on 127.0.0.2, same port.
    assert_eq!(a.h.set_locator("127.0.0.2".parse().unwrap()).await, Ok(1));
    let new_addr = SocketAddr::new("127.0.0.2".parse().unwrap(), a.h.listen.port());
    let mut verified = false;
    for _ in 0..100 {
        if b.h.stats.get("rr_verified") == Some(1) {
            verified = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(verified, "B never verified A's new locator");
    let st = b.h.status().await;
    assert!(st.contains(&new_addr.to_string()), "{st}");
    // Data from B reaches A at its new address.
    b.to_net
        .send(udp4(b.h.lsi, default_lsi(&a.h.hit), b"after"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut a).await[28..], b"after");
    assert_eq!(b.h.stats.get("rr_failed"), Some(0));
    assert_eq!(b.h.stats.get("hip_dropped"), Some(0));
}

/// A and B with an association between them (A's first packet to B's LSI
/// started the base exchange). `tune` configures both.
async fn pair(
    tune: impl Fn(&mut EndpointConfig) + Copy,
) -> ((Side, JoinHandle<()>), (Side, JoinHandle<()>)) {
    let (ida, idb) = (HostIdentity::generate(), HostIdentity::generate());
    let hit_b = idb.hit();
    let (mut b, bt) = side_with(idb, Vec::new(), None, tune).await;
    let spec = format!("{hit_b}@{}", b.h.listen);
    let (a, at) = side_with(ida, vec![spec.parse().unwrap()], None, tune).await;
    a.to_net
        .send(udp4(a.h.lsi, default_lsi(&hit_b), b"hello"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"hello");
    ((a, at), (b, bt))
}

/// Sequence numbers past `rekey_seq` make the endpoints rekey (RFC 7402
/// §6.9), both at once (each sees the same numbers), and not one packet is
/// lost on the way: the old inbound SA drains what was in flight.
#[tokio::test]
async fn endpoints_rekey_before_the_sequence_number_wraps() {
    let ((mut a, _at), (mut b, _bt)) = pair(|c| c.hip.rekey_seq = 8).await;
    let (la, lb) = (a.h.lsi, default_lsi(&b.h.hit));
    let la_at_b = default_lsi(&a.h.hit);
    // 2 × 16 packets per SA pair... about four rekeys: within the KEYMAT.
    for i in 0..16u8 {
        a.to_net.send(udp4(la, lb, &[i; 20])).await.unwrap();
        b.to_net
            .send(udp4(b.h.lsi, la_at_b, &[i; 30]))
            .await
            .unwrap();
        assert_eq!(&recv(&mut b).await[28..], &[i; 20]);
        assert_eq!(&recv(&mut a).await[28..], &[i; 30]);
    }
    let (sa, sb) = (&a.h.stats, &b.h.stats);
    let get = |s: &roam_hipnet::Stats, n: &str| s.get(n).unwrap();
    let (ra, rb) = (get(sa, "rekeys"), get(sb, "rekeys"));
    assert!(ra >= 2 && rb >= 2, "rekeys: A {ra}, B {rb}");
    for s in [sa, sb] {
        assert_eq!(get(s, "established"), 1, "{}", s.render());
        assert_eq!(get(s, "rekey_exhausted"), 0, "{}", s.render());
        assert_eq!(get(s, "esp_invalid"), 0, "{}", s.render());
        assert_eq!(get(s, "esp_unknown_spi"), 0, "{}", s.render());
    }
}

/// When the KEYMAT has no keys left for the next rekey, the association
/// is closed and the next packet runs a new base exchange (fresh KEYMAT);
/// a few packets around the switch may be lost (TCP resends them).
#[tokio::test]
async fn an_exhausted_keymat_leads_to_a_new_base_exchange() {
    let ((a, _at), (mut b, _bt)) = pair(|c| c.hip.rekey_seq = 8).await;
    let (la, lb) = (a.h.lsi, default_lsi(&b.h.hit));
    let mut delivered = 0;
    for i in 0..200u8 {
        a.to_net.send(udp4(la, lb, &[i; 20])).await.unwrap();
        if let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), b.from_net.recv()).await
        {
            delivered += 1;
        }
        let s = &a.h.stats;
        if s.get("established").unwrap() >= 2 && delivered > 120 {
            break;
        }
    }
    let s = &a.h.stats;
    let b_exhausted = b.h.stats.get("rekey_exhausted").unwrap();
    assert!(
        s.get("rekey_exhausted").unwrap() + b_exhausted >= 1,
        "{}",
        s.render()
    );
    assert!(s.get("established").unwrap() >= 2, "{}", s.render());
    assert!(delivered > 120, "{delivered} delivered; {}", s.render());
}

/// Stop sends CLOSE and waits for the CLOSE_ACK: the peer's association
/// is closed and the stopping endpoint exits as soon as the ACK is in.
#[tokio::test]
async fn stop_waits_for_the_close_ack() {
    let ((a, at), (b, _bt)) = pair(|c| c.close_grace = Duration::from_secs(5)).await;
    let t0 = Instant::now();
    a.h.stop().await;
    tokio::time::timeout(Duration::from_secs(4), at)
        .await
        .expect("the CLOSE_ACK ends the drain long before close_grace")
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(a.h.stats.get("close_unacked"), Some(0));
    assert_eq!(a.h.stats.get("closed"), Some(1));
    assert_eq!(b.h.stats.get("closed"), Some(1));
}

/// A peer that never answers gets CLOSE retransmitted (RFC 7401 §6.14)
/// until `close_grace` ends; the unacknowledged CLOSE is counted.
#[tokio::test]
async fn close_is_retransmitted_until_the_grace_ends() {
    let ((a, at), (b, _bt)) = pair(|c| c.close_grace = Duration::from_millis(1300)).await;
    // B freezes (hands its associations over and stops reading).
    b.h.export_and_stop().await.unwrap();
    let sent = a.h.stats.get("hip_out").unwrap();
    let t0 = Instant::now();
    a.h.stop().await;
    tokio::time::timeout(Duration::from_secs(5), at)
        .await
        .expect("the drain ends at close_grace")
        .unwrap();
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    // CLOSE at 0 s, again at 0.5 s and 1.5 s would be next (500 ms doubling).
    let closes = a.h.stats.get("hip_out").unwrap() - sent;
    assert_eq!(closes, 2, "CLOSE and one retransmission");
    assert_eq!(a.h.stats.get("close_unacked"), Some(1));
}
