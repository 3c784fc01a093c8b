//! roamd: the roam daemon, one per host.
//!
//! It owns the host's state (an embedded redb store), its identity key, the VMs that run
//! here (QEMU processes, their NBD exports, their guest-agent links) and the migrations
//! that leave or reach this host. It serves the local control API (HTTP/JSON on a unix
//! socket, for the `roam` CLI) and the peer API (the QUIC channel, for other roamd).
//!
//! ```text
//!   roam CLI ──unix/HTTP──▶ control (roam-control) ──▶ Daemon ──▶ runtime: QEMU + NBD + agent
//!   peer roamd ──QUIC──▶ peer.rs ──▶ migration::dest        │
//!                                   migration::source ◀─────┘
//! ```
//!
//! `anyhow` is used here, at the binary's edge only; the modules use `error::Error`.

mod config;
mod daemon;
mod error;
mod esp_forward;
mod fault;
mod migration;
mod net;
mod peer;
mod replication;
mod runtime;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "roamd", version, about = "roam host daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this host's state directory, identity key and configuration.
    Init {
        /// State directory (created, mode 0700).
        #[arg(long, env = "ROAM_STATE", default_value = "/var/lib/roam")]
        state: PathBuf,
        /// This host's name as peers will know it.
        #[arg(long)]
        name: String,
        /// Address for the peer channel (UDP).
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
        /// Directory for sockets (default STATE/run).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon.
    Run {
        #[arg(long, env = "ROAM_STATE", default_value = "/var/lib/roam")]
        state: PathBuf,
        /// Control socket (default RUN/roamd.sock).
        #[arg(long, env = "ROAM_SOCKET")]
        socket: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init {
            state,
            name,
            listen,
            run_dir,
            json,
        } => {
            let out = daemon::init(&state, &name, listen, run_dir)
                .with_context(|| format!("roamd init --state {}", state.display()))?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("host {} initialised in {}", out.name, out.state);
                println!("listen {}", out.listen);
                println!("key    {}", out.key);
            }
            Ok(())
        }
        Cmd::Run { state, socket } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start tokio runtime")?;
            rt.block_on(daemon::run(state, socket))
        }
    }
}
