//! A correspondent's TCP stream through a VM's echo service, for the HIP tests and
//! the handover benchmark.
//!
//! ```text
//!  correspondent ns                         guest (roam.echo=1: nc echo on port 7)
//!   writer thread ── 1 KiB / 5 ms ──▶ HIP/ESP ──▶ echo ──┐
//!   reader thread ◀── same bytes back ◀──────────────────┘
//!                 checks every byte (pattern), notes the longest pause
//! ```
//! Every byte of the stream is distinct by offset, so a lost, repeated or
//! reordered run of any length shows up as a mismatch; the longest time between
//! two reads that returned data is the handover gap the correspondent saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lab::{Lab, LabError};

/// Byte `i` of the stream.
pub fn pattern(i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[(i % 8) as usize]
}

/// The stream's shared state.
#[derive(Default)]
pub struct Echo {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// The first wrong byte, if any.
    pub mismatch: Mutex<Option<String>>,
    /// Longest time between two reads that returned data, and when it ended.
    pub max_gap: Mutex<(Duration, Option<Instant>)>,
    stop_writing: AtomicBool,
    done: AtomicBool,
}

impl Echo {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The longest gap so far and when it ended.
    pub fn max_gap(&self) -> (Duration, Option<Instant>) {
        *self.max_gap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget the gaps seen so far (e.g. the connection's start).
    pub fn reset_gap(&self) {
        *self.max_gap.lock().unwrap_or_else(|p| p.into_inner()) = (Duration::ZERO, None);
    }

    /// Waits until at least `at_least` bytes came back.
    pub async fn wait_received(&self, at_least: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.received() >= at_least {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Connects (retrying while the guest gets its lease) and streams until told to stop.
fn stream(to: SocketAddr, echo: Arc<Echo>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let conn = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("connect {to}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let we = echo.clone();
    let writer = std::thread::spawn(move || {
        // 1 KiB every 5 ms: ~200 KB/s each way, steady, far below the link.
        let mut off = 0u64;
        while !we.stop_writing.load(Ordering::Relaxed) {
            let buf: Vec<u8> = (off..off + 1024).map(pattern).collect();
            if w.write_all(&buf).is_err() {
                break;
            }
            off += 1024;
            we.sent.store(off, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut r = conn;
    let mut buf = vec![0u8; 65536];
    let mut at = 0u64;
    let mut last = Instant::now();
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                let gap = now - last;
                last = now;
                {
                    let mut g = echo.max_gap.lock().unwrap_or_else(|p| p.into_inner());
                    if at > 0 && gap > g.0 {
                        *g = (gap, Some(now));
                    }
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    let i = at + k as u64;
                    if *b != pattern(i) {
                        let mut m = echo.mismatch.lock().unwrap_or_else(|p| p.into_inner());
                        if m.is_none() {
                            *m = Some(format!("byte {i}: got {b:#04x}, want {:#04x}", pattern(i)));
                        }
                    }
                }
                at += n as u64;
                echo.received.store(at, Ordering::Relaxed);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if echo.done.load(Ordering::Relaxed) {
                    break;
                }
            }
            Err(e) => {
                let _ = writer.join();
                return Err(format!("read after {at} bytes: {e}"));
            }
        }
    }
    let _ = writer.join();
    Ok(())
}

type Thread = std::thread::JoinHandle<Result<Result<(), String>, roam_wan::netns::NetnsError>>;

/// A running stream from the lab's correspondent.
pub struct EchoClient {
    pub echo: Arc<Echo>,
    thread: Thread,
}

impl EchoClient {
    /// Starts streaming from the correspondent's namespace to `to` (the VM's LSI or
    /// HIT, port 7) and waits for the first 100 KiB to come back.
    pub async fn start(lab: &Lab, to: SocketAddr) -> Result<EchoClient, LabError> {
        let ns = lab
            .correspondent_ns()
            .ok_or_else(|| LabError::Net("the lab has no correspondent".into()))?
            .to_string();
        let echo = Arc::new(Echo::default());
        let e2 = echo.clone();
        let thread = roam_wan::netns::spawn_in(&ns, move || stream(to, e2))
            .map_err(|e| LabError::Net(format!("correspondent stream: {e}")))?;
        let c = EchoClient { echo, thread };
        if !c
            .echo
            .wait_received(100 << 10, Duration::from_secs(90))
            .await
        {
            let got = c.echo.received();
            c.echo.done.store(true, Ordering::Relaxed);
            c.echo.stop_writing.store(true, Ordering::Relaxed);
            return Err(LabError::Net(format!(
                "no echo from the VM through HIP ({got} bytes came back)"
            )));
        }
        Ok(c)
    }

    /// Stops writing and checks that every byte sent came back exactly once, in
    /// order. Returns the bytes streamed each way.
    pub async fn finish(self) -> Result<u64, String> {
        let echo = self.echo;
        echo.stop_writing.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = echo.sent.load(Ordering::Relaxed);
        let all_back = echo.wait_received(sent, Duration::from_secs(20)).await;
        echo.done.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let res = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| format!("stream thread: {e}"))?
            .map_err(|_| "stream thread panicked".to_string())?
            .map_err(|e| format!("stream namespace: {e}"))?;
        res.map_err(|e| format!("stream: {e}"))?;
        let received = echo.received();
        if !all_back {
            return Err(format!("sent {sent} bytes, {received} came back"));
        }
        if received != sent {
            return Err(format!(
                "sent {sent} bytes, {received} came back (duplicated?)"
            ));
        }
        if let Some(m) = echo
            .mismatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(format!("stream corrupted: {m}"));
        }
        Ok(sent)
    }
}
