//! One roam host of the lab: a namespace, a state directory, a real `roamd`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roam_control::Client;

use crate::lab::LabError;

pub struct Host {
    pub name: String,
    pub netns: String,
    /// The host's address on the WAN (its locator).
    pub addr: String,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub key: String,
    pub log: PathBuf,
    pub client: Client,
    child: Option<Child>,
    roamd: PathBuf,
    /// Extra environment for the daemon (e.g. `ROAM_FAULTS`), applied at the next
    /// [`Host::spawn`].
    pub env: Vec<(String, String)>,
}

#[derive(serde::Deserialize)]
struct InitOut {
    key: String,
}

impl Host {
    /// `roamd init` then `roamd run` inside `netns`; returns once its control API answers.
    pub async fn start(
        name: &str,
        netns: &str,
        ip: &str,
        root: &Path,
        roamd: &Path,
        env: &[(String, String)],
    ) -> Result<Host, LabError> {
        let state = root.join(name);
        let run = root.join(format!("{name}-run"));
        let listen = format!("{ip}:7000");
        let out = Command::new(roamd)
            .args(["init", "--json", "--name", name, "--listen", &listen])
            .arg("--state")
            .arg(&state)
            .arg("--run-dir")
            .arg(&run)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| LabError::Io(format!("run {}: {e}", roamd.display())))?;
        if !out.status.success() {
            return Err(LabError::Host(format!("roamd init for {name} failed")));
        }
        let init: InitOut = serde_json::from_slice(&out.stdout)
            .map_err(|e| LabError::Host(format!("roamd init output for {name}: {e}")))?;
        let socket = run.join("roamd.sock");
        let log = root.join(format!("{name}.log"));
        let mut h = Host {
            name: name.to_string(),
            netns: netns.to_string(),
            addr: listen,
            state,
            socket: socket.clone(),
            key: init.key,
            log,
            client: Client::new(&socket),
            child: None,
            roamd: roamd.to_path_buf(),
            env: env.to_vec(),
        };
        h.spawn().await?;
        Ok(h)
    }

    /// The daemon's run directory (sockets, per-VM dirs): where its control socket is.
    pub fn run_dir(&self) -> PathBuf {
        self.socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(|c| c.id())
        } else {
            None
        }
    }

    /// (Re)start the daemon process of this host.
    pub async fn spawn(&mut self) -> Result<(), LabError> {
        // Reap a previous process (killed by a test) before starting anew.
        self.kill();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| LabError::Io(format!("open {}: {e}", self.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::Io(format!("log: {e}")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&self.roamd)
            .arg("run")
            .arg("--state")
            .arg(&self.state)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| LabError::Io(format!("spawn roamd for {}: {e}", self.name)))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.client.host_info().await.is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Err(LabError::Host(format!(
                        "roamd for {} exited ({st}); see {}",
                        self.name,
                        self.log.display()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Host(format!(
                    "roamd for {} did not answer within 30 s; see {}",
                    self.name,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kill the daemon abruptly (failure injection). Its QEMU children die with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Orderly stop: ask the daemon to exit (it quits its VMs), kill if it does not.
    pub async fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let _ = self.client.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !self.is_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kill();
    }

    /// Tail of the daemon log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}
