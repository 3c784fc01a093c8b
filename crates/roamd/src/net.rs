//! A VM's network on the host that runs it: the guest's virtual LAN (roam-vlan), a NAT
//! between the guest's LAN address and the VM's LSI, and the VM's HIP endpoint
//! (roam-hipnet) that carries the guest's traffic to its correspondents.
//!
//! ```text
//!  guest eth0 ─ QEMU stream netdev ─ RUN/vms/NAME/net.sock ─ roam_vlan::serve
//!        from guest: IPv4 src guest IP ──NAT src→LSI──► Endpoint (PacketDev::Channel)
//!        to guest:   IPv4 dst LSI      ◄─NAT dst→guest── Endpoint ◄─ ESP/UDP ◄─ peers
//!        IPv6: the LAN itself NATs the guest's SLAAC address ↔ the VM's HIT (it alone
//!        knows which address the guest picked); the pumps pass IPv6 through
//!  Endpoint: UDP on the host's WAN address, port 10500 + k (first free), identity =
//!            the VM's HIP host identity (stored with the VM, moves with it)
//! ```
//!
//! The LAN is served for the whole life of the QEMU process; the endpoint may be stopped
//! and restarted under it (a migration hands its associations over at pre-switchover,
//! and an abort before the switch restarts it here from the same bytes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use roam_hip::HostIdentity;
use roam_hipnet::config::default_lsi;
use roam_hipnet::{Endpoint, EndpointConfig, PacketDev, PeerSpec, UserEsp};
use roam_migrate::protocol::NetSpec;
use roam_vlan::wire::ipv4::rewrite_addrs;
use roam_vlan::wire::ipv6::ula_prefix;
use roam_vlan::{Ipv6Lan, LanConfig, Mac};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::esp_forward::Forwarder;

/// How many UPDATE SEQ numbers a reclaimed association skips: more than a destination
/// sends in one handover (one announcement, whose retransmissions reuse its SEQ).
const RECLAIM_UPDATE_SKIP: u32 = 16;

/// First UDP port tried for a VM's endpoint (RFC 5770's HIP port).
pub const FIRST_PORT: u16 = 10500;
/// Ports tried after it: one endpoint per running VM on a host.
const PORTS: u16 = 64;
/// Depth of the queue between the NAT and the endpoint.
const QUEUE: usize = 1024;

/// A fresh network identity for a new VM: a HIP host identity, a locally administered
/// MAC derived from the HIT (stable, and distinct per VM), roam's default LAN.
pub fn new_spec() -> NetSpec {
    let id = HostIdentity::generate();
    let hit = id.hit();
    // 52:54:00 is QEMU's range; the low three octets from the HIT.
    let mac = Mac([0x52, 0x54, 0x00, hit.0[13], hit.0[14], hit.0[15]]);
    let lan = LanConfig::new(mac);
    NetSpec {
        hip_secret: hex::encode(id.secret_bytes()),
        mac: mac.to_string(),
        guest_ip: lan.guest_ip,
        prefix_len: lan.prefix_len,
        gateway_ip: lan.gateway_ip,
        mtu: lan.mtu,
        peers: Vec::new(),
        rvs: None,
    }
}

/// The VM's identity, from its stored secret.
pub fn identity(spec: &NetSpec) -> Result<HostIdentity> {
    let bytes: [u8; 32] = hex::decode(spec.hip_secret.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::State("stored HIP identity is not 64 hex digits".into()))?;
    HostIdentity::from_secret_bytes(&bytes)
        .map_err(|_| Error::State("stored HIP identity is not a P-256 scalar".into()))
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::State(format!("stored MAC '{s}' is unreadable")))?;
    v.try_into()
        .map_err(|_| Error::State(format!("stored MAC '{s}' is not six octets")))
}

pub fn lan_config(spec: &NetSpec) -> Result<LanConfig> {
    let mut cfg = LanConfig::new(Mac(parse_mac(&spec.mac)?));
    cfg.guest_ip = spec.guest_ip;
    cfg.prefix_len = spec.prefix_len;
    cfg.gateway_ip = spec.gateway_ip;
    cfg.mtu = spec.mtu;
    // The guest's IPv6 prefix from hash bits of the HIT (after the 28-bit ORCHID
    // prefix and the 4-bit suite): the same VM has the same /64 on every host.
    let hit = identity(spec)?.hit();
    let mut gid = [0u8; 5];
    gid.copy_from_slice(&hit.0[4..9]);
    cfg.ipv6 = Some(Ipv6Lan {
        prefix: ula_prefix(gid),
        outside: std::net::Ipv6Addr::from(hit.0),
    });
    cfg.validate()
        .map_err(|e| Error::State(format!("guest LAN: {e}")))?;
    Ok(cfg)
}

