//! An authenticated connection to one peer host, and the dispatch of its streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use crate::error::ChannelError;
use crate::identity::PublicKey;
use crate::stats::ConnectionStats;
use crate::stream::{
    encode_stream_header, parse_stream_header, wrap, RecvStream, SendStream, StreamKind,
    StreamKindError, STREAM_HEADER_LEN, STREAM_MAGIC, STREAM_REJECTED,
};

/// A stream the peer opened, with its kind.
type Incoming = (StreamKind, SendStream, RecvStream);

/// Application close codes sent in QUIC CONNECTION_CLOSE frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CloseCode(pub u32);

impl CloseCode {
    /// Work done, orderly close.
    pub const NORMAL: Self = Self(0);
    /// The host is shutting down.
    pub const SHUTDOWN: Self = Self(1);
    /// The last handle to the connection was dropped.
    pub const DROPPED: Self = Self(2);
    /// The peer's key is (no longer) trusted.
    pub const UNTRUSTED: Self = Self(3);
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: Self = Self(4);
}

impl From<u32> for CloseCode {
    fn from(code: u32) -> Self {
        Self(code)
    }
}

/// The part of a connection streams keep alive. Dropping the last reference closes the
/// connection (quinn would too, but our helper tasks hold quinn handles of their own).
pub(crate) struct ConnShared {
    pub(crate) quinn: quinn::Connection,
    /// Negotiated protocol version, written into every frame.
    pub(crate) version: u16,
    pub(crate) max_msg: u32,
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        self.quinn.close(
            quinn::VarInt::from_u32(CloseCode::DROPPED.0),
            b"connection dropped",
        );
    }
}

struct ConnInfo {
    peer_key: PublicKey,
    peer_name: Option<String>,
    incoming: Mutex<mpsc::Receiver<Incoming>>,
    rejected_streams: Arc<AtomicU64>,
}

/// An open, mutually authenticated connection to a peer host. Cheap to clone; the
/// connection closes when the last clone and the last of its streams are dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<ConnShared>,
    info: Arc<ConnInfo>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer_key", &self.info.peer_key)
            .field("peer_name", &self.info.peer_name)
            .field("remote", &self.shared.quinn.remote_address())
            .finish()
    }
}

impl Connection {
    /// Wraps an authenticated quinn connection and starts dispatching its streams.
    pub(crate) fn new(
        quinn: quinn::Connection,
        peer_key: PublicKey,
        peer_name: Option<String>,
        version: u16,
        max_msg: u32,
        header_timeout: Duration,
    ) -> Self {
        let shared = Arc::new(ConnShared {
            quinn: quinn.clone(),
            version,
            max_msg,
        });
        let (tx, rx) = mpsc::channel(64);
        let rejected = Arc::new(AtomicU64::new(0));
        tokio::spawn(dispatch_streams(
            quinn,
            Arc::downgrade(&shared),
            tx,
            rejected.clone(),
            header_timeout,
        ));
        Self {
            shared,
            info: Arc::new(ConnInfo {
                peer_key,
                peer_name,
                incoming: Mutex::new(rx),
                rejected_streams: rejected,
            }),
        }
    }

    /// The peer's authenticated public key.
    pub fn peer_key(&self) -> PublicKey {
        self.info.peer_key
    }

    /// The peer's name in our trust store, if it is there.
    pub fn peer_name(&self) -> Option<&str> {
        self.info.peer_name.as_deref()
    }

