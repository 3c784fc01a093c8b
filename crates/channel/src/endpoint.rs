//! A host's channel endpoint: one UDP socket, accepting trusted peers and dialing
//! pinned ones.
//!
//! ```text
//!  client (dialer)                                  server (acceptor)
//!  connect(addr, expected_key)
//!    ── QUIC Initial: TLS ClientHello, ALPN roam/N ─▶
//!    ◀─ ServerHello, cert(server key), CertVerify ──  (server signs transcript)
//!  verify: key == expected, signature ok
//!    ── cert(client key), CertVerify, Finished ─────▶ verify: key in trust store,
//!                                                     signature ok; else access_denied
//!    ◀─ uni stream: Hello{version} ─────────────────  connection queued for accept()
//!  connect() returns                                  accept() returns
//!    ── bidi stream: [R, kind] + data ─────────────▶  dispatched by kind
//! ```
//!
//! The Hello makes `connect` return only once the server has *accepted* us: in TLS 1.3
//! the client finishes its handshake before the server has checked the client
//! certificate, so without it a refused client would see success, then a dead connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{TransportConfig, TransportErrorCode, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, Mutex};

use crate::config::ChannelConfig;
use crate::connection::{CloseCode, Connection};
use crate::error::ChannelError;
use crate::frame::{self, FrameKind};
use crate::identity::{Identity, PublicKey};
use crate::socket::{bind_udp, CountingSocket, WireCounters};
use crate::stats::{ConnectionStats, EndpointStats};
use crate::stream::read_frame;
use crate::tls::{self, ALERT_ACCESS_DENIED, ALERT_NO_APPLICATION_PROTOCOL, SERVER_NAME};
use crate::trust::{Refusal, RefusalLog, TrustStore};

/// Payload of the server's Hello frame.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Hello {
    version: u16,
}

/// Cap on the Hello frame.
const HELLO_CAP: u32 = 1024;

/// One live connection, as listed by [`Endpoint::connections`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionSummary {
    /// The peer's key.
    pub peer_key: PublicKey,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Its statistics.
    pub stats: ConnectionStats,
}

/// Live connections and totals of closed ones.
#[derive(Default)]
struct Book {
    live: std::sync::Mutex<BookState>,
    opened: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
struct BookState {
    live: HashMap<usize, (PublicKey, quinn::Connection)>,
    closed_lost_packets: u64,
}

impl Book {
    fn state(&self) -> std::sync::MutexGuard<'_, BookState> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection and folds its final numbers into the totals when it closes.
    fn track(self: &Arc<Self>, conn: &Connection) {
        let q = conn.quinn().clone();
        let id = q.stable_id();
        self.state().live.insert(id, (conn.peer_key(), q.clone()));
        let book = self.clone();
        tokio::spawn(async move {
            q.closed().await;
            let lost = q.stats().path.lost_packets;
            let mut st = book.state();
            st.live.remove(&id);
            st.closed_lost_packets += lost;
        });
    }
}

/// What the accept loop needs; deliberately not the quinn endpoint itself, so that
/// dropping the last [`Endpoint`] closes it.
struct Shared {
    trust: Arc<dyn TrustStore>,
    refusals: Arc<RefusalLog>,
    book: Arc<Book>,
    max_msg: u32,
    header_timeout: Duration,
}

struct Inner {
    quinn: quinn::Endpoint,
    local_key: PublicKey,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    config: ChannelConfig,
    transport: Arc<TransportConfig>,
    wire: Arc<WireCounters>,
    shared: Arc<Shared>,
    accepted: Mutex<mpsc::Receiver<Connection>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.quinn
            .close(VarInt::from_u32(CloseCode::SHUTDOWN.0), b"endpoint dropped");
    }
}

/// A host's endpoint on the host-to-host channel. Cheap to clone; dropping the last
/// clone closes every connection.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_key", &self.inner.local_key)
            .field("local_addr", &self.inner.quinn.local_addr().ok())
            .finish()
    }
}

