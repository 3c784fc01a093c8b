//! Rendezvous with endpoints in one process on loopback (channels instead of TUN, no
//! privileges): a host registers with a rendezvous server, peers added at run time by
//! HIT alone reach it through the server, and its registration moves with its
//! associations to a new endpoint at a new locator (what roamd does at migration).
//!
//! A relayed I1's FROM carries only an address, and the Responder answers it at the HIP
//! port (RFC 5770's 10500), so the Initiators listen on port 10500 of their own
//! loopback addresses.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use roam_hip::{Hit, HostIdentity};
use roam_hipnet::beet::internet_checksum;
use roam_hipnet::{Endpoint, EndpointConfig, Handle, PacketDev, PeerSpec, UserEsp};
use tokio::sync::mpsc;

struct Side {
    h: Handle,
    to_net: mpsc::Sender<Vec<u8>>,
    from_net: mpsc::Receiver<Vec<u8>>,
}

/// A loopback address of this test process's own (127.X.Y.n): tests of other crates
/// binding 127.0.0.1:10500 at the same time do not collide with it.
fn lo(n: u8) -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(127, 100 + (pid % 100) as u8, (pid / 100 % 250) as u8, n)
}

async fn start(cfg: EndpointConfig) -> Side {
    let (to_net, outbound) = mpsc::channel(64);
    let (inbound, from_net) = mpsc::channel(64);
    let (h, _task) = Endpoint::start_on(
        cfg,
        Box::new(UserEsp::new()),
        PacketDev::Channel { outbound, inbound },
    )
    .await
    .unwrap();
    Side {
        h,
        to_net,
        from_net,
    }
}

fn cfg(id: HostIdentity, listen: SocketAddr) -> EndpointConfig {
    let mut c = EndpointConfig::new(id, listen, "unused");
    c.tun_name = None;
    c
}

/// A newcomer at 127.X.Y.`n`:10500 that knows only `peer`'s HIT and the rendezvous
/// server at `rvs`.
async fn knows_only_hit(n: u8, rvs: SocketAddr, peer: Hit) -> Side {
    let mut c = cfg(
        HostIdentity::generate(),
        SocketAddr::new(lo(n).into(), 10500),
    );
    c.rvs = Some(rvs);
    c.peers = vec![peer.to_string().parse().unwrap()];
    start(c).await
}

/// An IPv4/UDP packet (UDP checksum zero: not checked on the way).
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let ulen = 8 + data.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let hc = internet_checksum(&p);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    p.extend_from_slice(&[0x30, 0x39, 0x13, 0x89]);
    p.extend_from_slice(&(ulen as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

async fn recv(s: &mut Side) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), s.from_net.recv())
        .await
        .expect("no packet within 10 s")
        .unwrap()
}

