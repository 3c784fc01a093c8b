//! Host side: [`AgentMonitor`] connects to the QEMU chardev socket of the
//! agent port (retrying until it exists and QEMU accepts), and records what the
//! guest says: boot id, heartbeat arrival times and the longest gap, every
//! acked `(seq, sum)`.
//!
//! ```text
//!   AgentMonitor (handle, cheap to query) ── commands ──> connection task
//!        ▲ stats()/last_heartbeat()/acked()                 │ connect (retry)
//!        └──────────── Mutex<State> <── lines ── LineSplitter ◄── UnixStream
//! ```
//! Heartbeat times are taken on arrival (`SystemTime` for reporting,
//! `Instant` for gaps), because the guest clock stops while the VM is paused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::proto::{
    self, AgentError, AgentMsg, BootId, Hello, HostMsg, LineSplitter, VerifyReport, WorkloadConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("agent not connected")]
    NotConnected,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("monitor stopped")]
    Stopped,
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
}

/// One heartbeat as the host saw it arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatSeen {
    pub at: SystemTime,
    pub seq: u64,
    pub boot_id: BootId,
    pub uptime_ms: u64,
}

/// A snapshot of what the monitor has seen.
#[derive(Clone, Debug, Default)]
pub struct MonitorStats {
    pub connected: bool,
    /// Successful connections so far.
    pub connects: u64,
    pub hello: Option<Hello>,
    /// Boot id of the latest hello or heartbeat.
    pub boot_id: Option<BootId>,
    /// Times the boot id changed (guest rebooted) after the first one.
    pub boot_changes: u64,
    pub heartbeats: u64,
    pub first_heartbeat: Option<HeartbeatSeen>,
    pub last_heartbeat: Option<HeartbeatSeen>,
    /// Longest time between two heartbeats on one connection since the last
    /// [`AgentMonitor::reset_gap`].
    pub max_gap: Duration,
    /// Arrival of the heartbeat that ended `max_gap`.
    pub max_gap_end: Option<SystemTime>,
    pub acks: u64,
    pub max_acked_seq: Option<u64>,
    /// Lines that did not decode (e.g. cut off by a disconnect).
    pub decode_errors: u64,
    pub agent_errors: u64,
    pub last_agent_error: Option<AgentError>,
}

/// A flat, serialisable summary for the daemon's API and the migration
/// protocol (times are host arrival times in ms since the Unix epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSnapshot {
    pub connected: bool,
    /// 32 hex digits.
    pub boot_id: Option<String>,
    pub heartbeats: u64,
    pub first_heartbeat_unix_ms: Option<u64>,
    pub last_heartbeat_unix_ms: Option<u64>,
    pub max_gap_ms: u64,
    /// Acks received (distinct seqs).
    pub acked: u64,
    pub max_acked_seq: Option<u64>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Tuning of the connection loop.
#[derive(Clone, Debug)]
pub struct MonitorOptions {
    /// Pause between connection attempts.
    pub retry: Duration,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            retry: Duration::from_millis(20),
        }
    }
}

#[derive(Default)]
struct State {
    stats: MonitorStats,
    last_hb_instant: Option<Instant>,
    acked: BTreeMap<u64, u64>,
    verify_waiters: Vec<(u64, oneshot::Sender<VerifyReport>)>,
    pong_waiters: Vec<(u64, oneshot::Sender<()>)>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken on every decoded message and connection change.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Guest-visible downtime of a migration: first heartbeat at the destination
/// minus last heartbeat at the source (both host arrival times).
pub fn guest_downtime(source_last: &HeartbeatSeen, dest_first: &HeartbeatSeen) -> Option<Duration> {
    dest_first.at.duration_since(source_last.at).ok()
}

/// Watches one agent through its chardev socket. Dropping it stops the task.
pub struct AgentMonitor {
    shared: Arc<Shared>,
    cmd: mpsc::Sender<HostMsg>,
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    next_nonce: std::sync::atomic::AtomicU64,
}

impl AgentMonitor {
    /// Starts watching `socket` (a QEMU `-chardev socket,server=on` path);
    /// must be called inside a tokio runtime.
    pub fn spawn(socket: impl AsRef<Path>) -> AgentMonitor {
        Self::spawn_with(socket, MonitorOptions::default())
    }