impl Endpoint {
    /// Binds a UDP socket at `addr` (port 0: any) and starts accepting peers whose key
    /// `trust` knows. Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: impl AsRef<Identity>,
        trust: Arc<dyn TrustStore>,
        config: ChannelConfig,
    ) -> Result<Self, ChannelError> {
        let identity = identity.as_ref();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ChannelError::Config(
                "Endpoint::bind must be called inside a tokio runtime".into(),
            ));
        }
        let transport = config.transport()?;
        let (cert, key) = tls::self_signed(identity)?;
        let refusals = Arc::new(RefusalLog::default());
        let crypto = tls::server_crypto(
            cert.clone(),
            key.clone_key(),
            trust.clone(),
            refusals.clone(),
        )?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());

        let udp = bind_udp(addr, config.socket_buffer)?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let wire = Arc::new(WireCounters::default());
        let socket = runtime
            .wrap_udp_socket(udp)
            .map_err(|source| ChannelError::Bind { addr, source })?;
        let socket = Arc::new(CountingSocket::new(socket, wire.clone()));
        let quinn = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| ChannelError::Bind { addr, source })?;

        let shared = Arc::new(Shared {
            trust,
            refusals,
            book: Arc::new(Book::default()),
            max_msg: config.max_message_len,
            header_timeout: config.stream_header_timeout,
        });
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(accept_loop(quinn.clone(), shared.clone(), tx));
        tracing::info!(key = %identity.public_key(), addr = ?quinn.local_addr().ok(), "channel endpoint bound");
        Ok(Self {
            inner: Arc::new(Inner {
                quinn,
                local_key: identity.public_key(),
                cert,
                key,
                config,
                transport,
                wire,
                shared,
                accepted: Mutex::new(rx),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, ChannelError> {
        self.inner.quinn.local_addr().map_err(ChannelError::Io)
    }

    /// This host's public key.
    pub fn local_key(&self) -> PublicKey {
        self.inner.local_key
    }

    /// The trust store consulted on every incoming handshake.
    pub fn trust(&self) -> &Arc<dyn TrustStore> {
        &self.inner.shared.trust
    }

    /// The configuration in force.
    pub fn config(&self) -> &ChannelConfig {
        &self.inner.config
    }

    /// Dials `addr` and returns once the server proved it holds `expected` and accepted
    /// our key. Errors say which side refused: [`ChannelError::WrongPeerKey`] (the server
    /// is not who we expected) or [`ChannelError::UnknownPeer`] with our own key (the
    /// server does not trust us).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: PublicKey,
    ) -> Result<Connection, ChannelError> {
        let inner = &self.inner;
        let (crypto, verifier) =
            tls::client_crypto(inner.cert.clone(), inner.key.clone_key(), expected)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(inner.transport.clone());
        let connecting = inner
            .quinn
            .connect_with(client, addr, SERVER_NAME)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => ChannelError::EndpointClosed,
                other => ChannelError::Handshake(other.to_string()),
            })?;
        let classify = |e: quinn::ConnectionError| {
            let refused_got = *verifier.refused.lock().unwrap_or_else(|p| p.into_inner());
            classify_connect_error(e, refused_got, expected, inner.local_key, addr)
        };
        let conn = connecting.await.map_err(classify)?;

        let hello = tokio::time::timeout(inner.config.handshake_timeout, async {
            let mut uni = conn.accept_uni().await?;
            read_frame(&mut uni, HELLO_CAP).await
        })
        .await;
        let version = match hello {
            Ok(Ok(Some(f))) if f.kind == FrameKind::Hello => {
                let h: Hello = frame::decode_message(&f.payload)?;
                h.version
            }
            Ok(Ok(_)) => {
                conn.close(
                    VarInt::from_u32(CloseCode::PROTOCOL_ERROR.0),
                    b"expected Hello",
                );
                return Err(ChannelError::Handshake("server sent no Hello".into()));
            }
            Ok(Err(e)) => {
                // The stream failed because the connection did: say why it did.
                return Err(match conn.close_reason() {
                    Some(reason) => classify(reason),
                    None => e,
                });
            }
            Err(_) => {
                conn.close(
                    VarInt::from_u32(CloseCode::PROTOCOL_ERROR.0),
                    b"no Hello in time",
                );
                return Err(ChannelError::Handshake(
                    "server did not confirm the connection in time".into(),
                ));
            }
        };
        if Some(version) != negotiated_version(&conn) {
            return Err(ChannelError::IncompatibleVersion);
        }
        let conn = Connection::new(
            conn,
            expected,
            inner.shared.trust.lookup(&expected),
            version,
            inner.config.max_message_len,
            inner.config.stream_header_timeout,
        );
        inner.shared.book.track(&conn);
        inner.shared.book.opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %expected, %addr, "connected");
        Ok(conn)
    }

    /// The next trusted peer that connected. Refused and failed handshakes never show up
    /// here (see [`EndpointStats::refused_handshakes`] and [`Endpoint::recent_refusals`]).
    pub async fn accept(&self) -> Result<Connection, ChannelError> {
        let mut rx = self.inner.accepted.lock().await;
        rx.recv().await.ok_or(ChannelError::EndpointClosed)
    }

    /// Endpoint totals since bind; closed connections included.
    pub fn stats(&self) -> EndpointStats {
        let sh = &self.inner.shared;
        let w = &self.inner.wire;
        let st = sh.book.state();
        let live_lost: u64 = st
            .live
            .values()
            .map(|(_, c)| c.stats().path.lost_packets)
            .sum();
        EndpointStats {
            tx_bytes: w.tx_bytes.load(Ordering::Relaxed),
            tx_datagrams: w.tx_datagrams.load(Ordering::Relaxed),
            rx_bytes: w.rx_bytes.load(Ordering::Relaxed),
            rx_datagrams: w.rx_datagrams.load(Ordering::Relaxed),
            connections_opened: sh.book.opened.load(Ordering::Relaxed),
            connections_accepted: sh.book.accepted.load(Ordering::Relaxed),
            connections_active: st.live.len() as u64,
            refused_handshakes: sh.refusals.count(),
            failed_handshakes: sh.book.failed.load(Ordering::Relaxed),
            lost_packets: st.closed_lost_packets + live_lost,
        }
    }

    /// The last few refused handshakes (which keys tried to connect).
    pub fn recent_refusals(&self) -> Vec<Refusal> {
        self.inner.shared.refusals.recent()
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<ConnectionSummary> {
        let st = self.inner.shared.book.state();
        st.live
            .values()
            .map(|(k, c)| ConnectionSummary {
                peer_key: *k,
                remote: c.remote_address(),
                stats: c.stats().into(),
            })
            .collect()
    }

    /// Closes every connection with `key` (e.g. after removing it from the trust store).
    /// Returns how many were closed.
    pub fn disconnect_peer(
        &self,
        key: &PublicKey,
        code: impl Into<CloseCode>,
        reason: &str,
    ) -> usize {
        let code = code.into();
        let st = self.inner.shared.book.state();
        let mut n = 0;
        for (k, c) in st.live.values() {
            if k == key {
                c.close(VarInt::from_u32(code.0), reason.as_bytes());
                n += 1;
            }
        }
        n
    }

    /// Closes every connection with [`CloseCode::SHUTDOWN`] and stops accepting, without
    /// waiting for the peers to be told (see [`Endpoint::shutdown`]).
    pub fn close(&self) {
        self.inner.quinn.close(
            VarInt::from_u32(CloseCode::SHUTDOWN.0),
            b"host shutting down",
        );
    }

    /// Closes every connection with `code`/`reason`, stops accepting, and waits (at most
    /// the idle timeout) until the peers have been told.
    pub async fn shutdown(&self, code: impl Into<CloseCode>, reason: &str) {
        self.inner
            .quinn
            .close(VarInt::from_u32(code.into().0), reason.as_bytes());
        let limit = self.inner.config.idle_timeout;
        if tokio::time::timeout(limit, self.inner.quinn.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("endpoint not idle after {limit:?}; giving up waiting");
        }
    }
}