async fn wait_status(h: &Handle, want: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        let st = h.status().await;
        if want(&st) {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.status().await
}

#[tokio::test]
async fn peers_added_by_hit_reach_a_registered_host_before_and_after_it_moves() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
    // The rendezvous server.
    let vid = HostIdentity::generate();
    let v_hit = vid.hit();
    let mut vc = cfg(vid, SocketAddr::new(lo(3).into(), 0));
    vc.serve_rvs = true;
    let (v, _vt) = Endpoint::start_on(vc, Box::new(UserEsp::new()), PacketDev::None)
        .await
        .unwrap();
    let rvs_spec: PeerSpec = format!("{v_hit}@{}", v.listen).parse().unwrap();

    // B registers with it.
    let bid = HostIdentity::generate();
    let b_hit = bid.hit();
    let mut bc = cfg(bid.clone(), SocketAddr::new(lo(2).into(), 0));
    bc.register_with = Some(rvs_spec.clone());
    let mut b = start(bc).await;
    let st = wait_status(&v, |s| s.contains(&b_hit.to_string())).await;
    assert!(st.contains(&format!("addr {}", b.h.listen)), "{st}");

    // A starts knowing nobody; B is added at run time by HIT alone.
    let mut ac = cfg(
        HostIdentity::generate(),
        SocketAddr::new(lo(1).into(), 10500),
    );
    ac.rvs = Some(v.listen);
    let mut a = start(ac).await;
    let b_lsi =
        a.h.add_peer(b_hit.to_string().parse().unwrap())
            .await
            .unwrap();
    a.to_net
        .send(udp4(a.h.lsi, b_lsi, b"via the RVS"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"via the RVS");
    assert_eq!(v.stats.get("rvs_relayed"), Some(1));
    // A bad peer is refused, not half-added.
    let clash: PeerSpec = format!("{v_hit}/{b_lsi}").parse().unwrap();
    assert!(a.h.add_peer(clash).await.is_err());

    // B moves to a new endpoint at another locator with its associations: the
    // registration comes along (no new exchange with the server), and its UPDATE
    // re-points the server.
    let state = b.h.export_and_stop().await.unwrap();
    let mut bc2 = cfg(bid, SocketAddr::new(lo(4).into(), 0));
    bc2.import = Some(state);
    bc2.register_with = Some(rvs_spec);
    let mut b2 = start(bc2).await;
    assert_eq!(b2.h.set_locator(lo(4).into()).await, Ok(2));
    let st = wait_status(&v, |s| s.contains(&format!("addr {}", b2.h.listen))).await;
    assert!(st.contains(&format!("addr {}", b2.h.listen)), "{st}");
    assert_eq!(v.stats.get("established"), Some(1), "registered once");
    assert_eq!(v.stats.get("peer_moves"), Some(1));
    // The new endpoint took over the renewals (REG_REQUEST in UPDATE).
    assert!(
        wait_stat(&v, "rvs_renewed", 1).await >= 1,
        "{}",
        v.stats.render()
    );
    assert!(wait_stat(&b2.h, "reg_granted", 1).await >= 1);

    // C, a newcomer that knows only B's HIT and the server, finds B at its new place.
    let c = knows_only_hit(5, v.listen, b_hit).await;
    let b_lsi_c = roam_hipnet::config::default_lsi(&b_hit);
    c.to_net
        .send(udp4(c.h.lsi, b_lsi_c, b"after the move"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b2).await[28..], b"after the move");
    assert_eq!(v.stats.get("rvs_relayed"), Some(2));
    // A's association moved with B too.
    a.to_net
        .send(udp4(a.h.lsi, b_lsi, b"still here"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b2).await[28..], b"still here");
    assert!(a.from_net.try_recv().is_err(), "nothing was sent to A");
}

/// A host whose rendezvous server is not up yet (a VM started before it) keeps trying
/// and registers once the server answers.
#[tokio::test]
async fn registration_is_retried_until_the_server_answers() {
    let vid = HostIdentity::generate();
    let v_at = SocketAddr::new(lo(6).into(), 10500);
    let mut bc = cfg(HostIdentity::generate(), SocketAddr::new(lo(7).into(), 0));
    bc.register_with = Some(format!("{}@{v_at}", vid.hit()).parse().unwrap());
    // Give up on the first attempt quickly: 3 tries, 50 ms apart at first.
    bc.hip.retransmit_initial = Duration::from_millis(50);
    bc.hip.retries_max = 2;
    let b = start(bc).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(b.h.stats.get("failed"), Some(1), "{}", b.h.stats.render());

    let mut vc = cfg(vid, v_at);
    vc.serve_rvs = true;
    let (v, _vt) = Endpoint::start_on(vc, Box::new(UserEsp::new()), PacketDev::None)
        .await
        .unwrap();
    let b_hit = b.h.hit.to_string();
    let st = wait_status(&v, |s| s.contains(&b_hit)).await;
    assert!(st.contains(&format!("addr {}", b.h.listen)), "{st}");
    assert_eq!(v.stats.get("established"), Some(1));
}

/// A rendezvous server that grants lifetimes from 1 s (RFC 8003 value 64).
async fn short_lived_rvs(n: u8) -> (Handle, PeerSpec) {
    let vid = HostIdentity::generate();
    let v_hit = vid.hit();
    let mut vc = cfg(vid, SocketAddr::new(lo(n).into(), 0));
    vc.serve_rvs = true;
    vc.hip.service_lifetime = (64, 160);
    let (v, _vt) = Endpoint::start_on(vc, Box::new(UserEsp::new()), PacketDev::None)
        .await
        .unwrap();
    let spec = format!("{v_hit}@{}", v.listen).parse().unwrap();
    (v, spec)
}

async fn wait_stat(h: &Handle, name: &str, want: u64) -> u64 {
    for _ in 0..250 {
        if h.stats.get(name) >= Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stats.get(name).unwrap_or(0)
}

/// With a 2 s lifetime the host renews its registration in UPDATE (RFC 8003) at
/// half of each lifetime, so relaying goes on well past the first one; after the
/// host cancels (lifetime 0) the server relays no more.
#[tokio::test]
async fn renewed_registration_keeps_relaying_until_cancelled() {
    let (v, rvs_spec) = short_lived_rvs(8).await;
    let bid = HostIdentity::generate();
    let b_hit = bid.hit();
    let mut bc = cfg(bid, SocketAddr::new(lo(9).into(), 0));
    bc.register_with = Some(rvs_spec);
    bc.register_lifetime = Duration::from_secs(2);
    let mut b = start(bc).await;
    let st = wait_status(&v, |s| s.contains(&b_hit.to_string())).await;
    assert!(st.contains(&b_hit.to_string()), "{st}");

    // Past the first lifetime and a half: two renewals at 1 s and 2 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(v.stats.get("rvs_expired"), Some(0), "{}", v.stats.render());
    assert!(
        v.stats.get("rvs_renewed") >= Some(2),
        "{}",
        v.stats.render()
    );
    assert!(
        b.h.stats.get("reg_granted") >= Some(3),
        "{}",
        b.h.stats.render()
    );
    assert_eq!(b.h.stats.get("reg_lapsed"), Some(0));

    let a = knows_only_hit(10, v.listen, b_hit).await;
    let b_lsi = roam_hipnet::config::default_lsi(&b_hit);
    a.to_net
        .send(udp4(a.h.lsi, b_lsi, b"after 3.5 s"))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"after 3.5 s");
    assert_eq!(v.stats.get("rvs_relayed"), Some(1));

    b.h.unregister().await.unwrap();
    assert_eq!(wait_stat(&v, "rvs_cancelled", 1).await, 1);
    assert!(b.h.unregister().await.is_err(), "cancelled twice");
    // A newcomer that knows only B's HIT no longer gets through the server.
    let c = knows_only_hit(11, v.listen, b_hit).await;
    c.to_net
        .send(udp4(c.h.lsi, b_lsi, b"after the cancel"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.stats.get("rvs_relayed"), Some(1), "{}", v.stats.render());
    assert!(b.from_net.try_recv().is_err(), "relayed after the cancel");
    // Nothing renewed it behind our back, nothing expired: it was cancelled.
    assert_eq!(v.stats.get("rvs_expired"), Some(0));
}

/// A host that stops without cancelling (here: hands its state over and never
/// starts again) is dropped by the server when its lifetime ends: no more relaying.
#[tokio::test]
async fn registration_expires_when_not_renewed() {
    let (v, rvs_spec) = short_lived_rvs(12).await;
    let bid = HostIdentity::generate();
    let b_hit = bid.hit();
    let mut bc = cfg(bid, SocketAddr::new(lo(13).into(), 0));
    bc.register_with = Some(rvs_spec);
    bc.register_lifetime = Duration::from_secs(2);
    let b = start(bc).await;
    wait_status(&v, |s| s.contains(&b_hit.to_string())).await;
    b.h.export_and_stop().await.unwrap();
    assert_eq!(
        wait_stat(&v, "rvs_expired", 1).await,
        1,
        "{}",
        v.stats.render()
    );

    let c = knows_only_hit(14, v.listen, b_hit).await;
    c.to_net
        .send(udp4(
            c.h.lsi,
            roam_hipnet::config::default_lsi(&b_hit),
            b"x",
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(v.stats.get("rvs_relayed"), Some(0), "{}", v.stats.render());
}

/// A rendezvous server that restarts (stops without CLOSE, a fresh one on the same
/// address) has lost the host's registration and association, so the host's renewal
/// goes unanswered. When its 2 s grant lapses, the host drops the association and
/// registers again in a new base exchange: relaying for its HIT works again within
/// about one lifetime of the restart.
#[tokio::test]
async fn host_registers_again_after_the_server_restarts() {
    let vid = HostIdentity::generate();
    let v_hit = vid.hit();
    // A fixed port, so the restarted server has the same address.
    let v_at = SocketAddr::new(lo(15).into(), 10500);
    let rvs_cfg = |id: HostIdentity| {
        let mut vc = cfg(id, v_at);
        vc.serve_rvs = true;
        vc.hip.service_lifetime = (64, 160);
        vc
    };
    let (v, vt) = Endpoint::start_on(
        rvs_cfg(vid.clone()),
        Box::new(UserEsp::new()),
        PacketDev::None,
    )
    .await
    .unwrap();

    let bid = HostIdentity::generate();
    let b_hit = bid.hit();
    let mut bc = cfg(bid, SocketAddr::new(lo(16).into(), 0));
    bc.register_with = Some(format!("{v_hit}@{v_at}").parse().unwrap());
    bc.register_lifetime = Duration::from_secs(2);
    let mut b = start(bc).await;
    let st = wait_status(&v, |s| s.contains(&b_hit.to_string())).await;
    assert!(st.contains(&b_hit.to_string()), "{st}");
    // Renewed at least once in UPDATE before the restart.
    assert!(wait_stat(&b.h, "reg_granted", 2).await >= 2);

    // The server dies without a word (no CLOSE) and comes back empty.
    v.export_and_stop().await.unwrap();
    vt.await.unwrap();
    let restarted = tokio::time::Instant::now();
    let (v2, _vt2) = Endpoint::start_on(rvs_cfg(vid), Box::new(UserEsp::new()), PacketDev::None)
        .await
        .unwrap();
    assert!(!v2.status().await.contains(&b_hit.to_string()));

    // Within one lifetime plus a base exchange, B is registered again.
    let mut st = String::new();
    while restarted.elapsed() < Duration::from_secs(6) {
        st = v2.status().await;
        if st.contains(&b_hit.to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        st.contains(&b_hit.to_string()),
        "not registered again: {st}"
    );
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "registered again after {took:?}"
    );
    assert!(
        b.h.stats.get("reg_lapsed") >= Some(1),
        "{}",
        b.h.stats.render()
    );
    assert_eq!(
        v2.stats.get("established"),
        Some(1),
        "{}",
        v2.stats.render()
    );

    // A correspondent that knows only B's HIT gets through the restarted server.
    let a = knows_only_hit(17, v_at, b_hit).await;
    a.to_net
        .send(udp4(
            a.h.lsi,
            roam_hipnet::config::default_lsi(&b_hit),
            b"after the restart",
        ))
        .await
        .unwrap();
    assert_eq!(&recv(&mut b).await[28..], b"after the restart");
    assert_eq!(v2.stats.get("rvs_relayed"), Some(1));
    // And B keeps renewing with the new server.
    assert!(
        wait_stat(&v2, "rvs_renewed", 1).await >= 1,
        "{}",
        v2.stats.render()
    );
}
