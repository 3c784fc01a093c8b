//! Traffic probes that run inside namespaces: UDP echo/RTT, UDP loss, TCP throughput.
//!
//! Used by the integration tests and by `roam-wan bench`; the lab can use them to check a
//! WAN it built. Every loop here is bounded in packets and time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::netns::{self, NetnsError};

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Namespace trouble.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Socket trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The receiving side never saw data.
    #[error("no data arrived")]
    NoData,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |source| ProbeError::Io { what, source }
}

fn join<T>(h: JoinHandle<Result<Result<T, ProbeError>, NetnsError>>) -> Result<T, ProbeError> {
    h.join()
        .map_err(|_| NetnsError::Panicked("probe".into()))??
}

/// A UDP echo server running in a namespace until dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<(), ProbeError>, NetnsError>>>,
}

impl UdpEcho {
    /// Binds `addr` inside `ns` and echoes every datagram back to its sender.
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self, ProbeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let thread = netns::spawn_in(ns, move || -> Result<(), ProbeError> {
            let sock = UdpSocket::bind(addr).map_err(io_err("bind echo"));
            let sock = match sock {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(io_err("timeout"))?;
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            Ok(())
        })?;
        let mut echo = Self {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(echo),
            Ok(Err(e)) => Err(e),
            Err(_) => match echo.thread.take() {
                Some(t) => join(t).and(Err(ProbeError::NoData)),
                None => Err(ProbeError::NoData),
            },
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Round-trip samples of a UDP ping.
#[derive(Debug, Clone)]
pub struct RttReport {
    /// RTT of each answered probe, sorted.
    pub samples: Vec<Duration>,
    /// Probes sent.
    pub sent: usize,
}

impl RttReport {
    /// The median RTT, if any probe was answered.
    pub fn median(&self) -> Option<Duration> {
        self.samples.get(self.samples.len() / 2).copied()
    }
}

/// From inside `ns`, sends `count` small UDP probes to `target` (a [`UdpEcho`]), one per
/// `interval`, and measures each round trip. A probe unanswered within 2 s counts as lost.
pub fn udp_rtt(
    ns: &str,
    target: SocketAddrV4,
    count: usize,
    interval: Duration,
) -> Result<RttReport, ProbeError> {
    let h = netns::spawn_in(ns, move || -> Result<RttReport, ProbeError> {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err("bind"))?;
        sock.connect(target).map_err(io_err("connect"))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(io_err("timeout"))?;
        let mut samples = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        for seq in 0..count as u64 {
            let sent_at = Instant::now();
            sock.send(&seq.to_be_bytes()).map_err(io_err("send"))?;
            // Skip late answers to earlier probes.
            while let Ok(n) = sock.recv(&mut buf) {
                if n == 8 && buf[..8] == seq.to_be_bytes() {
                    samples.push(sent_at.elapsed());
                    break;
                }
            }
            thread::sleep(interval);
        }
        samples.sort();
        Ok(RttReport {
            samples,
            sent: count,
        })
    })?;
    join(h)
}

/// Sets the receive buffer past `rmem_max` (needs CAP_NET_ADMIN, falls back to SO_RCVBUF).
fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: passes a c_int of the size given; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(io::Error::last_os_error())
}

/// Raises the calling thread's scheduling weight to `nice` (threads it starts inherit it).
/// Timing probes use it so that a busy machine delays them less than the link they measure.
/// Needs root for negative values; returns the error otherwise.
pub fn renice_current_thread(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority with a tid affects only that thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Result of a UDP loss probe.
#[derive(Debug, Clone, Copy)]
pub struct LossReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
}

/// Sends `count` datagrams of `size` bytes from `from_ns` to `to` (bound inside `to_ns`)
/// at `pps` per second and counts how many arrive (waiting `settle` after the last).
pub fn udp_loss(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddrV4,
    count: u64,
    size: usize,
    pps: u64,
    settle: Duration,
) -> Result<LossReport, ProbeError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let done_rx = done.clone();
    let rx = netns::spawn_in(to_ns, move || -> Result<u64, ProbeError> {
        let sock = UdpSocket::bind(to).map_err(io_err("bind receiver"));
        let _ = ready_tx.send(sock.is_ok());
        let sock = sock?;
        // A receiver starved of CPU for a moment must not add its own losses.
        set_rcvbuf(&sock, 16 << 20).map_err(io_err("SO_RCVBUFFORCE"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io_err("timeout"))?;
        let mut buf = [0u8; 65536];
        let mut got = 0;
        while !done_rx.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        // Drain what is already queued.
        sock.set_nonblocking(true).map_err(io_err("nonblocking"))?;
        while sock.recv(&mut buf).is_ok() {
            got += 1;
        }
        Ok(got)
    })?;
    if ready_rx.recv() != Ok(true) {
        return join(rx).map(|_| LossReport {
            sent: 0,
            received: 0,
        });
    }
    let tx = netns::spawn_in(from_ns, move || -> Result<u64, ProbeError> {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err("bind sender"))?;
        sock.connect(to).map_err(io_err("connect"))?;
        let payload = vec![0xA5u8; size];
        let start = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / pps.max(1) as f64);
        for i in 0..count {
            let due = start + gap * i as u32;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            sock.send(&payload).map_err(io_err("send"))?;
        }
        Ok(count)
    })?;
    let sent = join(tx);
    thread::sleep(settle);
    done.store(true, Ordering::Relaxed);
    let received = join(rx)?;
    Ok(LossReport {
        sent: sent?,
        received,
    })
}

