//! Serves one raw file over NBD on a unix socket until SIGINT/SIGTERM.
//!
//! ```text
//! roam-nbd-serve --socket /tmp/d.sock --file disk.raw [--name disk] [--read-only]
//!                [--create SIZE_BYTES] [--workers N]
//! ```
//! Then e.g. `qemu-io -f raw 'nbd+unix:///disk?socket=/tmp/d.sock'`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use roam_nbd::{FileBackend, NbdServer, ServerConfig};

struct Args {
    socket: PathBuf,
    file: PathBuf,
    name: String,
    read_only: bool,
    create: Option<u64>,
    workers: usize,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: roam-nbd-serve --socket PATH --file FILE [--name NAME] [--read-only] \
         [--create SIZE_BYTES] [--workers N]"
    );
    ExitCode::from(2)
}

fn parse() -> Option<Args> {
    let mut it = std::env::args().skip(1);
    let (mut socket, mut file, mut name, mut read_only, mut create) =
        (None, None, "disk".to_string(), false, None);
    let mut workers = ServerConfig::default().workers_per_connection;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(it.next()?)),
            "--file" => file = Some(PathBuf::from(it.next()?)),
            "--name" => name = it.next()?,
            "--read-only" => read_only = true,
            "--create" => create = Some(it.next()?.parse().ok()?),
            "--workers" => workers = it.next()?.parse().ok()?,
            _ => return None,
        }
    }
    Some(Args {
        socket: socket?,
        file: file?,
        name,
        read_only,
        create,
        workers,
    })
}

fn main() -> ExitCode {
    let Some(args) = parse() else {
        return usage();
    };
    // Block the signals before any thread starts so only sigwait sees them.
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        eprintln!("roam-nbd-serve: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    let backend = match args.create {
        Some(size) => FileBackend::create(&args.file, size),
        None => FileBackend::open(&args.file, args.read_only),
    };
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            eprintln!("roam-nbd-serve: {}: {e}", args.file.display());
            return ExitCode::FAILURE;
        }
    };
    let config = ServerConfig {
        workers_per_connection: args.workers,
        ..ServerConfig::default()
    };
    let server = match NbdServer::bind(&args.socket, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("roam-nbd-serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = server.add_export(&args.name, Arc::new(backend), args.read_only) {
        eprintln!("roam-nbd-serve: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "roam-nbd-serve: serving {} as {:?} on {}",
        args.file.display(),
        args.name,
        args.socket.display()
    );
    let _ = set.wait();
    let stats = server.export_stats(&args.name);
    server.shutdown();
    if let Some(s) = stats {
        eprintln!("roam-nbd-serve: {s:?}");
    }
    ExitCode::SUCCESS
}
