//! `roam-wan`: run the WAN emulator, control a running one, or benchmark it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use roam_wan::control::{self, LinkUpdate, Request};
use roam_wan::netns::{unique_name, NetNs};
use roam_wan::{probe, Ipv4Cidr, LinkParams, PortConfig, ThreadPriority, Wan, WanConfig};

#[derive(Parser)]
#[command(
    name = "roam-wan",
    about = "User-space WAN emulator between network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach namespaces and forward between them until stopped.
    Run(RunArgs),
    /// Talk to a running emulator.
    Ctl {
        /// Control socket of `roam-wan run`.
        #[arg(long)]
        control: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
    /// Create two namespaces, emulate a link between them and measure RTT and TCP throughput.
    Bench {
        #[command(flatten)]
        link: LinkArgs,
        /// Seconds of TCP measurement (after 1 s of warm-up).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// MTU of the TUN devices.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Thread scheduling: normal, nice:N, rt:N (SCHED_FIFO), default (nice -10).
        #[arg(long, default_value = "default")]
        priority: String,
    },
}

#[derive(Args, Clone)]
struct LinkArgs {
    /// Bottleneck rate in Mbit/s of IP packets, each direction (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    bandwidth_mbit: f64,
    /// Round-trip delay in ms (each direction adds half).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// One-way delay varies within ± this many ms.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Random loss in percent, each direction.
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    /// Queue in bytes (default: the bandwidth-delay product).
    #[arg(long)]
    queue_bytes: Option<u64>,
    /// Let jitter reorder packets.
    #[arg(long)]
    allow_reorder: bool,
}

