//! Counters of the data plane: every dropped packet lands in one of them,
//! so a flood of garbage shows up here instead of in the logs.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! stats {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, shared between the loop and its observers.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[$m])* pub $name: AtomicU64,)* }

        impl Stats {
            /// `name value` pairs, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

stats! {
    /// Packets read from TUN.
    tun_in,
    /// Packets written to TUN.
    tun_out,
    /// ESP packets sealed and sent.
    esp_out,
    /// ESP packets opened and delivered.
    esp_in,
    /// HIP control packets received and accepted by the state machine.
    hip_in,
    /// HIP control packets sent.
    hip_out,
    /// HIP control packets the state machine rejected (malformed, forged,
    /// unexpected).
    hip_dropped,
    /// UDP datagrams that are neither HIP nor ESP (too short).
    udp_garbage,
    /// ESP packets for an SPI we do not have.
    esp_unknown_spi,
    /// ESP packets rejected by the anti-replay window.
    esp_replayed,
    /// ESP packets failing the ICV or malformed inside.
    esp_invalid,
    /// Opened ESP payloads that do not rebuild into a packet.
    esp_bad_inner,
    /// TUN packets we cannot carry (not to a HIT/LSI, malformed, unknown
    /// peer).
    tun_dropped,
    /// TUN packets dropped because the queue of a peer being connected was
    /// full.
    queue_dropped,
    /// Send errors on the UDP socket.
    send_errors,
    /// Base exchanges completed.
    established,
    /// Base exchanges failed.
    failed,
    /// Associations closed (CLOSE from the peer, or our CLOSE acknowledged).
    closed,
    /// UPDATEs with a new locator sent (one per peer).
    updates_sent,
    /// Peers that moved (verified UPDATE with a locator).
    peer_moves,
    /// Packets held because a peer's new locator was unverified and out of
    /// credit (RFC 8046 §5.3.2).
    rr_held,
    /// New peer locators that answered the echo request.
    rr_verified,
    /// New peer locators that never answered (traffic went back).
    rr_failed,
    /// I1s relayed to a registered Responder (rendezvous server role).
    rvs_relayed,
    /// Rendezvous server: registrations granted or renewed in an UPDATE
    /// (RFC 8003; those made in a base exchange count as `established`).
    rvs_renewed,
    /// Rendezvous server: registrations cancelled by their host (lifetime 0).
    rvs_cancelled,
    /// Rendezvous server: registrations that ended without renewal (no more
    /// relaying for that host).
    rvs_expired,
    /// Registrations with our rendezvous server granted (base exchange or
    /// renewal).
    reg_granted,
    /// Our registration reached the end of its lifetime without a renewal
    /// answered (asked for again).
    reg_lapsed,
    /// ESP rekeys completed (new SAs installed, RFC 7402 §3.3).
    rekeys,
    /// Associations closed because the KEYMAT had no keys left for the
    /// rekey the sequence numbers called for (a new base exchange follows).
    rekey_exhausted,
    /// CLOSEs that got no CLOSE_ACK before a stopping endpoint exited.
    close_unacked,
}

impl Stats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// One `name value` line per counter.
    pub fn render(&self) -> String {
        self.snapshot()
            .into_iter()
            .map(|(n, v)| format!("{n} {v}\n"))
            .collect()
    }
}
