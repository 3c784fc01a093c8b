//! Measures roam's NBD server against qemu-nbd on the same file with
//! `qemu-img bench`, and prints a side-by-side table (or `--json`).
//! A third column serves the file as roamd serves a running VM's disk: behind a
//! `TrackedBackend` (64 KiB chunks) with three live dirty subscriptions, as when a
//! migration and a replica follow the disk (the third: roamd's record of everything the
//! VM wrote since it started, for replication after a stop). The replica's is a durable
//! one, marked before and after each write as roamd's live map is (its bits here sit in
//! ordinary memory: a mapped page costs the same once touched). Its ratio to plain roam
//! is the hot-path cost of change tracking (`tracked_ratio`, promised ≥ 0.90).
//!
//! ```text
//! roam-nbd-bench [--json] [--size-mib 512] [--rounds 5] [--write-count 50000]
//!                [--read-count 2000] [--depth 16] [--workers 4] [--dir /tmp]
//! ```
//! Workloads: 4 KiB writes scattered over the image (`qemu-img bench` has
//! no random mode, so the step is 1 MiB + 4 KiB and offsets wrap around the
//! image), and 1 MiB sequential reads of a pre-filled image. Each workload
//! runs `--rounds` times per server, alternating servers; the best round
//! counts, which filters out noise from other processes on a shared host.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roam_nbd::{
    Backend, BitStore, DirtyTracker, FileBackend, InitialState, NbdServer, ServerConfig,
    TrackedBackend,
};

const EXPORT: &str = "disk";
const WRITE_STEP: u64 = 1024 * 1024 + 4096;

struct Opts {
    json: bool,
    size_mib: u64,
    rounds: u32,
    write_count: u64,
    read_count: u64,
    depth: u32,
    workers: usize,
    dir: PathBuf,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        json: false,
        size_mib: 512,
        rounds: 5,
        write_count: 50_000,
        read_count: 2_000,
        depth: 16,
        workers: ServerConfig::default().workers_per_connection,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--json" => o.json = true,
            "--size-mib" => o.size_mib = num(val()?)?,
            "--rounds" => o.rounds = num(val()?)? as u32,
            "--write-count" => o.write_count = num(val()?)?,
            "--read-count" => o.read_count = num(val()?)?,
            "--depth" => o.depth = num(val()?)? as u32,
            "--workers" => o.workers = num(val()?)? as usize,
            "--dir" => o.dir = PathBuf::from(val()?),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq)]
enum Server {
    Roam,
    QemuNbd,
    RoamTracked,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Roam => "roam-nbd",
            Server::QemuNbd => "qemu-nbd",
            Server::RoamTracked => "tracked",
        }
    }
}

/// roamd's chunk size for dirty tracking and replication.
const TRACK_CHUNK: u64 = 64 * 1024;

/// Bits of a durable subscription (roamd keeps them in a shared file mapping).
#[derive(Debug)]
struct Bits(Vec<AtomicU64>);

impl BitStore for Bits {
    fn words(&self) -> &[AtomicU64] {
        &self.0
    }
}

