//! The endpoint's UDP socket, wrapped to count every byte that crosses the wire.
//!
//! Counting at the socket (rather than summing per-connection statistics) includes
//! handshakes, refused peers, connections long closed and garbage that was dropped: the
//! figure a migration reports as "bytes the host channel sent".

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::error::ChannelError;

/// Wire totals of one endpoint: UDP payload bytes, QUIC headers included.
#[derive(Debug, Default)]
pub(crate) struct WireCounters {
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) tx_datagrams: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) rx_datagrams: AtomicU64,
}

/// A quinn socket that counts what passes through it.
pub(crate) struct CountingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    counters: Arc<WireCounters>,
}

impl fmt::Debug for CountingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl CountingSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, counters: Arc<WireCounters>) -> Self {
        Self { inner, counters }
    }
}

impl AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        let len = transmit.contents.len();
        // With GSO one transmit carries several datagrams of `segment_size` bytes.
        let datagrams = match transmit.segment_size {
            Some(s) if s > 0 => len.div_ceil(s),
            _ => 1,
        };
        self.counters
            .tx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .tx_datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let res = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &res {
            let (mut bytes, mut datagrams) = (0u64, 0u64);
            for m in meta.iter().take(*n) {
                bytes += m.len as u64;
                datagrams += if m.stride > 0 {
                    m.len.div_ceil(m.stride) as u64
                } else {
                    1
                };
            }
            self.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.counters
                .rx_datagrams
                .fetch_add(datagrams, Ordering::Relaxed);
        }
        res
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        // quinn enables MTU discovery only if this is false, so pass it through.
        self.inner.may_fragment()
    }
}

/// Binds a UDP socket with large kernel buffers: at 1 Gbit/s a default 208 KiB receive
/// buffer overflows in under 2 ms of scheduling delay, and every overflow is a loss the
/// congestion controller has to absorb.
pub(crate) fn bind_udp(
    addr: SocketAddr,
    buffer: usize,
) -> Result<std::net::UdpSocket, ChannelError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| ChannelError::Bind { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    for (what, res) in [
        ("receive", sock.set_recv_buffer_size(buffer)),
        ("send", sock.set_send_buffer_size(buffer)),
    ] {
        if let Err(e) = res {
            tracing::warn!("cannot set UDP {what} buffer to {buffer} bytes: {e}");
        }
    }
    if let Ok(got) = sock.recv_buffer_size() {
        // Linux reports twice the usable size.
        if got / 2 < buffer {
            tracing::debug!(
                requested = buffer,
                granted = got,
                "UDP receive buffer capped by net.core.rmem_max"
            );
        }
    }
    sock.set_nonblocking(true).map_err(bind_err)?;
    sock.bind(&addr.into()).map_err(bind_err)?;
    Ok(sock.into())
}
