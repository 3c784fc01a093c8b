//! `roam-hip bench`: user-space ESP against plain UDP on loopback, and
//! base-exchange latency, side by side. Needs no TUN and no privileges.
//!
//! ```text
//!  esp_crypto   one thread: seal → open, 1400-byte payloads (one core)
//!  udp_plain    sender thread ─UDP 127.0.0.1─► receiver thread
//!  esp_udp      sender: seal ─UDP 127.0.0.1─► receiver: open
//!  base_exchange  I1/R1/I2/R2 over UDP 127.0.0.1 (includes the puzzle,
//!                 ECDH, signatures), fresh identities each round
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roam_hip::esp;
use roam_hip::wire::udp::{classify, frame_hip, UdpPayload};
use roam_hip::{AssociationKeys, Config, Host, HostIdentity, Output};

use crate::error::Error;

/// Payload size used for throughput: a typical TCP segment under our MTU.
pub const PAYLOAD: usize = 1400;

/// Results of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub esp_crypto_gbps: f64,
    pub udp_plain_gbps: f64,
    pub esp_udp_gbps: f64,
    /// Base-exchange latencies on loopback, sorted.
    pub base_exchange: Vec<Duration>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.base_exchange;
        let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        writeln!(f, "payload {PAYLOAD} bytes")?;
        writeln!(
            f,
            "esp seal+open, one core      {:7.2} Gbit/s  (target >= 1)",
            self.esp_crypto_gbps
        )?;
        writeln!(
            f,
            "plain UDP, loopback          {:7.2} Gbit/s",
            self.udp_plain_gbps
        )?;
        writeln!(
            f,
            "ESP over UDP, loopback       {:7.2} Gbit/s",
            self.esp_udp_gbps
        )?;
        writeln!(
            f,
            "base exchange, loopback      min {:.1} ms  median {:.1} ms  max {:.1} ms  (n={})",
            ms(b.first()),
            ms(b.get(b.len() / 2)),
            ms(b.last()),
            b.len()
        )
    }
}

/// Runs every measurement for about `secs` seconds each.
pub fn run(secs: f64, rounds: usize) -> Result<Report, Error> {
    let dur = Duration::from_secs_f64(secs);
    let (ka, kb) = exchange_in_memory()?;
    Ok(Report {
        esp_crypto_gbps: esp_crypto(&ka, &kb, dur)?,
        udp_plain_gbps: udp(dur, None)?,
        esp_udp_gbps: udp(dur, Some((ka, kb)))?,
        base_exchange: base_exchange_latency(rounds)?,
    })
}

/// A base exchange between two in-memory hosts: both sides' keys.
pub fn exchange_in_memory() -> Result<(AssociationKeys, AssociationKeys), Error> {
    let now = Instant::now();
    let mut a = Host::new(HostIdentity::generate(), Config::default(), now)?;
    let mut b = Host::new(HostIdentity::generate(), Config::default(), now)?;
    let (aa, ba): (SocketAddr, SocketAddr) = (
        SocketAddr::from(([127, 0, 0, 1], 1)),
        SocketAddr::from(([127, 0, 0, 2], 2)),
    );
    let mut keys = [None, None];
    let mut pending: Vec<(bool, roam_hip::Packet)> = Vec::new();
    let collect = |outs: Vec<Output>, from_a: bool, p: &mut Vec<_>, k: &mut [Option<_>; 2]| {
        for o in outs {
            match o {
                Output::Send { packet, .. } => p.push((from_a, packet)),
                Output::Established { keys, .. } => k[usize::from(!from_a)] = Some(*keys),
                _ => {}
            }
        }
    };
    let outs = a.connect(now, b.hit(), ba)?;
    collect(outs, true, &mut pending, &mut keys);
    for _ in 0..16 {
        let Some((from_a, p)) = pending.pop() else {
            break;
        };
        let outs = if from_a {
            b.receive(now, aa, &p)?
        } else {
            a.receive(now, ba, &p)?
        };
        collect(outs, !from_a, &mut pending, &mut keys);
    }
    match keys {
        [Some(x), Some(y)] => Ok((x, y)),
        _ => Err(Error::Hip(roam_hip::Error::Unexpected(
            "in-memory base exchange did not complete",
        ))),
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn esp_crypto(ka: &AssociationKeys, kb: &AssociationKeys, dur: Duration) -> Result<f64, Error> {
    let bad = |_| Error::Hip(roam_hip::Error::Unexpected("ESP SA set-up"));
    let (mut out, _) = esp::sas(ka).map_err(bad)?;
    let (_, mut inb) = esp::sas(kb).map_err(bad)?;
    let payload = vec![0x5au8; PAYLOAD];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < dur {
        for _ in 0..256 {
            let d = out.seal(6, &payload).map_err(bad)?;
            let (_, p) = inb.open(&d).map_err(bad)?;
            bytes += p.len() as u64;
        }
    }
    Ok(gbps(bytes, start.elapsed()))
}

/// Sender thread → receiver thread over loopback, plain or through ESP.
fn udp(dur: Duration, sas: Option<(AssociationKeys, AssociationKeys)>) -> Result<f64, Error> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let to = rx.local_addr()?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let stop = Arc::new(AtomicBool::new(false));
    let bad = |_| Error::Hip(roam_hip::Error::Unexpected("ESP SA set-up"));
    let (mut seal, mut open) = match &sas {
        Some((ka, kb)) => (
            Some(esp::sas(ka).map_err(bad)?.0),
            Some(esp::sas(kb).map_err(bad)?.1),
        ),
        None => (None, None),
    };
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let payload = vec![0xa5u8; PAYLOAD];
        while !s2.load(Ordering::Relaxed) {
            let d = match seal.as_mut() {
                Some(sa) => match sa.seal(6, &payload) {
                    Ok(d) => d,
                    Err(_) => break,
                },
                None => payload.clone(),
            };
            // Loopback drops when the receiver is behind; that is the
            // measurement, not an error.
            let _ = tx.send_to(&d, to);
        }
    });
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < dur {
        let Ok(n) = rx.recv(&mut buf) else { continue };
        match open.as_mut() {
            // Loss makes sequence numbers jump; the window accepts that.
            Some(sa) => {
                if let Ok((_, p)) = sa.open(&buf[..n]) {
                    bytes += p.len() as u64;
                }
            }
            None => bytes += n as u64,
        }
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    Ok(gbps(bytes, elapsed))
}

