//! `roam-hip` processes in the lab's namespaces besides the VMs' own endpoints: a
//! rendezvous server and correspondents that can move.
//!
//! ```text
//!  correspondent namespace (WAN port "correspondent": 198.18.3.0/24 and 198.18.4.0/24)
//!    roam-hip rvs  198.18.3.3:10500            RVS_IP (added as /32)
//!    roam-hip run  198.18.3.2:10500 TUN hipc0  the correspondent, first address
//!    roam-hip run  198.18.4.2:10500 TUN hipc0  the same identity after it moved
//! ```
//!
//! Each process is a [`HipProc`]: killed and reaped when dropped, its log in the lab's
//! root directory, its control socket reachable through `roam-hip ctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bins;
use crate::lab::{wait_until, Lab, LabError};

/// The rendezvous server's address: on the correspondent's subnet.
pub const RVS_IP: &str = "198.18.3.3";
/// Where the correspondent goes when it moves: another subnet, routed by the WAN to the
/// same namespace (the correspondent port's extra prefix).
pub const MOVED_CORRESPONDENT_IP: &str = "198.18.4.2";
/// UDP port of every process here (RFC 5770).
pub const PORT: u16 = 10500;
/// The WAN's TUN device in each namespace.
const WAN_IF: &str = "wan0";

fn hip_bin() -> Result<PathBuf, LabError> {
    bins::find("roam-hip").ok_or_else(|| LabError::MissingBinary("roam-hip".into()))
}

/// Writes a new identity to `path`; returns its HIT.
pub fn keygen(path: &Path) -> Result<String, LabError> {
    let out = Command::new(hip_bin()?)
        .arg("keygen")
        .arg(path)
        .output()
        .map_err(|e| LabError::Io(format!("run roam-hip keygen: {e}")))?;
    if !out.status.success() {
        return Err(LabError::Io(format!(
            "roam-hip keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `ip addr add|del CIDR dev wan0` inside `ns`.
pub fn wan_addr(ns: &str, op: &str, cidr: &str) -> Result<(), LabError> {
    roam_wan::netns::ip(&["-n", ns, "addr", op, cidr, "dev", WAN_IF])
        .map_err(|e| LabError::Net(e.to_string()))
}

/// A running `roam-hip` process.
pub struct HipProc {
    child: Option<Child>,
    pub name: String,
    pub hit: String,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl HipProc {
    /// Runs `roam-hip ARGS --control ROOT/NAME.sock` in `ns`, logging to `ROOT/NAME.log`;
    /// returns once the control socket exists.
    pub async fn spawn(
        root: &Path,
        ns: &str,
        name: &str,
        hit: &str,
        args: &[String],
    ) -> Result<HipProc, LabError> {
        let control = root.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&control);
        let log = root.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| LabError::Io(format!("create {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| LabError::Io(format!("log: {e}")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(hip_bin()?)
            .args(args)
            .arg("--control")
            .arg(&control)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| LabError::Io(format!("spawn roam-hip: {e}")))?;
        let mut p = HipProc {
            child: Some(child),
            name: name.to_string(),
            hit: hit.to_string(),
            control,
            log,
        };
        if !wait_until(Duration::from_secs(10), || p.control.exists()).await {
            p.stop();
            return Err(LabError::Net(format!(
                "{name} did not start: {}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            )));
        }
        Ok(p)
    }

    /// `roam-hip ctl REQUEST` (`status`, `stats`, `locator ADDR`, ...).
    pub fn ctl(&self, request: &str) -> Result<String, LabError> {
        let out = Command::new(hip_bin()?)
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .args(request.split_whitespace())
            .output()
            .map_err(|e| LabError::Io(format!("run roam-hip ctl: {e}")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One counter from `ctl stats` (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        self.ctl("stats")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills and reaps the process (its TUN device goes with it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.control);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HipProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a rendezvous server at [`RVS_IP`] in the correspondent's namespace (a new
/// identity); its `hit` and `HIT@ADDR:PORT` are what VMs are created with.
pub async fn start_rvs(lab: &Lab) -> Result<HipProc, LabError> {
    let ns = lab
        .correspondent_ns()
        .ok_or_else(|| LabError::Net("the lab has no correspondent namespace".into()))?
        .to_string();
    wan_addr(&ns, "add", &format!("{RVS_IP}/32"))?;
    let id = lab.root.join("rvs.id");
    let hit = keygen(&id)?;
    let args = vec![
        "rvs".to_string(),
        "--identity".into(),
        id.display().to_string(),
        "--listen".into(),
        format!("{RVS_IP}:{PORT}"),
    ];
    HipProc::spawn(&lab.root, &ns, "rvs", &hit, &args).await
}

/// Starts a correspondent endpoint (TUN `hipc0`) at `ip` in the correspondent's
/// namespace with the identity in `id` (made if missing), knowing `peers` and, for
/// peers given by HIT alone, the rendezvous server `rvs` (`ADDR:PORT`).
pub async fn start_correspondent(
    lab: &Lab,
    name: &str,
    ip: &str,
    id: &Path,
    peers: &[String],
    rvs: Option<&str>,
) -> Result<HipProc, LabError> {
    let ns = lab
        .correspondent_ns()
        .ok_or_else(|| LabError::Net("the lab has no correspondent namespace".into()))?
        .to_string();
    let hit = if id.exists() {
        let out = Command::new(hip_bin()?)
            .arg("show")
            .arg(id)
            .output()
            .map_err(|e| LabError::Io(format!("run roam-hip show: {e}")))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("hit ").map(str::to_string))
            .unwrap_or_default()
    } else {
        keygen(id)?
    };
    let mut args = vec![
        "run".to_string(),
        "--identity".into(),
        id.display().to_string(),
        "--listen".into(),
        format!("{ip}:{PORT}"),
        "--tun".into(),
        "hipc0".into(),
    ];
    for p in peers {
        args.push("--peer".into());
        args.push(p.clone());
    }
    if let Some(r) = rvs {
        args.push("--rvs".into());
        args.push(r.to_string());
    }
    HipProc::spawn(&lab.root, &ns, name, &hit, &args).await
}
