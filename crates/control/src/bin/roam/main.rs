//! `roam`: the user's command line, a thin client of roamd's control socket.
//!
//! Exit codes: 0 success, 1 error (daemon unreachable, request refused), 2 bad usage,
//! 3 migration aborted (the VM still runs at the source).

mod output;
mod progress;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use roam_control::units::parse_size;
use roam_control::{Client, ClientError, MigrateRequest, Outcome, PeerAdd, VmCreate};

#[derive(Debug, Parser)]
#[command(name = "roam", version, about = "Move running VMs between hosts")]
struct Cli {
    /// roamd's control socket.
    #[arg(long, global = true, env = "ROAM_SOCKET", default_value = roam_control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON on stdout instead of tables and summaries.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// This host: set it up, show who it is.
    #[command(subcommand)]
    Host(HostCmd),
    /// Trusted peer hosts.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Virtual machines on this host.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Move a running VM to a peer, live.
    Migrate(MigrateArgs),
    /// Background replicas of a VM's disk on peer hosts.
    #[command(subcommand)]
    Replica(ReplicaCmd),
}

#[derive(Debug, Subcommand)]
enum ReplicaCmd {
    /// Keep a replica of VM's disk on peer HOST, updated in the background.
    Add { vm: String, host: String },
    /// Stop replicating VM to HOST and delete the replica there.
    Remove { vm: String, host: String },
    /// Show replicas, their state and lag.
    List { vm: Option<String> },
}

#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Create this host's identity and state (runs `roamd init ARGS...`).
    Init {
        /// Passed to `roamd init` unchanged (see `roamd init --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show name, key, listen address, accelerator, counts.
    Info,
    /// The host's event log: migrations, replicas, stale copies, split brains, forced
    /// primaries (one JSON object per line).
    Log,
}

#[derive(Debug, Subcommand)]
enum PeerCmd {
    /// Trust a host: its name here, its channel address, its key (from its `roam host info`).
    Add {
        name: String,
        addr: String,
        key: String,
    },
    /// List trusted peers.
    List,
    /// Stop trusting a peer.
    Remove { name: String },
    /// Cap what this host sends to PEER (background replication; migrations unless they
    /// set --bandwidth-limit), in Mbit/s; 0 or "none" removes the cap.
    SetLimit { name: String, mbit: String },
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Define a VM and make its disk.
    Create {
        name: String,
        /// Guest RAM, e.g. 512M or 1G (whole MiB).
        #[arg(long, value_name = "SIZE")]
        memory: String,
        /// Disk size, e.g. 8G.
        #[arg(long, value_name = "SIZE")]
        disk: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Disk image (raw or qcow2) to copy into the new disk.
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// A HIP correspondent the VM's endpoint knows from the start (repeatable).
        #[arg(long = "hip-peer", value_name = "HIT@ADDR:PORT")]
        hip_peers: Vec<String>,
        /// A HIP rendezvous server to register the VM's HIT with (RFC 8004).
        #[arg(long, value_name = "HIT@ADDR:PORT")]
        rvs: Option<String>,
    },
    /// Add a HIP correspondent to an existing VM (a running VM learns it at once).
    PeerAdd {
        name: String,
        /// `HIT@ADDR:PORT`, or `HIT` to reach it through the VM's rendezvous server.
        #[arg(value_name = "HIT@ADDR:PORT")]
        peer: String,
    },
    /// Start a VM.
    Start { name: String },
    /// Stop a VM.
    Stop { name: String },
    /// Show one VM.
    Show { name: String },
    /// Delete a stopped VM and its disk.
    Delete { name: String },
    /// List VMs.
    List,
    /// Make this host's copy the VM's only primary, above every generation known:
    /// other copies become stale (kept, never merged). Logged. Resolves a split brain.
    ForcePrimary {
        name: String,
        /// Do it without asking.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// The VM to move.
    vm: String,
    /// Destination peer.
    #[arg(long, value_name = "PEER")]
    to: String,
    /// Allow post-copy when pre-copy does not converge.
    #[arg(long)]
    postcopy: bool,
    /// Cap the migration's bandwidth (Mbit/s).
    #[arg(long, value_name = "MBIT")]
    bandwidth_limit: Option<u32>,
}

/// Errors `main` reports; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Other(String),
}

/// What a command produced, for the exit code.
enum Done {
    Ok,
    Aborted,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roam: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::Aborted) => ExitCode::from(3),
        Err(e) => {
            eprintln!("roam: {e}");
            ExitCode::from(match e {
                CliError::Usage(_) => 2,
                _ => 1,
            })
        }
    }
}

