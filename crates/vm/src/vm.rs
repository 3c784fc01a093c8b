//! One QEMU process: start, supervise, stop, always reap.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use qapi::qmp;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::{RunPaths, VmConfig};
use crate::error::{Error, Result};
use crate::qmp::{enum_name, Qmp, VmEvent};

/// How long QEMU gets to open its QMP socket.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `quit` waits for QEMU to exit before killing it.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of QEMU's log quoted in start-up errors.
const LOG_TAIL: usize = 2048;

/// QEMU's run state (`RunState` in the QAPI schema), as `query-status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    /// Source after a completed migration: must be quit, never `cont`ed (that would
    /// re-activate the disk and give two running copies of the VM).
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this version of roam does not know.
    Unknown,
}

impl RunState {
    /// Parses QEMU's name for a run state.
    pub fn from_qemu(s: &str) -> Self {
        use RunState::*;
        match s {
            "debug" => Debug,
            "inmigrate" => Inmigrate,
            "internal-error" => InternalError,
            "io-error" => IoError,
            "paused" => Paused,
            "postmigrate" => Postmigrate,
            "prelaunch" => Prelaunch,
            "finish-migrate" => FinishMigrate,
            "restore-vm" => RestoreVm,
            "running" => Running,
            "save-vm" => SaveVm,
            "shutdown" => Shutdown,
            "suspended" => Suspended,
            "watchdog" => Watchdog,
            "guest-panicked" => GuestPanicked,
            "colo" => Colo,
            _ => Unknown,
        }
    }
}

/// A running QEMU and its QMP connection.
///
/// Dropping a `Vm` kills QEMU, reaps it (briefly blocking) and removes the run
/// directory (unless `keep_run_dir`); [`Vm::quit`] is the orderly way out.
pub struct Vm {
    config: VmConfig,
    child: Option<Child>,
    qmp: Option<Qmp>,
    events: broadcast::Sender<VmEvent>,
    /// Set once the child has been reaped.
    exit: Option<ExitStatus>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Vm {
    /// Starts QEMU for `config`, waits for its QMP socket and negotiates capabilities.
    /// Stale sockets/logs in the run directory are removed first.
    pub async fn spawn(config: VmConfig) -> Result<Vm> {
        let argv = config.argv()?;
        let paths = config.paths();
        prepare_run_dir(&paths)?;
        let log = std::fs::File::create(&paths.qemu_log).map_err(|source| Error::RunDir {
            path: paths.qemu_log.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| Error::RunDir {
            path: paths.qemu_log.clone(),
            source,
        })?;
        let mut cmd = Command::new(&config.qemu_binary);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            // Own process group: a Ctrl-C meant for roamd must not kill the guests.
            .process_group(0);
        // A QEMU whose daemon died (crash, SIGKILL) must not live on as an orphan holding
        // a disk and sockets nobody supervises: the kernel kills it with its parent.
        // (The signal follows the spawning *thread*; tokio's worker threads live as long
        // as the runtime, which is the daemon's life.)
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: config.qemu_binary.display().to_string(),
            source,
        })?;
        tracing::info!(vm = %config.name, pid = ?child.id(), "QEMU started");

        let (events, _) = broadcast::channel(256);
        let mut vm = Vm {
            config,
            child: Some(child),
            qmp: None,
            events,
            exit: None,
        };
        // On error `vm` drops here: QEMU is killed, reaped, the run dir removed.
        let qmp = vm.connect_qmp(SPAWN_TIMEOUT).await?;
        vm.qmp = Some(qmp);
        Ok(vm)
    }

