//! Named network namespaces (`/run/netns/NAME`, as `ip netns` makes them) and running code
//! inside one.
//!
//! Only the network namespace of the *calling thread* is switched (`setns(CLONE_NEWNET)` is
//! per thread), so the helpers here always run the closure on a fresh thread: the caller's
//! thread never leaves its namespace, and sockets or TUN fds opened inside stay bound to
//! the namespace they were created in after the thread ends.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

use nix::sched::{setns, CloneFlags};

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command (`ip ...`) could not run or failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// The namespace file could not be opened.
    #[error("open /run/netns/{name}: {source}")]
    Open {
        /// Namespace name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `setns` failed.
    #[error("setns into {name}: {source}")]
    Setns {
        /// Namespace name.
        name: String,
        /// Cause.
        source: nix::Error,
    },
    /// The closure's thread panicked.
    #[error("thread inside namespace {0} panicked")]
    Panicked(String),
    /// The thread could not be spawned.
    #[error("spawn thread: {0}")]
    Spawn(std::io::Error),
    /// A name `ip netns` would refuse or that could escape `/run/netns`.
    #[error("bad namespace name {0:?}")]
    BadName(String),
}

/// Runs `ip ARGS`, mapping failure to [`NetnsError::Command`].
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetnsError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            cmd,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_string()))
    }
}

/// A name unique to this process and call: `PREFIX-PID-N`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `/run/netns/NAME` with `lo` up. Fails if it exists.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        check_name(name)?;
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        run_in(&self.name, f)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!("deleting namespace {}: {e}", self.name);
        }
    }
}

/// `/run/netns/NAME`.
pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Moves the *current thread* into namespace `name`. Prefer [`run_in`]/[`spawn_in`]; use this
/// only on a thread you own and will not return to a pool.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let f = File::open(path_of(name)).map_err(|source| NetnsError::Open {
        name: name.to_string(),
        source,
    })?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Setns {
        name: name.to_string(),
        source,
    })
}

/// Starts `f` on a new thread inside namespace `name`. The handle yields the namespace
/// error if entering failed, else `f`'s value.
pub fn spawn_in<T, F>(
    name: &str,
    f: F,
) -> Result<thread::JoinHandle<Result<T, NetnsError>>, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    check_name(name)?;
    let owned = name.to_string();
    thread::Builder::new()
        .name(format!("ns-{name}"))
        .spawn(move || {
            enter(&owned)?;
            Ok(f())
        })
        .map_err(NetnsError::Spawn)
}

/// Runs `f` on a new thread inside namespace `name` and waits for its result.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_in(name, f)?
        .join()
        .map_err(|_| NetnsError::Panicked(name.to_string()))?
}
