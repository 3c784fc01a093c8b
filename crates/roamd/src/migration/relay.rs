//! Carrying QEMU's migration stream between hosts.
//!
//! QEMU only ever talks to local unix sockets. On the source, roamd listens where QEMU's
//! `migrate unix:…` connects; every connection QEMU opens (the main channel, and one per
//! multifd channel) becomes one `MigrationStream` on the host channel. On the
//! destination, each such stream is joined to a fresh connection to QEMU's
//! `migrate-incoming` socket. Bytes are copied both ways (QEMU's return path).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use roam_channel::{Connection, RecvStream, SendStream, StreamKind};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::error::{Error, Result};

pub struct Relay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    failed: Arc<AtomicBool>,
}

impl Relay {
    /// Listen at `path` (source side) and forward each accepted connection over `conn`.
    pub fn listen(path: PathBuf, conn: Connection) -> Result<Relay> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
        let failed = Arc::new(AtomicBool::new(false));
        let f2 = failed.clone();
        let task = tokio::spawn(async move {
            loop {
                let (unix, _) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("relay accept: {e}");
                        f2.store(true, Ordering::SeqCst);
                        return;
                    }
                };
                let stream = match conn.open_stream(StreamKind::MigrationStream).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("relay: open stream: {e}");
                        f2.store(true, Ordering::SeqCst);
                        return;
                    }
                };
                let f3 = f2.clone();
                tokio::spawn(async move {
                    if let Err(e) = pump(unix, stream).await {
                        debug!("relay (source) ended: {e}");
                        f3.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Relay { path, task, failed })
    }

    /// A stream broke (QEMU will notice too, but this is quicker to act on).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Destination side: join one incoming stream to QEMU's incoming socket.
pub async fn deliver(qemu_socket: &Path, stream: (SendStream, RecvStream)) -> Result<()> {
    let unix = UnixStream::connect(qemu_socket)
        .await
        .map_err(|e| Error::io(format!("connect {}", qemu_socket.display()), e))?;
    pump(unix, stream)
        .await
        .map_err(|e| Error::io("relay migration stream", e))
}

async fn pump(mut unix: UnixStream, (tx, rx): (SendStream, RecvStream)) -> std::io::Result<()> {
    let mut remote = tokio::io::join(rx, tx);
    tokio::io::copy_bidirectional(&mut unix, &mut remote).await?;
    Ok(())
}