    /// The peer's current UDP address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.shared.quinn.remote_address()
    }

    /// The protocol version negotiated for this connection.
    pub fn protocol_version(&self) -> u16 {
        self.shared.version
    }

    /// Opens a bidirectional stream of `kind`. The header goes out with the first
    /// packet; the peer gets the stream from its `accept_stream`.
    pub async fn open_stream(
        &self,
        kind: StreamKind,
    ) -> Result<(SendStream, RecvStream), ChannelError> {
        let (mut send, recv) = self.shared.quinn.open_bi().await?;
        send.write_all(&encode_stream_header(kind)).await?;
        Ok(wrap(kind, send, recv, self.shared.clone()))
    }

    /// Opens a stream with a raw kind byte, for testing how peers treat unknown kinds.
    #[doc(hidden)]
    pub async fn open_stream_with_raw_kind(
        &self,
        raw: u8,
    ) -> Result<(SendStream, RecvStream), ChannelError> {
        let (mut send, recv) = self.shared.quinn.open_bi().await?;
        send.write_all(&[STREAM_MAGIC, raw]).await?;
        Ok(wrap(StreamKind::Control, send, recv, self.shared.clone()))
    }

    /// The next stream the peer opened, with its kind. Streams with an unknown kind
    /// never show up here; they are refused and counted ([`Self::rejected_streams`]).
    pub async fn accept_stream(
        &self,
    ) -> Result<(StreamKind, SendStream, RecvStream), ChannelError> {
        let mut rx = self.info.incoming.lock().await;
        match rx.recv().await {
            Some(s) => Ok(s),
            None => Err(self.close_error()),
        }
    }

    /// Streams refused because of a bad header.
    pub fn rejected_streams(&self) -> u64 {
        self.info.rejected_streams.load(Ordering::Relaxed)
    }

    /// Bound the bytes this side keeps unacknowledged (sent or buffered) on this
    /// connection. A sender that knows the path's bandwidth-delay product sets this to a
    /// small multiple of it, so that a producer writing into a stream (QEMU's migration
    /// stream) feels the real link rate instead of filling a deep buffer.
    pub fn set_send_window(&self, bytes: u64) {
        self.shared.quinn.set_send_window(bytes.max(64 * 1024));
    }

    /// Wire statistics of this connection.
    pub fn stats(&self) -> ConnectionStats {
        self.shared.quinn.stats().into()
    }

    /// Closes the connection with a code and reason the peer will see. Unfinished
    /// streams are abandoned.
    pub fn close(&self, code: impl Into<CloseCode>, reason: &str) {
        self.shared
            .quinn
            .close(quinn::VarInt::from_u32(code.into().0), reason.as_bytes());
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> ChannelError {
        self.shared.quinn.closed().await.into()
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<ChannelError> {
        self.shared.quinn.close_reason().map(Into::into)
    }

    fn close_error(&self) -> ChannelError {
        self.close_reason().unwrap_or(ChannelError::ClosedLocally)
    }

    /// The quinn connection, for the endpoint's bookkeeping.
    pub(crate) fn quinn(&self) -> &quinn::Connection {
        &self.shared.quinn
    }
}

/// Accepts the peer's streams, reads their headers concurrently (one slow stream must
/// not hold up the others) and queues the valid ones for `accept_stream`.
async fn dispatch_streams(
    quinn: quinn::Connection,
    shared: Weak<ConnShared>,
    tx: mpsc::Sender<Incoming>,
    rejected: Arc<AtomicU64>,
    header_timeout: Duration,
) {
    while let Ok((mut send, mut recv)) = quinn.accept_bi().await {
        let (shared, tx, rejected) = (shared.clone(), tx.clone(), rejected.clone());
        tokio::spawn(async move {
            let mut head = [0u8; STREAM_HEADER_LEN];
            let res = match tokio::time::timeout(header_timeout, recv.read_exact(&mut head)).await {
                Ok(Ok(())) => parse_stream_header(head),
                Ok(Err(_)) | Err(_) => Err(StreamKindError::Truncated),
            };
            match res {
                Ok(kind) => {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    // Fails only if nobody will ever accept: the stream is dropped.
                    let (send, recv) = wrap(kind, send, recv, shared);
                    let _ = tx.send((kind, send, recv)).await;
                }
                Err(e) => {
                    tracing::warn!(stream = %send.id(), "refusing stream: {e}");
                    rejected.fetch_add(1, Ordering::Relaxed);
                    let code = quinn::VarInt::from_u32(STREAM_REJECTED);
                    let _ = recv.stop(code);
                    let _ = send.reset(code);
                }
            }
        });
    }
}
