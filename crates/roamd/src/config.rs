//! The host's configuration: written once by `roamd init`, read at every start.
//!
//! ```text
//!  STATE/                     (mode 0700)
//!    config.json              this file's struct, versioned
//!    identity.key             Ed25519 host key (roam-channel format, 0600)
//!    state.redb               peers, VMs, event log (see state.rs)
//!    vms/NAME/disk.raw        VM disks (sparse)
//!    incoming/NAME/           a disk being received; removed if the migration fails
//!  RUN/                       sockets (short paths: unix sockets are limited to 107 bytes)
//!    roamd.sock               control API (0600)
//!    nbd.sock                 NBD server for all local VMs
//!    vms/NAME/                QEMU's QMP, agent, serial log, migration sockets
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const CONFIG_VERSION: u32 = 1;
/// Where scripts/setup.sh publishes the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/roam/guest/current";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostConfig {
    pub version: u32,
    pub name: String,
    pub listen: SocketAddr,
    /// Directory for sockets; defaults to STATE/run.
    pub run_dir: PathBuf,
    /// Guest kernel and initramfs for new VMs.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl HostConfig {
    pub fn new(name: &str, listen: SocketAddr, state: &Path, run_dir: Option<PathBuf>) -> Self {
        let guest = PathBuf::from(
            std::env::var("ROAM_GUEST_DIR").unwrap_or_else(|_| DEFAULT_GUEST_DIR.into()),
        );
        HostConfig {
            version: CONFIG_VERSION,
            name: name.to_string(),
            listen,
            run_dir: run_dir.unwrap_or_else(|| state.join("run")),
            kernel: guest.join("vmlinuz"),
            initrd: guest.join("initramfs.img"),
        }
    }

    pub fn path(state: &Path) -> PathBuf {
        state.join("config.json")
    }

    pub fn load(state: &Path) -> Result<HostConfig> {
        let p = Self::path(state);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            Error::io(
                format!(
                    "read {} (was `roam host init --state {}` run?)",
                    p.display(),
                    state.display()
                ),
                e,
            )
        })?;
        let cfg: HostConfig = serde_json::from_str(&text)
            .map_err(|e| Error::State(format!("{}: {e}", p.display())))?;
        if cfg.version > CONFIG_VERSION {
            return Err(Error::State(format!(
                "{}: config version {} is newer than this roamd",
                p.display(),
                cfg.version
            )));
        }
        Ok(cfg)
    }

    pub fn save(&self, state: &Path) -> Result<()> {
        let p = Self::path(state);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::State(format!("encode config: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(format!("write {}", p.display()), e))
    }
}

/// Paths derived from the state and run directories.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state: PathBuf,
    pub run: PathBuf,
}

impl Paths {
    pub fn identity(&self) -> PathBuf {
        self.state.join("identity.key")
    }
    pub fn db(&self) -> PathBuf {
        self.state.join("state.redb")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run.join("roamd.sock")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.run.join("nbd.sock")
    }
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state.join("vms").join(vm)
    }
    pub fn vm_disk(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("disk.raw")
    }
    pub fn incoming_dir(&self, vm: &str) -> PathBuf {
        self.state.join("incoming").join(vm)
    }
    pub fn vm_run(&self, vm: &str) -> PathBuf {
        self.run.join("vms").join(vm)
    }
}
