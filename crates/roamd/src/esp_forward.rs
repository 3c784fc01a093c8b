//! Forwarding pointer for a VM's HIP endpoint during a handover.
//!
//! ```text
//!  peer ──ESP──▶ old host :10500 (endpoint exported, guest paused)
//!                  │ held until the new endpoint's address is known, then
//!                  └──────────── forwarded unchanged ──▶ new host :105xx
//! ```
//! Between the moment the source freezes the VM's endpoint and the moment a peer
//! has processed the destination's UPDATE, the peer keeps sending to the old
//! locator. Dropped, those segments cost the peer's TCP a retransmission (a round
//! trip after the guest resumes at best, a 200 ms+ timeout at worst). The old
//! host cannot decrypt them any more — it gave the keys away — but it does not
//! need to: an ESP packet is self-contained (SPI, sequence number, ICV), so the
//! new endpoint accepts it whatever address it came from, and its anti-replay
//! window absorbs the reordering.
//!
//! Only ESP is forwarded. HIP control packets (UDP payload starting with the
//! zero marker of RFC 5770) carry the sender's address in their semantics; a
//! relayed one would make the new host answer the wrong address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// Packets held while the destination's address is unknown; beyond this the
/// oldest are dropped (TCP recovers them, as it would have without forwarding).
const MAX_HELD: usize = 1024;
/// Bytes held at most.
const MAX_HELD_BYTES: usize = 4 << 20;
/// The pointer lives at most this long: long enough for every peer's UPDATE
/// exchange (retransmitted at most a few times), short enough not to keep a
/// port bound for a VM that left.
const LIFETIME: Duration = Duration::from_secs(15);
/// Largest UDP payload read.
const BUF: usize = 65536;

/// What the forwarder did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwardStats {
    pub forwarded: u64,
    pub dropped: u64,
}

/// A running forwarding pointer; dropping it stops it.
pub struct Forwarder {
    target: Option<oneshot::Sender<SocketAddr>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<ForwardStats>,
}

/// ESP in UDP starts with a non-zero SPI; HIP control starts with 32 zero bits.
fn is_esp(payload: &[u8]) -> bool {
    payload.len() >= 8 && payload[..4] != [0, 0, 0, 0]
}

impl Forwarder {
    /// Binds `listen` (the address the VM's endpoint just released) and holds
    /// ESP packets until [`Forwarder::forward_to`] names the new endpoint.
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Forwarder> {
        let sock = UdpSocket::bind(listen).await?;
        let (tx, rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(sock, rx, stop_rx));
        Ok(Forwarder {
            target: Some(tx),
            stop: Some(stop_tx),
            task,
        })
    }

    /// From now on (and for what was held), send ESP packets to `to`.
    pub fn forward_to(&mut self, to: SocketAddr) {
        if let Some(tx) = self.target.take() {
            let _ = tx.send(to);
        }
    }

    /// Stops the forwarder and releases its port before returning (the old
    /// endpoint may need the port back right away, after an abort).
    pub async fn stop(mut self) -> ForwardStats {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap_or_default()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    sock: UdpSocket,
    target: oneshot::Receiver<SocketAddr>,
    stop: oneshot::Receiver<()>,
) -> ForwardStats {
    let mut stats = ForwardStats::default();
    let mut held: VecDeque<Vec<u8>> = VecDeque::new();
    let mut held_bytes = 0usize;
    let mut buf = vec![0u8; BUF];
    let deadline = tokio::time::sleep(LIFETIME);
    tokio::pin!(deadline);
    tokio::pin!(target);
    tokio::pin!(stop);
    let mut to: Option<SocketAddr> = None;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut stop => break,
            t = &mut target, if to.is_none() => match t {
                Ok(addr) => {
                    to = Some(addr);
                    for p in held.drain(..) {
                        match sock.send_to(&p, addr).await {
                            Ok(_) => stats.forwarded += 1,
                            Err(_) => stats.dropped += 1,
                        }
                    }
                    held_bytes = 0;
                    debug!(%addr, forwarded = stats.forwarded, "ESP forwarding pointer set");
                }
                // No address will come (older destination, or the handover failed):
                // keep the port until stopped, drop what arrives.
                Err(_) => {
                    stats.dropped += held.len() as u64;
                    held.clear();
                    held_bytes = 0;
                    to = None;
                    deadline.as_mut().reset(tokio::time::Instant::now());
                }
            },
            r = sock.recv_from(&mut buf) => {
                let Ok((n, _from)) = r else { continue };
                let p = &buf[..n];
                if !is_esp(p) {
                    continue;
                }
                match to {
                    Some(addr) => match sock.send_to(p, addr).await {
                        Ok(_) => stats.forwarded += 1,
                        Err(_) => stats.dropped += 1,
                    },
                    None => {
                        held.push_back(p.to_vec());
                        held_bytes += n;
                        while held.len() > MAX_HELD || held_bytes > MAX_HELD_BYTES {
                            if let Some(old) = held.pop_front() {
                                held_bytes -= old.len();
                                stats.dropped += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    stats.dropped += held.len() as u64;
    if stats.forwarded > 0 || stats.dropped > 0 {
        info!(
            forwarded = stats.forwarded,
            dropped = stats.dropped,
            "ESP forwarding pointer closed"
        );
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_esp_is_forwarded() {
        assert!(is_esp(&[0, 0, 0, 7, 0, 0, 0, 1]));
        assert!(!is_esp(&[0, 0, 0, 0, 0x3b, 1, 2, 3]));
        assert!(!is_esp(&[1, 2, 3]));
    }

    #[tokio::test]
    async fn holds_then_forwards_in_order_and_skips_hip() {
        let new_ep = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let old_addr = probe.local_addr().unwrap();
        drop(probe);
        let mut fwd = Forwarder::bind(old_addr).await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        peer.send_to(&[0, 0, 0, 9, 0, 0, 0, 1, 0xaa], old_addr)
            .await
            .unwrap();
        peer.send_to(&[0, 0, 0, 0, 0x3b, 0, 0, 0], old_addr)
            .await
            .unwrap();
        peer.send_to(&[0, 0, 0, 9, 0, 0, 0, 2, 0xbb], old_addr)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        fwd.forward_to(new_ep.local_addr().unwrap());
        peer.send_to(&[0, 0, 0, 9, 0, 0, 0, 3, 0xcc], old_addr)
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(2), new_ep.recv_from(&mut buf))
                .await
                .expect("a forwarded packet")
                .unwrap();
            got.push(buf[n - 1]);
        }
        assert_eq!(got, vec![0xaa, 0xbb, 0xcc]);
        let st = fwd.stop().await;
        assert_eq!(st.forwarded, 3);
        // The port is free again right after stop.
        std::net::UdpSocket::bind(old_addr).expect("port released by stop");
    }
}