/// Result of a TCP throughput probe.
#[derive(Debug, Clone, Copy)]
pub struct ThroughputReport {
    /// Payload bytes received in the measurement window.
    pub bytes: u64,
    /// Length of the window (about the one asked for).
    pub window: Duration,
}

impl ThroughputReport {
    /// Goodput (TCP payload) in Mbit/s.
    pub fn mbit(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.window.as_secs_f64() / 1e6
    }
}

/// Payload bytes the kernel has received on this connection.
fn tcp_bytes_received(conn: &TcpStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; zeroes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info/len point to a tcp_info of `len` bytes, which getsockopt fills.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_received)
}

/// Streams TCP data from `from_ns` to a listener at `to` inside `to_ns` for `warmup` +
/// `window`, and reports the bytes the receiver got during `window` (after `warmup`,
/// counted from the first byte, which skips slow start).
pub fn tcp_throughput(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddrV4,
    warmup: Duration,
    window: Duration,
) -> Result<ThroughputReport, ProbeError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let rx = netns::spawn_in(to_ns, move || -> Result<ThroughputReport, ProbeError> {
        let listener = TcpListener::bind(to).map_err(io_err("listen"));
        let _ = ready_tx.send(listener.is_ok());
        let (mut conn, _) = listener?.accept().map_err(io_err("accept"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err("timeout"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let first = conn.read(&mut buf).map_err(io_err("read"))?;
        if first == 0 {
            return Err(ProbeError::NoData);
        }
        // Counted by the kernel (TCP_INFO), so a receiver that reads late does not shift
        // bytes between windows.
        let start = Instant::now() + warmup;
        let end = start + window;
        let mut first: Option<(Instant, u64)> = None;
        let (t1, b1) = loop {
            let n = conn.read(&mut buf).map_err(io_err("read"))?;
            let now = Instant::now();
            if now >= start && first.is_none() {
                first = Some((now, tcp_bytes_received(&conn).map_err(io_err("TCP_INFO"))?));
            }
            if n == 0 || now >= end {
                break (now, tcp_bytes_received(&conn).map_err(io_err("TCP_INFO"))?);
            }
        };
        let (t0, b0) = first.ok_or(ProbeError::NoData)?;
        let (bytes, window) = (b1.saturating_sub(b0), t1.saturating_duration_since(t0));
        Ok(ThroughputReport { bytes, window })
    })?;
    if ready_rx.recv() != Ok(true) {
        return join(rx);
    }
    let limit = warmup + window + Duration::from_secs(5);
    let tx = netns::spawn_in(from_ns, move || -> Result<(), ProbeError> {
        let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))
            .map_err(io_err("connect"))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))
            .map_err(io_err("timeout"))?;
        let buf = vec![0x5Au8; 64 * 1024];
        let start = Instant::now();
        // Ends when the receiver closes (write error) or at the safety limit.
        while start.elapsed() < limit && conn.write_all(&buf).is_ok() {}
        Ok(())
    })?;
    let report = join(rx);
    let _ = join(tx);
    report
}