    async fn connect_qmp(&mut self, timeout: Duration) -> Result<Qmp> {
        let paths = self.config.paths();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(Error::Process)? {
                    return Err(Error::EarlyExit {
                        status: status.to_string(),
                        stderr: tail(&paths.qemu_log),
                    });
                }
            }
            if paths.qmp.exists() {
                match Qmp::connect(&paths.qmp, self.events.clone()).await {
                    Ok(q) => return Ok(q),
                    Err(e) => tracing::debug!(error = %e, "QMP not ready yet"),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::QmpTimeout {
                    path: paths.qmp,
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn qmp(&self) -> &Qmp {
        // Set in `spawn` before the Vm is handed out and only taken in `quit`/`kill`,
        // which consume the Vm.
        match &self.qmp {
            Some(q) => q,
            None => unreachable!("Vm without QMP connection"),
        }
    }

    /// The config this VM was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Files in the run directory.
    pub fn paths(&self) -> RunPaths {
        self.config.paths()
    }

    /// QEMU's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// A receiver for QMP events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// `query-status`: the run state.
    pub async fn query_status(&self) -> Result<RunState> {
        let s = self.qmp().execute(qmp::query_status {}).await?;
        Ok(RunState::from_qemu(&enum_name(&s.status)))
    }

    /// Pauses the guest's vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.qmp().execute(qmp::stop {}).await?;
        Ok(())
    }

    /// Resumes the guest's vCPUs. Refused in `postmigrate`: QEMU would accept it and
    /// re-activate the disk of a VM that already runs on the destination.
    pub async fn cont(&self) -> Result<()> {
        let state = self.query_status().await?;
        if state == RunState::Postmigrate {
            return Err(Error::Refused(
                "cont after a completed outgoing migration (quit the source instead)",
            ));
        }
        self.qmp().execute(qmp::cont {}).await?;
        Ok(())
    }

    /// Resume a source whose outgoing migration completed but whose destination provably
    /// never ran the guest (it refused the handover before `cont`). This is the one case
    /// where running the source again after `postmigrate` is safe: QEMU re-activates the
    /// disk, and there is still exactly one running copy.
    pub async fn resume_after_refused_handover(&self) -> Result<()> {
        self.qmp().execute(qmp::cont {}).await?;
        Ok(())
    }

    /// Asks QEMU to quit, waits for it to exit (killing it after [`QUIT_TIMEOUT`]),
    /// reaps it and cleans the run directory.
    pub async fn quit(mut self) -> Result<ExitStatus> {
        if let Some(q) = &self.qmp {
            // The answer may be lost when QEMU closes the socket first; the exit is
            // what counts.
            if let Err(e) = q
                .execute_timeout(qmp::quit {}, Duration::from_secs(2))
                .await
            {
                tracing::debug!(vm = %self.config.name, error = %e, "quit: no answer");
            }
        }
        let status = self.wait_exit(QUIT_TIMEOUT).await;
        self.qmp = None;
        self.cleanup();
        status
    }

    /// Kills QEMU at once (SIGKILL), reaps it and cleans the run directory.
    pub async fn kill(mut self) -> Result<ExitStatus> {
        let status = self.wait_exit(Duration::ZERO).await;
        self.qmp = None;
        self.cleanup();
        status
    }

    /// Reaps QEMU if it has exited (guest shutdown, crash) without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().map_err(Error::Process)?;
        if status.is_some() {
            self.child = None;
            self.exit = status;
        }
        Ok(status)
    }

    /// Waits until QEMU exits by itself (e.g. the guest powers off) and reaps it.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let Some(child) = self.child.as_mut() else {
            return Err(Error::Process(std::io::Error::other("no QEMU process")));
        };
        let status = child.wait().await.map_err(Error::Process)?;
        self.child = None;
        self.exit = Some(status);
        Ok(status)
    }

    async fn wait_exit(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let Some(mut child) = self.child.take() else {
            return Err(Error::Process(std::io::Error::other("no QEMU process")));
        };
        let status = 'wait: {
            if !grace.is_zero() {
                if let Ok(r) = tokio::time::timeout(grace, child.wait()).await {
                    break 'wait r.map_err(Error::Process)?;
                }
                tracing::warn!(vm = %self.config.name, "QEMU did not exit in time; killing");
            }
            // `kill` sends SIGKILL and waits, so the child is reaped either way.
            child.kill().await.map_err(Error::Process)?;
            child.wait().await.map_err(Error::Process)?
        };
        self.exit = Some(status);
        Ok(status)
    }

    /// Waits until the serial console log contains `marker`.
    pub async fn wait_serial(&self, marker: &str, timeout: Duration) -> Result<()> {
        let path = self.paths().serial_log;
        let deadline = Instant::now() + timeout;
        let needle = marker.as_bytes();
        if needle.is_empty() {
            return Ok(());
        }
        let mut offset = 0usize;
        loop {
            if let Ok(data) = std::fs::read(&path) {
                // Rescan only the new part plus an overlap for a marker cut in two.
                let start = offset.saturating_sub(needle.len());
                if data.len() > start && data[start..].windows(needle.len()).any(|w| w == needle) {
                    return Ok(());
                }
                offset = data.len();
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("serial marker {marker:?}"),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The serial console output so far (lossy UTF-8).
    pub fn serial_log(&self) -> String {
        std::fs::read(self.paths().serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn cleanup(&mut self) {
        if self.config.keep_run_dir {
            return;
        }
        let dir = &self.config.run_dir;
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove run dir");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.qmp = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap synchronously (bounded): tokio's orphan reaping is best effort and
            // zombies were seen on these hosts. SIGKILL makes this quick.
            for _ in 0..200 {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        self.cleanup();
    }
}

fn prepare_run_dir(p: &RunPaths) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::RunDir {
        path: p.dir.clone(),
        source,
    };
    std::fs::create_dir_all(&p.dir).map_err(err)?;
    // The QMP socket is full control over the VM: owner only.
    std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    for f in [&p.qmp, &p.agent, &p.serial_log, &p.qemu_log] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::RunDir {
                    path: f.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(LOG_TAIL);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}
