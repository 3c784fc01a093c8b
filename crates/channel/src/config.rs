//! Transport tuning for long, fat, lossy links.
//!
//! Defaults are chosen for the links roam crosses: 10 Mbit/s to a few Gbit/s, 10–200 ms
//! RTT, some random loss.
//!
//! * **BBR** congestion control. Loss-based controllers (NewReno, CUBIC) read every lost
//!   packet as congestion. With random loss p their rate is bounded by about
//!   `MSS/RTT · 1.22/√p` (Mathis et al.): at p = 0.1 % and 40 ms RTT that is ~11 Mbit/s
//!   whatever the link can carry, and a migration stream that has to outrun the guest's
//!   dirty rate never converges. BBR paces at the measured bottleneck bandwidth and keeps
//!   going through random loss.
//! * **Flow-control windows** of at least one bandwidth-delay product:
//!   1 Gbit/s × 200 ms = 25 MB, so one stream may have 32 MiB in flight and a connection
//!   64 MiB. Smaller windows cap throughput at `window / RTT` no matter what BBR measures.
//! * **Keep-alive + idle timeout**: a PING every second keeps NAT bindings and the idle
//!   timer fresh, and a peer silent for 5 s is declared dead, which is how a migration
//!   notices a cut link (its stream reads fail with `PeerTimedOut`).
//! * **MTU discovery** on: 1200-byte packets waste ~3 % more on headers than 1452-byte ones.

use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::error::ChannelError;
use crate::frame::DEFAULT_MAX_PAYLOAD;

/// Congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    /// CUBIC that ignores losses while the path shows no queue (see `congestion.rs`):
    /// full rate over random loss, backs off on a real bottleneck. The default.
    #[default]
    LossTolerant,
    /// quinn's BBRv1: ignores loss, but overshoots shallow buffers badly.
    Bbr,
    /// Loss-based, the Linux TCP default.
    Cubic,
    /// Loss-based, the RFC 9002 reference.
    NewReno,
}

/// Tunables of the host channel. `Default` suits WAN links up to ~1 Gbit/s × 200 ms.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ChannelConfig {
    /// Congestion controller.
    pub congestion: CongestionControl,
    /// Bytes one stream may have unacknowledged in flight towards us.
    pub stream_receive_window: u64,
    /// Bytes all streams of a connection may have in flight towards us.
    pub receive_window: u64,
    /// Bytes we buffer for sending per connection.
    pub send_window: u64,
    /// Interval of keep-alive PINGs. Must be well under `idle_timeout`.
    pub keep_alive: Duration,
    /// Silence after which the peer is declared dead (negotiated: the smaller of the two
    /// peers' values wins).
    pub idle_timeout: Duration,
    /// Probe for a larger path MTU (up to `max_mtu`).
    pub mtu_discovery: bool,
    /// Largest UDP payload MTU discovery tries (1452 fits a 1500-byte Ethernet MTU with IPv6).
    pub max_mtu: u16,
    /// RTT assumed before the first measurement.
    pub initial_rtt: Duration,
    /// Bidirectional streams the peer may have open at once.
    pub max_concurrent_streams: u32,
    /// Requested kernel UDP socket buffer size (send and receive); the kernel may cap it
    /// (`net.core.rmem_max`/`wmem_max`).
    pub socket_buffer: usize,
    /// How long `connect` waits for the server's Hello after the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a new stream may take to deliver its header before it is dropped.
    pub stream_header_timeout: Duration,
    /// Largest message frame payload accepted by `recv_msg`.
    pub max_message_len: u32,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            congestion: CongestionControl::LossTolerant,
            stream_receive_window: 32 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            mtu_discovery: true,
            max_mtu: 1452,
            initial_rtt: Duration::from_millis(100),
            max_concurrent_streams: 256,
            socket_buffer: 8 << 20,
            handshake_timeout: Duration::from_secs(10),
            stream_header_timeout: Duration::from_secs(10),
            max_message_len: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl ChannelConfig {
    /// Checks ranges and relations between values.
    pub fn validate(&self) -> Result<(), ChannelError> {
        let bad = |m: &str| Err(ChannelError::Config(m.to_string()));
        if self.keep_alive.is_zero() || self.keep_alive * 2 > self.idle_timeout {
            return bad("keep_alive must be non-zero and at most half of idle_timeout");
        }
        if self.idle_timeout > Duration::from_secs(600) {
            return bad("idle_timeout must be at most 600 s");
        }
        if self.max_mtu < 1200 {
            return bad("max_mtu must be at least 1200 (QUIC minimum)");
        }
        if self.stream_receive_window == 0 || self.stream_receive_window > self.receive_window {
            return bad("stream_receive_window must be non-zero and at most receive_window");
        }
        if self.receive_window >= 1 << 62 || self.send_window == 0 {
            return bad("receive_window must be < 2^62 and send_window non-zero");
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams must be non-zero");
        }
        Ok(())
    }

    /// The quinn transport configuration these values describe.
    pub(crate) fn transport(&self) -> Result<Arc<TransportConfig>, ChannelError> {
        self.validate()?;
        let varint = |v: u64, what: &str| {
            VarInt::from_u64(v).map_err(|_| ChannelError::Config(format!("{what} too large")))
        };
        let mut t = TransportConfig::default();
        t.stream_receive_window(varint(self.stream_receive_window, "stream_receive_window")?)
            .receive_window(varint(self.receive_window, "receive_window")?)
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.idle_timeout)
                    .map_err(|_| ChannelError::Config("idle_timeout out of range".into()))?,
            ))
            .initial_rtt(self.initial_rtt)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            // One uni stream per connection: the server's Hello.
            .max_concurrent_uni_streams(VarInt::from_u32(1));
        if self.mtu_discovery {
            let mut m = MtuDiscoveryConfig::default();
            m.upper_bound(self.max_mtu);
            t.mtu_discovery_config(Some(m));
        } else {
            t.mtu_discovery_config(None);
        }
        match self.congestion {
            CongestionControl::LossTolerant => {
                t.congestion_controller_factory(Arc::new(
                    crate::congestion::LossTolerantConfig::default(),
                ));
            }
            CongestionControl::Bbr => {
                t.congestion_controller_factory(Arc::new(BbrConfig::default()));
            }
            CongestionControl::Cubic => {
                t.congestion_controller_factory(Arc::new(CubicConfig::default()));
            }
            CongestionControl::NewReno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()));
            }
        }
        Ok(Arc::new(t))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_cover_the_bdp() {
        let c = ChannelConfig::default();
        c.validate().unwrap();
        c.transport().unwrap();
        // 1 Gbit/s × 200 ms
        let bdp = 1_000_000_000u64 / 8 / 5;
        assert!(c.stream_receive_window >= bdp && c.send_window >= bdp);
        assert!(c.idle_timeout <= Duration::from_secs(10));
        assert_eq!(c.congestion, CongestionControl::LossTolerant);
    }

    #[test]
    fn bad_values_are_refused() {
        let c = ChannelConfig {
            keep_alive: Duration::from_secs(5),
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(ChannelError::Config(_))));
        let c = ChannelConfig {
            max_mtu: 1000,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn serde_fills_missing_fields_with_defaults() {
        let c: ChannelConfig = serde_json::from_str(r#"{"congestion":"cubic"}"#).unwrap();
        assert_eq!(c.congestion, CongestionControl::Cubic);
        assert_eq!(c.idle_timeout, ChannelConfig::default().idle_timeout);
    }
}
