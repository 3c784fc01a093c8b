//! Fault injection: named faults a test (and later the fault-injection campaign)
//! switches on through the environment, `ROAM_FAULTS=name,name`. Each names one
//! failure roamd cannot be made to produce from outside at the right instant.
//! Off unless set; every use logs a warning so a fault is never silent.
//!
//! - `refuse-handover`: the destination reports the disks unequal at the seal,
//!   after it took over the VM's HIP associations and announced its locator —
//!   the latest point at which a handover can still be called off.
//! - `lose-link-after-cont`: a post-copy destination closes the connection right after
//!   it let the guest run, before it says `Running`: the source cannot know the move
//!   happened.

use std::sync::OnceLock;

use tracing::warn;

fn faults() -> &'static [String] {
    static F: OnceLock<Vec<String>> = OnceLock::new();
    F.get_or_init(|| parse(&std::env::var("ROAM_FAULTS").unwrap_or_default()))
}

fn parse(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether fault `name` is switched on (logged when it is).
pub fn active(name: &str) -> bool {
    let on = faults().iter().any(|f| f == name);
    if on {
        warn!(fault = name, "injecting fault (ROAM_FAULTS)");
    }
    on
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_comma_list() {
        assert_eq!(super::parse(" a, b,,c "), vec!["a", "b", "c"]);
        assert!(super::parse("").is_empty());
    }
}