/// Turns a failed outgoing handshake into a typed error.
fn classify_connect_error(
    e: quinn::ConnectionError,
    refused_got: Option<PublicKey>,
    expected: PublicKey,
    local_key: PublicKey,
    addr: SocketAddr,
) -> ChannelError {
    use quinn::ConnectionError as E;
    if let Some(got) = refused_got {
        return ChannelError::WrongPeerKey { expected, got };
    }
    let alert = |code: TransportErrorCode| {
        if code == TransportErrorCode::crypto(ALERT_ACCESS_DENIED) {
            Some(ChannelError::UnknownPeer { key: local_key })
        } else if code == TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) {
            Some(ChannelError::IncompatibleVersion)
        } else if code == TransportErrorCode::CONNECTION_REFUSED {
            Some(ChannelError::Refused { addr })
        } else {
            None
        }
    };
    match e {
        E::ConnectionClosed(c) => {
            alert(c.error_code).unwrap_or_else(|| ChannelError::Handshake(c.to_string()))
        }
        E::TransportError(t) => {
            alert(t.code).unwrap_or_else(|| ChannelError::Handshake(t.to_string()))
        }
        E::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CloseCode::UNTRUSTED.0) => {
            ChannelError::UnknownPeer { key: local_key }
        }
        E::TimedOut => ChannelError::Unreachable { addr },
        other => other.into(),
    }
}

/// The protocol version ALPN settled on.
fn negotiated_version(conn: &quinn::Connection) -> Option<u16> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    tls::version_from_alpn(data.protocol.as_deref()?).filter(|v| frame::is_supported_version(*v))
}

/// The Ed25519 key the peer authenticated with.
fn peer_key(conn: &quinn::Connection) -> Result<PublicKey, ChannelError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| ChannelError::Handshake("peer presented no certificate".into()))?;
    let cert = certs
        .first()
        .ok_or_else(|| ChannelError::Handshake("peer presented no certificate".into()))?;
    tls::key_from_cert(cert).map_err(|e| ChannelError::Handshake(e.to_string()))
}

