//! Shared helpers: two real endpoints on loopback with real keys.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use roam_channel::{ChannelConfig, Endpoint, Identity, TrustSet};

pub const LOCAL: &str = "127.0.0.1:0";

pub fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

/// A host: identity, trust set, endpoint.
pub struct Host {
    pub id: Identity,
    pub trust: Arc<TrustSet>,
    pub ep: Endpoint,
}

impl Host {
    pub fn new(config: ChannelConfig) -> Self {
        let id = Identity::generate().unwrap();
        let trust = Arc::new(TrustSet::new());
        let ep = Endpoint::bind(local(), &id, trust.clone(), config).unwrap();
        Self { id, trust, ep }
    }

    pub fn addr(&self) -> SocketAddr {
        self.ep.local_addr().unwrap()
    }

    pub fn trusts(&self, name: &str, other: &Host) {
        self.trust.insert(name, other.id.public_key());
    }
}

/// Config with short timers so failure tests finish quickly.
pub fn fast_config() -> ChannelConfig {
    ChannelConfig {
        idle_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_millis(500),
        handshake_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

/// Office trusts home and home trusts office.
pub fn office_and_home(config: ChannelConfig) -> (Host, Host) {
    let office = Host::new(config.clone());
    let home = Host::new(config);
    office.trusts("home", &home);
    home.trusts("office", &office);
    (office, home)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// A UDP relay on loopback standing in for a WAN link: one-way delay, deterministic
/// loss of every `drop_every`-th large datagram, and a switch that cuts the link.
/// Aborted when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(server: SocketAddr) -> Self {
        Self::with_link(server, Duration::ZERO, 0).await
    }

    pub async fn with_link(server: SocketAddr, one_way: Duration, drop_every: u64) -> Self {
        let sock = Arc::new(tokio::net::UdpSocket::bind(LOCAL).await.unwrap());
        let addr = sock.local_addr().unwrap();
        // A router-like queue: with the default ~200 KiB a burst overflows it and the test
        // measures the relay, not the channel.
        socket2::SockRef::from(&*sock)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        // A FIFO with a constant delay keeps packet order, like a real path.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>, SocketAddr)>();
        let out = sock.clone();
        let sender = tokio::spawn(async move {
            while let Some((due, d, to)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = out.send_to(&d, to).await;
            }
        });
        let (cut2, dropped2) = (cut.clone(), dropped.clone());
        let receiver = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            let mut large = 0u64;
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                if cut2.load(Ordering::Relaxed) {
                    continue; // the link is down: drop everything
                }
                if n >= 1000 && drop_every > 0 {
                    large += 1;
                    if large.is_multiple_of(drop_every) {
                        dropped2.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                let to = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                let _ = tx.send((Instant::now() + one_way, buf[..n].to_vec(), to));
            }
        });
        Self {
            addr,
            cut,
            dropped,
            tasks: vec![sender, receiver],
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