async fn run(cli: Cli) -> Result<Done, CliError> {
    let client = Client::new(&cli.socket);
    let json = cli.json;
    match cli.cmd {
        Cmd::Host(HostCmd::Init { args }) => exec_roamd_init(&cli.socket, &args),
        Cmd::Host(HostCmd::Info) => {
            let info = client.host_info().await?;
            output::emit(json, &info, || output::host_info(&info))
        }
        Cmd::Host(HostCmd::Log) => {
            let events = client.host_log().await?;
            output::emit(json, &events, || {
                events.iter().map(|e| format!("{e}\n")).collect::<String>()
            })
        }
        Cmd::Peer(PeerCmd::Add { name, addr, key }) => {
            let p = client.peer_add(&PeerAdd { name, addr, key }).await?;
            output::emit(json, &p, || {
                format!("added peer {} at {}\n", p.name, p.addr)
            })
        }
        Cmd::Peer(PeerCmd::List) => {
            let peers = client.peer_list().await?;
            output::emit(json, &peers, || output::peer_table(&peers))
        }
        Cmd::Peer(PeerCmd::SetLimit { name, mbit }) => {
            let mbit = match mbit.trim().to_ascii_lowercase().as_str() {
                "none" | "0" => None,
                m => Some(m.parse::<u32>().map_err(|_| {
                    CliError::Usage(format!(
                        "bad MBIT '{mbit}': expected a whole number of Mbit/s, 0 or none"
                    ))
                })?),
            };
            let p = client.peer_set_limit(&name, mbit).await?;
            output::emit(json, &p, || match p.rate_limit_mbit {
                Some(m) => format!("peer {} limited to {m} Mbit/s\n", p.name),
                None => format!("peer {} has no rate limit\n", p.name),
            })
        }
        Cmd::Peer(PeerCmd::Remove { name }) => {
            client.peer_remove(&name).await?;
            output::emit(json, &output::ok(), || format!("removed peer {name}\n"))
        }
        Cmd::Vm(cmd) => vm(&client, json, cmd).await,
        Cmd::Migrate(args) => migrate(&client, json, args).await,
        Cmd::Replica(ReplicaCmd::Add { vm, host }) => {
            let r = client.replica_add(&vm, &host).await?;
            output::emit(json, &r, || {
                format!("replicating {} to {} ({})\n", r.vm, r.host, r.state)
            })
        }
        Cmd::Replica(ReplicaCmd::Remove { vm, host }) => {
            client.replica_remove(&vm, &host).await?;
            output::emit(json, &output::ok(), || {
                format!("removed the replica of {vm} on {host}\n")
            })
        }
        Cmd::Replica(ReplicaCmd::List { vm }) => {
            let list = client.replica_list(vm.as_deref()).await?;
            output::emit(json, &list, || output::replica_table(&list))
        }
    }
}

async fn vm(client: &Client, json: bool, cmd: VmCmd) -> Result<Done, CliError> {
    match cmd {
        VmCmd::Create {
            name,
            memory,
            disk,
            vcpus,
            image,
            hip_peers,
            rvs,
        } => {
            let memory_mib = memory_mib(&memory)?;
            let disk_bytes = parse_size(&disk)
                .ok()
                .filter(|&b| b > 0)
                .ok_or_else(|| size_usage("--disk", &disk))?;
            let disk_image =
                match image {
                    Some(p) => Some(std::path::absolute(&p).map_err(|e| {
                        CliError::Usage(format!("bad --image '{}': {e}", p.display()))
                    })?),
                    None => None,
                };
            let req = VmCreate {
                name,
                memory_mib,
                disk_bytes,
                vcpus,
                disk_image,
                hip_peers,
                hip_rvs: rvs,
            };
            let v = client.vm_create(&req).await?;
            output::emit(json, &v, || output::vm_created(&v))
        }
        VmCmd::PeerAdd { name, peer } => {
            let v = client.vm_peer_add(&name, &peer).await?;
            output::emit(json, &v, || format!("{name}: added HIP peer {peer}\n"))
        }
        VmCmd::Start { name } => {
            let v = client.vm_start(&name).await?;
            output::emit(json, &v, || output::vm_line(&v))
        }
        VmCmd::Stop { name } => {
            let v = client.vm_stop(&name).await?;
            output::emit(json, &v, || output::vm_line(&v))
        }
        VmCmd::Show { name } => {
            let v = client.vm_show(&name).await?;
            output::emit(json, &v, || output::vm_details(&v))
        }
        VmCmd::Delete { name } => {
            client.vm_delete(&name).await?;
            output::emit(json, &output::ok(), || format!("deleted vm {name}\n"))
        }
        VmCmd::List => {
            let vms = client.vm_list().await?;
            output::emit(json, &vms, || output::vm_table(&vms))
        }
        VmCmd::ForcePrimary { name, yes } => {
            if !yes && !confirm(&name)? {
                return Err(CliError::Usage(
                    "not confirmed (pass --yes to force without asking)".into(),
                ));
            }
            let who = format!(
                "{}@{} (uid {})",
                std::env::var("SUDO_USER")
                    .or_else(|_| std::env::var("USER"))
                    .unwrap_or_else(|_| "?".into()),
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "?".into()),
                std::fs::metadata("/proc/self")
                    .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                    .unwrap_or(u32::MAX),
            );
            let req = roam_control::api::ForcePrimary { by: Some(who) };
            let v = client.vm_force_primary(&name, &req).await?;
            output::emit(json, &v, || {
                format!(
                    "{} is primary here at generation {}; other copies are stale\n",
                    v.name, v.generation
                )
            })
        }
    }
}

