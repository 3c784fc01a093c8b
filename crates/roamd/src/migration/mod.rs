//! The migration engine (I/O): source and destination halves, the disk copy, the relay
//! of QEMU's migration stream, and progress metering. The protocol they speak is
//! `roam-migrate`'s; see its crate doc for the sequence.

pub mod dest;
pub mod disk;
pub mod postcopy;
pub mod relay;
pub mod resume;
pub mod source;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roam_channel::{Connection, RecvStream, SendStream};
use roam_control::api::{Phase, Progress};
use roam_migrate::Msg;
use roam_vm::MigrationStats;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use disk::DiskCounters;

pub async fn send_ctl(tx: &mut SendStream, msg: &Msg) -> Result<()> {
    roam_channel::send_msg(tx, msg)
        .await
        .map_err(|e| Error::Migration(format!("send {}: {e}", msg.name())))
}

/// A guest file (kernel, initramfs) named by content: hashed as a stream, the same way
/// on both hosts, so they compare what they each have.
pub fn file_ref(path: &str) -> Result<roam_migrate::protocol::FileRef> {
    let (size, hash) = roam_agent::manifest::hash_file(std::path::Path::new(path))
        .map_err(|e| Error::io(format!("read {path}"), e))?;
    Ok(roam_migrate::protocol::FileRef {
        path: path.to_string(),
        size,
        blake3: blake3::Hash::from(hash).to_hex().to_string(),
    })
}

/// Send a conversation's last message and wait (briefly) until the peer has it: closing
/// the connection right after a write would discard it, and "refused: destination disk
/// full" is worth delivering.
pub async fn send_last(tx: &mut SendStream, msg: &Msg) {
    if send_ctl(tx, msg).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.finish_and_wait()).await;
    }
}

pub async fn recv_ctl(rx: &mut RecvStream, timeout: Duration) -> Result<Msg> {
    match tokio::time::timeout(timeout, roam_channel::recv_msg::<Msg>(rx)).await {
        Err(_) => Err(Error::Migration(format!(
            "the other host did not answer within {} s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) => Err(Error::Migration(format!("control stream: {e}"))),
        Ok(Ok(m)) => Ok(m),
    }
}

struct MeterState {
    phase: Phase,
    phase_started: Instant,
    phases: BTreeMap<Phase, u64>,
    disk: Option<Arc<DiskCounters>>,
    conn: Option<Connection>,
    disk_total: u64,
    rate_hint: f64,
    mem: Option<MigrationStats>,
    last_wire: (Instant, u64),
    rate: f64,
}

/// Progress of one migration: phase timings for the result, and a `Progress` sent to the
/// client at least five times a second.
pub struct Meter {
    start: Instant,
    state: Arc<Mutex<MeterState>>,
    tx: mpsc::Sender<Progress>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Meter {
    pub fn new(tx: mpsc::Sender<Progress>) -> Meter {
        let start = Instant::now();
        let state = Arc::new(Mutex::new(MeterState {
            phase: Phase::Connect,
            phase_started: start,
            phases: BTreeMap::new(),
            disk: None,
            conn: None,
            disk_total: 0,
            rate_hint: 0.0,
            mem: None,
            last_wire: (start, 0),
            rate: 0.0,
        }));
        let (s2, tx2) = (state.clone(), tx.clone());
        let ticker = tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(200));
            loop {
                t.tick().await;
                let p = snapshot(&s2, start);
                let _ = tx2.try_send(p);
            }
        });
        Meter {
            start,
            state,
            tx,
            ticker,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MeterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self, phase: Phase) {
        {
            let mut s = self.lock();
            let now = Instant::now();
            let took = now.duration_since(s.phase_started).as_millis() as u64;
            let prev = s.phase;
            if prev != phase {
                *s.phases.entry(prev).or_insert(0) += took;
                s.phase = phase;
                s.phase_started = now;
            }
        }
        let _ = self.tx.try_send(snapshot(&self.state, self.start));
    }

    pub fn current_phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn attach_disk(&self, counters: Arc<DiskCounters>, conn: Connection) {
        let mut s = self.lock();
        s.disk = Some(counters);
        s.conn = Some(conn);
    }

    pub fn disk_total(&self, bytes: u64) {
        self.lock().disk_total = bytes;
    }

    pub fn set_rate_hint(&self, r: f64) {
        self.lock().rate_hint = r;
    }

    pub fn rate_hint(&self) -> f64 {
        self.lock().rate_hint
    }

    pub fn memory(&self, st: &MigrationStats) {
        self.lock().mem = Some(st.clone());
    }

    pub fn disk_counters(&self) -> Option<Arc<DiskCounters>> {
        self.lock().disk.clone()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.lock()
            .disk
            .as_ref()
            .map(|d| d.stream_bytes.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn phases(&self) -> BTreeMap<Phase, u64> {
        let s = self.lock();
        let mut p = s.phases.clone();
        if !matches!(s.phase, Phase::Done | Phase::Aborted) {
            *p.entry(s.phase).or_insert(0) += s.phase_started.elapsed().as_millis() as u64;
        }
        p
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

fn snapshot(state: &Mutex<MeterState>, start: Instant) -> Progress {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let mut p = Progress::new(s.phase);
    p.elapsed_ms = start.elapsed().as_millis() as u64;
    if let Some(d) = &s.disk {
        p.disk_sent_bytes = d.raw_bytes.load(Ordering::Relaxed);
    }
    p.disk_total_bytes = s.disk_total;
    if let Some(m) = s.mem.as_ref().and_then(|m| m.ram.as_ref()) {
        p.memory_sent_bytes = m.transferred;
        p.memory_remaining_bytes = m.remaining;
        p.memory_total_bytes = m.total;
        p.dirty_rate_pages_per_s = Some(m.dirty_pages_rate);
    }
    if let Some(c) = &s.conn {
        let wire = c.stats().tx_bytes;
        p.wire_bytes = wire;
        let now = Instant::now();
        let (t0, w0) = s.last_wire;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt >= 0.5 {
            let inst = wire.saturating_sub(w0) as f64 / dt;
            // Smooth: a progress bar that jumps is worse than one that lags a little.
            s.rate = if s.rate == 0.0 {
                inst
            } else {
                0.6 * s.rate + 0.4 * inst
            };
            s.last_wire = (now, wire);
        }
    }
    p.rate_bytes_per_s = s.rate as u64;
    let remaining = match s.phase {
        Phase::DiskBulk | Phase::DiskIterate => {
            Some(s.disk_total.saturating_sub(p.disk_sent_bytes) + p.memory_total_bytes)
        }
        Phase::Memory => Some(p.memory_remaining_bytes),
        _ => None,
    };
    p.eta_ms = remaining.and_then(|r| roam_migrate::plan::eta_ms(r, s.rate.max(s.rate_hint)));
    p
}
