//! roam-mkdisk: make a demo disk image for a roam guest.
//!
//! ```text
//! roam-mkdisk OUT.img [--size 2G] [--data-mib 64] [--file-mib 4] [--seed 1]
//! ```

use roam_agent::mkdisk::{make_disk, parse_size, MkdiskOptions};

const USAGE: &str =
    "usage: roam-mkdisk OUT.img [--size 2G] [--data-mib 64] [--file-mib 4] [--seed 1]";

fn fail(msg: &str) -> ! {
    eprintln!("roam-mkdisk: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut opts = MkdiskOptions::new("", 2 << 30, 64);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--size" => {
                let v = val("--size");
                opts.size = parse_size(&v).unwrap_or_else(|| fail(&format!("bad size {v:?}")));
            }
            "--data-mib" => {
                let v = val("--data-mib");
                opts.data_mib = v
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad --data-mib {v:?}")));
            }
            "--file-mib" => {
                let v = val("--file-mib");
                opts.file_mib = v
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad --file-mib {v:?}")));
            }
            "--seed" => {
                let v = val("--seed");
                opts.seed = v
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad --seed {v:?}")));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            s if s.starts_with('-') => fail(&format!("unknown option {s}")),
            s => out = Some(s.to_string()),
        }
    }
    opts.out = out.unwrap_or_else(|| fail("no output file")).into();
    match make_disk(&opts) {
        Ok(r) => println!(
            "{}: {} bytes, ext4 {} bytes ({} files, {} bytes of data), log region {}+{}",
            opts.out.display(),
            r.size,
            r.fs_size,
            r.files,
            r.data_bytes,
            r.log.offset,
            r.log.len
        ),
        Err(e) => {
            eprintln!("roam-mkdisk: {e}");
            std::process::exit(1);
        }
    }
}