/// Ask on the terminal; refuse when there is none to ask on.
fn confirm(vm: &str) -> Result<bool, CliError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "force-primary needs --yes when not run from a terminal".into(),
        ));
    }
    eprint!(
        "Make this host's copy of {vm} its only primary? Copies elsewhere become stale \
         (kept, not merged). Type 'yes': "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Other(format!("reading the answer: {e}")))?;
    Ok(line.trim() == "yes")
}

fn size_usage(flag: &str, value: &str) -> CliError {
    CliError::Usage(format!(
        "bad {flag} '{value}': expected a size such as 512M or 2G"
    ))
}

fn memory_mib(s: &str) -> Result<u64, CliError> {
    let bytes = parse_size(s).map_err(|_| size_usage("--memory", s))?;
    if bytes == 0 || bytes % (1 << 20) != 0 {
        return Err(CliError::Usage(format!(
            "bad --memory '{s}': must be a whole number of MiB, such as 512M or 2G"
        )));
    }
    Ok(bytes >> 20)
}

async fn migrate(client: &Client, json: bool, args: MigrateArgs) -> Result<Done, CliError> {
    let req = MigrateRequest {
        vm: args.vm,
        to: args.to,
        postcopy: args.postcopy,
        bandwidth_limit_mbit: args.bandwidth_limit,
    };
    let mut bar = (!json).then(|| progress::Bar::new(&req.vm, &req.to));
    let result = client
        .migrate(&req, |p| {
            if let Some(bar) = bar.as_mut() {
                bar.update(p);
            }
        })
        .await;
    if let Some(bar) = bar.take() {
        bar.finish();
    }
    let result = result?;
    output::emit(json, &result, || output::migration_summary(&result))?;
    Ok(match result.outcome {
        Outcome::Completed => Done::Ok,
        Outcome::Aborted => Done::Aborted,
    })
}

/// Replaces this process with `roamd init ARGS`: the daemon owns the state directory.
fn exec_roamd_init(socket: &std::path::Path, args: &[String]) -> Result<Done, CliError> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("roamd")))
        .filter(|p| p.is_file());
    let program = beside.clone().unwrap_or_else(|| PathBuf::from("roamd"));
    let err = std::process::Command::new(&program)
        .arg("init")
        .args(args)
        .env("ROAM_SOCKET", socket)
        .exec();
    Err(CliError::Other(match beside {
        Some(p) => format!("cannot run {}: {err}", p.display()),
        None => format!("cannot run roamd (not next to roam, and from PATH: {err})"),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(memory_mib("1G").unwrap(), 1024);
        assert_eq!(memory_mib("512M").unwrap(), 512);
        let e = memory_mib("1X").unwrap_err().to_string();
        assert_eq!(e, "bad --memory '1X': expected a size such as 512M or 2G");
        assert!(memory_mib("512")
            .unwrap_err()
            .to_string()
            .contains("whole number of MiB"));
        assert!(memory_mib("0").is_err());
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from([
            "roam",
            "--json",
            "migrate",
            "desk",
            "--to",
            "home",
            "--postcopy",
            "--bandwidth-limit",
            "50",
        ])
        .unwrap();
        assert!(c.json);
        match c.cmd {
            Cmd::Migrate(a) => {
                assert_eq!(
                    (a.vm.as_str(), a.to.as_str(), a.postcopy, a.bandwidth_limit),
                    ("desk", "home", true, Some(50))
                );
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["roam", "host", "init", "--name", "office", "--listen", "x"])
            .unwrap();
        match c.cmd {
            Cmd::Host(HostCmd::Init { args }) => {
                assert_eq!(args, ["--name", "office", "--listen", "x"])
            }
            other => panic!("{other:?}"),
        }
    }
}
