//! Typed bidirectional streams and the framed-message layer on top of them.
//!
//! Every stream starts with a 2-byte header written by the opener,
//! `[STREAM_MAGIC, kind]`, so the acceptor can hand it to the right subsystem
//! (control loop, migration pump, disk server). A stream whose header is unknown is
//! stopped and reset with [`STREAM_REJECTED`]; the connection lives on.
//!
//! After the header a stream is a plain byte pipe ([`AsyncRead`] + [`AsyncWrite`], e.g.
//! for `tokio::io::copy` from QEMU's migration socket), or carries frames
//! (see [`crate::frame`]) via [`SendStream::send_msg`] / [`RecvStream::recv_msg`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::connection::ConnShared;
use crate::error::ChannelError;
use crate::frame::{self, FrameError, FrameKind, HEADER_LEN};

/// First byte of every stream.
pub const STREAM_MAGIC: u8 = 0x52; // 'R'
/// Length of the stream header.
pub const STREAM_HEADER_LEN: usize = 2;
/// Stream error code sent when a stream's header is refused.
pub const STREAM_REJECTED: u32 = 1;

/// What a stream carries, so the acceptor can dispatch it. 0 is reserved as invalid;
/// new kinds take the next number (older peers reject them, per stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
#[non_exhaustive]
pub enum StreamKind {
    /// Control messages (framed).
    Control = 1,
    /// QEMU's migration stream (raw bytes).
    MigrationStream = 2,
    /// Disk blocks during a migration.
    Disk = 3,
    /// Background replica synchronisation.
    Replication = 4,
    /// Post-copy: chunks a guest request at the destination waits for, ahead of the
    /// background disk copy.
    DiskDemand = 5,
}

impl StreamKind {
    /// Decodes a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Control),
            2 => Some(Self::MigrationStream),
            3 => Some(Self::Disk),
            4 => Some(Self::Replication),
            5 => Some(Self::DiskDemand),
            _ => None,
        }
    }

    /// QUIC send priority within one connection: control messages and chunks a guest
    /// is blocked on (post-copy demand) first, then a migration's streams, then a
    /// post-copy's background copy (−1, set on that stream), then background
    /// replication last.
    fn priority(self) -> i32 {
        match self {
            // A guest waits on every demanded chunk: ahead of bulk data, level with
            // control (both are small and rare).
            Self::Control | Self::DiskDemand => 1,
            Self::Replication => -2,
            _ => 0,
        }
    }
}

/// Why a stream header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamKindError {
    /// The first byte is not [`STREAM_MAGIC`].
    #[error("stream does not start with the roam stream marker (got {0:#04x})")]
    BadMagic(u8),
    /// The kind byte names no known kind.
    #[error("unknown stream kind {0}")]
    Unknown(u8),
    /// The stream ended (or timed out) before its header.
    #[error("stream ended before its header")]
    Truncated,
}

/// Encodes a stream header.
pub fn encode_stream_header(kind: StreamKind) -> [u8; STREAM_HEADER_LEN] {
    [STREAM_MAGIC, kind as u8]
}

/// Parses a stream header.
pub fn parse_stream_header(b: [u8; STREAM_HEADER_LEN]) -> Result<StreamKind, StreamKindError> {
    if b[0] != STREAM_MAGIC {
        return Err(StreamKindError::BadMagic(b[0]));
    }
    StreamKind::from_u8(b[1]).ok_or(StreamKindError::Unknown(b[1]))
}