/// Runs incoming handshakes concurrently (a slow client must not block the others) and
/// queues the accepted connections.
async fn accept_loop(quinn: quinn::Endpoint, shared: Arc<Shared>, tx: mpsc::Sender<Connection>) {
    while let Some(incoming) = quinn.accept().await {
        let (shared, tx) = (shared.clone(), tx.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match server_handshake(incoming, &shared).await {
                Ok(conn) => {
                    shared.book.track(&conn);
                    shared.book.accepted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %conn.peer_key(), name = conn.peer_name(), %remote, "accepted");
                    // Fails only when the endpoint is gone; the connection is then dropped.
                    let _ = tx.send(conn).await;
                }
                // Already logged and counted where it was refused.
                Err(HandshakeFailure::Refused) => {}
                Err(HandshakeFailure::Failed(e)) => {
                    shared.book.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, "incoming handshake failed: {e}");
                }
            }
        });
    }
}

enum HandshakeFailure {
    /// The client's key is not trusted (logged and counted).
    Refused,
    Failed(ChannelError),
}

impl<E: Into<ChannelError>> From<E> for HandshakeFailure {
    fn from(e: E) -> Self {
        Self::Failed(e.into())
    }
}

async fn server_handshake(
    incoming: quinn::Incoming,
    shared: &Shared,
) -> Result<Connection, HandshakeFailure> {
    let conn = incoming.await.map_err(|e| match e {
        // The verifier refused the key; it has logged and counted it.
        quinn::ConnectionError::TransportError(t)
            if t.code == TransportErrorCode::crypto(ALERT_ACCESS_DENIED) =>
        {
            HandshakeFailure::Refused
        }
        other => other.into(),
    })?;
    let key = peer_key(&conn)?;
    let Some(name) = shared.trust.lookup(&key) else {
        // Removed from the trust store between the TLS check and now.
        shared.refusals.record(key);
        tracing::warn!(%key, "refusing connection: key no longer trusted");
        conn.close(VarInt::from_u32(CloseCode::UNTRUSTED.0), b"key not trusted");
        return Err(HandshakeFailure::Refused);
    };
    let Some(version) = negotiated_version(&conn) else {
        conn.close(
            VarInt::from_u32(CloseCode::PROTOCOL_ERROR.0),
            b"no common protocol version",
        );
        return Err(ChannelError::IncompatibleVersion.into());
    };
    let payload = serde_json::to_vec(&Hello { version })
        .map_err(|e| ChannelError::Frame(frame::FrameError::Encode(e)))?;
    let hello = frame::encode_frame(version, FrameKind::Hello, &payload, HELLO_CAP)?;
    let mut uni = conn.open_uni().await?;
    uni.write_all(&hello).await?;
    uni.finish()?;
    Ok(Connection::new(
        conn,
        key,
        Some(name),
        version,
        shared.max_msg,
        shared.header_timeout,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn closed_with(code: TransportErrorCode) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::from_static(b"peer said no"),
        })
    }

    #[test]
    fn handshake_failures_become_typed_errors() {
        let (us, them, other) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
            PublicKey::from_bytes([3; 32]),
        );
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let classify = |e, got| classify_connect_error(e, got, them, us, addr);

        // Our verifier saw the wrong key: that wins over whatever quinn reports.
        let e = classify(quinn::ConnectionError::TimedOut, Some(other));
        assert!(
            matches!(e, ChannelError::WrongPeerKey { expected, got } if expected == them && got == other)
        );
        // The server refused our key (TLS access_denied inside CONNECTION_CLOSE).
        let e = classify(closed_with(TransportErrorCode::crypto(49)), None);
        assert!(matches!(e, ChannelError::UnknownPeer { key } if key == us));
        let e = classify(closed_with(TransportErrorCode::crypto(120)), None);
        assert!(matches!(e, ChannelError::IncompatibleVersion));
        let e = classify(closed_with(TransportErrorCode::CONNECTION_REFUSED), None);
        assert!(matches!(e, ChannelError::Refused { addr: a } if a == addr));
        let e = classify(quinn::ConnectionError::TimedOut, None);
        assert!(matches!(e, ChannelError::Unreachable { .. }));
        // Anything else keeps the peer's words.
        let e = classify(closed_with(TransportErrorCode::crypto(40)), None);
        assert!(
            matches!(&e, ChannelError::Handshake(m) if m.contains("peer said no")),
            "{e:?}"
        );
    }
}