/// What `vm show` prints about the VM's network.
pub fn info(spec: &NetSpec, port: Option<u16>) -> Result<roam_control::api::VmNetInfo> {
    let hit = identity(spec)?.hit();
    Ok(roam_control::api::VmNetInfo {
        hit: hit.to_string(),
        lsi: default_lsi(&hit).to_string(),
        mac: spec.mac.clone(),
        guest_ip: format!("{}/{}", spec.guest_ip, spec.prefix_len),
        gateway: spec.gateway_ip.to_string(),
        mtu: spec.mtu,
        peers: spec.peers.clone(),
        hip_port: port,
        rvs: spec.rvs.clone(),
    })
}

/// A VM's rendezvous server as its endpoint needs it: where to register, and where
/// to send I1 for peers known by HIT alone.
pub fn rvs_spec(spec: &NetSpec) -> Result<Option<PeerSpec>> {
    let Some(r) = &spec.rvs else {
        return Ok(None);
    };
    let p: PeerSpec = r
        .parse()
        .map_err(|e| Error::BadRequest(format!("HIP rendezvous server '{r}': {e}")))?;
    if p.addr.is_none() {
        return Err(Error::BadRequest(format!(
            "HIP rendezvous server '{r}' has no address (expected HIT@ADDR:PORT)"
        )));
    }
    Ok(Some(p))
}

/// IPv6 packets need no NAT here: the LAN maps the guest's address to the HIT.
fn is_ipv6(pkt: &[u8]) -> bool {
    pkt.first().map(|b| b >> 4) == Some(6)
}

/// The network of one running VM.
pub struct VmNet {
    /// Mutable only through [`VmNet::add_peer`] (`roam vm peer-add`).
    spec: Mutex<NetSpec>,
    identity: HostIdentity,
    lsi: Ipv4Addr,
    lan: Mutex<Option<roam_vlan::Handle>>,
    to_guest: mpsc::Sender<Vec<u8>>,
    /// Where the guest's packets go: the current endpoint's queue (none while stopped).
    to_endpoint: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    endpoint: tokio::sync::Mutex<Option<roam_hipnet::Handle>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The address the endpoint listens on (host's WAN address, per-VM port).
    listen: Mutex<Option<SocketAddr>>,
}

impl VmNet {
    /// Serve the guest's LAN on `socket` (before QEMU starts: QEMU connects to it).
    pub async fn serve(spec: &NetSpec, socket: &Path) -> Result<Arc<VmNet>> {
        let identity = identity(spec)?;
        let lsi = default_lsi(&identity.hit());
        let cfg = lan_config(spec)?;
        let (handle, mut from_guest, to_guest) = roam_vlan::serve(socket, cfg)
            .await
            .map_err(|e| Error::Vm(format!("guest LAN on {}: {e}", socket.display())))?;
        let to_endpoint: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>> = Default::default();
        let slot = to_endpoint.clone();
        // Guest → endpoint: the guest speaks from its LAN address; peers know it by LSI.
        let pump = tokio::spawn(async move {
            while let Some(mut pkt) = from_guest.recv().await {
                if !is_ipv6(&pkt) && rewrite_addrs(&mut pkt, Some(lsi), None).is_err() {
                    continue;
                }
                let tx = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(tx) = tx {
                    // A full queue drops the packet, as a NIC would; TCP recovers.
                    let _ = tx.try_send(pkt);
                }
            }
        });
        Ok(Arc::new(VmNet {
            spec: Mutex::new(spec.clone()),
            identity,
            lsi,
            lan: Mutex::new(Some(handle)),
            to_guest,
            to_endpoint,
            endpoint: Default::default(),
            tasks: Mutex::new(vec![pump]),
            listen: Mutex::new(None),
        }))
    }

    pub fn listen(&self) -> Option<SocketAddr> {
        *self.listen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the VM's HIP endpoint on `ip` (the host's WAN address), on the first free
    /// port from [`FIRST_PORT`], optionally with associations carried from another host.
    pub async fn start_endpoint(&self, ip: IpAddr, import: Option<Vec<u8>>) -> Result<()> {
        self.start_endpoint_skipping(ip, import, 0).await
    }