    pub fn spawn_with(socket: impl AsRef<Path>, opts: MonitorOptions) -> AgentMonitor {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(64);
        let path = socket.as_ref().to_path_buf();
        let task = tokio::spawn(connection_loop(path.clone(), opts, shared.clone(), rx));
        AgentMonitor {
            shared,
            cmd: tx,
            task,
            path,
            next_nonce: std::sync::atomic::AtomicU64::new(1),
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> MonitorStats {
        self.shared.lock().stats.clone()
    }

    pub fn first_heartbeat(&self) -> Option<HeartbeatSeen> {
        self.shared.lock().stats.first_heartbeat
    }

    pub fn last_heartbeat(&self) -> Option<HeartbeatSeen> {
        self.shared.lock().stats.last_heartbeat
    }

    pub fn boot_id(&self) -> Option<BootId> {
        self.shared.lock().stats.boot_id
    }

    /// Alias of [`AgentMonitor::spawn`].
    pub fn start(socket: impl AsRef<Path>) -> AgentMonitor {
        Self::spawn(socket)
    }

    /// Stops the connection task now (synchronous; see also `shutdown`).
    pub fn stop(&self) {
        self.task.abort();
    }

    pub fn snapshot(&self) -> AgentSnapshot {
        let st = self.shared.lock();
        let s = &st.stats;
        AgentSnapshot {
            connected: s.connected,
            boot_id: s.boot_id.map(|b| b.to_string()),
            heartbeats: s.heartbeats,
            first_heartbeat_unix_ms: s.first_heartbeat.map(|h| unix_ms(h.at)),
            last_heartbeat_unix_ms: s.last_heartbeat.map(|h| unix_ms(h.at)),
            max_gap_ms: s.max_gap.as_millis() as u64,
            acked: st.acked.len() as u64,
            max_acked_seq: s.max_acked_seq,
        }
    }

    /// Arrival time (unix ms) of the first heartbeat that arrived after
    /// `after_unix_ms`, waiting up to `timeout` for one; `None` on timeout.
    /// Within one batch of lines the latest arrival is what is known, so the
    /// answer can be late by the time one read takes (about a heartbeat).
    pub async fn wait_heartbeat_after(&self, after_unix_ms: u64, timeout: Duration) -> Option<u64> {
        let st = self
            .wait_for(timeout, "heartbeat", |s| {
                s.last_heartbeat
                    .is_some_and(|h| unix_ms(h.at) > after_unix_ms)
            })
            .await
            .ok()?;
        let first = st.first_heartbeat.map(|h| unix_ms(h.at));
        match first {
            Some(f) if f > after_unix_ms => Some(f),
            _ => st.last_heartbeat.map(|h| unix_ms(h.at)),
        }
    }

    /// Every acked `(seq, sum)` received so far.
    pub fn acked(&self) -> BTreeMap<u64, u64> {
        self.shared.lock().acked.clone()
    }

    /// Starts a new max-gap measurement (e.g. after boot, before a test phase).
    pub fn reset_gap(&self) {
        let mut st = self.shared.lock();
        st.stats.max_gap = Duration::ZERO;
        st.stats.max_gap_end = None;
    }

    /// Waits until `cond` holds on the stats, or `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &'static str,
        mut cond: impl FnMut(&MonitorStats) -> bool,
    ) -> Result<MonitorStats, MonitorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            {
                let st = self.shared.lock();
                if cond(&st.stats) {
                    return Ok(st.stats.clone());
                }
            }
            if self.task.is_finished() {
                return Err(MonitorError::Stopped);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(MonitorError::Timeout(timeout, what));
            }
        }
    }

    /// Waits for a hello (of the current connection or an earlier one).
    pub async fn wait_hello(&self, timeout: Duration) -> Result<Hello, MonitorError> {
        let st = self
            .wait_for(timeout, "hello", |s| s.hello.is_some())
            .await?;
        st.hello.ok_or(MonitorError::Stopped)
    }

    async fn send(&self, msg: HostMsg) -> Result<(), MonitorError> {
        if !self.shared.lock().stats.connected {
            return Err(MonitorError::NotConnected);
        }
        self.cmd.send(msg).await.map_err(|_| MonitorError::Stopped)
    }

    /// Sets the guest workload (all fields; omitted ones mean off).
    pub async fn configure(&self, cfg: WorkloadConfig) -> Result<(), MonitorError> {
        self.send(HostMsg::Config(cfg)).await
    }

