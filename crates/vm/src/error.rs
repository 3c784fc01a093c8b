//! Errors of the VM runtime.

use std::path::PathBuf;
use std::time::Duration;

use crate::migration::MigrationStatus;

/// Everything that can go wrong while spawning, driving or stopping a QEMU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be turned into a QEMU command line.
    #[error("invalid VM config: {0}")]
    Config(String),

    /// A unix socket path is longer than `sun_path` allows (107 bytes + NUL).
    #[error("unix socket path too long ({len} bytes, max 107): {path}")]
    SocketPathTooLong { path: PathBuf, len: usize },

    /// Filesystem work on the run directory failed.
    #[error("run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The QEMU binary could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },

    /// QEMU exited before its QMP socket answered; `stderr` is the tail of its log.
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    EarlyExit { status: String, stderr: String },

    /// A file QEMU wrote for roam (a RAM sample) could not be read.
    #[error("read {path}: {source}")]
    QemuFile {
        path: PathBuf,
        source: std::io::Error,
    },

    /// QEMU did not open its QMP socket in time.
    #[error("QMP socket {path} did not come up within {timeout:?}")]
    QmpTimeout { path: PathBuf, timeout: Duration },

    /// I/O on the QMP connection failed (includes a closed connection).
    #[error("QMP I/O: {0}")]
    QmpIo(#[source] std::io::Error),

    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        command: &'static str,
        class: String,
        desc: String,
    },

    /// A QMP command did not answer in time.
    #[error("QMP command {command} timed out after {timeout:?}")]
    CommandTimeout {
        command: &'static str,
        timeout: Duration,
    },

    /// Waiting for a condition (serial marker, migration state) timed out.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// The migration reached a final state other than the one waited for.
    #[error("migration ended in {status:?}{}", .error_desc.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    MigrationEnded {
        status: MigrationStatus,
        error_desc: Option<String>,
    },

    /// The requested tuning combines features QEMU 10.0 refuses together.
    #[error("invalid migration tuning: {0}")]
    Tuning(&'static str),

    /// roam refuses an operation that would be unsafe in the VM's current state.
    #[error("refused: {0}")]
    Refused(&'static str),

    /// Waiting for or killing the QEMU process failed.
    #[error("QEMU process: {0}")]
    Process(#[source] std::io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn from_execute(command: &'static str, e: qapi::ExecuteError) -> Self {
        match e {
            qapi::ExecuteError::Qapi(e) => Error::Qmp {
                command,
                class: format!("{:?}", e.class),
                desc: e.desc,
            },
            qapi::ExecuteError::Io(e) => Error::QmpIo(e),
        }
    }
}
