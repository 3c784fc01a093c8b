//! Endpoint configuration: the identity file, the static peer table and
//! LSI assignment.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use roam_hip::{Hit, HostIdentity};

use crate::error::Error;

/// First line of an identity file; the version is part of it.
const IDENTITY_MAGIC: &str = "roam-hip-identity v1";
/// Identity files are tiny; anything larger is not one.
const IDENTITY_MAX: u64 = 4096;

/// True for addresses in 198.19.0.0/16, the project's LSI range.
pub fn is_lsi(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 198 && o[1] == 19
}

/// The LSI a HIT gets unless configured otherwise: 198.19.h14.h15, the same
/// first candidate `roam_hip::LsiPool` uses, so both ends usually agree.
pub fn default_lsi(hit: &Hit) -> Ipv4Addr {
    let (a, b) = (hit.0[14], hit.0[15]);
    match (a, b) {
        (0, 0) => Ipv4Addr::new(198, 19, 0, 1),
        (255, 255) => Ipv4Addr::new(198, 19, 255, 254),
        _ => Ipv4Addr::new(198, 19, a, b),
    }
}

/// One entry of the static peer table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub hit: Hit,
    /// Where to send I1; `None` means "ask the rendezvous server".
    pub addr: Option<SocketAddr>,
    /// Our local name for the peer; derived from the HIT when absent.
    pub lsi: Option<Ipv4Addr>,
}

impl FromStr for PeerSpec {
    type Err = Error;

