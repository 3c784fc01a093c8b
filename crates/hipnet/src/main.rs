//! `roam-hip`: run a HIP endpoint, make an identity, talk to a running
//! endpoint, or measure the data plane.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use roam_hip::wire::params::reg_lifetime_value;
use roam_hipnet::config::{keygen, load_identity};
use roam_hipnet::{Endpoint, EndpointConfig, PeerSpec};

#[derive(Parser)]
#[command(
    name = "roam-hip",
    about = "HIP endpoint with user-space ESP over UDP on a TUN device"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start; the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run an endpoint until stopped (SIGINT/SIGTERM or `ctl stop`).
    Run {
        #[arg(long)]
        identity: PathBuf,
        /// UDP address for HIP and ESP (RFC 5770).
        #[arg(long, default_value = "0.0.0.0:10500")]
        listen: SocketAddr,
        #[arg(long, default_value = "hip0")]
        tun: String,
        /// No TUN device (a pure rendezvous server carries no data).
        #[arg(long)]
        no_tun: bool,
        /// Offer rendezvous (RFC 8004) to hosts that register with us.
        #[arg(long)]
        serve_rvs: bool,
        /// Register with this rendezvous server: HIT@ADDR:PORT.
        #[arg(long)]
        register: Option<PeerSpec>,
        /// Registration lifetime to ask for, seconds (renewed at half of
        /// what the server grants; after a server restart, registered again
        /// in a new base exchange once the grant lapses).
        #[arg(long, default_value_t = 4096)]
        register_lifetime: u64,
        /// Our LSI (198.19.x.y); derived from the HIT when absent.
        #[arg(long)]
        lsi: Option<Ipv4Addr>,
        /// HIT@ADDR:PORT[/LSI], or HIT[/LSI] to reach it through --rvs.
        #[arg(long)]
        peer: Vec<PeerSpec>,
        /// Rendezvous server (ADDR:PORT) for peers without an address.
        #[arg(long)]
        rvs: Option<SocketAddr>,
        /// Control socket for `roam-hip ctl`.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Start with associations exported by `ctl export` (a hex file).
        #[arg(long)]
        import: Option<PathBuf>,
        #[arg(long, default_value_t = 1400)]
        mtu: u16,
    },
    /// Run a rendezvous server (RFC 8004): hosts register their HIT with it
    /// (RFC 8003, in the base exchange, renewed or cancelled in UPDATE) and
    /// keep it told of their locator with UPDATE; an I1 for a registered HIT
    /// is relayed to that locator until its registration expires.
    /// Carries no data: no TUN device, no LSIs.
    Rvs {
        #[arg(long)]
        identity: PathBuf,
        /// Shortest registration lifetime granted, seconds.
        #[arg(long, default_value_t = 16)]
        min_lifetime: u64,
        /// Longest registration lifetime granted, seconds.
        #[arg(long, default_value_t = 4096)]
        max_lifetime: u64,
        /// UDP address for HIP (RFC 5770); must be one peers can reach.
        #[arg(long, default_value = "0.0.0.0:10500")]
        listen: SocketAddr,
        /// Control socket for `roam-hip ctl` (`status` lists registered hosts).
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Write a new identity to FILE and print its HIT.
    Keygen { file: PathBuf },
    /// Print the HIT and default LSI of an identity file.
    Show { file: PathBuf },
    /// Send a request to a running endpoint: `locator ADDR`, `stats`,
    /// `status`, `export` (stop and print the carried state, hex),
    /// `unregister` (cancel the rendezvous registration), `stop`.
    Ctl {
        #[arg(long)]
        control: PathBuf,
        #[arg(required = true)]
        request: Vec<String>,
    },
    /// Measure user-space ESP against plain UDP on loopback, and the base
    /// exchange latency.
    Bench {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Keygen { file } => {
            let id = keygen(&file).with_context(|| format!("keygen {}", file.display()))?;
            println!("{}", id.hit());
        }
        Cmd::Show { file } => {
            let id = load_identity(&file)?;
            println!(
                "hit {}\nlsi {}",
                id.hit(),
                roam_hipnet::config::default_lsi(&id.hit())
            );
        }
        Cmd::Ctl { control, request } => {
            let reply = roam_hipnet::control::request(&control, &request.join(" "))
                .with_context(|| format!("control socket {}", control.display()))?;
            print!("{reply}");
            if reply.starts_with("error") {
                bail!("request failed");
            }
        }
        Cmd::Bench { seconds, rounds } => {
            let r = roam_hipnet::bench::run(seconds, rounds.max(1))?;
            print!("{r}");
        }
        Cmd::Rvs {
            identity,
            min_lifetime,
            max_lifetime,
            listen,
            control,
        } => {
            let id = load_identity(&identity)?;
            let mut cfg = EndpointConfig::new(id, listen, "");
            cfg.tun_name = None;
            // RFC 8003 encoding (REG_INFO); values round up to the next step.
            cfg.hip.service_lifetime = (
                reg_lifetime_value(Duration::from_secs(min_lifetime)),
                reg_lifetime_value(Duration::from_secs(max_lifetime.max(min_lifetime))),
            );
            cfg.serve_rvs = true;
            cfg.control = control;
            run(cfg)?;
        }
        Cmd::Run {
            identity,
            listen,
            tun,
            no_tun,
            serve_rvs,
            register,
            register_lifetime,
            lsi,
            peer,
            rvs,
            control,
            import,
            mtu,
        } => {
            let id = load_identity(&identity)?;
            if rvs.is_some() && listen.port() != roam_hip::wire::udp::HIP_UDP_PORT {
                // A relayed I1's FROM has no port: Responders answer at 10500.
                eprintln!(
                    "roam-hip: warning: --rvs with --listen port {} (not 10500): peers \
                     reached through the rendezvous server answer at port 10500",
                    listen.port()
                );
            }
            let mut cfg = EndpointConfig::new(id, listen, &tun);
            cfg.lsi = lsi;
            cfg.peers = peer;
            cfg.rvs = rvs;
            cfg.control = control;
            cfg.mtu = mtu;
            cfg.serve_rvs = serve_rvs;
            cfg.register_with = register;
            cfg.register_lifetime = Duration::from_secs(register_lifetime);
            if let Some(f) = import {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                cfg.import = Some(hex::decode(text.trim()).context("state file is not hex")?);
            }
            if no_tun {
                cfg.tun_name = None;
            }
            run(cfg)?;
        }
    }
    Ok(())
}

fn run(cfg: EndpointConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let control = cfg.control.clone();
        let (handle, mut task) = Endpoint::start(cfg).await?;
        println!("hit {} lsi {}", handle.hit, handle.lsi);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = &mut task => {}
            _ = tokio::signal::ctrl_c() => handle.stop().await,
            _ = term.recv() => handle.stop().await,
        }
        if !task.is_finished() {
            let _ = task.await;
        }
        if let Some(p) = control {
            let _ = std::fs::remove_file(p);
        }
        eprint!("{}", handle.stats.render());
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