/// Wall time of complete base exchanges over UDP on 127.0.0.1.
pub fn base_exchange_latency(rounds: usize) -> Result<Vec<Duration>, Error> {
    let mut v = Vec::new();
    for _ in 0..rounds {
        v.push(one_exchange()?);
    }
    v.sort();
    Ok(v)
}

fn one_exchange() -> Result<Duration, Error> {
    let now = Instant::now();
    let mut a = Host::new(HostIdentity::generate(), Config::default(), now)?;
    let mut b = Host::new(HostIdentity::generate(), Config::default(), now)?;
    let (sa, sb) = (
        UdpSocket::bind("127.0.0.1:0")?,
        UdpSocket::bind("127.0.0.1:0")?,
    );
    let b_addr = sb.local_addr()?;
    let b_hit = b.hit();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    sb.set_read_timeout(Some(Duration::from_millis(50)))?;
    let responder = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while !d2.load(Ordering::Relaxed) {
            let Ok((n, from)) = sb.recv_from(&mut buf) else {
                continue;
            };
            if let Ok(UdpPayload::Hip(p)) = classify(&buf[..n]) {
                if let Ok(outs) = b.receive_bytes(Instant::now(), from, p) {
                    send_all(&sb, outs);
                }
            }
        }
    });
    sa.set_read_timeout(Some(Duration::from_millis(50)))?;
    let start = Instant::now();
    let outs = a.connect(start, b_hit, b_addr)?;
    let mut established = send_all(&sa, outs);
    let mut buf = vec![0u8; 4096];
    while !established && start.elapsed() < Duration::from_secs(10) {
        if let Ok((n, from)) = sa.recv_from(&mut buf) {
            if let Ok(UdpPayload::Hip(p)) = classify(&buf[..n]) {
                if let Ok(outs) = a.receive_bytes(Instant::now(), from, p) {
                    established = send_all(&sa, outs);
                }
            }
        }
        let outs = a.poll(Instant::now());
        send_all(&sa, outs);
    }
    let took = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = responder.join();
    if !established {
        return Err(Error::Hip(roam_hip::Error::Unexpected(
            "base exchange on loopback timed out",
        )));
    }
    Ok(took)
}

/// Sends every packet; true if an association became established. (Also the lab's
/// base-exchange bench over the emulated WAN.)
pub fn send_all(s: &UdpSocket, outs: Vec<Output>) -> bool {
    let mut est = false;
    for o in outs {
        match o {
            Output::Send { to, packet } => {
                if let Ok(b) = packet.encode() {
                    let _ = s.send_to(&frame_hip(&b), to);
                }
            }
            Output::Established { .. } => est = true,
            _ => {}
        }
    }
    est
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn in_memory_exchange_gives_matching_sas() {
        let (ka, kb) = exchange_in_memory().unwrap();
        assert_eq!(ka.our_spi, kb.peer_spi);
        let (mut o, _) = esp::sas(&ka).unwrap();
        let (_, mut i) = esp::sas(&kb).unwrap();
        let d = o.seal(17, b"x").unwrap();
        assert_eq!(i.open(&d).unwrap(), (17, b"x".to_vec()));
    }

    #[test]
    fn short_bench_reports_numbers() {
        let r = run(0.1, 1).unwrap();
        assert!(r.esp_crypto_gbps > 0.0 && r.udp_plain_gbps > 0.0 && r.esp_udp_gbps > 0.0);
        assert_eq!(r.base_exchange.len(), 1);
        assert!(r.to_string().contains("Gbit/s"));
    }
}
