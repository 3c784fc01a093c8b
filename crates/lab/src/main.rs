//! `roam-lab demo | bench`: the main job and the benchmark, on one machine.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use roam_control::api::{MigrationResult, Outcome, Progress, Workload};
use roam_lab::{Lab, LabConfig};
use roam_wan::LinkParams;

#[derive(Parser)]
#[command(
    name = "roam-lab",
    about = "roam's test bed: two hosts, an emulated WAN, a live migration"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct LinkArgs {
    /// WAN bandwidth, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    bandwidth_mbit: f64,
    /// WAN round-trip time, ms.
    #[arg(long, default_value_t = 40.0)]
    rtt_ms: f64,
    /// WAN packet loss, percent.
    #[arg(long, default_value_t = 0.1)]
    loss_pct: f64,
    /// WAN delay jitter, ms.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
}

#[derive(clap::Args, Clone)]
struct VmArgs {
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Guest disk size, MiB.
    #[arg(long, default_value_t = 2048)]
    disk_mib: u64,
    /// Data in the guest's filesystem, MiB.
    #[arg(long, default_value_t = 256)]
    data_mib: u64,
    /// Guest memory dirtied per second by the workload, MiB.
    #[arg(long, default_value_t = 32)]
    dirty_mib_s: u32,
    /// Durable, acknowledged disk writes per second by the workload.
    #[arg(long, default_value_t = 50)]
    writes_per_s: u32,
    /// Seconds the workload runs before the migration starts.
    #[arg(long, default_value_t = 3)]
    warmup_s: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a busy VM on "office" and live-migrate it to "home".
    Demo {
        #[command(flatten)]
        link: LinkArgs,
        #[command(flatten)]
        vm: VmArgs,
        /// Print exactly one JSON object (the migration result) on stdout.
        #[arg(long)]
        json: bool,
        /// Keep the lab directory (logs, state) afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Start the two hosts with a VM on office and keep them up until Ctrl-C, printing
    /// how to reach them with the `roam` CLI (for trying things by hand).
    Up {
        #[command(flatten)]
        link: LinkArgs,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// roam's figures beside their baselines, in one run: NBD against qemu-nbd, and the
    /// demo migration at 100 Mbit/s / 40 ms and at 1 Gbit/s / 10 ms.
    Bench {
        #[command(flatten)]
        vm: VmArgs,
        /// Fewer NBD rounds (for a quick look, not for the record).
        #[arg(long)]
        quick: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Run only these parts (comma-separated): nbd, migration, postcopy,
        /// net, storage (with --quick, the storage part's small-size smoke test).
        /// Default: all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<BenchPart>,
    },
    /// Only the HIP base-exchange figures: direct and through a rendezvous server, beside
    /// the RTT measured in the same run.
    BenchHip {
        #[arg(long, default_value_t = 40.0)]
        rtt_ms: f64,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
}

/// The parts of `roam-lab bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    Nbd,
    Migration,
    Postcopy,
    Net,
    Storage,
}

fn link_params(l: &LinkArgs) -> LinkParams {
    LinkParams {
        bandwidth_mbit: l.bandwidth_mbit,
        rtt_ms: l.rtt_ms,
        loss_pct: l.loss_pct,
        jitter_ms: l.jitter_ms,
        ..LinkParams::default()
    }
}

fn lab_config(link: &LinkArgs, vm: &VmArgs, keep: bool) -> LabConfig {
    LabConfig {
        link: link_params(link),
        memory_mib: vm.memory_mib,
        disk_bytes: vm.disk_mib << 20,
        data_mib: vm.data_mib,
        workload: Workload {
            mem_dirty_mib_s: vm.dirty_mib_s,
            mem_working_set_mib: 64.min(vm.memory_mib as u32 / 4),
            disk_writes_per_s: vm.writes_per_s,
            ..Default::default()
        },
        home_state_limit_mib: None,
        keep: keep || std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo {
            link,
            vm,
            json,
            keep,
        } => {
            let cfg = lab_config(&link, &vm, keep);
            let result = run_demo(cfg, vm.warmup_s, !json).await?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                print_summary(&result);
            }
            if result.outcome != Outcome::Completed {
                std::process::exit(3);
            }
            Ok(())
        }
        Cmd::Up { link, vm } => {
            let cfg = lab_config(&link, &vm, true);
            let lab = Lab::start(cfg).await.context("start the lab")?;
            lab.create_vm("office", "desk").await?;
            lab.start_workload("office", "desk").await?;
            for h in &lab.hosts {
                println!(
                    "{:<7} {}  roam --socket {}",
                    h.name,
                    h.addr,
                    h.socket.display()
                );
            }
            println!("VM 'desk' runs on office. Ctrl-C stops everything.");
            tokio::signal::ctrl_c().await?;
            lab.shutdown().await;
            Ok(())
        }
        Cmd::BenchHip {
            rtt_ms,
            rounds,
            json,
        } => {
            let hip = roam_lab::hipbench::run(rtt_ms, rounds.max(1))?;
            if json {
                println!("{}", serde_json::to_string(&hip)?);
            } else {
                print!("{}", hip.render());
                for c in roam_lab::bench::hip_checks(&hip) {
                    println!(
                        "  [{}] {} {:.1}  target {}",
                        if c.met { "ok" } else { "MISS" },
                        c.name,
                        c.measured,
                        c.target
                    );
                }
            }
            Ok(())
        }
        Cmd::Bench {
            vm,
            quick,
            json,
            only,
        } => {
            let run = |p: BenchPart| only.is_empty() || only.contains(&p);
            let nbd = if run(BenchPart::Nbd) {
                eprintln!("roam-lab bench: NBD, roam against qemu-nbd");
                roam_lab::bench::nbd_bench(quick)?
            } else {
                serde_json::Value::Null
            };
            let mut migrations = Vec::new();
            let links: &[(&str, f64, f64, f64)] = if run(BenchPart::Migration) {
                &[
                    ("100 Mbit/s, 40 ms", 100.0, 40.0, 0.1),
                    ("1 Gbit/s, 10 ms", 1000.0, 10.0, 0.0),
                ]
            } else {
                &[]
            };
            for &(label, mbit, rtt, loss) in links {
                eprintln!("roam-lab bench: migration over {label}, {loss}% loss");
                let link = LinkArgs {
                    bandwidth_mbit: mbit,
                    rtt_ms: rtt,
                    loss_pct: loss,
                    jitter_ms: 0.0,
                };
                let cfg = lab_config(&link, &vm, false);
                migrations.push(roam_lab::bench::migration(label, cfg).await?);
            }
            let mut postcopy = Vec::new();
            if run(BenchPart::Postcopy) {
                let (label, mbit, rtt, loss) = ("100 Mbit/s, 40 ms", 100.0, 40.0, 0.0);
                eprintln!("roam-lab bench: post-copy migration over {label}, {loss}% loss");
                let link = LinkArgs {
                    bandwidth_mbit: mbit,
                    rtt_ms: rtt,
                    loss_pct: loss,
                    jitter_ms: 0.0,
                };
                let cfg = lab_config(&link, &vm, false);
                postcopy.push(roam_lab::bench::postcopy_migration(label, cfg).await?);
            }
            let net = if run(BenchPart::Net) {
                eprintln!("roam-lab bench: user-space ESP and base exchange on loopback");
                let esp =
                    tokio::task::spawn_blocking(move || roam_lab::bench_net::esp(quick)).await??;
                eprintln!("roam-lab bench: HIP handover of a live TCP stream, 100 Mbit/s, 40 ms");
                let handover =
                    roam_lab::bench_net::handover(roam_lab::bench_net::handover_config(false))
                        .await?;
                Some(roam_lab::bench_net::NetFigures { handover, esp })
            } else {
                None
            };
            let hip = if run(BenchPart::Net) {
                eprintln!("roam-lab bench: HIP base exchange at 40 ms RTT, direct and via an RVS");
                let rounds = if quick { 3 } else { 10 };
                Some(
                    tokio::task::spawn_blocking(move || roam_lab::hipbench::run(40.0, rounds))
                        .await??,
                )
            } else {
                None
            };
            let mut checks = roam_lab::bench::checks(&nbd, &migrations);
            checks.extend(roam_lab::bench::postcopy_checks(&postcopy));
            if let Some(n) = &net {
                checks.extend(roam_lab::bench_net::checks(n));
            }
            if let Some(h) = &hip {
                checks.extend(roam_lab::bench::hip_checks(h));
            }
            let storage = if run(BenchPart::Storage) {
                eprintln!(
                    "roam-lab bench: storage (dedup, replicas) against QEMU's copy-storage-all"
                );
                let sizes = if quick {
                    roam_lab::bench_storage::StorageSizes::quick()
                } else {
                    roam_lab::bench_storage::StorageSizes::full()
                };
                let storage_link = LinkParams {
                    bandwidth_mbit: 100.0,
                    rtt_ms: 40.0,
                    loss_pct: 0.0,
                    ..LinkParams::default()
                };
                let st = roam_lab::bench_storage::run(storage_link, sizes).await?;
                checks.extend(st.checks.iter().cloned());
                Some(st)
            } else {
                None
            };
            let report = roam_lab::bench::BenchReport {
                nbd,
                hip,
                migrations,
                postcopy,
                net,
                checks,
                storage,
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", roam_lab::bench::render(&report));
            }
            Ok(())
        }
    }
}

async fn run_demo(cfg: LabConfig, warmup_s: u64, human: bool) -> anyhow::Result<MigrationResult> {
    let say = |s: &str| eprintln!("roam-lab: {s}");
    say(&format!(
        "starting hosts office (198.18.1.2) and home (198.18.2.2) over {} Mbit/s, {} ms RTT, {}% loss",
        cfg.link.bandwidth_mbit, cfg.link.rtt_ms, cfg.link.loss_pct
    ));
    let lab = Lab::start(cfg.clone()).await.context("start the lab")?;
    say(&format!(
        "booting VM 'desk' on office ({} MiB memory, {} MiB disk, {} MiB of data)",
        cfg.memory_mib,
        cfg.disk_bytes >> 20,
        cfg.data_mib
    ));
    if let Err(e) = lab.create_vm("office", "desk").await {
        anyhow::bail!(
            "create/start the VM: {e}\n--- office log ---\n{}",
            lab.host("office").log_tail(30)
        );
    }
    lab.start_workload("office", "desk").await?;
    say(&format!(
        "workload running: {} MiB/s of memory dirtied, {} durable writes/s; migrating in {warmup_s} s",
        cfg.workload.mem_dirty_mib_s, cfg.workload.disk_writes_per_s
    ));
    tokio::time::sleep(Duration::from_secs(warmup_s)).await;
    let bar = if human {
        let b = ProgressBar::new(1);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let result = lab
        .migrate("desk", "office", "home", |p: &Progress| {
            let total = p.disk_total_bytes + p.memory_total_bytes;
            let done = p.disk_sent_bytes + p.memory_sent_bytes;
            bar.set_length(total.max(done).max(1));
            bar.set_position(done);
            bar.set_message(p.phase.to_string());
        })
        .await?;
    bar.finish_and_clear();
    if result.outcome == Outcome::Completed {
        // The guest must keep running at home: heartbeats and acks continue there.
        let before = lab.host("home").client.vm_agent("desk").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = lab.host("home").client.vm_agent("desk").await?;
        if after.heartbeats <= before.heartbeats {
            anyhow::bail!("the guest does not run at home after the migration");
        }
        say(&format!(
            "guest alive at home: {} heartbeats/s",
            after.heartbeats - before.heartbeats
        ));
    } else {
        say(&format!(
            "migration aborted; office log:\n{}",
            lab.host("office").log_tail(20)
        ));
    }
    lab.shutdown().await;
    Ok(result)
}

fn print_summary(r: &MigrationResult) {
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "migration of '{}' {} → {}: {}",
        r.vm, r.from, r.to, r.outcome
    );
    if let Some(e) = &r.error {
        println!("  error              {e}");
    }
    println!("  total time         {:.2} s", r.total_ms as f64 / 1000.0);
    println!(
        "  guest paused       {}",
        r.pause_ms.map_or("-".into(), |d| format!(
            "{d} ms (stop at source → run at destination)"
        ))
    );
    println!(
        "  downtime (QEMU)    {}",
        r.downtime_ms.map_or("-".into(), |d| format!("{d} ms"))
    );
    println!(
        "  downtime (guest)   {}",
        r.guest_downtime_ms
            .map_or("-".into(), |d| format!("{d} ms (longest heartbeat gap)"))
    );
    println!(
        "  bytes              memory {:.1} MB, disk {:.1} MB, wire {:.1} MB",
        mb(r.bytes.memory),
        mb(r.bytes.disk),
        mb(r.bytes.wire)
    );
    println!(
        "  link               {:.1} Mbit/s measured, {:.1} ms RTT, {:.2}% loss",
        r.link.bandwidth_mbit, r.link.rtt_ms, r.link.loss_pct
    );
    println!(
        "  acked writes       {} acknowledged, {} lost",
        r.acked_writes, r.acked_writes_lost
    );
    println!("  guest rebooted     {}", r.guest_rebooted);
    println!("  accelerator        {}", r.accel);
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|(p, ms)| format!("{p} {ms} ms"))
        .collect();
    println!("  phases             {}", phases.join(", "));
}