    /// Round trip to the agent.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, MonitorError> {
        let nonce = self
            .next_nonce
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            // Callers that timed out left their senders behind.
            st.pong_waiters.retain(|(_, w)| !w.is_closed());
            st.pong_waiters.push((nonce, tx));
        }
        let start = Instant::now();
        self.send(HostMsg::Ping { nonce }).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(MonitorError::Stopped),
            Err(_) => Err(MonitorError::Timeout(timeout, "pong")),
        }
    }

    /// Asks the agent to re-read its log up to `upto_seq` and check the data
    /// files; returns its report.
    pub async fn verify(
        &self,
        upto_seq: u64,
        timeout: Duration,
    ) -> Result<VerifyReport, MonitorError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            st.verify_waiters.retain(|(_, w)| !w.is_closed());
            st.verify_waiters.push((upto_seq, tx));
        }
        self.send(HostMsg::Verify { upto_seq }).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(MonitorError::Stopped),
            Err(_) => Err(MonitorError::Timeout(timeout, "verify_report")),
        }
    }

    /// Stops the connection task (the guest keeps running).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for AgentMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection_loop(
    path: PathBuf,
    opts: MonitorOptions,
    shared: Arc<Shared>,
    mut cmd: mpsc::Receiver<HostMsg>,
) {
    loop {
        let stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(opts.retry).await;
                continue;
            }
        };
        {
            let mut st = shared.lock();
            st.stats.connected = true;
            st.stats.connects += 1;
            st.last_hb_instant = None;
        }
        shared.changed.notify_waiters();
        let stop = run_connection(stream, &shared, &mut cmd).await;
        {
            let mut st = shared.lock();
            st.stats.connected = false;
            st.last_hb_instant = None;
        }
        shared.changed.notify_waiters();
        if stop {
            return;
        }
        tokio::time::sleep(opts.retry).await;
    }
}

/// Returns true when the monitor handle is gone (stop for good).
async fn run_connection(
    stream: UnixStream,
    shared: &Shared,
    cmd: &mut mpsc::Receiver<HostMsg>,
) -> bool {
    let (mut rd, mut wr) = stream.into_split();
    let mut split = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    // Ask for a hello, in case the agent's came before we were reading.
    if let Ok(line) = proto::encode(&HostMsg::Ping { nonce: 0 }) {
        if wr.write_all(&line).await.is_err() {
            return false;
        }
    }
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => n,
                };
                split.push(&buf[..n]);
                let mut any = false;
                while let Some(line) = split.next_line() {
                    any = true;
                    let msg = line.and_then(|l| proto::decode::<AgentMsg>(&l));
                    on_message(shared, msg);
                }
                if any {
                    shared.changed.notify_waiters();
                }
            }
            c = cmd.recv() => {
                let Some(msg) = c else { return true };
                let Ok(line) = proto::encode(&msg) else { continue };
                if wr.write_all(&line).await.is_err() {
                    return false;
                }
            }
        }
    }
}

fn note_boot(st: &mut State, id: BootId) {
    match st.stats.boot_id {
        Some(old) if old != id => st.stats.boot_changes += 1,
        _ => {}
    }
    st.stats.boot_id = Some(id);
}

