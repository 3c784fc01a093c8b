//! A real guest (the shared image of scripts/setup.sh, QEMU 10 under TCG,
//! 256 MiB) on the served LAN: DHCP, ARP and ping of the gateway, packets
//! injected from the host answered by the guest's kernel, QEMU reconnecting
//! to a restarted server without the guest noticing, and IPv6 by SLAAC with
//! the LAN's NAT to an outside address.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::Ipv6Addr;

use roam_vlan::wire::{icmp, icmpv6, ipv4, ipv6, udp, Mac};
use roam_vlan::{serve, Ipv6Lan, LanConfig};
use roam_vm::{Accel, MacAddr, MigrationStatus, NicConfig, Vm, VmConfig};
use tokio::sync::mpsc;
use tokio::time::timeout;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6c, 0x01];
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);
const BOOT: Duration = Duration::from_secs(40);

/// One guest at a time: two cores are shared by many engineers.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn guest_dir() -> PathBuf {
    let cache = std::env::var_os("ROAM_CACHE").unwrap_or_else(|| "/var/cache/roam".into());
    PathBuf::from(cache).join("guest/current")
}

/// Builds the shared image when it is missing (as the agent's tests do).
fn ensure_guest() -> serde_json::Value {
    let g = guest_dir();
    if !g.join(".complete").exists() {
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup.sh");
        let st = std::process::Command::new("bash")
            .arg(setup)
            .status()
            .unwrap();
        assert!(st.success(), "scripts/setup.sh failed");
    }
    serde_json::from_slice(&std::fs::read(g.join("guest.json")).unwrap()).unwrap()
}

fn vm_config(dir: &Path, sock: &Path) -> VmConfig {
    let meta = ensure_guest();
    let g = guest_dir();
    let mut c = VmConfig::new("vlan-test", dir.join("vm"), g.join("vmlinuz"), Accel::Tcg);
    c.initrd = Some(g.join("initramfs.img"));
    c.cmdline = meta["cmdline"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with("console="))
        .collect::<Vec<_>>()
        .join(" ");
    c.nic = Some(NicConfig {
        socket: sock.to_path_buf(),
        mac: MacAddr(GUEST_MAC),
    });
    c
}

async fn wait_serial(vm: &Vm, marker: &str, t: Duration) {
    if let Err(e) = vm.wait_serial(marker, t).await {
        panic!("{e}\nserial log:\n{}", vm.serial_log());
    }
}

/// Sends an ICMP echo request from PEER to the guest and waits for the reply
/// among the packets the guest sends off the LAN.
async fn ping_guest(
    to_guest: &mpsc::Sender<Vec<u8>>,
    from_guest: &mut mpsc::Receiver<Vec<u8>>,
    guest: Ipv4Addr,
    seq: u16,
) {
    let req = icmp::echo(icmp::ECHO_REQUEST, 0x766c, seq, b"roam-vlan ping");
    let p = ipv4::build(PEER, guest, ipv4::PROTO_ICMP, 64, seq, &req).unwrap();
    to_guest.send(p).await.unwrap();
    let reply = next_matching(from_guest, |p| {
        let m = icmp::Message::parse(p.payload).ok()?;
        (p.header.protocol == ipv4::PROTO_ICMP && m.typ == icmp::ECHO_REPLY)
            .then(|| (m.echo_id_seq(), m.data.to_vec()))
    })
    .await;
    assert_eq!(reply.0, Some((0x766c, seq)));
    assert_eq!(reply.1, b"roam-vlan ping");
}

