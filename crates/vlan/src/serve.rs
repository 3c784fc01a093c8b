//! The I/O side: a unix socket QEMU's stream netdev connects to, frames in
//! both directions, and the two packet queues the host side uses.
//!
//! One task owns the [`VirtualLan`]; each QEMU connection has a reader task
//! (length-prefixed frames → the LAN task) and a writer task fed by a bounded
//! queue, so a QEMU that stops reading (a paused VM) can never block the LAN:
//! frames for it are dropped and counted instead.
//!
//! **A new connection takes over.** The newest connection is the active one:
//! its frames are served and every frame to the guest goes to it. That is what
//! happens when a destination QEMU takes over after a migration or QEMU
//! reconnects (`reconnect-ms`). Older connections are not closed, only muted
//! (their frames are dropped and counted): closing them would make their QEMU
//! reconnect 200 ms later and take the LAN back. They end when their QEMU
//! goes away; at most [`MAX_MUTED`] are kept.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, LanConfig};
use crate::lan::{Action, LanStats, VirtualLan};

/// Largest frame accepted from QEMU (a 64 KiB IP packet plus headers). A
/// larger length prefix means the stream is out of step: the connection is
/// closed (QEMU reconnects).
pub const MAX_FRAME: usize = 65_550;
/// Depth of every queue (packets to and from the host, frames to QEMU).
pub const QUEUE_DEPTH: usize = 1024;
/// Muted older connections kept open at most.
pub const MAX_MUTED: usize = 4;

/// Why the LAN could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad LAN config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
}

/// Counters of the socket side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// QEMU connections accepted.
    pub connections: u64,
    /// Frames read from the active connection.
    pub frames_from_qemu: u64,
    /// Frames written to QEMU.
    pub frames_to_qemu: u64,
    /// Frames from muted (older) connections, dropped.
    pub muted_frames: u64,
    /// Length prefixes of 0 or above [`MAX_FRAME`].
    pub bad_length: u64,
    /// Packets for the host dropped: its queue was full or closed.
    pub to_host_dropped: u64,
    /// Frames for the guest dropped: no connection, or its queue was full.
    pub to_guest_dropped: u64,
}

/// Everything counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    pub io: IoStats,
    pub lan: LanStats,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    frames_from_qemu: AtomicU64,
    frames_to_qemu: AtomicU64,
    muted_frames: AtomicU64,
    bad_length: AtomicU64,
    to_host_dropped: AtomicU64,
    to_guest_dropped: AtomicU64,
}

struct Shared {
    io: Counters,
    lan: Mutex<LanStats>,
    /// Generation of the active connection while it is open, else 0.
    active: AtomicU64,
    connections: watch::Sender<u64>,
}

/// Controls a served LAN. Dropping it stops serving and removes the socket.
pub struct Handle {
    shared: Arc<Shared>,
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("path", &self.path).finish()
    }
}

impl Handle {
    /// All counters.
    pub fn stats(&self) -> ServeStats {
        let c = &self.shared.io;
        ServeStats {
            io: IoStats {
                connections: c.connections.load(Relaxed),
                frames_from_qemu: c.frames_from_qemu.load(Relaxed),
                frames_to_qemu: c.frames_to_qemu.load(Relaxed),
                muted_frames: c.muted_frames.load(Relaxed),
                bad_length: c.bad_length.load(Relaxed),
                to_host_dropped: c.to_host_dropped.load(Relaxed),
                to_guest_dropped: c.to_guest_dropped.load(Relaxed),
            },
            lan: match self.shared.lan.lock() {
                Ok(s) => *s,
                Err(p) => *p.into_inner(),
            },
        }
    }

    /// Whether a QEMU is connected (the newest connection is still open).
    pub fn connected(&self) -> bool {
        self.shared.active.load(Relaxed) != 0
    }