fn on_message(shared: &Shared, msg: Result<AgentMsg, proto::ProtoError>) {
    let mut st = shared.lock();
    let msg = match msg {
        Ok(m) => m,
        Err(_) => {
            st.stats.decode_errors += 1;
            return;
        }
    };
    match msg {
        AgentMsg::Hello(h) => {
            if proto::check_hello(&h).is_err() {
                st.stats.decode_errors += 1;
                return;
            }
            note_boot(&mut st, h.boot_id);
            st.stats.hello = Some(h);
        }
        AgentMsg::Hb(hb) => {
            let now = Instant::now();
            let seen = HeartbeatSeen {
                at: SystemTime::now(),
                seq: hb.seq,
                boot_id: hb.boot_id,
                uptime_ms: hb.uptime_ms,
            };
            note_boot(&mut st, hb.boot_id);
            if let Some(prev) = st.last_hb_instant {
                let gap = now.duration_since(prev);
                if gap > st.stats.max_gap {
                    st.stats.max_gap = gap;
                    st.stats.max_gap_end = Some(seen.at);
                }
            }
            st.last_hb_instant = Some(now);
            st.stats.heartbeats += 1;
            if st.stats.first_heartbeat.is_none() {
                st.stats.first_heartbeat = Some(seen);
            }
            st.stats.last_heartbeat = Some(seen);
        }
        AgentMsg::Ack(a) => {
            st.acked.insert(a.seq, a.sum);
            st.stats.acks += 1;
            st.stats.max_acked_seq = Some(st.stats.max_acked_seq.map_or(a.seq, |m| m.max(a.seq)));
        }
        AgentMsg::VerifyReport(r) => {
            if let Some(i) = st.verify_waiters.iter().position(|(u, _)| *u == r.upto_seq) {
                let (_, tx) = st.verify_waiters.swap_remove(i);
                let _ = tx.send(r);
            }
        }
        AgentMsg::Pong { nonce } => {
            if let Some(i) = st.pong_waiters.iter().position(|(n, _)| *n == nonce) {
                let (_, tx) = st.pong_waiters.swap_remove(i);
                let _ = tx.send(());
            }
        }
        AgentMsg::Error(e) => {
            st.stats.agent_errors += 1;
            st.stats.last_agent_error = Some(e);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proto::{Ack, Heartbeat};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake agent on a unix socket: the monitor side is real, the peer is
    /// scripted, so reconnects and accounting can be checked without a VM.
    #[tokio::test]
    async fn monitor_counts_and_survives_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mon = AgentMonitor::spawn(&sock);
        // The socket appears only later: the monitor keeps retrying.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let listener = UnixListener::bind(&sock).unwrap();
        let boot = BootId(77);
        for round in 0..2u64 {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd).lines();
            // The monitor pings first.
            let first: HostMsg =
                proto::decode(rd.next_line().await.unwrap().unwrap().as_bytes()).unwrap();
            assert!(matches!(first, HostMsg::Ping { .. }));
            let hello = AgentMsg::Hello(Hello {
                version: proto::PROTO_VERSION,
                boot_id: boot,
                agent_version: "t".into(),
                disk_size: None,
                log: None,
                data_mounted: false,
                next_seq: 0,
            });
            wr.write_all(&proto::encode(&hello).unwrap()).await.unwrap();
            for i in 0..5 {
                let hb = AgentMsg::Hb(Heartbeat {
                    seq: round * 5 + i,
                    boot_id: boot,
                    uptime_ms: 0,
                });
                wr.write_all(&proto::encode(&hb).unwrap()).await.unwrap();
                let ack = AgentMsg::Ack(Ack {
                    seq: round * 5 + i,
                    sum: 1000 + i,
                });
                wr.write_all(&proto::encode(&ack).unwrap()).await.unwrap();
            }
            wr.write_all(b"garbage\n").await.unwrap();
            let st = mon
                .wait_for(Duration::from_secs(5), "acks", |s| {
                    s.acks == (round + 1) * 5
                })
                .await
                .unwrap();
            assert_eq!(st.heartbeats, (round + 1) * 5);
            assert_eq!(st.connects, round + 1);
            assert_eq!(st.decode_errors, round + 1);
            assert_eq!(st.boot_id, Some(boot));
            // A verify request reaches the peer and its answer comes back.
            let mon_ref = &mon;
            let (rep, line) = tokio::join!(mon_ref.verify(9, Duration::from_secs(5)), async {
                let l = rd.next_line().await.unwrap().unwrap();
                let r = AgentMsg::VerifyReport(VerifyReport {
                    upto_seq: 9,
                    ..Default::default()
                });
                wr.write_all(&proto::encode(&r).unwrap()).await.unwrap();
                l
            });
            assert_eq!(rep.unwrap().upto_seq, 9);
            assert_eq!(
                proto::decode::<HostMsg>(line.as_bytes()).unwrap(),
                HostMsg::Verify { upto_seq: 9 }
            );
            drop(wr);
            drop(rd);
            mon.wait_for(Duration::from_secs(5), "disconnect", |s| !s.connected)
                .await
                .unwrap();
            assert!(matches!(
                mon.configure(WorkloadConfig::default()).await,
                Err(MonitorError::NotConnected)
            ));
        }
        let acked = mon.acked();
        assert_eq!(acked.len(), 10);
        assert_eq!(acked.get(&7), Some(&1002));
        let first = mon.first_heartbeat().unwrap();
        let last = mon.last_heartbeat().unwrap();
        assert_eq!((first.seq, last.seq), (0, 9));
        assert!(guest_downtime(&first, &last).is_some());
        let snap = mon.snapshot();
        assert_eq!(snap.acked, 10);
        assert_eq!(
            snap.boot_id.as_deref(),
            Some("0000000000000000000000000000004d")
        );
        assert_eq!(snap.first_heartbeat_unix_ms, Some(unix_ms(first.at)));
        assert_eq!(
            mon.wait_heartbeat_after(0, Duration::from_millis(10)).await,
            Some(unix_ms(first.at))
        );
        assert_eq!(
            mon.wait_heartbeat_after(u64::MAX - 1, Duration::from_millis(30))
                .await,
            None
        );
        mon.shutdown().await;
    }
}
