//! The NBD server: a unix socket, a table of exports, a thread per client.
//!
//! # Why threads, not tokio tasks
//!
//! Every request ends in a blocking file syscall (pread, pwrite, fdatasync,
//! fallocate). Under tokio each would go through `spawn_blocking`: a queue
//! hop and a thread wake-up per request, which on a 4 KiB write costs more
//! than the write itself. Instead each connection gets a small team of
//! threads ([`ServerConfig::workers_per_connection`], default 4) in a
//! leader/follower arrangement: whoever holds the socket's read side takes
//! the next request, releases it and runs the request itself, so there is
//! no queue and no hand-off, yet a slow request (an fdatasync, later a
//! post-copy read waiting on the network) does not stall the others. QEMU
//! opens only a handful of connections per disk, so the thread count stays
//! small (connections are capped by [`ServerConfig::max_connections`]).
//!
//! The server is still friendly to a tokio daemon: nothing here touches a
//! runtime, [`NbdServer::bind`] returns at once, and the calls that wait
//! ([`NbdServer::remove_export`], [`NbdServer::shutdown`]) wait at most
//! about `2 * drain_grace`, so from async code wrap them in
//! `tokio::task::spawn_blocking`.

mod conn;
mod export;
mod transmit;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use export::Export;
pub use export::ExportStats;

use crate::backend::Backend;
use crate::proto::MAX_EXPORT_NAME_LEN;

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("another server is listening on {0}")]
    InUse(PathBuf),
    #[error("export {0:?} already exists")]
    ExportExists(String),
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    #[error("export name longer than {MAX_EXPORT_NAME_LEN} bytes")]
    NameTooLong,
    #[error("could not start a thread: {0}")]
    Thread(io::Error),
}

/// Tunables; the defaults suit roamd.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// A client must finish each handshake read/write within this time.
    pub handshake_timeout: Duration,
    /// How long removal waits for clients to finish in-flight requests
    /// before cutting them off (and as long again before giving up).
    pub drain_grace: Duration,
    /// Threads serving each connection's requests concurrently (at least
    /// 1). More than one lets slow backend calls overlap; see `transmit`.
    pub workers_per_connection: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(1),
            workers_per_connection: 4,
        }
    }
}

/// State shared between the accept thread, connection threads and the handle.
pub(crate) struct Shared {
    pub config: ServerConfig,
    exports: RwLock<HashMap<String, Arc<Export>>>,
    /// Every live connection thread, by id, with a handle on its socket.
    conns: Mutex<HashMap<u64, UnixStream>>,
    conns_idle: Condvar,
    stopping: AtomicBool,
    next_id: AtomicU64,
}

impl Shared {
    fn exports_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Export>>> {
        self.exports.read().unwrap_or_else(|e| e.into_inner())
    }

    fn exports_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Export>>> {
        self.exports.write().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The empty name selects the only export when there is exactly one,
    /// as qemu-nbd does for its default export.
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let t = self.exports_read();
        match t.get(name) {
            Some(e) => Some(e.clone()),
            None if name.is_empty() && t.len() == 1 => t.values().next().cloned(),
            None => None,
        }
    }

    pub fn export_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exports_read().keys().cloned().collect();
        v.sort();
        v
    }
}

/// Removes a connection from the registry when its thread ends, however
/// it ends (including a panic in a backend).
struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        let mut c = self.shared.conns();
        c.remove(&self.id);
        if c.is_empty() {
            self.shared.conns_idle.notify_all();
        }
    }
}