    /// Take back associations this host exported for a handover that was called off.
    /// The destination may already have announced its locator with the next UPDATE
    /// SEQ; ours must go past it or peers would ignore the move back.
    pub async fn reclaim_endpoint(&self, ip: IpAddr, import: Vec<u8>) -> Result<()> {
        self.start_endpoint_skipping(ip, Some(import), RECLAIM_UPDATE_SKIP)
            .await
    }

    async fn start_endpoint_skipping(
        &self,
        ip: IpAddr,
        import: Option<Vec<u8>>,
        update_skip: u32,
    ) -> Result<()> {
        let spec = self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut peers = Vec::new();
        for p in &spec.peers {
            match p.parse::<PeerSpec>() {
                Ok(s) => peers.push(s),
                Err(e) => warn!(peer = %p, "ignoring HIP peer: {e}"),
            }
        }
        let rvs = rvs_spec(&spec).unwrap_or_else(|e| {
            warn!("ignoring: {e}");
            None
        });
        let guest_ip = spec.guest_ip;
        let mut last_err = String::new();
        for k in 0..PORTS {
            let listen = SocketAddr::new(ip, FIRST_PORT + k);
            let mut cfg = EndpointConfig::new(self.identity.clone(), listen, "");
            cfg.tun_name = None;
            cfg.lsi = Some(self.lsi);
            cfg.peers = peers.clone();
            cfg.import = import.clone();
            cfg.import_update_skip = update_skip;
            cfg.mtu = spec.mtu;
            cfg.rvs = rvs.as_ref().and_then(|r| r.addr);
            // The endpoint renews the registration (REG_REQUEST in UPDATE) at half
            // of each granted lifetime, at once after an import, and in a new base
            // exchange when a grant lapses unanswered (a restarted server): no
            // timer here.
            cfg.register_with = rvs.clone();
            let (out_tx, out_rx) = mpsc::channel(QUEUE);
            let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
            let dev = PacketDev::Channel {
                outbound: out_rx,
                inbound: in_tx,
            };
            match Endpoint::start_on(cfg, Box::new(UserEsp::new()), dev).await {
                Ok((h, task)) => {
                    info!(hit = %h.hit, lsi = %h.lsi, listen = %h.listen, "VM HIP endpoint up");
                    *self.listen.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.listen);
                    *self.endpoint.lock().await = Some(h);
                    *self.to_endpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(out_tx);
                    // Endpoint → guest: addressed to the VM's LSI, delivered to its LAN address.
                    let to_guest = self.to_guest.clone();
                    let pump = tokio::spawn(async move {
                        while let Some(mut pkt) = in_rx.recv().await {
                            if is_ipv6(&pkt)
                                || rewrite_addrs(&mut pkt, None, Some(guest_ip)).is_ok()
                            {
                                let _ = to_guest.try_send(pkt);
                            }
                        }
                    });
                    let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
                    t.push(pump);
                    t.push(task);
                    return Ok(());
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(Error::Vm(format!(
            "HIP endpoint on {ip} (ports {FIRST_PORT}..{}): {last_err}",
            FIRST_PORT + PORTS
        )))
    }

    /// Add a correspondent (already validated and stored by the caller): kept for later
    /// endpoint starts, and given to the running endpoint at once.
    pub async fn add_peer(&self, peer: &str) -> Result<()> {
        let spec: PeerSpec = peer
            .parse()
            .map_err(|e| Error::BadRequest(format!("HIP peer '{peer}': {e}")))?;
        {
            let mut s = self.spec.lock().unwrap_or_else(|p| p.into_inner());
            if !s.peers.iter().any(|p| p == peer) {
                s.peers.push(peer.to_string());
            }
        }
        let h = self.endpoint.lock().await.clone();
        if let Some(h) = h {
            h.add_peer(spec)
                .await
                .map_err(|e| Error::Vm(format!("HIP peer {peer}: {e}")))?;
        }
        Ok(())
    }

    /// Freeze the endpoint and hand out its associations (the guest must be paused).
    pub async fn export_and_stop(&self) -> Result<Vec<u8>> {
        *self.to_endpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let h = self.endpoint.lock().await.take();
        match h {
            Some(h) => h
                .export_and_stop()
                .await
                .map_err(|e| Error::Migration(format!("export HIP associations: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    /// Like [`VmNet::export_and_stop`], and leave a forwarding pointer on the released
    /// port ([`crate::esp_forward`]): ESP that peers send here until they learn the new
    /// locator is held, then passed on once the destination says where it listens.
    /// No pointer (only a warning) if the port cannot be taken back.
    pub async fn export_and_forward(&self) -> Result<(Vec<u8>, Option<Forwarder>)> {
        let listen = self.listen();
        let state = self.export_and_stop().await?;
        let Some(listen) = listen.filter(|_| !state.is_empty()) else {
            return Ok((state, None));
        };
        // The endpoint's task drops its socket just after it answered.
        let mut last = None;
        for _ in 0..50 {
            match Forwarder::bind(listen).await {
                Ok(f) => return Ok((state, Some(f))),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        warn!(%listen, "no ESP forwarding pointer: {}", last.map(|e| e.to_string()).unwrap_or_default());
        Ok((state, None))
    }

    /// Tell every peer our new locator (after the guest resumed on this host).
    pub async fn set_locator(&self, ip: IpAddr) -> Result<usize> {
        if ip.is_unspecified() {
            // roamd listens on every address: it cannot tell peers which one is ours.
            return Err(Error::Vm(format!(
                "cannot announce {ip} as a locator; give roamd a specific --listen address"
            )));
        }
        let h = self.endpoint.lock().await.clone();
        match h {
            Some(h) => h
                .set_locator(ip)
                .await
                .map_err(|e| Error::Vm(format!("HIP locator: {e}"))),
            None => Ok(0),
        }
    }

    /// Stop the endpoint (CLOSE to peers) and the LAN.
    pub async fn stop(&self) {
        *self.to_endpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(h) = self.endpoint.lock().await.take() {
            h.stop().await;
        }
        self.stop_lan().await;
    }

    /// Stop serving the LAN and the pumps, keeping no endpoint.
    async fn stop_lan(&self) {
        let lan = self.lan.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lan) = lan {
            lan.shutdown().await;
        }
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_spec_round_trips_to_identity_and_lan() {
        let s = new_spec();
        let id = identity(&s).unwrap();
        let cfg = lan_config(&s).unwrap();
        assert_eq!(cfg.guest_mac.0[3..], id.hit().0[13..16]);
        let v6 = cfg.ipv6.expect("a VM's LAN has IPv6");
        assert_eq!(v6.outside.octets(), id.hit().0);
        assert_eq!(v6.prefix.octets()[0], 0xfd, "a ULA prefix");
        assert_eq!(
            lan_config(&s).unwrap().ipv6,
            Some(v6),
            "stable per identity"
        );
        let i = info(&s, Some(10500)).unwrap();
        assert!(i.hit.starts_with("2001:2"), "{}", i.hit);
        assert!(i.lsi.starts_with("198.19."), "{}", i.lsi);
        assert_eq!(i.guest_ip, "198.18.100.2/24");
        assert_ne!(new_spec().hip_secret, s.hip_secret);
    }

    #[test]
    fn rendezvous_server_needs_a_hit_and_an_address() {
        let mut s = new_spec();
        assert_eq!(rvs_spec(&s).unwrap(), None);
        let hit = identity(&new_spec()).unwrap().hit();
        s.rvs = Some(format!("{hit}@198.18.3.3:10500"));
        let p = rvs_spec(&s).unwrap().unwrap();
        assert_eq!(
            (p.hit, p.addr),
            (hit, Some("198.18.3.3:10500".parse().unwrap()))
        );
        assert_eq!(info(&s, None).unwrap().rvs, s.rvs);
        for bad in [
            hit.to_string(),
            "198.18.3.3:10500".into(),
            format!("{hit}@nowhere"),
        ] {
            s.rvs = Some(bad.clone());
            assert!(matches!(rvs_spec(&s), Err(Error::BadRequest(_))), "{bad}");
        }
        // Records and manifests from before the field load without it.
        let mut v = serde_json::to_value(new_spec()).unwrap();
        v.as_object_mut().unwrap().remove("rvs");
        let old: NetSpec = serde_json::from_value(v).unwrap();
        assert_eq!(old.rvs, None);
    }

    #[test]
    fn bad_stored_values_are_errors() {
        let mut s = new_spec();
        s.hip_secret = "zz".into();
        assert!(identity(&s).is_err());
        assert!(parse_mac("52:54:00:01").is_err());
        assert!(parse_mac("52:54:00:01:02:gg").is_err());
    }
}
