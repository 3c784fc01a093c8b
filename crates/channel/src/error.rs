//! Errors of the channel, and the mapping from quinn's errors to them.

use std::io;
use std::net::SocketAddr;

use crate::frame::FrameError;
use crate::identity::PublicKey;
use crate::stream::StreamKindError;

/// Everything that can go wrong on the host channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The key is not in the accepting host's trust set. On the server this is logged and
    /// counted; on the client it is what `connect` returns when the server refused *our* key.
    #[error("peer key {key} is not trusted (add it with `roam peer add`)")]
    UnknownPeer {
        /// The key that is not trusted.
        key: PublicKey,
    },
    /// The server presented a key other than the one pinned for it.
    #[error("peer presented key {got}, but {expected} is pinned for it")]
    WrongPeerKey {
        /// The pinned key.
        expected: PublicKey,
        /// The key the peer presented.
        got: PublicKey,
    },
    /// The peers share no protocol version.
    #[error("peer speaks no protocol version this host accepts")]
    IncompatibleVersion,
    /// The TLS/QUIC handshake failed for another reason.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Nothing answered (or the peer stopped answering during the handshake).
    #[error("no answer from {addr} within the idle timeout")]
    Unreachable {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The host at the address is not accepting connections (it is shutting down).
    #[error("host at {addr} refused the connection (not accepting: shutting down?)")]
    Refused {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The peer went silent for longer than the idle timeout: cut link or dead host.
    #[error("peer stopped answering (idle timeout): link cut or host down")]
    PeerTimedOut,
    /// The peer closed the connection.
    #[error("peer closed the connection (code {code}): {reason}")]
    ClosedByPeer {
        /// Application close code, see [`crate::CloseCode`].
        code: u64,
        /// The peer's reason text.
        reason: String,
    },
    /// This side closed the connection.
    #[error("connection closed locally")]
    ClosedLocally,
    /// The peer forgot the connection (it restarted).
    #[error("peer reset the connection (it probably restarted)")]
    Reset,
    /// A QUIC protocol error.
    #[error("QUIC transport error: {0}")]
    Transport(String),
    /// The peer stopped or reset this stream.
    #[error("peer abandoned the stream (code {code})")]
    StreamAborted {
        /// The peer's error code.
        code: u64,
    },
    /// The peer finished the stream where a message was expected.
    #[error("peer finished the stream before sending the expected message")]
    Finished,
    /// A new stream did not start with a valid stream header.
    #[error("bad stream header: {0}")]
    StreamKind(#[from] StreamKindError),
    /// A message frame is invalid.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer sent an error frame instead of the expected message.
    #[error("peer reported an error: {0}")]
    Remote(String),
    /// The endpoint was shut down.
    #[error("endpoint is closed")]
    EndpointClosed,
    /// Binding the UDP socket failed.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid channel configuration: {0}")]
    Config(String),
    /// Building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Local I/O.
    #[error("I/O: {0}")]
    Io(io::Error),
}

impl From<quinn::ConnectionError> for ChannelError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::TimedOut => Self::PeerTimedOut,
            E::ApplicationClosed(c) => Self::ClosedByPeer {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            E::LocallyClosed => Self::ClosedLocally,
            E::Reset => Self::Reset,
            E::VersionMismatch => Self::Transport("no common QUIC version".into()),
            E::TransportError(t) => Self::Transport(t.to_string()),
            E::ConnectionClosed(c) => Self::Transport(c.to_string()),
            E::CidsExhausted => Self::Transport("connection ids exhausted".into()),
        }
    }
}

impl From<quinn::ReadError> for ChannelError {
    fn from(e: quinn::ReadError) -> Self {
        use quinn::ReadError as E;
        match e {
            E::Reset(code) => Self::StreamAborted {
                code: code.into_inner(),
            },
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => Self::Transport("stream already closed".into()),
            E::IllegalOrderedRead => Self::Transport("illegal ordered read".into()),
            E::ZeroRttRejected => Self::Transport("0-RTT rejected".into()),
        }
    }
}

impl From<quinn::WriteError> for ChannelError {
    fn from(e: quinn::WriteError) -> Self {
        use quinn::WriteError as E;
        match e {
            E::Stopped(code) => Self::StreamAborted {
                code: code.into_inner(),
            },
            E::ConnectionLost(c) => c.into(),
            E::ClosedStream => Self::Transport("stream already closed".into()),
            E::ZeroRttRejected => Self::Transport("0-RTT rejected".into()),
        }
    }
}

impl From<quinn::ClosedStream> for ChannelError {
    fn from(_: quinn::ClosedStream) -> Self {
        Self::Transport("stream already closed".into())
    }
}

impl From<io::Error> for ChannelError {
    /// Recovers the typed error quinn wraps inside the `io::Error`s of its
    /// `AsyncRead`/`AsyncWrite` impls, so `tokio::io::copy` failures stay meaningful.
    fn from(e: io::Error) -> Self {
        if e.get_ref().is_some() {
            let kind = e.kind();
            let inner = e.into_inner();
            if let Some(inner) = inner {
                let inner = match inner.downcast::<quinn::ReadError>() {
                    Ok(r) => return (*r).into(),
                    Err(other) => other,
                };
                let inner = match inner.downcast::<quinn::WriteError>() {
                    Ok(w) => return (*w).into(),
                    Err(other) => other,
                };
                let inner = match inner.downcast::<ChannelError>() {
                    Ok(c) => return *c,
                    Err(other) => other,
                };
                return Self::Io(io::Error::new(kind, inner));
            }
            return Self::Io(io::Error::from(kind));
        }
        Self::Io(e)
    }
}

impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Io(e) => e,
            other => {
                let kind = match &other {
                    ChannelError::PeerTimedOut | ChannelError::Unreachable { .. } => {
                        io::ErrorKind::TimedOut
                    }
                    ChannelError::Frame(_) | ChannelError::StreamKind(_) => {
                        io::ErrorKind::InvalidData
                    }
                    _ => io::ErrorKind::ConnectionAborted,
                };
                io::Error::new(kind, other)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn io_error_round_trip_keeps_the_type() {
        let io: io::Error =
            quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut).into();
        assert!(matches!(ChannelError::from(io), ChannelError::PeerTimedOut));
        let io: io::Error = ChannelError::Remote("x".into()).into();
        assert!(matches!(ChannelError::from(io), ChannelError::Remote(r) if r == "x"));
        let plain = io::Error::other("plain");
        assert!(matches!(ChannelError::from(plain), ChannelError::Io(_)));
    }
}