/// A running server; stopping it (or dropping it) cleans up. A tracked server keeps its
/// subscriptions alive (a write marks every live one).
enum Running {
    Roam {
        server: Option<NbdServer>,
        _subs: Vec<roam_nbd::DirtySubscription>,
    },
    Qemu(Child),
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Roam { server, .. } => {
                if let Some(s) = server.take() {
                    s.shutdown();
                }
            }
            Running::Qemu(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn start(which: Server, file: &Path, sock: &Path, workers: usize) -> Result<Running, String> {
    let _ = std::fs::remove_file(sock);
    let r = match which {
        Server::Roam | Server::RoamTracked => {
            let config = ServerConfig {
                workers_per_connection: workers,
                ..ServerConfig::default()
            };
            let s = NbdServer::bind(sock, config).map_err(|e| e.to_string())?;
            let b: Arc<dyn Backend> =
                Arc::new(FileBackend::open(file, false).map_err(|e| e.to_string())?);
            let mut subs = Vec::new();
            let b = if which == Server::RoamTracked {
                let t = DirtyTracker::new(b.size(), TRACK_CHUNK).map_err(|e| e.to_string())?;
                for _ in 0..2 {
                    subs.push(t.subscribe(InitialState::Clean));
                }
                let words = t.chunk_count().div_ceil(64) as usize;
                let durable = Arc::new(Bits((0..words).map(|_| AtomicU64::new(0)).collect()));
                subs.push(t.subscribe_in(durable).map_err(|e| e.to_string())?);
                Arc::new(TrackedBackend::new(b, t).map_err(|e| e.to_string())?)
            } else {
                b
            };
            s.add_export(EXPORT, b, false).map_err(|e| e.to_string())?;
            Running::Roam {
                server: Some(s),
                _subs: subs,
            }
        }
        Server::QemuNbd => {
            let child = Command::new("qemu-nbd")
                .args([
                    "-f",
                    "raw",
                    "-x",
                    EXPORT,
                    "--cache=writeback",
                    "-e",
                    "4",
                    "-t",
                    "-k",
                ])
                .arg(sock)
                .arg(file)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("qemu-nbd: {e}"))?;
            let r = Running::Qemu(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while UnixStream::connect(sock).is_err() {
                if Instant::now() > deadline {
                    return Err("qemu-nbd did not come up".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r
        }
    };
    Ok(r)
}

/// CPU seconds (user + system, all threads) used so far by `pid`, from
/// /proc, so the server's cost per request can be compared even when other
/// load on the host makes wall-clock times noisy.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Runs `qemu-img bench` and returns the seconds it reports.
fn qemu_img_bench(sock: &Path, args: &[String]) -> Result<f64, String> {
    let uri = format!("nbd+unix:///{EXPORT}?socket={}", sock.display());
    let out = Command::new("qemu-img")
        .args(["bench", "-f", "raw"])
        .args(args)
        .arg(&uri)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("cannot parse qemu-img output: {text}"))
}

struct Workload {
    name: &'static str,
    bytes_per_op: u64,
    count: u64,
    args: Vec<String>,
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("roam-nbd-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roam-nbd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let dir = o.dir.join(format!("roam-nbd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = DirGuard(dir.clone());
    let file = dir.join("disk.raw");
    let sock = dir.join("nbd.sock");
    let size = o.size_mib * 1024 * 1024;

    // Fill with non-zero data so reads are not served from holes.
    let b = FileBackend::create(&file, size).map_err(|e| e.to_string())?;
    let chunk = vec![0x5au8; 1024 * 1024];
    for off in (0..size).step_by(chunk.len()) {
        let n = (size - off).min(chunk.len() as u64) as usize;
        b.write_at(&chunk[..n], off, false)
            .map_err(|e| e.to_string())?;
    }
    drop(b);

    let d = o.depth.to_string();
    let workloads = [
        Workload {
            name: "4k-scattered-write",
            bytes_per_op: 4096,
            count: o.write_count,
            args: [
                "-w",
                "-s",
                "4096",
                "-d",
                &d,
                "-S",
                &WRITE_STEP.to_string(),
                "-c",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([o.write_count.to_string(), "--pattern".into(), "171".into()])
            .collect(),
        },
        Workload {
            name: "1m-seq-read",
            bytes_per_op: 1024 * 1024,
            count: o.read_count,
            args: ["-s", "1M", "-d", &d, "-c"]
                .iter()
                .map(|s| s.to_string())
                .chain([o.read_count.to_string()])
                .collect(),
        },
    ];

    let servers = [Server::Roam, Server::QemuNbd, Server::RoamTracked];
    // best[w][s] = shortest time seen
    let mut best = [[f64::INFINITY; 3]; 2];
    // cpu_best[w][s] = least server CPU seconds for the workload
    let mut cpu_best = [[f64::INFINITY; 3]; 2];
    for round in 0..o.rounds {
        // Rotate who goes first so none always gets the warmer cache.
        let order: Vec<usize> = (0..3).map(|i| (i + round as usize) % 3).collect();
        for &si in &order {
            // Start each run with no dirty pages left by the previous one,
            // so writeback throttling hits both servers alike.
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())?;
            let running = start(servers[si], &file, &sock, o.workers)?;
            let pid = match &running {
                Running::Qemu(c) => c.id(),
                Running::Roam { .. } => std::process::id(),
            };
            for (wi, w) in workloads.iter().enumerate() {
                let cpu0 = cpu_seconds(pid);
                let t = qemu_img_bench(&sock, &w.args)?;
                let cpu = cpu_seconds(pid) - cpu0;
                if !o.json {
                    eprintln!(
                        "round {round} {:>9} {:<20} {t:.3} s  server cpu {cpu:.2} s",
                        servers[si].name(),
                        w.name
                    );
                }
                best[wi][si] = best[wi][si].min(t);
                cpu_best[wi][si] = cpu_best[wi][si].min(cpu);
            }
            drop(running);
        }
    }

    let mut rows = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        let rate = |t: f64| {
            (
                w.count as f64 / t,
                w.count as f64 * w.bytes_per_op as f64 / t / 1e6,
            )
        };
        let (roam_iops, roam_mbs) = rate(best[wi][0]);
        let (qemu_iops, qemu_mbs) = rate(best[wi][1]);
        let (tracked_iops, _) = rate(best[wi][2]);
        // Server CPU microseconds per request.
        let us = |s: usize| cpu_best[wi][s] * 1e6 / w.count as f64;
        rows.push(Row {
            name: w.name,
            roam_iops,
            roam_mbs,
            qemu_iops,
            qemu_mbs,
            roam_us: us(0),
            qemu_us: us(1),
            tracked_iops,
            tracked_us: us(2),
        });
    }
    if o.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = r
                    .cells()
                    .iter()
                    .map(|c| format!("\"{}\":{:.*}", c.key, c.decimals, c.value))
                    .collect();
                format!("\"{}\":{{{}}}", r.name, fields.join(","))
            })
            .collect();
        println!(
            "{{\"size_mib\":{},\"depth\":{},\"workers\":{},\"rounds\":{},{}}}",
            o.size_mib,
            o.depth,
            o.workers,
            o.rounds,
            items.join(",")
        );
    } else {
        let mut head = format!("{:<20}", "workload");
        for c in rows.first().map(Row::cells).unwrap_or_default() {
            head.push_str(&format!(" {:>w$}", c.header, w = c.width));
        }
        println!("{head}");
        for r in &rows {
            let mut line = format!("{:<20}", r.name);
            for c in r.cells() {
                line.push_str(&format!(" {:>w$.*}", c.decimals, c.value, w = c.width));
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// One workload's figures: best time and least server CPU per server.
struct Row {
    name: &'static str,
    roam_iops: f64,
    roam_mbs: f64,
    qemu_iops: f64,
    qemu_mbs: f64,
    /// Server CPU microseconds per request (the cost the server itself adds; less noisy
    /// than wall time on a shared host).
    roam_us: f64,
    qemu_us: f64,
    tracked_iops: f64,
    tracked_us: f64,
}

/// One printed figure: its JSON key, its column, and how it is shown.
struct Cell {
    key: &'static str,
    header: &'static str,
    width: usize,
    decimals: usize,
    value: f64,
}

impl Row {
    /// The figures in print order, for the JSON object and the table alike.
    fn cells(&self) -> Vec<Cell> {
        let c = |key, header, width, decimals, value| Cell {
            key,
            header,
            width,
            decimals,
            value,
        };
        vec![
            c("roam_iops", "roam IOPS", 10, 0, self.roam_iops),
            c("roam_mb_s", "roam MB/s", 10, 1, self.roam_mbs),
            c("qemu_nbd_iops", "qemu IOPS", 10, 0, self.qemu_iops),
            c("qemu_nbd_mb_s", "qemu MB/s", 10, 1, self.qemu_mbs),
            c("ratio", "ratio", 7, 3, self.roam_iops / self.qemu_iops),
            c("roam_cpu_us_per_op", "roam us/op", 10, 2, self.roam_us),
            c("qemu_nbd_cpu_us_per_op", "qemu us/op", 10, 2, self.qemu_us),
            c("tracked_iops", "tracked IOPS", 12, 0, self.tracked_iops),
            c(
                "tracked_ratio",
                "tracked/roam",
                12,
                3,
                self.tracked_iops / self.roam_iops,
            ),
            c(
                "tracked_cpu_us_per_op",
                "tracked us/op",
                13,
                2,
                self.tracked_us,
            ),
        ]
    }
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
