//! One export: its backend, its counters and the connections attached to it.

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// A snapshot of an export's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections that completed the handshake for this export, ever.
    pub connections_total: u64,
    /// Connections attached right now.
    pub connections_live: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
    pub connections_total: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Attached {
    closed: bool,
    streams: HashMap<u64, UnixStream>,
}

pub(crate) struct Export {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub size: u64,
    pub read_only: bool,
    pub counters: Counters,
    /// Set when the export is being removed: queued requests get ESHUTDOWN.
    closing: AtomicBool,
    attached: Mutex<Attached>,
    idle: Condvar,
}

impl Export {
    pub fn new(name: String, backend: Arc<dyn Backend>, read_only: bool) -> Self {
        Export {
            name,
            size: backend.size(),
            backend,
            read_only,
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            attached: Mutex::new(Attached::default()),
            idle: Condvar::new(),
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    // Nothing that holds this lock can panic halfway through an update.
    fn lock(&self) -> MutexGuard<'_, Attached> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection; false if the export is already being removed.
    /// Doing the check under the same lock as [`Export::begin_close`] means no
    /// connection can slip in after removal started.
    pub fn attach(&self, id: u64, stream: UnixStream) -> bool {
        let mut a = self.lock();
        if a.closed {
            return false;
        }
        a.streams.insert(id, stream);
        Counters::add(&self.counters.connections_total, 1);
        true
    }

    pub fn detach(&self, id: u64) {
        let mut a = self.lock();
        a.streams.remove(&id);
        if a.streams.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Starts removal: refuses new attachments and half-closes every
    /// connection for reading, so each finishes the request in hand,
    /// answers anything already buffered with ESHUTDOWN and exits.
    pub fn begin_close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        let mut a = self.lock();
        a.closed = true;
        for s in a.streams.values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// Waits until every connection detached. After `grace`, connections
    /// still stuck (e.g. writing to a client that stopped reading) are shut
    /// down both ways. Returns false if some remain after `2 * grace`.
    pub fn wait_closed(&self, grace: Duration) -> bool {
        let mut a = self.lock();
        for force in [false, true] {
            let deadline = Instant::now() + grace;
            while !a.streams.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                a = self
                    .idle
                    .wait_timeout(a, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if a.streams.is_empty() {
                return true;
            }
            if !force {
                for s in a.streams.values() {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        a.streams.is_empty()
    }

    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        ExportStats {
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
            reads: l(&c.reads),
            writes: l(&c.writes),
            flushes: l(&c.flushes),
            trims: l(&c.trims),
            write_zeroes: l(&c.write_zeroes),
            errors: l(&c.errors),
            connections_total: l(&c.connections_total),
            connections_live: self.lock().streams.len() as u64,
        }
    }
}