    /// Waits until `n` connections have been accepted in all; false on timeout.
    pub async fn wait_connections(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.connections.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&c| c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The socket QEMU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops serving, closes every connection and removes the socket.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves the LAN `cfg` on a unix socket at `socket_path` (a stale socket
/// there is replaced; any other file is an error). Returns the handle, the
/// IP packets the guest sends off the LAN, and the sender for IP packets to
/// the guest (IPv4 or IPv6, told apart by the version nibble; IPv6 already
/// NATed by the LAN to and from [`crate::Ipv6Lan::outside`]). Both queues hold [`QUEUE_DEPTH`] packets; the LAN never
/// waits on them: a packet for a full host queue is dropped and counted.
/// The socket is removed when the handle is dropped or shut down.
pub async fn serve(
    socket_path: impl AsRef<Path>,
    cfg: LanConfig,
) -> Result<(Handle, mpsc::Receiver<Vec<u8>>, mpsc::Sender<Vec<u8>>), Error> {
    let lan = VirtualLan::new(cfg)?;
    let path = socket_path.as_ref().to_path_buf();
    let listen_err = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    // Replace a stale socket (a previous roamd's), never another kind of file.
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(&path).map_err(listen_err)?;
        }
        Ok(_) => {
            return Err(listen_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    let (to_host_tx, to_host_rx) = mpsc::channel(QUEUE_DEPTH);
    let (to_guest_tx, to_guest_rx) = mpsc::channel(QUEUE_DEPTH);
    let (stop_tx, stop_rx) = oneshot::channel();
    let shared = Arc::new(Shared {
        io: Counters::default(),
        lan: Mutex::new(lan.stats()),
        active: AtomicU64::new(0),
        connections: watch::Sender::new(0),
    });
    let task = tokio::spawn(
        Lan {
            lan,
            shared: shared.clone(),
            to_host: to_host_tx,
            active: None,
            muted: VecDeque::new(),
            generation: 0,
        }
        .run(listener, to_guest_rx, stop_rx),
    );
    tracing::debug!(path = %path.display(), "guest LAN listening");
    Ok((
        Handle {
            shared,
            path,
            stop: Some(stop_tx),
            task: Some(task),
        },
        to_host_rx,
        to_guest_tx,
    ))
}

enum Event {
    Frame(u64, Vec<u8>),
    Closed(u64),
}

struct Conn {
    generation: u64,
    frames: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

struct Lan {
    lan: VirtualLan,
    shared: Arc<Shared>,
    to_host: mpsc::Sender<Vec<u8>>,
    active: Option<Conn>,
    muted: VecDeque<Conn>,
    generation: u64,
}

impl Lan {
    async fn run(
        mut self,
        listener: UnixListener,
        mut to_guest: mpsc::Receiver<Vec<u8>>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let (events_tx, mut events) = mpsc::channel(QUEUE_DEPTH);
        let mut host_open = true;
        // Periodic router advertisements keep an IPv6 guest's default route
        // (its lifetime is finite); the first one the guest asks for itself.
        let every = Duration::from_secs(crate::lan::RA_INTERVAL_SECS);
        let mut ra_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                acc = listener.accept() => match acc {
                    Ok((stream, _)) => self.take_over(stream, &events_tx),
                    Err(e) => {
                        // E.g. out of file descriptors: do not spin.
                        tracing::warn!(error = %e, "guest LAN accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(ev) = events.recv() => self.event(ev),
                _ = ra_tick.tick() => {
                    if let Some(f) = self.lan.router_advert() {
                        self.publish();
                        self.send_to_guest(f);
                    }
                }
                pkt = to_guest.recv(), if host_open => match pkt {
                    Some(p) => {
                        let frame = self.lan.from_host(&p);
                        self.publish();
                        if let Some(f) = frame {
                            self.send_to_guest(f);
                        }
                    }
                    None => host_open = false,
                },
            }
        }
        self.shared.active.store(0, Relaxed);
    }

    fn take_over(&mut self, stream: UnixStream, events: &mpsc::Sender<Event>) {
        self.generation += 1;
        let generation = self.generation;
        let (rd, wr) = stream.into_split();
        let (frames, frames_rx) = mpsc::channel(QUEUE_DEPTH);
        let shared = self.shared.clone();
        let conn = Conn {
            generation,
            frames,
            reader: tokio::spawn(read_frames(generation, rd, events.clone(), shared.clone())),
            writer: tokio::spawn(write_frames(wr, frames_rx, shared)),
        };
        if let Some(old) = self.active.replace(conn) {
            self.muted.push_back(old);
            while self.muted.len() > MAX_MUTED {
                self.muted.pop_front();
            }
        }
        self.shared.active.store(generation, Relaxed);
        let n = self.shared.io.connections.fetch_add(1, Relaxed) + 1;
        self.shared.connections.send_replace(n);
        tracing::info!(generation, "QEMU connected to the guest LAN");
    }

    fn event(&mut self, ev: Event) {
        let active = self.active.as_ref().map(|c| c.generation);
        match ev {
            Event::Frame(g, frame) if Some(g) == active => {
                self.shared.io.frames_from_qemu.fetch_add(1, Relaxed);
                let action = self.lan.from_guest(&frame);
                // Counters first, so whoever sees the result also sees them.
                self.publish();
                match action {
                    Some(Action::ToGuest(f)) => self.send_to_guest(f),
                    Some(Action::ToHost(p)) => self.send_to_host(p),
                    None => {}
                }
            }
            Event::Frame(..) => {
                self.shared.io.muted_frames.fetch_add(1, Relaxed);
            }
            Event::Closed(g) if Some(g) == active => {
                self.active = None;
                self.shared.active.store(0, Relaxed);
                tracing::info!(generation = g, "QEMU left the guest LAN");
            }
            Event::Closed(g) => self.muted.retain(|c| c.generation != g),
        }
    }

    fn send_to_host(&self, packet: Vec<u8>) {
        if self.to_host.try_send(packet).is_err() {
            self.shared.io.to_host_dropped.fetch_add(1, Relaxed);
        }
    }

    fn send_to_guest(&self, frame: Vec<u8>) {
        let sent = self
            .active
            .as_ref()
            .is_some_and(|c| c.frames.try_send(frame).is_ok());
        if !sent {
            self.shared.io.to_guest_dropped.fetch_add(1, Relaxed);
        }
    }

    fn publish(&self) {
        if let Ok(mut s) = self.shared.lan.lock() {
            *s = self.lan.stats();
        }
    }
}

async fn read_frames(
    generation: u64,
    mut rd: OwnedReadHalf,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
) {
    let mut len = [0u8; 4];
    loop {
        if rd.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n == 0 {
            shared.io.bad_length.fetch_add(1, Relaxed);
            continue;
        }
        if n > MAX_FRAME {
            shared.io.bad_length.fetch_add(1, Relaxed);
            tracing::warn!(generation, len = n, "frame too long; closing connection");
            break;
        }
        let mut frame = vec![0u8; n];
        if rd.read_exact(&mut frame).await.is_err() {
            break;
        }
        if events.send(Event::Frame(generation, frame)).await.is_err() {
            return;
        }
    }
    let _ = events.send(Event::Closed(generation)).await;
}

async fn write_frames(
    mut wr: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    let mut buf = Vec::with_capacity(2048);
    while let Some(f) = frames.recv().await {
        buf.clear();
        // Frames are built by the LAN and bounded by its MTU (<= 9000 + 14).
        buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
        buf.extend_from_slice(&f);
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        shared.io.frames_to_qemu.fetch_add(1, Relaxed);
    }
}