    /// `HIT@ADDR:PORT[/LSI]` or `HIT[/LSI]`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::PeerSpec(s.to_string());
        let (head, lsi) = match s.rsplit_once('/') {
            Some((h, l)) => (h, Some(l.parse::<Ipv4Addr>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (hit, addr) = match head.split_once('@') {
            Some((h, a)) => (h, Some(a.parse::<SocketAddr>().map_err(|_| bad())?)),
            None => (head, None),
        };
        let hit = Hit::from(hit.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?);
        if !roam_hip::identity::is_orchid(&hit) {
            return Err(bad());
        }
        if let Some(l) = lsi {
            if !is_lsi(l) {
                return Err(Error::NotLsi(l));
            }
        }
        Ok(PeerSpec { hit, addr, lsi })
    }
}

/// HIT ↔ LSI names as this endpoint sees them.
#[derive(Clone, Debug, Default)]
pub struct LsiTable {
    by_hit: BTreeMap<Hit, Ipv4Addr>,
    by_lsi: BTreeMap<Ipv4Addr, Hit>,
}

impl LsiTable {
    /// Binds `hit` to `lsi`, refusing a name already given to another HIT.
    pub fn bind(&mut self, hit: Hit, lsi: Ipv4Addr) -> Result<(), Error> {
        if !is_lsi(lsi) {
            return Err(Error::NotLsi(lsi));
        }
        if let Some(other) = self.by_lsi.get(&lsi) {
            if *other != hit {
                return Err(Error::LsiClash {
                    lsi,
                    a: *other,
                    b: hit,
                });
            }
        }
        if let Some(old) = self.by_hit.insert(hit, lsi) {
            self.by_lsi.remove(&old);
        }
        self.by_lsi.insert(lsi, hit);
        Ok(())
    }

    /// The LSI of `hit`, assigning the first free one from its default.
    pub fn ensure(&mut self, hit: Hit) -> Ipv4Addr {
        if let Some(l) = self.by_hit.get(&hit) {
            return *l;
        }
        let start = u32::from(default_lsi(&hit));
        let lsi = (0..u32::from(u16::MAX))
            .map(|i| Ipv4Addr::from(0xc613_0000 | ((start + i) & 0xffff)))
            .find(|l| {
                let low = u32::from(*l) & 0xffff;
                low != 0 && low != 0xffff && !self.by_lsi.contains_key(l)
            })
            .unwrap_or(Ipv4Addr::new(198, 19, 255, 254));
        self.by_hit.insert(hit, lsi);
        self.by_lsi.insert(lsi, hit);
        lsi
    }

    pub fn lsi(&self, hit: &Hit) -> Option<Ipv4Addr> {
        self.by_hit.get(hit).copied()
    }

    pub fn hit(&self, lsi: &Ipv4Addr) -> Option<Hit> {
        self.by_lsi.get(lsi).copied()
    }
}

/// Writes a fresh identity to `path` (mode 0600) and returns it.
pub fn keygen(path: &Path) -> Result<HostIdentity, Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = HostIdentity::generate();
    let err = |e: std::io::Error| Error::Identity {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    writeln!(
        f,
        "{IDENTITY_MAGIC}\n{}\n# HIT {}",
        hex::encode(id.secret_bytes()),
        id.hit()
    )
    .map_err(err)?;
    Ok(id)
}

/// Reads an identity written by [`keygen`].
pub fn load_identity(path: &Path) -> Result<HostIdentity, Error> {
    let bad = |reason: &str| Error::Identity {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(&e.to_string()))?;
    if meta.len() > IDENTITY_MAX {
        return Err(bad("file too large"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?;
    let mut lines = text.lines();
    if lines.next() != Some(IDENTITY_MAGIC) {
        return Err(bad("not a roam-hip identity (v1) file"));
    }
    let secret = lines
        .next()
        .and_then(|l| hex::decode(l.trim()).ok())
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| bad("second line must be 64 hex digits"))?;
    HostIdentity::from_secret_bytes(&secret).map_err(|_| bad("invalid P-256 scalar"))
}

/// Everything `roam-hip run` needs.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub identity: HostIdentity,
    /// UDP socket for HIP and ESP (RFC 5770). An unspecified IP keeps the
    /// socket across locator changes; a specific one is rebound.
    pub listen: SocketAddr,
    /// TUN device; `None` for a pure rendezvous server (no data plane).
    pub tun_name: Option<String>,
    /// Our LSI; derived from our HIT when absent.
    pub lsi: Option<Ipv4Addr>,
    pub peers: Vec<PeerSpec>,
    /// Rendezvous server for peers configured without an address.
    pub rvs: Option<SocketAddr>,
    /// Register with this rendezvous server at start (RFC 8003/8004).
    pub register_with: Option<PeerSpec>,
    /// Registration lifetime to ask for; the registration is renewed at half
    /// of whatever the server grants (its bounds: `hip.service_lifetime`).
    /// It also bounds how long a restarted server, which lost the
    /// registration, goes without relaying for us: a grant that lapses
    /// unanswered is asked for again in a new base exchange.
    pub register_lifetime: Duration,
    /// Act as a rendezvous server: offer registration in R1 and relay I1s
    /// for registered HITs.
    pub serve_rvs: bool,
    /// Associations carried from another host ([`crate::handover`]),
    /// installed as ESTABLISHED at start.
    pub import: Option<Vec<u8>>,
    /// How far to move the imported associations' UPDATE SEQ ahead
    /// ([`roam_hip::Host::advance_update_ids`]): non-zero when the host takes
    /// back an identity it handed over, whose new host may have used the next SEQ.
    pub import_update_skip: u32,
    /// Unix socket for `roam-hip ctl`.
    pub control: Option<PathBuf>,
    pub mtu: u16,
    /// Packets queued per peer while its base exchange runs.
    pub queue_len: usize,
    /// How long a stopping endpoint keeps retransmitting CLOSE and waits
    /// for the CLOSE_ACKs (RFC 7401 §5.3.7, §6.14) before it exits. The
    /// protocol's own limit (`hip.close_timeout`, 30 s) is for a host that
    /// keeps running; a daemon that is asked to stop should not hang that
    /// long. Peers that miss every CLOSE time the association out.
    pub close_grace: Duration,
    pub hip: roam_hip::Config,
}

impl EndpointConfig {
    pub fn new(identity: HostIdentity, listen: SocketAddr, tun_name: &str) -> Self {
        // `udp_port` stays RFC 5770's 10500 whatever we listen on: it is where *peers*
        // are assumed to listen when a rendezvous server relays their I1 (FROM has no
        // port), and a VM's endpoint on 10501 must still answer a correspondent on 10500.
        let hip = roam_hip::Config::default();
        EndpointConfig {
            identity,
            listen,
            tun_name: Some(tun_name.to_string()),
            lsi: None,
            peers: Vec::new(),
            rvs: None,
            register_with: None,
            // 2^((160-64)/8) s, the longest the default registrar grants.
            register_lifetime: Duration::from_secs(4096),
            serve_rvs: false,
            import: None,
            import_update_skip: 0,
            control: None,
            mtu: 1400,
            queue_len: 16,
            close_grace: Duration::from_secs(3),
            hip,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peer_specs_parse() {
        let id = HostIdentity::generate();
        let h = id.hit();
        let p: PeerSpec = format!("{h}@198.18.1.2:10500/198.19.0.7").parse().unwrap();
        assert_eq!(p.hit, h);
        assert_eq!(p.addr, Some("198.18.1.2:10500".parse().unwrap()));
        assert_eq!(p.lsi, Some(Ipv4Addr::new(198, 19, 0, 7)));
        let p: PeerSpec = h.to_string().parse().unwrap();
        assert_eq!((p.addr, p.lsi), (None, None));
        assert!(format!("{h}/10.0.0.1").parse::<PeerSpec>().is_err());
        assert!("2001:db8::1@1.2.3.4:5".parse::<PeerSpec>().is_err());
        assert!(format!("{h}@nowhere").parse::<PeerSpec>().is_err());
    }

    #[test]
    fn lsi_table_avoids_clashes() {
        let mut t = LsiTable::default();
        let a = Hit([0x20, 0x01, 0, 0x22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 6]);
        let mut b = a;
        b.0[13] = 1;
        assert_eq!(t.ensure(a), Ipv4Addr::new(198, 19, 5, 6));
        assert_eq!(t.ensure(b), Ipv4Addr::new(198, 19, 5, 7));
        assert_eq!(t.hit(&Ipv4Addr::new(198, 19, 5, 7)), Some(b));
        assert!(t.bind(b, Ipv4Addr::new(198, 19, 5, 6)).is_err());
    }

    #[test]
    fn identity_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("roam-hip-id-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let id = keygen(&dir).unwrap();
        assert_eq!(load_identity(&dir).unwrap().hit(), id.hit());
        assert!(keygen(&dir).is_err(), "never overwrites an identity");
        std::fs::write(&dir, "junk\n").unwrap();
        assert!(load_identity(&dir).is_err());
        std::fs::remove_file(&dir).unwrap();
    }
}
