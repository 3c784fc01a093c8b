//! roam-agent: the guest agent (static binary, started by the guest's /init).
//! See `roam_agent::guest` and docs/guest.md.

fn main() {
    let paths = roam_agent::guest::Paths::from_env();
    if let Err(e) = roam_agent::guest::run(paths) {
        eprintln!("roam-agent: {e}");
        std::process::exit(1);
    }
}