impl LinkArgs {
    fn params(&self) -> LinkParams {
        LinkParams {
            bandwidth_mbit: self.bandwidth_mbit,
            rtt_ms: self.rtt_ms,
            jitter_ms: self.jitter_ms,
            loss_pct: self.loss_pct,
            queue_bytes: self.queue_bytes,
            allow_reorder: self.allow_reorder,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// NAME=NETNS,ADDR/PREFIX, e.g. office=ns-office,198.18.1.2/24 (repeat per port).
    #[arg(long = "port", required = true)]
    ports: Vec<String>,
    #[command(flatten)]
    link: LinkArgs,
    /// MTU of the TUN devices.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Seed of the loss and jitter generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Control socket path.
    #[arg(long)]
    control: PathBuf,
    /// Thread scheduling: normal, nice:N, rt:N (SCHED_FIFO), default (nice -10).
    #[arg(long, default_value = "default")]
    priority: String,
}

#[derive(Subcommand)]
enum CtlOp {
    /// Start (on) or end (off) an outage.
    Outage {
        /// on | off
        state: String,
        /// Only between these two ports: A,B
        #[arg(long)]
        between: Option<String>,
    },
    /// Change link parameters (unset options keep their value).
    Set {
        #[arg(long)]
        bandwidth_mbit: Option<f64>,
        #[arg(long)]
        rtt_ms: Option<f64>,
        #[arg(long)]
        jitter_ms: Option<f64>,
        #[arg(long)]
        loss_pct: Option<f64>,
        /// Bytes; 0 = bandwidth-delay product.
        #[arg(long)]
        queue_bytes: Option<u64>,
        #[arg(long)]
        allow_reorder: Option<bool>,
        /// Only between these two ports: A,B
        #[arg(long)]
        between: Option<String>,
    },
    /// Print counters.
    Stats {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the emulator.
    Shutdown,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn parse_port(s: &str) -> Result<PortConfig> {
    let (name, rest) = s
        .split_once('=')
        .context("--port wants NAME=NETNS,ADDR/PREFIX")?;
    let (ns, cidr) = rest
        .split_once(',')
        .context("--port wants NAME=NETNS,ADDR/PREFIX")?;
    let cidr: Ipv4Cidr = cidr.parse()?;
    Ok(PortConfig::new(name, ns, cidr))
}

fn parse_priority(s: &str) -> Result<ThreadPriority> {
    Ok(match s.split_once(':') {
        None if s == "normal" => ThreadPriority::Normal,
        None if s == "default" => ThreadPriority::Default,
        Some(("nice", n)) => ThreadPriority::Nice(n.parse()?),
        Some(("rt", n)) => ThreadPriority::Realtime(n.parse()?),
        _ => bail!("--priority wants normal, default, nice:N or rt:N"),
    })
}

fn parse_pair(s: Option<String>) -> Result<Option<(String, String)>> {
    s.map(|s| match s.split_once(',') {
        Some((a, b)) => Ok((a.to_string(), b.to_string())),
        None => bail!("--between wants A,B"),
    })
    .transpose()
}

fn run(args: RunArgs) -> Result<()> {
    let ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    let mut cfg = WanConfig::new(ports, args.link.params());
    cfg.mtu = args.mtu;
    cfg.seed = args.seed;
    cfg.priority = parse_priority(&args.priority)?;
    let handle = Wan::start(cfg)?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!(
        "roam-wan: running, control socket {}",
        args.control.display()
    );
    control::serve(&handle, &args.control, &STOP)?;
    handle.shutdown();
    Ok(())
}

fn ctl(path: PathBuf, op: CtlOp) -> Result<()> {
    let (req, json) = match op {
        CtlOp::Outage { state, between } => {
            let on = match state.as_str() {
                "on" => true,
                "off" => false,
                _ => bail!("outage wants on|off"),
            };
            (
                Request::Outage {
                    on,
                    between: parse_pair(between)?,
                },
                false,
            )
        }
        CtlOp::Set {
            bandwidth_mbit,
            rtt_ms,
            jitter_ms,
            loss_pct,
            queue_bytes,
            allow_reorder,
            between,
        } => {
            let update = LinkUpdate {
                bandwidth_mbit,
                rtt_ms,
                jitter_ms,
                loss_pct,
                queue_bytes,
                allow_reorder,
            };
            (
                Request::Set {
                    update,
                    between: parse_pair(between)?,
                },
                false,
            )
        }
        CtlOp::Stats { json } => (Request::Stats, json),
        CtlOp::Shutdown => (Request::Shutdown, false),
    };
    let resp = control::call(&path, &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(());
    }
    if let Some(l) = resp.link {
        println!(
            "link: {} Mbit/s, rtt {} ms, jitter {} ms, loss {} %, queue {} B",
            l.bandwidth_mbit,
            l.rtt_ms,
            l.jitter_ms,
            l.loss_pct,
            l.effective_queue_bytes()
        );
    }
    if let Some(s) = resp.stats {
        for p in &s.ports {
            println!(
                "port {:>10}: rx {} pkts {} B, no-route {}, not-ipv4 {}",
                p.name, p.rx_packets, p.rx_bytes, p.drop_no_route, p.drop_not_ipv4
            );
        }
        for l in &s.links {
            println!(
                "{:>10} -> {:<10}: fwd {} pkts {} B, drop loss {} queue {} outage {} tx-error {}",
                l.from,
                l.to,
                l.fwd_packets,
                l.fwd_bytes,
                l.drop_loss,
                l.drop_queue,
                l.drop_outage,
                l.drop_tx_error
            );
        }
    }
    Ok(())
}

fn bench(link: LinkParams, seconds: f64, mtu: u32, priority: ThreadPriority) -> Result<()> {
    let a = NetNs::create(&unique_name("wanbench-a"))?;
    let b = NetNs::create(&unique_name("wanbench-b"))?;
    let ports = vec![
        PortConfig::new("a", a.name(), "198.18.1.2/24".parse()?),
        PortConfig::new("b", b.name(), "198.18.2.2/24".parse()?),
    ];
    let mut cfg = WanConfig::new(ports, link);
    cfg.mtu = mtu;
    cfg.priority = priority;
    let handle = Wan::start(cfg)?;
    let b_ip = Ipv4Addr::new(198, 18, 2, 2);
    let echo = probe::UdpEcho::start(b.name(), SocketAddrV4::new(b_ip, 7))?;
    let rtt = probe::udp_rtt(
        a.name(),
        SocketAddrV4::new(b_ip, 7),
        50,
        Duration::from_millis(10),
    )?;
    drop(echo);
    let pct = |q: f64| {
        rtt.samples
            .get(((rtt.samples.len() as f64 - 1.0) * q) as usize)
            .copied()
    };
    println!(
        "rtt: median {:?} p90 {:?} max {:?} ({} of {} answered), setting {} ms",
        rtt.median(),
        pct(0.9),
        pct(1.0),
        rtt.samples.len(),
        rtt.sent,
        link.rtt_ms
    );
    let before = handle.stats();
    let cpu0 = cpu_time();
    let t = probe::tcp_throughput(
        a.name(),
        b.name(),
        SocketAddrV4::new(b_ip, 5001),
        Duration::from_secs(1),
        Duration::from_secs_f64(seconds),
    )?;
    let cpu = cpu_time() - cpu0;
    let after = handle.stats();
    let fwd = |s: &roam_wan::WanStats| s.link("a", "b").map(|l| l.fwd_bytes).unwrap_or(0);
    println!(
        "tcp: goodput {:.1} Mbit/s over {seconds} s, setting {} Mbit/s; emulator threads used {:.0} % of a core",
        t.mbit(),
        link.bandwidth_mbit,
        cpu * 100.0 / (seconds + 1.0)
    );
    let l = after.link("a", "b").cloned().unwrap_or_default();
    println!(
        "a->b: {} B forwarded during TCP run, drops: loss {} queue {} tx-error {}",
        fwd(&after) - fwd(&before),
        l.drop_loss,
        l.drop_queue,
        l.drop_tx_error
    );
    handle.shutdown();
    Ok(())
}

/// User+system CPU seconds of this process's emulator threads (`wan-rx-*`, `wan-tx-*`),
/// from /proc (clock ticks), excluding the probe endpoints' threads.
fn cpu_time() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with("wan-") {
            continue;
        }
        // Fields after the command: state is field 3; utime and stime are fields 14 and 15.
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        ticks += rest
            .get(11)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
        ticks += rest
            .get(12)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ticks as f64 / hz
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
        Cmd::Ctl { control, op } => ctl(control, op),
        Cmd::Bench {
            link,
            seconds,
            mtu,
            priority,
        } => bench(link.params(), seconds, mtu, parse_priority(&priority)?),
    }
}