async fn next_matching<T>(
    rx: &mut mpsc::Receiver<Vec<u8>>,
    mut f: impl FnMut(&ipv4::Packet<'_>) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let pkt = timeout(left, rx.recv())
            .await
            .expect("no matching packet from the guest in 10 s")
            .expect("queue closed");
        let p = ipv4::Packet::parse(&pkt).expect("guest sent a malformed packet");
        assert_eq!(p.header.dst, PEER, "guest packet to an unexpected address");
        if let Some(t) = f(&p) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_gets_dhcp_pings_gateway_and_answers_host_packets() {
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::Builder::new().prefix("vlan").tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let cfg = LanConfig::new(Mac(GUEST_MAC));
    let guest = cfg.guest_ip;
    let (handle, mut from_guest, to_guest) = serve(&sock, cfg.clone()).await.unwrap();

    let t0 = std::time::Instant::now();
    let vm = Vm::spawn(vm_config(dir.path(), &sock)).await.unwrap();
    assert!(handle.wait_connections(1, Duration::from_secs(10)).await);
    wait_serial(
        &vm,
        "ROAM-NET: eth0 198.18.100.2/24 bound lease 86400s router 198.18.100.1",
        BOOT,
    )
    .await;
    eprintln!("guest leased its address {:?} after start", t0.elapsed());
    wait_serial(
        &vm,
        "ROAM-NET: gateway 198.18.100.1 answers ping",
        Duration::from_secs(10),
    )
    .await;

    let s = handle.stats();
    eprintln!("after boot: {s:?}");
    assert!(s.lan.dhcp_discovers >= 1 && s.lan.dhcp_offers >= 1);
    assert!(s.lan.dhcp_requests >= 1 && s.lan.dhcp_acks >= 1);
    assert_eq!(s.lan.dhcp_naks, 0);
    assert!(
        s.lan.arp_replies >= 1,
        "the guest never asked for the gateway"
    );
    assert!(s.lan.icmp_echo_replies >= 1);
    assert_eq!(s.lan.malformed, 0);

    // The host's packets reach the guest's kernel, which answers them.
    ping_guest(&to_guest, &mut from_guest, guest, 1).await;
    let d = udp::build(PEER, guest, 40000, 9, b"anyone there?").unwrap();
    to_guest
        .send(ipv4::build(PEER, guest, ipv4::PROTO_UDP, 64, 77, &d).unwrap())
        .await
        .unwrap();
    let quoted = next_matching(&mut from_guest, |p| {
        let m = icmp::Message::parse(p.payload).ok()?;
        (m.typ == icmp::DEST_UNREACHABLE && m.code == 3).then(|| m.data.to_vec())
    })
    .await;
    // The port-unreachable quotes our datagram's IPv4 header.
    let inner = &quoted[..20];
    assert_eq!(&inner[12..16], &PEER.octets());
    assert_eq!(&inner[16..20], &guest.octets());

    // roamd restarts its LAN (same config): QEMU reconnects by itself and the
    // guest carries on with the same address and gateway.
    drop(handle);
    let (handle, mut from_guest, to_guest) = serve(&sock, cfg).await.unwrap();
    assert!(
        handle.wait_connections(1, Duration::from_secs(5)).await,
        "QEMU did not reconnect"
    );
    ping_guest(&to_guest, &mut from_guest, guest, 2).await;
    let s = handle.stats();
    assert_eq!(s.lan.from_host, 1);
    assert_eq!(s.io.to_guest_dropped, 0);
    eprintln!("after reconnect: {s:?}");

    vm.quit().await.unwrap();
    handle.shutdown().await;
}

/// The VM migrates from "office" to "home", each host serving its own LAN
/// with the same config: on the destination the guest answers the host's
/// packets at once, without asking ARP or DHCP again (it noticed nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_guest_keeps_its_lan_on_the_new_host() {
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::Builder::new().prefix("vlan").tempdir().unwrap();
    let cfg = LanConfig::new(Mac(GUEST_MAC));
    let guest = cfg.guest_ip;
    let (office_sock, home_sock) = (dir.path().join("office.sock"), dir.path().join("home.sock"));
    let (office, mut office_rx, office_tx) = serve(&office_sock, cfg.clone()).await.unwrap();
    let (home, mut home_rx, home_tx) = serve(&home_sock, cfg).await.unwrap();

    let src_cfg = vm_config(dir.path(), &office_sock);
    let src = Vm::spawn(src_cfg.clone()).await.unwrap();
    wait_serial(&src, "ROAM-NET: gateway 198.18.100.1 answers ping", BOOT).await;
    ping_guest(&office_tx, &mut office_rx, guest, 1).await;

    let mut dst_cfg = src_cfg;
    dst_cfg.run_dir = dir.path().join("vm-home");
    dst_cfg.incoming = true;
    dst_cfg.nic.as_mut().unwrap().socket = home_sock.clone();
    let dst = Vm::spawn(dst_cfg).await.unwrap();
    assert!(home.wait_connections(1, Duration::from_secs(10)).await);
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.migrate_incoming(&uri).await.unwrap();
    src.migrate(&uri).await.unwrap();
    let m = Duration::from_secs(30);
    src.wait_migration_status(&[MigrationStatus::Completed], m)
        .await
        .unwrap();
    dst.wait_migration_status(&[MigrationStatus::Completed], m)
        .await
        .unwrap();
    src.quit().await.unwrap();

    let before = home.stats().lan;
    ping_guest(&home_tx, &mut home_rx, guest, 2).await;
    let s = home.stats();
    eprintln!("home after the move: {s:?}");
    assert_eq!(s.lan.from_host, 1);
    assert_eq!(s.lan.to_host, before.to_host + 1);
    // The reply came straight through the gateway MAC it already knew.
    assert_eq!(s.lan.arp_replies, 0);
    assert_eq!(s.lan.dhcp_discovers + s.lan.dhcp_requests, 0);
    assert!(s.lan.announces >= 1, "no self-announce after the move");
    assert!(office.stats().lan.dhcp_acks >= 1);

    dst.quit().await.unwrap();
    office.shutdown().await;
    home.shutdown().await;
}

/// An unmodified guest kernel configures IPv6 from the LAN's router
/// advertisement (SLAAC, DAD passing) and answers an echo request sent to the
/// LAN's outside address, its reply NATed back to that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_configures_ipv6_by_slaac_and_answers_at_the_outside_address() {
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::Builder::new().prefix("vlan6").tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let outside = Ipv6Addr::new(0x2001, 0x2a, 0x766c, 0, 0, 0, 0, 1);
    let peer = Ipv6Addr::new(0x2001, 0x2b, 0, 0, 0, 0, 0, 7);
    let prefix = ipv6::ula_prefix([0x76, 0x6c, 0x61, 0x6e, 0x36]);
    let mut cfg = LanConfig::new(Mac(GUEST_MAC));
    cfg.ipv6 = Some(Ipv6Lan { prefix, outside });
    let (handle, mut from_guest, to_guest) = serve(&sock, cfg).await.unwrap();
    let vm = Vm::spawn(vm_config(dir.path(), &sock)).await.unwrap();
    wait_serial(&vm, "ROAM-NET: eth0 198.18.100.2/24 bound", BOOT).await;

    // SLAAC: RS → RA, then DAD for prefix + EUI-64, which the LAN learns.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while handle.stats().lan.ipv6_learned == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = handle.stats();
    eprintln!("after SLAAC: {s:?}");
    assert!(
        s.lan.router_adverts >= 1,
        "the guest never solicited a router"
    );
    assert_eq!(
        s.lan.ipv6_learned, 1,
        "the guest never claimed an address in the prefix"
    );

    // An echo request to the outside address reaches the guest's kernel; the
    // reply leaves the LAN from the outside address with a valid checksum.
    let mut replied = None;
    for seq in 1..=10u16 {
        let req = icmpv6::echo(peer, outside, icmpv6::ECHO_REQUEST, 0x766c, seq, b"roam v6");
        let p = ipv6::build(peer, outside, ipv6::PROTO_ICMPV6, 64, &req).unwrap();
        to_guest.send(p).await.unwrap();
        let wait = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(pkt)) = timeout(
            wait.saturating_duration_since(tokio::time::Instant::now()),
            from_guest.recv(),
        )
        .await
        {
            let Ok(p) = ipv6::Packet::parse(&pkt) else {
                continue;
            };
            assert_eq!(p.header.src, outside, "NAT left the guest's address");
            assert!(ipv6::transport_checksum_ok(&p));
            let m = icmpv6::Message::parse(p.payload, p.header.src, p.header.dst).unwrap();
            if m.typ == icmpv6::ECHO_REPLY {
                replied = m
                    .echo()
                    .map(|(id, sq, d)| (id, sq, d.to_vec(), p.header.dst));
                break;
            }
        }
        if replied.is_some() {
            break;
        }
    }
    let (id, _, data, dst) = replied.expect("no IPv6 echo reply from the guest in 10 tries");
    assert_eq!((id, &data[..], dst), (0x766c, &b"roam v6"[..], peer));
    let s = handle.stats();
    eprintln!("after ping6: {s:?}");
    assert_eq!(s.lan.malformed, 0);
    vm.quit().await.unwrap();
    handle.shutdown().await;
}
