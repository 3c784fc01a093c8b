//! Which accelerator QEMU gets.
//!
//! `/dev/kvm` existing is not enough: on the project's machines it can be served by
//! `kvm_pvm` (the host itself is a lightweight VM without vmx/svm), and standard guest
//! kernels die there with "KVM internal error" or hang. Only the hardware back ends
//! (`kvm_intel`, `kvm_amd`) run an unmodified guest, so those are what we look for.
//! The decision is a pure function over observed facts ([`decide_accel`]) so it is
//! testable; [`probe_accel`] gathers the facts once and caches the answer.

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// A QEMU accelerator roam knows how to run guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm` (kvm_intel or kvm_amd).
    Kvm,
    /// QEMU's binary translator: slow, but works everywhere.
    Tcg,
}

impl Accel {
    /// The value for QEMU's `-accel` option.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host looks like, as far as the accelerator choice is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccelFacts {
    /// Value of `ROAM_ACCEL`, if set.
    pub forced: Option<String>,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/sys/module/kvm_intel` or `/sys/module/kvm_amd` exists.
    pub hardware_kvm_module: bool,
    /// `/sys/module/kvm_pvm` exists (paravirtual KVM: unusable for standard guests).
    pub pvm_module: bool,
}

impl AccelFacts {
    /// Reads the facts from this host.
    pub fn gather() -> Self {
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        AccelFacts {
            forced: std::env::var("ROAM_ACCEL").ok(),
            dev_kvm: Path::new("/dev/kvm").exists(),
            hardware_kvm_module: module("kvm_intel") || module("kvm_amd"),
            pvm_module: module("kvm_pvm"),
        }
    }
}

/// Chooses the accelerator. `ROAM_ACCEL=kvm|tcg` wins (an unknown value is ignored so a
/// typo cannot select a broken KVM); otherwise KVM only with a hardware KVM module and
/// no paravirtual one loaded, because kvm_pvm may be the module actually behind
/// `/dev/kvm`.
pub fn decide_accel(facts: &AccelFacts) -> Accel {
    match facts.forced.as_deref().map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("kvm") => return Accel::Kvm,
        Some(v) if v.eq_ignore_ascii_case("tcg") => return Accel::Tcg,
        _ => {}
    }
    if facts.dev_kvm && facts.hardware_kvm_module && !facts.pvm_module {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// The accelerator for this host, probed once per process and cached.
pub fn probe_accel() -> Accel {
    static CACHE: OnceLock<Accel> = OnceLock::new();
    *CACHE.get_or_init(|| {
        let facts = AccelFacts::gather();
        let accel = decide_accel(&facts);
        tracing::info!(?facts, ?accel, "accelerator probed");
        accel
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev_kvm: bool, hw: bool, pvm: bool) -> AccelFacts {
        AccelFacts {
            forced: None,
            dev_kvm,
            hardware_kvm_module: hw,
            pvm_module: pvm,
        }
    }

    #[test]
    fn dev_kvm_alone_is_not_kvm() {
        assert_eq!(decide_accel(&facts(true, false, false)), Accel::Tcg);
        assert_eq!(decide_accel(&facts(true, false, true)), Accel::Tcg);
    }

    #[test]
    fn hardware_module_gives_kvm_unless_pvm() {
        assert_eq!(decide_accel(&facts(true, true, false)), Accel::Kvm);
        assert_eq!(decide_accel(&facts(true, true, true)), Accel::Tcg);
        assert_eq!(decide_accel(&facts(false, true, false)), Accel::Tcg);
    }

    #[test]
    fn env_forces_either_way_and_ignores_garbage() {
        let mut f = facts(true, true, false);
        f.forced = Some("TCG".into());
        assert_eq!(decide_accel(&f), Accel::Tcg);
        let mut f = facts(false, false, true);
        f.forced = Some("kvm".into());
        assert_eq!(decide_accel(&f), Accel::Kvm);
        f.forced = Some("hvf".into());
        assert_eq!(decide_accel(&f), Accel::Tcg);
    }

    #[test]
    fn this_host_probe_is_stable() {
        assert_eq!(probe_accel(), probe_accel());
    }
}