/// A running NBD server on a unix socket.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl NbdServer {
    /// Binds `path` (replacing a stale socket file, refusing a live one) and
    /// starts accepting. Exports can be added before or after clients come.
    pub fn bind(path: impl AsRef<Path>, config: ServerConfig) -> Result<Self, ServerError> {
        let path = path.as_ref().to_path_buf();
        let sock_err = |source| ServerError::Socket {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(sock_err)?;
            }
        }
        let listener = Arc::new(UnixListener::bind(&path).map_err(sock_err)?);
        let shared = Arc::new(Shared {
            config,
            exports: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            conns_idle: Condvar::new(),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let (s2, l2) = (shared.clone(), listener.clone());
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&s2, &l2))
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                ServerError::Thread(e)
            })?;
        info!(path = %path.display(), "nbd server listening");
        Ok(NbdServer {
            shared,
            listener,
            accept: Some(accept),
            path,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Publishes an export. Its size is `backend.size()`, fixed from now on.
    pub fn add_export(
        &self,
        name: &str,
        backend: Arc<dyn Backend>,
        read_only: bool,
    ) -> Result<(), ServerError> {
        if name.len() > MAX_EXPORT_NAME_LEN {
            return Err(ServerError::NameTooLong);
        }
        let mut t = self.shared.exports_write();
        if t.contains_key(name) {
            return Err(ServerError::ExportExists(name.to_string()));
        }
        t.insert(
            name.to_string(),
            Arc::new(Export::new(name.to_string(), backend, read_only)),
        );
        info!(export = name, read_only, "nbd export added");
        Ok(())
    }

    /// Unpublishes an export and disconnects its clients: requests already
    /// being served complete and are answered, requests still queued are
    /// answered ESHUTDOWN, then the sockets close. Blocks up to about
    /// `2 * drain_grace`. Returns the final counters.
    pub fn remove_export(&self, name: &str) -> Result<ExportStats, ServerError> {
        let export = self
            .shared
            .exports_write()
            .remove(name)
            .ok_or_else(|| ServerError::NoSuchExport(name.to_string()))?;
        export.begin_close();
        if !export.wait_closed(self.shared.config.drain_grace) {
            warn!(export = name, "clients still attached after removal");
        }
        info!(export = name, "nbd export removed");
        Ok(export.stats())
    }

    pub fn export_names(&self) -> Vec<String> {
        self.shared.export_names()
    }

    pub fn export_stats(&self, name: &str) -> Option<ExportStats> {
        self.shared.exports_read().get(name).map(|e| e.stats())
    }

    /// Live connections, including those still in the handshake.
    pub fn connection_count(&self) -> usize {
        self.shared.conns().len()
    }

    /// Stops accepting, disconnects every client as [`remove_export`]
    /// does, waits for every thread and removes the socket file.
    ///
    /// [`remove_export`]: NbdServer::remove_export
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) on
        // Linux; the connect is a belt-and-braces second wake-up.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = UnixStream::connect(&self.path);
        let _ = accept.join();

        let exports: Vec<Arc<Export>> = self
            .shared
            .exports_write()
            .drain()
            .map(|(_, e)| e)
            .collect();
        for e in &exports {
            e.begin_close();
        }
        for e in &exports {
            e.wait_closed(self.shared.config.drain_grace);
        }
        // Whatever is left is still in the handshake: cut it off.
        let deadline = Instant::now() + 2 * self.shared.config.drain_grace;
        let mut c = self.shared.conns();
        for s in c.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        while !c.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(count = c.len(), "nbd connection threads did not exit");
                break;
            }
            c = self
                .shared
                .conns_idle
                .wait_timeout(c, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(c);
        let _ = std::fs::remove_file(&self.path);
        info!(path = %self.path.display(), "nbd server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if shared.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("nbd accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut c = shared.conns();
            if c.len() >= shared.config.max_connections {
                warn!("nbd connection limit reached; refusing a client");
                continue;
            }
            match stream.try_clone() {
                Ok(s) => c.insert(id, s),
                Err(_) => continue,
            };
        }
        let s2 = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _guard = ConnGuard { shared: &s2, id };
                conn::serve(&s2, id, stream);
            });
        if let Err(e) = spawned {
            warn!("nbd: cannot start connection thread: {e}");
            shared.conns().remove(&id);
        }
    }
}