/// Writes one message frame.
pub async fn write_msg<W, T>(w: &mut W, version: u16, msg: &T, cap: u32) -> Result<(), ChannelError>
where
    W: AsyncWrite + Unpin + ?Sized,
    T: Serialize + ?Sized,
{
    let bytes = frame::encode_message(version, msg, cap)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Writes an error frame: the peer's `read_msg` returns [`ChannelError::Remote`].
pub async fn write_error<W>(w: &mut W, version: u16, reason: &str) -> Result<(), ChannelError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    // Reasons are for humans; keep them short enough to never hit a cap.
    let reason: String = reason.chars().take(1024).collect();
    let bytes = frame::encode_frame(version, FrameKind::Error, reason.as_bytes(), u32::MAX)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<usize, ChannelError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` if the stream ended cleanly at a frame boundary.
/// The length is checked against `cap` before the payload buffer is allocated.
pub async fn read_frame<R>(r: &mut R, cap: u32) -> Result<Option<frame::Frame>, ChannelError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut head = [0u8; HEADER_LEN];
    match read_full(r, &mut head).await? {
        0 => return Ok(None),
        HEADER_LEN => {}
        got => {
            return Err(FrameError::Truncated {
                got,
                want: HEADER_LEN,
            }
            .into())
        }
    }
    let h = frame::parse_header(&head, cap)?;
    let mut payload = vec![0u8; h.len as usize];
    let got = read_full(r, &mut payload).await?;
    if got < payload.len() {
        return Err(FrameError::Truncated {
            got: HEADER_LEN + got,
            want: HEADER_LEN + payload.len(),
        }
        .into());
    }
    Ok(Some(frame::Frame {
        version: h.version,
        kind: h.kind,
        payload,
    }))
}

/// Reads one message. `Ok(None)` if the peer finished the stream; an error frame from
/// the peer becomes [`ChannelError::Remote`].
pub async fn read_msg<R, T>(r: &mut R, cap: u32) -> Result<Option<T>, ChannelError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    let Some(f) = read_frame(r, cap).await? else {
        return Ok(None);
    };
    match f.kind {
        FrameKind::Message => Ok(Some(frame::decode_message(&f.payload)?)),
        FrameKind::Error => Err(ChannelError::Remote(
            String::from_utf8_lossy(&f.payload).into_owned(),
        )),
        FrameKind::Hello => Err(FrameError::Unexpected(FrameKind::Hello).into()),
    }
}

/// The sending half of a stream: `AsyncWrite`, or frames via [`SendStream::send_msg`].
/// Keeps its connection open while it lives.
pub struct SendStream {
    inner: quinn::SendStream,
    kind: StreamKind,
    version: u16,
    max_msg: u32,
    _conn: Arc<ConnShared>,
}

/// The receiving half of a stream: `AsyncRead`, or frames via [`RecvStream::recv_msg`].
/// Keeps its connection open while it lives.
pub struct RecvStream {
    inner: quinn::RecvStream,
    kind: StreamKind,
    max_msg: u32,
    _conn: Arc<ConnShared>,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("kind", &self.kind)
            .field("id", &self.inner.id())
            .finish()
    }
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream")
            .field("kind", &self.kind)
            .field("id", &self.inner.id())
            .finish()
    }
}

/// Wraps a quinn stream pair whose header has been written or read.
pub(crate) fn wrap(
    kind: StreamKind,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: Arc<ConnShared>,
) -> (SendStream, RecvStream) {
    let (version, max_msg) = (conn.version, conn.max_msg);
    // Fails only if the stream is already closed; the first write will say so.
    let _ = send.set_priority(kind.priority());
    (
        SendStream {
            inner: send,
            kind,
            version,
            max_msg,
            _conn: conn.clone(),
        },
        RecvStream {
            inner: recv,
            kind,
            max_msg,
            _conn: conn,
        },
    )
}

impl SendStream {
    /// What this stream carries.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Sends one message frame.
    pub async fn send_msg<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), ChannelError> {
        write_msg(&mut self.inner, self.version, msg, self.max_msg).await
    }

    /// Sends an error frame: the peer's `recv_msg` fails with [`ChannelError::Remote`].
    pub async fn send_error(&mut self, reason: &str) -> Result<(), ChannelError> {
        write_error(&mut self.inner, self.version, reason).await
    }

    /// Ends the sending side (the peer reads EOF after the data already written).
    pub fn finish(&mut self) -> Result<(), ChannelError> {
        Ok(self.inner.finish()?)
    }

    /// Finishes and waits until the peer acknowledged every byte (or abandoned the stream).
    pub async fn finish_and_wait(&mut self) -> Result<(), ChannelError> {
        self.inner.finish()?;
        match self.inner.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(ChannelError::StreamAborted {
                code: code.into_inner(),
            }),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(e.into()),
            Err(quinn::StoppedError::ZeroRttRejected) => {
                Err(ChannelError::Transport("0-RTT rejected".into()))
            }
        }
    }

    /// Abandons the stream: the peer's reads fail with `StreamAborted { code }`.
    pub fn reset(&mut self, code: u32) {
        let _ = self.inner.reset(quinn::VarInt::from_u32(code));
    }

    /// Sets the send priority (higher goes first; control streams default to 1, bulk 0).
    pub fn set_priority(&self, priority: i32) -> Result<(), ChannelError> {
        Ok(self.inner.set_priority(priority)?)
    }
}

impl RecvStream {
    /// What this stream carries.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Receives one message; [`ChannelError::Finished`] if the peer ended the stream
    /// instead. Not cancel-safe: dropping the future mid-frame loses the framing (a
    /// `tokio::time::timeout` around it is fine if the stream is abandoned on expiry).
    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        self.next_msg().await?.ok_or(ChannelError::Finished)
    }

    /// Receives one message; `Ok(None)` when the peer finished the stream cleanly
    /// (for `while let Some(m) = rx.next_msg().await? {..}` loops).
    pub async fn next_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ChannelError> {
        read_msg(&mut self.inner, self.max_msg).await
    }

    /// Tells the peer we will read no more: its writes fail with `StreamAborted { code }`.
    pub fn stop(&mut self, code: u32) {
        let _ = self.inner.stop(quinn::VarInt::from_u32(code));
    }
}

/// Sends one message frame on `tx` (same as [`SendStream::send_msg`]).
pub async fn send_msg<T: Serialize + ?Sized>(
    tx: &mut SendStream,
    msg: &T,
) -> Result<(), ChannelError> {
    tx.send_msg(msg).await
}

/// Receives one message from `rx` (same as [`RecvStream::recv_msg`]).
pub async fn recv_msg<T: DeserializeOwned>(rx: &mut RecvStream) -> Result<T, ChannelError> {
    rx.recv_msg().await
}

impl AsyncRead for RecvStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        for k in [
            StreamKind::Control,
            StreamKind::MigrationStream,
            StreamKind::Disk,
            StreamKind::Replication,
        ] {
            assert_eq!(parse_stream_header(encode_stream_header(k)), Ok(k));
        }
        assert_eq!(
            parse_stream_header([STREAM_MAGIC, 0]),
            Err(StreamKindError::Unknown(0))
        );
        assert_eq!(
            parse_stream_header([STREAM_MAGIC, 200]),
            Err(StreamKindError::Unknown(200))
        );
        assert_eq!(
            parse_stream_header([0, 1]),
            Err(StreamKindError::BadMagic(0))
        );
    }

    #[tokio::test]
    async fn framed_messages_over_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_msg(&mut a, 1, &vec![1u32, 2, 3], 1024).await.unwrap();
            write_error(&mut a, 1, "nope").await.unwrap();
            write_msg(&mut a, 1, &"tail", 1024).await.unwrap();
        });
        let v: Vec<u32> = read_msg(&mut b, 1024).await.unwrap().unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        assert!(matches!(
            read_msg::<_, Vec<u32>>(&mut b, 1024).await,
            Err(ChannelError::Remote(r)) if r == "nope"
        ));
        let s: String = read_msg(&mut b, 1024).await.unwrap().unwrap();
        assert_eq!(s, "tail");
        writer.await.unwrap();
        // Writer dropped: clean EOF at a frame boundary.
        assert!(read_msg::<_, String>(&mut b, 1024).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_and_over_cap_frames_fail() {
        let bytes = frame::encode_message(1, &"hello world", 1024).unwrap();
        let mut short = &bytes[..bytes.len() - 1];
        assert!(matches!(
            read_msg::<_, String>(&mut short, 1024).await,
            Err(ChannelError::Frame(FrameError::Truncated { .. }))
        ));
        let mut full = &bytes[..];
        assert!(matches!(
            read_msg::<_, String>(&mut full, 4).await,
            Err(ChannelError::Frame(FrameError::TooLarge { .. }))
        ));
    }
}
